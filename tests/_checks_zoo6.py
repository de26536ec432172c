"""Worker-side checks for tests/test_zoo6_dist.py: the red-team spellings of tests/models_zoo6.py
on gloo ranks, each in its outcome class (tests/_outcomes.py)."""
from __future__ import annotations

import models_zoo6 as Z
from _outcomes import exact, refused


def check_reductions(rank, P, rec):
    exact(rank, P, rec, "h.max(), torch.min(h), amax(dim=1) over the sequence",
          Z.FullReductions, kinds={"reduction"})
    exact(rank, P, rec, "cosFormer M = idx.max() + 1 over positions", Z.CosFormerMaxIndex,
          kinds={"reduction", "positions"})
    exact(rank, P, rec, "performer torch.max(data_dash) stabiliser", Z.PerformerStabiliser,
          kinds={"reduction"})


def check_lengths(rank, P, rec):
    refused(rank, P, rec, "arange(T) / torch.tensor(float(T))", Z.LengthInTensor,
            text=("LOCAL length", "length_constants"))
    refused(rank, P, rec, "cumsum / torch.full((), T)", Z.LengthInFull,
            text=("LOCAL length", "length_constants"))


def check_scans(rank, P, rec):
    exact(rank, P, rec, "quadratic SSD with ssd_minimal's segsum (repeat + masked cumsum)",
          Z.SSDMinimalQuadratic, kinds={"linear_scan"})
    exact(rank, P, rec, "chunk axis prefix sum (fla naive_chunk_linear_attn)", Z.ChunkStatePass,
          kinds={"cumsum"})


def check_loops_and_losses(rank, P, rec):
    exact(rank, P, rec, "two carried states, both final states returned", Z.TwoStateFinals,
          kinds={"loop_scan"})
    exact(rank, P, rec, "nn.CrossEntropyLoss (weight=None) and class weights + smoothing",
          Z.LossModules, Z.ids_and_labels(), kinds={"reduction"})
