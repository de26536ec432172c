"""User helpers around the contract: shard inputs, gather outputs, sum parameter gradients.

These run eagerly, outside compiled graphs. ``gather_sequence``'s backward takes this rank's slice
of the gradient (every rank holds the same gathered value, so its gradient is not summed again).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .backend import resolve_group


def _group_of(group: Any):
    name, size, rank = resolve_group(group)
    return name, size, rank


def shard_sequence(x: Tensor, dim: int = 1, group: Any = None) -> Tensor:
    """This rank's contiguous slice of ``x`` along ``dim`` (the input each rank feeds)."""
    name, P, r = _group_of(group)
    n = x.shape[dim]
    if n % P:
        raise ValueError(
            f"spcompile.shard_sequence: sequence length {n} (dim {dim}) is not divisible by the "
            f"{P} ranks of the group; pad the sequence to a multiple of {P} (e.g. "
            f"{(n + P - 1) // P * P}) or choose a group size that divides {n}.")
    return x.narrow(dim, r * (n // P), n // P).contiguous()


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, name, P, r):
        ctx.dim, ctx.P, ctx.r = dim, P, r
        from .ops import _group
        xm = x.movedim(dim, 0).contiguous()
        out = xm.new_empty((P * xm.shape[0],) + tuple(xm.shape[1:]))
        dist.all_gather_into_tensor(out, xm, group=_group(name))
        return out.movedim(0, dim).contiguous()

    @staticmethod
    def backward(ctx, g):
        n = g.shape[ctx.dim] // ctx.P
        return g.narrow(ctx.dim, ctx.r * n, n), None, None, None, None


def gather_sequence(x: Tensor, dim: int = 1, group: Any = None) -> Tensor:
    """The full sequence from every rank's shard (all-gather along ``dim``, rank order)."""
    name, P, r = _group_of(group)
    if P == 1:
        return x
    return _Gather.apply(x, dim, name, P, r)


def sync_gradients(module: torch.nn.Module, group: Any = None) -> None:
    """Sum every parameter's ``.grad`` over the SP group (the global gradient on every rank)."""
    name, P, r = _group_of(group)
    if P == 1:
        return
    from .ops import _group
    pg = _group(name)
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=pg)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def mark_sequence(x: Tensor, dim: Optional[int] = 1) -> Tensor:
    """Declare which dim of an input is the sequence (``None``: not sequence-shaped).

    Marks the tensor object; the backend reads the mark when the tensor is a compiled
    function's input. Returns ``x`` itself.
    """
    x._spcompile_seq_dim = dim
    return x
