"""Linear attention in its cumsum form: ``q · cumsum(k ⊗ v)`` and the normaliser ``q · cumsum(k)``.

    S_t = Σ_{j<=t} k_j v_jᵀ      o_t = q_t S_t          (Katharopoulos et al., Eq. 18-20)

The product form materialises a ``[d_k, d_v]`` state per token; the rewrite computes the same
numbers with the chunked scan (``V = 1`` for the normaliser). Structure finds the roles: the
anchor is a matmul of a row ``q [..., 1, d]`` with a value that is, up to views, a ``cumsum``
along the sequence of either an outer product ``k [..., d, 1] * v [..., 1, e]`` or of ``k``
itself; the cumsum must feed nothing else. Values decide: the anchor must equal
``linear_scan(q, k, v, scale=1)`` on the example inputs.
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch
import torch.fx as fx

from ... import ops as spops
from ...kernels.linear_scan.reference import chunked_linear_scan
from ..graph_utils import canonical_name, evaluate, set_meta, shape
from ..pipeline import Ctx
from ..sequence_axis import Shard
from .base import FailedMatch, Found, Match, Pattern, value_tol

_VIEWS = ("reshape", "view", "permute", "expand", "contiguous", "unsqueeze", "squeeze", "to",
          "float")


def _through_views(n: fx.Node) -> Tuple[fx.Node, list]:
    chain = []
    while canonical_name(n) in _VIEWS and isinstance(n.args[0], fx.Node) and len(n.users) == 1:
        chain.append(n)
        n = n.args[0]
    return n, chain


def _heads(x: torch.Tensor, seq: int, batch: Tuple[int, ...]) -> torch.Tensor:
    """[*batch, D] (sequence at ``seq``) → [1, T, N, D]."""
    x = x.expand(*batch, x.shape[-1]).movedim(seq, 0)
    return x.reshape(x.shape[0], -1, x.shape[-1]).unsqueeze(0).contiguous()


def _unheads(o: torch.Tensor, seq: int, batch: Tuple[int, ...]) -> torch.Tensor:
    """[1, T, N, E] → [*batch, 1, E] (the anchor's row layout)."""
    rest = tuple(b for i, b in enumerate(batch) if i != seq)
    o = o[0].reshape(o.shape[1], *rest, o.shape[-1]).movedim(0, seq)
    return o.unsqueeze(-2)


def _cumsum_scan(q, k, v, seq: int, batch: Tuple[int, ...], chunk_size: int, strategy: str,
                 group_name: str, out_shape: Tuple[int, ...]):
    q4 = _heads(q.squeeze(-2), seq, batch)
    k4 = _heads(k.squeeze(-1), seq, batch)
    v4 = (_heads(v.squeeze(-2), seq, batch) if v is not None
          else q4.new_ones(*q4.shape[:3], 1))
    o = spops.scan(q4, k4, v4, None, 1.0, chunk_size, strategy, group_name)
    return _unheads(o, seq, batch).reshape(out_shape)


class CumsumLinearAttention(Pattern):
    name = "cumsum_linear_attention"
    kind = "linear_scan"

    def find(self, gm: fx.GraphModule, ctx: Ctx) -> Iterable[Found]:
        pl = ctx.placements
        for node in gm.graph.nodes:
            if canonical_name(node) != "matmul":
                continue
            qr, c = node.args[0], node.args[1]
            cs, chain = _through_views(c)
            if canonical_name(cs) != "cumsum" or cs not in ctx.mixing or len(cs.users) != 1:
                continue
            found = self._match(gm, ctx, node, qr, cs, chain)
            if found is not None:
                yield found

    def _match(self, gm, ctx, anchor, qr, cs, chain) -> Optional[Found]:
        pl = ctx.placements
        sq, so = shape(qr), shape(anchor)
        if sq is None or so is None or sq[-2] != 1:
            return FailedMatch(self.name, anchor, "the query is not a row [..., 1, d]")
        seq = pl.get(cs).dim if isinstance(pl.get(cs), Shard) else None
        x = cs.args[0]
        sx = shape(x)
        if seq is None or sx is None:
            return None
        if canonical_name(x) == "mul" and len(sx) >= 3:
            a, b = x.args[0], x.args[1]
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                return None
            sa, sb = shape(a), shape(b)
            if sa is None or sb is None or len(sa) != len(sx) or len(sb) != len(sx):
                return None
            if sb[-1] == 1 and sa[-2] == 1:
                a, b = b, a
                sa, sb = sb, sa
            if not (sa[-1] == 1 and sb[-2] == 1):
                return FailedMatch(self.name, anchor, "cumsum of a product that is not k ⊗ v")
            k, v, batch = a, b, tuple(sx[:-2])
        elif chain and len(sx) >= 2:  # cumsum(k), viewed as a column [..., d, 1]
            k, v, batch = x, None, tuple(sx[:-1])
        else:
            return None
        if seq >= len(batch):
            return FailedMatch(self.name, anchor, "the cumsum runs over a feature dim")
        targets = [anchor, qr, k] + ([v] if v is not None else [])
        raw = evaluate(gm, targets, ctx.example_inputs, ctx.values)
        tol = value_tol(raw, 2e-3)
        vals = [t.double() for t in raw]
        try:
            kval = vals[2] if v is not None else vals[2].unsqueeze(-1)
            ref = _cumsum_scan(vals[1], kval, vals[3] if v is not None else None, seq, batch,
                               64, "", "", tuple(vals[0].shape))
        except Exception as e:  # noqa: BLE001 - a layout this pattern does not know
            return FailedMatch(self.name, anchor, f"cannot lay the roles out as a scan ({e})")
        err = ((ref - vals[0]).abs().max() / vals[0].abs().max().clamp_min(1e-6)).item()
        if not err < tol:
            return FailedMatch(self.name, anchor, f"values differ from a linear scan "
                                                  f"(relative error {err:.1e})")
        return Match(self.kind, self.name, anchor,
                     bindings={"q": qr, "k": k, "v": v},
                     nodes={anchor, cs, x, *chain},
                     info={"decay": "none", "seq": seq, "batch": batch,
                           "form": "q·cumsum(k⊗v)" if v is not None else "q·cumsum(k)",
                           "heads": int(torch.tensor(batch).prod().item()) // sx[seq],
                           "d_k": sq[-1], "d_v": so[-1]})

    def rewrite(self, gm: fx.GraphModule, ctx: Ctx, m: Match) -> None:
        g = gm.graph
        bar = torch.ops.spcompile.layout_barrier.default
        with g.inserting_before(m.anchor), ctx.provenance(gm, m, m.anchor):
            args = []
            for role in ("q", "k", "v"):
                n = m.bindings[role]
                if n is None:
                    args.append(None)
                    continue
                if role == "k" and m.bindings["v"] is None:
                    n = g.call_function(torch.unsqueeze, (n, -1))
                    set_meta(n)
                n = g.call_function(bar, (n,))
                set_meta(n)
                args.append(n)
            out = g.call_function(_cumsum_scan, (*args, m.info["seq"], m.info["batch"],
                                                 int(ctx.options.chunk_size),
                                                 m.strategy or "allgather", ctx.group_name,
                                                 tuple(shape(m.anchor))))
            set_meta(out)
        out.meta["spcompile_placement"] = ctx.placements.get(m.anchor)
        m.anchor.replace_all_uses_with(out)
