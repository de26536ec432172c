"""Softmax attention across sequence shards, for the softmax layers of hybrid models.

SDPA layout: q ``[B, Hq, T_local, D]``, k/v ``[B, Hkv, T_local, D|Dv]``, each rank holding the
r-th contiguous shard of the sequence; the result is the r-th shard of full-sequence
``F.scaled_dot_product_attention``.

* ``kv_allgather`` (LASP-2H): all-gather K and V (one collective, packed), then attend with this
  rank's causal offset (query i of rank r sees keys ``j <= r·T_local + i``). Backward:
  reduce-scatter of dK/dV (every rank holds partial sums over its queries).
* ``ring_attention``: K/V blocks travel around the ring (the next transfer is posted before the
  current block is computed); per-block outputs merge by log-sum-exp; with ``causal`` the blocks
  of later ranks are skipped and the own block is masked. Backward: K/V travel the ring again
  with their dK/dV accumulators, which end at their owner after one more hop.
* ``ulysses`` (DeepSpeed): all-to-all sequence ↔ heads, full-sequence SDPA on ``H/P`` heads,
  all-to-all back. Needs ``Hq % P == 0``; K/V heads are replicated when ``Hkv % P != 0`` (GQA).

GQA (``Hkv < Hq``, ``enable_gqa=True``): query head h uses K/V head ``h // (Hq/Hkv)``, as in SDPA.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import runtime as rt
from .reduce import gather_sequence

__all__ = ["sp_attention", "ATTENTION_STRATEGIES"]

ATTENTION_STRATEGIES = ("kv_allgather", "ring_attention", "ulysses")


def _cdt(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _expand_heads(x: Tensor, G: int) -> Tensor:
    return x if G == 1 else x.repeat_interleave(G, dim=1)


def _sum_groups(x: Tensor, G: int) -> Tensor:
    if G == 1:
        return x
    B, Hq, T, D = x.shape
    return x.view(B, Hq // G, G, T, D).sum(2)


def _pack(*xs: Tensor) -> Tensor:
    return torch.cat([x.reshape(-1) for x in xs])


def _unpack(flat: Tensor, *likes: Tensor) -> List[Tensor]:
    out, off = [], 0
    for x in likes:
        out.append(flat[off:off + x.numel()].view(x.shape))
        off += x.numel()
    return out


def _check(pg, what, q, k, v):
    rt.check_uniform(pg, what, {
        **{f"q dim {i}": s for i, s in enumerate(q.shape)},
        **{f"k dim {i}": s for i, s in enumerate(k.shape)},
        **{f"v dim {i}": s for i, s in enumerate(v.shape)},
        "dtype": rt.dtype_code(q.dtype)}, hint=" (shard the sequence evenly across ranks)", like=q)


# --------------------------------------------------------------------------------- ring attention

def _block_scores(qf, kb, scale, G, diag):
    s = (qf @ _expand_heads(kb.to(qf.dtype), G).transpose(-1, -2)) * scale
    if diag:
        T = s.shape[-1]
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=s.device).triu(1), -math.inf)
    return s


@torch.library.custom_op("spcompile::ring_attention", mutates_args=())
def _ring_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, group: str
                    ) -> Tuple[Tensor, Tensor]:
    """→ (o [B, Hq, T, Dv], lse [B, Hq, T] in the compute dtype)."""
    pg = rt.resolve_group(group)
    P, r = pg.size(), pg.rank()
    _check(pg, "sp_attention(ring_attention)", q, k, v)
    G = q.shape[1] // k.shape[1]
    qf = q.to(_cdt(q))
    acc = qf.new_zeros(q.shape[:3] + (v.shape[-1],))
    lse = qf.new_full(q.shape[:3], -math.inf)
    cur = _pack(k, v)
    what = "sp_attention(ring_attention)"
    for s in range(P):
        src = (r - s) % P
        works, nxt = [], None
        if s < P - 1:
            nxt = torch.empty_like(cur)
            works = rt.p2p(pg, what, "ring_attention", sends=[(cur, (r + 1) % P, s)],
                           recvs=[(nxt, (r - 1) % P, s)])
        if not causal or src <= r:
            kb, vb = _unpack(cur, k, v)
            sc = _block_scores(qf, kb, scale, G, causal and src == r)
            blk_lse = sc.logsumexp(-1)
            blk_o = (sc - blk_lse[..., None]).exp() @ _expand_heads(vb.to(qf.dtype), G)
            new = torch.logaddexp(lse, blk_lse)
            acc = acc * (lse - new).exp()[..., None] + blk_o * (blk_lse - new).exp()[..., None]
            lse = new
        rt.wait_all(works, what, pg)
        if nxt is not None:
            cur = nxt
    return acc.to(q.dtype), lse


@_ring_attention.register_fake
def _(q, k, v, causal, scale, group):
    return (q.new_empty(q.shape[:3] + (v.shape[-1],)),
            q.new_empty(q.shape[:3], dtype=_cdt(q)))


@torch.library.custom_op("spcompile::ring_attention_bwd", mutates_args=())
def _ring_attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                        causal: bool, scale: float, group: str) -> Tuple[Tensor, Tensor, Tensor]:
    pg = rt.resolve_group(group)
    P, r = pg.size(), pg.rank()
    G = q.shape[1] // k.shape[1]
    cdt = _cdt(q)
    qf, dof = q.to(cdt), do.to(cdt)
    delta = (dof * o.to(cdt)).sum(-1, keepdim=True)
    dq = torch.zeros_like(qf)
    dk_acc = torch.zeros(k.shape, dtype=cdt, device=k.device)
    dv_acc = torch.zeros(v.shape, dtype=cdt, device=v.device)
    cur = _pack(k, v)
    what = "sp_attention(ring_attention) backward"
    for s in range(P):
        src = (r - s) % P
        kv_works, nxt = [], None
        if s < P - 1:
            nxt = torch.empty_like(cur)
            kv_works = rt.p2p(pg, what, "ring_attention", sends=[(cur, (r + 1) % P, 2 * s)],
                              recvs=[(nxt, (r - 1) % P, 2 * s)])
        if not causal or src <= r:
            kb, vb = _unpack(cur, k, v)
            kk, vv = _expand_heads(kb.to(cdt), G), _expand_heads(vb.to(cdt), G)
            p = (_block_scores(qf, kb, scale, G, causal and src == r) - lse[..., None]).exp()
            dv_acc = dv_acc + _sum_groups(p.transpose(-1, -2) @ dof, G)
            ds = p * (dof @ vv.transpose(-1, -2) - delta)
            dq = dq + (ds @ kk) * scale
            dk_acc = dk_acc + _sum_groups(ds.transpose(-1, -2) @ qf, G) * scale
        # this block's accumulators travel with it; after the last hop they are back home
        grads = _pack(dk_acc, dv_acc)
        got = torch.empty_like(grads)
        works = rt.p2p(pg, what, "ring_attention", sends=[(grads, (r + 1) % P, 2 * s + 1)],
                       recvs=[(got, (r - 1) % P, 2 * s + 1)])
        rt.wait_all(kv_works + works, what, pg)
        dk_acc, dv_acc = _unpack(got, dk_acc, dv_acc)
        if nxt is not None:
            cur = nxt
    return dq.to(q.dtype), dk_acc.to(k.dtype, copy=True), dv_acc.to(v.dtype, copy=True)


@_ring_attention_bwd.register_fake
def _(do, q, k, v, o, lse, causal, scale, group):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _ring_setup(ctx, inputs, output):
    q, k, v, causal, scale, group = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.args = (causal, scale, group)


def _ring_backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = _ring_attention_bwd(do.contiguous(), q, k, v, o, lse, *ctx.args)
    return dq, dk, dv, None, None, None


_ring_attention.register_autograd(_ring_backward, setup_context=_ring_setup)


# ---------------------------------------------------------------------------------------- ulysses

def _seq_to_heads_impl(x: Tensor, pg, what: str) -> Tensor:
    P = pg.size()
    B, H, Tl, D = x.shape
    y = x.reshape(B, P, H // P, Tl, D).movedim(1, 0)  # [P, B, H/P, Tl, D]: head group p → rank p
    z = rt.all_to_all(y, pg, what, "ulysses")          # z[p]: rank p's time shard of my heads
    return z.movedim(0, 2).reshape(B, H // P, P * Tl, D)


def _heads_to_seq_impl(x: Tensor, pg, what: str) -> Tensor:
    P = pg.size()
    B, Hp, T, D = x.shape
    y = x.reshape(B, Hp, P, T // P, D).movedim(2, 0)  # [P, B, H/P, Tl, D]: time shard p → rank p
    z = rt.all_to_all(y, pg, what, "ulysses")          # z[p]: head group p of my time shard
    return z.movedim(0, 1).reshape(B, P * Hp, T // P, D)


@torch.library.custom_op("spcompile::seq_to_heads", mutates_args=())
def _seq_to_heads(x: Tensor, group: str) -> Tensor:
    """[B, H, T/P, D] (sequence shard) → [B, H/P, T, D] (head shard)."""
    pg = rt.resolve_group(group)
    rt.check_uniform(pg, "sp_attention(ulysses)", {
        **{f"dim {i}": s for i, s in enumerate(x.shape)}, "dtype": rt.dtype_code(x.dtype)},
        hint=" (shard the sequence evenly across ranks)", like=x)
    return _seq_to_heads_impl(x, pg, "sp_attention(ulysses) all_to_all")


@_seq_to_heads.register_fake
def _(x, group):
    P = rt.group_size(group)
    B, H, Tl, D = x.shape
    return x.new_empty(B, H // P, Tl * P, D)


@torch.library.custom_op("spcompile::heads_to_seq", mutates_args=())
def _heads_to_seq(x: Tensor, group: str) -> Tensor:
    """[B, H/P, T, D] (head shard) → [B, H, T/P, D] (sequence shard)."""
    return _heads_to_seq_impl(x, rt.resolve_group(group), "sp_attention(ulysses) all_to_all")


@_heads_to_seq.register_fake
def _(x, group):
    P = rt.group_size(group)
    B, Hp, T, D = x.shape
    return x.new_empty(B, Hp * P, T // P, D)


def _a2a_setup(ctx, inputs, output):
    ctx.group = inputs[1]


_seq_to_heads.register_autograd(lambda ctx, g: (_heads_to_seq(g.contiguous(), ctx.group), None),
                                setup_context=_a2a_setup)
_heads_to_seq.register_autograd(lambda ctx, g: (_seq_to_heads(g.contiguous(), ctx.group), None),
                                setup_context=_a2a_setup)


def _ulysses(q, k, v, causal, scale, name, P, enable_gqa):
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hq % P:
        raise ValueError(f"sp_attention(ulysses): {Hq} query heads are not divisible by the group "
                         f"size {P}; use strategy='kv_allgather' or 'ring_attention', or a group "
                         f"size that divides the number of heads")
    if Hkv % P:
        # replicate K/V heads by the smallest factor f (dividing Hq/Hkv) with Hkv·f % P == 0
        G = Hq // Hkv
        f = next((f for f in range(1, G + 1) if G % f == 0 and (Hkv * f) % P == 0), None)
        if f is None:
            raise ValueError(f"sp_attention(ulysses): {Hkv} K/V heads cannot be split over {P} "
                             f"ranks even after replicating them up to {Hq}; use "
                             f"strategy='kv_allgather' or 'ring_attention'")
        k, v = _expand_heads(k, f), _expand_heads(v, f)
    qh, kh, vh = (_seq_to_heads(x, name) for x in (q, k, v))
    oh = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale,
                                        enable_gqa=kh.shape[1] != qh.shape[1])
    return _heads_to_seq(oh, name)


# -------------------------------------------------------------------------------------- public API

def _kv_allgather(q, k, v, causal, scale, name, P, enable_gqa):
    if k.shape == v.shape:  # one collective for both
        kv = gather_sequence(torch.cat([k, v], dim=-1), dim=2, group=name,
                             grad="reduce_scatter", label="kv_allgather")
        kf, vf = kv.split(k.shape[-1], dim=-1)
    else:
        kf = gather_sequence(k, dim=2, group=name, grad="reduce_scatter", label="kv_allgather")
        vf = gather_sequence(v, dim=2, group=name, grad="reduce_scatter", label="kv_allgather")
    mask = None
    if causal:
        Tl, T = q.shape[2], kf.shape[2]
        q_pos = rt.group_rank(name) * Tl + torch.arange(Tl, device=q.device)
        mask = torch.arange(T, device=q.device)[None, :] <= q_pos[:, None]
    return F.scaled_dot_product_attention(q, kf, vf, attn_mask=mask, scale=scale,
                                          enable_gqa=enable_gqa)


def sp_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: Optional[float] = None,
                 strategy: str = "kv_allgather", group: rt.GroupLike = None,
                 enable_gqa: bool = False) -> Tensor:
    """This rank's shard of ``F.scaled_dot_product_attention`` over the full sequence.

    Args:
        q: ``[B, Hq, T_local, D]``; k: ``[B, Hkv, T_local, D]``; v: ``[B, Hkv, T_local, Dv]``
            (sequence dim -2, contiguous shards in rank order).
        causal: causal mask over *global* positions.
        scale: default ``D ** -0.5``.
        strategy: "kv_allgather" | "ring_attention" | "ulysses".
        group: ProcessGroup, its name, or None (P = 1: plain SDPA).
        enable_gqa: allow ``Hkv < Hq`` (``Hq % Hkv == 0``), as in SDPA.
    Returns:
        ``[B, Hq, T_local, Dv]``; differentiable in q, k, v.
    """
    if strategy not in ATTENTION_STRATEGIES:
        raise ValueError(f"sp_attention: unknown strategy {strategy!r}; choose one of "
                         f"{ATTENTION_STRATEGIES}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"sp_attention: q, k, v must be [B, H, T_local, D]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"sp_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    Hq, Hkv = q.shape[1], k.shape[1]
    if k.shape[:3] != v.shape[:3] or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"sp_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v "
                         f"{tuple(v.shape)} must share B and T_local, and k/v their heads")
    if Hkv != Hq and not (enable_gqa and Hq % Hkv == 0):
        raise ValueError(f"sp_attention: {Hq} query heads vs {Hkv} K/V heads: pass "
                         f"enable_gqa=True with Hq divisible by Hkv")
    name = rt.group_name(group)
    P = rt.group_size(name)
    if P == 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                              enable_gqa=enable_gqa)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if strategy == "kv_allgather":
        return _kv_allgather(q, k, v, causal, scale, name, P, enable_gqa)
    if strategy == "ring_attention":
        return _ring_attention(q, k, v, bool(causal), scale, name)[0]
    return _ulysses(q, k, v, causal, scale, name, P, enable_gqa)
