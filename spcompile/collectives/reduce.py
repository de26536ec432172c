"""Reductions and re-sharding along the sequence, with the gradients the SP contract needs.

Contract (DESIGN.md §1): every rank calls ``backward()`` on its copy of a replicated value, so
the gradient of a replicated value is *not* summed again over the group.

* ``all_reduce_sum``: forward sums the partial values; backward is the identity.
* ``all_reduce_max``: backward sends the gradient to the elements that hold the maximum, split
  evenly among ties across all ranks (like ``torch.amax``); one all_reduce counts the ties.
* ``gather_sequence(x, dim, grad=...)``: all_gather along ``dim``. Backward ``"slice"`` takes this
  rank's slice of a replicated gradient; ``"reduce_scatter"`` sums the ranks' partial gradients
  first (what gather → op → re-shard needs, because the op's backward on each rank only sees
  that rank's share of the downstream gradient).
* ``shard_sequence``: this rank's contiguous slice (a view; backward zero-pads, no traffic).
* ``sync_gradients``: one all_reduce SUM per dtype over the flattened ``.grad`` of a module.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor

from . import runtime as rt

__all__ = ["all_reduce_sum", "all_reduce_max", "gather_sequence", "shard_sequence",
           "sync_gradients"]


# ------------------------------------------------------------------------------------ all_reduce

@torch.library.custom_op("spcompile::all_reduce", mutates_args=())
def _all_reduce(x: Tensor, group: str, op: str) -> Tensor:
    pg = rt.resolve_group(group)
    if pg is None or pg.size() == 1:
        return x.clone()
    rt.check_uniform(pg, f"all_reduce_{op}", {"numel": x.numel(), "dtype": rt.dtype_code(x.dtype),
                                               "ndim": x.dim()}, like=x)
    return rt.all_reduce(x, op, pg, f"all_reduce_{op}", f"all_reduce_{op}").view(x.shape)


@_all_reduce.register_fake
def _(x, group, op):
    return torch.empty_like(x)


def _ar_setup(ctx, inputs, output):
    x, group, op = inputs
    ctx.group, ctx.op = group, op
    if op == "max":
        ctx.save_for_backward(x, output)


def _ar_backward(ctx, grad):
    if ctx.op == "sum":
        return grad, None, None
    x, out = ctx.saved_tensors
    hit = (x == out).to(grad.dtype)
    ties = _all_reduce(hit, ctx.group, "sum")
    return grad * hit / ties.clamp_min(1), None, None


_all_reduce.register_autograd(_ar_backward, setup_context=_ar_setup)


def all_reduce_sum(x: Tensor, group: rt.GroupLike = None) -> Tensor:
    """Sum of ``x`` over the group (partial sums over the sequence → the global value).

    Backward: identity (each rank back-propagates its copy of the replicated result).
    """
    name = rt.group_name(group)
    return x if rt.group_size(name) == 1 else _all_reduce(x, name, "sum")


def all_reduce_max(x: Tensor, group: rt.GroupLike = None) -> Tensor:
    """Elementwise max of ``x`` over the group; gradient to the holders of the max (ties split)."""
    name = rt.group_name(group)
    return x if rt.group_size(name) == 1 else _all_reduce(x, name, "max")


# ----------------------------------------------------------------------------- gather / scatter

@torch.library.custom_op("spcompile::gather_sequence", mutates_args=())
def _gather_sequence(x: Tensor, dim: int, group: str, label: str) -> Tensor:
    """All-gather along ``dim``; bytes are counted under ``label`` (the caller's strategy)."""
    pg = rt.resolve_group(group)
    if pg is None or pg.size() == 1:
        return x.clone()
    rt.check_uniform(pg, "gather_sequence", {
        "ndim": x.dim(), **{f"size of dim {i}": s for i, s in enumerate(x.shape)},
        "dtype": rt.dtype_code(x.dtype)}, hint=" (shard the sequence evenly across ranks)",
        like=x)
    out, _ = rt.all_gather(x.movedim(dim, 0), pg, label, label)
    # [P, T_local, ...] → [P*T_local, ...] → dim back in place
    return out.flatten(0, 1).movedim(0, dim).contiguous()


@_gather_sequence.register_fake
def _(x, dim, group, label):
    shape = list(x.shape)
    shape[dim] *= rt.group_size(group)
    return x.new_empty(shape)


@torch.library.custom_op("spcompile::reduce_scatter_sequence", mutates_args=())
def _reduce_scatter_sequence(x: Tensor, dim: int, group: str, label: str) -> Tensor:
    pg = rt.resolve_group(group)
    if pg is None or pg.size() == 1:
        return x.clone()
    P = pg.size()
    y = x.movedim(dim, 0)
    y = y.reshape((P, y.shape[0] // P) + tuple(y.shape[1:]))
    out = rt.reduce_scatter(y, pg, f"{label} backward (reduce_scatter)", label)
    return out.movedim(0, dim).contiguous()


@_reduce_scatter_sequence.register_fake
def _(x, dim, group, label):
    shape = list(x.shape)
    shape[dim] //= rt.group_size(group)
    return x.new_empty(shape)


def _gs_setup(ctx, inputs, output):
    x, dim, group, label = inputs
    ctx.dim, ctx.group, ctx.T, ctx.label = dim, group, x.shape[dim], label


@torch.library.custom_op("spcompile::gather_sequence_rs", mutates_args=())
def _gather_sequence_rs(x: Tensor, dim: int, group: str, label: str) -> Tensor:
    """Same forward as gather_sequence; its backward is reduce_scatter (see module doc)."""
    return _gather_sequence(x, dim, group, label)


@_gather_sequence_rs.register_fake
def _(x, dim, group, label):
    shape = list(x.shape)
    shape[dim] *= rt.group_size(group)
    return x.new_empty(shape)


def _slice_backward(ctx, grad):
    r = rt.group_rank(ctx.group)
    return grad.narrow(ctx.dim, r * ctx.T, ctx.T).contiguous(), None, None, None


def _rs_backward(ctx, grad):
    return (_reduce_scatter_sequence(grad.contiguous(), ctx.dim, ctx.group, ctx.label), None, None,
            None)


_gather_sequence.register_autograd(_slice_backward, setup_context=_gs_setup)
_gather_sequence_rs.register_autograd(_rs_backward, setup_context=_gs_setup)


def gather_sequence(x: Tensor, dim: int = 1, group: rt.GroupLike = None,
                    grad: str = "slice", *, label: str = "gather_sequence") -> Tensor:
    """All-gather the sequence shards along ``dim`` (rank order = sequence order).

    ``grad="slice"``: the gradient is replicated (every rank back-propagates the same full-length
    gradient): take this rank's slice. ``grad="reduce_scatter"``: each rank holds a partial
    gradient of the full sequence: sum over ranks, then slice. ``label``: the traffic
    counters' strategy name for these bytes.
    """
    if grad not in ("slice", "reduce_scatter"):
        raise ValueError(f"gather_sequence: grad must be 'slice' or 'reduce_scatter', got {grad!r}")
    name = rt.group_name(group)
    if rt.group_size(name) == 1:
        return x
    dim = dim % x.dim()
    op = _gather_sequence if grad == "slice" else _gather_sequence_rs
    return op(x, dim, name, label)


def shard_sequence(x: Tensor, dim: int = 1, group: rt.GroupLike = None) -> Tensor:
    """This rank's contiguous slice of ``x`` along ``dim`` (no communication)."""
    name = rt.group_name(group)
    P = rt.group_size(name)
    if P == 1:
        return x
    dim = dim % x.dim()
    n = x.shape[dim]
    if n % P:
        raise ValueError(f"shard_sequence: length {n} of dim {dim} is not divisible by the group "
                         f"size {P}; pad the sequence to a multiple of {P} (and mask the padding) "
                         f"or choose a group size that divides it")
    T = n // P
    return x.narrow(dim, rt.group_rank(name) * T, T)


def sync_gradients(module: torch.nn.Module, group: rt.GroupLike = None) -> None:
    """All-reduce SUM every parameter ``.grad`` of ``module`` over the group (one call per dtype).

    Parameters without a gradient on this rank contribute zeros, so every rank must call this
    with the same module structure (the call order is by dtype, then parameter order).
    """
    name = rt.group_name(group)
    pg = rt.resolve_group(name)
    if pg is None or pg.size() == 1:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    by_dtype: Dict[torch.dtype, List[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    for dt in sorted(by_dtype, key=str):
        ps = by_dtype[dt]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in ps])
        summed = rt.all_reduce(flat, "sum", pg, "sync_gradients", "sync_gradients")
        off = 0
        for p in ps:
            n = p.numel()
            g = summed[off:off + n].view_as(p)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            off += n
