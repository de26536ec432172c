"""Worker-side checks for tests/test_zoo7_dist.py: the red-team spellings of tests/models_zoo7.py
on gloo ranks, each in its outcome class (tests/_outcomes.py)."""
from __future__ import annotations

import models_zoo7 as Z
from _outcomes import exact, gathered, refused


def check_recurrent_modules(rank, P, rec):
    # (run as a relay: torch.gru's hx is the state entering the rank — tests/test_relay_dist.py)
    exact(rank, P, rec, "nn.GRU between projections (relay)", Z.GRULayer, kinds={"loop_scan"})
    exact(rank, P, rec, "2-layer nn.LSTM, final (h, c) used (relay)", Z.TwoLayerLSTM,
          kinds={"loop_scan"})
    exact(rank, P, rec, "time-major nn.RNN (relay)", Z.TimeMajorRNN, kinds={"loop_scan"})
    exact(rank, P, rec, "nn.GRUCell stepped in a Python loop (relay)", Z.GRUCellLoop,
          kinds={"loop_scan"})


def check_blocks(rank, P, rec):
    be = exact(rank, P, rec, "SDPA within blocks of 4 tokens", Z.BlockLocalSDPA)
    rec.true("block SDPA: no collective at all",
             not any(r.matches for r in be.reports), str([r.matches for r in be.reports]))
    exact(rank, P, rec, "heads inside blocks, masked SDPA", Z.BlockLocalHeads)
    exact(rank, P, rec, "view(B, -1, C, E) blocks with a prefix sum", Z.InferredBlockCount)
    refused(rank, P, rec, "view(B, 2, -1, E): a fixed number of blocks", Z.FixedBlockCount,
            text=("fixed number of blocks", "x.view(B, -1, C, D)"))
    refused(rank, P, rec, "unflatten(1, (2, -1)) into SDPA", Z.FixedBlockCountUnflatten,
            text=("fixed number of blocks",))


def check_spellings(rank, P, rec):
    exact(rank, P, rec, "RWKV nn.ZeroPad2d((0, 0, 1, -1)) shift", Z.RWKVZeroPadShift,
          kinds={"halo"})
    exact(rank, P, rec, "filter from torch.linspace(0, 1, T)", Z.LinspaceFilter,
          kinds={"positions"})
    exact(rank, P, rec, "cumsum_ in place / arange(1, T + 1)", Z.RunningMeanInPlace,
          kinds={"cumsum", "positions"})
    exact(rank, P, rec, "SDPA enable_gqa=True", Z.GQAEnable, kinds={"attention"})


def check_masks_and_pooling(rank, P, rec):
    exact(rank, P, rec, "ones_like(scores).tril() causal mask", Z.OnesLikeScoresMask,
          kinds={"attention"})
    exact(rank, P, rec, "tril(ones_like(scores, dtype=bool)) linear attention",
          Z.OnesLikeBoolLinear, kinds={"linear_scan"})
    exact(rank, P, rec, "nn.MultiheadAttention + generate_square_subsequent_mask",
          Z.MHASubsequentMask, kinds={"attention"})
    exact(rank, P, rec, "nn.TransformerEncoderLayer with a causal src_mask",
          Z.CausalEncoderLayer, kinds={"attention"})
    be = exact(rank, P, rec, "max/min with indices over the sequence", Z.MaxOverSequence,
               kinds={"reduction"})
    rec.true("max with indices: every max/min is a reduction",
             sum(m.kind == "reduction" for r in be.reports for m in r.matches) == 5,
             str([str(m) for r in be.reports for m in r.matches]))
