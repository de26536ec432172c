"""Launchers for the Triton linear-scan kernels (``triton_kernels.py``); called by ``op.py``.

Forward (launches): [chunk cumsum of the decay] → inter-chunk states ``h`` (+ final state)
→ [vector decay: intra-chunk ``A`` by sub-chunks] → outputs.
Backward: recompute ``h`` (and ``A``) → reverse state-gradient recurrence ``dh`` (+ d initial
state) → [vector decay: ``dA``, intra parts of dq/dk] → dv → dq, dk and the decay gradient.

Block sizes: chunk ``BT`` = 64 (the requested chunk size rounded down to a power of two in
[16, 64]; the result does not depend on it), sub-chunk ``BC`` = 16 for vector decays, ``BK`` /
``BV`` tiles of at most 64. Any K, V >= 1 work (tiles are masked); K, V in {16..128} are the
tuned range. ``SPCOMPILE_TRITON_STATE_BV`` overrides the V tile of the two sequential state
kernels (a tuning knob for benchmarks).
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor

try:
    import triton
    from . import triton_kernels as _k
    _IMPORT_ERROR: Optional[BaseException] = None
except Exception as e:  # pragma: no cover - depends on the install
    triton = None
    _k = None
    _IMPORT_ERROR = e

from .reference import LOG_DECAY_FLOOR, decay_kind

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BC = 16


def available(x: Tensor) -> bool:
    """True when the Triton kernels can run on tensors like ``x`` (CUDA, Triton, dtype)."""
    if _k is None or x.dtype not in _DTYPES:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return x.is_cuda


def _require() -> None:
    if _k is None:
        raise ImportError(f"spcompile: the Triton linear-scan kernels need triton "
                          f"({_IMPORT_ERROR}); set SPCOMPILE_KERNEL=reference to use the "
                          f"PyTorch path")


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _tile(d: int, cap: int = 64) -> int:
    return max(16, min(cap, triton.next_power_of_2(d)))


class _Cfg:
    """Shapes and block sizes shared by the forward and backward launchers."""

    def __init__(self, q: Tensor, v: Tensor, log_decay: Optional[Tensor], chunk_size: int):
        self.B, self.T, self.H, self.K = q.shape
        self.V = v.shape[-1]
        self.kind = decay_kind(log_decay)
        self.BT = max(16, min(64, _pow2_floor(chunk_size)))
        self.NT = triton.cdiv(self.T, self.BT)
        self.BK = _tile(self.K)
        self.BV = _tile(self.V)
        self.NK = triton.cdiv(self.K, self.BK)
        self.NV = triton.cdiv(self.V, self.BV)
        env_bv = os.environ.get("SPCOMPILE_TRITON_STATE_BV")
        self.BVS = _tile(self.V, int(env_bv)) if env_bv else self.BV
        self.NVS = triton.cdiv(self.V, self.BVS)
        self.NC = self.BT // _BC
        self.USE_G = self.kind in ("head", "scalar")
        self.USE_GK = self.kind == "vector"
        self.PREC = "ieee" if q.dtype == torch.float32 else "tf32"


def _contig(*xs):
    return [None if x is None else x.contiguous() for x in xs]


def _cumsum(c: _Cfg, log_decay: Optional[Tensor]) -> Optional[Tensor]:
    """Chunk-local cumulative (clamped) log decay, fp32: [B, T, H] or [B, T, H, K]; None."""
    if c.kind == "none":
        return None
    S = c.K if c.kind == "vector" else 1
    gc = torch.empty(c.B, c.T, c.H, S, device=log_decay.device, dtype=torch.float32)
    BS = min(64, triton.next_power_of_2(S)) if S > 1 else 16
    grid = (triton.cdiv(S, BS), c.NT, c.B * c.H)
    _k.chunk_cumsum_kernel[grid](log_decay, gc, c.T, c.H, S, c.BT, BS, c.kind == "head",
                                 LOG_DECAY_FLOOR)
    return gc if c.kind == "vector" else gc.squeeze(-1)


def _states(c: _Cfg, k: Tensor, v: Tensor, gc: Optional[Tensor], h0: Optional[Tensor],
            store_final: bool) -> Tuple[Tensor, Optional[Tensor]]:
    h = k.new_empty(c.B, c.NT, c.H, c.K, c.V)
    ht = k.new_empty(c.B, c.H, c.K, c.V, dtype=torch.float32) if store_final else None
    grid = (c.NK, c.NVS, c.B * c.H)
    _k.fwd_state_kernel[grid](k, v, gc, h, h0, ht, c.T, c.NT, c.H, c.K, c.V, c.BT, c.BK, c.BVS,
                              c.USE_G, c.USE_GK, h0 is not None, store_final, c.PREC,
                              num_warps=4, num_stages=2)
    return h, ht


def _intra_A(c: _Cfg, q: Tensor, k: Tensor, gc: Tensor) -> Tensor:
    A = q.new_empty(c.B, c.T, c.H, c.BT, dtype=torch.float32)
    grid = (c.NT, c.NC, c.B * c.H)
    _k.fwd_intra_A_kernel[grid](q, k, gc, A, c.T, c.H, c.K, c.BT, _BC, min(c.BK, 64), c.NC,
                                c.PREC, num_warps=2)
    return A


def linear_scan_fwd(q: Tensor, k: Tensor, v: Tensor, log_decay: Optional[Tensor], scale: float,
                    initial_state: Optional[Tensor], chunk_size: int = 64
                    ) -> Tuple[Tensor, Tensor]:
    """→ (o [B, T, H, V] in v.dtype, final state [B, H, K, V] fp32)."""
    _require()
    q, k, v, log_decay, initial_state = _contig(q, k, v, log_decay, initial_state)
    c = _Cfg(q, v, log_decay, chunk_size)
    if c.T == 0:
        S = (torch.zeros(c.B, c.H, c.K, c.V, device=q.device, dtype=torch.float32)
             if initial_state is None else initial_state.float().clone())
        return v.new_empty(c.B, 0, c.H, c.V), S
    gc = _cumsum(c, log_decay)
    h, ht = _states(c, k, v, gc, initial_state, True)
    A = _intra_A(c, q, k, gc) if c.USE_GK else None
    o = torch.empty_like(v)
    grid = (c.NV, c.NT, c.B * c.H)
    _k.fwd_o_kernel[grid](q, k, v, h, gc, A, o, scale, c.T, c.NT, c.H, c.K, c.V, c.BT, c.BK,
                          c.BV, c.USE_G, c.USE_GK, c.PREC, num_warps=4, num_stages=2)
    return o, ht


def linear_scan_bwd(q: Tensor, k: Tensor, v: Tensor, log_decay: Optional[Tensor], scale: float,
                    initial_state: Optional[Tensor], chunk_size: int, do: Tensor, dS: Tensor
                    ) -> List[Optional[Tensor]]:
    """→ [dq, dk, dv, dlog_decay | None, dinitial_state | None] in the inputs' dtypes/shapes."""
    _require()
    q, k, v, log_decay, initial_state, do, dS = _contig(q, k, v, log_decay, initial_state, do, dS)
    c = _Cfg(q, v, log_decay, chunk_size)
    if c.T == 0:
        dg = None if log_decay is None else torch.zeros_like(log_decay)
        ds0 = None if initial_state is None else dS.to(initial_state.dtype).clone()
        return [torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dg, ds0]
    B, T, H, K, V, NT = c.B, c.T, c.H, c.K, c.V, c.NT
    gc = _cumsum(c, log_decay)
    h, _ = _states(c, k, v, gc, initial_state, False)

    dh = q.new_empty(B, NT, H, K, V)
    dh0 = (torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
           if initial_state is not None else None)
    _k.bwd_dstate_kernel[(c.NK, c.NVS, B * H)](
        q, do, gc, dS, dh, dh0, scale, T, NT, H, K, V, c.BT, c.BK, c.BVS, c.USE_G, c.USE_GK,
        dh0 is not None, c.PREC, num_warps=4, num_stages=2)

    A = dqi = dki = None
    if c.USE_GK:
        A = _intra_A(c, q, k, gc)
        dA = q.new_empty(B, T, H, c.BT, dtype=torch.float32)
        _k.bwd_dA_kernel[(NT, B * H)](v, do, dA, scale, T, H, V, c.BT, c.BV, c.PREC,
                                      num_warps=4)
        dqi = torch.empty(B, T, H, K, device=q.device, dtype=torch.float32)
        dki = torch.empty_like(dqi)
        BKi = min(c.BK, 64)
        _k.bwd_intra_kernel[(triton.cdiv(K, BKi), NT * c.NC, B * H)](
            q, k, gc, dA, dqi, dki, T, H, K, c.BT, _BC, BKi, c.NC, c.PREC, num_warps=2)

    dv = torch.empty_like(v)
    _k.bwd_dv_kernel[(c.NV, NT, B * H)](q, k, gc, A, do, dh, dv, scale, T, NT, H, K, V, c.BT,
                                         c.BK, c.BV, c.USE_G, c.USE_GK, c.PREC, num_warps=4,
                                         num_stages=2)
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    if c.USE_GK:
        dgb = torch.empty(B, T, H, K, device=q.device, dtype=torch.float32)
    elif c.USE_G:
        dgb = torch.empty(c.NK, B, T, H, device=q.device, dtype=torch.float32)
    else:
        dgb = None
    _k.bwd_dqk_kernel[(c.NK, NT, B * H)](q, k, v, h, gc, do, dh, dqi, dki, dq, dk, dgb, scale,
                                          T, NT, H, K, V, c.BT, c.BK, c.BV, c.USE_G, c.USE_GK,
                                          c.PREC, num_warps=4, num_stages=2)
    dg = None
    if log_decay is not None:
        if c.USE_G:
            dgb = dgb.sum(0)
        if c.kind == "head":
            dgb = dgb.sum((0, 1))
        # the clamp at LOG_DECAY_FLOOR passes no gradient below it (as torch.clamp_min)
        dg = torch.where(log_decay >= LOG_DECAY_FLOOR, dgb, 0.).to(log_decay.dtype)
    ds0 = None if dh0 is None else dh0.to(initial_state.dtype)
    return [dq, dk, dv, dg, ds0]
