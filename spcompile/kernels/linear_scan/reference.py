"""Chunked linear scan in plain PyTorch: the CPU path and the reference for the Triton kernels.

Within a chunk of ``C`` steps the recurrence is a masked quadratic form; across chunks the state
advances by one matrix product (DESIGN.md §3):

    b      = cumsum(g) inside the chunk                       (log decay from the chunk start)
    O_n    = scale · [ (Q ⊙ e^b) S_{n-1} + ((Q Kᵀ) ⊙ e^{b_i - b_j} ⊙ tril) V ]
    S_n    = e^{b_last} ⊙ S_{n-1} + (K ⊙ e^{b_last - b})ᵀ V

Every exponent is a difference ``b_i - b_j`` with ``j <= i`` (or ``b_last - b``), so with
non-positive log decays nothing overflows. Per-step log decays are clamped at ``LOG_DECAY_FLOOR``
(``exp(-40) ≈ 4e-18``, zero for every practical purpose) so that a decay of exactly 0
(``-inf`` in log space) gives neither ``inf - inf`` nor NaN.

Vector (GLA) decays use chunks of at most ``VECTOR_CHUNK`` steps, because their intra-chunk
form needs a ``[C, C, K]`` tensor of pairwise decays.
Everything runs in fp32 (fp64 when the inputs are fp64); the output is cast back to ``v.dtype``
and the state stays fp32.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

LOG_DECAY_FLOOR = -40.0
VECTOR_CHUNK = 16


def decay_kind(log_decay: Optional[torch.Tensor]) -> str:
    """'none' | 'head' ([H]) | 'scalar' ([B, T, H]) | 'vector' ([B, T, H, K])."""
    if log_decay is None:
        return "none"
    return {1: "head", 3: "scalar", 4: "vector"}[log_decay.dim()]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunks(x: torch.Tensor, N: int, C: int) -> torch.Tensor:
    """[B, T, H, ...] → [B, H, N, C, ...], zero-padded to N·C steps."""
    B, T = x.shape[:2]
    pad = N * C - T
    if pad:
        x = torch.cat([x, x.new_zeros(B, pad, *x.shape[2:])], dim=1)
    x = x.reshape(B, N, C, *x.shape[2:])
    return x.movedim(3, 1)  # B, H, N, C, ...


def chunked_linear_scan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        log_decay: Optional[torch.Tensor], scale: float,
                        initial_state: Optional[torch.Tensor], chunk_size: int = 64
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """q, k: [B, T, H, K]; v: [B, T, H, V]; log_decay: None | [H] | [B, T, H] | [B, T, H, K];
    initial_state: None | [B, H, K, V] → (o [B, T, H, V] in v.dtype, final state fp32/fp64)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    cdt = compute_dtype(q)
    kind = decay_kind(log_decay)
    C = max(1, min(chunk_size, VECTOR_CHUNK) if kind == "vector" else chunk_size)
    C = min(C, max(T, 1))
    N = max(1, math.ceil(T / C))
    qc, kc, vc = (_chunks(x.to(cdt), N, C) for x in (q, k, v))  # [B, H, N, C, K|V]
    S0 = (q.new_zeros(B, H, K, V, dtype=cdt) if initial_state is None
          else initial_state.to(cdt))

    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if kind == "none":
        A = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0)
        q_dec, k_dec, chunk_decay = qc, kc, None
    elif kind in ("head", "scalar"):
        g = log_decay.to(cdt).clamp_min(LOG_DECAY_FLOOR)
        g = g.view(1, 1, H).expand(B, T, H) if kind == "head" else g
        b = _chunks(g, N, C).cumsum(-1)  # [B, H, N, C]
        pair = (b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(~causal, -math.inf).exp()
        A = (qc @ kc.transpose(-1, -2)) * pair
        b_last = b[..., -1:]
        q_dec = qc * b.exp().unsqueeze(-1)
        k_dec = kc * (b_last - b).exp().unsqueeze(-1)
        chunk_decay = b_last.exp().unsqueeze(-1)  # [B, H, N, 1, 1]: scales S [K, V]
    else:
        g = log_decay.to(cdt).clamp_min(LOG_DECAY_FLOOR)
        b = _chunks(g, N, C).cumsum(-2)  # [B, H, N, C, K]
        diff = (b.unsqueeze(-2) - b.unsqueeze(-3))  # [B, H, N, C(i), C(j), K]
        pair = diff.masked_fill(~causal.unsqueeze(-1), -math.inf).exp()
        A = torch.einsum("bhnik,bhnjk,bhnijk->bhnij", qc, kc, pair)
        b_last = b[..., -1:, :]  # [B, H, N, 1, K]
        q_dec = qc * b.exp()
        k_dec = kc * (b_last - b).exp()
        chunk_decay = b_last.exp().transpose(-1, -2)  # [B, H, N, K, 1]

    o_intra = A @ vc  # [B, H, N, C, V]
    U = k_dec.transpose(-1, -2) @ vc  # [B, H, N, K, V]: each chunk's own state contribution
    prev = []
    S = S0
    for n in range(N):
        prev.append(S)
        S = (S if chunk_decay is None else chunk_decay[:, :, n] * S) + U[:, :, n]
    S_prev = torch.stack(prev, dim=2)  # [B, H, N, K, V]
    o = (o_intra + q_dec @ S_prev) * scale
    o = o.movedim(1, 3).reshape(B, N * C, H, V)[:, :T]
    return o.to(v.dtype), S
