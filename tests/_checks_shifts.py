"""Worker-side checks for tests/test_shifts_dist.py: the shift spellings of
tests/models_shifts.py on gloo ranks, each in its outcome class (tests/_outcomes.py)."""
from __future__ import annotations

import torch

import models_shifts as Z
import _outcomes
from _outcomes import exact, refused

FILE = "models_shifts.py"


def _ids(B, T, vocab=11):
    return lambda: [torch.randint(0, vocab, (B, T))]


def check_shifts(rank, P, rec):
    exact(rank, P, rec, "cat([zeros_like(x[:, :1]), x[:, :-1]])", Z.CatZerosShift,
          kinds={"halo", "shape"})
    exact(rank, P, rec, "cat([x.new_zeros(B, 1, D), x[:, :T - 1]])", Z.NewZerosShift,
          kinds={"halo"})
    exact(rank, P, rec, "pad(x[:, :-s], (s, 0)) and pad(x[:, s:], (0, s), value=1)",
          Z.PadOfCut, kinds={"halo"})
    exact(rank, P, rec, "pad(x, (1, 0))[:, :-1]", Z.CutOfPad, kinds={"halo"})
    exact(rank, P, rec, "recurrentgemma Conv1D windows over a loop of shifts", Z.ConvWindows,
          kinds={"halo"})
    exact(rank, P, rec, "cat([x[:, 1:], zeros_like(x[:, :1])]) (next token)", Z.NextTokenCat,
          kinds={"halo", "shape"})
    exact(rank, P, rec, "learned start token cat([bos, x[:, :-1]])", Z.StartTokenCat,
          kinds={"halo"})
    exact(rank, P, rec, "torch.roll(x, 1, 1); y[:, 0] = 0; roll(2); roll on features",
          Z.RollShift, kinds={"halo", "positions"})
    exact(rank, P, rec, "labels = torch.roll(ids, -1, 1); labels[:, -1] = -100",
          Z.RollLabels, _ids(2, 32), kinds={"halo", "reduction"})
    exact(rank, P, rec, "torch.roll(x, -5, 1)", lambda: Z.RollBy(-5), kinds={"halo"})
    exact(rank, P, rec, "pad + unfold windows, centred and causal", Z.CentredWindows,
          kinds={"halo"})
    exact(rank, P, rec, "cat([x[:, :1], x[:, :-1]], -2) (edge padding)", Z.FirstTokenPad,
          kinds={"halo"})
    exact(rank, P, rec, "cat([full_like(ids[:, :1], bos), ids[:, :-1]]) ids", Z.BosIds,
          _ids(2, 32), kinds={"halo", "shape"})
    exact(rank, P, rec, "BART shift_tokens_right into new_zeros", Z.BartShiftTokens,
          _ids(2, 32), kinds={"halo", "positions"})
    exact(rank, P, rec, "shifts written into zeros_like / empty_like / time-major buffers",
          Z.BufferShifts, kinds={"halo"})


def check_long_roll(rank, P, rec):
    """A rotation longer than a shard (12 > T_local = 8 at P = 4): gathered."""
    _outcomes.gathered(rank, P, rec, "torch.roll(x, 12, 1) past the neighbour",
                       lambda: Z.RollBy(12), ops=("roll",), file=FILE)


def check_shared_cut(rank, P, rec):
    _outcomes.gathered(rank, P, rec, "a shift's cut also read elsewhere", Z.SharedCut,
                       ops=("getitem",), file=FILE)


def check_sequence_ops(rank, P, rec):
    exact(rank, P, rec, "bidirectional scan: x.flip([1]), fliplr, flip of two dims",
          Z.BidirectionalScan, kinds={"halo", "cumsum"})
    exact(rank, P, rec, "softmax / log_softmax over the tokens (AFT, pooling)", Z.AFTSimple,
          kinds={"reduction"})


def check_length_shifts(rank, P, rec):
    refused(rank, P, rec, "torch.roll(x, T // 2, 1) (T folded to the local length)",
            Z.RollByLength, text=("local length", "length_constants"))
    refused(rank, P, rec, "(tril(ones(T, T)) / T) @ x (T folded to the local length)",
            Z.RunningSumOverLength, text=("LOCAL length", "length_constants"))


def check_constant_mix(rank, P, rec):
    """Constant causal mixing matrices read by value (their global copy), as a scan."""
    for name, model in [("tril(ones(T, T)) @ x (running sum)", Z.RunningSum),
                        ("bag of words: tril / row sum, softmax of -inf-masked zeros",
                         Z.BagOfWords),
                        ("per-head EMA matrix gamma ** (i - j) from arange", Z.FixedEMA)]:
        be = exact(rank, P, rec, name, model, kinds={"linear_scan"})
        rec.true(f"{name}: matched as constant_causal_mix",
                 any(m.pattern == "constant_causal_mix" for r in be.reports for m in r.matches))
    exact(rank, P, rec, "x * ones(T, 1).cumsum(0): this rank's block of the global constant",
          Z.LocalScaledConstant, kinds={"cumsum"})


def check_whole_sequence(rank, P, rec):
    exact(rank, P, rec, "gated delta rule loop (relay)", Z.GatedDeltaLoop, T=16,
          kinds={"loop_scan"})
    exact(rank, P, rec, "gated delta rule on the whole sequence (gather, layer, shard)",
          Z.GatedDeltaOnWholeSequence, T=16, reference=Z.GatedDeltaLoop)
