"""``sp_linear_scan``: the sequence-parallel linear scan that the rewrite inserts (DESIGN.md §3).

Each rank holds a contiguous shard of the sequence. A shard is affine in its incoming state:

    S_loc   = Σ_t e^{Σ_{i>t} g_i} ⊙ k_tᵀ v_t            (final state from zero; one matmul)
    S_in    = exclusive_state_scan(S_loc, a)            (a = the shard's total log decay)
    o       = o_loc + scale · (q ⊙ e^{cumsum g}) S_in   (o_loc: linear_scan from zero)
    S_final = e^a ⊙ S_in + S_loc

``S_loc`` is computed first by a cheap contraction, so the hand-off starts *before* the local
scan: the custom op ``spcompile::sp_scan_overlap`` launches the hand-off (async all_gather, or the
allscan/ring chain on a helper thread), runs ``spcompile::linear_scan`` meanwhile, then waits. Its
backward does the same with the reverse scan and ``spcompile::linear_scan_bwd``. The remaining
pieces (S_loc, the correction, S_final) are ordinary differentiable torch ops, so autograd and
AOTAutograd derive their gradients. Rank 0 folds the global ``initial_state`` into its local scan;
the other ranks ignore it (its gradient is rank 0's, a partial sum like any parameter's).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..kernels.linear_scan import (check_linear_scan, cumulative_log_decay, decay_kind,
                                   linear_scan, total_log_decay)
from ..kernels.linear_scan.reference import LOG_DECAY_FLOOR, compute_dtype
from . import runtime as rt
from .state_scan import DEFAULT_BLOCKS, STRATEGIES, apply_decay, decay_grad, start_scan

__all__ = ["sp_linear_scan", "local_final_state"]


def _suffix_log_decay(log_decay: Optional[Tensor], B: int, T: int) -> Optional[Tensor]:
    """``Σ_{i>t} g_i`` per step: None | [T, H] (head) | [B, T, H] | [B, T, H, K]."""
    kind = decay_kind(log_decay)
    if kind == "none":
        return None
    g = log_decay.clamp_min(LOG_DECAY_FLOOR)
    if kind == "head":
        steps = torch.arange(T - 1, -1, -1, device=g.device, dtype=g.dtype)
        return steps.view(T, 1) * g.view(1, -1)
    incl = g.flip(1).cumsum(1).flip(1)  # Σ_{i>=t}
    return torch.cat([incl[:, 1:], torch.zeros_like(incl[:, :1])], dim=1)


def local_final_state(k: Tensor, v: Tensor, log_decay: Optional[Tensor] = None,
                      initial_state: Optional[Tensor] = None) -> Tensor:
    """Final state of the shard ``[B, H, K, V]`` (fp32/fp64) without computing the outputs."""
    B, T, H, K = k.shape
    cdt = compute_dtype(k)
    kk, vv = k.to(cdt), v.to(cdt)
    w = _suffix_log_decay(log_decay, B, T)
    if w is not None:
        w = w.to(cdt).exp()
        kk = kk * (w.unsqueeze(-1) if w.dim() in (2, 3) else w)
    S = torch.einsum("bthk,bthv->bhkv", kk, vv)
    if initial_state is not None:
        S = S + apply_decay(initial_state.to(cdt), total_log_decay(log_decay, B, T))
    return S


# --------------------------------------------------------------------------- the overlapping op

def _lin_scan_op():
    return torch.ops.spcompile.linear_scan.default


def _lin_scan_bwd_op():
    return torch.ops.spcompile.linear_scan_bwd.default


@torch.library.custom_op("spcompile::sp_scan_overlap", mutates_args=())
def _sp_scan_overlap(q: Tensor, k: Tensor, v: Tensor, log_decay: Optional[Tensor],
                     initial_state: Optional[Tensor], state: Tensor, total_decay: Optional[Tensor],
                     scale: float, chunk_size: int, group: str, strategy: str, blocks: int
                     ) -> Tuple[Tensor, Tensor]:
    """→ (o_loc: local scan from zero [or initial_state], S_in: the exclusive state scan)."""
    pg = rt.resolve_group(group)
    B, T, H, K = q.shape
    rt.check_uniform(pg, "sp_linear_scan", {
        "batch B": B, "local length T": T, "heads H": H, "key dim K": K, "value dim V": v.shape[-1],
        "dtype": rt.dtype_code(q.dtype),
        "log_decay kind": ["none", "head", "scalar", "vector"].index(decay_kind(log_decay))},
        hint=" (shard the sequence evenly: its length must be divisible by the group size)",
        like=q)
    pending = start_scan(state.contiguous(), total_decay, pg, strategy, blocks,
                         what="sp_linear_scan state hand-off")
    o_loc, _ = _lin_scan_op()(q, k, v, log_decay, initial_state, scale, chunk_size)
    return o_loc, pending.result()


@_sp_scan_overlap.register_fake
def _(q, k, v, log_decay, initial_state, state, total_decay, scale, chunk_size, group, strategy,
      blocks):
    B, T, H, K = q.shape
    return q.new_empty(B, T, H, v.shape[-1], dtype=v.dtype), torch.empty_like(state)


@torch.library.custom_op("spcompile::sp_scan_overlap_bwd", mutates_args=())
def _sp_scan_overlap_bwd(q: Tensor, k: Tensor, v: Tensor, log_decay: Optional[Tensor],
                         initial_state: Optional[Tensor], incoming: Tensor,
                         total_decay: Optional[Tensor], do: Tensor, dincoming: Tensor,
                         scale: float, chunk_size: int, group: str, strategy: str, blocks: int
                         ) -> List[Tensor]:
    """→ [dq, dk, dv, dlog_decay, dinitial_state, dstate, dtotal_decay] (empty when absent)."""
    pg = rt.resolve_group(group)
    pending = start_scan(dincoming.contiguous(), total_decay, pg, strategy, blocks, reverse=True,
                         what="sp_linear_scan backward state hand-off")
    B, T, H, K = q.shape
    dS0 = torch.zeros(B, H, K, v.shape[-1], dtype=compute_dtype(q), device=q.device)
    dq, dk, dv, dg, dinit = _lin_scan_bwd_op()(q, k, v, log_decay, initial_state, do, dS0, scale,
                                               chunk_size)
    D = pending.result()
    da = decay_grad(D, total_decay, incoming)
    empty = q.new_empty(0)
    return [dq, dk, dv, dg, dinit, D, empty if da is None else da.contiguous()]


@_sp_scan_overlap_bwd.register_fake
def _(q, k, v, log_decay, initial_state, incoming, total_decay, do, dincoming, scale, chunk_size,
      group, strategy, blocks):
    def like(x):
        return q.new_empty(0) if x is None else torch.empty_like(x)
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), like(log_decay),
            like(initial_state), torch.empty_like(incoming), like(total_decay)]


def _setup(ctx, inputs, output):
    (q, k, v, log_decay, initial_state, state, total_decay, scale, chunk_size, group, strategy,
     blocks) = inputs
    ctx.save_for_backward(q, k, v, log_decay, initial_state, output[1], total_decay)
    ctx.args = (scale, chunk_size, group, strategy, blocks)
    ctx.present = (log_decay is not None, initial_state is not None, total_decay is not None)


def _backward(ctx, do, dincoming):
    q, k, v, log_decay, initial_state, incoming, total_decay = ctx.saved_tensors
    if do is None:
        do = q.new_zeros(q.shape[:3] + (v.shape[-1],), dtype=v.dtype)
    if dincoming is None:
        dincoming = torch.zeros_like(incoming)
    dq, dk, dv, dg, dinit, dS, da = _sp_scan_overlap_bwd(
        q, k, v, log_decay, initial_state, incoming, total_decay, do.contiguous(),
        dincoming.contiguous(), *ctx.args)
    has_g, has_init, has_a = ctx.present
    return (dq, dk, dv, dg if has_g else None, dinit if has_init else None, dS,
            da if has_a else None, None, None, None, None, None)


_sp_scan_overlap.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------ public API

def sp_linear_scan(q: Tensor, k: Tensor, v: Tensor, log_decay: Optional[Tensor] = None, *,
                   scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
                   output_final_state: bool = False, chunk_size: int = 64,
                   strategy: str = "allgather", group: rt.GroupLike = None,
                   blocks: Optional[int] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """Sequence-parallel ``linear_scan``: this rank's shard of the scan over the full sequence.

    Args:
        q, k: ``[B, T_local, H, K]``; v: ``[B, T_local, H, V]``: this rank's contiguous shard.
        log_decay: None | ``[H]`` | ``[B, T_local, H]`` | ``[B, T_local, H, K]`` (shard of it).
        scale, chunk_size: as ``spcompile.kernels.linear_scan``.
        initial_state: ``[B, H, K, V]``, the state before the *global* first token (used by rank 0).
        output_final_state: also return the state after this shard's last token.
        strategy: "allgather" | "allscan" | "ring" (see ``exclusive_state_scan``).
        group: ProcessGroup, its name, or None (P = 1: exactly ``linear_scan``).
        blocks: K-blocks of the "allscan" pipeline.
    Returns:
        ``(o [B, T_local, H, V], S [B, H, K, V] fp32 or None)``, differentiable in all inputs.
    """
    name = rt.group_name(group)
    P = rt.group_size(name)
    if P == 1:
        return linear_scan(q, k, v, log_decay, scale=scale, initial_state=initial_state,
                           output_final_state=output_final_state, chunk_size=chunk_size)
    if strategy not in STRATEGIES:
        raise ValueError(f"sp_linear_scan: unknown strategy {strategy!r}; choose one of "
                         f"{STRATEGIES}")
    chk = check_linear_scan(q, k, v, log_decay, initial_state, chunk_size)
    if not chk:
        raise ValueError(f"spcompile.sp_linear_scan: {chk.reason}")
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else float(scale)
    nb = DEFAULT_BLOCKS if blocks is None else int(blocks)
    init = initial_state if rt.group_rank(name) == 0 else None
    a = total_log_decay(log_decay, B, T)
    if a is not None:
        a = a.to(compute_dtype(q))
    S_loc = local_final_state(k, v, log_decay, init)
    o_loc, S_in = _sp_scan_overlap(q, k, v, log_decay, init, S_loc, a, scale, int(chunk_size),
                                   name, strategy, nb)
    cum = cumulative_log_decay(log_decay, B, T)
    qd = q.to(S_in.dtype)
    if cum is not None:
        e = cum.to(S_in.dtype).exp()
        qd = qd * (e.unsqueeze(-1) if e.dim() == 3 else e)
    o = (o_loc.to(S_in.dtype) + scale * torch.einsum("bthk,bhkv->bthv", qd, S_in)).to(v.dtype)
    if not output_final_state:
        return o, None
    return o, apply_decay(S_in, a) + S_loc
