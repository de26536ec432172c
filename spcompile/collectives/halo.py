"""Halo exchange for causal token mixing (Mamba's causal depthwise conv1d, RWKV token shift,
sliding-window attention): rank r needs the last ``width`` positions of rank r-1. A left shift
(next-token labels) needs the other direction: ``halo_from_next``, the first ``width`` positions
of rank r+1.

Forward: one send to r+1 and one receive from r-1 (rank 0 gets zeros, the last rank sends
nothing). Backward: the mirror: the halo's gradient goes back to r-1, which adds it to the
gradient of its tail. Both directions are point-to-point inside custom ops.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import runtime as rt

__all__ = ["halo_exchange", "halo_from_next"]


def _exchange(send: Tensor, recv_shape, pg, to: int, frm: int, what: str) -> Tensor:
    """Send ``send`` to rank ``to`` (if valid) and receive a ``recv_shape`` block from ``frm``."""
    P = pg.size()
    buf = send.new_zeros(recv_shape)
    sends = [(send.contiguous(), to, 0)] if 0 <= to < P else []
    recvs = [(buf, frm, 0)] if 0 <= frm < P else []
    rt.wait_all(rt.p2p(pg, what, "halo", sends=sends, recvs=recvs), what, pg)
    return buf


def _halo_fwd(x: Tensor, width: int, dim: int, group: str, from_next: bool) -> Tensor:
    """The ``width`` positions along ``dim`` a neighbour sends: rank r-1's last ones
    (``from_next=False``) or rank r+1's first ones; zeros at the end of the chain."""
    what = "halo_from_next" if from_next else "halo_exchange"
    pg = rt.resolve_group(group)
    L = x.shape[dim]
    shape = list(x.shape)
    shape[dim] = width
    if pg is None or pg.size() == 1:
        return x.new_zeros(shape)
    rt.check_uniform(pg, what, {
        "ndim": x.dim(), **{f"size of dim {i}": s for i, s in enumerate(x.shape)},
        "dtype": rt.dtype_code(x.dtype), "width": width},
        hint=" (shard the sequence evenly and use one halo width)", like=x)
    r = pg.rank()
    if from_next:
        return _exchange(x.narrow(dim, 0, width), shape, pg, r - 1, r + 1, what)
    return _exchange(x.narrow(dim, L - width, width), shape, pg, r + 1, r - 1, what)


def _halo_bwd(grad: Tensor, length: int, dim: int, group: str, from_next: bool) -> Tensor:
    """The mirror: the halo's gradient goes back to the rank it came from, which adds it to the
    positions it sent (the last ``width``, or the first for ``from_next``)."""
    what = ("halo_from_next" if from_next else "halo_exchange") + " backward"
    pg = rt.resolve_group(group)
    width = grad.shape[dim]
    shape = list(grad.shape)
    shape[dim] = length
    dx = grad.new_zeros(shape)
    if pg is None or pg.size() == 1:
        return dx
    r = pg.rank()
    to, frm = (r + 1, r - 1) if from_next else (r - 1, r + 1)
    got = _exchange(grad, grad.shape, pg, to, frm, what)
    dx.narrow(dim, 0 if from_next else length - width, width).copy_(got)
    return dx


def _halo_fake(x, width, dim, group):
    shape = list(x.shape)
    shape[dim] = width
    return x.new_empty(shape)


def _halo_bwd_fake(grad, length, dim, group):
    shape = list(grad.shape)
    shape[dim] = length
    return grad.new_empty(shape)


def _setup(ctx, inputs, output):
    x, width, dim, group = inputs
    ctx.length, ctx.dim, ctx.group = x.shape[dim], dim, group
    ctx.float = x.dtype.is_floating_point or x.dtype.is_complex


@torch.library.custom_op("spcompile::halo_exchange", mutates_args=())
def _halo_exchange(x: Tensor, width: int, dim: int, group: str) -> Tensor:
    return _halo_fwd(x, width, dim, group, from_next=False)


@torch.library.custom_op("spcompile::halo_exchange_bwd", mutates_args=())
def _halo_exchange_bwd(grad: Tensor, length: int, dim: int, group: str) -> Tensor:
    return _halo_bwd(grad, length, dim, group, from_next=False)


def _backward(ctx, grad):
    if not ctx.float:
        return None, None, None, None
    return _halo_exchange_bwd(grad.contiguous(), ctx.length, ctx.dim, ctx.group), None, None, None


_halo_exchange.register_fake(_halo_fake)
_halo_exchange_bwd.register_fake(_halo_bwd_fake)
_halo_exchange.register_autograd(_backward, setup_context=_setup)


def halo_exchange(x: Tensor, width: int, *, dim: int = 1, group: rt.GroupLike = None) -> Tensor:
    """The last ``width`` positions along ``dim`` of rank r-1 (zeros on rank 0).

    Args:
        x: this rank's shard; ``dim`` is the sequence dim.
        width: halo size (``kernel_size - 1`` for a causal conv, 1 for a token shift), at most
            the local length.
        group: ProcessGroup, its name, or None (P = 1: zeros, no communication).
    Returns:
        like ``x`` with size ``width`` on ``dim``; differentiable (the gradient returns to r-1).
    """
    dim = dim % x.dim()
    width = int(width)
    L = x.shape[dim]
    if width < 0:
        raise ValueError(f"halo_exchange: width must be >= 0, got {width}")
    if width > L:
        raise ValueError(f"halo_exchange: width {width} exceeds the local length {L} on dim {dim}: "
                         f"a halo may only reach into the previous rank. Use fewer ranks (longer "
                         f"shards) or gather the sequence (gather_sequence) around this op")
    name = rt.group_name(group)
    if rt.group_size(name) == 1 or width == 0:
        shape = list(x.shape)
        shape[dim] = width
        return x.new_zeros(shape)
    return _halo_exchange(x, width, dim, name)


# ------------------------------------------------------------------ the other direction
@torch.library.custom_op("spcompile::halo_from_next", mutates_args=())
def _halo_from_next(x: Tensor, width: int, dim: int, group: str) -> Tensor:
    return _halo_fwd(x, width, dim, group, from_next=True)


@torch.library.custom_op("spcompile::halo_from_next_bwd", mutates_args=())
def _halo_from_next_bwd(grad: Tensor, length: int, dim: int, group: str) -> Tensor:
    return _halo_bwd(grad, length, dim, group, from_next=True)


def _backward_next(ctx, grad):
    if not ctx.float:
        return None, None, None, None
    return _halo_from_next_bwd(grad.contiguous(), ctx.length, ctx.dim, ctx.group), None, None, \
        None


_halo_from_next.register_fake(_halo_fake)
_halo_from_next_bwd.register_fake(_halo_bwd_fake)
_halo_from_next.register_autograd(_backward_next, setup_context=_setup)


def halo_from_next(x: Tensor, width: int, *, dim: int = 1, group: rt.GroupLike = None) -> Tensor:
    """The first ``width`` positions along ``dim`` of rank r+1 (zeros on the last rank): what a
    left shift needs (next-token labels, ``pad(x, (0, s))[..., s:]``). Differentiable (the
    gradient returns to r+1)."""
    dim = dim % x.dim()
    width = int(width)
    if width < 0 or width > x.shape[dim]:
        raise ValueError(f"halo_from_next: width {width} must be in [0, {x.shape[dim]}] (the "
                         f"local length on dim {dim}): a halo may only reach into the next rank")
    name = rt.group_name(group)
    if rt.group_size(name) == 1 or width == 0:
        shape = list(x.shape)
        shape[dim] = width
        return x.new_zeros(shape)
    return _halo_from_next(x, width, dim, name)
