"""Worker-side checks for tests/test_loops_dist.py: recurrences written as Python loops
(tests/models_loops.py) sharded on gloo ranks against the full-sequence eager run — exact with
zero fallbacks where the loop carries an affine state (or runs as a relay), a clear refusal where
its body depends on the step."""
from __future__ import annotations

import warnings

import torch
import torch._dynamo

import spcompile
import models_loops as ML
from _checks_backend import compare_sharded


def _kinds(be):
    return sorted(m.kind for r in be.reports for m in r.matches)


def exact(rank, P, rec, name, make, T=16, tol=1e-4, **options):
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        be = compare_sharded(rank, P, rec, name, make, T=T, tol=tol, **options)
    msgs = [str(w.message) for w in caught if "spcompile" in str(w.message)]
    rec.true(f"{name}: no fallback warning", not msgs, "; ".join(msgs)[:400])
    rec.true(f"{name}: matched as a loop", "loop_scan" in _kinds(be), str(_kinds(be)))


def refused(rank, P, rec, name, make, words, T=16):
    torch._dynamo.reset()
    try:
        torch.compile(make(), backend=spcompile.backend())(torch.randn(2, T // P, 16))
        rec.true(f"{name}: refused", False, "no error raised")
    except Exception as e:  # noqa: BLE001 - Dynamo wraps the backend's error
        rec.true(f"{name}: refused, saying why", all(w in str(e) for w in words), str(e)[:600])


def check_token_loops(rank, P, rec):
    from models import TokenLoop
    exact(rank, P, rec, "s = 0.9 s + h[:, t] token loop", TokenLoop)
    # the eager delegate: torch 2.13's aot_eager fails on this model's backward without
    # spcompile too (softplus_backward's meta strides break a view)
    exact(rank, P, rec, "two stacked HF Mamba slow_forward layers (conv halo + loop each)",
          ML.TwoMambaSlow, T=12 * P, compiler="eager")
    exact(rank, P, rec, "two stacked `for h_t in h.unbind(1)` loops", ML.TwoUnbindLoops,
          T=12 * P)
    exact(rank, P, rec, "linear transformer recurrent form (S, z states)",
          ML.NormalisedTokenLoop)
    exact(rank, P, rec, "gated RNN, tanh readout, torch.stack(ys).transpose(0, 1)",
          ML.StackDim0Loop, T=12 * P)
    exact(rank, P, rec, "gated recurrence from a learned h0 (+ final state)",
          ML.LearnedInitGatedLoop, T=10 * P)  # T != d: the final state is not sequence-shaped


def check_block_loops(rank, P, rec):
    exact(rank, P, rec, "for blk in h.split(C, 1) block loop", ML.SplitBlockLoop, T=12 * P)
    exact(rank, P, rec, "lightning attention-2 block loop", ML.LightningBlockLoop, T=12 * P)
    exact(rank, P, rec, "RetNet chunkwise loop", ML.RetNetChunkLoop, T=12 * P)


def check_refusals(rank, P, rec):
    # (nonlinear cells: no all-gather form, run as a relay — tests/test_relay_dist.py)
    exact(rank, P, rec, "GRU cell loop (relay)", ML.GRULoop)
    exact(rank, P, rec, "GRU cell over x.unbind(1) (relay)", ML.GRUUnbindLoop)
    refused(rank, P, rec, "loop reading its counter", ML.CounterLoop,
            ["loop over", "step number"])
    refused(rank, P, rec, "blocks that do not tile the shards alike", ML.PartialBlockLoop,
            ["loop over"])
    refused(rank, P, rec, "in-place writes into a tensor that is not fresh (h.clone())",
            ML.WriteIntoCloneLoop, ["loop over", "not a fresh tensor"])
    refused(rank, P, rec, "the output buffer read inside the loop", ML.ReadBufferInLoop,
            ["loop over", "before the loop has written all of it"])


def check_inplace_outputs(rank, P, rec):
    exact(rank, P, rec, "out = zeros_like(h); out[:, t] = s", ML.PreallocLoop, T=4 * P)
    exact(rank, P, rec, "y = torch.empty(B, T, D); y[:, t, :] = f(s); proj(y)",
          ML.EmptyWriteLoop, T=4 * P)
    exact(rank, P, rec, "x.new_zeros; y[:, i*C:(i+1)*C] = block", ML.NewZerosBlockWrite,
          T=12 * P)
    exact(rank, P, rec, "[B, D, L] scan, y = zeros_like(u); y[:, :, t] = ...",
          ML.ChannelFirstWriteScan, T=4 * P, compiler="eager")  # softplus: see above
    exact(rank, P, rec, "out = empty_like(h); out[:, t].copy_(...)", ML.CopyIntoSliceLoop,
          T=4 * P)
    exact(rank, P, rec, "time-major outputs = zeros(T, B, D); outputs[t] = h",
          ML.TimeMajorWriteLoop, T=4 * P)


def check_exclusive_outputs(rank, P, rec):
    exact(rank, P, rec, "exclusive o_t = q_t S_(t-1), then the update", ML.ExclusiveMatrixLoop,
          T=4 * P)
    exact(rank, P, rec, "exclusive state-only readout tanh(s) before the update",
          ML.ExclusiveStateReadout, T=4 * P)
    exact(rank, P, rec, "readout of the state before and after the update", ML.BeforeAfterLoop,
          T=4 * P)
    exact(rank, P, rec, "state-only readout s_prev + s", ML.BeforeAfterStateOnly, T=4 * P)
    exact(rank, P, rec, "exclusive output written in place, y[:, t] = q_t S_(t-1)",
          ML.ExclusiveWriteLoop, T=4 * P)


def check_p4(rank, P, rec):
    exact(rank, P, rec, "y = torch.empty(B, T, D); y[:, t, :] = f(s); proj(y)",
          ML.EmptyWriteLoop, T=4 * P)
    exact(rank, P, rec, "x.new_zeros; y[:, i*C:(i+1)*C] = block", ML.NewZerosBlockWrite,
          T=12 * P)
    exact(rank, P, rec, "exclusive o_t = q_t S_(t-1), then the update", ML.ExclusiveMatrixLoop,
          T=4 * P)
    exact(rank, P, rec, "readout of the state before and after the update", ML.BeforeAfterLoop,
          T=4 * P)
    exact(rank, P, rec, "exclusive output written in place, y[:, t] = q_t S_(t-1)",
          ML.ExclusiveWriteLoop, T=4 * P)
    exact(rank, P, rec, "mamba_ssm selective_scan_ref ([B, D, L], einsums, new_zeros)",
          ML.MambaRefScan, T=4 * P, compiler="eager")
    exact(rank, P, rec, "lightning attention-2 block loop", ML.LightningBlockLoop, T=12 * P)
    exact(rank, P, rec, "gated recurrence from a learned h0 (+ final state)",
          ML.LearnedInitGatedLoop, T=10 * P)
