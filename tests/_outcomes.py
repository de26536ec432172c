"""Outcome classes shared by the model-zoo checks (tests/_checks_zoo*.py), run inside gloo
workers (tests/dist_harness.py):

(a) ``exact`` — outputs, input grads and summed parameter grads equal the full-sequence eager
    run, zero fallbacks, no spcompile warning, the expected families matched;
(b) ``gathered`` — the same numbers, and a fallback warning naming each op and the model file;
(c) ``refused`` — a SequenceParallelError whose text says what to do.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch._dynamo

import spcompile


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def floats(B, T, D=16):
    return lambda: [torch.randn(B, T, D)]


def compare(rank, P, rec, name, make_model, make_inputs=None, *, T=32, B=2, tol=1e-4,
            warm=None, reference=None, **options):
    """Sharded compiled run vs full-sequence eager run for models with one or more inputs
    (every input of length T on dim 1 is sharded). ``warm``: inputs the model is compiled on
    first (the checked call then reuses that graph). ``reference``: a factory for the model
    the eager run uses instead (given the same weights), where torch's own eager result of
    ``make_model`` is known to be wrong. Returns (backend, spcompile warnings)."""
    torch.manual_seed(0)
    model = make_model()
    inputs = (make_inputs or floats(B, T))()
    full = [x.clone().requires_grad_() if x.is_floating_point() else x for x in inputs]
    if reference is not None:
        ref_model = reference()
        ref_model.load_state_dict(model.state_dict())
        refs = _tuple(ref_model(*full))
    else:
        refs = _tuple(model(*full))
    weights = [torch.randn_like(r) for r in refs]
    sum(((r * w).sum() for r, w in zip(refs, weights))).backward()
    grads_of = ref_model if reference is not None else model
    ref_grads = {n: p.grad.clone() for n, p in grads_of.named_parameters() if p.grad is not None}
    model.zero_grad()

    sm = copy.deepcopy(model)
    torch._dynamo.reset()
    be = spcompile.backend(**options)
    compiled = torch.compile(sm, backend=be)
    shards = [spcompile.shard_sequence(x, dim=1) for x in inputs]
    shards = [x.requires_grad_() if x.is_floating_point() else x for x in shards]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if warm is not None:
            compiled(*[spcompile.shard_sequence(x, dim=1) for x in warm()])
        outs = _tuple(compiled(*shards))
    msgs = [str(w.message) for w in caught if str(w.message).startswith("spcompile")]
    n = T // P
    loss = 0
    for i, (o, r, w) in enumerate(zip(outs, refs, weights)):
        seq = r.dim() >= 2 and r.shape[1] == T
        want = r[:, rank * n:(rank + 1) * n] if seq else r
        wi = w[:, rank * n:(rank + 1) * n] if seq else w
        rec.close(f"{name}: output {i}", o, want, tol)
        loss = loss + (o * wi).sum()
    loss.backward()
    spcompile.sync_gradients(sm)
    for i, (s, f) in enumerate(zip(shards, full)):
        if f.grad is not None:
            rec.close(f"{name}: input {i} grad", s.grad, f.grad[:, rank * n:(rank + 1) * n], tol)
    worst = max([((p.grad - ref_grads[pn]).abs().max() /
                  ref_grads[pn].abs().max().clamp_min(1e-6)).item()
                 for pn, p in sm.named_parameters() if pn in ref_grads] or [0.0])
    rec.rows.append(dict(name=f"{name}: parameter grads (summed over ranks)", err=worst,
                         tol=tol, info=""))
    return be, msgs


def _kinds(be):
    return sorted(m.kind for r in be.reports for m in r.matches)


def _fallbacks(be):
    return [str(f) for r in be.reports for f in r.fallbacks]


def exact(rank, P, rec, name, make_model, make_inputs=None, kinds=(), graphs=None, **kw):
    """Outcome (a): the numbers, zero fallbacks, no warning, the expected families matched
    (and ``graphs`` compiled graphs, if given)."""
    be, msgs = compare(rank, P, rec, name, make_model, make_inputs, **kw)
    rec.true(f"{name}: (a) zero fallbacks, no warning", not _fallbacks(be) and not msgs,
             str(_fallbacks(be))[:400] + str(msgs)[:400])
    rec.true(f"{name}: matched {sorted(kinds)}", set(kinds) <= set(_kinds(be)), str(_kinds(be)))
    if graphs is not None:
        rec.true(f"{name}: {graphs} graphs", len(be.reports) == graphs, str(len(be.reports)))
    return be


def gathered(rank, P, rec, name, make_model, make_inputs=None, ops=(), file="models_", **kw):
    """Outcome (b): the numbers, and a fallback warning naming each op in ``ops`` and the
    user's ``file``."""
    be, msgs = compare(rank, P, rec, name, make_model, make_inputs, **kw)
    fbs = _fallbacks(be)
    ok = bool(fbs) and len(msgs) == len(fbs) and all(file in m for m in msgs) and \
        all(any(op in f for f in fbs) for op in ops)
    rec.true(f"{name}: (b) fallback warned {list(ops)} at {file}", ok, str(fbs)[:600])
    return be


def refused(rank, P, rec, name, make_model, make_inputs=None, text=(), T=32, B=2, **options):
    """Outcome (c): compiling the sharded model raises spcompile's error with ``text``."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    shards = [spcompile.shard_sequence(x, dim=1) for x in (make_inputs or floats(B, T))()]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.compile(make_model(), backend=spcompile.backend(**options))(*shards)
        rec.true(f"{name}: (c) refused", False, "no error raised")
    except Exception as e:  # noqa: BLE001 - Dynamo wraps the backend's error
        msg = str(e)
        rec.true(f"{name}: (c) refused with {list(text)}",
                 "SequenceParallelError" in msg and all(t in msg for t in text), msg[:800])
