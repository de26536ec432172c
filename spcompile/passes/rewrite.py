"""Pass 5 — rewrite: each planned match becomes calls of spcompile ops.

The family's ``rewrite`` inserts the replacement before the anchor and redirects the anchor's
uses; dead pattern nodes (masks, scores) are then removed. New nodes carry provenance
(pass, match, origin node, user stack trace).
"""
from __future__ import annotations

import torch.fx as fx

from .graph_utils import eliminate_dead_code
from .pipeline import Ctx, register_pass


@register_pass("rewrite")
def rewrite(gm: fx.GraphModule, ctx: Ctx) -> fx.GraphModule:
    """Replace every planned match by spcompile ops."""
    from .sequence_axis import Replicate
    for m in ctx.matches:
        known = set(gm.graph.nodes)
        m.info["_pattern"].rewrite(gm, ctx, m)
        for node in gm.graph.nodes:  # internal values of a replacement are not sequence data
            if node not in known:
                node.meta.setdefault("spcompile_placement", Replicate())
    eliminate_dead_code(gm)
    gm.recompile()
    return gm
