"""``spcompile::linear_scan``: the one custom op every scan rewrite targets.

Dispatch: CUDA tensors → the Triton kernels (when Triton imports), everything else → the chunked
PyTorch reference. ``SPCOMPILE_KERNEL=reference`` forces the reference (debugging), ``=triton``
forces Triton (with ``TRITON_INTERPRET=1`` this runs the kernels on CPU).

The backward is a custom op too (``spcompile::linear_scan_bwd``), so AOTAutograd and Inductor see
both directions as opaque calls; the reference backward is hand-written
(``reference.chunked_linear_scan_bwd``: chunked, one sequential [K, V] recurrence per direction).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .reference import chunked_linear_scan, chunked_linear_scan_bwd, decay_kind

_KERNEL_ENV = "SPCOMPILE_KERNEL"


@dataclass(frozen=True)
class Check:
    """Answer of a checker: ``ok`` and, when not, ``reason`` says why (shared by the passes/CLI)."""
    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


def check_linear_scan(q: Tensor, k: Tensor, v: Tensor, log_decay: Optional[Tensor] = None,
                      initial_state: Optional[Tensor] = None, chunk_size: int = 64) -> Check:
    """Can ``linear_scan`` take these inputs? Works on real, fake and meta tensors."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return Check(False, f"q, k, v must be [B, T, H, D]; got {tuple(q.shape)}, "
                            f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, K = q.shape
    if tuple(k.shape) != (B, T, H, K):
        return Check(False, f"k {tuple(k.shape)} must have q's shape {tuple(q.shape)}")
    if tuple(v.shape[:3]) != (B, T, H):
        return Check(False, f"v {tuple(v.shape)} must be [B, T, H, V] with q's B, T, H")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        return Check(False, f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, "
                            f"{v.dtype}")
    if not (q.device == k.device == v.device):
        return Check(False, "q, k, v must be on one device")
    if log_decay is not None:
        allowed = {1: (H,), 3: (B, T, H), 4: (B, T, H, K)}
        want = allowed.get(log_decay.dim())
        if want is None or tuple(log_decay.shape) != want:
            return Check(False, f"log_decay {tuple(log_decay.shape)} must be [H]={H,}, "
                                f"[B, T, H]={(B, T, H)} or [B, T, H, K]={(B, T, H, K)}")
        if not log_decay.dtype.is_floating_point:
            return Check(False, "log_decay must be floating point")
    if initial_state is not None and tuple(initial_state.shape) != (B, H, K, v.shape[-1]):
        return Check(False, f"initial_state {tuple(initial_state.shape)} must be [B, H, K, V]="
                            f"{(B, H, K, v.shape[-1])}")
    if chunk_size < 1:
        return Check(False, f"chunk_size must be positive, got {chunk_size}")
    return Check(True)


def kernel_for(x: Tensor) -> str:
    """'triton' or 'reference' for inputs like ``x`` (honours SPCOMPILE_KERNEL)."""
    forced = os.environ.get(_KERNEL_ENV, "auto").lower()
    if forced in ("reference", "torch"):
        return "reference"
    if forced == "triton" or x.is_cuda:
        try:
            from . import triton_impl
        except ImportError:
            if forced == "triton":
                raise
            return "reference"
        if forced == "triton" or triton_impl.available(x):
            return "triton"
    return "reference"


def _state_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("spcompile::linear_scan", mutates_args=())
def _linear_scan(q: Tensor, k: Tensor, v: Tensor, log_decay: Optional[Tensor],
                 initial_state: Optional[Tensor], scale: float, chunk_size: int
                 ) -> Tuple[Tensor, Tensor]:
    if kernel_for(q) == "triton":
        from .triton_impl import linear_scan_fwd
        o, s = linear_scan_fwd(q, k, v, log_decay, scale, initial_state, chunk_size)
    else:
        o, s = chunked_linear_scan(q, k, v, log_decay, scale, initial_state, chunk_size)
    return o.contiguous(), s.contiguous()


@_linear_scan.register_fake
def _(q, k, v, log_decay, initial_state, scale, chunk_size):
    B, T, H, K = q.shape
    V = v.shape[-1]
    return (q.new_empty(B, T, H, V, dtype=v.dtype), q.new_empty(B, H, K, V, dtype=_state_dtype(q)))


@torch.library.custom_op("spcompile::linear_scan_bwd", mutates_args=())
def _linear_scan_bwd(q: Tensor, k: Tensor, v: Tensor, log_decay: Optional[Tensor],
                     initial_state: Optional[Tensor], do: Tensor, dS: Tensor, scale: float,
                     chunk_size: int) -> List[Tensor]:
    """→ [dq, dk, dv, dlog_decay, dinitial_state]; absent inputs get an empty tensor."""
    if kernel_for(q) == "triton":
        from .triton_impl import linear_scan_bwd
        grads = linear_scan_bwd(q, k, v, log_decay, scale, initial_state, chunk_size, do, dS)
    else:
        grads = chunked_linear_scan_bwd(q, k, v, log_decay, scale, initial_state, chunk_size,
                                        do, dS)
    return [q.new_empty(0) if g is None else g.contiguous() for g in grads]


@_linear_scan_bwd.register_fake
def _(q, k, v, log_decay, initial_state, do, dS, scale, chunk_size):
    like = [q, k, v, log_decay, initial_state]
    return [q.new_empty(0) if x is None else x.new_empty(x.shape) for x in like]


def _setup_context(ctx, inputs, output):
    q, k, v, log_decay, initial_state, scale, chunk_size = inputs
    ctx.save_for_backward(q, k, v, log_decay, initial_state)
    ctx.scale, ctx.chunk_size = scale, chunk_size


def _backward(ctx, do, dS):
    q, k, v, log_decay, initial_state = ctx.saved_tensors
    B, T, H, K = q.shape
    if do is None:
        do = torch.zeros(B, T, H, v.shape[-1], dtype=v.dtype, device=v.device)
    if dS is None:
        dS = torch.zeros(B, H, K, v.shape[-1], dtype=_state_dtype(q), device=q.device)
    dq, dk, dv, dg, ds0 = _linear_scan_bwd(q, k, v, log_decay, initial_state, do.contiguous(),
                                           dS.contiguous(), ctx.scale, ctx.chunk_size)
    return (dq, dk, dv, dg if log_decay is not None else None,
            ds0 if initial_state is not None else None, None, None)


_linear_scan.register_autograd(_backward, setup_context=_setup_context)


def linear_scan(q: Tensor, k: Tensor, v: Tensor, log_decay: Optional[Tensor] = None, *,
                scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
                output_final_state: bool = False, chunk_size: int = 64
                ) -> Tuple[Tensor, Optional[Tensor]]:
    """Gated linear recurrence, chunked.

    ``S_t = exp(log_decay_t) ⊙ S_{t-1} + k_tᵀ v_t``, ``o_t = scale · q_t S_t``, ``S_0 =
    initial_state`` (zeros when None).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (one floating dtype).
        log_decay: None (plain linear attention) | ``[H]`` (fixed per head: RetNet, lightning)
            | ``[B, T, H]`` (data-dependent scalar: simple GLA, Mamba2 SSD)
            | ``[B, T, H, K]`` (GLA vector gating). Log space, normally ``<= 0``.
        scale: multiplies the output; default ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` (any float dtype; used in fp32).
        output_final_state: also return ``S_T``.
        chunk_size: steps per chunk of the chunked algorithm.
    Returns:
        ``(o [B, T, H, V] in v.dtype, S_T [B, H, K, V] fp32 or None)``. Gradients flow to q, k,
        v, log_decay, initial_state, and from both outputs.
    """
    chk = check_linear_scan(q, k, v, log_decay, initial_state, chunk_size)
    if not chk:
        raise ValueError(f"spcompile.linear_scan: {chk.reason}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    o, s = _linear_scan(q, k, v, log_decay, initial_state, scale, int(chunk_size))
    return o, (s if output_final_state else None)


def total_log_decay(log_decay: Optional[Tensor], B: int, T: int) -> Optional[Tensor]:
    """A shard's total log decay for the state hand-off: None | [B, H] | [B, H, K]."""
    kind = decay_kind(log_decay)
    if kind == "none":
        return None
    from .reference import LOG_DECAY_FLOOR
    g = log_decay.clamp_min(LOG_DECAY_FLOOR)
    if kind == "head":
        return (g * T).unsqueeze(0).expand(B, -1)
    return g.sum(dim=1)


def cumulative_log_decay(log_decay: Optional[Tensor], B: int, T: int) -> Optional[Tensor]:
    """Inclusive cumsum of the log decay over the sequence: None | [B, T, H] | [B, T, H, K]."""
    kind = decay_kind(log_decay)
    if kind == "none":
        return None
    from .reference import LOG_DECAY_FLOOR
    g = log_decay.clamp_min(LOG_DECAY_FLOOR)
    if kind == "head":
        steps = torch.arange(1, T + 1, device=g.device, dtype=g.dtype)
        return (steps.view(1, T, 1) * g.view(1, 1, -1)).expand(B, T, g.shape[0])
    return g.cumsum(dim=1)
