"""A constant causal mixing matrix applied to the tokens: ``C @ x`` with ``C`` built from the
sequence length alone.

    y = C x,   C[i, j] = r_i · γ^(i-j) · [j <= i]   (per leading index of C: a head)

covers the running sum ``torch.tril(torch.ones(T, T)) @ x``, the running mean (the "bag of
words" average ``wei = tril / tril.sum(1, keepdim=True)``, or ``softmax`` of a zero matrix
``masked_fill``-ed with ``-inf`` above the diagonal), an exponential moving average
``γ^(i-j)`` mask (Mega's EMA, a fixed RetNet decay without scores) and per-head versions
of these. ``C`` is a constant: there is nothing to learn and no score product; it is read by
value — the copy the global program would build (sizes of the global length) is evaluated
once at compile time, and must be exactly that form. The rewrite is a linear scan with
``q = k = 1`` (the state is the decayed running sum; the hand-off is the scan's), times the
row scale ``r`` of this rank's rows (a constant).

A matrix of another form (not causal, not Toeplitz after the row scale) is left to the
fallback, which computes it on the gathered sequence.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.fx as fx

from ... import ops as spops
from ..graph_utils import canonical_name, evaluate, set_meta, shape
from ..pipeline import Ctx
from ..sequence_axis import Pair, Replicate, Shard
from .base import FailedMatch, Found, Match, Pattern

_MAX_CHECK = 1 << 26  # elements of the global matrix evaluated at compile time


def _global_value(gm: fx.GraphModule, ctx: Ctx, c: fx.Node, user: fx.Node
                  ) -> Optional[torch.Tensor]:
    """The value the global program gives ``c`` (sizes of the local length made global),
    computed on scratch nodes that are removed again: finding leaves the graph as it was."""
    from ..fallback import SequenceParallelError, _GlobalRebuild
    before = set(gm.graph.nodes)
    try:
        with gm.graph.inserting_before(user):
            g = _GlobalRebuild(gm, ctx, "constant mixing matrix", "read by value")(c)
        value = evaluate(gm, [g], ctx.example_inputs, {})[0] if g is not c else None
    except (SequenceParallelError, RuntimeError, TypeError, ValueError):
        value = None
    finally:
        made = [n for n in gm.graph.nodes if n not in before]
        while made:  # users first
            n = next(n for n in made if not n.users)
            gm.graph.erase_node(n)
            made.remove(n)
    return value


def _mix(x, r, log_gamma, batch, out_shape, chunk_size: int, strategy: str, group_name: str,
         blocks):
    """``C @ x`` for ``C[i, j] = r_i γ^(i-j) [j <= i]``: a scan with unit q and k."""
    from .linear_attention import _flat_heads
    T = x.shape[-2]
    v = _flat_heads(x, batch)  # [1, T, N, D]
    N = v.shape[2]
    ones = v.new_ones(1, T, N, 1)
    g = None if log_gamma is None else torch.tensor(log_gamma, dtype=torch.float32,
                                                      device=x.device)
    o = spops.scan(ones, ones, v, g, 1.0, chunk_size, strategy, group_name, blocks)
    if r is not None:
        rr = torch.tensor(r, dtype=o.dtype, device=o.device)  # [N, T]
        o = o * rr.t()[None, :, :, None]
    o = o.squeeze(0).permute(1, 0, 2)  # [N, T, D]
    return o.reshape(out_shape).to(x.dtype)


class ConstantCausalMix(Pattern):
    name = "constant_causal_mix"
    kind = "linear_scan"

    def find(self, gm: fx.GraphModule, ctx: Ctx) -> Iterable[Found]:
        if ctx.world_size == 1 or not ctx.seq_len:
            return
        from ..fallback import _has_param, _length_constant
        from .linear_attention import user_inputs_reached
        pl, T, P = ctx.placements, ctx.seq_len, ctx.world_size
        memo: dict = {}
        for node, reason in list(ctx.mixing.items()):
            if canonical_name(node) != "matmul" or len(node.args) != 2:
                continue
            c, x = node.args
            if not (isinstance(c, fx.Node) and isinstance(x, fx.Node)):
                continue
            sc, sx, so = shape(c), shape(x), shape(node)
            px = pl.get(x)
            if sc is None or sx is None or so is None or len(sc) < 2 or len(sx) < 2:
                continue
            pc = pl.get(c)
            if not (isinstance(px, Shard) and not px.merged and px.dim == len(sx) - 2 and
                    tuple(sc[-2:]) == (T, T)):
                continue
            if isinstance(pc, Pair):
                # built from positions (``γ ** (i[:, None] - i[None, :])``): a rank holds the
                # diagonal block, which for a Toeplitz matrix is the same on every rank
                if (pc.d0, pc.d1) != (len(sc) - 2, len(sc) - 1) or user_inputs_reached(c, set()) \
                        or _has_param(c):
                    continue
            elif not (isinstance(pc, Replicate) and _length_constant(c, ctx, memo)):
                continue
            batch = tuple(torch.broadcast_shapes(tuple(sc[:-2]), tuple(sx[:-2])))
            if tuple(so) != batch + (T, sx[-1]):
                continue
            if isinstance(pc, Pair):
                C = evaluate(gm, [c], ctx.example_inputs, {})[0]
            elif (P * T) ** 2 * max(1, int(torch.tensor(sc[:-2]).prod().item())) > _MAX_CHECK:
                yield FailedMatch(self.name, node, "the global matrix is too large to read by "
                                                   "value at compile time")
                continue
            else:
                C = _global_value(gm, ctx, c, node)
                if C is None or tuple(C.shape[-2:]) != (P * T, P * T):
                    yield FailedMatch(self.name, node, "could not rebuild the matrix for the "
                                                       "global length")
                    continue
            form = _causal_form(C.double(), batch)
            if isinstance(form, str):
                yield FailedMatch(self.name, node, form)
                continue
            r, log_gamma = form
            N = r.shape[0]
            if isinstance(pc, Pair):
                if not torch.allclose(r, r[:, :1].expand_as(r), rtol=1e-6, atol=0):
                    yield FailedMatch(self.name, node, "a matrix built from positions with a "
                                      "row scale that depends on the position")
                    continue
                rows = r
            else:
                rows = r[:, ctx.rank * T:(ctx.rank + 1) * T]
            unit = bool(torch.all(r == 1))  # over all ranks' rows: one graph on every rank
            yield Match(self.kind, self.name, node, bindings={"x": x, "C": c},
                        nodes={node},
                        info={"decay": "none" if log_gamma is None else "head",
                              "row_scale": "none" if unit else "per row",
                              "heads": N, "d_k": 1, "d_v": int(sx[-1]), "batch": batch,
                              "_r": None if unit else rows.float().tolist(),
                              "_log_gamma": log_gamma})

    def rewrite(self, gm: fx.GraphModule, ctx: Ctx, m: Match) -> None:
        node = m.anchor
        with gm.graph.inserting_before(node), ctx.provenance(gm, m, node):
            x = gm.graph.call_function(torch.ops.spcompile.layout_barrier.default,
                                       (m.bindings["x"],))
            set_meta(x)
            out = gm.graph.call_function(_mix, (x, m.info["_r"], m.info["_log_gamma"],
                                                m.info["batch"], tuple(shape(node)),
                                                int(ctx.options.chunk_size),
                                                m.strategy or "allgather", ctx.group_name,
                                                m.info.get("blocks")))
            set_meta(out)
        out.meta["spcompile_placement"] = ctx.placements.get(node)
        node.replace_all_uses_with(out)


def _causal_form(C: torch.Tensor, batch) -> object:
    """``(r [N, T], log γ [N] or None)`` when ``C[..., i, j] = r_i γ^(i-j) [j <= i]`` for
    every leading index (flattened over ``batch``), else why not."""
    Tg = C.shape[-1]
    C = C.expand(*batch, Tg, Tg).reshape(-1, Tg, Tg)
    upper = torch.ones(Tg, Tg, dtype=torch.bool).triu(1)
    big = C.abs().max().item()
    if big == 0 or not torch.isfinite(C).all():
        return "matrix is zero or not finite"
    if C[:, upper].abs().max() > 1e-7 * big:
        return "matrix is not causal (non-zero above the diagonal)"
    r = torch.diagonal(C, dim1=-2, dim2=-1)  # [N, T]
    if (r == 0).any():
        return "zero on the diagonal"
    sub = torch.diagonal(C, offset=-1, dim1=-2, dim2=-1) / r[:, 1:]
    gam = sub.median(dim=-1).values if Tg > 1 else torch.ones(C.shape[0], dtype=C.dtype)
    if (gam <= 0).any():
        return "non-positive decay below the diagonal"
    i = torch.arange(Tg, dtype=C.dtype)
    dist = (i[:, None] - i[None, :]).clamp_min(0)
    want = r[:, :, None] * gam[:, None, None] ** dist[None] * (~upper)[None]
    err = (want - C).abs().max().item() / big
    if not err < 1e-6:
        return f"matrix is not a row-scaled causal decay r_i·γ^(i-j) (relative error {err:.1e})"
    one = torch.allclose(gam, torch.ones_like(gam), rtol=0, atol=1e-12)
    return r, None if one else gam.log().tolist()
