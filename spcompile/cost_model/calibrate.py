"""Measure this machine and write a hardware profile (``spcompile calibrate``).

Two parts:

* :func:`calibrate_in_group` runs inside an initialised process group (every rank calls it) and
  times the collectives the strategies use — send/recv ping-pong, ``all_gather_into_tensor``,
  ``all_reduce``, ``all_to_all_single`` — at several message sizes.  Each timing is divided by
  the step count of its alpha-beta model (formulas.py), so one least-squares line
  ``t_step = alpha + bytes_step / beta`` per collective gives alpha and beta.  When
  ``spcompile.collectives`` is importable, the ``p2p`` and ``allgather`` links are then refitted
  on the hand-off ops themselves (``exclusive_state_scan`` ring / allgather, modelled local work
  subtracted), because on CPU their per-call software cost is several times gloo's latency.
  It also times a large copy (memory bandwidth M) and ``spcompile.kernels.linear_scan`` at a
  few sizes; F is the slope of ``t = t0 + flops / F`` over those runs (flops from the formulas).
* :func:`calibrate` spawns ``nproc`` processes itself (gloo on CPU, nccl on GPU), runs the
  above, and writes the profile JSON (default ``~/.cache/spcompile/profile.json``, which the
  planner then uses by default).
"""
from __future__ import annotations

import json
import os
import warnings
import platform
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .profiles import CACHE_PATH, Profile

DEFAULT_SIZES = (1 << 10, 1 << 14, 1 << 17, 1 << 19, 1 << 21)   # bytes per rank
KERNEL_SIZES = ((512, 4, 64), (2048, 4, 64), (4096, 4, 64))   # (T, H, D) of linear_scan runs


def fit_alpha_beta(step_bytes: Sequence[float], step_seconds: Sequence[float]
                   ) -> Tuple[float, float, float]:
    """Least squares of ``t = alpha + m / beta``; returns (alpha, beta, worst ratio).

    The residuals are *relative* (each row divided by its measured time), because the planner
    is judged by predicted/measured ratios over sizes spanning three decades; an absolute fit
    would let the largest message decide alpha.  A negative intercept (noise at small sizes) is
    clipped to 1 ns, a non-positive slope to an effectively infinite bandwidth (1e15 B/s)."""
    x = np.asarray(step_bytes, dtype=np.float64)
    y = np.asarray(step_seconds, dtype=np.float64)
    A = np.stack([np.ones_like(x), x], axis=1) / y[:, None]
    (a, inv_b), *_ = np.linalg.lstsq(A, np.ones_like(y), rcond=None)
    if inv_b <= 0:
        inv_b = 1e-15
    if a <= 0:
        a = 1e-9
    pred = a + x * inv_b
    worst = float(np.max(np.maximum(pred / y, y / pred)))
    return float(a), float(1.0 / inv_b), worst


def _timeit(fn, repeats: int, sync) -> float:
    fn()          # warm-up
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def calibrate_in_group(group: Any = None, *, sizes: Sequence[int] = DEFAULT_SIZES,
                       repeats: int = 10, kernel: bool = True, name: str = "calibrated",
                       kernel_sizes: Sequence[Tuple[int, int, int]] = KERNEL_SIZES,
                       handoff: bool = True) -> Dict[str, Any]:
    """Measure alpha/beta per collective (and F, M) on the current group; returns profile data.

    Every rank of ``group`` must call this.  Each timing is the best of ``repeats`` and the
    slowest rank's (all-reduce MAX), so every rank returns the same profile."""
    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated",
                            category=FutureWarning)
    if not dist.is_initialized():
        raise RuntimeError("calibrate_in_group needs an initialised process group; use "
                           "calibrate(nproc=...) to spawn one")
    P = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if P < 2:
        raise RuntimeError("calibration of links needs at least 2 ranks; run with nproc >= 2")
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" \
        else torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    peer_of = {0: 1, 1: 0}
    g_rank0 = dist.get_global_rank(group, 0) if group is not None else 0
    g_rank1 = dist.get_global_rank(group, 1) if group is not None else 1

    def agree(t: float) -> float:
        x = torch.tensor([t], dtype=torch.float64, device=device)
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
        return float(x.item())

    # warm-up: the first call of each collective sets up connections and buffers
    warm = torch.ones(max(sizes) // 4, dtype=torch.float32, device=device)
    for _ in range(2):
        dist.all_gather_into_tensor(torch.empty(warm.numel() * P, device=device), warm,
                                    group=group)
        dist.all_reduce(warm, group=group)
        if rank in peer_of:
            other = g_rank1 if rank == 0 else g_rank0
            if rank == 0:
                dist.send(warm, other, group=group)
                dist.recv(warm, other, group=group)
            else:
                dist.recv(warm, other, group=group)
                dist.send(warm, other, group=group)
    raw: Dict[str, List[Tuple[float, float]]] = {c: [] for c in
                                                 ("p2p", "allgather", "allreduce", "alltoall")}
    for nbytes in sizes:
        n = max(1, nbytes // 4)
        m = 4.0 * n
        buf = torch.ones(n, dtype=torch.float32, device=device)
        # p2p: ping-pong between ranks 0 and 1, one-way time = round trip / 2
        dist.barrier(group=group)
        if rank in peer_of:
            other = g_rank1 if rank == 0 else g_rank0

            def pingpong() -> None:
                for _ in range(4):
                    if rank == 0:
                        dist.send(buf, other, group=group)
                        dist.recv(buf, other, group=group)
                    else:
                        dist.recv(buf, other, group=group)
                        dist.send(buf, other, group=group)
            t = _timeit(pingpong, repeats, sync) / 8
        else:
            t = 0.0
        raw["p2p"].append((m, agree(t)))
        # all-gather (ring): P-1 steps of m bytes
        out = torch.empty(n * P, dtype=torch.float32, device=device)
        dist.barrier(group=group)
        t = agree(_timeit(lambda: dist.all_gather_into_tensor(out, buf, group=group),
                          repeats, sync))
        raw["allgather"].append((m, t / (P - 1)))
        # all-reduce (ring): 2(P-1) steps of m/P bytes
        dist.barrier(group=group)
        t = agree(_timeit(lambda: dist.all_reduce(buf, group=group), repeats, sync))
        raw["allreduce"].append((m / P, t / (2 * (P - 1))))
        # all-to-all (pairwise): P-1 steps of m/P bytes
        n_a = max(P, (n // P) * P)
        src = torch.ones(n_a, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        dist.barrier(group=group)
        try:
            t = agree(_timeit(lambda: dist.all_to_all_single(dst, src, group=group),
                              repeats, sync))
            raw["alltoall"].append((4.0 * n_a / P, t / (P - 1)))
        except (RuntimeError, NotImplementedError):
            raw["alltoall"] = []
    flops, mem_bw, overhead, kernel_points = \
        _measure_local(device, sync, repeats, kernel_sizes if kernel else ())
    mem_bw = agree(mem_bw)
    used = dict(raw)
    notes = []
    if handoff:
        ho = _measure_handoffs(group, device, P, sizes, repeats, mem_bw, agree)
        if ho:
            used.update(ho)
            notes.append("p2p and allgather were fitted on spcompile's own hand-off ops "
                         "(exclusive_state_scan ring / allgather), which add per-call "
                         "software cost to the raw collectives (kept under measurements)")
    alpha: Dict[str, float] = {}
    beta: Dict[str, float] = {}
    fit_error: Dict[str, float] = {}
    for c, pts in used.items():
        if not pts:
            continue
        a, b, worst = fit_alpha_beta([p[0] for p in pts], [p[1] for p in pts])
        alpha[c], beta[c], fit_error[c] = a, b, worst
    if "alltoall" not in alpha:
        alpha["alltoall"], beta["alltoall"] = alpha["allgather"], beta["allgather"]
        notes.append(f"{backend} has no all_to_all_single here: alltoall copies allgather")
    data = {
        "name": name,
        "description": (f"measured by spcompile calibrate on {socket.gethostname()} "
                        f"({platform.processor() or platform.machine()}), backend {backend}, "
                        f"P={P}, {time.strftime('%Y-%m-%d %H:%M:%S')}. " + " ".join(notes)),
        "device": device.type,
        "F": agree(flops) if flops else 1e10,
        "M": mem_bw,
        "levels": [{"name": backend, "ranks": None, "alpha": alpha, "beta": beta}],
        "measurements": {"world_size": P, "fit_worst_ratio": fit_error,
                         "step_points": {c: pts for c, pts in used.items()},
                         "raw_collective_step_points": raw,
                         "kernel_points_flops_seconds": kernel_points,
                         "kernel_overhead_s": overhead},
    }
    return data


def _measure_local(device: Any, sync: Any, repeats: int,
                   kernel_sizes: Sequence[Tuple[int, int, int]] = KERNEL_SIZES
                   ) -> Tuple[float, float, float, List[Tuple[float, float]]]:
    """(F, M, per-call overhead, points): a 32 MiB copy gives M; ``linear_scan`` runs (scalar
    decay, chunk 64) give F as the slope of ``t = t0 + flops / F`` (relative least squares;
    the intercept absorbs Python/dispatch overhead, which dominates small CPU runs)."""
    import torch
    from spcompile.kernels import linear_scan

    from . import formulas as fm

    x = torch.ones(1 << 23, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    t = _timeit(lambda: y.copy_(x), repeats, sync)
    mem_bw = 2 * x.numel() * 4 / t
    local = fm.scan_local_terms("scalar")
    flops_expr = _flops_of(local["state"]) + _flops_of(local["intra"])
    points = []
    for T, H, D in kernel_sizes:
        q = torch.randn(1, T, H, D, device=device)
        k = torch.randn(1, T, H, D, device=device)
        v = torch.randn(1, T, H, D, device=device)
        g = -torch.rand(1, T, H, device=device)
        t = _timeit(lambda: linear_scan(q, k, v, g, chunk_size=64), max(2, repeats // 2), sync)
        vals = {"B": 1, "T": T, "H": H, "d_k": D, "d_v": D, "P": 1, "C": 64}
        flops = float(flops_expr.subs({fm.SYMBOLS[n]: v for n, v in vals.items()}))
        points.append((flops, t))
    f = np.array([p[0] for p in points])
    tt = np.array([p[1] for p in points])
    if not points:
        return 0.0, mem_bw, 0.0, []
    if len(points) >= 2:
        A = np.stack([np.ones_like(f), f], axis=1) / tt[:, None]
        (t0, inv_f), *_ = np.linalg.lstsq(A, np.ones_like(tt), rcond=None)
    else:
        t0, inv_f = 0.0, 0.0
    if inv_f <= 0:       # no growth visible above the overhead: use the largest run
        t0, inv_f = 0.0, float(tt[-1] / f[-1])
    return 1.0 / float(inv_f), mem_bw, max(0.0, float(t0)), points


def _measure_handoffs(group: Any, device: Any, P: int, sizes: Sequence[int], repeats: int,
                      mem_bw: float, agree: Any) -> Dict[str, List[Tuple[float, float]]]:
    """Per-step points of spcompile's hand-off ops, with the modelled local work removed.

    ring: ``t = (P-1)(alpha + m/beta + 3m/M)``  →  step = t/(P-1) - 3m/M   (the "p2p" link)
    allgather: ``t = (P-1)(alpha + m/beta) + P m/M``  →  step = (t - P m/M)/(P-1)
    Empty when spcompile.collectives is not importable."""
    import torch
    import torch.distributed as dist
    try:
        from spcompile.collectives import exclusive_state_scan, set_validation
    except ImportError:
        return {}
    pg = group if group is not None else dist.group.WORLD     # None means "P = 1" there
    out: Dict[str, List[Tuple[float, float]]] = {"p2p": [], "allgather": []}
    set_validation(False)            # the cross-rank input check is not part of the hand-off
    try:
        for nbytes in sizes:
            rows = max(1, nbytes // (4 * 64))
            state = torch.randn(1, 1, rows, 64, device=device)
            m = 4.0 * state.numel()
            for strategy, key in (("ring", "p2p"), ("allgather", "allgather")):
                def call() -> None:
                    exclusive_state_scan(state, None, strategy=strategy, group=pg)
                dist.barrier(group=group)
                t = agree(_timeit(call, repeats, lambda: None))
                if key == "p2p":
                    step = t / (P - 1) - 3 * m / mem_bw
                else:
                    step = (t - P * m / mem_bw) / (P - 1)
                out[key].append((m, max(step, 1e-9)))
    finally:
        set_validation(None)
    return out


def _flops_of(roof: Any) -> Any:
    """The flops argument of a roofline Max(flops/F, bytes/M) (times F)."""
    import sympy as sp

    from . import formulas as fm
    for arg in roof.args:
        if fm.F in arg.free_symbols:
            return sp.simplify(arg * fm.F)
    raise ValueError(f"not a roofline: {roof}")


# ---- launcher --------------------------------------------------------------------------------
def _worker(rank: int, world: int, init_file: str, backend: str, result: str,
            kwargs: Dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        data = calibrate_in_group(**kwargs)
        if rank == 0:
            Path(result).write_text(json.dumps(data, indent=2))
    finally:
        dist.destroy_process_group()


def calibrate(nproc: int = 2, out: Union[str, Path, None] = None, *,
              backend: Optional[str] = None, sizes: Sequence[int] = DEFAULT_SIZES,
              repeats: int = 10, kernel: bool = True,
              kernel_sizes: Sequence[Tuple[int, int, int]] = KERNEL_SIZES,
              handoff: bool = True) -> Profile:
    """Spawn ``nproc`` processes, measure, write the profile JSON to ``out`` and return it.

    ``backend`` defaults to nccl when CUDA has at least ``nproc`` devices, else gloo; ``out``
    defaults to ``~/.cache/spcompile/profile.json`` (the planner's default profile).
    ``handoff=False`` keeps the raw collective fits for p2p/allgather instead of fitting them on
    spcompile's hand-off ops."""
    import torch
    import torch.multiprocessing as mp
    if nproc < 2:
        raise ValueError("calibrate needs nproc >= 2 (links are measured between processes)")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= nproc \
            else "gloo"
    out_path = Path(out).expanduser() if out is not None else CACHE_PATH
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        result = os.path.join(tmp, "profile.json")
        mp.spawn(_worker, args=(nproc, init_file, backend, result,
                                {"sizes": tuple(sizes), "repeats": repeats, "kernel": kernel,
                                 "kernel_sizes": tuple(kernel_sizes), "handoff": handoff}),
                 nprocs=nproc, join=True)
        data = json.loads(Path(result).read_text())
    prof = Profile(data, source=str(out_path))
    prof.save(out_path)
    return prof
