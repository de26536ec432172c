"""Worker-side checks for tests/test_backend_dist.py (run inside gloo processes)."""
from __future__ import annotations

import copy

import torch
import torch._dynamo

import spcompile
from models import NoMix, two_layer


def compare_sharded(rank, P, rec, name, make_model, *, T=32, B=2, D=16, seed=0, tol=1e-4,
                    **options):
    """Sharded compiled run vs full-sequence eager: outputs, input grads, summed param grads."""
    torch.manual_seed(seed)
    model = make_model()
    x = torch.randn(B, T, D)
    w = torch.randn(B, T, D)
    xf = x.clone().requires_grad_()
    ref = model(xf)
    (ref * w).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    sm = copy.deepcopy(model)
    torch._dynamo.reset()
    be = spcompile.backend(**options)
    compiled = torch.compile(sm, backend=be)
    xs = spcompile.shard_sequence(x, dim=1).requires_grad_()
    out = compiled(xs)
    (out * spcompile.shard_sequence(w, dim=1)).sum().backward()
    spcompile.sync_gradients(sm)
    n = T // P
    rec.close(f"{name}: output", out, ref[:, rank * n:(rank + 1) * n], tol)
    rec.close(f"{name}: input grad", xs.grad, xf.grad[:, rank * n:(rank + 1) * n], tol)
    for pn, p in sm.named_parameters():
        rec.close(f"{name}: grad {pn}", p.grad, ref_grads[pn], tol)
    return be


def check_masked_strategies(rank, P, rec):
    for strategy in ("allgather", "allscan", "ring"):
        be = compare_sharded(rank, P, rec, f"masked/{strategy}", lambda: two_layer("mul"),
                             strategy=strategy)
        kinds = [(m.kind, m.strategy) for r in be.reports for m in r.matches]
        rec.true(f"masked/{strategy}: two scans with the strategy",
                 kinds == [("linear_scan", strategy)] * 2, str(kinds))
        rec.true(f"masked/{strategy}: no fallback",
                 sum(len(r.fallbacks) for r in be.reports) == 0)


def check_spellings(rank, P, rec):
    for sp in ("einsum", "buffer", "masked_fill", "where"):
        compare_sharded(rank, P, rec, f"spelling {sp}", lambda: two_layer(sp))


def check_auto_strategy(rank, P, rec):
    be = compare_sharded(rank, P, rec, "masked/auto", lambda: two_layer("mT"))
    rec.true("masked/auto: planned by the cost model",
             all(m.strategy in ("allgather", "allscan", "ring") and m.alternatives
                 for r in be.reports for m in r.matches))


def check_no_mixing(rank, P, rec):
    be = compare_sharded(rank, P, rec, "no mixing", lambda: NoMix())
    rec.true("no mixing: zero matches and fallbacks",
             all(not r.matches and not r.fallbacks for r in be.reports))
