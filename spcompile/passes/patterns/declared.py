"""Declared scans: the marker op of ``@spcompile.linear_attention`` / ``@spcompile.ssm_scan``.

An annotated function puts one ``spcompile::declared_scan(q, k, v, log_decay, scale, causal,
chunk_size, decl_id)`` call in the Dynamo graph, with q, k, v already in ``[B, T, H, D]``. There
is nothing to infer: the roles are the op's arguments. ``find`` checks that the sequence axis of
q, k, v (and of a data-dependent decay) is dim 1, runs the declaration's numerical verification
when it asked for one, and yields a Match; ``rewrite`` replaces the marker by

* causal: ``spcompile.ops.scan(q, k, v, log_decay, scale, chunk_size, strategy, group)`` — the
  local kernel at P = 1, the sequence-parallel scan with the planned hand-off at P > 1;
* non-causal: ``scale · q (allreduce(Σ_t k_tᵀ v_t))`` — a partial sum made global.
"""
from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.fx as fx

from ... import ops as spops
from ..graph_utils import arg, set_meta, shape, tensor_val
from ..pipeline import Ctx
from ..sequence_axis import Replicate, Shard
from .base import FailedMatch, Found, Match, Pattern


def _is_marker(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    marker = getattr(getattr(torch.ops, "spcompile", None), "declared_scan", None)
    return marker is not None and node.target in (marker, marker.default)


def _noncausal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               group_name: str) -> torch.Tensor:
    """``scale · q (Σ_t k_tᵀ v_t)`` with the sum over the whole (sharded) sequence."""
    f = torch.float64 if q.dtype == torch.float64 else torch.float32
    kv = torch.einsum("bthk,bthv->bhkv", k.to(f), v.to(f))
    if group_name:
        kv = torch.ops.spcompile.allreduce(kv.contiguous(), "sum", group_name)
    return (scale * torch.einsum("bthk,bhkv->bthv", q.to(f), kv)).to(v.dtype)


def _trim_annotation_frames(node: fx.Node) -> None:
    """Drop the decorator's own frames from the marker's stack trace, so that every message
    (explain, fallbacks, errors) names the user's line that called the annotated function."""
    trace = node.meta.get("stack_trace")
    if not trace or "annotations.py" not in trace:
        return
    lines = trace.rstrip("\n").splitlines()
    keep: list = []
    i = 0
    while i < len(lines):
        ln = lines[i]
        if ln.strip().startswith('File "') and ln.split('"')[1].endswith(
                os.path.join("spcompile", "annotations.py")):
            i += 1
            while i < len(lines) and not lines[i].strip().startswith('File "'):
                i += 1
            continue
        keep.append(ln)
        i += 1
    if any(ln.strip().startswith('File "') for ln in keep):
        node.meta["stack_trace"] = "\n".join(keep) + "\n"


class DeclaredScan(Pattern):
    """Calls of ``@spcompile.linear_attention`` / ``@spcompile.ssm_scan`` functions → scans."""
    name = "declared_scan"
    kind = "linear_scan"

    def find(self, gm: fx.GraphModule, ctx: Ctx) -> Iterable[Found]:
        from ...annotations import DeclarationError, declaration
        pl = ctx.placements
        for node in gm.graph.nodes:
            if not _is_marker(node):
                continue
            _trim_annotation_frames(node)
            q, k, v, g = (arg(node, i, n) for i, n in enumerate(("q", "k", "v", "log_decay")))
            scale, causal = arg(node, 4, "scale"), arg(node, 5, "causal")
            decl_id = arg(node, 7, "decl_id")
            try:
                d = declaration(decl_id)
            except DeclarationError as e:
                yield FailedMatch(self.name, node, str(e))
                continue
            bad = [r for r, x in (("q", q), ("k", k), ("v", v))
                   if not (isinstance(pl.get(x), Shard) and pl.get(x).dim == 1)]
            if len(bad) == 3 and all(isinstance(pl.get(x, Replicate()), Replicate)
                                     for x in (q, k, v)):
                yield FailedMatch(self.name, node, f"q, k, v of {d.where()} are not "
                                                   f"sequence-shaped: the scan stays local")
                continue
            if bad:
                yield FailedMatch(self.name, node,
                                  f"{', '.join(bad)} of {d.where()} not sharded on the sequence "
                                  f"dim of the declared layout {d.layout!r}")
                continue
            if g is not None and len(shape(g) or ()) >= 3:
                pg = pl.get(g, Replicate())
                if not (isinstance(pg, Shard) and pg.dim == 1):
                    yield FailedMatch(self.name, node, f"log decay of {d.where()} is {pg}, not "
                                                       f"sharded on its sequence dim")
                    continue
            if d.verify and not d.verified:
                if not self._verify(d, q, k, v, g):
                    ctx.notes.append(f"{d.where()}: verify=True, but the function takes "
                                     f"arguments besides the scan inputs; it is verified on its "
                                     f"first eager call (or call .verify(...))")
            qv, vv = tensor_val(q), tensor_val(v)
            decay = "none" if g is None else {1: "head", 3: "scalar", 4: "vector"}[
                len(shape(g))]
            info = {"declared": d.where(), "decay": decay, "scale": float(scale),
                    "causal": bool(causal), "heads": qv.shape[2] * qv.shape[0],
                    "d_k": qv.shape[3], "d_v": vv.shape[3]}
            yield Match(self.kind, self.name, node,
                        bindings={"q": q, "k": k, "v": v, "log_decay": g}, nodes={node},
                        info=info)

    @staticmethod
    def _verify(d, q: fx.Node, k: fx.Node, v: fx.Node, g) -> bool:
        """Verification with the graph's shapes (batch 1, a few steps), before any rewrite.
        False when the function needs arguments the graph cannot supply."""
        import inspect
        from ...annotations import verify_declaration
        roles = {d.q, d.k, d.v, d.decay}
        for name, p in inspect.signature(d.fn).parameters.items():
            if name not in roles and p.default is p.empty and p.kind not in (
                    p.VAR_POSITIONAL, p.VAR_KEYWORD):
                return False

        def real(node):
            t = tensor_val(node)
            return torch.empty(tuple(t.shape), dtype=t.dtype)

        vals = {d.q: real(q), d.k: real(k), d.v: real(v)}
        if d.decay is not None:
            vals[d.decay] = real(g)
        if d.layout == "bhtd":  # the marker sees bthd; the user's function takes bhtd
            vals = {n: (x if x.dim() == 1 else x.transpose(1, 2)) for n, x in vals.items()}
        kwargs = {n: x for n, x in vals.items()}
        verify_declaration(d, (), kwargs)
        return True

    def rewrite(self, gm: fx.GraphModule, ctx: Ctx, m: Match) -> None:
        node = m.anchor
        b = m.bindings
        graph = gm.graph
        with graph.inserting_before(node), ctx.provenance(gm, m, node):
            if m.info["causal"]:
                out = graph.call_function(spops.scan, (
                    b["q"], b["k"], b["v"], b["log_decay"], float(m.info["scale"]),
                    int(ctx.options.chunk_size), m.strategy or "allgather", ctx.group_name))
            else:
                out = graph.call_function(_noncausal, (b["q"], b["k"], b["v"],
                                                       float(m.info["scale"]), ctx.group_name))
            set_meta(out)
            val = tensor_val(out)
            if val is not None and val.dtype != tensor_val(node).dtype:
                out = graph.call_function(torch.Tensor.to, (out, tensor_val(node).dtype))
                set_meta(out)
        out.meta["spcompile_placement"] = Shard(1)
        node.replace_all_uses_with(out)
