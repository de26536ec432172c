"""MoE token dispatch: a sort of this rank's rows by expert and its way back to token order.

The placement rules (``passes/dispatch.py``) already checked, op by op, that everything between
the sort and the inverse permutation is row by row; nothing needs rewriting (each rank permutes
and transforms only its own rows, with no communication). This family only reports each
permutation for ``explain``: the sort's line, how many reads put rows into its order, the
grouped matmuls over its groups and the ops that bring the rows back.
"""
from __future__ import annotations

from typing import Iterable

from ..graph_utils import canonical_name
from ..pipeline import Ctx
from .base import Found, Match, Pattern


class TokenDispatch(Pattern):
    name = "token_dispatch"
    kind = "dispatch"

    def find(self, gm, ctx: Ctx) -> Iterable[Found]:
        for perm in ctx.dispatch.values():
            back = sorted({canonical_name(n) or n.name for n in perm.back})
            yield Match(self.kind, self.name, perm.node,
                        nodes={perm.node, *perm.gathers, *perm.grouped, *perm.back},
                        info={"sort": canonical_name(perm.node), "rows": perm.rows,
                              "gathers": len(perm.gathers), "grouped_mm": len(perm.grouped),
                              "back": "+".join(back) or "none"},
                        reason="token-local: each rank sorts and transforms its own rows")

    def rewrite(self, gm, ctx: Ctx, match: Match) -> None:
        return None  # row by row as written
