"""Run many sharded-vs-eager checks in one gloo spawn (a spawn costs seconds; checks cost less).

``run_checks(module, names, world_size)`` spawns ``world_size`` processes; each initialises gloo,
imports ``module`` and runs every function in ``names`` as ``fn(rank, world_size, rec)``; ``rec``
collects ``(name, error, tolerance)`` records. Rank 0 writes them to a JSON file that the test
reads and asserts, printing the worst error per check.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import socket
import tempfile
import traceback
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Rec:
    def __init__(self) -> None:
        self.rows: List[Dict] = []

    def close(self, name: str, got, want, tol: float = 1e-4) -> None:
        """Relative max error ``|got - want|_max / max(|want|_max, 1e-6)`` against ``tol``."""
        got = got.detach().double()
        want = want.detach().double()
        if got.shape != want.shape:
            self.rows.append(dict(name=name, err=math.inf, tol=tol,
                                  info=f"shape {tuple(got.shape)} vs {tuple(want.shape)}"))
            return
        err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item() \
            if want.numel() else 0.0
        if not math.isfinite(err):
            err = math.inf
        self.rows.append(dict(name=name, err=err, tol=tol, info=""))

    def true(self, name: str, cond: bool, info: str = "") -> None:
        self.rows.append(dict(name=name, err=0.0 if cond else math.inf, tol=0.0, info=info))


def _worker(rank: int, world_size: int, port: int, module: str, names: Sequence[str],
            out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    rec = Rec()
    try:
        mod = importlib.import_module(module)
        for name in names:
            try:
                getattr(mod, name)(rank, world_size, rec)
            except Exception:
                rec.rows.append(dict(name=name, err=math.inf, tol=0.0,
                                     info=traceback.format_exc()[-3000:]))
        with open(f"{out}.rank{rank}", "w") as f:
            json.dump(rec.rows, f)
    finally:
        dist.destroy_process_group()


def run_checks(module: str, names: Sequence[str], world_size: int) -> List[Dict]:
    out = tempfile.mktemp(prefix="spcompile_checks_")
    mp.spawn(_worker, args=(world_size, free_port(), module, list(names), out),
             nprocs=world_size, join=True)
    rows: List[Dict] = []
    for r in range(world_size):
        with open(f"{out}.rank{r}") as f:
            for row in json.load(f):
                row["rank"] = r
                rows.append(row)
        os.unlink(f"{out}.rank{r}")
    return rows


def assert_rows(rows: List[Dict]) -> None:
    worst: Dict[str, Dict] = {}
    for row in rows:
        if row["name"] not in worst or row["err"] > worst[row["name"]]["err"]:
            worst[row["name"]] = row
    for name, row in sorted(worst.items()):
        print(f"{name:<60} worst rel err {row['err']:.2e} (tol {row['tol']:.0e}, rank "
              f"{row['rank']})")
    bad = [r for r in worst.values() if not r["err"] <= r["tol"]]
    assert not bad, "\n".join(f"{r['name']} (rank {r['rank']}): err {r['err']} > {r['tol']}\n"
                              f"{r['info']}" for r in bad)
