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


def _find_all(gm: fx.GraphModule, ctx: Ctx, claimed: set, out: list) -> list:
    """Every family's new matches (anchors not in ``claimed``, which grows), appended to
    ``out`` as they are found (``ctx.matches`` in detect: later families see what earlier ones
    covered); near misses and ``@spcompile.exclude``d matches go to ``ctx.near_misses``."""
    seen = {(f.pattern, f.node) for f in ctx.near_misses}

    def miss(f: FailedMatch) -> None:
        if (f.pattern, f.node) not in seen:
            seen.add((f.pattern, f.node))
            ctx.near_misses.append(f)

    from .graph_utils import inside_vmap
    batched = inside_vmap(gm)  # an inlined vmap's body is left as it is
    for pattern in all_patterns():
        for found in pattern.find(gm, ctx):
            if isinstance(found, Match):
                if found.anchor in claimed:
                    continue
                if found.anchor in batched and not found.info.get("owns_nodes"):
                    miss(FailedMatch(found.pattern, found.anchor, "inside a vmap'd function"))
                    continue
                excluded = match_excluded(found)
                if excluded is not None:  # @spcompile.exclude: leave it to the fallback
                    miss(FailedMatch(found.pattern, found.anchor,
                                     f"inside excluded function {excluded}"))
                    continue
                claimed.add(found.anchor)
                found.info.setdefault("_pattern", pattern)
                out.append(found)
            elif isinstance(found, FailedMatch):  # None: not this family at all
                miss(found)
    return out


def _outside_loops(matches: list, ctx: Ctx) -> list:
    """A Python loop over tokens/blocks is rewritten as a whole (``loop_recurrence``): what
    other families found inside its body (a block's masked form, a block's positions) are
    per-step computations on local data, not sequence ops. → the matches to keep."""
    inside = set()
    for m in matches:
        if m.kind == "loop_scan" or m.info.get("owns_nodes"):
            inside |= set(m.nodes)
    if not inside:
        return matches
    ctx.near_misses[:] = [f for f in ctx.near_misses if f.node not in inside]
    keep = []
    for m in matches:
        if m.kind != "loop_scan" and not m.info.get("owns_nodes") and (
                m.anchor in inside or set(m.nodes) & inside):
            ctx.near_misses.append(FailedMatch(m.pattern, m.anchor, "inside a region rewritten "
                                               "as a whole (a Python loop, an associative scan)"))
        else:
            keep.append(m)
    return keep


@register_pass("detect")
def detect(gm: fx.GraphModule, ctx: Ctx) -> fx.GraphModule:
    """Find every pattern family's matches (and near misses, with reasons)."""
    ctx.matches[:] = _outside_loops(_find_all(gm, ctx, set(), ctx.matches), ctx)
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
    for m in _outside_loops(_find_all(gm, ctx, claimed, []), ctx):
        choose(m, ctx)
        ctx.matches.append(m)


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
    unsafe, barriers = [], set()
    for node in ctx.mixing:
        if node in covered:
            continue
        p, out = ctx.placements.get(node), shape(node)
        if isinstance(p, Replicate):
            barriers.add(node)
            continue  # a global reduction: replicated, correct downstream
        if isinstance(p, Shard) and out is not None and p.dim < len(out) and \
                out[p.dim] == ctx.seq_len:
            barriers.add(node)
            continue  # same length: the fallback re-shards it
        unsafe.append(node)
    if not unsafe:
        return
    # the region ends at a fallback op whose result is re-sharded (or replicated): it is computed
    # from gathered inputs, global values included, and what follows it holds this rank's part
    # again (HF's packed-sequence mask: position_ids[:, :1] feeds only torch.diff)
    region, todo = set(), list(unsafe)
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in barriers:
                continue
            if u not in region:
                region.add(u)
                todo.append(u)
    keep = []
    for m in ctx.matches:
        if m.kind == "dispatch":  # rewrites nothing: its rules ran on the final placements
            keep.append(m)
            continue
        if m.anchor in region or (set(m.nodes) & region):
            ctx.near_misses.append(FailedMatch(
                m.pattern, m.anchor, "downstream of an op computed on the gathered sequence "
                                     "(left to the fallback)"))
        else:
            keep.append(m)
    ctx.matches[:] = keep
