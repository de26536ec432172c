"""Softmax attention written by hand: ``softmax(Q Kᵀ · s + mask) V``.

Model zoos spell it many ways (an additive ``-inf`` mask, ``masked_fill(~tril, -inf)``, a
``where``, a scale before or after the product, ``/ sqrt(d)``). As for the linear-attention family,
structure finds the roles (the anchor ``A @ V`` with ``A`` a row softmax of T×T scores that walk
back to ``Q @ Kᵀ``) and values decide the rest: on the example inputs ``A`` must be zero above the
diagonal (causal) or nowhere (full attention), the scale is read off the logits, and the anchor
must equal ``scaled_dot_product_attention`` of the bound roles. The rewrite is the same
``sp_attention`` call as for SDPA.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from ..graph_utils import canonical_name, evaluate, set_meta, shape
from ..pipeline import Ctx
from ..sequence_axis import Pair, Shard
from .base import FailedMatch, Found, Match, Pattern, value_tol
from .linear_attention import find_scores, user_inputs_reached
from .sequence_ops import _finish, _sdpa_sp


def _heads4(x: torch.Tensor, batch) -> torch.Tensor:
    """[*batch, T, D] → [N, 1, T, D] (SDPA layout, one head per flattened batch entry)."""
    T, D = x.shape[-2:]
    return x.expand(*batch, T, D).reshape(-1, 1, T, D).contiguous()


def _attend(q, k_t, v, batch, out_shape, causal: bool, scale: float, strategy: str,
            group_name: str):
    q4, k4, v4 = _heads4(q, batch), _heads4(k_t.transpose(-1, -2), batch), _heads4(v, batch)
    if group_name:
        o = _sdpa_sp(q4, k4, v4, causal, scale, False, strategy, group_name)
    else:
        o = F.scaled_dot_product_attention(q4, k4, v4, is_causal=causal, scale=scale)
    return o.reshape(out_shape)


class ManualSoftmaxAttention(Pattern):
    name = "manual_softmax_attention"
    kind = "attention"

    def find(self, gm, ctx: Ctx) -> Iterable[Found]:
        pl = ctx.placements
        for node in gm.graph.nodes:
            if canonical_name(node) != "matmul" or not isinstance(pl.get(node.args[0]), Pair):
                continue
            a, v = node.args[0], node.args[1]
            sm = a
            while canonical_name(sm) in ("dropout", "to", "float", "type_as", "contiguous"):
                sm = sm.args[0]
            if canonical_name(sm) != "softmax":
                continue
            logits = sm.args[0]
            s, chain, why = find_scores(logits, pl)
            if s is None:
                yield FailedMatch(self.name, node, why)
                continue
            pv = pl.get(v)
            if not (isinstance(pv, Shard) and pv.dim == len(shape(v)) - 2):
                yield FailedMatch(self.name, node, "values are not [..., T, D] sharded on T")
                continue
            data = user_inputs_reached(logits, {s})
            if data:
                yield FailedMatch(self.name, node, f"the mask depends on the input(s) {data} "
                                                   f"(a padding mask?); it is not read by value")
                continue
            found = self._check(gm, ctx, node, a, logits, s, v)
            if isinstance(found, str):
                yield FailedMatch(self.name, node, found)
                continue
            yield Match(self.kind, self.name, node,
                        bindings={"q": s.args[0], "kT": s.args[1], "v": v},
                        nodes=chain | {s, sm, a, node}, info=found)

    def _check(self, gm, ctx, anchor, a, logits, s, v):
        raw = evaluate(gm, [anchor, a, logits, s, s.args[0], s.args[1], v], ctx.example_inputs,
                       ctx.values)
        tol = value_tol(raw, 1e-3)
        O, A, L, S, Q, KT, V = (x.double() for x in raw)
        T = A.shape[-1]
        upper = torch.ones(T, T, dtype=torch.bool).triu(1)
        causal = bool((A[..., upper].abs() <= 1e-12).all()) if T > 1 else True
        Sb = S.expand(torch.broadcast_shapes(S.shape, L.shape))
        Lb = L.expand(Sb.shape)
        ok = torch.isfinite(Lb) & (Sb.abs() > 1e-4 * Sb.abs().max().clamp_min(1e-30))
        if causal:
            ok &= ~upper
        ratios = (Lb / torch.where(ok, Sb, torch.ones_like(Sb)))[ok]
        if ratios.numel() == 0:
            return "could not read the scale from the logits"
        scale = ratios.median().item()
        batch = tuple(torch.broadcast_shapes(A.shape[:-2], V.shape[:-2]))
        ref = _attend(Q, KT, V, batch, O.shape, causal, scale, "", "")
        err = ((ref - O).abs().max() / O.abs().max().clamp_min(1e-6)).item()
        if not err < tol:
            return (f"values differ from {'causal ' if causal else ''}softmax attention (relative "
                    f"error {err:.1e}): the mask is not a causal mask or the logits carry a bias")
        return {"causal": causal, "scale": scale, "batch": batch, "B": 1,
                "H": int(torch.tensor(batch).prod().item()) if batch else 1, "D": Q.shape[-1]}

    def rewrite(self, gm, ctx: Ctx, m: Match) -> None:
        if ctx.world_size == 1:
            return
        g = gm.graph
        with g.inserting_before(m.anchor), ctx.provenance(gm, m, m.anchor):
            out = g.call_function(_attend, (m.bindings["q"], m.bindings["kT"], m.bindings["v"],
                                            m.info["batch"], tuple(shape(m.anchor)),
                                            m.info["causal"], m.info["scale"], m.strategy,
                                            ctx.group_name))
            set_meta(out)
        _finish(ctx, m.anchor, out, Shard(len(shape(m.anchor)) - 2))
