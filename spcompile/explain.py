"""``spcompile.explain``: what the backend would do to a model, without running it sharded.

``explain(fn, *example_inputs, world_size=P, **options)`` compiles ``fn`` with the ``sp``
backend (a fake process group of ``P`` ranks stands in when no group is initialised, so shapes
and plans are those of a real ``P``-rank run) and returns a :class:`Report`: every match (kind,
strategy, user source line), every near miss with the check that failed, every fallback with
its reason, the pass records (time, op-count diff) and graph statistics.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch.fx as fx


@dataclass
class MatchRow:
    kind: str
    pattern: str
    strategy: str
    source: Optional[str]
    detail: str
    reason: str = ""
    alternatives: List[Any] = field(default_factory=list)
    info: Dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.kind:<12} {self.pattern:<26} {self.strategy:<14} {self.source or '?'}"


@dataclass
class Report:
    matches: List[MatchRow] = field(default_factory=list)
    near_misses: List[Any] = field(default_factory=list)
    fallbacks: List[Any] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    records: List[Any] = field(default_factory=list)
    world_size: int = 1
    ops_before: Dict[str, int] = field(default_factory=dict)
    ops_after: Dict[str, int] = field(default_factory=dict)
    graph: Optional[fx.GraphModule] = None

    @classmethod
    def from_ctx(cls, ctx, gm: fx.GraphModule) -> "Report":
        from .passes.pipeline import op_counts
        rows = [MatchRow(m.kind, m.pattern, m.strategy or "?", m.source, m.describe(), m.reason,
                         list(m.alternatives),
                         {k: v for k, v in m.info.items()
                          if not k.startswith("_") and k != "log_decay_value"})
                for m in ctx.matches]
        recs = list(ctx.records)
        return cls(matches=rows, near_misses=list(ctx.near_misses), fallbacks=list(ctx.fallbacks),
                   notes=list(ctx.notes), records=recs, world_size=ctx.world_size,
                   ops_before=recs[0].before if recs else {}, ops_after=op_counts(gm), graph=gm)

    def merge(self, other: "Report") -> "Report":
        return Report(self.matches + other.matches, self.near_misses + other.near_misses,
                      self.fallbacks + other.fallbacks, self.notes + other.notes,
                      self.records + other.records, max(self.world_size, other.world_size),
                      _add(self.ops_before, other.ops_before), _add(self.ops_after,
                                                                    other.ops_after),
                      other.graph or self.graph)

    def __str__(self) -> str:
        out = [f"spcompile plan for P = {self.world_size}"]
        out.append(f"matches ({len(self.matches)}):")
        if self.matches:
            out.append(f"  {'kind':<12} {'pattern':<26} {'strategy':<14} source")
            for m in self.matches:
                out.append(f"  {m}")
                out.append(f"      {m.detail}; {m.reason}")
                for alt in m.alternatives[:4]:
                    s = getattr(alt, "strategy", alt)
                    sec = getattr(alt, "seconds", None)
                    out.append(f"      - {s}: " + (f"{sec * 1e3:.4g} ms predicted"
                                                   if sec is not None else ""))
        out.append(f"fallbacks ({len(self.fallbacks)}):")
        for f in self.fallbacks:
            out.append(f"  {f}")
        if self.near_misses:
            out.append(f"near misses ({len(self.near_misses)}):")
            for nm in self.near_misses:
                out.append(f"  {nm.pattern} at {nm.source or nm.node.name}: {nm.reason}")
        if self.notes:
            out.append("notes:")
            out.extend(f"  {n}" for n in self.notes)
        out.append("passes:")
        for r in self.records:
            out.append("  " + str(r).replace("\n", "\n  "))
        nb, na = sum(self.ops_before.values()), sum(self.ops_after.values())
        out.append(f"graph: {nb} ops before, {na} ops after")
        return "\n".join(out)


def _add(a: Dict[str, int], b: Dict[str, int]) -> Dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


@contextlib.contextmanager
def fake_group(world_size: int, rank: int = 0):
    """A fake process group of ``world_size`` ranks (collectives are shape-only)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        raise RuntimeError("spcompile.explain(world_size=...) needs torch.distributed to be "
                           "uninitialised; inside a real job, omit world_size")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def explain(fn: Any, *example_inputs: Any, world_size: Optional[int] = None,
            **options: Any) -> Report:
    """Compile ``fn`` with the sp backend on ``example_inputs`` (this rank's shards) and report.

    ``world_size=P`` plans for ``P`` ranks with a fake process group (no processes launched);
    without it the current group (or P = 1) is used. The model runs once (forward only).
    """
    import torch._dynamo
    from .backend import Options, SPBackend
    ctx = fake_group(world_size) if world_size and world_size > 1 else contextlib.nullcontext()
    with ctx as group:
        opts = Options.make(options)
        if group is not None:
            opts.group = group
        be = SPBackend(opts)
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend=be)
        with torch.no_grad():
            compiled(*example_inputs)
        torch._dynamo.reset()
    report = Report(world_size=world_size or 1)
    for r in be.reports:
        report = report.merge(r)
    return report
