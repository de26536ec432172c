"""Launchers for the Triton linear-scan kernels (``triton_kernels.py``); called by ``op.py``.

Forward (launches): [chunk cumsum of the decay] → inter-chunk states ``h`` (+ final state)
→ [vector decay: intra-chunk ``A`` by sub-chunks] → outputs.
Backward: recompute ``h`` (and ``A``) → reverse state-gradient recurrence ``dh`` (+ d initial
state) → [vector decay: ``dA``, intra parts of dq/dk] → dv → dq, dk and the decay gradient.

Block sizes: chunk ``BT`` = 64 (the requested chunk size rounded down to a power of two in
[16, 64]; the result does not depend on it), sub-chunk ``BC`` = 16 for vector decays. The K/V
tiles, warps and pipeline stages of the five heavy kernels (``state``, ``dstate``, ``o``, ``dv``,
``dqk``) are **autotuned** on CUDA: the first call for a problem class (kernel, decay kind, dtype,
K, V, chunk, and B·H and the chunk count rounded up to powers of two) times every candidate in
``CANDIDATES`` with CUDA events and keeps the fastest (``tuned_configs()`` lists the picks). No
tuning under ``TRITON_INTERPRET=1``, during CUDA-graph capture, or with
``SPCOMPILE_TRITON_AUTOTUNE=0``: then ``CFG`` (each list's first entry) is used.
``SPCOMPILE_TRITON_CFG`` = a JSON dict of overrides, e.g. ``{"state": {"BV": 32}}``, pins a
kernel's config (``state`` pins ``dstate`` too) and skips its tuning. Any K, V >= 1 work (tiles
are masked); K, V in {16..128} are the tuned range.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Callable, Dict, List, Optional, Tuple

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

def _c(bk: int, bv: int, w: int, st: int) -> Dict[str, int]:
    return {"BK": bk, "BV": bv, "num_warps": w, "num_stages": st}


# Candidate launch configs per kernel group (the first of each list is the untuned default, from
# an H100 sweep: benchmarks/RESULTS.md). "state" = the forward inter-chunk recurrence, "dstate"
# its reverse in the backward (64 programs of a sequential chain at B·H=16 and 64x64 tiles,
# hence the smaller tiles and warp counts), "o" = outputs, "dv" / "dqk" = the backward tiles.
CANDIDATES: Dict[str, List[Dict[str, int]]] = {
    "state": [_c(64, 64, 4, 2), _c(32, 64, 4, 2), _c(64, 32, 4, 2), _c(32, 32, 2, 2),
              _c(32, 64, 2, 3), _c(64, 64, 8, 3), _c(64, 64, 4, 3)],
    "o": [_c(64, 128, 8, 2), _c(64, 64, 4, 2), _c(128, 64, 8, 2), _c(128, 128, 8, 2),
          _c(64, 64, 4, 3), _c(32, 64, 4, 2)],
    "dv": [_c(64, 128, 8, 2), _c(64, 64, 4, 2), _c(64, 64, 8, 2), _c(128, 64, 8, 2),
           _c(32, 64, 4, 2)],
    "dqk": [_c(64, 64, 4, 2), _c(64, 64, 8, 2), _c(64, 64, 4, 3), _c(128, 64, 8, 2),
            _c(64, 128, 8, 2), _c(32, 64, 4, 2)],
}
CANDIDATES["dstate"] = [dict(x) for x in CANDIDATES["state"]]

# Untuned configs. "state" with SPLIT=1 replaces each recurrence by "outer" (per-chunk products,
# parallel) and an elementwise scan launched with the "state" tiles; on an H100 (B=1, H=16,
# T=32768) it measured 3.6x slower than the sequential kernels, so it is off (and not tuned).
CFG: Dict[str, Dict[str, int]] = {
    "state": {"SPLIT": 0, **CANDIDATES["state"][0]},
    "dstate": dict(CANDIDATES["dstate"][0]),
    "outer": _c(64, 64, 4, 2),
    "o": dict(CANDIDATES["o"][0]),
    "dv": dict(CANDIDATES["dv"][0]),
    "dqk": dict(CANDIDATES["dqk"][0]),
}

_AUTOTUNE_ENV = "SPCOMPILE_TRITON_AUTOTUNE"
_TUNED: Dict[tuple, Dict[str, int]] = {}


def _overrides() -> Dict[str, Dict[str, int]]:
    """SPCOMPILE_TRITON_CFG, parsed once per distinct value (read on every launch)."""
    env = os.environ.get("SPCOMPILE_TRITON_CFG")
    if not env:
        return {}
    return _parse_overrides(env)


@functools.lru_cache(maxsize=8)
def _parse_overrides(env: str) -> Dict[str, Dict[str, int]]:
    try:
        got = json.loads(env)
    except ValueError as e:
        raise ValueError(f"SPCOMPILE_TRITON_CFG must be a JSON object like "
                         f'{{"state": {{"BV": 32}}}}; got {env!r} ({e})') from None
    unknown = sorted(set(got) - set(CFG))
    if unknown:
        raise ValueError(f"SPCOMPILE_TRITON_CFG names unknown kernels {unknown}; known: "
                         f"{sorted(CFG)}")
    return got


def _cfg(name: str) -> Dict[str, int]:
    """CFG[name] with SPCOMPILE_TRITON_CFG's overrides applied ("state" also pins "dstate")."""
    c = dict(CFG[name])
    ov = _overrides()
    if name == "dstate":
        c.update({k: v for k, v in ov.get("state", {}).items() if k != "SPLIT"})
    c.update(ov.get(name, {}))
    return c


def _pinned(name: str) -> bool:
    ov = _overrides()
    return name in ov or (name == "dstate" and "state" in ov)


def autotune_enabled(x: Tensor) -> bool:
    """Tune launch configs for tensors like ``x``? (CUDA, compiled kernels, not capturing.)"""
    if os.environ.get(_AUTOTUNE_ENV, "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return x.is_cuda and not torch.cuda.is_current_stream_capturing()


def tuned_configs() -> Dict[str, Dict[str, int]]:
    """The autotuner's picks so far: ``"kernel kind dtype K=.. V=.. BT=.. BH<=.. NT<=.."`` → config."""
    out = {}
    for key, cfg in _TUNED.items():
        name, kind, dt, K, V, BT, bh, nt = key
        out[f"{name} {kind} {str(dt).replace('torch.', '')} K={K} V={V} BT={BT} BH<={bh} "
            f"NT<={nt}"] = dict(cfg)
    return out


def _time_ms(fn, reps: int = 5, rounds: int = 3) -> float:
    """Best of ``rounds`` averages of ``reps`` calls, CUDA events on the current stream."""
    best = float("inf")
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / reps)
    return best


def pick_fastest(candidates: List[Dict[str, int]], launch: Callable[[Dict[str, int]], object],
                 timer: Callable[[Callable[[], object]], float]) -> Dict[str, int]:
    """The candidate whose ``launch`` ``timer`` measures fastest; candidates that fail to compile
    or launch (e.g. out of shared memory) are skipped; if all fail the first error is raised."""
    best, best_ms, first_err = None, float("inf"), None
    for cand in candidates:
        try:
            launch(cand)  # compile + warm up
            ms = timer(lambda: launch(cand))
        except Exception as e:  # noqa: BLE001 - a config the card cannot run is skipped
            first_err = first_err or e
            continue
        if ms < best_ms:
            best, best_ms = cand, ms
    if best is None:
        raise first_err
    return best


def _run(c: "_Cfg", name: str, x: Tensor, launch: Callable[[Dict[str, int]], object]):
    """Launch kernel group ``name`` with its tuned config (tuning it first when needed)."""
    cfg = c.cfg[name]
    if not _pinned(name) and autotune_enabled(x):
        key = (name, c.kind, x.dtype, c.K, c.V, c.BT, triton.next_power_of_2(c.B * c.H),
               triton.next_power_of_2(c.NT))
        cfg = _TUNED.get(key)
        if cfg is None:
            cfg = _TUNED[key] = pick_fastest(CANDIDATES[name], launch, _time_ms)
    return launch(cfg)


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

    def launch(cfg):
        BK, BV = _tile(c.K, cfg["BK"]), _tile(c.V, cfg["BV"])
        grid = (triton.cdiv(c.K, BK), triton.cdiv(c.V, BV), c.B * c.H)
        _k.fwd_state_kernel[grid](k, v, gc, h, h0, ht, c.T, c.NT, c.H, c.K, c.V, c.BT, BK, BV,
                                  c.USE_G, c.USE_GK, h0 is not None, store_final, c.PREC,
                                  **_launch(cfg))

    _run(c, "state", k, launch)
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

    def launch(cfg):
        BK, BV = _tile(c.K, cfg["BK"]), _tile(c.V, cfg["BV"])
        grid = (triton.cdiv(c.V, BV), c.NT, c.B * c.H)
        _k.fwd_o_kernel[grid](q, k, v, h, gc, A, o, scale, c.T, c.NT, c.H, c.K, c.V, c.BT, BK,
                              BV, c.USE_G, c.USE_GK, c.PREC, **_launch(cfg))

    _run(c, "o", q, launch)
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

        def launch_dstate(cfg):
            BK, BV = _tile(K, cfg["BK"]), _tile(V, cfg["BV"])
            _k.bwd_dstate_kernel[(triton.cdiv(K, BK), triton.cdiv(V, BV), B * H)](
                q, do, gc, dS, dh, dh0, scale, T, NT, H, K, V, c.BT, BK, BV, c.USE_G,
                c.USE_GK, dh0 is not None, c.PREC, **_launch(cfg))

        _run(c, "dstate", q, launch_dstate)

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

    def launch_dv(cfg):
        BK, BV = _tile(K, cfg["BK"]), _tile(V, cfg["BV"])
        _k.bwd_dv_kernel[(triton.cdiv(V, BV), NT, B * H)](
            q, k, gc, A, do, dh, dv, scale, T, NT, H, K, V, c.BT, BK, BV, c.USE_G, c.USE_GK,
            c.PREC, **_launch(cfg))

    _run(c, "dv", q, launch_dv)
    dq, dk = torch.empty_like(q), torch.empty_like(k)

    def launch_dqk(cfg):
        BK, BV = _tile(K, cfg["BK"]), _tile(V, cfg["BV"])
        NK = triton.cdiv(K, BK)
        if c.USE_GK:
            dgb = torch.empty(B, T, H, K, device=q.device, dtype=torch.float32)
        elif c.USE_G:  # partial sums per K block, summed below
            dgb = torch.empty(NK, B, T, H, device=q.device, dtype=torch.float32)
        else:
            dgb = None
        _k.bwd_dqk_kernel[(NK, NT, B * H)](q, k, v, h, gc, do, dh, dqi, dki, dq, dk, dgb, scale,
                                            T, NT, H, K, V, c.BT, BK, BV, c.USE_G, c.USE_GK,
                                            c.PREC, **_launch(cfg))
        return dgb

    dgb = _run(c, "dqk", q, launch_dqk)
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
