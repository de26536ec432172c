"""Causal linear attention in its masked quadratic form — with or without decay.

    O = ((Q Kᵀ) ⊙ M) V            M[i, j] = [j <= i] · scale · exp(c_i - c_j)

covers plain causal linear attention (``M = tril``), RetNet / lightning attention
(``M = γ^(i-j)``, fixed per head) and simple GLA / Mamba2 SSD (``M = exp(segsum(g))``,
data-dependent), whatever the spelling of the mask (multiply, ``masked_fill``, ``where``,
a buffer, a tril of ones, an additive form folded in ``exp``). The normaliser ``(Q Kᵀ ⊙ M).sum(-1)``
of linear transformers is the same scan with ``V = 1``.

Structure finds the roles: the anchor is a matmul ``A @ V`` (or a sum over the last dim of ``A``)
where ``A`` is a ``T×T`` value; walking back from ``A`` through elementwise ops reaches the score
matmul ``S = Q @ Kᵀ``; a ``cumsum`` along the sequence inside the mask (not under ``S``) is the
data-dependent log decay. Values decide the rest: on the example inputs the mask ``A / S`` must be
zero above the diagonal (else "mask is not causal"), its diagonal gives the scale, its
sub-diagonal a fixed per-head decay, and the whole anchor must equal ``linear_scan`` of the bound
roles (else the match is refused with the measured error). Checking by value is what lets one
pattern accept every spelling without being fooled by any.
"""
from __future__ import annotations

import operator
from typing import Iterable, List, Optional, Set, Tuple

import torch
import torch.fx as fx

from ... import ops as spops
from ...kernels import check_linear_scan
from ...kernels.linear_scan.reference import chunked_linear_scan
from ..graph_utils import (ancestors, arg, canonical_name, evaluate, set_meta,
                           shape, tensor_val)
from ..pipeline import Ctx
from ..sequence_axis import ELEMENTWISE, Pair, Shard
from .base import FailedMatch, Found, Match, Pattern, value_tol

_PASS_THROUGH = ELEMENTWISE | {"permute", "reshape", "view", "expand", "contiguous", "tril", "triu",
                               "unsqueeze", "squeeze", "to", "float"}


def _pair_inputs(node: fx.Node, pl) -> List[fx.Node]:
    return [a for a in node.all_input_nodes if isinstance(pl.get(a), Pair)]


def find_scores(a: fx.Node, pl) -> Tuple[Optional[fx.Node], Set[fx.Node], str]:
    """Walk back from a T×T value through elementwise ops to the score matmul Q @ Kᵀ."""
    chain: Set[fx.Node] = set()
    cur = a
    for _ in range(64):
        name = canonical_name(cur)
        if name == "matmul" and isinstance(pl.get(cur), Pair):
            return cur, chain, ""
        if name in ("softmax", "log_softmax"):
            return None, chain, "scores pass through softmax (softmax attention, not a scan)"
        if name not in _PASS_THROUGH:
            return None, chain, f"{name} between the scores and the product"
        chain.add(cur)
        pair_in = _pair_inputs(cur, pl)
        if len(pair_in) != 1:
            # two T×T operands: the scores and a T×T mask; the scores are the one that leads
            # to a matmul of sharded operands
            scored = [p for p in pair_in if _leads_to_scores(p, pl)]
            if len(scored) != 1:
                return None, chain, "cannot tell the scores from the mask"
            pair_in = scored
        cur = pair_in[0]
    return None, chain, "chain too long"


def user_inputs_reached(start: fx.Node, stops: Set[fx.Node]) -> List[str]:
    """Names of the user inputs (placeholders other than parameters and buffers) that
    ``start`` depends on without passing through ``stops`` (the scores, a recognised decay):
    a mask that depends on them (a padding mask) cannot be read by value from one example."""
    from ..sequence_axis import _is_param_or_buffer, _user_name
    seen, todo, found = set(), [start], []
    while todo:
        n = todo.pop()
        if n in seen or n in stops:
            continue
        seen.add(n)
        if n.op == "placeholder":
            v = n.meta.get("example_value")
            if not _is_param_or_buffer(n) and not getattr(v, "requires_grad", False) and \
                    isinstance(v, torch.Tensor):
                found.append(_user_name(n) or n.name)
            continue
        todo.extend(n.all_input_nodes)
    return sorted(found)


_REPEAT_WALK = {"masked_fill", "where", "mul", "tril", "triu", "contiguous", "clone"}


def _repeated_decay(g: fx.Node, pl) -> Optional[fx.Node]:
    """``x[..., None].repeat(1, ..., T)`` (or ``expand``), perhaps masked, → ``x`` (``[..., T]``
    sharded on its last dim)."""
    cur = g
    for _ in range(16):
        name = canonical_name(cur)
        if name in ("repeat", "expand"):
            x = cur.args[0]
            if canonical_name(x) in ("unsqueeze", "getitem", "view", "reshape"):
                base = x.args[0]
                sb, sc = shape(base), shape(cur)
                pb = pl.get(base)
                if isinstance(base, fx.Node) and sb is not None and len(sb) == len(sc) - 1 and \
                        tuple(sb) == tuple(sc[:-1]) and isinstance(pb, Shard) and \
                        pb.dim == len(sb) - 1:
                    return base
            return None
        if name not in _REPEAT_WALK:
            return None
        shaped = [a for a in cur.all_input_nodes if shape(a) == shape(g) and
                  isinstance(pl.get(a), Shard)]
        if len(shaped) != 1:
            return None
        cur = shaped[0]
    return None


def _leads_to_scores(n: fx.Node, pl) -> bool:
    for _ in range(64):
        if canonical_name(n) == "matmul" and isinstance(pl.get(n), Pair):
            return True
        ins = _pair_inputs(n, pl)
        if len(ins) != 1:
            return False
        n = ins[0]
    return False


def _with_batch(x: torch.Tensor, batch: Tuple[int, ...]) -> torch.Tensor:
    return x.reshape(*batch, *x.shape[-2:])


def _scores_batch(s: fx.Node, chain: Set[fx.Node]) -> Optional[Tuple[int, ...]]:
    """The batch shape the scores take in the product when a reshape / unsqueeze in the chain
    inserts unit dims before their last two (``(C @ Bᵀ)[:, None] * L``: B/C shared by the
    heads, Mamba2's ``ngroups = 1``), else None."""
    ss = shape(s)
    for u in s.users:
        if u not in chain or canonical_name(u) not in ("reshape", "view", "unsqueeze"):
            continue
        so = shape(u)
        if so is None or ss is None or len(so) <= len(ss) or tuple(so[-2:]) != tuple(ss[-2:]):
            continue
        sb, ob = list(ss[:-2]), list(so[:-2])
        rest = [d for d in ob if d != 1] if all(d != 1 for d in sb) else None
        if rest == sb:
            return tuple(ob)
    return None


def _flat_heads(x: torch.Tensor, batch: Tuple[int, ...]) -> torch.Tensor:
    """[*batch, T, D] → [1, T, N, D] (the scan layout), broadcasting over ``batch``."""
    T, D = x.shape[-2], x.shape[-1]
    x = x.expand(*batch, T, D).reshape(-1, T, D)
    return x.permute(1, 0, 2).unsqueeze(0).contiguous()


class MaskedLinearAttention(Pattern):
    name = "masked_linear_attention"
    kind = "linear_scan"

    # ------------------------------------------------------------------ find
    def find(self, gm: fx.GraphModule, ctx: Ctx) -> Iterable[Found]:
        pl = ctx.placements
        for node in gm.graph.nodes:
            name = canonical_name(node)
            if name == "matmul" and isinstance(pl.get(node.args[0]), Pair):
                yield self._match(gm, ctx, node, node.args[0], node.args[1])
            elif name == "sum" and isinstance(pl.get(node.args[0]), Pair):
                a = node.args[0]
                dims = arg(node, 1, "dim")
                nd = len(shape(a))
                if isinstance(dims, (list, tuple)) and len(dims) == 1:
                    dims = dims[0]
                if isinstance(dims, int) and dims % nd == nd - 1:
                    yield self._match(gm, ctx, node, a, None)
                else:
                    yield FailedMatch(self.name, node, "sum of a T×T value not over its last dim")

    def _match(self, gm, ctx: Ctx, anchor: fx.Node, a: fx.Node, v: Optional[fx.Node]) -> Found:
        pl = ctx.placements
        pa = pl.get(a)
        nd = len(shape(a))
        if not (pa.d0 == nd - 2 and pa.d1 == nd - 1):
            return FailedMatch(self.name, anchor, "T×T operand is not [..., T, T]")
        if v is not None:
            pv = pl.get(v)
            if not (isinstance(pv, Shard) and pv.dim == len(shape(v)) - 2):
                return FailedMatch(self.name, anchor, "values are not [..., T, D] sharded on T")
        s, chain, why = find_scores(a, pl)
        if s is None:
            return None if "softmax" in why else FailedMatch(self.name, anchor, why)
        qn, ktn = s.args[0], s.args[1]
        if not (isinstance(pl.get(qn), Shard) and isinstance(pl.get(ktn), Shard)):
            return FailedMatch(self.name, anchor, "scores are not Q @ Kᵀ of sharded Q, K")
        qk_batch = _scores_batch(s, chain)
        # data-dependent decay: a cumsum along the sequence under the mask, not under S
        under_s = ancestors(s) | {s}
        mask_nodes = (ancestors(a) | {a}) - under_s
        cumsums = [n for n in mask_nodes if canonical_name(n) == "cumsum"
                   and isinstance(pl.get(n.args[0]), Shard)]
        decay_node = None
        if len(cumsums) > 1:
            return FailedMatch(self.name, anchor, "several cumsums in the mask")
        if cumsums:
            c = cumsums[0]
            g = c.args[0]
            gd = arg(c, 1, "dim")
            gsh = shape(g)
            if pl.get(g).dim != gd % len(gsh):
                return FailedMatch(self.name, anchor, "decay cumsum is not along the sequence")
            decay_node = (g, gd % len(gsh))
            if len(gsh) >= 2 and gd % len(gsh) == len(gsh) - 2 and gsh[-1] == gsh[-2]:
                # Mamba2 ssd_minimal's segsum: the cumsum runs over x[..., None].repeat(...,
                # T) masked below the diagonal; the decay is x (the values check it)
                src = _repeated_decay(g, pl)
                if src is None:
                    return FailedMatch(self.name, anchor, "a cumsum of a T×T value that is not "
                                                          "a repeated decay")
                decay_node = (src, len(shape(src)) - 1)
        data = user_inputs_reached(a, {s} | set(cumsums))
        if data:
            return FailedMatch(self.name, anchor, f"the mask depends on the input(s) {data} "
                                                  f"(a padding mask?): a mask is read by value "
                                                  f"from one example, so it must not depend on "
                                                  f"the data")
        try:
            info = self._check_values(gm, ctx, anchor, a, s, qn, ktn, v, decay_node, mask_nodes,
                                      qk_batch)
        except _Refuse as e:
            return FailedMatch(self.name, anchor, str(e))
        nodes = chain | {s, anchor} | {n for n in mask_nodes
                                        if not isinstance(pl.get(n), Shard) or n is a}
        nodes |= set(cumsums)  # the decay's cumsum lives inside the mask
        return Match(self.kind, self.name, anchor,
                     bindings={"q": qn, "kT": ktn, "v": v, "scores": s,
                               "log_decay": decay_node[0] if decay_node else None},
                     nodes=nodes, info=dict(info, qk_batch=qk_batch))

    # ------------------------------------------------------------------ value checks
    def _check_values(self, gm, ctx, anchor, a, s, qn, ktn, v, decay_node, mask_nodes,
                      qk_batch=None):
        targets = [anchor, a, s, qn, ktn] + ([v] if v is not None else []) + \
            ([decay_node[0]] if decay_node else [])
        vals = evaluate(gm, targets, ctx.example_inputs, ctx.values)
        tol = value_tol(vals, 2e-3)
        O, A, S, Q, KT = (x.double() for x in vals[:5])
        if qk_batch is not None:  # scores [B, T, T] broadcast over heads as [B, 1, T, T]
            Q = Q.reshape(*qk_batch, *Q.shape[-2:])
            KT = KT.reshape(*qk_batch, *KT.shape[-2:])
            S = S.reshape(*qk_batch, *S.shape[-2:])
        V = vals[5].double() if v is not None else None
        T = A.shape[-1]
        Ab = A.expand(torch.broadcast_shapes(A.shape, S.shape))
        Sb = S.expand(Ab.shape)
        upper = torch.ones(T, T, dtype=torch.bool).triu(1)
        if T > 1 and Ab[..., upper].abs().max() > 1e-6 * max(1.0, Ab.abs().max().item()):
            return self._refuse("mask is not causal (non-zero above the diagonal)")
        ok = Sb.abs() > 1e-4 * Sb.abs().max().clamp_min(1e-30)
        ratio = torch.where(ok, Ab / torch.where(ok, Sb, torch.ones_like(Sb)),
                            torch.full_like(Sb, float("nan")))
        diag = torch.diagonal(ratio, dim1=-2, dim2=-1)
        diag = diag[~torch.isnan(diag)]
        if diag.numel() == 0:
            return self._refuse("could not read the mask from the example inputs")
        scale = diag.median().item()
        if (diag - scale).abs().max() > 1e-4 * max(abs(scale), 1e-6):
            return self._refuse("mask diagonal is not one constant scale")
        if scale == 0:
            return self._refuse("mask is zero on the diagonal")
        info: dict = {"scale": scale}
        B = tuple(Ab.shape[:-2])
        q4 = _flat_heads(Q, B)
        k4 = _flat_heads(KT.transpose(-1, -2), B)
        v4 = _flat_heads(V, B) if V is not None else q4.new_ones(1, T, q4.shape[2], 1)
        N = q4.shape[2]
        if decay_node is not None:
            gval = vals[-1].double()
            g = _decay_to_heads(gval, decay_node[1], B)
            info["decay"] = "data-dependent [B, T, H]"
            candidates = [("scalar", g)]
        else:
            sub = torch.diagonal(ratio, offset=-1, dim1=-2, dim2=-1) / scale  # [*B, T-1]
            if T < 2 or torch.isnan(sub).all():
                candidates = [("none", None)]
            else:
                sub = sub.reshape(N, -1) if sub.numel() else sub
                gam = torch.nanmedian(sub, dim=-1).values  # [N]
                if torch.allclose(gam, torch.ones_like(gam), atol=1e-6):
                    candidates = [("none", None)]
                elif (gam <= 0).any():
                    return self._refuse("mask has non-positive decay below the diagonal")
                else:
                    candidates = [("head", gam.log())]
        kind, g = candidates[0]
        chk = check_linear_scan(q4.float(), k4.float(), v4.float(), None if g is None else
                                g.float())
        if not chk:
            return self._refuse(f"the scan kernel cannot take these inputs: {chk.reason}")
        ref, _ = chunked_linear_scan(q4, k4, v4, g, scale, None, 64)
        if V is None:
            ref = ref[..., 0]
            if O.dim() == len(B) + 2:  # sum(-1, keepdim=True)
                O = O[..., 0]
            got = _flat_heads(O.unsqueeze(-1), B)[..., 0]
        else:
            got = _flat_heads(O, B)
        err = (ref - got).abs().max().item() / max(got.abs().max().item(), 1e-6)
        if not err < tol:
            return self._refuse(f"values differ from a {kind}-decay linear scan (relative error "
                                f"{err:.1e}): mask is not a causal decay mask")
        info["decay"] = kind
        info["batch"] = B
        info["d_k"], info["d_v"] = int(q4.shape[-1]), int(v4.shape[-1])
        info["heads"] = N
        if kind == "head":
            info["log_decay_value"] = g.float()
            data_inputs = {n for n in gm.graph.nodes if n.op == "placeholder"}
            mask_deps = (set().union(*[ancestors(n) for n in mask_nodes]) if mask_nodes
                         else set()) - ancestors(s)
            params_in_mask = [n for n in mask_deps & data_inputs
                              if n.meta.get("example_value") is not None
                              and getattr(n.meta["example_value"], "requires_grad", False)]
            if params_in_mask:
                return self._refuse("the decay mask depends on trainable parameters; declare "
                                    "the layer with @spcompile.linear_attention(decay=...)")
        return info

    def _refuse(self, reason: str):
        raise _Refuse(reason)

    # ------------------------------------------------------------------ rewrite
    def rewrite(self, gm: fx.GraphModule, ctx: Ctx, m: Match) -> None:
        anchor = m.anchor
        B = m.info["batch"]
        g = gm.graph
        with g.inserting_before(anchor), ctx.provenance(gm, m, anchor):
            qn, kt = m.bindings["q"], m.bindings["kT"]
            qb = m.info.get("qk_batch")
            if qb is not None:  # the scores' batch as the product broadcast it
                qn = g.call_function(_with_batch, (qn, tuple(qb)))
                set_meta(qn)
                kt = g.call_function(_with_batch, (kt, tuple(qb)))
                set_meta(kt)
            q = _to_heads(g, qn, B)
            k = g.call_function(torch.transpose, (kt, -1, -2))
            set_meta(k)
            k = _to_heads(g, k, B)
            if m.bindings["v"] is not None:
                v = _to_heads(g, m.bindings["v"], B)
            else:
                v = g.call_function(torch.ones_like, (q,))
                set_meta(v)
                v = g.call_function(operator.getitem, (v, (Ellipsis, slice(0, 1))))
                set_meta(v)
            kind = m.info["decay"]
            if kind == "head":
                # a constant read off the mask; inlined as a literal (AOTAutograd accepts no
                # new buffers on a Dynamo graph)
                gd = g.call_function(torch.tensor, (m.info["log_decay_value"].tolist(),),
                                     {"dtype": torch.float32})
                set_meta(gd)
            elif kind == "scalar":
                gd = _decay_heads_node(g, m.bindings["log_decay"],
                                       ctx.placements[m.bindings["log_decay"]].dim, B)
            else:
                gd = None
            o = g.call_function(spops.scan, (q, k, v, gd, float(m.info["scale"]),
                                             int(ctx.options.chunk_size), m.strategy or
                                             "allgather", ctx.group_name,
                                             m.info.get("blocks")))
            set_meta(o)
            out = _from_heads(g, o, B, shape(anchor), vector=m.bindings["v"] is not None)
            if tensor_val(anchor) is not None and tensor_val(out).dtype != tensor_val(anchor).dtype:
                out = g.call_function(torch.Tensor.to, (out, tensor_val(anchor).dtype))
                set_meta(out)
        out.meta["spcompile_placement"] = ctx.placements.get(anchor)
        anchor.replace_all_uses_with(out)


class _Refuse(Exception):
    pass


def _decay_to_heads(gval: torch.Tensor, dim: int, B: Tuple[int, ...]) -> torch.Tensor:
    """log decays ``[..., T, ...]`` (sequence at ``dim``) → ``[1, T, N]`` for batch ``B``."""
    x = gval.movedim(dim, -1)  # [..., T]
    T = x.shape[-1]
    x = x.expand(*B, T).reshape(-1, T)
    return x.t().unsqueeze(0).contiguous()


def _to_heads(g: fx.Graph, x: fx.Node, B) -> fx.Node:
    n = g.call_function(torch.ops.spcompile.layout_barrier.default, (x,))
    set_meta(n)
    n = g.call_function(_flat_heads, (n, tuple(B)))
    set_meta(n)
    return n


def _decay_heads_node(g: fx.Graph, x: fx.Node, dim: int, B) -> fx.Node:
    n = g.call_function(torch.ops.spcompile.layout_barrier.default, (x,))
    set_meta(n)
    n = g.call_function(_decay_to_heads, (n, dim, tuple(B)))
    set_meta(n)
    return n


def _unflat(o: torch.Tensor, batch: Tuple[int, ...], out_shape: Tuple[int, ...],
            vector: bool) -> torch.Tensor:
    """[1, T, N, D] → out_shape ([*batch, T, D], or [*batch, T] for the normaliser)."""
    o = o.squeeze(0).permute(1, 0, 2)  # [N, T, D]
    if not vector:
        o = o[..., 0]
    return o.reshape(out_shape)


def _from_heads(g: fx.Graph, o: fx.Node, B, out_shape, vector: bool) -> fx.Node:
    n = g.call_function(_unflat, (o, tuple(B), tuple(out_shape), vector))
    set_meta(n)
    return n
