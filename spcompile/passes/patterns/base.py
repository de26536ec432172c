"""What every pattern family shares: Match, FailedMatch and the Pattern protocol.

A pattern has two halves kept apart (as Inductor's micro_pipeline_tp does): ``find`` reads the
graph and returns ``Match`` objects (or ``FailedMatch`` near misses that say which check failed),
``rewrite`` edits the graph for one planned match. Finding never edits.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Set, Union

import torch
import torch.fx as fx

from ..pipeline import Ctx, source_line

_ids = itertools.count()


@dataclass
class Match:
    """One occurrence of a family: role bindings, the nodes it replaces, where it came from."""
    kind: str  # 'linear_scan', 'attention', 'halo', 'reduction', 'positions', ...
    pattern: str  # the pattern's name, e.g. 'masked_linear_attention'
    anchor: fx.Node  # the node whose uses the rewrite replaces
    bindings: Dict[str, Any] = field(default_factory=dict)
    nodes: Set[fx.Node] = field(default_factory=set)  # nodes the match covers
    info: Dict[str, Any] = field(default_factory=dict)  # scale, decay kind, causal, ...
    strategy: Optional[str] = None  # set by the plan pass
    alternatives: List[Any] = field(default_factory=list)  # cost-model ranking
    reason: str = ""  # why this strategy
    id: int = field(default_factory=lambda: next(_ids))

    @property
    def name(self) -> str:
        return f"{self.pattern}#{self.id}"

    @property
    def source(self) -> Optional[str]:
        return source_line(self.anchor)

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.info.items()
                          if k != "log_decay_value" and not k.startswith("_"))
        return f"{self.kind} [{self.pattern}] {extra}"


@dataclass
class FailedMatch:
    """A near miss: the pattern's anchor was there, a check failed. ``reason`` says which."""
    pattern: str
    node: fx.Node
    reason: str

    @property
    def source(self) -> Optional[str]:
        return source_line(self.node)

    def __str__(self) -> str:
        return f"{self.pattern} at {self.node.name}: {self.reason}"


Found = Union[Match, FailedMatch]


class Pattern:
    """A family: ``find`` yields matches and near misses; ``rewrite`` edits one planned match."""
    name: str = "pattern"
    kind: str = "?"

    def find(self, gm: fx.GraphModule, ctx: Ctx) -> Iterable[Found]:
        raise NotImplementedError

    def rewrite(self, gm: fx.GraphModule, ctx: Ctx, match: Match) -> None:
        raise NotImplementedError


def value_tol(values, default: float) -> float:
    """Tolerance of a check by value on the example inputs: the pattern's own (structural
    mismatches give errors of order one) for fp32/fp64 values, wider where the user's values
    are in half precision (their rounding alone reaches a few 1e-3 in bf16), so that every rank
    decides alike on its own shard."""
    dts = {getattr(v, "dtype", None) for v in values}
    if torch.bfloat16 in dts:
        return max(default, 3e-2)
    if torch.float16 in dts:
        return max(default, 1e-2)
    return default
