"""Worker-side checks for tests/test_moe_dist.py: MoE expert dispatch that permutes tokens
(tests/models_moe.py) on gloo ranks against the full-sequence eager run.

* exact: the hand-written sort → grouped / per-row experts → unsort spellings, HF's batched_mm
  form, and real HF MoE models (Mixtral, Qwen2-MoE, OLMoE, Jamba) with ``experts_implementation``
  grouped_mm / batched_mm (the LM's loss with ``labels=``, logits, input and summed parameter
  grads) and eager (the HF sparse-MoE block itself): outputs, gradients, no fallback in the MoE
  part, the dispatch matched;
* refused: what really combines tokens (capacity limits, expert choice, slicing or regrouping the
  sorted rows, arithmetic on row numbers, a grouped matmul over descending groups, a permutation
  that leaves the graph at a graph break), each with a SequenceParallelError saying why.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch._dynamo

import spcompile
import models_moe as M
from _checks_zoo2 import _fallbacks, _kinds, compare

FILE = "models_moe.py"
HAVE_HF = M.hf_grouped_mm_fallback() is not None


def _floats(B=2, T=32, D=32):
    return lambda: [torch.randn(B, T, D)]


def exact(rank, P, rec, name, make_model, make_inputs=None, kinds=("dispatch",), **kw):
    """The numbers, zero fallbacks, no spcompile warning, ``kinds`` matched."""
    be, msgs = compare(rank, P, rec, name, make_model, make_inputs or _floats(), **kw)
    rec.true(f"{name}: zero fallbacks, no warning", not _fallbacks(be) and not msgs,
             str(_fallbacks(be))[:400] + str(msgs)[:400])
    rec.true(f"{name}: matched {sorted(kinds)}", set(kinds) <= set(_kinds(be)), str(_kinds(be)))
    return be


def refused(rank, P, rec, name, make_model, text=(), make_inputs=None):
    """Compiling the sharded model raises spcompile's error with every string of ``text``."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    shards = [spcompile.shard_sequence(x, dim=1) for x in (make_inputs or _floats())()]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.compile(make_model(), backend=spcompile.backend())(*shards)
        rec.true(f"{name}: refused", False, "no error raised")
    except Exception as e:  # noqa: BLE001 - Dynamo wraps the backend's error
        msg = str(e)
        rec.true(f"{name}: refused with {list(text)}",
                 "SequenceParallelError" in msg and all(t in msg for t in text), msg[:900])


# ---------------------------------------------------------------- hand-written spellings
def check_exact(rank, P, rec):
    for spelling in ("argsort_bmm", "batched", "namedtuple", "scatter_add_as", "index_put"):
        exact(rank, P, rec, f"sorted MoE ({spelling})", lambda: M.SortedMoE(spelling=spelling),
              kinds=() if spelling == "batched" else ("dispatch",))
    exact(rank, P, rec, "sorted MoE (grouped_bf16: F.grouped_mm / torch._grouped_mm)",
          lambda: M.SortedMoE(spelling="grouped_bf16"), tol=3e-2)
    if not HAVE_HF:
        return
    for spelling in ("hf", "gather_scatter", "index_copy", "argsort_inverse", "scatter_add"):
        exact(rank, P, rec, f"sorted MoE ({spelling})", lambda: M.SortedMoE(spelling=spelling))
    exact(rank, P, rec, "sorted MoE (centered: mean over the sorted rows)",
          lambda: M.SortedMoE(spelling="centered"), kinds=("dispatch", "reduction"))


def check_refused(rank, P, rec):
    refused(rank, P, rec, "capacity by rank among the sorted rows",
            lambda: M.SortedMoE(spelling="capacity"), ("arange", "position among its own rows",
                                                       "capacity", FILE))
    refused(rank, P, rec, "Switch capacity (cumsum over the tokens)",
            lambda: M.SortedMoE(spelling="switch_capacity"), ("cumsum", "capacity", FILE))
    refused(rank, P, rec, "expert-choice routing (topk over the tokens)",
            lambda: M.SortedMoE(spelling="expert_choice"), ("topk", "expert-choice", FILE))
    refused(rank, P, rec, "a slice of the sorted rows",
            lambda: M.SortedMoE(spelling="slice_sorted"), ("slice", "order of the sort", FILE))
    refused(rank, P, rec, "the sorted rows regrouped k at a time",
            lambda: M.SortedMoE(spelling="reshape_sorted"), ("regroups the rows sorted", FILE))
    refused(rank, P, rec, "arithmetic on the row numbers",
            lambda: M.SortedMoE(spelling="perm_arith"), ("row numbers", FILE))
    refused(rank, P, rec, "sorted rows returned as they are", M.ReturnsSorted,
            ("leaves the compiled graph", "order of the sort", FILE))
    refused(rank, P, rec, "torchtitan/Megablocks split by counts.tolist() (graph break)",
            lambda: M.SortedMoE(spelling="megablocks"),
            ("argsort", "leaves the compiled graph", ".tolist()", "grouped_mm", FILE))
    if HAVE_HF:
        refused(rank, P, rec, "grouped_mm over rows sorted descending",
                lambda: M.SortedMoE(spelling="descending"), ("descending", FILE))
        refused(rank, P, rec, "group offsets from torch.bincount (graph break)",
                lambda: M.SortedMoE(spelling="bincount"),
                ("argsort", "leaves the compiled graph", "bincount", FILE))
    refused(rank, P, rec, "a grouped matmul spcompile does not know (a user's custom op)",
            lambda: M.CustomGroupedOp(spelling="gather_scatter"),
            ("user_grouped_mm", "order of the sort", FILE))


# ---------------------------------------------------------------- real HF models
def _hf_inputs(B=2, T=32, mask=True):
    def make():
        xs = [torch.randn(B, T, 32), torch.randint(0, 64, (B, T))]
        return xs + [torch.ones(B, T, dtype=torch.long)] if mask else xs
    return make


def _moe_fallbacks(be):
    return [f for f in _fallbacks(be) if "moe.py" in f or "expert" in f.lower()]


def hf_exact(rank, P, rec, arch, impl, compiler="eager"):
    """An HF LM sharded vs eager. ``compiler``: the delegate after spcompile's passes (the same
    passes either way); AOTAutograd of an HF graph takes about 3/4 of a check's time, so only
    some checks use the default aot_eager."""
    name = f"HF {arch} ({impl}, {compiler})"
    be, _ = compare(rank, P, rec, name, lambda: M.HFLM(M.hf_causal_lm(arch, impl)),
                    _hf_inputs(), compiler=compiler)
    rec.true(f"{name}: no fallback in the MoE part", not _moe_fallbacks(be),
             str(_moe_fallbacks(be))[:600])
    if impl == "grouped_mm":
        n = sum(1 for r in be.reports for m in r.matches if m.kind == "dispatch")
        rec.true(f"{name}: one dispatch matched per MoE layer", n == 2, str(_kinds(be)))
    return be


def check_hf(rank, P, rec):
    """The HF LM loss with labels= and an attention_mask of ones (HF's load-balancing loss then
    counts rows with a tensor sum); without the mask the count is a folded local constant: a
    clear refusal. The eager experts (a loop with torch.where) in the HF block itself."""
    try:
        import transformers  # noqa: F401
    except Exception:  # noqa: BLE001
        rec.true("transformers not importable: HF checks skipped", True)
        return
    hf_exact(rank, P, rec, "mixtral", "grouped_mm", compiler="aot_eager")
    for arch in M.HF_ARCHS:
        for impl in ("grouped_mm", "batched_mm"):
            if (arch, impl) != ("mixtral", "grouped_mm"):
                hf_exact(rank, P, rec, arch, impl)
    refused(rank, P, rec, "HF Mixtral aux loss without attention_mask (a local row count)",
            lambda: M.HFLM(M.hf_causal_lm("mixtral", "grouped_mm")),
            ("load_balancing_loss_func", "attention_mask", "modeling_mixtral.py"),
            make_inputs=_hf_inputs(mask=False))
    for arch in M.HF_ARCHS:  # the full LMs with eager experts: see test_moe_dist
        name = f"HF {arch} sparse-MoE block (eager)"
        be, msgs = compare(rank, P, rec, name, lambda: M.HFMoEBlock(arch, "eager"), _floats())
        others = [m for m in msgs if " eagerly" not in m]
        rec.true(f"{name}: no fallback, only the warnings that Dynamo runs the expert loop "
                 f"eagerly", not _fallbacks(be) and not others and msgs,
                 str(_fallbacks(be))[:600] + str(others)[:600])


def check_steps(rank, P, rec):
    """Five training steps of HF's grouped_mm lines: exact every step, compiled once (the
    permutation and the group sizes change with the data, the shapes do not)."""
    if not HAVE_HF:
        return
    torch.manual_seed(0)
    model = M.SortedMoE(spelling="hf")
    sm = copy.deepcopy(model)
    torch._dynamo.reset()
    be = spcompile.backend()
    compiled = torch.compile(sm, backend=be)
    opt, ref_opt = torch.optim.SGD(sm.parameters(), lr=0.1), torch.optim.SGD(
        model.parameters(), lr=0.1)
    T, n, worst = 32, 32 // P, 0.0
    for _ in range(5):
        x = torch.randn(2, T, 32)
        ref, ref_aux = model(x)
        out, aux = compiled(spcompile.shard_sequence(x, dim=1))
        want = ref[:, rank * n:(rank + 1) * n]
        worst = max(worst, ((out - want).abs().max() / want.abs().max()).item(),
                    ((aux - ref_aux).abs() / ref_aux.abs()).item())
        (ref.square().mean() + ref_aux).backward()
        # the sharded loss: this rank's part of the global mean, plus the replicated aux loss
        (out.square().sum() / ref.numel() + aux).backward()
        spcompile.sync_gradients(sm)
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()
    rec.true("grouped_mm lines, 5 SGD steps: exact every step", worst < 1e-5, str(worst))
    rec.true("grouped_mm lines, 5 SGD steps: compiled once", len(be.reports) == 1,
             f"{len(be.reports)} graphs")


# ---------------------------------------------------------------- P = 4
def check_p4(rank, P, rec):
    exact(rank, P, rec, "sorted MoE (argsort_bmm)", lambda: M.SortedMoE(spelling="argsort_bmm"))
    if HAVE_HF:
        exact(rank, P, rec, "sorted MoE (hf)", lambda: M.SortedMoE(spelling="hf"),
              kinds=("dispatch", "reduction"))
        try:
            import transformers  # noqa: F401
        except Exception:  # noqa: BLE001
            return
        hf_exact(rank, P, rec, "mixtral", "grouped_mm")
