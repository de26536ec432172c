"""The pass pipeline: an ordered list of named passes, one signature, one observer.

Every pass is ``fn(gm, ctx) -> gm``. ``run_pipeline`` runs them in order, skipping the ones named
in ``ctx.options.disable``; the observer records, per pass, its wall time, an op-count diff
(``torch.matmul: 4 -> 2 (-2)``) and, when ``SPCOMPILE_DUMP_DIR`` (or the ``dump_dir`` option) is
set, writes the readable graph before and after each pass. Nodes a pass creates carry
``node.meta["spcompile"] = {"pass", "match", "from"}`` (see ``Ctx.provenance``).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch.fx as fx

PassFn = Callable[[fx.GraphModule, "Ctx"], fx.GraphModule]


@dataclass
class PassRecord:
    name: str
    seconds: float
    before: Dict[str, int]
    after: Dict[str, int]
    skipped: bool = False

    def diff(self) -> List[str]:
        keys = sorted(set(self.before) | set(self.after))
        out = []
        for key in keys:
            a, b = self.before.get(key, 0), self.after.get(key, 0)
            if a != b:
                out.append(f"{key}: {a} -> {b} ({b - a:+d})")
        return out

    def __str__(self) -> str:
        head = f"{self.name:<15} {'skipped' if self.skipped else f'{self.seconds * 1e3:8.1f} ms'}"
        return head + "".join(f"\n    {d}" for d in self.diff())


@dataclass
class Ctx:
    """Everything the passes share for one graph."""
    options: Any  # spcompile.backend.Options
    example_inputs: List[Any]
    group_name: str = ""
    world_size: int = 1
    rank: int = 0
    # filled by passes
    placements: Dict[fx.Node, Any] = field(default_factory=dict)
    seq_len: Optional[int] = None  # local length of the sharded sequence axis
    # a frame eager code called with rank-local rows only (MoE experts): see sequence_axis
    rows_frame: bool = False
    tokens: Tuple[int, ...] = ()  # B*T_local of the sequence-shaped inputs
    matches: List[Any] = field(default_factory=list)
    near_misses: List[Any] = field(default_factory=list)
    fallbacks: List[Any] = field(default_factory=list)
    mixing: Dict[fx.Node, str] = field(default_factory=dict)  # token-mixing ops (sequence_axis)
    # MoE token dispatch (passes/dispatch.py): sort key → Permutation, and the ops that use
    # this rank's per-expert counts as values (the fallback all-reduces the counts for them)
    dispatch: Dict[str, Any] = field(default_factory=dict)
    count_uses: Dict[fx.Node, List[fx.Node]] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    records: List[PassRecord] = field(default_factory=list)
    current_pass: str = ""
    values: Dict[fx.Node, Any] = field(default_factory=dict)  # cached concrete example values

    @property
    def global_seq_len(self) -> Optional[int]:
        return None if self.seq_len is None else self.seq_len * self.world_size

    @contextlib.contextmanager
    def provenance(self, gm: fx.GraphModule, match: Any = None,
                   origin: Optional[fx.Node] = None) -> Iterator[None]:
        """Tag every node created inside the block with this pass, the match and the origin
        (and copy the origin's user stack trace, so later passes can still name the line)."""
        known = set(gm.graph.nodes)
        yield
        tag = {"pass": self.current_pass,
               "match": None if match is None else getattr(match, "name", str(match)),
               "from": None if origin is None else origin.name}
        for node in gm.graph.nodes:
            if node in known:
                continue
            node.meta.setdefault("spcompile", dict(tag))
            if origin is not None:
                for key in ("stack_trace", "nn_module_stack"):
                    if key in origin.meta and key not in node.meta:
                        node.meta[key] = origin.meta[key]


@functools.lru_cache(maxsize=1)
def _torch_dir() -> str:
    import torch
    return os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _source_line(node: Optional[fx.Node]) -> Optional[str]:
    """'file.py:12  code' of the user line a node came from (last frame of its stack trace)."""
    if node is None:
        return None
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    lines = [ln for ln in trace.strip().splitlines() if ln.strip()]
    frames = []
    for i in range(len(lines) - 1, -1, -1):
        ln = lines[i].strip()
        if ln.startswith("File "):
            try:
                path = ln.split('"')[1]
                lineno = ln.split("line ")[1].split(",")[0]
            except IndexError:
                return ln
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            frames.append((path, f"{os.path.basename(path)}:{lineno}  {code}"))
    # the innermost frame outside torch itself (F.pad's body is torch's line, not the user's)
    inside = _torch_dir()
    user = [f for p, f in frames if not os.path.abspath(p).startswith(inside)]
    return user[0] if user else (frames[0][1] if frames else None)


source_line = _source_line


def op_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}"
    if node.op == "call_function":
        if hasattr(t, "_opname") and hasattr(t, "namespace"):
            return f"{t.namespace}::{t._opname}"
        mod = getattr(t, "__module__", None) or ""
        name = getattr(t, "__name__", str(t))
        if mod.startswith("torch") or mod in ("_operator", "operator", "builtins"):
            mod = {"_operator": "operator", "torch._C._nn": "F", "torch.nn.functional": "F",
                   "torch._C._VariableFunctions": "torch", "torch.functional": "torch"}.get(mod, mod)
        elif not mod:
            mod = "torch"
        return f"{mod}.{name}" if mod else name
    return node.op


def op_counts(gm: fx.GraphModule) -> Dict[str, int]:
    counts: Dict[str, int] = collections.Counter()
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            counts[op_name(node)] += 1
    return dict(counts)


@dataclass
class Pass:
    name: str
    fn: PassFn
    doc: str = ""


_PIPELINE: List[Pass] = []


def register_pass(name: str) -> Callable[[PassFn], PassFn]:
    def deco(fn: PassFn) -> PassFn:
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        _PIPELINE.append(Pass(name, fn, doc))
        return fn
    return deco


def pipeline() -> List[Pass]:
    """The ordered passes (imports the pass modules, which register themselves)."""
    from . import (canonicalize, sequence_axis, detect, plan, rewrite, fallback,  # noqa: F401
                   verify)
    order = ["canonicalize", "sequence_axis", "detect", "plan", "rewrite", "fallback", "verify"]
    by_name = {p.name: p for p in _PIPELINE}
    return [by_name[n] for n in order]


def _dump(gm: fx.GraphModule, directory: Path, index: int, name: str, when: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    text = gm.print_readable(print_output=False) if hasattr(gm, "print_readable") else str(gm.graph)
    (directory / f"{index:02d}_{name}_{when}.txt").write_text(text)


def run_pipeline(gm: fx.GraphModule, ctx: Ctx) -> fx.GraphModule:
    disabled = set(getattr(ctx.options, "disable", ()) or ())
    unknown = disabled - {p.name for p in pipeline()}
    if unknown:
        raise ValueError(f"spcompile: unknown pass name(s) in disable={sorted(unknown)}; "
                         f"the passes are {[p.name for p in pipeline()]}")
    dump_dir = getattr(ctx.options, "dump_dir", None) or os.environ.get("SPCOMPILE_DUMP_DIR")
    dump_path = Path(dump_dir) if dump_dir else None
    for i, p in enumerate(pipeline(), start=1):
        before = op_counts(gm)
        if p.name in disabled:
            ctx.records.append(PassRecord(p.name, 0.0, before, before, skipped=True))
            continue
        if dump_path is not None:
            _dump(gm, dump_path, i, p.name, "before")
        known = set(gm.graph.nodes)
        ctx.current_pass = p.name
        t0 = time.perf_counter()
        gm = p.fn(gm, ctx)
        seconds = time.perf_counter() - t0
        for node in gm.graph.nodes:  # default provenance for nodes created outside a block
            if node not in known and "spcompile" not in node.meta:
                node.meta["spcompile"] = {"pass": p.name, "match": None, "from": None}
        ctx.records.append(PassRecord(p.name, seconds, before, op_counts(gm)))
        if dump_path is not None:
            _dump(gm, dump_path, i, p.name, "after")
    ctx.current_pass = ""
    return gm
