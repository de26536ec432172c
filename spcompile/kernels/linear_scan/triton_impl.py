"""Launchers for the Triton linear-scan kernels (``triton_kernels.py``); called by ``op.py``.

Forward (launches): [chunk cumsum of the decay] → inter-chunk states ``h`` (+ final state)
→ [vector decay: intra-chunk ``A`` by sub-chunks] → outputs.
Backward: recompute ``h`` (and ``A``) → reverse state-gradient recurrence ``dh`` (+ d initial
state) → [vector decay: ``dA``, intra parts of dq/dk] → dv → dq, dk and the decay gradient.

Block sizes: chunk ``BT`` = 64 (the requested chunk size rounded down to a power of two in
[16, 64]; the result does not depend on it), sub-chunk ``BC`` = 16 for vector decays; the
K/V tiles, warps and pipeline stages of each kernel come from ``CFG`` (chosen on an H100, see
benchmarks/RESULTS.md; ``SPCOMPILE_TRITON_CFG`` = a JSON dict of overrides, e.g.
``{"state": {"BV": 32, "num_stages": 3}}``, for tuning runs). Any K, V >= 1 work (tiles are
masked); K, V in {16..128} are the tuned range.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

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

# Per kernel: tile caps (BK, BV) and launch options. "state" = the two sequential recurrences
# (fwd_state, bwd_dstate), "o" = fwd_o, "dv" / "dqk" = the backward tiles.
# "state" with SPLIT=1 replaces each recurrence by "outer" (per-chunk products, parallel) and an
# elementwise scan launched with the "state" tiles; on an H100 (B=1, H=16, T=32768) it measured
# 3.6x slower than the sequential kernels, so it is off. "o" and "dv" are the --sweep's picks.
CFG: Dict[str, Dict[str, int]] = {
    "state": {"SPLIT": 0, "BK": 64, "BV": 64, "num_warps": 4, "num_stages": 2},
    "outer": {"BK": 64, "BV": 64, "num_warps": 4, "num_stages": 2},
    "o": {"BK": 64, "BV": 128, "num_warps": 8, "num_stages": 2},
    "dv": {"BK": 64, "BV": 128, "num_warps": 8, "num_stages": 2},
    "dqk": {"BK": 64, "BV": 64, "num_warps": 4, "num_stages": 2},
}


def _cfg(name: str) -> Dict[str, int]:
    """CFG[name] with SPCOMPILE_TRITON_CFG's overrides applied."""
    c = dict(CFG[name])
    env = os.environ.get("SPCOMPILE_TRITON_CFG")
    if env:
        c.update(json.loads(env).get(name, {}))
    return c


def _launch(c: Dict[str, int]) -> Dict[str, int]:
    return {"num_warps": c["num_warps"], "num_stages": c["num_stages"]}


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
        self.BK = _tile(self.K)  # the vector-decay intra kernels
        self.cfg = {n: _cfg(n) for n in CFG}
        self.BKS = _tile(self.K, self.cfg["state"]["BK"])
        self.NKS = triton.cdiv(self.K, self.BKS)
        self.BVS = _tile(self.V, self.cfg["state"]["BV"])
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


def _split_states(c: "_Cfg", a: Tensor, b: Tensor, gc: Optional[Tensor], s0: Optional[Tensor],
                  sT: Optional[Tensor], scale: float, reverse: bool) -> Tensor:
    """Both recurrences in split form: u[n] = per-chunk product (parallel), then a scan in place.
    Forward (a, b = k, v): slot n = state entering chunk n. Reverse (a, b = q, do): slot n =
    gradient of the state leaving chunk n."""
    u = a.new_empty(c.B, c.NT, c.H, c.K, c.V)
    co = c.cfg["outer"]
    BK, BV = _tile(c.K, co["BK"]), _tile(c.V, co["BV"])
    grid = (triton.cdiv(c.K, BK) * triton.cdiv(c.V, BV), c.NT, c.B * c.H)
    _k.chunk_outer_kernel[grid](a, b, gc, u, scale, c.T, c.NT, c.H, c.K, c.V, c.BT, BK, BV,
                                c.USE_G, c.USE_GK, not reverse, c.PREC, **_launch(co))
    grid = (c.NKS, c.NVS, c.B * c.H)
    _k.state_scan_kernel[grid](u, gc, s0, sT, c.T, c.NT, c.H, c.K, c.V, c.BT, c.BKS, c.BVS,
                               c.USE_G, c.USE_GK, s0 is not None, sT is not None, reverse,
                               **_launch(c.cfg["state"]))
    return u


def _states(c: _Cfg, k: Tensor, v: Tensor, gc: Optional[Tensor], h0: Optional[Tensor],
            store_final: bool) -> Tuple[Tensor, Optional[Tensor]]:
    ht = k.new_empty(c.B, c.H, c.K, c.V, dtype=torch.float32) if store_final else None
    if c.cfg["state"].get("SPLIT", 0):
        return _split_states(c, k, v, gc, h0, ht, 1.0, False), ht
    h = k.new_empty(c.B, c.NT, c.H, c.K, c.V)
    grid = (c.NKS, c.NVS, c.B * c.H)
    _k.fwd_state_kernel[grid](k, v, gc, h, h0, ht, c.T, c.NT, c.H, c.K, c.V, c.BT, c.BKS, c.BVS,
                              c.USE_G, c.USE_GK, h0 is not None, store_final, c.PREC,
                              **_launch(c.cfg["state"]))
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
    co = c.cfg["o"]
    BK, BV = _tile(c.K, co["BK"]), _tile(c.V, co["BV"])
    grid = (triton.cdiv(c.V, BV), c.NT, c.B * c.H)
    _k.fwd_o_kernel[grid](q, k, v, h, gc, A, o, scale, c.T, c.NT, c.H, c.K, c.V, c.BT, BK, BV,
                          c.USE_G, c.USE_GK, c.PREC, **_launch(co))
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

    dh0 = (torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
           if initial_state is not None else None)
    if c.cfg["state"].get("SPLIT", 0):
        dh = _split_states(c, q, do, gc, dS, dh0, scale, True)
    else:
        dh = q.new_empty(B, NT, H, K, V)
        _k.bwd_dstate_kernel[(c.NKS, c.NVS, B * H)](
            q, do, gc, dS, dh, dh0, scale, T, NT, H, K, V, c.BT, c.BKS, c.BVS, c.USE_G,
            c.USE_GK, dh0 is not None, c.PREC, **_launch(c.cfg["state"]))

    A = dqi = dki = None
    if c.USE_GK:
        A = _intra_A(c, q, k, gc)
        dA = q.new_empty(B, T, H, c.BT, dtype=torch.float32)
        _k.bwd_dA_kernel[(NT, B * H)](v, do, dA, scale, T, H, V, c.BT, _tile(V), c.PREC,
                                      num_warps=4)
        dqi = torch.empty(B, T, H, K, device=q.device, dtype=torch.float32)
        dki = torch.empty_like(dqi)
        BKi = min(c.BK, 64)
        _k.bwd_intra_kernel[(triton.cdiv(K, BKi), NT * c.NC, B * H)](
            q, k, gc, dA, dqi, dki, T, H, K, c.BT, _BC, BKi, c.NC, c.PREC, num_warps=2)

    dv = torch.empty_like(v)
    cv = c.cfg["dv"]
    BK, BV = _tile(K, cv["BK"]), _tile(V, cv["BV"])
    _k.bwd_dv_kernel[(triton.cdiv(V, BV), NT, B * H)](
        q, k, gc, A, do, dh, dv, scale, T, NT, H, K, V, c.BT, BK, BV, c.USE_G, c.USE_GK, c.PREC,
        **_launch(cv))
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    cq = c.cfg["dqk"]
    BK, BV = _tile(K, cq["BK"]), _tile(V, cq["BV"])
    NK = triton.cdiv(K, BK)
    if c.USE_GK:
        dgb = torch.empty(B, T, H, K, device=q.device, dtype=torch.float32)
    elif c.USE_G:
        dgb = torch.empty(NK, B, T, H, device=q.device, dtype=torch.float32)
    else:
        dgb = None
    _k.bwd_dqk_kernel[(NK, NT, B * H)](q, k, v, h, gc, do, dh, dqi, dki, dq, dk, dgb, scale,
                                        T, NT, H, K, V, c.BT, BK, BV, c.USE_G, c.USE_GK, c.PREC,
                                        **_launch(cq))
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
