"""Predicted vs measured state hand-offs on gloo (CPU): is the cost model worth trusting here?

1. calibrates once (``spcompile.cost_model.calibrate`` at P = 2 by default: raw collectives,
   then p2p / allgather refitted on the hand-off ops, M from a copy, F from linear_scan runs) —
   or takes ``--profile``;
2. for each world size P (default 2 and 4; one spawn per P) every rank runs
   ``spcompile.collectives.exclusive_state_scan`` for each strategy (allgather, allscan with the
   planner's block count K, ring) over several state sizes ``[B, H, K, V]`` with a scalar
   decay, timing each call (barrier, call, slowest rank; best of the repeats, as calibration
   does; the median is kept in --json) and counting bytes with ``count_traffic``;
3. predicts the same hand-off with the formulas (``comm`` + ``combine`` terms of the strategy,
   machine numbers from step 1) and asks the planner which strategy it would pick.

Rank 0 prints one row per (P, size, strategy) with predicted/measured, the worst ratio, and the
fraction of (size, P) cells where the planner's choice is the measured fastest.

Run: ``.venv/bin/python benchmarks/cost_model_check.py [--nproc 2,4] [--repeats 15] [--json out]``
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:          # run as a script (and in spawned children): import the repo
    sys.path.insert(0, ROOT)

STATE_SHAPES = [(1, 1, 32, 32), (1, 4, 64, 64), (1, 8, 128, 128), (1, 16, 128, 128),
                (2, 16, 128, 128)]
STRATEGIES = ("allgather", "allscan", "ring")


def _worker(rank: int, world: int, init_file: str, result: str, repeats: int,
            profile_path: str) -> None:
    import torch
    import torch.distributed as dist
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        rows = _run(rank, world, repeats, profile_path)
        if rank == 0:
            Path(result).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def _run(rank: int, P: int, repeats: int, profile_path: str) -> Dict[str, Any]:
    import torch
    import torch.distributed as dist

    from spcompile.collectives import count_traffic, exclusive_state_scan, set_validation
    from spcompile.cost_model import load_profile, plan
    from spcompile.cost_model import formulas as fm
    from spcompile.cost_model.planner import best_blocks, values_for

    group = dist.group.WORLD
    set_validation(False)            # time the hand-off itself, not the cross-rank input check
    prof = load_profile(profile_path)
    data = prof.data
    rows: List[Dict[str, Any]] = []
    cells: List[Dict[str, Any]] = []
    for (B, H, K, V) in STATE_SHAPES:
        shapes = dict(B=B, H=H, d_k=K, d_v=V)
        T = P * 64                   # one chunk per rank: compute terms are negligible here
        state = torch.randn(B, H, K, V) * 0.1
        log_decay = -torch.rand(B, H)
        measured: Dict[str, float] = {}
        predicted: Dict[str, float] = {}
        for strategy in STRATEGIES:
            vals = values_for("linear_scan", strategy, dict(shapes, T=T, P=P), prof,
                              {"e_in": 4, "e_st": 4, "C": 64})
            blocks = None
            if strategy == "allscan":
                blocks = best_blocks(vals, "scalar")
                vals["K"] = float(blocks)
            terms = fm.scan_handoff(strategy, "scalar")
            pred = sum(fm.fast(e)(vals) for e in terms.values())
            kwargs = dict(strategy=strategy, group=group, blocks=blocks)
            for _ in range(2):       # warm-up (buffers, connections)
                exclusive_state_scan(state, log_decay, **kwargs)
            times = []
            for _ in range(repeats):
                dist.barrier(group)
                with count_traffic() as tr:
                    t0 = time.perf_counter()
                    exclusive_state_scan(state, log_decay, **kwargs)
                    dt = time.perf_counter() - t0
                x = torch.tensor([dt], dtype=torch.float64)
                dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
                times.append(float(x.item()))
            meas = min(times)        # best of the repeats, as calibration times its points
            measured[strategy], predicted[strategy] = meas, pred
            traffic = torch.tensor([tr.sent_bytes, tr.recv_bytes], dtype=torch.float64)
            dist.all_reduce(traffic, op=dist.ReduceOp.MAX, group=group)
            rows.append({"P": P, "shape": [B, H, K, V], "state_bytes": B * H * K * V * 4,
                         "strategy": strategy, "blocks": blocks, "predicted_s": pred,
                         "measured_s": meas, "median_s": statistics.median(times),
                         "ratio": pred / meas,
                         "max_sent_bytes": int(traffic[0]), "max_recv_bytes": int(traffic[1])})
        choice = plan("linear_scan", T=T, P=P, hardware=prof, decay="scalar", e_in=4,
                      **shapes)[0].strategy
        fastest = min(measured, key=measured.get)
        cells.append({"P": P, "shape": [B, H, K, V], "planner": choice, "fastest": fastest,
                      "fastest_s": measured[fastest], "planner_s": measured[choice]})
    return {"P": P, "profile": data, "rows": rows, "cells": cells}


def gpu_kernel_check(hardware: str = "h100_cluster") -> List[Dict[str, Any]]:
    """Time ``spcompile.kernels.linear_scan`` on CUDA (bf16, scalar decay, B=1, H=16, d=128) and
    compare with the model's local terms (state + intra) on a preset."""
    import torch
    from spcompile.cost_model import plan
    from spcompile.kernels import linear_scan
    from triton.testing import do_bench
    out = []
    for T in (8192, 32768):
        q, k, v = (torch.randn(1, T, 16, 128, device="cuda", dtype=torch.bfloat16)
                   for _ in range(3))
        g = -torch.rand(1, T, 16, device="cuda") * 0.1
        ms = do_bench(lambda: linear_scan(q, k, v, g, chunk_size=64))
        c = plan("linear_scan", B=1, T=T, H=16, d_k=128, d_v=128, P=1, hardware=hardware,
                 decay="scalar")[0]
        pred = (c.breakdown["state"] + c.breakdown["intra"]) * 1e3
        out.append({"T": T, "measured_ms": ms, "predicted_ms": pred, "ratio": pred / ms})
        print(f"linear_scan CUDA T={T}: measured {ms:.3f} ms, {hardware} model {pred:.3f} ms, "
              f"pred/meas {pred / ms:.2f}", flush=True)
    return out


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", default="2,4", help="world sizes, comma separated")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", default=None, help="also write all rows to this file")
    ap.add_argument("--profile", default=None,
                    help="use this profile JSON instead of calibrating first")
    ap.add_argument("--calibrate-nproc", type=int, default=2,
                    help="world size of the one calibration run (default 2)")
    ap.add_argument("--gpu-kernel", action="store_true",
                    help="also time linear_scan on CUDA against the h100_cluster preset")
    args = ap.parse_args(argv)
    import torch.multiprocessing as mp
    if args.gpu_kernel:
        gpu_kernel_check()
    from spcompile.cost_model.calibrate import calibrate
    keep = tempfile.TemporaryDirectory()
    profile_path = args.profile
    if profile_path is None:
        profile_path = os.path.join(keep.name, "profile.json")
        calibrate(args.calibrate_nproc, profile_path, repeats=args.repeats,
                  kernel_sizes=((256, 2, 32), (1024, 2, 32)))
        print(f"# calibrated once at P={args.calibrate_nproc}; every row below is predicted "
              f"with that profile")
    results = []
    for P in [int(x) for x in args.nproc.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            res = os.path.join(tmp, "rows.json")
            mp.spawn(_worker, args=(P, os.path.join(tmp, "init"), res, args.repeats,
                                    profile_path), nprocs=P, join=True)
            results.append(json.loads(Path(res).read_text()))
    print(f"{'P':>2} {'state [B,H,K,V]':>18} {'bytes':>8} {'strategy':>9} {'K':>3} "
          f"{'pred ms':>9} {'meas ms':>9} {'pred/meas':>9} {'sent':>8} {'recv':>8}")
    worst = 1.0
    worst_row = None
    for res in results:
        lv = res["profile"]["levels"][0]
        print(f"# P={res['P']}, profile: " + ", ".join(
            f"{c} a={lv['alpha'][c] * 1e6:.0f}us b={lv['beta'][c] / 1e9:.2f}GB/s"
            for c in ("p2p", "allgather")) + f", M={res['profile']['M'] / 1e9:.1f}GB/s")
        for r in res["rows"]:
            ratio = r["ratio"]
            off = max(ratio, 1 / ratio)
            if off > worst:
                worst, worst_row = off, r
            print(f"{r['P']:>2} {str(r['shape']):>18} {r['state_bytes']:>8} {r['strategy']:>9} "
                  f"{r['blocks'] or '':>3} {r['predicted_s'] * 1e3:>9.3f} "
                  f"{r['measured_s'] * 1e3:>9.3f} {ratio:>9.2f} {r['max_sent_bytes']:>8} "
                  f"{r['max_recv_bytes']:>8}")
    ratios = [max(r["ratio"], 1 / r["ratio"]) for res in results for r in res["rows"]]
    within = sum(x <= 1.5 for x in ratios)
    print(f"\nworst ratio (max of pred/meas, meas/pred): {worst:.2f} at {worst_row['strategy']} "
          f"P={worst_row['P']} {worst_row['shape']}; {within}/{len(ratios)} rows within 1.5x")
    cells = [c for res in results for c in res["cells"]]
    hits = sum(c["planner"] == c["fastest"] for c in cells)
    near = sum(c["planner_s"] <= 1.1 * c["fastest_s"] for c in cells)
    print(f"planner picks the measured fastest in {hits}/{len(cells)} cells "
          f"({100 * hits / len(cells):.0f}%); within 10% of the fastest in {near}/{len(cells)}")
    for c in cells:
        mark = "ok " if c["planner"] == c["fastest"] else "MISS"
        print(f"  {mark} P={c['P']} {c['shape']}: planner {c['planner']}, fastest {c['fastest']} "
              f"(planner's pick costs {c['planner_s'] / c['fastest_s']:.2f}x the fastest)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
