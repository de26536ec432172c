"""Worker side of tests/test_collectives.py: one gloo spawn per world size runs every check.

Each rank builds the *full* problem from a shared seed, runs the distributed op on its shard, and
compares with a single-process reference on the full data (float64, so tolerances are tight).
Results go to ``<outdir>/rank<r>.json`` as records ``{name, err, tol, ok, info}``; the pytest side
asserts them and prints the worst error per check.
"""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

import spcompile.collectives as C
from spcompile.kernels.linear_scan import linear_scan

DT = torch.float64


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Recorder:
    def __init__(self):
        self.records: List[Dict] = []

    def close(self, name: str, got, want, tol: float = 1e-9) -> None:
        if got is None or want is None:
            ok = got is None and want is None
            self.records.append(dict(name=name, err=0.0 if ok else math.inf, tol=tol, ok=ok,
                                     info="None mismatch" if not ok else ""))
            return
        got, want = got.detach().to(DT), want.detach().to(DT)
        if got.shape != want.shape:
            self.records.append(dict(name=name, err=math.inf, tol=tol, ok=False,
                                     info=f"shape {tuple(got.shape)} vs {tuple(want.shape)}"))
            return
        denom = max(1.0, want.abs().max().item()) if want.numel() else 1.0
        err = (got - want).abs().max().item() / denom if want.numel() else 0.0
        ok = bool(err <= tol) and bool(torch.isfinite(got).all())
        self.records.append(dict(name=name, err=err, tol=tol, ok=ok, info=""))

    def true(self, name: str, cond: bool, info: str = "") -> None:
        self.records.append(dict(name=name, err=0.0 if cond else math.inf, tol=0.0,
                                 ok=bool(cond), info=info))


def shard(x: torch.Tensor, dim: int, r: int, P: int) -> torch.Tensor:
    n = x.shape[dim] // P
    return x.narrow(dim, r * n, n)


def leaf(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if x is None else x.detach().clone().requires_grad_()


def grads(loss: torch.Tensor, xs: List[Optional[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
    present = [x for x in xs if x is not None and x.requires_grad]
    gs = iter(torch.autograd.grad(loss, present, allow_unused=True))
    out = []
    for x in xs:
        if x is None or not x.requires_grad:
            out.append(None)
        else:
            g = next(gs)
            out.append(torch.zeros_like(x) if g is None else g)
    return out


def sum_over_ranks(x: torch.Tensor, group=None) -> torch.Tensor:
    y = x.detach().clone()
    dist.all_reduce(y, group=group)
    return y


# ------------------------------------------------------------------------------- state scan checks

def reference_exclusive_scan(S: torch.Tensor, a: Optional[torch.Tensor]) -> torch.Tensor:
    """S [P, B, H, K, V], a None | [P, B, H] | [P, B, H, K] → incoming [P, ...] (sequential)."""
    out, acc = [], torch.zeros_like(S[0])
    for j in range(S.shape[0]):
        out.append(acc)
        w = None if a is None else a[j].exp()
        if w is not None:
            w = w[..., None, None] if a.dim() == 3 else w[..., None]
        acc = (acc if w is None else w * acc) + S[j]
    return torch.stack(out)


def check_state_scan(rec: Recorder, r: int, P: int) -> None:
    B, H, K, V = 2, 3, 5, 4
    g = torch.Generator().manual_seed(1)
    S = torch.randn(P, B, H, K, V, generator=g, dtype=DT)
    W = torch.randn(P, B, H, K, V, generator=g, dtype=DT)
    decays = {
        "none": None,
        "scalar": -torch.rand(P, B, H, generator=g, dtype=DT) * 2,
        "vector": -torch.rand(P, B, H, K, generator=g, dtype=DT) * 2,
    }
    under = -torch.rand(P, B, H, K, generator=g, dtype=DT)
    under[:, :, 0] = -800.0            # exp underflows to exactly 0 (fp64)
    under[:, 1, 1, 2] = -math.inf      # a decay of exactly zero
    decays["vector_underflow"] = under
    us = -torch.rand(P, B, H, generator=g, dtype=DT)
    us[:, 0, :] = -900.0
    decays["scalar_underflow"] = us
    for kind, a_full in decays.items():
        Sr, ar = leaf(S), leaf(a_full)
        ref = reference_exclusive_scan(Sr, ar)
        gS_ref, ga_ref = grads((ref * W).sum(), [Sr, ar])
        for strategy in C.STRATEGIES:
            for blocks in ((2, 5) if strategy == "allscan" else (None,)):
                tag = f"scan/{strategy}{'' if blocks is None else blocks}/{kind}"
                s_loc, a_loc = leaf(S[r]), leaf(None if a_full is None else a_full[r])
                with C.count_traffic() as t:
                    inc = C.exclusive_state_scan(s_loc, a_loc, strategy=strategy,
                                                 group=dist.group.WORLD, blocks=blocks)
                    gS, ga = grads((inc * W[r]).sum(), [s_loc, a_loc])
                rec.close(tag + "/fwd", inc, ref[r])
                rec.close(tag + "/dstate", gS, gS_ref[r])
                rec.close(tag + "/dlog_decay", ga, None if ga_ref is None else ga_ref[r])
                # traffic vs formula (forward + backward, each moves the same)
                nS = S[r].numel() * 8
                na = 0 if a_full is None else a_full[r].numel() * 8
                if strategy == "allgather":
                    want = (2 * (P - 1) * (nS + na), 2 * (P - 1) * (nS + na))
                else:  # fwd chain r-1 → r → r+1, bwd chain r+1 → r → r-1: one state each way
                    sent = (nS if r < P - 1 else 0) + (nS if r > 0 else 0)
                    want = (sent, sent)
                got = t.by_strategy.get(strategy, (0, 0))
                rec.true(tag + "/traffic", got == want, f"got {got} want {want}")
                if strategy == "allscan":  # forward alone: exactly one state per rank, last none
                    with C.count_traffic() as t1:
                        C.exclusive_state_scan(S[r], None, strategy="allscan",
                                               group=dist.group.WORLD, blocks=blocks)
                    want1 = (nS if r < P - 1 else 0, nS if r > 0 else 0)
                    rec.true(tag + "/traffic_fwd_one_state", t1.by_strategy["allscan"] == want1,
                             f"got {t1.by_strategy['allscan']} want {want1}")


# --------------------------------------------------------------------------- sp_linear_scan checks

def make_decay(kind: str, B: int, T: int, H: int, K: int, g: torch.Generator):
    if kind == "none":
        return None
    if kind == "head":
        return -torch.rand(H, generator=g, dtype=DT) * 0.5
    if kind == "scalar":
        return -torch.rand(B, T, H, generator=g, dtype=DT) * 0.5
    if kind == "scalar_underflow":
        x = -torch.rand(B, T, H, generator=g, dtype=DT) * 0.5
        x[:, ::3] = -60.0  # below the kernel's floor; shards whose decay vanishes entirely
        return x
    return -torch.rand(B, T, H, K, generator=g, dtype=DT) * 0.5


def check_sp_linear_scan(rec: Recorder, r: int, P: int) -> None:
    B, Tl, H, K, V = 2, 6, 2, 4, 3
    T = Tl * P
    gen = torch.Generator().manual_seed(2)
    for kind in ("none", "head", "scalar", "vector", "scalar_underflow"):
        q, k, v = (torch.randn(B, T, H, d, generator=gen, dtype=DT) for d in (K, K, V))
        g = make_decay(kind, B, T, H, K, gen)
        s0 = torch.randn(B, H, K, V, generator=gen, dtype=DT)
        Wo = torch.randn(B, T, H, V, generator=gen, dtype=DT)
        Ws = torch.randn(P, B, H, K, V, generator=gen, dtype=DT)
        # reference: the full sequence, plus the state at each shard boundary
        ins = [leaf(x) for x in (q, k, v, g, s0)]
        o_ref, _ = linear_scan(ins[0], ins[1], ins[2], ins[3], initial_state=ins[4], chunk_size=4)
        loss = (o_ref * Wo).sum()
        for j in range(P):
            gj = ins[3]
            if gj is not None and gj.dim() > 1:
                gj = gj[:, :(j + 1) * Tl]
            _, sj = linear_scan(ins[0][:, :(j + 1) * Tl], ins[1][:, :(j + 1) * Tl],
                                ins[2][:, :(j + 1) * Tl], gj, initial_state=ins[4],
                                output_final_state=True, chunk_size=4)
            loss = loss + (sj * Ws[j]).sum()
            if j == r:
                s_ref = sj
        ref_grads = grads(loss, ins)
        for strategy in C.STRATEGIES:
            tag = f"sp_scan/{strategy}/{kind}"
            mine = [leaf(shard(q, 1, r, P)), leaf(shard(k, 1, r, P)), leaf(shard(v, 1, r, P)),
                    leaf(g if g is None or g.dim() == 1 else shard(g, 1, r, P)), leaf(s0)]
            o, sf = C.sp_linear_scan(mine[0], mine[1], mine[2], mine[3], initial_state=mine[4],
                                     output_final_state=True, chunk_size=4, strategy=strategy,
                                     group=dist.group.WORLD, blocks=3)
            rec.close(tag + "/o", o, shard(o_ref, 1, r, P))
            rec.close(tag + "/final_state", sf, s_ref)
            gq, gk, gv, gg, gs0 = grads((o * shard(Wo, 1, r, P)).sum() + (sf * Ws[r]).sum(), mine)
            rec.close(tag + "/dq", gq, shard(ref_grads[0], 1, r, P))
            rec.close(tag + "/dk", gk, shard(ref_grads[1], 1, r, P))
            rec.close(tag + "/dv", gv, shard(ref_grads[2], 1, r, P))
            if g is not None:
                want = ref_grads[3] if g.dim() == 1 else shard(ref_grads[3], 1, r, P)
                got = sum_over_ranks(gg) if g.dim() == 1 else gg
                rec.close(tag + "/dlog_decay", got, want)
            rec.close(tag + "/dinitial_state", sum_over_ranks(gs0), ref_grads[4])


CHECKS: Dict[str, Callable] = {
    "state_scan": check_state_scan,
    "sp_linear_scan": check_sp_linear_scan,
}


def _entry(rank: int, world: int, port: int, outdir: str, names: List[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    rec = Recorder()
    timings = {}
    for name in names:
        t0 = time.time()
        try:
            CHECKS[name](rec, rank, world)
        except Exception:  # noqa: BLE001 - reported as a failed record
            rec.true(f"{name}/raised", False, traceback.format_exc()[-3000:])
        timings[name] = time.time() - t0
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(dict(records=rec.records, timings=timings), f)
    sys.stdout.flush()
    os._exit(0)  # skip gloo teardown (a group whose peer timed out can block in its destructor)


def run(world: int, outdir: str, names: List[str]) -> List[Dict]:
    import torch.multiprocessing as mp
    mp.spawn(_entry, args=(world, free_port(), outdir, names), nprocs=world, join=True)
    out = []
    for r in range(world):
        with open(os.path.join(outdir, f"rank{r}.json")) as f:
            d = json.load(f)
        for rec in d["records"]:
            rec["rank"] = r
        out.append(d)
    return out


if __name__ == "__main__":  # python tests/_dist_collectives.py P [check ...]
    import tempfile
    P = int(sys.argv[1])
    names = sys.argv[2:] or list(CHECKS)
    with tempfile.TemporaryDirectory() as d:
        res = run(P, d, names)
    bad = 0
    for r, d in enumerate(res):
        print(f"rank {r} timings: { {k: round(v, 2) for k, v in d['timings'].items()} }")
        for rec in d["records"]:
            if not rec["ok"]:
                bad += 1
                print("FAIL", r, rec["name"], rec["err"], rec["info"][-2000:])
    worst = max((rec["err"] for d in res for rec in d["records"]), default=0)
    print(f"{sum(len(d['records']) for d in res)} records, {bad} failed, worst err {worst:.3g}")
