"""Pass 5 — rewrite: each planned match becomes calls of spcompile ops.

The family's ``rewrite`` inserts the replacement before the anchor and redirects the anchor's
uses; dead pattern nodes (masks, scores) are then removed. New nodes carry provenance
(pass, match, origin node, user stack trace).
"""
from __future__ import annotations

import torch.fx as fx

from .graph_utils import eliminate_dead_code
from .pipeline import Ctx, register_pass


def _current(n):
    for _ in range(64):
        if not isinstance(n, fx.Node) or "spcompile_replaced_by" not in n.meta:
            break
        n = n.meta["spcompile_replaced_by"]
    return n


@register_pass("rewrite")
def rewrite(gm: fx.GraphModule, ctx: Ctx) -> fx.GraphModule:
    """Replace every planned match by spcompile ops."""
    from .sequence_axis import Replicate
    for m in ctx.matches:
        # a value an earlier rewrite replaced (a convolution feeding a batch norm): its
        # replacement, which now holds the value the match was bound to
        m.bindings = {k: _current(v) for k, v in m.bindings.items()}
        known = set(gm.graph.nodes)
        m.info["_pattern"].rewrite(gm, ctx, m)
        for node in gm.graph.nodes:  # internal values of a replacement are not sequence data
            if node not in known:
                node.meta.setdefault("spcompile_placement", Replicate())
    eliminate_dead_code(gm)
    gm.recompile()
    return gm
