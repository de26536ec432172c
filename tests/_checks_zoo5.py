"""Worker-side checks for tests/test_zoo5_dist.py: the spellings of tests/models_zoo5.py (found
by running HF transformers 5 models) on gloo ranks, each in its outcome class (tests/_outcomes.py).
"""
from __future__ import annotations

import torch

import models_zoo5 as Z
import _outcomes
from _outcomes import exact, refused

FILE = "models_zoo5.py"


def gathered(*args, **kw):
    return _outcomes.gathered(*args, file=FILE, **kw)


def _with_packed_positions(B, T, D=16):
    return lambda: [torch.randn(B, T, D), Z.packed_positions(B, T)]


# softplus: torch 2.13's aot_eager trips on its backward with a transposed layout (an
# upstream meta-stride bug, also without spcompile); the "eager" delegate avoids it
EAGER = {"compiler": "eager"}


def check_associative_scans(rank, P, rec):
    exact(rank, P, rec, "HF Mamba associative_scan (generic, inlined by Dynamo)",
          Z.SelectiveScanAS, kinds={"cumsum"}, T=8 * P, **EAGER)
    exact(rank, P, rec, "associative_scan reverse=True",
          lambda: Z.SelectiveScanAS(reverse=True), kinds={"cumsum"}, T=8 * P, **EAGER)
    # the higher-order op's own backward drops the multiplier leaf's gradient in torch 2.13
    # (pytorch#172568), so its eager run is no reference: the generic form of the same model is
    exact(rank, P, rec, "associative_scan higher-order op (pointwise form)",
          lambda: Z.SelectiveScanAS(form="hop"), kinds={"cumsum"}, T=8 * P,
          reference=Z.SelectiveScanAS, **EAGER)
    exact(rank, P, rec, "associative_scan higher-order op, reverse",
          lambda: Z.SelectiveScanAS(form="hop", reverse=True), kinds={"cumsum"}, T=8 * P,
          reference=lambda: Z.SelectiveScanAS(reverse=True), **EAGER)
    exact(rank, P, rec, "associative_scan of logaddexp (one leaf)", Z.LogAddScan,
          kinds={"cumsum"}, T=8 * P)
    exact(rank, P, rec, "associative_scan of (A, b) with matrix products", Z.MatrixScan,
          kinds={"cumsum"}, T=8 * P)
    exact(rank, P, rec, "scan layer under causal SDPA", Z.ScanThenAttention,
          kinds={"cumsum", "attention"}, T=8 * P, **EAGER)


def check_spellings(rank, P, rec):
    exact(rank, P, rec, "autograd.Function, token-local (fused SiLU gate)", Z.FusedGateMLP)
    gathered(rank, P, rec, "autograd.Function whose forward is a cumsum", Z.CustomPrefixSum,
             ops=("autograd_function_apply",))
    exact(rank, P, rec, "F.conv1d(x, weight=w, bias=b, padding=k-1, groups=D)[..., :T]",
          Z.KeywordCausalConv, kinds={"halo"})
    exact(rank, P, rec, "GPT-2 Conv1D: addmm(bias, x.view(-1, D), w)", Z.GPT2Conv1D)
    exact(rank, P, rec, "router weights /= their sum (in place)", Z.RouterNormalise)
    exact(rank, P, rec, "transformers 5 Mamba2 chunk scan, two layers", Z.Mamba2ChunkScan,
          kinds={"linear_scan"}, T=8 * P, **EAGER)
    exact(rank, P, rec, "torch.func.vmap over the batch", Z.VmapPerToken)
    exact(rank, P, rec, "h[:, :1] and h[:, -1:]", Z.FirstLastSlices, kinds={"reduction"})
    exact(rank, P, rec, "Hedgehog: rows normalised before the value product", Z.HedgehogAttention,
          kinds={"linear_scan"})
    exact(rank, P, rec, "Hedgehog: row sum clamped from below", lambda: Z.HedgehogAttention(
          clamp=True), kinds={"linear_scan"})


def _tokens(B, T, V=11):
    def make():
        ids, labels = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
        labels[0, :3] = -100
        return [ids, labels]
    return make


def check_losses(rank, P, rec):
    for red in ("mean", "sum"):
        exact(rank, P, rec, f"transformers 5 ForCausalLMLoss (pad + [1:], {red})",
              lambda: Z.HF5CausalLMLoss(reduction=red), _tokens(2, 32),
              kinds={"halo", "reduction", "cumsum"})


def check_masks(rank, P, rec):
    exact(rank, P, rec, "HF packed-segment mask from arange positions (diff, cumsum, indexing)",
          Z.PackedMaskAttention, kinds={"attention", "halo", "cumsum"})
    # packed documents: position_ids reset inside a row, so the mask is data (never read by
    # value): K/V all-gathered, this rank's mask rows rebuilt from the gathered positions
    exact(rank, P, rec, "packed documents: position_ids given, mask per document",
          lambda: Z.PackedMaskAttention(given_positions=True), _with_packed_positions(2, 32),
          kinds={"attention", "halo", "cumsum"})


def check_p4(rank, P, rec):
    exact(rank, P, rec, "HF Mamba associative_scan (generic, inlined by Dynamo)",
          Z.SelectiveScanAS, kinds={"cumsum"}, T=4 * P, **EAGER)
    exact(rank, P, rec, "associative_scan of (A, b) with matrix products", Z.MatrixScan,
          kinds={"cumsum"}, T=4 * P)
    exact(rank, P, rec, "packed documents: position_ids given, mask per document",
          lambda: Z.PackedMaskAttention(given_positions=True), _with_packed_positions(2, 32),
          kinds={"attention", "halo", "cumsum"})


def check_redteam(rank, P, rec):
    """Spellings that gave wrong numbers (or a crash) before, found by a red-team pass."""
    for cast in ("type_as", "to"):
        exact(rank, P, rec, f"buffer.{cast}(x) keeps the buffer replicated",
              lambda: Z.RandomFeatures(cast=cast), kinds={"cumsum", "reduction"})
    exact(rank, P, rec, "complex projection, .real, cumsum", Z.ComplexReal, kinds={"cumsum"})
    exact(rank, P, rec, "cosFormer get_index: nn.Parameter(arange) in forward",
          Z.CosFormerIndex, kinds={"positions"})
    exact(rank, P, rec, "autograd.Function writing into views in place", Z.InPlaceFunction)
    exact(rank, P, rec, "y[:, 0] = bos, y[:, -1] = 0, y[:, 1:3].fill_()", Z.WritesAtPositions,
          kinds={"positions", "cumsum"})
    refused(rank, P, rec, "m = ones(T); m[0] = 0", Z.LocalLengthMask,
            text=("fixed position", "torch.where"))
    for T in (8 * P, 16 * P):  # one and two chunks per rank: a loop spcompile cannot take
        refused(rank, P, rec, f"non-affine loop over chunks, {T // P // 8} per rank",
                Z.ChunkLoop, T=T, text=("loop over tokens or chunks",))
    # reads of all chunks but the (dead) last one: a loop over the chunk axis with the bare
    # state stacked before each update; at two chunks per rank the dead last update cannot be
    # checked against another step: refused, never a few global indexes
    if 32 // P // 4 > 2:
        exact(rank, P, rec, "chunk view loop with an exclusive readout", Z.ChunkViewLoop,
              kinds={"loop_scan"})
    else:
        refused(rank, P, rec, "chunk view loop with an exclusive readout", Z.ChunkViewLoop,
                text=("loop over tokens or chunks", "only two steps per rank"))
    exact(rank, P, rec, "loop recomputing a parameter-only value per step", Z.InvariantInLoop,
          kinds={"loop_scan"}, T=4 * P)
