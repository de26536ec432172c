"""Worker-side checks for tests/test_zoo6_dist.py: the red-team spellings of tests/models_zoo6.py
on gloo ranks, each in its outcome class (tests/_outcomes.py)."""
from __future__ import annotations

import torch

import models_zoo6 as Z
import _outcomes
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
    be = exact(rank, P, rec, "SSD with B/C shared by the heads (einsum and matmul)",
               Z.SSDSharedBC, kinds={"linear_scan"})
    rec.true("SSD shared B/C: both forms are scans",
             sum(m.kind == "linear_scan" for r in be.reports for m in r.matches) == 2)


def check_loops_and_losses(rank, P, rec):
    exact(rank, P, rec, "two carried states, both final states returned", Z.TwoStateFinals,
          kinds={"loop_scan"})
    exact(rank, P, rec, "RWKV-4 naive WKV loop (exclusive readout, finals unused)",
          Z.RWKV4NaiveWKV, kinds={"loop_scan", "halo"})
    exact(rank, P, rec, "exclusive elementwise readout, final state unused",
          Z.ExclusiveGatedReadout, kinds={"loop_scan"})
    exact(rank, P, rec, "output buffer torch.zeros(...).to(q) written in a loop",
          Z.CastOutputBuffer, kinds={"loop_scan"})
    exact(rank, P, rec, "nn.CrossEntropyLoss (weight=None) and class weights + smoothing",
          Z.LossModules, Z.ids_and_labels(), kinds={"reduction"})


def _ids(B=2, T=32, vocab=11):
    return lambda: [torch.randint(0, vocab, (B, T))]


def check_training_surfaces(rank, P, rec):
    exact(rank, P, rec, "multi-token prediction: shifted losses of widths 1 and 2",
          Z.MultiTokenLosses, _ids(), kinds={"halo", "reduction"})
    exact(rank, P, rec, "narrow / split / select / [[-1]] spellings", Z.NarrowSpellings,
          kinds={"positions", "reduction", "halo"})
    exact(rank, P, rec, "RoPE in fp32 under autocast into SDPA", Z.AutocastRoPEAttention,
          kinds={"attention"}, tol=2e-2)


def check_length_indices(rank, P, rec):
    refused(rank, P, rec, "x[:, T - 1] (T folded to the local length)", Z.IndexFromLength,
            text=("LOCAL length", "negative index", "length_constants"))
    refused(rank, P, rec, "HF 4 sequence lengths % ids.shape[-1]", Z.HF4SequenceLengths,
            _ids(), text=("LOCAL length", "length_constants"))


def check_convolutions(rank, P, rec):
    refused(rank, P, rec, "S4D Vandermonde kernel from arange(L) by conv1d", Z.VandermondeConv,
            text=("long convolution", "gather_sequence"))
    refused(rank, P, rec, "long filter w[..., :T] with pad(T - 1)", Z.FilterCutToLength,
            text=("long convolution", "FFT"))
    _outcomes.gathered(rank, P, rec, "causal conv reaching past the previous rank",
                       Z.WideCausalConv, ops=("conv1d",), file="models_zoo6.py")


def check_inputs_and_precision(rank, P, rec):
    exact(rank, P, rec, "a [D, D] plain tensor attribute with D = T_local", Z.PlainTensorWeight,
          kinds={"cumsum"})
    exact(rank, P, rec, "bf16 normalised linear attention", lambda: Z.HalfLinearAttention().to(
        torch.bfloat16), lambda: [torch.randn(2, 32, 16, dtype=torch.bfloat16)],
          kinds={"linear_scan"}, tol=3e-2)
