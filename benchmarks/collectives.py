"""Time and bytes of the state hand-off strategies on gloo (CPU), P = 2 and 4.

    python benchmarks/collectives.py [--world 2 4] [--iters 20] [--json out.json]

For each world size, state size ``[B, H, K, V]`` fp32 and strategy, every rank runs
``exclusive_state_scan`` forward, then forward + backward, ``iters`` times after a warm-up, with
a barrier before each call. Then the whole ``sp_linear_scan`` (q, k, v ``[1, 1024, 4, 64]`` per
rank, scalar decay) per strategy, beside the local ``linear_scan`` alone: the difference is
what the hand-off adds once it overlaps the local scan. A call's time is the slowest rank's; the table shows the median over
calls in milliseconds, and the bytes one rank sent/received per forward (the maximum over ranks,
from ``count_traffic``). The cross-rank input check is switched off (it is one extra small
all_gather per call, measured separately in the "validate" row). This is a benchmark, not a
test: numbers depend on the machine (2 CPU cores here: P = 4 oversubscribes them).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SIZES = [(1, 4, 32, 32), (1, 8, 64, 64), (1, 16, 128, 128), (4, 16, 128, 128)]
CASES = [("allgather", None), ("ring", None), ("allscan", 4), ("allscan", 16)]
SCAN_SHAPE = (1, 1024, 4, 64)  # sp_linear_scan rows: q, k, v [B, T_local, H, K=V]


def _port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def _time_calls(fn, iters: int, warmup: int = 3):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _worker(rank: int, world: int, port: int, iters: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    import spcompile.collectives as C
    C.set_validation(False)
    pg = dist.group.WORLD
    rows = []
    for shape in SIZES:
        B, H, K, V = shape
        state = torch.randn(shape)
        decay = -torch.rand(B, H)
        for strategy, blocks in CASES:
            def fwd():
                return C.exclusive_state_scan(state, decay, strategy=strategy, group=pg,
                                              blocks=blocks)

            def fwd_bwd():
                s, a = state.clone().requires_grad_(), decay.clone().requires_grad_()
                C.exclusive_state_scan(s, a, strategy=strategy, group=pg,
                                       blocks=blocks).sum().backward()

            with C.count_traffic() as t:
                fwd()
            tf = _time_calls(fwd, iters)
            tb = _time_calls(fwd_bwd, max(3, iters // 2))
            rows.append(dict(shape=shape, strategy=strategy, blocks=blocks, fwd=tf, fwd_bwd=tb,
                             sent=t.sent_bytes, recv=t.recv_bytes))
    # the whole sp_linear_scan (hand-off overlapped with the local scan) vs the local scan alone
    from spcompile.kernels.linear_scan import linear_scan
    B, T, H, K = SCAN_SHAPE
    q, k, v = (torch.randn(B, T, H, K) for _ in range(3))
    g = -torch.rand(B, T, H) * 0.1
    cases = [("local linear_scan", None)] + [(s, None) for s in ("allgather", "ring")] + \
        [("allscan", 4)]
    for strategy, blocks in cases:
        def fwd():
            if strategy == "local linear_scan":
                return linear_scan(q, k, v, g, output_final_state=True)
            return C.sp_linear_scan(q, k, v, g, output_final_state=True, strategy=strategy,
                                    group=pg, blocks=blocks)

        def fwd_bwd():
            ins = [x.clone().requires_grad_() for x in (q, k, v, g)]
            if strategy == "local linear_scan":
                o, st = linear_scan(*ins, output_final_state=True)
            else:
                o, st = C.sp_linear_scan(*ins, output_final_state=True, strategy=strategy,
                                         group=pg, blocks=blocks)
            (o.sum() + st.sum()).backward()

        with C.count_traffic() as t:
            fwd()
        rows.append(dict(shape=(B, T, H, K), strategy="sp_linear_scan " + strategy,
                         blocks=blocks, fwd=_time_calls(fwd, max(3, iters // 2)),
                         fwd_bwd=_time_calls(fwd_bwd, max(3, iters // 4)),
                         sent=t.sent_bytes, recv=t.recv_bytes))
    # the validation round trip alone (one small all_gather)
    C.set_validation(True)
    from spcompile.collectives import runtime as rt
    tv = _time_calls(lambda: rt.check_uniform(pg, "bench", {"a": 1, "b": 2}), iters)
    rows.append(dict(shape=(0,), strategy="validate", blocks=None, fwd=tv, fwd_bwd=[0.0],
                     sent=0, recv=0))
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        merged = []
        for i, row in enumerate(gathered[0]):
            per = [g[i] for g in gathered]
            merged.append(dict(
                P=world, shape=list(row["shape"]), strategy=row["strategy"],
                blocks=row["blocks"],
                state_bytes=_state_bytes(row),
                fwd_ms=1e3 * statistics.median(max(p["fwd"][j] for p in per)
                                               for j in range(len(row["fwd"]))),
                fwd_bwd_ms=1e3 * statistics.median(max(p["fwd_bwd"][j] for p in per)
                                                   for j in range(len(row["fwd_bwd"]))),
                sent_max=max(p["sent"] for p in per), recv_max=max(p["recv"] for p in per)))
        with open(path, "w") as f:
            json.dump(merged, f)
    dist.barrier()
    dist.destroy_process_group()


def _state_bytes(row) -> int:
    if row["strategy"] == "validate":
        return 0
    shape = row["shape"]
    if row["strategy"].startswith("sp_linear_scan"):  # [B, T, H, K]: the state is [B, H, K, K]
        shape = (shape[0], shape[2], shape[3], shape[3])
    return 4 * int(torch.tensor(shape).prod())


def run(world: int, iters: int):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "rows.json")
        mp.spawn(_worker, args=(world, _port(), iters, path), nprocs=world, join=True)
        with open(path) as f:
            return json.load(f)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    rows = []
    for P in args.world:
        rows += run(P, args.iters)
    print(f"exclusive_state_scan on gloo, torch {torch.__version__}, {os.cpu_count()} CPUs; "
          f"median ms of the slowest rank; bytes per rank per forward (max over ranks)")
    hdr = f"{'P':>2} {'shape':>18} {'state':>9} {'strategy':>28} {'fwd ms':>8} " \
          f"{'fwd+bwd ms':>10} {'sent':>10} {'recv':>10}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        name = r["strategy"] + (f"/{r['blocks']}" if r["blocks"] else "")
        shape = "-" if r["strategy"] == "validate" else str(r["shape"]).replace(" ", "")
        print(f"{r['P']:>2} {shape:>18} {_fmt_bytes(r['state_bytes']):>9} {name:>28} "
              f"{r['fwd_ms']:>8.3f} {r['fwd_bwd_ms']:>10.3f} {_fmt_bytes(r['sent_max']):>10} "
              f"{_fmt_bytes(r['recv_max']):>10}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
