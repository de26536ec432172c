"""Worker-side checks for tests/test_zoo3_dist.py: associative scans along the sequence
(cumsum, cumprod, logcumsumexp, cummax, cummin) on gloo ranks against the full-sequence eager run.

* op level: ``spcompile.ops.sequence_scan`` on shards built to hit torch's edge conventions (zeros
  in cumprod, -inf runs in logcumsumexp, ties and NaNs in cummax/cummin): values, indices and
  input gradients, NaNs in the same places;
* model level (tests/models_zoo3.py): outputs, input grads and summed parameter grads, zero
  fallbacks and no spcompile warning, the scan family matched.
"""
from __future__ import annotations

import copy
import math
import warnings

import torch
import torch._dynamo
import torch.distributed as dist

import spcompile
import spcompile.ops as spops
import models_zoo3 as Z


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _close_nan(rec, name, got, want, tol=1e-5):
    """Relative max error over the entries that are not NaN in ``want``; NaNs must match."""
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        rec.true(name, False, f"shape {tuple(got.shape)} vs {tuple(want.shape)}")
        return
    same_nan = bool((got.isnan() == want.isnan()).all())
    ok = ~want.isnan()
    g, w = got[ok], want[ok]
    same_inf = bool((g.isinf() == w.isinf()).all()) and bool((g[g.isinf()] == w[w.isinf()]).all())
    fin = ~w.isinf()
    err = ((g[fin] - w[fin]).abs().max() / w[fin].abs().max().clamp_min(1e-6)).item() \
        if fin.any() else 0.0
    if not (same_nan and same_inf):
        err = math.inf
    rec.rows.append(dict(name=name, err=err, tol=tol,
                         info=f"nan/inf pattern {'same' if same_nan and same_inf else 'differs'}"))


def _shard(x, rank, P):
    n = x.shape[1] // P
    return x[:, rank * n:(rank + 1) * n]


def _group():
    return dist.group.WORLD.group_name


# ---------------------------------------------------------------- op level
def _edge_inputs(op: str, B: int, T: int, D: int, P: int):
    """Inputs that exercise the conventions at shard boundaries (same on every rank)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    n = T // P
    if op == "cumprod":
        x[0, 1, 0] = 0.0                  # one zero on rank 0: every later product is 0
        x[0, n + 2, 1] = 0.0              # a zero on rank 1
        x[1, n - 1, 2] = x[1, n, 2] = 0.0  # two zeros straddling the first boundary
        x[1, :, 3] = 0.0                  # all zeros
    elif op == "logcumsumexp":
        x[0, :n + 1, 0] = -math.inf       # a -inf run longer than rank 0's shard
        x[0, n + 3, 1] = -math.inf
        x[1, :, 2] = -math.inf            # all -inf (torch's gradient is NaN there)
        x[1, n:2 * n, 3] = -math.inf      # a whole middle shard of -inf
        x[1, 2, 4] = math.inf
    else:  # cummax / cummin: ties across boundaries, a NaN
        x = torch.randint(-2, 3, (B, T, D), generator=g).double()
        x[0, n + 1, 0] = math.nan
        x[1, :, 1] = 1.0                  # all tied
    return x


def _op_check(rank, P, rec, op: str, dim: int, dtype=None, head: int = 0):
    """``sequence_scan`` on this rank's shard vs the torch op on the full sequence: values,
    global indices, input gradients (NaN where torch has NaN). ``head``: rows every rank holds
    in front of its shard (torch: in front of the full sequence); their gradient is a per-rank
    share, compared summed over the ranks."""
    B, T, D = 2, 4 * P, 6
    x = _edge_inputs(op, B, T, D, P)
    h = torch.randn(B, head, D, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    xf, hf = x.clone().requires_grad_(), h.clone().requires_grad_()
    kw = {"dtype": dtype} if dtype is not None else {}
    ref = getattr(torch, op)(torch.cat([hf, xf], 1), dim, **kw)
    gw = torch.randn(B, head + T, D, generator=torch.Generator().manual_seed(2),
                     dtype=torch.float64)
    vals = ref[0] if op in ("cummax", "cummin") else ref
    (vals * gw.to(vals.dtype)).sum().backward()

    def mine(t):  # this rank's rows of a full-length [head | sequence] value
        return torch.cat([t[:, :head], _shard(t[:, head:], rank, P)], 1)

    xs, hs = _shard(x, rank, P).clone().requires_grad_(), h.clone().requires_grad_()
    out = spops.sequence_scan(torch.cat([hs, xs], 1), dim, op, _group(), dtype=dtype, head=head)
    name = f"op {op} dim={dim}{' dtype' if dtype else ''}{f' head={head}' if head else ''}"
    gm = mine(gw)
    gm[:, :head] *= rank == 0  # the replicated head rows' output counted once
    if op in ("cummax", "cummin"):
        v, i = out
        _close_nan(rec, f"{name}: values", v, mine(ref[0]))
        rec.true(f"{name}: global indices", bool((i == mine(ref[1])).all()),
                 f"{i[0, :, 0].tolist()} vs {mine(ref[1])[0, :, 0].tolist()}")
        (v * gm).sum().backward()
    else:
        rec.true(f"{name}: dtype", out.dtype == ref.dtype, f"{out.dtype} vs {ref.dtype}")
        _close_nan(rec, f"{name}: values", out, mine(ref))
        (out * gm.to(out.dtype)).sum().backward()
    _close_nan(rec, f"{name}: input grad", xs.grad, _shard(xf.grad, rank, P))
    if head:
        hg = hs.grad.clone()
        dist.all_reduce(hg)
        _close_nan(rec, f"{name}: head rows grad (summed over ranks)", hg, hf.grad)


def check_ops(rank, P, rec):
    for op in ("cumsum", "cumprod", "logcumsumexp", "cummax", "cummin"):
        _op_check(rank, P, rec, op, 1)
    _op_check(rank, P, rec, "cumsum", 1, dtype=torch.float32)
    _op_check(rank, P, rec, "cumprod", 1, dtype=torch.float32)
    _op_check(rank, P, rec, "logcumsumexp", -2)
    _op_check(rank, P, rec, "cumsum", 1, head=1)
    _op_check(rank, P, rec, "cumprod", 1, head=2)
    _op_check(rank, P, rec, "logcumsumexp", 1, head=1)


# ---------------------------------------------------------------- model level
def compare(rank, P, rec, name, make_model, make_inputs, *, T=32, tol=1e-4, dtype=None,
            **options):
    """Sharded compiled run vs full-sequence eager run. Inputs of length T on dim 1 are sharded,
    others (an ``h_0``) passed whole: their gradient, like a parameter's, is a per-rank partial
    and is compared summed over the ranks. Integer outputs (indices) are compared exactly.
    ``dtype``: run model and float inputs in it (float64 where float32 eager itself is far from
    the exact numbers)."""
    torch.manual_seed(0)
    model = make_model()
    inputs = make_inputs()
    if dtype is not None:
        model = model.to(dtype)
        inputs = [x.to(dtype) if x.is_floating_point() else x for x in inputs]
    seq = [x.dim() >= 2 and x.shape[1] == T for x in inputs]
    full = [x.clone().requires_grad_() if x.is_floating_point() else x for x in inputs]
    refs = _tuple(model(*full))
    weights = [torch.randn_like(r) if r.is_floating_point() else None for r in refs]
    sum((r * w).sum() for r, w in zip(refs, weights) if w is not None).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    sm = copy.deepcopy(model)
    sm.zero_grad()
    torch._dynamo.reset()
    be = spcompile.backend(**options)
    compiled = torch.compile(sm, backend=be)
    mine = [(_shard(x, rank, P) if s else x).clone() for x, s in zip(inputs, seq)]
    mine = [x.requires_grad_() if x.is_floating_point() else x for x in mine]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = _tuple(compiled(*mine))
    msgs = [str(w.message) for w in caught if str(w.message).startswith("spcompile")]
    loss = 0
    for i, (o, r, w) in enumerate(zip(outs, refs, weights)):
        is_seq = r.dim() >= 2 and r.shape[1] == T
        want = _shard(r, rank, P) if is_seq else r
        if w is None:
            rec.true(f"{name}: output {i} (integer) equal", o.shape == want.shape and
                     bool((o == want).all()), f"{o.flatten()[:8].tolist()} vs "
                                              f"{want.flatten()[:8].tolist()}")
            continue
        rec.close(f"{name}: output {i}", o, want, tol)
        loss = loss + (o * (_shard(w, rank, P) if is_seq else w)).sum()
    loss.backward()
    spcompile.sync_gradients(sm)
    for i, (m, f, s) in enumerate(zip(mine, full, seq)):
        if f.grad is None:
            continue
        if s:
            rec.close(f"{name}: input {i} grad", m.grad, _shard(f.grad, rank, P), tol)
        else:
            gsum = m.grad.clone()
            dist.all_reduce(gsum)
            rec.close(f"{name}: input {i} grad (replicated, summed over ranks)", gsum, f.grad,
                      tol)
    worst = max([((p.grad - ref_grads[pn]).abs().max() /
                  ref_grads[pn].abs().max().clamp_min(1e-6)).item()
                 for pn, p in sm.named_parameters() if pn in ref_grads] or [0.0])
    rec.rows.append(dict(name=f"{name}: parameter grads (summed over ranks)", err=worst,
                         tol=tol, info=""))
    fbs = [str(f) for r in be.reports for f in r.fallbacks]
    patterns = sorted(m.pattern for r in be.reports for m in r.matches)
    return fbs, msgs, patterns


def exact(rank, P, rec, name, make_model, make_inputs, patterns=(), **kw):
    """Exact, zero fallbacks, no spcompile warning, each expected pattern matched."""
    fbs, msgs, got = compare(rank, P, rec, name, make_model, make_inputs, **kw)
    rec.true(f"{name}: zero fallbacks, no warning", not fbs and not msgs,
             str(fbs)[:400] + str(msgs)[:400])
    rec.true(f"{name}: matched {sorted(patterns)}", set(patterns) <= set(got), str(got))


def gathered(rank, P, rec, name, make_model, make_inputs, ops=(), **kw):
    """Exact, with fallback warnings that name each op in ``ops`` (and this model file)."""
    fbs, msgs, _ = compare(rank, P, rec, name, make_model, make_inputs, **kw)
    ok = bool(fbs) and len(msgs) == len(fbs) and any("models_zoo3.py" in m for m in msgs) and \
        all(any(op in f for f in fbs) for op in ops)
    rec.true(f"{name}: fallback warned {list(ops)}", ok, str(fbs)[:600])


def _x(B=2, T=32, D=16):
    return lambda: [torch.randn(B, T, D)]


def _x_h0(B=2, T=32, D=16, H=16):
    return lambda: [torch.randn(B, T, D), torch.randn(B, 1, H)]


def _ints(B=2, T=32, D=16):
    return lambda: [torch.randint(-3, 4, (B, T, D)).float()]


HEINSEN = ("cumsum", "logcumsumexp")
PAPER = ("cumsum", "leading_row_scan")
# the log-space minGRU/minLSTM cancel a lot in backward: float32 eager's gate-bias gradients are
# ~6e-5 away from the float64 ones, so these are compared in float64, tightly
F64 = dict(dtype=torch.float64, tol=1e-9)


def check_models(rank, P, rec):
    exact(rank, P, rec, "minGRU, h0 = 0 (Heinsen scan)", lambda: Z.MinGRU(form="heinsen"), _x(),
          HEINSEN, **F64)
    exact(rank, P, rec, "minGRU, paper form (cat h_0, [:, 1:])", lambda: Z.MinGRU(form="paper"),
          _x_h0(), PAPER, **F64)
    exact(rank, P, rec, "minGRU LM, 2 blocks, paper form", lambda: Z.MinGRULM(form="paper"),
          _x(), PAPER, **F64)
    exact(rank, P, rec, "Mamba-1 parallel cumsum form", Z.Mamba1CumsumScan, _x(), ("cumsum",))
    exact(rank, P, rec, "cumprod decay (dtype=)", lambda: Z.CumprodDecay(spelling="dtype"), _x(),
          ("cumprod", "cumsum"))
    exact(rank, P, rec, "running max/min features", Z.RunningMaxFeatures, _x(),
          ("cummax", "cummin", "positions"))
    exact(rank, P, rec, "prefix softmax pooling (logcumsumexp)", Z.LogCumSumExpPool, _x(),
          ("cumsum", "logcumsumexp"))
    gathered(rank, P, rec, "minGRU paper form + log_h[:, -1]", Z.MinGRULastState, _x_h0(),
             ("pad", "cat"), **F64)


def check_models_p4(rank, P, rec):
    exact(rank, P, rec, "minLSTM, paper form, learned h_0", lambda: Z.MinLSTM(form="paper"),
          _x(), PAPER, **F64)
    exact(rank, P, rec, "cummax/cummin with ties", Z.TiedRunningMax, _ints(), ("cummax", "cummin"))
