"""The ``spcompile`` command line: look at what the backend does, and launch sharded runs.

    spcompile explain examples/retnet.py:factory --world-size 4     matches, strategies, fallbacks
    spcompile passes [--disable detect]                             the pass pipeline
    spcompile dump examples/retnet.py:factory --out /tmp/d          graphs before/after each pass
    spcompile cost ... / spcompile calibrate ...                    the cost model (its own CLI)
    spcompile run --nproc 2 examples/train_lm.py                    torchrun, standalone

A TARGET is ``path/to/file.py:factory`` or ``package.module:factory``; ``factory()`` returns
``(model, example_inputs)`` with FULL-sequence inputs. The CLI plans for ``--world-size P`` with a
fake process group (nothing is launched) and feeds the model rank 0's shard of every input that is
sequence-shaped (dim ``--seq-dim``, or the one ``spcompile.mark_sequence`` set on it).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

TARGET_HELP = ("path/to/file.py:factory or package.module:factory; factory() returns "
               "(model, example_inputs) with full-sequence inputs")


class CLIError(Exception):
    """A user error the CLI reports in one line (exit status 2)."""


# ------------------------------------------------------------------ targets
def load_target(target: str) -> Tuple[Any, Tuple[Any, ...]]:
    """``file.py:factory`` / ``module:factory`` → ``(model, example_inputs)``."""
    path, sep, attr = target.rpartition(":")
    if not sep:
        path, attr = target, "factory"
    if not path:
        raise CLIError(f"target {target!r}: expected path/to/file.py:factory or module:factory")
    if path.endswith(".py") or os.sep in path or os.path.exists(path):
        file = Path(path)
        if not file.exists():
            raise CLIError(f"target {target!r}: no file {file}")
        name = "_spcompile_target_" + file.stem
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, str(file.resolve().parent))
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(path)
        except ImportError as e:
            raise CLIError(f"target {target!r}: cannot import {path!r} ({e})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CLIError(f"target {target!r}: {path} has no callable {attr!r}")
    result = factory()
    if not (isinstance(result, tuple) and len(result) == 2):
        raise CLIError(f"target {target!r}: {attr}() must return (model, example_inputs)")
    model, inputs = result
    if not isinstance(inputs, (tuple, list)):
        inputs = (inputs,)
    return model, tuple(inputs)


def first_shard(inputs: Sequence[Any], world_size: int, seq_dim: int) -> Tuple[Any, ...]:
    """Rank 0's contiguous shard of every sequence-shaped input (marks are kept)."""
    import torch
    if world_size <= 1:
        return tuple(inputs)
    out = []
    for x in inputs:
        if not isinstance(x, torch.Tensor):
            out.append(x)
            continue
        mark = getattr(x, "_spcompile_seq_dim", "unset")
        dim = seq_dim if mark == "unset" else mark
        if dim is None or x.dim() <= (dim if dim >= 0 else -dim - 1):
            out.append(x)
            continue
        n = x.shape[dim]
        if n % world_size:
            raise CLIError(f"input of shape {tuple(x.shape)}: sequence length {n} (dim {dim}) is "
                           f"not divisible by --world-size {world_size}")
        shard = x.narrow(dim, 0, n // world_size).contiguous()
        if mark != "unset":
            shard._spcompile_seq_dim = mark
        out.append(shard)
    return tuple(out)


def _options(args: argparse.Namespace) -> dict:
    opts = {"seq_dim": args.seq_dim}
    if getattr(args, "strategy", None):
        opts["strategy"] = args.strategy
    if getattr(args, "attention_strategy", None):
        opts["attention_strategy"] = args.attention_strategy
    if getattr(args, "strict", False):
        opts["strict"] = True
    if getattr(args, "disable", None):
        opts["disable"] = tuple(args.disable)
    if getattr(args, "hardware", None):
        opts["hardware"] = args.hardware
    return opts


# ------------------------------------------------------------------ explain
def cmd_explain(args: argparse.Namespace) -> int:
    import spcompile
    model, inputs = load_target(args.target)
    shards = first_shard(inputs, args.world_size, args.seq_dim)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = spcompile.explain(model, *shards, world_size=args.world_size, **_options(args))
    print(f"target {args.target}: inputs " + ", ".join(
        str(tuple(x.shape)) if hasattr(x, "shape") else type(x).__name__ for x in inputs) +
        (f", rank 0 feeds " + ", ".join(str(tuple(x.shape)) if hasattr(x, "shape") else "-"
                                        for x in shards) if args.world_size > 1 else ""))
    print(report)
    warned = [str(w.message) for w in caught if "spcompile" in str(w.message)]
    if warned:
        print("warnings:")
        for w in warned:
            print(f"  {w}")
    return 0


# ------------------------------------------------------------------ passes
def cmd_passes(args: argparse.Namespace) -> int:
    from .passes.pipeline import pipeline
    passes = pipeline()
    names = [p.name for p in passes]
    unknown = sorted(set(args.disable or ()) - set(names))
    if unknown:
        raise CLIError(f"unknown pass name(s) {unknown}; the passes are {names}")
    print("spcompile pass pipeline (run in this order on every Dynamo graph):")
    for i, p in enumerate(passes, start=1):
        state = "disabled" if p.name in (args.disable or ()) else "enabled"
        print(f"  {i}. {p.name:<14} {state:<9} {p.doc}")
    from .passes.patterns import REGISTRY, Pattern
    print("pattern families (detect tries them in this order):")
    for cls in REGISTRY:
        own = cls.__doc__ if cls.__doc__ and cls.__doc__ != Pattern.__doc__ else ""
        doc = (own.strip().splitlines() or [""])[0] or \
            f"(see {cls.__module__.replace('.', '/')}.py)"
        print(f"  - {cls.name:<24} kind {cls.kind:<12} {doc}")
    print("switch passes off with options={'disable': [...]} in code, or --disable on explain/dump")
    return 0


# ------------------------------------------------------------------ dump
def graph_to_dot(gm: Any, title: str) -> str:
    """A Graphviz description of an FX graph: one box per node (op, target, shape, placement,
    provenance), one edge per input. No pydot needed."""
    from .passes.graph_utils import shape
    from .passes.pipeline import op_name

    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    lines = [f'digraph "{esc(title)}" {{', "  rankdir=TB;",
             '  node [shape=box, fontname="monospace", fontsize=10];',
             f'  label="{esc(title)}"; labelloc=t;']
    for node in gm.graph.nodes:
        label = [node.name, node.op if node.op in ("placeholder", "output", "get_attr")
                 else op_name(node)]
        shp = shape(node)
        if shp is not None:
            label.append(str(list(shp)))
        pl = node.meta.get("spcompile_placement_str")
        if pl:
            label.append(pl)
        prov = node.meta.get("spcompile")
        style = ""
        if prov:
            label.append(f"+{prov.get('pass')}" + (f" {prov['match']}" if prov.get("match")
                                                    else ""))
            style = ', style=filled, fillcolor="#d8f0d8"'
        elif "Mixing" in (pl or ""):
            style = ', style=filled, fillcolor="#f6d6d6"'
        lines.append(f'  "{esc(node.name)}" [label="{esc(chr(10).join(label))}"{style}];')
        for inp in node.all_input_nodes:
            lines.append(f'  "{esc(inp.name)}" -> "{esc(node.name)}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _write_graph(gm: Any, out: Path, stem: str, svg: bool) -> List[Path]:
    text = gm.print_readable(print_output=False) if hasattr(gm, "print_readable") else str(
        gm.graph)
    files = [out / f"{stem}.txt", out / f"{stem}.dot"]
    files[0].write_text(text)
    files[1].write_text(graph_to_dot(gm, stem))
    if svg:
        res = subprocess.run(["dot", "-Tsvg", str(files[1]), "-o", str(out / f"{stem}.svg")],
                             capture_output=True, text=True)
        if res.returncode == 0:
            files.append(out / f"{stem}.svg")
    return files


class _DumpBackend:
    """Runs the pipeline pass by pass (as ``run_pipeline`` does), writing each graph."""

    def __init__(self, opts: Any, out: Path, svg: bool) -> None:
        self.opts, self.out, self.svg = opts, out, svg
        self.files: List[Path] = []
        self.graphs = 0

    def __call__(self, gm: Any, example_inputs: List[Any]) -> Callable:
        import time
        from .backend import resolve_group
        from .passes.pipeline import Ctx, PassRecord, op_counts, pipeline
        name, size, rank = resolve_group(self.opts.group)
        if self.opts.world_size:
            size = int(self.opts.world_size) if size == 1 else size
        ctx = Ctx(options=self.opts, example_inputs=list(example_inputs), group_name=name,
                  world_size=size, rank=rank)
        g = self.graphs
        self.graphs += 1
        for i, p in enumerate(pipeline(), start=1):
            before = op_counts(gm)
            if p.name in self.opts.disable:
                ctx.records.append(PassRecord(p.name, 0.0, before, before, skipped=True))
                continue
            stem = f"g{g}_{i:02d}_{p.name}"
            self.files += _write_graph(gm, self.out, stem + "_before", self.svg)
            known = set(gm.graph.nodes)
            ctx.current_pass = p.name
            t0 = time.perf_counter()
            gm = p.fn(gm, ctx)
            for node in gm.graph.nodes:
                if node not in known and "spcompile" not in node.meta:
                    node.meta["spcompile"] = {"pass": p.name, "match": None, "from": None}
            rec = PassRecord(p.name, time.perf_counter() - t0, before, op_counts(gm))
            ctx.records.append(rec)
            self.files += _write_graph(gm, self.out, stem + "_after", self.svg)
            print(f"graph {g} " + str(rec).replace("\n", "\n        "))
        return gm.forward


def cmd_dump(args: argparse.Namespace) -> int:
    import torch
    import torch._dynamo
    from .backend import Options
    from .explain import fake_group
    model, inputs = load_target(args.target)
    shards = first_shard(inputs, args.world_size, args.seq_dim)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    svg = shutil.which("dot") is not None
    opts = Options.make(_options(args))
    group = fake_group(args.world_size) if args.world_size > 1 else contextlib.nullcontext()
    with group as pg, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if pg is not None:
            opts.group = pg
        be = _DumpBackend(opts, out, svg)
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(model, backend=be)(*shards)
        torch._dynamo.reset()
    kinds = sorted({f.suffix for f in be.files})
    print(f"wrote {len(be.files)} files ({', '.join(kinds)}) for {be.graphs} graph(s) to {out}")
    if not svg:
        print("no SVG: Graphviz `dot` is not installed (render a .dot with "
              "`dot -Tsvg FILE.dot -o FILE.svg` where it is)")
    return 0


# ------------------------------------------------------------------ run
def launch_command(nproc: int, script: str, script_args: Sequence[str]) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            "--standalone", script, *script_args]


def cmd_run(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise CLIError("--nproc must be at least 1")
    if not Path(args.script).exists():
        raise CLIError(f"no script {args.script}")
    script_args = list(args.script_args)
    if script_args[:1] == ["--"]:
        script_args = script_args[1:]
    cmd = launch_command(args.nproc, args.script, script_args)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    # the script's own folder and the working directory are importable, as with `python script`
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(args.script).resolve().parent),
                                                      os.getcwd(), env.get("PYTHONPATH")]))
    print("spcompile run: " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env)


# ------------------------------------------------------------------ parser
def _add_target_args(p: argparse.ArgumentParser, strategies: bool = True) -> None:
    from .backend import ATTENTION_STRATEGIES, STRATEGIES
    p.add_argument("target", help=TARGET_HELP)
    p.add_argument("--world-size", "-P", type=int, default=2,
                   help="plan for P ranks with a fake process group (default 2; 1 = no "
                        "sharding)")
    p.add_argument("--seq-dim", type=int, default=1,
                   help="sequence dim of the inputs (default 1: [B, T, ...])")
    if strategies:
        p.add_argument("--strategy", choices=STRATEGIES, default=None,
                       help="force the state hand-off of every scan (default auto: cost model)")
        p.add_argument("--attention-strategy", choices=ATTENTION_STRATEGIES, default=None,
                       help="force the strategy of every softmax-attention layer")
        p.add_argument("--hardware", default=None,
                       help="cost-model hardware profile (preset name or JSON path)")
    p.add_argument("--strict", action="store_true",
                   help="refuse (error) instead of gathering around uncovered token mixing")
    p.add_argument("--disable", action="append", metavar="PASS",
                   help="switch a pass off (repeatable; see `spcompile passes`)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spcompile",
        description="Inspect what the spcompile torch.compile backend does to a model, and "
                    "launch sequence-parallel runs.",
        epilog="TARGET: " + TARGET_HELP + ". Examples: spcompile explain "
               "examples/retnet.py:factory --world-size 4;  spcompile run --nproc 2 "
               "examples/train_lm.py")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("explain", help="matches, strategies with predicted costs, fallbacks "
                                       "with source lines, pass stats",
                       description="Compile TARGET's model with the sp backend for P ranks (a "
                                   "fake process group: nothing is launched, the forward runs "
                                   "once on rank 0's shard) and print the plan: every match "
                                   "(kind, pattern, strategy, the cost model's ranking, user "
                                   "source line), every fallback and near miss with its reason, "
                                   "and per-pass time and op-count changes. With --strict an "
                                   "uncovered sequence-mixing op is an error (exit 1).")
    _add_target_args(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("passes", help="the pass pipeline and pattern families",
                       description="List the passes in pipeline order with enabled/disabled "
                                   "state, and the pattern families detection tries.")
    p.add_argument("--disable", action="append", metavar="PASS",
                   help="show PASS as disabled (repeatable); checks that the name exists")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("dump", help="readable graph + Graphviz .dot before/after every pass",
                       description="Compile TARGET for P ranks (fake group) and write, for "
                                   "every Dynamo graph and every pass, the readable graph "
                                   "(.txt) and a Graphviz file (.dot; nodes show op, shape, "
                                   "placement; nodes a pass created are green, uncovered token "
                                   "mixing red) before and after the pass, plus .svg when "
                                   "Graphviz `dot` is installed.")
    _add_target_args(p, strategies=True)
    p.add_argument("--out", required=True, help="output directory (created)")
    p.set_defaults(func=cmd_dump)

    p = sub.add_parser("run", help="launch N processes with torch's launcher (torchrun)",
                       description="Run `python -m torch.distributed.run --nproc-per-node N "
                                   "--standalone SCRIPT ARGS...`. The script initialises its "
                                   "process group (gloo on CPU, NCCL on GPU; see "
                                   "examples/_common.py). OMP_NUM_THREADS defaults to "
                                   "cores/N. Exit status: the launcher's.")
    p.add_argument("--nproc", "-n", type=int, required=True, help="processes to launch")
    p.add_argument("script", help="the Python script to run on every rank")
    p.add_argument("script_args", nargs=argparse.REMAINDER,
                   help="arguments passed to the script (after an optional --)")
    p.set_defaults(func=cmd_run)

    try:
        from .cost_model.cli import register
    except ImportError as e:
        missing = str(e)

        def no_cost_model(args: argparse.Namespace) -> int:
            raise CLIError(f"the cost model's CLI is not available ({missing}); "
                           f"spcompile.cost_model.cli.register is missing from this install")
        for name in ("cost", "calibrate"):
            q = sub.add_parser(name, help=f"(unavailable: {missing})",
                               description=f"Unavailable: {missing}")
            q.set_defaults(func=no_cost_model)
    else:
        register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except CLIError as e:
        print(f"spcompile {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from .annotations import DeclarationError
        from .passes.fallback import SequenceParallelError
        if isinstance(e, (SequenceParallelError, DeclarationError)) or \
                type(e).__name__ in ("BackendCompilerFailed",):
            inner = getattr(e, "inner_exception", None) or e
            print(f"spcompile {args.command}: {type(inner).__name__}: {inner}", file=sys.stderr)
            return 1
        raise
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
