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
    _drop_matches_inside_loops(ctx)
    _drop_matches_downstream_of_global_regions(ctx)
    return gm


def redetect(gm: fx.GraphModule, ctx: Ctx) -> None:
    """Detection again, after a loop's rewrite made its output sharded (the analysis saw one
    value per step, not a sequence): the next layer's loop, conv, attention, ... are found now.
    New matches are planned and appended, so the rewrite pass (iterating ``ctx.matches``) takes
    them too; anchors already matched are not matched twice."""
    from .plan import choose
    from .sequence_axis import analyze
    analyze(gm, ctx)
    claimed = {m.anchor for m in ctx.matches}
    seen = {(f.pattern, f.node) for f in ctx.near_misses}
    new = []
    for pattern in all_patterns():
        for found in pattern.find(gm, ctx):
            if isinstance(found, Match):
                if found.anchor in claimed or match_excluded(found) is not None:
                    continue
                claimed.add(found.anchor)
                found.info.setdefault("_pattern", pattern)
                new.append(found)
            elif isinstance(found, FailedMatch) and (found.pattern, found.node) not in seen:
                ctx.near_misses.append(found)
    loops = [m for m in new if m.kind == "loop_scan"]
    inside = set().union(*(set(m.nodes) for m in loops)) if loops else set()
    for m in new:
        if m.kind != "loop_scan" and (m.anchor in inside or set(m.nodes) & inside):
            continue
        choose(m, ctx)
        ctx.matches.append(m)


def _drop_matches_inside_loops(ctx: Ctx) -> None:
    """A Python loop over tokens/blocks is rewritten as a whole (``loop_recurrence``): what
    other families found inside its body (a block's masked form, a block's positions) are
    per-step computations on local data, not sequence ops."""
    loops = [m for m in ctx.matches if m.kind == "loop_scan"]
    if not loops:
        return
    inside = set()
    for m in loops:
        inside |= set(m.nodes)
    ctx.near_misses[:] = [f for f in ctx.near_misses if f.node not in inside]
    keep = []
    for m in ctx.matches:
        if m.kind != "loop_scan" and (m.anchor in inside or set(m.nodes) & inside):
            ctx.near_misses.append(FailedMatch(m.pattern, m.anchor, "inside the body of a "
                                               "Python loop rewritten as a whole"))
        else:
            keep.append(m)
    ctx.matches[:] = keep


def _drop_matches_downstream_of_global_regions(ctx: Ctx) -> None:
    """A token-mixing op no family covers is computed by the fallback on the gathered
    sequence. If it changes the sequence length (a pad, a slice, a cat), what follows it holds
    *global* values, and a family rewritten there would treat them as this rank's shard: such
    matches are dropped (the fallback computes those ops on the global values too)."""
    from .graph_utils import shape
    from .sequence_axis import Replicate, Shard
    covered = set()
    for m in ctx.matches:
        covered |= set(m.nodes) | {m.anchor}
    unsafe = []
    for node in ctx.mixing:
        if node in covered:
            continue
        p, out = ctx.placements.get(node), shape(node)
        if isinstance(p, Replicate):
            continue  # a global reduction: replicated, correct downstream
        if isinstance(p, Shard) and out is not None and p.dim < len(out) and \
                out[p.dim] == ctx.seq_len:
            continue  # same length: the fallback re-shards it
        unsafe.append(node)
    if not unsafe:
        return
    region, todo = set(), list(unsafe)
    while todo:
        n = todo.pop()
        for u in n.users:
            if u not in region:
                region.add(u)
                todo.append(u)
    keep = []
    for m in ctx.matches:
        if m.anchor in region or (set(m.nodes) & region):
            ctx.near_misses.append(FailedMatch(
                m.pattern, m.anchor, "downstream of an op computed on the gathered sequence "
                                     "(left to the fallback)"))
        else:
            keep.append(m)
    ctx.matches[:] = keep
