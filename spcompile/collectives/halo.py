"""Halo exchange for causal token mixing (Mamba's causal depthwise conv1d, RWKV token shift,
sliding-window attention): rank r needs the last ``width`` positions of rank r-1. A left shift
(next-token labels) needs the other direction: ``halo_from_next``, the first ``width`` positions
of rank r+1.

Forward: one send to r+1 and one receive from r-1 (rank 0 gets zeros, the last rank sends
nothing). Backward: the mirror: the halo's gradient goes back to r-1, which adds it to the
gradient of its tail. Both directions are point-to-point inside custom ops.

``halo_roll`` is the circular version (``torch.roll`` along the sequence): the ends of the chain
are joined, so rank 0 gets the last rank's tail (or the last rank gets rank 0's head).

``flip_sequence`` reverses the global sequence: rank r flips its shard and swaps it with rank
P-1-r (one exchange; the middle rank of an odd P keeps its own). Its backward is itself.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import runtime as rt

__all__ = ["halo_exchange", "halo_from_next", "halo_roll", "flip_sequence"]


def _exchange(send: Tensor, recv_shape, pg, to: int, frm: int, what: str) -> Tensor:
    """Send ``send`` to rank ``to`` (if valid) and receive a ``recv_shape`` block from ``frm``."""
    P = pg.size()
    buf = send.new_zeros(recv_shape)
    sends = [(send.contiguous(), to, 0)] if 0 <= to < P else []
    recvs = [(buf, frm, 0)] if 0 <= frm < P else []
    rt.wait_all(rt.p2p(pg, what, "halo", sends=sends, recvs=recvs), what, pg)
    return buf


def _what(from_next: bool, wrap: bool) -> str:
    return "halo_roll" if wrap else "halo_from_next" if from_next else "halo_exchange"


def _peers(r: int, P: int, from_next: bool, wrap: bool):
    """(to, from) of a rank's send and receive; out of range at the ends unless ``wrap``."""
    to, frm = (r - 1, r + 1) if from_next else (r + 1, r - 1)
    return (to % P, frm % P) if wrap else (to, frm)


def _halo_fwd(x: Tensor, width: int, dim: int, group: str, from_next: bool,
              wrap: bool = False) -> Tensor:
    """The ``width`` positions along ``dim`` a neighbour sends: rank r-1's last ones
    (``from_next=False``) or rank r+1's first ones; zeros at the end of the chain, or the other
    end's when ``wrap`` (a ring)."""
    what = _what(from_next, wrap)
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
    to, frm = _peers(pg.rank(), pg.size(), from_next, wrap)
    return _exchange(x.narrow(dim, 0 if from_next else L - width, width), shape, pg, to, frm,
                     what)


def _halo_bwd(grad: Tensor, length: int, dim: int, group: str, from_next: bool,
              wrap: bool = False) -> Tensor:
    """The mirror: the halo's gradient goes back to the rank it came from, which adds it to the
    positions it sent (the last ``width``, or the first for ``from_next``)."""
    what = _what(from_next, wrap) + " backward"
    pg = rt.resolve_group(group)
    width = grad.shape[dim]
    shape = list(grad.shape)
    shape[dim] = length
    dx = grad.new_zeros(shape)
    if pg is None or pg.size() == 1:
        return dx
    frm, to = _peers(pg.rank(), pg.size(), from_next, wrap)  # the forward's, reversed
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


# ------------------------------------------------------------------ a ring (torch.roll)
@torch.library.custom_op("spcompile::halo_roll", mutates_args=())
def _halo_roll(x: Tensor, width: int, dim: int, from_next: bool, group: str) -> Tensor:
    return _halo_fwd(x, width, dim, group, from_next, wrap=True)


@torch.library.custom_op("spcompile::halo_roll_bwd", mutates_args=())
def _halo_roll_bwd(grad: Tensor, length: int, dim: int, from_next: bool, group: str) -> Tensor:
    return _halo_bwd(grad, length, dim, group, from_next, wrap=True)


def _roll_fake(x, width, dim, from_next, group):
    return _halo_fake(x, width, dim, group)


def _roll_bwd_fake(grad, length, dim, from_next, group):
    return _halo_bwd_fake(grad, length, dim, group)


def _roll_setup(ctx, inputs, output):
    x, width, dim, from_next, group = inputs
    ctx.length, ctx.dim, ctx.from_next, ctx.group = x.shape[dim], dim, from_next, group
    ctx.float = x.dtype.is_floating_point or x.dtype.is_complex


def _roll_backward(ctx, grad):
    if not ctx.float:
        return None, None, None, None, None
    return _halo_roll_bwd(grad.contiguous(), ctx.length, ctx.dim, ctx.from_next, ctx.group), \
        None, None, None, None


_halo_roll.register_fake(_roll_fake)
_halo_roll_bwd.register_fake(_roll_bwd_fake)
_halo_roll.register_autograd(_roll_backward, setup_context=_roll_setup)


def halo_roll(x: Tensor, width: int, *, dim: int = 1, from_next: bool = False,
              group: rt.GroupLike = None) -> Tensor:
    """Like :func:`halo_exchange` (or :func:`halo_from_next` with ``from_next=True``) on a
    ring: rank 0's halo is the last rank's last ``width`` positions (the last rank's, with
    ``from_next``, rank 0's first ones) — what ``torch.roll`` along a sharded sequence needs.
    With one rank the halo is ``x``'s own other end. Differentiable."""
    dim = dim % x.dim()
    width = int(width)
    L = x.shape[dim]
    if width < 0 or width > L:
        raise ValueError(f"halo_roll: width {width} must be in [0, {L}] (the local length on "
                         f"dim {dim}): a halo may only reach into the neighbouring rank")
    name = rt.group_name(group)
    if rt.group_size(name) == 1 or width == 0:
        return x.narrow(dim, 0 if from_next else L - width, width).clone()
    return _halo_roll(x, width, dim, from_next, name)


# ------------------------------------------------------------------ the mirror (torch.flip)
def _mirror(x: Tensor, dim: int, group: str) -> Tensor:
    pg = rt.resolve_group(group)
    y = x.flip(dim)
    if pg is None or pg.size() == 1:
        return y
    rt.check_uniform(pg, "flip_sequence", {
        "ndim": x.dim(), **{f"size of dim {i}": s for i, s in enumerate(x.shape)},
        "dtype": rt.dtype_code(x.dtype)},
        hint=" (shard the sequence evenly)", like=x)
    r, P = pg.rank(), pg.size()
    m = P - 1 - r
    if m == r:
        return y.contiguous()
    return _exchange(y, y.shape, pg, m, m, "flip_sequence")


@torch.library.custom_op("spcompile::flip_sequence", mutates_args=())
def _flip_sequence(x: Tensor, dim: int, group: str) -> Tensor:
    return _mirror(x, dim, group)


@_flip_sequence.register_fake
def _(x, dim, group):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _flip_setup(ctx, inputs, output):
    _, ctx.dim, ctx.group = inputs
    ctx.float = inputs[0].dtype.is_floating_point or inputs[0].dtype.is_complex


def _flip_backward(ctx, grad):
    if not ctx.float:
        return None, None, None
    return _flip_sequence(grad.contiguous(), ctx.dim, ctx.group), None, None


_flip_sequence.register_autograd(_flip_backward, setup_context=_flip_setup)


def flip_sequence(x: Tensor, *, dim: int = 1, group: rt.GroupLike = None) -> Tensor:
    """This rank's shard of the global sequence reversed along ``dim`` (``torch.flip`` of the
    whole sequence): rank r's flipped shard goes to rank P-1-r. Differentiable (the backward
    is the same exchange). With one rank: ``x.flip(dim)``."""
    dim = dim % x.dim()
    name = rt.group_name(group)
    if rt.group_size(name) == 1:
        return x.flip(dim)
    return _flip_sequence(x, dim, name)
