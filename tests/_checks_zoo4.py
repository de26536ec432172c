"""Worker-side checks for tests/test_zoo4_dist.py: the hybrid long-context spellings of
tests/models_zoo4.py on gloo ranks, each asserted in its outcome class (as in _checks_zoo2):

(a) exact with zero fallbacks — outputs, input grads and summed parameter grads equal the
    full-sequence eager run, and no spcompile warning;
(b) exact with a fallback warning naming the op and the user's line;
(c) a clear refusal — a SequenceParallelError whose text says what to do.

Graph breaks are covered too: values crossing them keep their placement (``[B, H, T, d]``
heads, a replicated loss), and what cannot cross is refused.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch._dynamo

import spcompile
import models_zoo4 as Z
import _outcomes
from _outcomes import _fallbacks, _kinds, compare

FILE = "models_zoo4.py"


_floats = _outcomes.floats


def _tokens(B, T, V=11, ignore=False):
    def make():
        ids, labels = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
        if ignore:
            labels[0, :5] = -100
            labels[1, T - 9:] = -100
        return [ids, labels]
    return make


def _with_position_ids(B, T, D=16):
    return lambda: [torch.randn(B, T, D), torch.arange(T).unsqueeze(0)]


exact, refused = _outcomes.exact, _outcomes.refused


def gathered(*args, **kw):
    return _outcomes.gathered(*args, file=FILE, **kw)


# ---------------------------------------------------------------- (a) exact, no fallback
def check_exact(rank, P, rec):
    exact(rank, P, rec, "hybrid block + MoE FFN (scattered top-k, no data-dependent shapes)",
          lambda: Z.JambaMoEBlock(spelling="dense"), kinds={"linear_scan", "reduction"})
    exact(rank, P, rec, "HGRN2 ellipsis einsums '...Id,...Jd->...IJ'", Z.HGRN2Ellipsis,
          kinds={"linear_scan"})
    exact(rank, P, rec, "RetNet bmm over reshape(B*H, T, d) + GroupNorm on [B*T, D]",
          Z.RetNetBmm, kinds={"linear_scan"})
    exact(rank, P, rec, "tied embeddings, label smoothing, sum / (labels != -100).sum()",
          lambda: Z.TiedCausalLM(loss="sum_over_count"), _tokens(2, 32, ignore=True),
          kinds={"linear_scan", "reduction"})
    exact(rank, P, rec, "HF Llama RoPE from position_ids passed in (sharded by the caller)",
          Z.HFLlamaPositionIds, _with_position_ids(2, 32), kinds={"attention"})
    exact(rank, P, rec, "HF Llama cache_position / position_ids made inside + causal mask",
          lambda: Z.HFLlamaPositionIds(where="cache_position"),
          kinds={"attention", "positions"})
    exact(rank, P, rec, "reshape(B, T//2, 2, D).mean(2) + repeat_interleave(2, dim=1)",
          Z.ChunkMeanPool)
    exact(rank, P, rec, "F.pad + x.unfold(1, w, 1) local windows (was gathered)",
          Z.UnfoldLocalAttention, kinds={"halo"})
    exact(rank, P, rec, "F.group_norm on [B, H, T, d] (was gathered)",
          Z.GroupNormHeadsOverTime, kinds={"linear_scan", "reduction"})


def check_graph_breaks(rank, P, rec):
    """Values crossing graph breaks keep their placement: [B, H, T, d] heads (was guessed
    from dim 1 and silently wrong), a replicated loss (its gradient was divided by P twice)."""
    exact(rank, P, rec, "graph break between [B, H, T, d] heads and the attention",
          Z.BreakBetweenHeads, kinds={"linear_scan"}, graphs=2)
    exact(rank, P, rec, "global loss crossing a data-dependent branch", Z.BreakBetweenLosses,
          kinds={"linear_scan", "reduction"}, graphs=2)
    check_labels_after_break(rank, P, rec)
    refused(rank, P, rec, "T×T scores crossing a graph break", Z.BreakAfterScores,
            text=("leaves the compiled graph", FILE))
    # its [n, D] survivors reach the next graph untagged (n is data-dependent; T/P = 32 ≠ D)
    refused(rank, P, rec, "unpad h[mask] (data-dependent shape) then mean", Z.UnpadTokens,
            T=64, text=("computed outside the compiled graphs", "mark_sequence"))


def eager_warned(rank, P, rec, name, make_model, make_inputs=None, frames=(), **kw):
    """Exact, with the one warning that Dynamo runs ``frames`` eagerly (it skipped them for a
    graph break in a loop: spcompile cannot see that code, so it says so)."""
    be, msgs = compare(rank, P, rec, name, make_model, make_inputs, **kw)
    ok = not _fallbacks(be) and len(msgs) == len(frames) and \
        all(any(f"runs {f} " in m for m in msgs) for f in frames)
    rec.true(f"{name}: warned that {list(frames)} run eagerly, nothing else", ok,
             str(_fallbacks(be))[:300] + str(msgs)[:600])
    return be


def check_moe_loops(rank, P, rec):
    """MoE expert loops with data-dependent routing (Mixtral / Qwen-MoE / Jamba, HF style):
    Dynamo skips the routing function (torch.where in a loop) and compiles the expert it
    calls with the rows eager code picked; those are this rank's tokens, taken token by token."""
    for spelling, frames in (("hf", ("SparseMoE.forward",)), ("sel", ("SparseMoE.forward",)),
                             ("hit", ("the rest of SparseMoE.forward after line",)),
                             ("boolmask", ("SparseMoE.forward",))):
        eager_warned(rank, P, rec, f"hybrid block + MoE expert loop ({spelling})",
                     lambda: Z.JambaMoEBlock(spelling=spelling), T=64, frames=frames)
    check_moe_steps(rank, P, rec)
    # an expert that reduces over its rows: each rank has only its part of them
    refused(rank, P, rec, "expert centring its rows (mean over dim 0)",
            lambda: Z.JambaMoEBlock(expert=Z.CenteringExpert), T=64,
            text=("mean", "rank-local rows", FILE))
    # DeepSeek-MoE's argsort of the flattened choices before the .tolist() break
    refused(rank, P, rec, "DeepSeek-style argsort of the [B*T*k] choices",
            lambda: Z.JambaMoEBlock(spelling="sorted"), T=64, text=("argsort", FILE))
    # the LM's layer loop has the break inside: Dynamo runs MoELM.forward (with its loss)
    # eagerly, so the loss is this rank's mean. Not silent: the warning names the function.
    torch.manual_seed(0)
    torch._dynamo.reset()
    ids, labels = _tokens(2, 64)()
    model = Z.MoELM()
    _, ref_logits = model(ids, labels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, logits = torch.compile(copy.deepcopy(model), backend=spcompile.backend())(
            spcompile.shard_sequence(ids, 1), spcompile.shard_sequence(labels, 1))
    msgs = [str(w.message) for w in caught if str(w.message).startswith("spcompile")]
    n = 64 // P
    rec.close("MoE LM, loop with a break: logits", logits, ref_logits[:, rank * n:(rank + 1) * n])
    rec.true("MoE LM, loop with a break: warned that MoELM.forward runs eagerly",
             any("runs MoELM.forward " in m and "mean loss" in m for m in msgs), str(msgs)[:600])


def check_moe_steps(rank, P, rec):
    """Twelve training steps of the HF expert loop: every step exact, and the experts are not
    recompiled for every new row count (static shapes would hit Dynamo's recompile limit)."""
    torch.manual_seed(0)
    model = Z.JambaMoEBlock(spelling="hf")
    sm = copy.deepcopy(model)
    torch._dynamo.reset()
    be = spcompile.backend()
    compiled = torch.compile(sm, backend=be)
    T, n, worst = 64, 64 // P, 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(12):
            x = torch.randn(2, T, 16)
            ref, ref_aux = model(x)
            out, aux = compiled(spcompile.shard_sequence(x, dim=1))
            want = ref[:, rank * n:(rank + 1) * n]
            worst = max(worst, ((out - want).abs().max() / want.abs().max()).item(),
                        ((aux - ref_aux).abs() / ref_aux.abs()).item())
    rec.true("MoE expert loop, 12 steps: exact every step", worst < 1e-5, str(worst))
    rec.true("MoE expert loop, 12 steps: no recompile per row count", len(be.reports) <= 4,
             f"{len(be.reports)} graphs")


def check_labels_after_break(rank, P, rec):
    """A user input that is not sequence-shaped (class labels ``[B]``), first used after a
    graph break, is replicated (not refused like a value eager code made there)."""
    name = "class labels [B] first used after a graph break"
    torch.manual_seed(0)
    model = Z.BreakThenClassify()
    x, labels = torch.randn(2, 32, 16), torch.tensor([0, 2])
    xf = x.clone().requires_grad_()
    h, loss = model(xf, labels)
    w = torch.randn_like(h)
    ((h * w).sum() + loss).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    sm = copy.deepcopy(model)
    sm.zero_grad()
    torch._dynamo.reset()
    n = 32 // P
    xs = spcompile.shard_sequence(x, dim=1).requires_grad_()
    hs, ls = torch.compile(sm, backend=spcompile.backend())(xs, labels)
    ((hs * w[:, rank * n:(rank + 1) * n]).sum() + ls).backward()
    spcompile.sync_gradients(sm)
    rec.close(f"{name}: loss", ls, loss)
    rec.close(f"{name}: h", hs, h[:, rank * n:(rank + 1) * n])
    rec.close(f"{name}: input grad", xs.grad, xf.grad[:, rank * n:(rank + 1) * n])
    for pn, p in sm.named_parameters():
        rec.close(f"{name}: grad {pn}", p.grad, ref[pn])


# ---------------------------------------------------------------- (b) exact, with a fallback
def check_gathered(rank, P, rec):
    gathered(rank, P, rec, "xLSTM mLSTM parallel form (row max, |C.sum| normaliser)",
             lambda: Z.MLSTMLayer(form="outer"), ops=("max", "sum", "matmul"))
    gathered(rank, P, rec, "DeltaNet parallel form via solve_triangular", Z.DeltaNetSolve,
             ops=("linalg_solve_triangular",))
    exact(rank, P, rec, "F.normalize(x) with its default dim=1 (the sequence; was gathered)",
          Z.NormalizeDefaultDim, kinds={"reduction"})
    gathered(rank, P, rec, "x.repeat(1, 2, 1) tiling the sequence (was taken for a shard)",
             Z.TileSequence, ops=("repeat",))
    check_batchnorm(rank, P, rec)


def check_batchnorm(rank, P, rec):
    """Conformer conv module: pointwise convs and GLU are token-local, the depthwise conv a
    halo; BatchNorm (training) takes its batch statistics from all-reduced partial sums, and
    its running statistics and step counter advance as on one device
    (``num_batches_tracked.add_(1)`` was once dropped as dead code)."""
    torch.manual_seed(1)
    model = Z.BatchNormConvModule()
    ref = copy.deepcopy(model)
    be = exact(rank, P, rec, "Conformer conv module with BatchNorm1d (training)",
               lambda: copy.deepcopy(ref), kinds={"halo", "reduction"})
    rec.true("Conformer: batch_norm's statistics all-reduced, not gathered",
             any(m.pattern == "sequence_batch_norm" for r in be.reports for m in r.matches),
             str(_kinds(be)))
    x = torch.randn(2, 32, 16)
    ref(x)
    torch._dynamo.reset()
    sm = torch.compile(copy.deepcopy(model), backend=spcompile.backend())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm(spcompile.shard_sequence(x, dim=1))
    bn, rbn = sm._orig_mod.bn, ref.bn
    rec.true("Conformer: num_batches_tracked advanced",
             int(bn.num_batches_tracked) == int(rbn.num_batches_tracked) == 1,
             f"{int(bn.num_batches_tracked)} vs {int(rbn.num_batches_tracked)}")
    rec.close("Conformer: running_mean", bn.running_mean, rbn.running_mean, 1e-5)
    rec.close("Conformer: running_var", bn.running_var, rbn.running_var, 1e-5)


# ---------------------------------------------------------------- (c) refusals
def check_refused(rank, P, rec):
    refused(rank, P, rec, "xLSTM reference form (cat + repeat(1, 1, 1, S + 1))",
            lambda: Z.MLSTMLayer(form="repeat"), text=("recomputing it for the global",))
    _outcomes.exact(rank, P, rec, "DeltaNet recurrence as a loop over tokens (relay)",
                    Z.DeltaNetRecurrent, kinds={"loop_scan"})
    import torch._dynamo.config as cfg
    old = cfg.capture_dynamic_output_shape_ops
    cfg.capture_dynamic_output_shape_ops = True
    try:
        refused(rank, P, rec, "Mixtral expert loop captured with dynamic output shapes",
                lambda: Z.JambaMoEBlock(spelling="sel"), T=64,
                text=("data-dependent shape", FILE))
    finally:
        cfg.capture_dynamic_output_shape_ops = old


# ---------------------------------------------------------------- P = 4
def check_p4(rank, P, rec):
    """The replicated loss crossing a graph break: its gradient was off by a factor of P."""
    exact(rank, P, rec, "global loss crossing a data-dependent branch", Z.BreakBetweenLosses,
          kinds={"linear_scan", "reduction"}, graphs=2)
