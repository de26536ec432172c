"""``spcompile cost`` and ``spcompile calibrate``.

``register(subparsers)`` adds both subcommands to an argparse parser (the main ``spcompile``
CLI calls it); ``main(argv)`` runs them standalone: ``python -m spcompile.cost_model.cli cost``.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from typing import Any, Dict, List, Optional, Sequence

import sympy as sp

from . import formulas as fm
from .planner import EXTRAS, KINDS, crossover, crossover_formula, expressions, plan
from .profiles import describe, load_profile, presets


def parse_count(text: str) -> int:
    """``2048K`` → 2097152, ``8M`` → 8388608, ``1G``; plain integers as they are."""
    t = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    if mult != 1:
        t = t[:-1]
    try:
        return int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (e.g. 4096, 2048K, 8M)")


def _count_list(text: str) -> List[int]:
    return [parse_count(x) for x in text.split(",") if x.strip()]


def register(subparsers: Any) -> None:
    """Add the ``cost`` and ``calibrate`` subcommands to an argparse subparsers object."""
    c = subparsers.add_parser(
        "cost", help="predicted time per strategy: formulas, table over P and T, crossovers, plot",
        description="Evaluate the cost model: print the sympy formulas (--formulas), a table of "
                    "predicted per-rank, per-layer times for every strategy of --kind over the "
                    "P and T lists, the P (or T) where two strategies tie, and optionally a PNG "
                    "plot of time vs P per strategy (needs matplotlib).")
    c.add_argument("--kind", choices=sorted(KINDS), default="linear_scan")
    c.add_argument("--hardware", default=None,
                   help=f"preset ({', '.join(presets())}), a profile JSON path, or omitted for "
                        f"the default (env SPCOMPILE_HARDWARE, ~/.cache/spcompile/profile.json, "
                        f"cpu_gloo)")
    c.add_argument("--B", type=int, default=1)
    c.add_argument("--T", type=_count_list, default=[1 << 21],
                   help="GLOBAL sequence lengths, comma separated; K/M/G suffixes (default 2048K)")
    c.add_argument("--P", type=_count_list, default=[1, 2, 4, 8, 16, 32, 64, 128, 256],
                   help="ranks, comma separated (default 1,2,...,256)")
    c.add_argument("--H", type=int, default=16)
    c.add_argument("--d-k", type=int, default=128)
    c.add_argument("--d-v", type=int, default=128)
    c.add_argument("--decay", choices=fm.DECAY_KINDS, default="none", help="linear_scan decay")
    c.add_argument("--ring-schedule", choices=fm.RING_SCHEDULES, default="handoff",
                   help="linear_scan ring: spcompile's hand-off chain, or LASP-1's schedule "
                        "(every hop runs the rank's local kernels)")
    c.add_argument("--blocks", type=int, default=None, help="All-Scan K (default: optimal)")
    c.add_argument("--H-kv", type=int, default=None, help="attention: key/value heads (GQA)")
    c.add_argument("--non-causal", action="store_true", help="attention: no causal mask")
    c.add_argument("--width", type=int, default=3, help="halo: width in tokens")
    c.add_argument("--nbytes", type=parse_count, default=None,
                   help="allreduce: message bytes (default one state B*H*d_k*d_v*4)")
    c.add_argument("--training", action="store_true", help="forward + backward instead of forward")
    c.add_argument("--formulas", action="store_true", help="print the sympy expressions")
    c.add_argument("--solve-for", choices=("P", "T"), default="P",
                   help="crossovers in P (at the first T) or in T (at the largest P)")
    c.add_argument("--plot", default=None, metavar="OUT.png",
                   help="write predicted time vs P per strategy (one panel per T)")
    c.set_defaults(func=cmd_cost)

    k = subparsers.add_parser(
        "calibrate", help="measure alpha/beta of the collectives and kernel throughput",
        description="Spawn --nproc processes (gloo on CPU, nccl when enough GPUs), time "
                    "send/recv, all_gather, all_reduce and all_to_all at several sizes, refit "
                    "p2p/allgather on spcompile's hand-off ops (unless --raw), fit alpha/beta by "
                    "least squares, time a copy and spcompile.kernels.linear_scan for M and F, "
                    "and write a profile JSON that the planner uses by default.")
    k.add_argument("--nproc", type=int, default=2, help="processes to spawn (>= 2)")
    k.add_argument("--out", default=None,
                   help="profile path (default ~/.cache/spcompile/profile.json)")
    k.add_argument("--backend", choices=("gloo", "nccl"), default=None)
    k.add_argument("--repeats", type=int, default=10, help="timings per point (best is kept)")
    k.add_argument("--no-kernel", action="store_true",
                   help="skip the linear_scan timing (F); M is still measured by a copy")
    k.add_argument("--raw", action="store_true",
                   help="fit p2p/allgather on the raw collectives only, not on spcompile's "
                        "hand-off ops")
    k.set_defaults(func=cmd_calibrate)


def _options(args: argparse.Namespace) -> Dict[str, Any]:
    all_opts = {"decay": args.decay, "ring_schedule": args.ring_schedule, "blocks": args.blocks,
                "training": args.training, "H_kv": args.H_kv, "causal": not args.non_causal,
                "width": args.width, "nbytes": args.nbytes}
    return {k: v for k, v in all_opts.items() if k in EXTRAS[args.kind]}


def _show(expr: sp.Expr) -> str:
    """Print with the P == 1 switch as a readable indicator ``[P>1]``."""
    return str(expr.subs(fm.MULTI, sp.Symbol("[P>1]")))


def cmd_cost(args: argparse.Namespace, out: Any = None) -> int:
    out = out or sys.stdout
    prof = load_profile(args.hardware)
    opts = _options(args)
    shapes = dict(B=args.B, H=args.H, d_k=args.d_k, d_v=args.d_v)
    strategies = KINDS[args.kind]
    print(f"# {args.kind} on {prof.name} ({'training' if args.training else 'forward'}, "
          f"per rank and layer); shapes {shapes}, options {opts}", file=out)
    print(describe(prof), file=out)
    if args.formulas:
        print("\n## formulas (seconds; [P>1] is 0 for one rank, else 1)", file=out)
        for s in strategies:
            terms, total, memory = expressions(
                args.kind, s, decay=opts.get("decay", "none"), causal=opts.get("causal", True),
                ring_schedule=opts.get("ring_schedule", "handoff"),
                training=bool(opts.get("training", False)))
            print(f"{s}:\n  total = {_show(total)}", file=out)
            for name, e in terms.items():
                print(f"  {name} = {_show(e)}", file=out)
            print(f"  memory = {_show(memory)}  (bytes per rank)", file=out)
    rows = []
    print("\n## predicted ms per rank and layer (best marked *)", file=out)
    header = f"{'T':>10} {'P':>5} " + " ".join(f"{s:>15}" for s in strategies) + "  best"
    print(header, file=out)
    for T in args.T:
        for P in args.P:
            if T % P:
                continue
            ranked = plan(args.kind, T=T, P=P, hardware=prof, **shapes, **opts)
            by = {c.strategy: c for c in ranked}
            best = ranked[0].strategy if ranked[0].feasible else "-"
            cells = []
            for s in strategies:
                c = by[s]
                cell = "n/a" if not c.feasible else f"{c.seconds * 1e3:.4g}"
                cells.append(f"{cell + ('*' if s == best else ''):>15}")
            print(f"{T:>10} {P:>5} " + " ".join(cells) + f"  {best}", file=out)
            rows.append((T, P, by))
    print(f"\n## crossovers (solve for {args.solve_for})", file=out)
    fixed: Dict[str, Any] = dict(shapes, **opts)
    if args.solve_for == "P":
        fixed["T"] = args.T[0]
        rng = dict(lo=max(1, min(args.P)), hi=max(args.P))
    else:
        fixed["P"] = max(args.P)
        rng = {}
    for a, b in itertools.combinations(strategies, 2):
        xs = crossover(args.kind, a, b, args.solve_for, hardware=prof, **rng, **fixed)
        where = "; ".join(str(x) for x in xs) if xs else "none in range"
        print(f"{a} vs {b}: {where}", file=out)
        if args.solve_for == "P":
            try:
                sym = crossover_formula(args.kind, a, b, "P", decay=opts.get("decay", "none"))
            except NotImplementedError:
                sym = []
            shown = ", ".join(str(s) for s in sym) if sym else "no solution"
            print(f"    communication terms alone tie at P = {shown}", file=out)
    if args.plot:
        _plot(args, rows, strategies, prof.name)
        print(f"\nwrote {args.plot}", file=out)
    return 0


def _plot(args: argparse.Namespace, rows: Sequence[Any], strategies: Sequence[str],
          hw: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib (pip install matplotlib)")
    Ts = sorted({r[0] for r in rows})
    fig, axes = plt.subplots(1, len(Ts), figsize=(5 * len(Ts), 4), squeeze=False)
    for ax, T in zip(axes[0], Ts):
        for s in strategies:
            pts = [(P, by[s].seconds * 1e3) for (t, P, by) in rows if t == T and by[s].feasible]
            if pts:
                ax.plot([p for p, _ in pts], [y for _, y in pts], marker="o", label=s)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("P (ranks)")
        ax.set_ylabel("predicted ms per rank and layer")
        ax.set_title(f"{args.kind}, T={T}, {hw}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)
    plt.close(fig)


def cmd_calibrate(args: argparse.Namespace, out: Any = None) -> int:
    from .calibrate import calibrate
    out = out or sys.stdout
    prof = calibrate(args.nproc, args.out, backend=args.backend, repeats=args.repeats,
                     kernel=not args.no_kernel, handoff=not args.raw)
    print(describe(prof), file=out)
    print(f"wrote {prof.source}", file=out)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spcompile.cost_model.cli",
                                     description="spcompile cost model: cost and calibrate")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
