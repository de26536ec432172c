"""Graph-level ops the rewrite and fallback passes insert (besides the scan/attention ops).

Gradient convention inside a compiled graph: every collective has its *true adjoint*
(all-reduce ↔ all-reduce, all-gather ↔ reduce-scatter, slice ↔ zero-pad), and every replicated
graph output is wrapped in :func:`replicated_output`, whose backward divides the incoming gradient
by ``P``: each rank calls ``backward()`` on its own copy of a replicated loss, so the ``P`` copies
together seed exactly one unit of gradient. Input gradients then come out as the shards of the
global ones, and parameter gradients as partial sums whose sum over the group is the global
gradient (DESIGN.md §1).

With ``group_name == ""`` (P = 1) every op here is the identity.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor


def _size(name: str) -> int:
    from .collectives import group_size
    return group_size(name)


def _rank(name: str) -> int:
    from .collectives import group_rank
    return group_rank(name)


# ------------------------------------------------------------------ all-reduce (adjoint: itself)
@torch.library.custom_op("spcompile::allreduce", mutates_args=())
def allreduce(x: Tensor, op: str, group_name: str) -> Tensor:
    """Sum or max over the group, for values *inside* a compiled graph: its backward is the true
    adjoint (a sum of the gradients), unlike ``collectives.all_reduce_sum`` whose identity
    backward is for a replicated value every rank back-propagates by itself."""
    if not group_name:
        return x.contiguous().clone()
    from .collectives import runtime as rt
    pg = rt.resolve_group(group_name)
    return rt.all_reduce(x.contiguous(), op, pg, f"in-graph all_reduce ({op})",
                         "allreduce").view(x.shape).clone()


@allreduce.register_fake
def _(x, op, group_name):
    return x.new_empty(x.shape)  # contiguous, as the real result


def _allreduce_setup(ctx, inputs, output):
    x, op, group_name = inputs
    ctx.op, ctx.group_name = op, group_name
    if op == "max":
        ctx.save_for_backward(x, output)


def _allreduce_bwd(ctx, g):
    if ctx.op == "sum":
        return allreduce(g.contiguous(), "sum", ctx.group_name), None, None
    x, out = ctx.saved_tensors
    # the max goes back only to the elements that hold it, ties split over all ranks
    hit = (x == out).to(g.dtype)
    count = allreduce(hit, "sum", ctx.group_name).clamp_min(1.0)
    gsum = allreduce(g.contiguous(), "sum", ctx.group_name)
    return gsum * hit / count, None, None


allreduce.register_autograd(_allreduce_bwd, setup_context=_allreduce_setup)


def gather_seq(x: Tensor, dim: int, group_name: str) -> Tensor:
    """All-gather along ``dim`` (rank order) with the adjoint backward (reduce-scatter): what
    gather → op → re-shard needs. The transport is ``collectives``' (bytes counted, shapes
    checked across ranks)."""
    if not group_name:
        return x
    from . import collectives  # noqa: F401  (registers spcompile::gather_sequence_rs)
    return torch.ops.spcompile.gather_sequence_rs(x.contiguous(), dim, group_name, "fallback")


def shard_slice(x: Tensor, dim: int, group_name: str) -> Tensor:
    """This rank's contiguous slice along ``dim`` (adjoint: zero-padding, by autograd)."""
    from .collectives import shard_sequence
    return shard_sequence(x, dim, group_name)


# ------------------------------------------------------------------ gradient scaling
@torch.library.custom_op("spcompile::replicated_output", mutates_args=())
def replicated_output(x: Tensor, world_size: int) -> Tensor:
    """Identity; the backward divides by ``world_size`` (see the module docstring)."""
    return x.clone()


@replicated_output.register_fake
def _(x, world_size):
    return torch.empty_like(x)


replicated_output.register_autograd(
    lambda ctx, g: (g / ctx.world_size, None),
    setup_context=lambda ctx, inputs, output: setattr(ctx, "world_size", inputs[1]))


@torch.library.custom_op("spcompile::replicated_input", mutates_args=())
def replicated_input(x: Tensor, world_size: int) -> Tensor:
    """Identity; the backward multiplies by ``world_size``: a replicated value an earlier graph
    returned through :func:`replicated_output` enters a later graph (across a graph break),
    whose own output wrapper divides again (``spcompile.boundary``)."""
    return x.clone()


@replicated_input.register_fake
def _(x, world_size):
    return torch.empty_like(x)


replicated_input.register_autograd(
    lambda ctx, g: (g * ctx.world_size, None),
    setup_context=lambda ctx, inputs, output: setattr(ctx, "world_size", inputs[1]))


# ------------------------------------------------------------------ scans along the sequence
# torch op → how two partial results combine (the op's associative operator)
SCANS = {"cumsum": "sum", "cumprod": "prod", "logcumsumexp": "logaddexp", "cummax": "max",
         "cummin": "min"}


def _exclusive_over_ranks(total: Tensor, scan, identity: Tensor, group_name: str):
    """``scan`` (a torch cumulative op over dim 0) of the earlier ranks' ``total``s: the rank
    totals are all-gathered ``[P, ...]``, shifted down one rank behind ``identity`` and scanned;
    row ``r`` is this rank's carry. Every rank uses the gathered value (rank 0 too), so the
    adjoint reduce-scatter runs on all of them in backward."""
    r = _rank(group_name)
    allt = gather_seq(total.unsqueeze(0).contiguous(), 0, group_name)  # [P, ...]
    shifted = torch.cat([identity.unsqueeze(0), allt[:-1]], 0)
    return scan(shifted)[r]


def _body(x: Tensor, dim: int, head: int) -> Tensor:
    return x.narrow(dim, head, x.shape[dim] - head)


def _with_head(local: Tensor, body: Tensor, dim: int, head: int) -> Tensor:
    return torch.cat([local.narrow(dim, 0, head), body], dim) if head else body


def sequence_scan(x: Tensor, dim: int, op: str, group_name: str,
                  dtype: Optional[torch.dtype] = None, head: int = 0):
    """``torch.<op>(x, dim[, dtype])`` along a sharded axis (op: cumsum, cumprod, logcumsumexp,
    cummax, cummin): the local scan combined with the exclusive scan of the earlier ranks'
    totals (sum / product / logaddexp / max / min). cummax/cummin return (values, indices) with
    global indices, and torch's rules: ties go to the later element, a NaN wins and stays.

    ``head``: the first ``head`` rows of ``x`` along ``dim`` are not sequence data but rows
    every rank holds alike, in front of the sequence (an initial state ``cat([h0, x])``, a
    ``F.pad(x, (0, 0, 1, 0))``): they enter this rank's scan locally and are left out of the
    rank totals. Their gradient is then this rank's share, summed over ranks like a parameter's.

    Gradients: cumsum/cumprod/cummax/cummin are compositions of differentiable torch ops and the
    adjoint all-gather, so autograd gives torch's own backward of each piece (exact with zeros
    in cumprod, the gradient at the element the indices name for cummax/cummin);
    logcumsumexp is ``spcompile::sequence_logcumsumexp``, whose backward is torch's formula
    evaluated over the whole sequence (the same NaN/0 at -inf entries)."""
    if op not in SCANS:
        raise ValueError(f"sequence_scan: unknown op {op!r} (one of {sorted(SCANS)})")
    if dtype is not None:
        x = x.to(dtype)
    dim = dim % x.dim()
    if not group_name:
        return getattr(torch, op)(x, dim)
    if op == "logcumsumexp":
        return torch.ops.spcompile.sequence_logcumsumexp(x, dim, group_name, head)
    bar = torch.ops.spcompile.layout_barrier
    x = bar(x)
    if op in ("cummax", "cummin"):
        if head:
            raise ValueError("sequence_scan: cummax/cummin with leading rows are not supported")
        v, i = _sequence_cummaxmin(x, dim, op, group_name)
        return bar(v), i
    local = getattr(torch, op)(x, dim)
    body = _body(local, dim, head)
    if op == "cumsum":
        total = _body(x, dim, head).sum(dim)
        carry = _exclusive_over_ranks(total, lambda t: t.cumsum(0), torch.zeros_like(total),
                                      group_name)
        out = body + carry.unsqueeze(dim)
    else:  # cumprod
        total = _body(x, dim, head).prod(dim)
        carry = _exclusive_over_ranks(total, lambda t: t.cumprod(0), torch.ones_like(total),
                                      group_name)
        out = body * carry.unsqueeze(dim)
    return bar(_with_head(local, out, dim, head))


def _lowest(x: Tensor, op: str) -> Tensor:
    """The identity of max (min): -inf (+inf), or the dtype's extreme for integers / bools."""
    hi = op == "cummin"
    if x.dtype.is_floating_point:
        v = float("inf") if hi else float("-inf")
    elif x.dtype == torch.bool:
        v = hi
    else:
        v = torch.iinfo(x.dtype).max if hi else torch.iinfo(x.dtype).min
    return torch.full(x.shape[:0], v, dtype=x.dtype, device=x.device)


def _sequence_cummaxmin(x: Tensor, dim: int, op: str, group_name: str):
    T, r = x.shape[dim], _rank(group_name)
    vals, idx = getattr(torch, op)(x, dim)
    idx = idx + r * T  # global positions
    last_v = vals.select(dim, T - 1)
    last_i = idx.select(dim, T - 1)
    # the earlier ranks' running extreme, by the same op over the rank totals (ties: later rank)
    ident = _lowest(last_v, op).expand(last_v.shape)
    allv = torch.cat([ident.unsqueeze(0),
                      gather_seq(last_v.unsqueeze(0).contiguous(), 0, group_name)[:-1]], 0)
    alli = torch.cat([torch.zeros_like(last_i).unsqueeze(0),
                      gather_seq(last_i.unsqueeze(0).contiguous(), 0, group_name)[:-1]], 0)
    cv, cj = getattr(torch, op)(allv, 0)
    carry_v = cv[r].unsqueeze(dim)
    carry_i = alli.gather(0, cj[r:r + 1]).squeeze(0).unsqueeze(dim)
    # torch's sequential rule from the carried state: a local element replaces it when it is
    # >= (<=) the carry or NaN; a NaN carry stays unless a later NaN comes
    better = vals >= carry_v if op == "cummax" else vals <= carry_v
    take = better | vals.isnan() if vals.is_floating_point() else better
    return torch.where(take, vals, carry_v), torch.where(take, idx, carry_i)


# logcumsumexp: a custom op with torch's backward formula, evaluated across the ranks ---------
def _all_totals(total: Tensor, group_name: str) -> Tensor:
    """[P, ...] rank totals (eager, inside a custom op)."""
    from .collectives.reduce import _gather_sequence
    return _gather_sequence(total.unsqueeze(0).contiguous(), 0, group_name, "prefix")


def _lcse_sharded(x: Tensor, dim: int, group_name: str, head: int, reverse: bool) -> Tensor:
    """logcumsumexp of the global sequence (``reverse``: from the end), on this rank's rows;
    head rows scan locally and count in no rank's total."""
    r = _rank(group_name)
    if reverse:
        local = x.flip(dim).logcumsumexp(dim).flip(dim)
        total = torch.logsumexp(_body(x, dim, head), dim)
    else:
        local = x.logcumsumexp(dim)
        total = local.select(dim, -1) if not head else torch.logsumexp(_body(x, dim, head), dim)
    allt = _all_totals(total, group_name)
    ninf = torch.full_like(allt[:1], float("-inf"))
    if reverse:  # the later ranks
        carry = torch.cat([allt[1:], ninf], 0).flip(0).logcumsumexp(0).flip(0)[r]
    else:
        carry = torch.cat([ninf, allt[:-1]], 0).logcumsumexp(0)[r]
    body = torch.logaddexp(_body(local, dim, head), carry.unsqueeze(dim))
    return _with_head(local, body, dim, head)


@torch.library.custom_op("spcompile::sequence_logcumsumexp", mutates_args=())
def sequence_logcumsumexp(x: Tensor, dim: int, group_name: str, head: int) -> Tensor:
    """logcumsumexp along a sharded ``dim`` (see :func:`sequence_scan`)."""
    if not group_name:
        return x.logcumsumexp(dim).contiguous()
    return _lcse_sharded(x, dim, group_name, head, reverse=False).contiguous()


@sequence_logcumsumexp.register_fake
def _(x, dim, group_name, head):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("spcompile::sequence_logcumsumexp_backward", mutates_args=())
def sequence_logcumsumexp_backward(grad: Tensor, x: Tensor, y: Tensor, dim: int,
                                   group_name: str, head: int) -> Tensor:
    """torch's logcumsumexp backward, ``dx_j = exp(x_j + log Σ_{t≥j} g⁺_t e^{-y_t}) -
    exp(x_j + log Σ_{t≥j} g⁻_t e^{-y_t})``, with the reverse sums running over the whole
    sequence (a reverse sharded logcumsumexp; head rows sum this rank's rows only)."""
    lowest = torch.finfo(grad.dtype).min
    log_abs = grad.abs().log()
    pos = torch.where(grad > 0, log_abs, lowest) - y
    neg = torch.where(grad < 0, log_abs, lowest) - y
    both = torch.stack([pos, neg])  # one exchange for both signs
    if group_name:
        rev = _lcse_sharded(both, dim + 1, group_name, head, reverse=True)
    else:
        rev = both.flip(dim + 1).logcumsumexp(dim + 1).flip(dim + 1)
    return ((rev[0] + x).exp() - (rev[1] + x).exp()).contiguous()


@sequence_logcumsumexp_backward.register_fake
def _(grad, x, y, dim, group_name, head):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _lcse_setup(ctx, inputs, output):
    x, dim, group_name, head = inputs
    ctx.dim, ctx.group_name, ctx.head = dim, group_name, head
    ctx.save_for_backward(x, output)


def _lcse_bwd(ctx, grad):
    x, y = ctx.saved_tensors
    return (sequence_logcumsumexp_backward(grad.contiguous(), x, y, ctx.dim, ctx.group_name,
                                           ctx.head), None, None, None)


sequence_logcumsumexp.register_autograd(_lcse_bwd, setup_context=_lcse_setup)


def sequence_offset(group_name: str, local_len: int) -> int:
    """Global index of this rank's first token."""
    return _rank(group_name) * local_len


def global_positions(positions: Tensor, local_len: int, group_name: str) -> Tensor:
    """Local positions ``0..T_loc-1`` (or any offsets) → global positions of this rank."""
    if not group_name:
        return positions
    return positions + _rank(group_name) * local_len


def diagonal_block(x: Tensor, d0: int, d1: int, group_name: str) -> Tensor:
    """This rank's diagonal block of a global ``T×T`` value (rows and columns of its tokens)."""
    if not group_name:
        return x
    P, r = _size(group_name), _rank(group_name)
    n = x.shape[d0] // P
    return x.narrow(d0, r * n, n).narrow(d1, r * n, n)


def global_linspace(local: Tensor, start: float, end: float, local_len: int,
                    group_name: str) -> Tensor:
    """``linspace(start, end, T_local)`` → this rank's window of ``linspace(start, end, T)``
    over the global length ``T = P · T_local``."""
    if not group_name:
        return local
    P = _size(group_name)
    full = torch.linspace(start, end, P * local_len, dtype=local.dtype, device=local.device)
    return full.narrow(0, _rank(group_name) * local_len, local_len)


# ------------------------------------------------------------------ the scan call
def scan(q: Tensor, k: Tensor, v: Tensor, log_decay: Optional[Tensor], scale: float,
         chunk_size: int, strategy: str, group_name: str, blocks: Optional[int] = None
         ) -> Tensor:
    """The rewrite's target for a linear-attention/SSM match: local kernel at P = 1,
    sequence-parallel scan with the planned hand-off otherwise (``blocks``: All-Scan pipeline
    depth chosen by the cost model). Returns o only."""
    if not group_name:
        from .kernels import linear_scan
        return linear_scan(q, k, v, log_decay, scale=scale, chunk_size=chunk_size)[0]
    from .collectives import sp_linear_scan
    o = sp_linear_scan(q, k, v, log_decay, scale=scale, chunk_size=chunk_size,
                       strategy=strategy, group=group_name, blocks=blocks)[0]
    return torch.ops.spcompile.layout_barrier(o)


# ------------------------------------------------------------------ layout barrier
@torch.library.custom_op("spcompile::layout_barrier", mutates_args=())
def layout_barrier(x: Tensor) -> Tensor:
    """Identity that returns a contiguous tensor, and gives its gradient back in ``x``'s layout.

    Around the scan ops the gradients are sums of terms with different layouts. Some ATen
    backward kernels (``elu_backward``, seen in torch 2.13) then pick a different output layout
    on real tensors than their meta functions predict, and a later ``view`` in AOTAutograd's
    backward fails. A custom op's output layout is exactly what its fake says, so a barrier on
    each rewritten op's inputs pins the layouts: contiguous forward, and a gradient with the
    strides the user's value had (what plain autograd would hand back).
    """
    return x.contiguous().clone()


@layout_barrier.register_fake
def _(x):
    return x.new_empty(x.shape)


@torch.library.custom_op("spcompile::restride", mutates_args=())
def restride(g: Tensor, stride: List[int]) -> Tensor:
    """``g``'s values with the given strides (a dense, non-overlapping layout)."""
    out = torch.empty_strided(g.shape, stride, dtype=g.dtype, device=g.device)
    out.copy_(g)
    return out


@restride.register_fake
def _(g, stride):
    return torch.empty_strided(g.shape, stride, dtype=g.dtype, device=g.device)


def _dense_stride(x: Tensor) -> List[int]:
    """x's strides if they describe a dense non-overlapping layout, else contiguous strides."""
    order = sorted(range(x.dim()), key=lambda d: x.stride()[d])
    expect, ok = 1, True
    for d in order:
        if x.shape[d] == 1:
            continue
        if x.stride()[d] != expect:
            ok = False
            break
        expect *= x.shape[d]
    if ok:
        return list(x.stride())
    return list(torch.empty(x.shape, device="meta").stride())


def _barrier_setup(ctx, inputs, output):
    ctx.stride = _dense_stride(inputs[0])


layout_barrier.register_autograd(lambda ctx, g: restride(g.contiguous(), ctx.stride),
                                 setup_context=_barrier_setup)
restride.register_autograd(lambda ctx, g: g.contiguous(),
                           setup_context=lambda ctx, inputs, output: None)
