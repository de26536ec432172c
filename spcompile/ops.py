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


# ------------------------------------------------------------------ prefix sums across ranks
def exclusive_prefix_sum(total: Tensor, group_name: str) -> Tensor:
    """Σ_{j<r} total_j (zeros on rank 0); exact backward through the adjoint all-gather."""
    if not group_name:
        return torch.zeros_like(total)
    P, r = _size(group_name), _rank(group_name)
    allt = gather_seq(total.unsqueeze(0).contiguous(), 0, group_name)  # [P, ...]
    mask = (torch.arange(P, device=total.device) < r).to(total.dtype)
    return (allt * mask.view(P, *([1] * total.dim()))).sum(0)


def sequence_cumsum(x: Tensor, dim: int, group_name: str) -> Tensor:
    """cumsum along a sharded axis: local cumsum + the totals of the earlier ranks."""
    if not group_name:
        return torch.cumsum(x, dim)
    bar = torch.ops.spcompile.layout_barrier
    x = bar(x)
    local = torch.cumsum(x, dim)
    carry = exclusive_prefix_sum(x.sum(dim), group_name)
    return bar(local + carry.unsqueeze(dim))


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
