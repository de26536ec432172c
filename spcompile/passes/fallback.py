"""Pass 6 — fallback: nothing is ever silently wrong.

After the rewrite, placements are recomputed. Then, in graph order:

* a ``Partial`` value (a contraction over the sequence, e.g. ``kᵀ v`` of non-causal linear
  attention) is all-reduced where it is produced;
* an op that still mixes tokens along the sharded axis is computed on the gathered sequence and
  its result re-sharded (or kept replicated when it has no sequence axis), with one warning naming
  the op and the user's source line; with ``strict=True`` it is an error saying the same;
* every replicated floating output is wrapped in ``replicated_output`` (backward ÷ P; see
  ``spcompile.ops``).

At P = 1 nothing here changes the graph.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.fx as fx

from .. import ops as spops
from .graph_utils import canonical_name, run_node_on_values, set_meta, tensor_val, val
from .pipeline import Ctx, register_pass, source_line
from .sequence_axis import Pair, Partial, Replicate, Shard, analyze


class SequenceParallelError(RuntimeError):
    """A program spcompile cannot make sequence parallel (or, with strict=True, only by
    gathering). The message names the op, the user's line and what to do."""


@dataclass
class Fallback:
    node: str
    op: str
    reason: str
    source: Optional[str]
    action: str

    def __str__(self) -> str:
        return f"{self.op} ({self.reason}) at {self.source or '?'}: {self.action}"


def _first_mixing(gm: fx.GraphModule, ctx: Ctx) -> Optional[fx.Node]:
    """The first op (graph order) that still mixes tokens, or a partial sum that is used."""
    pl = ctx.placements
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        p = pl.get(node)
        if isinstance(p, Partial) and not node.meta.get("spcompile_reduced") and any(
                not isinstance(pl.get(u), Partial) or u.op == "output" for u in node.users):
            return node
        if node in ctx.mixing and node.users:
            return node
    return None


def _allreduce_partial(gm: fx.GraphModule, ctx: Ctx, node: fx.Node) -> None:
    with gm.graph.inserting_after(node), ctx.provenance(gm, None, node):
        red = gm.graph.call_function(torch.ops.spcompile.allreduce.default, (node, "sum", ctx.group_name))
    set_meta(red)
    red.meta["spcompile_placement"] = Replicate()
    node.replace_all_uses_with(red, delete_user_cb=lambda u: u is not red)
    node.meta["spcompile_reduced"] = True
    from .patterns.base import Match
    ctx.matches.append(Match("partial_sum", "contraction_over_sequence", node,
                             info={"op": canonical_name(node)}, strategy="allreduce",
                             reason="a sum over the sequence: all-reduced where it is made"))


def _gather_around(gm: fx.GraphModule, ctx: Ctx, node: fx.Node, reason: str) -> None:
    pl = ctx.placements
    op = canonical_name(node) or str(node.target)
    src = source_line(node)
    where = f"{op} at {src or node.name}"
    if ctx.options.strict:
        raise SequenceParallelError(
            f"spcompile (strict): {where} mixes tokens along the sharded sequence axis "
            f"({reason}) and no pattern covers it. Rewrite it with a supported form, declare it "
            f"with an spcompile annotation, or drop strict=True to gather the sequence around it.")
    for a in node.all_input_nodes:
        p = pl.get(a)
        if isinstance(p, Shard) and p.merged:
            raise SequenceParallelError(
                f"spcompile: {where} mixes tokens of a value whose sequence axis was merged with "
                f"another dim (e.g. [B*T, ...]); apply it before flattening, or keep the sequence "
                f"dim separate.")
        if isinstance(p, Pair):
            raise SequenceParallelError(
                f"spcompile: {where} uses a T×T value ({reason}) that no pattern covers; "
                f"spcompile cannot rebuild it for the global sequence. Use a supported attention "
                f"form or declare the layer with @spcompile.linear_attention.")
    gathered = {}
    with gm.graph.inserting_before(node), ctx.provenance(gm, None, node):
        for a in node.all_input_nodes:
            p = pl.get(a)
            if isinstance(p, Shard):
                gnode = gm.graph.call_function(spops.gather_seq, (a, p.dim, ctx.group_name))
                set_meta(gnode)
                gnode.meta["spcompile_placement"] = Replicate()
                gathered[a] = gnode
    node.args = fx.node.map_arg(node.args, lambda a: gathered.get(a, a))
    node.kwargs = fx.node.map_arg(node.kwargs, lambda a: gathered.get(a, a))
    local_val = val(node)
    try:
        global_val = run_node_on_values(node)
    except Exception as e:
        raise SequenceParallelError(
            f"spcompile: {where} mixes tokens along the sequence ({reason}); gathering the "
            f"sequence around it failed ({type(e).__name__}: {e}). It probably uses sizes of the "
            f"local shard. Compute it from shapes at run time or declare the layer with an "
            f"spcompile annotation.") from None
    node.meta["example_value"] = global_val
    outs = list(global_val) if isinstance(global_val, (tuple, list)) else [global_val]
    locs = list(local_val) if isinstance(local_val, (tuple, list)) else [local_val]
    dims = [_sharded_dim(g, l, ctx.world_size) for g, l in zip(outs, locs)]
    action = "gathered; result " + ", ".join("replicated" if d is None else f"re-sharded on dim {d}"
                                              for d in dims)
    if isinstance(global_val, (tuple, list)):
        for user in list(node.users):
            if canonical_name(user) == "getitem" and isinstance(user.args[1], int):
                d = dims[user.args[1]]
                user.meta["example_value"] = outs[user.args[1]]
                if d is not None:
                    _reshard_after(gm, ctx, user, d)
    elif dims[0] is not None:
        _reshard_after(gm, ctx, node, dims[0])
    ctx.fallbacks.append(Fallback(node.name, op, reason, src, action))
    warnings.warn(f"spcompile: {where} mixes tokens along the sharded sequence axis ({reason}) "
                  f"and no pattern covers it: computing it on the gathered sequence (correct, "
                  f"but it moves the whole sequence). Use strict=True to make this an error.",
                  stacklevel=2)


def _sharded_dim(global_val: Any, local_val: Any, P: int) -> Optional[int]:
    if not isinstance(global_val, torch.Tensor) or not isinstance(local_val, torch.Tensor):
        return None
    if global_val.dim() != local_val.dim():
        return None
    cands = [d for d in range(global_val.dim())
             if global_val.shape[d] == P * local_val.shape[d] != local_val.shape[d]]
    if not cands:
        return None
    return cands[0]


def _reshard_after(gm: fx.GraphModule, ctx: Ctx, node: fx.Node, dim: int) -> None:
    with gm.graph.inserting_after(node), ctx.provenance(gm, None, node):
        sl = gm.graph.call_function(spops.shard_slice, (node, dim, ctx.group_name))
    set_meta(sl)
    sl.meta["spcompile_placement"] = Shard(dim)
    node.replace_all_uses_with(sl, delete_user_cb=lambda u: u is not sl)


def _wrap_replicated_outputs(gm: fx.GraphModule, ctx: Ctx) -> None:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    pl = ctx.placements

    def wrap(a):
        if not isinstance(a, fx.Node):
            return a
        v = tensor_val(a)
        if v is None or not v.dtype.is_floating_point or not isinstance(pl.get(a, Replicate()),
                                                                         Replicate):
            return a
        if not any(not isinstance(pl.get(x), Replicate) for x in _ancestors_with(a)) and \
                not _has_param(a):
            return a
        with gm.graph.inserting_before(out):
            w = gm.graph.call_function(torch.ops.spcompile.replicated_output.default, (a, ctx.world_size))
        set_meta(w)
        return w

    out.args = fx.node.map_aggregate(out.args, wrap)


def _repropagate(gm: fx.GraphModule, ctx: Ctx, before: Dict[fx.Node, tuple]) -> None:
    """Recompute example values after gathers changed some shapes, and re-shard where a value
    computed on the gathered sequence (a *global* value, e.g. a shifted copy of the sequence)
    meets this rank's values again or reaches an output: wherever a tensor now has ``P×`` the
    length it had locally on some dim, the consumer gets this rank's slice of it."""
    P = ctx.world_size
    for node in list(gm.graph.nodes):
        if node.op in ("placeholder", "get_attr"):
            continue
        made_here = (node.meta.get("spcompile") or {}).get("pass") == "fallback"
        if node.op == "output" or not made_here:
            _reshard_global_args(gm, ctx, node, before, P)
        if node.op == "output":
            continue
        try:
            set_meta(node)
        except Exception as e:  # a later op that baked the local length
            raise SequenceParallelError(
                f"spcompile: after gathering the sequence for a fallback, "
                f"{canonical_name(node)} at {source_line(node) or node.name} no longer fits "
                f"({type(e).__name__}: {str(e)[:200]}); it uses sizes of the local shard. "
                f"Rewrite it in a supported form or declare the layer with an spcompile "
                f"annotation.") from None


def _reshard_global_args(gm, ctx: Ctx, node: fx.Node, before, P: int) -> None:
    replace = {}
    for a in node.all_input_nodes:
        now, was = tensor_val(a), before.get(a)
        if now is None or was is None or tuple(now.shape) == was or len(was) != now.dim():
            continue
        dims = [d for d in range(now.dim()) if now.shape[d] == P * was[d] != was[d]]
        if len(dims) != 1:
            continue
        with gm.graph.inserting_before(node), ctx.provenance(gm, None, node):
            sl = gm.graph.call_function(spops.shard_slice, (a, dims[0], ctx.group_name))
        set_meta(sl)
        sl.meta["spcompile_placement"] = Shard(dims[0])
        replace[a] = sl
    if replace:
        node.args = fx.node.map_arg(node.args, lambda x: replace.get(x, x))
        node.kwargs = fx.node.map_arg(node.kwargs, lambda x: replace.get(x, x))


def _ancestors_with(node: fx.Node):
    from .graph_utils import ancestors
    return ancestors(node) | {node}


def _has_param(node: fx.Node) -> bool:
    from .graph_utils import ancestors
    return any(n.op == "placeholder" and getattr(val(n), "requires_grad", False)
               for n in ancestors(node))


_INDEXING = ("integer index into the sequence axis", "slice of the sequence axis")


def _refuse_loops_over_the_sequence(ctx: Ctx) -> None:
    """Several indexings of one value along the sequence are a Python loop over tokens or
    chunks that Dynamo unrolled with the *local* count: gathering around each index would
    compute the first shard's chunks on every rank. Refuse it, loudly."""
    by_source: dict = {}
    for node, reason in ctx.mixing.items():
        if canonical_name(node) == "getitem" and reason in _INDEXING and node.users:
            by_source.setdefault(node.args[0], []).append(node)
    T = ctx.seq_len
    for src, nodes in by_source.items():
        p = ctx.placements.get(src)
        spans = [_seq_span(n, p.dim, T) for n in nodes] if isinstance(p, Shard) else []
        spans = sorted(sp for sp in spans if sp is not None)
        covered, tiles = 0, len(spans) >= 2
        for a, b in spans:  # blocks of a loop tile [0, T_local) exactly
            tiles = tiles and a == covered and b > a
            covered = b
        if len(nodes) >= 3 or (tiles and covered == T):
            raise SequenceParallelError(
                f"spcompile: {len(nodes)} slices/indexes along the sharded sequence axis of one "
                f"value (first at {source_line(nodes[0]) or nodes[0].name}): a Python loop over "
                f"tokens or chunks, unrolled with this rank's local count. spcompile cannot make "
                f"it sequence parallel by gathering. Write the layer in a supported form (masked "
                f"quadratic, segsum, cumsum), or declare it with @spcompile.linear_attention / "
                f"@spcompile.ssm_scan.")


def _seq_span(node: fx.Node, dim: int, T: int):
    """The [start, stop) a getitem takes along ``dim`` of a length-``T`` axis (None: unknown)."""
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    d = 0
    for i in idx:
        if i is None:
            continue
        if i is Ellipsis:
            return None
        if d == dim:
            if isinstance(i, int):
                i = i % T
                return (i, i + 1)
            if isinstance(i, slice) and i.step in (None, 1) and all(
                    isinstance(b, (int, type(None))) for b in (i.start, i.stop)):
                a, b, _ = i.indices(T)
                return (a, b)
            return None
        d += 1
    return None


def _check_output_shapes(gm: fx.GraphModule, ctx: Ctx, before: list) -> None:
    """After gathering, every graph output must keep its local shape (a gathered value that
    reaches an output unsharded would break the contract)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    after = [tensor_val(a) for a in fx.node.map_aggregate(out.args[0], lambda x: x)] \
        if isinstance(out.args[0], (tuple, list)) else [tensor_val(out.args[0])]
    for i, (b, a) in enumerate(zip(before, after)):
        if b is not None and a is not None and tuple(a.shape) != tuple(b):
            where = "; ".join(str(f) for f in ctx.fallbacks) or "?"
            raise SequenceParallelError(
                f"spcompile: output {i} would have shape {tuple(a.shape)} instead of this "
                f"rank's {tuple(b)}: a value computed on the gathered sequence ({where}) reaches "
                f"the output with a length that is not the global sequence length, so it cannot "
                f"be re-sharded. Rewrite that op in a supported form or declare the layer with "
                f"an spcompile annotation.")


def _check_local_lengths(gm: fx.GraphModule, ctx: Ctx, ideal, pl) -> None:
    """A value that should be this rank's shard (its placement before the fallback) but is now
    computed from gathered values and still has the *local* length was built with sizes of the
    local shard (blocks of a loop, slices at local offsets): it would be rank 0's values on every
    rank. Refuse it."""
    T = ctx.seq_len
    gathered = {n for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "gather_seq"}
    if not gathered or T is None:
        return
    from .graph_utils import ancestors
    for node in gm.graph.nodes:
        want = ideal.get(node)
        if not isinstance(want, Shard) or not isinstance(pl.get(node), Replicate):
            continue
        v = tensor_val(node)
        if v is None or want.dim >= v.dim() or v.shape[want.dim] != T:
            continue
        if ancestors(node) & gathered:
            raise SequenceParallelError(
                f"spcompile: {canonical_name(node)} at {source_line(node) or node.name} is "
                f"computed from the gathered sequence with sizes of the local shard (length {T}, "
                f"e.g. blocks of a Python loop or slices at local offsets), so every rank would "
                f"get the first shard's values. Write the layer in a supported form or declare "
                f"it with @spcompile.linear_attention / @spcompile.ssm_scan.")


def _output_shapes(gm: fx.GraphModule) -> list:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    args = out.args[0] if isinstance(out.args[0], (tuple, list)) else [out.args[0]]
    return [None if tensor_val(a) is None else tuple(tensor_val(a).shape) for a in args]


@register_pass("fallback")
def fallback(gm: fx.GraphModule, ctx: Ctx) -> fx.GraphModule:
    """All-reduce partial sums; gather around uncovered token mixing (warn) or refuse (strict)."""
    if ctx.world_size == 1:
        return gm
    ideal = dict(analyze(gm, ctx))
    _refuse_loops_over_the_sequence(ctx)
    before = _output_shapes(gm)
    local_shapes = {n: tuple(tensor_val(n).shape) for n in gm.graph.nodes
                    if tensor_val(n) is not None}
    for _ in range(1000):
        pl = analyze(gm, ctx)
        node = _first_mixing(gm, ctx)
        if node is None:
            break
        if isinstance(pl[node], Partial):
            _allreduce_partial(gm, ctx, node)
        else:
            _gather_around(gm, ctx, node, ctx.mixing[node])
    gm.graph.lint()
    if ctx.fallbacks:
        _repropagate(gm, ctx, local_shapes)
        _check_output_shapes(gm, ctx, before)
    pl = analyze(gm, ctx)
    if ctx.fallbacks:
        _check_local_lengths(gm, ctx, ideal, pl)
    _wrap_replicated_outputs(gm, ctx)
    gm.recompile()
    return gm
