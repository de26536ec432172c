"""Pass 7 — verify: the graph is well formed and every node a pass made has its metadata."""
from __future__ import annotations

import torch.fx as fx

from .pipeline import Ctx, register_pass


@register_pass("verify")
def verify(gm: fx.GraphModule, ctx: Ctx) -> fx.GraphModule:
    """graph.lint(), example values on new nodes, no pattern node left behind."""
    gm.graph.lint()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        tag = node.meta.get("spcompile")
        if tag and "example_value" not in node.meta and "val" not in node.meta:
            raise AssertionError(f"spcompile verify: {node.name} made by pass {tag['pass']} has "
                                 f"no example value")
    for m in ctx.matches:
        if ctx.world_size == 1 or m.anchor not in gm.graph.nodes:
            continue
        stale = [u for u in m.anchor.users
                 if (u.meta.get("spcompile") or {}).get("match") != m.name]
        if m.kind in ("linear_scan", "attention", "halo") and stale:
            raise AssertionError(f"spcompile verify: {m.name} was rewritten but its anchor "
                                 f"{m.anchor.name} is still used")
    gm.recompile()
    return gm
