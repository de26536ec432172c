"""The oracle: a per-step recurrence, written to be obviously right, not fast.

    S_t = exp(g_t) ⊙ S_{t-1} + k_tᵀ v_t        S: [K, V] per (batch, head)
    o_t = scale · q_t S_t

Tests compare every faster path against this in float64.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def expand_log_decay(log_decay: Optional[torch.Tensor], B: int, T: int, H: int, K: int,
                     like: torch.Tensor) -> torch.Tensor:
    """Any accepted decay spelling → a dense ``[B, T, H, K]`` log decay (zeros for None)."""
    if log_decay is None:
        return like.new_zeros(B, T, H, K)
    if log_decay.dim() == 1:  # [H] fixed per head
        return log_decay.view(1, 1, H, 1).expand(B, T, H, K)
    if log_decay.dim() == 3:  # [B, T, H] scalar per step
        return log_decay.unsqueeze(-1).expand(B, T, H, K)
    return log_decay  # [B, T, H, K]


def naive_linear_scan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      log_decay: Optional[torch.Tensor] = None, *, scale: Optional[float] = None,
                      initial_state: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """q, k: [B, T, H, K]; v: [B, T, H, V] → (o [B, T, H, V], final state [B, H, K, V])."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dt = q.dtype
    g = expand_log_decay(log_decay, B, T, H, K, q).to(dt)
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)
    outs = []
    for t in range(T):
        S = torch.exp(g[:, t]).unsqueeze(-1) * S + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V)
    return o, S
