"""Pass 3 — detect: run every pattern family's ``find``; keep matches and near misses.

Detection never edits the graph. Each family yields ``Match`` objects (role bindings, the nodes
covered, the user's source line) and ``FailedMatch`` near misses that name the check that failed,
for ``explain``.
"""
from __future__ import annotations

import torch.fx as fx

from ..annotations import match_excluded
from .patterns import FailedMatch, Match, all_patterns
from .pipeline import Ctx, register_pass


@register_pass("detect")
def detect(gm: fx.GraphModule, ctx: Ctx) -> fx.GraphModule:
    """Find every pattern family's matches (and near misses, with reasons)."""
    claimed = set()
    for pattern in all_patterns():
        for found in pattern.find(gm, ctx):
            if isinstance(found, Match):
                if found.anchor in claimed:
                    continue
                excluded = match_excluded(found)
                if excluded is not None:  # @spcompile.exclude: leave it to the fallback
                    ctx.near_misses.append(FailedMatch(found.pattern, found.anchor,
                                                       f"inside excluded function {excluded}"))
                    continue
                claimed.add(found.anchor)
                found.info.setdefault("_pattern", pattern)
                ctx.matches.append(found)
            elif isinstance(found, FailedMatch):  # None: not this family at all
                ctx.near_misses.append(found)
    return gm
