"""CPU: the chunked reference linear scan vs the masked quadratic form it replaces.

    python benchmarks/reference_vs_quadratic.py [--T 4096] [--B 1 --H 4 --D 64]

The quadratic form is what model code writes for causal linear attention with decay:
``o = ((q kᵀ) ⊙ M) v`` with ``M_ij = exp(b_i - b_j)`` for ``j <= i`` (``b`` the cumulative log
decay; all ones for plain linear attention), an ``O(T²)`` computation and a ``T×T`` mask per
head. The reference (``chunked_linear_scan``, chunk 64) is ``O(T·C)``. Both run in fp32 on the
same inputs; the table gives median wall-clock milliseconds (forward, and forward+backward) and
the speedup, and the script checks that both compute the same output. "chunked" is the public op
``spcompile.kernels.linear_scan`` on CPU: the reference forward and its hand-written chunked
backward; forward+backward takes gradients for q, k, v and the gates.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from spcompile.kernels.linear_scan import linear_scan  # noqa: E402


def quadratic(q, k, v, log_decay, scale):
    """((q kᵀ) ⊙ mask) v, per head: q, k [B, T, H, K], log_decay None | [B, T, H]."""
    T = q.shape[1]
    scores = torch.einsum("bihk,bjhk->bhij", q, k) * scale
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    if log_decay is None:
        mask = causal.to(q.dtype)
    else:
        b = log_decay.cumsum(1).transpose(1, 2)  # [B, H, T]
        mask = (b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()
    return torch.einsum("bhij,bjhv->bihv", scores * mask, v)


def chunked(q, k, v, log_decay, scale):
    """The public op on CPU: the chunked reference forward and its hand-written backward."""
    return linear_scan(q, k, v, log_decay, scale=scale, chunk_size=64)[0]


def timeit(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * sorted(ts)[len(ts) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    B, T, H, D = args.B, args.T, args.H, args.D
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D) for _ in range(3))
    scale = D ** -0.5
    rows = []
    for kind, ld in (("none", None), ("scalar", F.logsigmoid(torch.randn(B, T, H) + 4))):
        err = ((quadratic(q, k, v, ld, scale) - chunked(q, k, v, ld, scale)).norm()
               / quadratic(q, k, v, ld, scale).norm()).item()
        for mode in ("fwd", "fwd+bwd"):
            res = {}
            for name, fn in (("quadratic", quadratic), ("chunked", chunked)):
                if mode == "fwd":
                    with torch.no_grad():
                        fn(q, k, v, ld, scale)  # warm-up
                        res[name] = timeit(lambda: fn(q, k, v, ld, scale), args.reps)
                else:
                    # gradients for q, k, v and the (learned) gates
                    leaves = [None if x is None else x.clone().requires_grad_()
                              for x in (q, k, v, ld)]

                    def step():
                        fn(*leaves[:3], leaves[3], scale).sum().backward()
                    step()
                    res[name] = timeit(step, args.reps)
            row = {"T": T, "B": B, "H": H, "D": D, "decay": kind, "mode": mode,
                   "quadratic_ms": round(res["quadratic"], 1), "chunked_ms": round(res["chunked"], 1),
                   "speedup": round(res["quadratic"] / res["chunked"], 1), "rel_err": float(f"{err:.1e}")}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\nCPU ({torch.get_num_threads()} threads, torch {torch.__version__}), fp32, "
          f"B={B} H={H} K=V={D}, median of {args.reps}")
    print("| T | decay | mode | masked quadratic ms | chunked reference ms | speedup |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['T']} | {r['decay']} | {r['mode']} | {r['quadratic_ms']} | {r['chunked_ms']} | "
              f"{r['speedup']}x |")


if __name__ == "__main__":
    main()
