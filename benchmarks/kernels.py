"""Benchmark (and CUDA check) of ``spcompile.kernels.linear_scan`` against fla and the reference.

    python benchmarks/kernels.py                 # every decay kind, T in {8192, 32768}
    python benchmarks/kernels.py --check         # Triton vs fp64 reference on CUDA first
    python benchmarks/kernels.py --T 8192 --kinds scalar --no-fla --jsonl out.jsonl
    python benchmarks/kernels.py --T 32768 --kinds none scalar --profile   # per-kernel split

Shapes follow ANCHORS.md: B=1, H=16, K=V=128, bf16, ``[B, T, H, D]``. For each (T, decay kind,
forward | forward+backward) it prints milliseconds (``triton.testing.do_bench``, median) of
spcompile's Triton path, fla 0.6 when importable (plain: ``chunk_linear_attn(normalize=False)``;
per-head: ``chunk_retention``, whose decays spcompile is given too; scalar: ``chunk_simple_gla``;
vector: ``chunk_gla``) and the chunked PyTorch reference, the ratio fla/spcompile from the same
run, and the roofline (max of bytes / 3.0 TB/s and flops / 790 TFLOP/s, ANCHORS.md's figures).
One JSON line per case is printed (and appended to ``--jsonl``), then a table, then the launch
configs the Triton path's autotuner picked (``--no-autotune`` benchmarks the untuned defaults).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from spcompile.kernels.linear_scan import linear_scan  # noqa: E402
from spcompile.kernels.linear_scan.reference import chunked_linear_scan  # noqa: E402

KINDS = ["none", "head", "scalar", "vector"]
BW, FLOPS = 3.0e12, 790e12  # bytes/s and bf16 flop/s of an H100 (ANCHORS.md)


def roofline_ms(kind: str, B: int, T: int, H: int, K: int, V: int, fwd_bwd: bool,
                C: int = 64) -> float:
    """Lower bound: each input read once, each output written once (bf16), chunked flops."""
    x = B * T * H * 2
    g = {"none": 0, "head": 0, "scalar": x, "vector": x * K}[kind]
    fwd_bytes = x * (2 * K + 2 * V) + g  # q, k, v in; o out
    fwd_flops = B * T * H * (2 * C * (K + V) + 4 * K * V)
    if not fwd_bwd:
        return 1e3 * max(fwd_bytes / BW, fwd_flops / FLOPS)
    bwd_bytes = x * (2 * K + 2 * V) + g + x * (2 * K + V) + g  # q,k,v,do (+g) in; dq,dk,dv (+dg)
    return 1e3 * max((fwd_bytes + bwd_bytes) / BW, 3 * fwd_flops / FLOPS)


def retnet_log_decay(H: int, device) -> torch.Tensor:
    """RetNet's fixed per-head decays (fla's chunk_retention uses the same)."""
    return torch.log(1 - torch.pow(2.0, -5.0 - torch.arange(H, dtype=torch.float32))).to(device)


def make(kind: str, B: int, T: int, H: int, K: int, V: int, dtype, device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, T, H, K, device=device, dtype=dtype, generator=g)
    k = torch.randn(B, T, H, K, device=device, dtype=dtype, generator=g)
    v = torch.randn(B, T, H, V, device=device, dtype=dtype, generator=g)
    if kind == "none":
        ld = None
    elif kind == "head":
        ld = retnet_log_decay(H, device)
    elif kind == "scalar":
        ld = F.logsigmoid(torch.randn(B, T, H, device=device, generator=g)).to(dtype)
    else:
        ld = F.logsigmoid(torch.randn(B, T, H, K, device=device, generator=g)).to(dtype)
    return q, k, v, ld


def fla_fn(kind: str) -> Optional[Callable]:
    """fla's op for this decay kind → f(q, k, v, ld) -> o, or None when fla is missing."""
    try:
        if kind == "none":
            from fla.ops.linear_attn import chunk_linear_attn
            return lambda q, k, v, ld: chunk_linear_attn(q, k, v, normalize=False)[0]
        if kind == "head":
            from fla.ops.retention import chunk_retention
            return lambda q, k, v, ld: chunk_retention(q, k, v)[0]
        if kind == "scalar":
            from fla.ops.simple_gla import chunk_simple_gla
            return lambda q, k, v, ld: chunk_simple_gla(q, k, v, g=ld)[0]
        from fla.ops.gla import chunk_gla
        return lambda q, k, v, ld: chunk_gla(q, k, v, g=ld)[0]
    except ImportError:
        return None


def sp_fn(q, k, v, ld):
    return linear_scan(q, k, v, ld)[0]


def ref_fn(q, k, v, ld):
    return chunked_linear_scan(q, k, v, ld, q.shape[-1] ** -0.5, None, 64)[0]


def _time(f: Callable, rep: int, grad_to_none) -> float:
    """Median ms: do_bench (CUDA events) on CUDA, a host clock in CPU smoke runs."""
    if torch.cuda.is_available():
        import triton
        return triton.testing.do_bench(f, warmup=25, rep=rep, return_mode="median",
                                       grad_to_none=grad_to_none)
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        f()
        ts.append(1e3 * (time.perf_counter() - t0))
    return sorted(ts)[1]


def _runner(fn: Callable, inputs, fwd_bwd: bool):
    """One call of ``fn`` as the benchmark times it → (callable, leaves whose grads to reset)."""
    q, k, v, ld = inputs
    if not fwd_bwd:
        def fwd():
            with torch.no_grad():
                fn(q, k, v, ld)
        return fwd, None
    leaves = [x.detach().requires_grad_() if x is not None and x.is_floating_point() else x
              for x in inputs]
    do = torch.randn_like(v)

    def step():
        fn(*leaves).backward(do)
    return step, [x for x in leaves if x is not None]


def bench(fn: Callable, inputs, fwd_bwd: bool, rep: int = 200) -> float:
    once, grads = _runner(fn, inputs, fwd_bwd)
    return _time(once, rep, grads)


def run_bench(args) -> List[Dict]:
    B, H, K, V, dev, dt = 1, args.H, args.D, args.D, args.device, torch.bfloat16
    rows = []
    for T in args.T:
        for kind in args.kinds:
            inputs = make(kind, B, T, H, K, V, dt, dev)
            for fb in (False, True):
                row = {"T": T, "kind": kind, "mode": "fwd+bwd" if fb else "fwd",
                       "roofline_ms": round(roofline_ms(kind, B, T, H, K, V, fb), 4)}
                t0 = time.time()
                try:
                    row["spcompile_ms"] = round(bench(sp_fn, inputs, fb), 4)
                except Exception as e:
                    row["spcompile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                f = None if args.no_fla else fla_fn(kind)
                if f is not None:
                    try:
                        row["fla_ms"] = round(bench(f, inputs, fb), 4)
                        if "spcompile_ms" in row:
                            row["ratio_fla_over_spcompile"] = round(
                                row["fla_ms"] / row["spcompile_ms"], 3)
                    except Exception as e:  # e.g. fla's gated backward refusing Hopper + old Triton
                        row["fla_error"] = f"{type(e).__name__}: {str(e)[:160]}"
                if not args.no_reference:
                    try:
                        row["reference_ms"] = round(bench(ref_fn, inputs, fb, rep=50), 3)
                    except Exception as e:  # out of memory at long T
                        row["reference_error"] = f"{type(e).__name__}: {str(e)[:120]}"
                    if dev == "cuda":
                        torch.cuda.empty_cache()
                row["wall_s"] = round(time.time() - t0, 1)
                line = json.dumps(row)
                print(line, flush=True)
                if args.jsonl:
                    with open(args.jsonl, "a") as fh:
                        fh.write(line + "\n")
                rows.append(row)
    return rows


def print_table(rows: List[Dict]) -> None:
    cols = ["T", "kind", "mode", "spcompile_ms", "fla_ms", "ratio_fla_over_spcompile",
            "reference_ms", "roofline_ms"]
    heads = ["T", "decay", "mode", "spcompile ms", "fla ms", "fla/sp", "reference ms", "roofline ms"]
    print("| " + " | ".join(heads) + " |")
    print("|" + "---|" * len(heads))
    for r in rows:
        cells = [str(r.get(c, "err" if c == "fla_ms" and "fla_error" in r else "-")) for c in cols]
        print("| " + " | ".join(cells) + " |")


def check_case(dt, kind: str, B: int, T: int, H: int, D: int, dev: str) -> Dict:
    """One Triton-vs-fp64-reference comparison: output, final state and every gradient."""
    from spcompile.kernels.linear_scan import kernel_for
    tol = 1e-4 if dt == torch.float32 else 2e-2
    t0 = time.time()
    q, k, v, ld = make(kind, B, T, H, D, D, dt, dev, seed=T)
    if ld is not None and kind != "head":
        ld = ld.clone()
        ld.view(-1)[::97] = -math.inf  # decays of exactly 0 on the way
    h0 = torch.randn(B, H, D, D, device=dev)
    assert kernel_for(q) == "triton", "these inputs should dispatch to Triton"
    leaves = [x.detach().requires_grad_() if x is not None else None for x in (q, k, v, ld, h0)]
    o, S = linear_scan(*leaves[:4], initial_state=leaves[4], output_final_state=True)
    do, dS = torch.randn_like(o), torch.randn_like(S)
    gr = torch.autograd.grad([o, S], [x for x in leaves if x is not None], [do, dS])
    up = [x.detach().double().requires_grad_() if x is not None else None
          for x in (q, k, v, ld, h0)]
    ro, rS = chunked_linear_scan(*up[:4], D ** -0.5, up[4], 64)
    rgr = torch.autograd.grad([ro, rS], [x for x in up if x is not None],
                              [do.double(), dS.double()])
    names = ["o", "S", "dq", "dk", "dv"] + (["dg"] if ld is not None else []) + ["dh0"]
    errs = {}
    for n, a, b in zip(names, [o, S, *gr], [ro, rS, *rgr]):
        a = a.double()
        errs[n] = (math.inf if not torch.isfinite(a).all()
                   else ((a - b).norm() / b.norm().clamp_min(1e-30)).item())
    # dlog_decay sums many cancelling terms: bf16 rounding shows more there
    good = all(e < (2.5 * tol if n == "dg" else tol) for n, e in errs.items())
    return {"check": "triton_vs_reference", "dtype": str(dt)[6:], "kind": kind, "B": B, "T": T,
            "H": H, "D": D, "ok": good, "wall_s": round(time.time() - t0, 1),
            "rel_err": {n: float(f"{e:.2e}") for n, e in errs.items()}}


def run_check(args) -> bool:
    """Triton vs the fp64 reference: forward and every gradient, all decay kinds."""
    dev = args.device
    # (dtype, kind, B, T, H, D): T not a multiple of the chunk; H=16, D=128 reuse the
    # benchmark's compiled kernels (T is not specialised), D=64 and fp32 add their own.
    if dev == "cuda":
        cases = [(torch.bfloat16, kd, 1, 1000, 16, 128) for kd in KINDS]
        cases += [(torch.bfloat16, kd, 2, 77, 2, 64) for kd in ("none", "vector")]
        cases += [(torch.float32, kd, 1, 333, 16, 128) for kd in ("none", "scalar", "vector")]
        if args.quick:
            cases = cases[:4] + cases[5:6] + cases[-1:]
    else:
        cases = [(dt, kd, 1, 70, 1, 32) for dt in (torch.float32, torch.bfloat16) for kd in KINDS]
    ok = True
    for dt, kind, B, T, H, D in cases:
        try:
            res = check_case(dt, kind, B, T, H, D, dev)
        except Exception as e:  # keep going: report every case
            res = {"check": "triton_vs_reference", "dtype": str(dt)[6:], "kind": kind, "D": D,
                   "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        ok &= res["ok"]
        print(json.dumps(res), flush=True)
    return ok


def kernel_times(fn: Callable, inputs, fwd_bwd: bool, iters: int = 10) -> List[Dict]:
    """Per-kernel time of ``iters`` calls under ``torch.profiler``: [{kernel, calls, us/call}],
    slowest first. (CPU smoke runs profile CPU ops instead: the plumbing, not the numbers.)"""
    from torch.profiler import ProfilerActivity, profile
    once, _ = _runner(fn, inputs, fwd_bwd)
    for _ in range(3):  # compile, autotune, warm up outside the profile
        once()
    cuda = inputs[0].is_cuda
    acts = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        for _ in range(iters):
            once()
        if cuda:
            torch.cuda.synchronize()
    out = []
    for e in prof.key_averages():
        if cuda:  # kernels only: CPU-side ops also carry their children's device time
            if getattr(getattr(e, "device_type", None), "name", "CUDA") != "CUDA":
                continue
            tot = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        else:
            tot = e.self_cpu_time_total
        if tot > 0:
            out.append({"kernel": e.key[:60], "calls": max(1, e.count // iters),
                        "us_per_iter": round(tot / iters, 1)})
    out.sort(key=lambda r: -r["us_per_iter"])
    return out[:12]


def run_profile(args) -> None:
    """Where the time goes: spcompile's kernels next to fla's, per (T, kind, mode) asked for."""
    B, H, K, V, dev, dt = 1, args.H, args.D, args.D, args.device, torch.bfloat16
    for T in args.T:
        for kind in args.kinds:
            inputs = make(kind, B, T, H, K, V, dt, dev)
            for fb in (False, True):
                for name, f in (("spcompile", sp_fn),
                                ("fla", None if args.no_fla else fla_fn(kind))):
                    if f is None:
                        continue
                    try:
                        ks = kernel_times(f, inputs, fb)
                    except Exception as e:
                        ks = [{"error": f"{type(e).__name__}: {str(e)[:160]}"}]
                    line = {"profile": name, "T": T, "kind": kind,
                            "mode": "fwd+bwd" if fb else "fwd", "kernels": ks}
                    print(json.dumps(line), flush=True)
                    if args.jsonl:
                        with open(args.jsonl, "a") as fh:
                            fh.write(json.dumps(line) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS)
    ap.add_argument("--check", action="store_true", help="run the CUDA correctness check first")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--jsonl", default=None, help="append one JSON line per case to this file")
    ap.add_argument("--no-autotune", action="store_true",
                    help="benchmark the untuned default launch configs "
                         "(SPCOMPILE_TRITON_AUTOTUNE=0) instead of the autotuned ones")
    ap.add_argument("--quick", action="store_true",
                    help="fewer check cases (short device leases)")
    ap.add_argument("--profile", action="store_true",
                    help="after the table, per-kernel times (torch.profiler) of spcompile and fla "
                         "for every --T/--kinds case: which kernel loses the time")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny CPU run of this script's plumbing (needs TRITON_INTERPRET=1)")
    args = ap.parse_args()
    if args.no_autotune:
        os.environ["SPCOMPILE_TRITON_AUTOTUNE"] = "0"
    args.H, args.D, args.device = 16, 128, "cuda"
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--smoke runs the kernels interpreted: set TRITON_INTERPRET=1")
        os.environ["SPCOMPILE_KERNEL"] = "triton"
        args.H, args.D, args.device, args.T = 2, 32, "cpu", [100]
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA device (the Triton path runs on CUDA only); "
                 "--smoke checks the script on the CPU")
    import triton
    info = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (smoke)",
            "torch": torch.__version__, "triton": triton.__version__}
    try:
        import importlib.metadata as md
        info["fla"] = md.version("fla-core")
    except Exception:
        info["fla"] = None
    info["autotune"] = not args.no_autotune
    print(json.dumps(info), flush=True)
    if args.check or args.check_only:
        ok = run_check(args)
        print(json.dumps({"check_passed": ok}), flush=True)
        if args.check_only:
            sys.exit(0 if ok else 1)
    rows = run_bench(args)
    print()
    print(f"B=1 H={args.H} K=V={args.D} bf16 on {info['device']} (torch {info['torch']}, triton "
          f"{info['triton']}, fla {info['fla']}); do_bench median ms")
    print_table(rows)
    from spcompile.kernels.linear_scan import triton_impl
    picks = triton_impl.tuned_configs()
    print(f"\nlaunch configs: {'autotuned (first call per problem class)' if picks else 'defaults'}")
    for key, cfg in picks.items():
        print(f"  {key}: {json.dumps(cfg)}")
        if args.jsonl:
            with open(args.jsonl, "a") as fh:
                fh.write(json.dumps({"tuned": key, "cfg": cfg}) + "\n")
    if args.profile:
        print("\nper-kernel times (us per call of the op, torch.profiler):")
        run_profile(args)


if __name__ == "__main__":
    main()
