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
from .graph_utils import (canonical_name, eliminate_dead_code, evaluate, run_node_on_values,
                          seq_span, set_meta, shape, tensor_val, tiles_axis, val)
from .pipeline import Ctx, register_pass, source_line
from .sequence_axis import ELEMENTWISE, Pair, Partial, Replicate, Shard, analyze


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


def _from_pair_shape(n: fx.Node, pl, memo: Dict[fx.Node, bool]) -> bool:
    """A replicated value built from the shape of a ``T×T`` value (``ones_like(scores)``, then
    ``.tril()``, ``== 0``): this rank's block of a global constant, to rebuild globally."""
    if n in memo:
        return memo[n]
    memo[n] = False
    if not isinstance(pl.get(n), Replicate) or n.op != "call_function" and n.op != "call_method":
        return False
    from .sequence_axis import _SHAPE_LIKE
    ins = n.all_input_nodes
    if canonical_name(n) in _SHAPE_LIKE:
        memo[n] = bool(ins) and isinstance(pl.get(ins[0]), Pair)
    else:
        memo[n] = any(_from_pair_shape(a, pl, memo) for a in ins)
    return memo[n]


def _gather_around(gm: fx.GraphModule, ctx: Ctx, node: fx.Node, reason: str) -> None:
    pl = ctx.placements
    op = canonical_name(node) or str(node.target)
    src = source_line(node)
    where = f"{op} at {src or node.name}"
    from .dispatch import refusal
    msg = refusal(ctx, node, where, reason)
    if msg is not None:  # sorted rows (MoE dispatch): gathering them would not help
        raise SequenceParallelError(msg)
    if ctx.options.strict:
        raise SequenceParallelError(
            f"spcompile (strict): {where} mixes tokens along the sharded sequence axis "
            f"({reason}) and no pattern covers it. Rewrite it with a supported form, declare it "
            f"with an spcompile annotation, or drop strict=True to gather the sequence around it.")
    from .graph_utils import inside_vmap
    if node in inside_vmap(gm):
        raise SequenceParallelError(
            f"spcompile: {where} mixes tokens along the sharded sequence axis ({reason}) inside "
            f"a function run under torch.func.vmap; spcompile cannot gather around an op "
            f"inside a vmap. Move the token-mixing op out of the vmapped function.")
    for a in node.all_input_nodes:
        p = pl.get(a)
        if isinstance(p, Shard) and p.merged:
            hint = ""
            if op in _ROUTING_OPS:
                hint = (" Over the flattened tokens this is e.g. expert-choice routing (each "
                        "expert picks its top tokens) or a capacity limit that drops tokens by "
                        "their place among all tokens: both depend on every rank's tokens, so "
                        "the sharded result would differ. Route each token on its own scores "
                        "(token-choice top-k, no dropping).")
            raise SequenceParallelError(
                f"spcompile: {where} mixes tokens of a value whose sequence axis was merged with "
                f"another dim (e.g. [B*T, ...]) ({reason}); apply it before flattening, or keep "
                f"the sequence dim separate.{hint}")
    gathered = {}
    with gm.graph.inserting_before(node), ctx.provenance(gm, None, node):
        rebuild = _GlobalRebuild(gm, ctx, where, reason)
        for a in node.all_input_nodes:
            p = pl.get(a)
            if isinstance(p, Shard):
                gathered[a] = rebuild.gather(a, p.dim)
            elif isinstance(p, Pair) or _from_pair_shape(a, pl, {}):
                # a rank only holds the diagonal block of a T×T value: recompute the value
                # from the gathered sequence (global positions, global masks; constants
                # shaped like it, ``zeros_like(scores)``)
                gathered[a] = rebuild(a)
        # constants made with the local length (``tril(ones(T, T)) @ x``): the global
        # program makes them with the global length (tried first; kept as they are if the
        # op does not take them, a size that only equals the local length by chance)
        memo: Dict[fx.Node, bool] = {}
        consts = {}
        for a in node.all_input_nodes:
            if a not in gathered and _length_constant(a, ctx, memo):
                try:
                    g = rebuild(a)
                except SequenceParallelError:
                    continue
                if g is not a:
                    consts[a] = g
    args0, kwargs0 = node.args, node.kwargs
    local_val = val(node)
    global_val, err = None, None
    for use in ([consts, {}] if consts else [{}]):
        swap = {**gathered, **use}
        node.args = fx.node.map_arg(args0, lambda a: swap.get(a, a))
        node.kwargs = fx.node.map_arg(kwargs0, lambda a: swap.get(a, a))
        _globalize_sizes(node, {gathered[a]: pl[a].dim for a in gathered
                                if isinstance(pl[a], Shard)}, ctx)
        try:
            global_val = run_node_on_values(node)
            err = None
            break
        except Exception as e:  # noqa: BLE001 - reported below
            err = e
    if err is not None:
        raise SequenceParallelError(
            f"spcompile: {where} mixes tokens along the sequence ({reason}); gathering the "
            f"sequence around it failed ({type(err).__name__}: {err}). It probably uses sizes of the "
            f"local shard. Compute it from shapes at run time or declare the layer with an "
            f"spcompile annotation. (If this graph starts after a graph break, an input that "
            f"eager code made between the graphs may have been taken for sequence-shaped by its "
            f"dim {ctx.options.seq_dim}, e.g. MoE tokens picked with torch.where: avoid the "
            f"break, or mark the tensor with spcompile.mark_sequence(t, None).)") from None
    node.meta["example_value"] = global_val
    outs = list(global_val) if isinstance(global_val, (tuple, list)) else [global_val]
    locs = list(local_val) if isinstance(local_val, (tuple, list)) else [local_val]
    dims = [_pair_dims(g, l, ctx) or _sharded_dim(g, l, ctx.world_size)
            for g, l in zip(outs, locs)]
    action = "gathered; result " + ", ".join(
        "replicated" if d is None else f"re-sharded on dim {d}" if isinstance(d, int) else
        f"cut to this rank's diagonal block of dims {d}" for d in dims)
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


# ops over the flattened tokens that route by rank among tokens (expert choice, capacity)
_ROUTING_OPS = {"topk", "sort", "argsort", "cumsum", "cumprod", "kthvalue", "msort"}


def _allreduce_counts(gm: fx.GraphModule, ctx: Ctx) -> bool:
    """Per-expert counts of this rank's rows (``histc``/``bincount``, see ``dispatch``) used as
    values (a load-balancing loss, a returned statistic) mean the global counts: all-reduced
    (sum) for those uses; the grouped matmuls keep this rank's counts. → whether it changed
    the graph."""
    from .sequence_axis import GroupCounts
    uses = {n: list(cs) for n, cs in ctx.count_uses.items()}
    out = next(n for n in gm.graph.nodes if n.op == "output")
    returned = [a for a in out.all_input_nodes if isinstance(ctx.placements.get(a), GroupCounts)]
    if returned:
        uses[out] = returned
    done: Dict[fx.Node, fx.Node] = {}
    for user, counts in uses.items():
        for c in counts:
            if c not in done:
                with gm.graph.inserting_after(c), ctx.provenance(gm, None, c):
                    red = gm.graph.call_function(torch.ops.spcompile.allreduce.default,
                                                 (c, "sum", ctx.group_name))
                set_meta(red)
                red.meta["spcompile_placement"] = Replicate()
                done[c] = red
                from .patterns.base import Match
                ctx.matches.append(Match(
                    "reduction", "expert_counts", c, info={"op": canonical_name(c)},
                    strategy="allreduce", reason="this rank's per-expert counts, used as a "
                    "value: summed over ranks (the grouped matmuls keep the local counts)"))
            user.replace_input_with(c, done[c])
    return bool(done)


_REBUILD_THROUGH = ELEMENTWISE | {"getitem", "unsqueeze", "view", "reshape", "expand"}
_SIZED_CREATION = {"ones", "zeros", "empty", "rand", "randn", "eye", "full"}


class _GlobalRebuild:
    """Copies of the ops that make a ``T×T`` value, computed on the gathered sequence.

    Sharded inputs are gathered (positions included: gathering this rank's global positions
    gives ``arange(P·T)``); replicated values built with the local length (``ones(T, T)``,
    ``full((T, T), -inf)``, ``buffer[:T, :T]``) are rebuilt with the global one (sizes read from
    the sequence mean the global length); other replicated values are used as they are. A copy
    that does not fit (a size baked some other way) is a clear error."""

    def __init__(self, gm, ctx: Ctx, where: str, reason: str) -> None:
        self.gm, self.ctx, self.where, self.reason = gm, ctx, where, reason
        self.memo: Dict[fx.Node, fx.Node] = {}

    def gather(self, a: fx.Node, dim: int) -> fx.Node:
        if a not in self.memo:
            g = self.gm.graph.call_function(spops.gather_seq, (a, dim, self.ctx.group_name))
            set_meta(g)
            g.meta["spcompile_placement"] = Replicate()
            self.memo[a] = g
        return self.memo[a]

    def _scale(self, v):
        T, P = self.ctx.seq_len, self.ctx.world_size
        if isinstance(v, bool) or not isinstance(v, int):
            return v
        return v * P if v == T else v

    def __call__(self, n: fx.Node) -> fx.Node:
        if n in self.memo:
            return self.memo[n]
        p = self.ctx.placements.get(n, Replicate())
        if isinstance(p, Shard) and canonical_name(n) in _REBUILD_THROUGH and \
                n.all_input_nodes and all(tensor_val(a) is not None for a in n.all_input_nodes):
            pass  # recomputed from its rebuilt inputs: (causal[None, None] + pad) holds a
            # local-length constant that must become global too
        elif isinstance(p, Shard):
            if p.merged:
                raise SequenceParallelError(
                    f"spcompile: {self.where} uses a T×T value ({self.reason}) built from a "
                    f"value whose sequence axis was merged with another dim; keep the sequence "
                    f"dim separate.")
            return self.gather(n, p.dim)
        if n.op in ("placeholder", "get_attr") or (isinstance(p, Replicate) and not n.all_input_nodes
                                                   and canonical_name(n) not in _SIZED_CREATION):
            return n
        name = canonical_name(n)
        args, kwargs = n.args, dict(n.kwargs)
        if isinstance(p, Replicate) and name in _SIZED_CREATION:
            if name == "full":
                size = args[0] if args else kwargs.get("size")
                size = tuple(self._scale(v) for v in size) if isinstance(size, (list, tuple)) \
                    else size
                args = (size,) + tuple(args[1:]) if args else args
            else:
                args = tuple(tuple(self._scale(v) for v in a) if isinstance(a, (list, tuple))
                             else self._scale(a) for a in args)
        elif isinstance(p, Replicate) and name == "getitem" and isinstance(args[1], (tuple, slice)):
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            idx = tuple(slice(i.start, self._scale(i.stop), i.step) if isinstance(i, slice)
                        else i for i in idx)
            args = (args[0], idx if isinstance(args[1], tuple) else idx[0]) + tuple(args[2:])
        elif name in ("expand", "view", "reshape") and isinstance(p, (Pair, Shard)) and \
                not getattr(p, "merged", False) and len(args) >= 2:
            # the sizes of the sequence axes of the result mean the global length
            # (HF's mask.expand(batch, -1, q_length, kv_length))
            axes = {p.d0, p.d1} if isinstance(p, Pair) else {p.dim}
            sizes = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) \
                else args[1:]
            sizes = tuple(self._scale(v) if i in axes else v for i, v in enumerate(sizes))
            args = (args[0], sizes) if len(args) == 2 and isinstance(args[1], (list, tuple)) \
                else (args[0],) + sizes
        new_args = fx.node.map_arg(args, self)
        new_kwargs = fx.node.map_arg(kwargs, self)
        if isinstance(p, Replicate) and new_args == n.args and new_kwargs == dict(n.kwargs):
            self.memo[n] = n
            return n
        c = self.gm.graph.create_node(n.op, n.target, new_args, new_kwargs)
        for key in ("stack_trace", "nn_module_stack"):
            if key in n.meta:
                c.meta[key] = n.meta[key]
        try:
            set_meta(c)
        except Exception as e:
            raise SequenceParallelError(
                f"spcompile: {self.where} uses a T×T value ({self.reason}) that no pattern "
                f"covers, and recomputing it for the global sequence failed at "
                f"{canonical_name(n)} ({source_line(n) or n.name}: {type(e).__name__}: "
                f"{str(e)[:200]}); it probably uses sizes of the local shard. Use a supported "
                f"attention form or declare the layer with @spcompile.linear_attention.") from None
        c.meta["spcompile_placement"] = Replicate()
        self.memo[n] = c
        return c


_RANDOM = {"rand", "randn", "randint", "empty", "rand_like", "randn_like", "empty_like"}


def _length_sized(n: fx.Node, T: int) -> bool:
    """``ones(T, 1)``, ``full((T, T), v)``, ``eye(T)``, ``buffer[:T]``: a replicated value
    made with the local length (sizes read from the sequence are the local ones in the graph)."""
    name = canonical_name(n)
    if name in _SIZED_CREATION:
        args = list(n.args) + list(n.kwargs.values())
        flat = [v for a in args for v in (a if isinstance(a, (list, tuple)) else (a,))]
        return any(isinstance(v, int) and not isinstance(v, bool) and v == T for v in flat)
    if name == "getitem" and n.args and isinstance(n.args[0], fx.Node) and \
            n.args[0].op in ("placeholder", "get_attr"):
        idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
        return any(isinstance(i, slice) and i.stop == T for i in idx)
    return False


def _length_constant(c: fx.Node, ctx: Ctx, memo: Dict[fx.Node, bool]) -> bool:
    """A replicated value computed only from constants, with a size of the local length among
    its makers (and nothing random): the global program would compute it with the global
    length, so its values along that axis may differ from this rank's block of it."""
    if c in memo:
        return memo[c]
    memo[c] = False
    pl = ctx.placements
    if not isinstance(pl.get(c), Replicate) or c.op != "call_function" or \
            canonical_name(c) in _RANDOM:
        return False
    from .sequence_axis import _is_param_or_buffer
    ins = c.all_input_nodes
    if any(a.op == "placeholder" and not _is_param_or_buffer(a) for a in ins):
        return False
    ok = _length_sized(c, ctx.seq_len) or any(_length_constant(a, ctx, memo) for a in ins)
    ok = ok and all(_length_constant(a, ctx, memo) or a.op in ("placeholder", "get_attr") or
                    not a.all_input_nodes for a in ins)
    memo[c] = ok
    if ok:
        _length_number_in_constant(c, ctx)
    return ok


def _length_suspects(T: Optional[int]) -> Dict[float, str]:
    """The numbers a length folded to this rank's ``T`` shows up as."""
    if not T or T < 2:
        return {}
    return {float(T): "T", float(2 * T): "2·T", 1.0 / T: "1/T", 1.0 / (2 * T): "1/(2·T)"}


def _suspect(c: Any, suspects: Dict[float, str]) -> Optional[str]:
    if isinstance(c, bool) or not isinstance(c, (int, float)):
        return None
    return next((k for v, k in suspects.items() if abs(float(c) - v) <= 1e-9 * v), None)


def report_local_length(ctx: Ctx, msg: str, strong: bool = True) -> None:
    """A local-length constant found: an error under ``length_constants="error"`` where it
    matters (``strong``), else a warning; nothing with ``"ignore"``."""
    mode = getattr(ctx.options, "length_constants", "error")
    if mode == "ignore":
        return
    if mode == "error" and strong:
        raise SequenceParallelError(msg)
    warnings.warn(msg, stacklevel=3)


def local_length_index(ctx: Ctx, node: fx.Node, i: Any, n: int, what: str = "index") -> None:
    """A non-negative index or slice bound into the sequence in the upper half of the shard
    (``x[:, T - 1]``, ``x.size(1) - 1``, ``x[:, 4:T - 4]``) is almost surely computed from the
    length, which is folded to the LOCAL one in the graph: position 15 of 16 is this rank's
    last token, while the user meant the sequence's. An error (``length_constants``: ``warn``,
    ``ignore`` take the index as a global position). Negative indices (``x[:, -1]``) say it."""
    if not isinstance(i, int) or isinstance(i, bool) or not n // 2 < i < n:
        return
    report_local_length(ctx, (
        f"spcompile: the {what} {i} into the sequence at {source_line(node) or node.name} "
        f"is {n - i} before this rank's local length T = {n}: if it was computed from the "
        f"length (x[:, T - 1], x.size(1) - {n - i}), it is the LOCAL length here and the "
        f"sharded result would be wrong. Count from the end with a negative index "
        f"(x[:, -{n - i}], x[:, :-{n - i}]), or pass options={{'length_constants': "
        f"'ignore'}} if {i} is a fixed position of the whole sequence."))


def _length_number_in_constant(node: fx.Node, ctx: Ctx) -> None:
    """``torch.tril(torch.ones(T, T)) / T``: the number is the LOCAL length folded into the
    graph, and the global program divides by the global one; spcompile sees only the number,
    so such a constant cannot be rebuilt for the global length. An error (option
    ``length_constants``: ``warn`` / ``ignore`` take the number literally)."""
    T = ctx.seq_len
    suspects = _length_suspects(T)
    if canonical_name(node) not in _ARITH or not suspects:
        return
    for c in list(node.args) + list(node.kwargs.values()):
        hit = _suspect(c, suspects)
        if hit is None:
            continue
        report_local_length(ctx, (
               f"spcompile: the constant {c} in {canonical_name(node)} at "
               f"{source_line(node) or node.name} equals {hit} for this rank's local length "
               f"T = {T}, in a constant built from the sequence length (a mask or weights "
               f"made with torch.ones(T, ...) / torch.tril ...). If the number was computed "
               f"from the sequence length, it is the LOCAL length here and the sharded result "
               f"would be wrong: spcompile only sees the folded number. Compute it from a "
               f"tensor (e.g. m.sum(-1, keepdim=True) of the mask itself), or pass "
               f"options={{'length_constants': 'ignore'}} if it does not come from the length."))


def _aligned_dims(c: fx.Node, u: fx.Node, p, T: int) -> list:
    """The dims of ``c`` that line up (right-aligned broadcasting) with the sequence axes of
    ``u``'s value, where ``c`` has the local length."""
    sc, su = shape(c), shape(u)
    if sc is None or su is None or len(sc) > len(su):
        return []
    axes = [p.d0, p.d1] if isinstance(p, Pair) else [p.dim]
    off = len(su) - len(sc)
    return [a - off for a in axes if 0 <= a - off < len(sc) and sc[a - off] == T]


# ops whose operands line up by broadcasting (a constant's axis meets the sequence axis)
_ALIGNING = ELEMENTWISE | {"where", "masked_fill", "lerp", "addcmul", "addcdiv"}


def _rank_block(x, dims, start: int, length: int):
    for d in dims:
        x = x.narrow(d, start, length)
    return x


def _globalize_length_constants(gm: fx.GraphModule, ctx: Ctx) -> None:
    """A constant made with the local length whose values vary along that length
    (``torch.ones(T, 1).cumsum(0)``, a position-dependent mask built from ``ones(T, T)``)
    and that meets a sharded value along its sequence axis (``x * c``) is this rank's block of
    the constant the global program computes, not the constant computed locally: it is rebuilt
    with the global length and cut to this rank's block (its diagonal block for a ``T×T``
    value). Constants whose block equals the local value (``ones``, ``tril(ones)``, a
    Toeplitz decay) are left alone; ops that mix tokens get the global constant whole in
    ``_gather_around``."""
    T, P, pl = ctx.seq_len, ctx.world_size, ctx.placements
    if not T or P == 1:
        return
    memo: Dict[fx.Node, bool] = {}
    made = False
    for u in list(gm.graph.nodes):
        pu = pl.get(u)
        if u.op != "call_function" or u in ctx.mixing or not isinstance(pu, (Shard, Pair)) or \
                getattr(pu, "merged", False) or canonical_name(u) not in _ALIGNING:
            continue
        for c in list(dict.fromkeys(u.all_input_nodes)):
            if not _length_constant(c, ctx, memo):
                continue
            dims = _aligned_dims(c, u, pu, T)
            if not dims:
                continue
            where = f"{canonical_name(u)} at {source_line(u) or u.name}"
            with gm.graph.inserting_before(u), ctx.provenance(gm, None, u):
                try:
                    glob = _GlobalRebuild(gm, ctx, where, "a constant of the local length")(c)
                except SequenceParallelError:
                    continue
                if glob is c:
                    continue
                made = True  # (an unused rebuild is removed at the end)
                try:
                    whole, local = evaluate(gm, [glob, c], ctx.example_inputs, {})
                    blocks = [_rank_block(whole, dims, r * T, T) for r in range(P)]
                    # every rank's block is the local value (nothing to do; decided for all
                    # ranks alike, so that every rank compiles the same graph), or another
                    # local-length axis that is not the sequence's (x[..., None].repeat(...,
                    # T) masked with a tril(T, T))
                    skip = any(b.shape != local.shape for b in blocks) or \
                        all(torch.equal(b, local) for b in blocks)
                except Exception:  # noqa: BLE001 - values unknown: leave it
                    skip = True
                if skip:
                    continue
                blk = gm.graph.call_function(_rank_block, (glob, tuple(dims), ctx.rank * T, T))
                set_meta(blk)
            blk.meta["spcompile_placement"] = Replicate()
            u.replace_input_with(c, blk)
    if made:
        eliminate_dead_code(gm)


def _globalize_sizes(node: fx.Node, gdims: Dict[fx.Node, int], ctx: Ctx) -> set:
    """Sizes read from the sequence mean the global length (DESIGN.md §1): an op computed on
    the gathered sequence gets them scaled from the local to the global length, where they are
    visible as arguments along the gathered dim: an FFT length ``n = c·T`` (Hyena's
    ``rfft(x, n=2*T)``) and slice bounds ``c·T`` (``y[..., :T]``). ``gdims``: the inputs that
    now hold global values, with the dim that grew. Returns the inputs so consumed whole."""
    T, P = ctx.seq_len, ctx.world_size
    if not T or P == 1 or not node.args or node.args[0] not in gdims:
        return set()
    x = node.args[0]
    before = (node.args, dict(node.kwargs))
    d = gdims[x]
    nd = tensor_val(x).dim() if tensor_val(x) is not None else None
    name = canonical_name(node) or ""

    def scale(v):
        if isinstance(v, int) and not isinstance(v, bool) and v != 0 and v % T == 0:
            return v * P
        return v

    if name.startswith("fft_") and nd is not None:
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else -1)
        n = node.kwargs.get("n", node.args[1] if len(node.args) > 1 else None)
        if isinstance(dim, int) and dim % nd == d and n is not None and scale(n) != n:
            if "n" in node.kwargs:
                node.kwargs = dict(node.kwargs, n=scale(n))
            else:
                node.args = (node.args[0], scale(n)) + tuple(node.args[2:])
    elif name == "getitem" and nd is not None:
        idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        out, cur = [], 0
        for i in idx:
            if i is Ellipsis:
                cur += nd - n_real
            elif i is not None:
                if cur == d and isinstance(i, slice) and i.step in (None, 1):
                    for b in (i.start, i.stop):
                        if isinstance(b, int) and b % T:
                            local_length_index(ctx, node, b, T, "slice bound")
                    i = slice(scale(i.start), scale(i.stop), i.step)
                cur += 1
            out.append(i)
        new = tuple(out) if isinstance(node.args[1], tuple) else out[0]
        node.args = (node.args[0], new) + tuple(node.args[2:])
    return {x} if (node.args, dict(node.kwargs)) != before else set()


_ARITH = {"mul", "div", "truediv", "add", "sub", "rsub", "floordiv", "mod", "remainder", "fmod"}


def _refuse_local_length_writes(gm: fx.GraphModule, ctx: Ctx) -> None:
    """Writes at positions no pattern placed: into part of a sharded axis (what is left of a
    Python loop over tokens spcompile could not rewrite) — refused; and ``m = torch.ones(T);
    m[0] = 0`` (then ``x * m[None, :, None]``): a replicated buffer made
    with the local length and written at a fixed position along that length. Sizes read from
    the sequence mean the global length, so ``m`` stands for a global vector whose position 0 is
    on the first rank only — but every rank writes its own local position 0. Refused unless
    ``length_constants="ignore"`` (a length that only equals ``T_local`` by chance)."""
    from .patterns.sequence_ops import _index_span, _write_site
    from .graph_utils import inside_vmap
    T = ctx.seq_len
    if not T:
        return
    covered = set(inside_vmap(gm))
    for m in ctx.matches:
        covered |= set(m.nodes)
    for node in gm.graph.nodes:
        site = _write_site(node)
        if site is None or node in covered or node.meta.get("spcompile_write"):
            continue
        y, idx, _ = site
        sy = shape(y)
        py = ctx.placements.get(y)
        if isinstance(py, Shard) and sy is not None:
            span = _index_span(idx, py.dim, len(sy), sy[py.dim])
            if span is None or (span[0], span[1]) != (0, sy[py.dim]):
                raise SequenceParallelError(
                    f"spcompile: {canonical_name(node)} at {source_line(node) or node.name} "
                    f"writes into part of the sharded sequence axis of {y.name} in a way no "
                    f"pattern covers (several writes along it: a Python loop over tokens that "
                    f"is not a recurrence spcompile understands, or an index it cannot place). "
                    f"Every rank would write at its own local positions. Collect the values in "
                    f"a list and torch.stack them, build them with torch.where on positions, or "
                    f"declare the layer with @spcompile.linear_attention / @spcompile.ssm_scan.")
            continue
        if sy is None or not isinstance(py, Replicate) or \
                ctx.options.length_constants == "ignore":
            continue
        for d, n in enumerate(sy):
            span = _index_span(idx, d, len(sy), n) if n == T else None
            if span is not None and (span[0], span[1]) != (0, n):
                raise SequenceParallelError(
                    f"spcompile: {canonical_name(node)} at {source_line(node) or node.name} "
                    f"writes at a fixed position of a buffer whose dim {d} has this rank's local "
                    f"length {T} ({sy}): sizes taken from the sequence mean its global length, "
                    f"so the position is a global one, but every rank would write its own "
                    f"local position. Build the values from positions instead (e.g. "
                    f"torch.where(torch.arange(T) == 0, 0.0, 1.0)), or pass options="
                    f"{{'length_constants': 'ignore'}} if that length does not come from the "
                    f"sequence.")


def _check_length_constants(gm: fx.GraphModule, ctx: Ctx) -> None:
    """A Python number computed from the sequence length (``x / T``, cosFormer's ``i / M``,
    Hyena's ``/ fft_size``) is folded into the graph as a constant of the LOCAL length; spcompile
    only sees the number. Arithmetic with a constant equal to ``T_local``, ``2·T_local`` or their
    reciprocals is suspect:

    * on a value that already mixes the sequence or depends on positions (a position table,
      ``arange``, a reduction over the sequence, a scan, T×T scores, an FFT along it) the number
      is almost surely the length: refused (option ``length_constants="error"``, the default);
    * on a token-local value (``logsigmoid(g) / 16`` with ``T_local = 16``) it is probably
      a coincidence: a warning.

    A multiple ``m·N`` of a flattened token count ``N = B·T_local`` (``routing_weights.shape[0]``
    summed over layers: HF's MoE load-balancing loss without an attention mask) is suspect only
    in the first case (a global sum over the rows divided by this rank's row count).

    ``length_constants="warn"`` makes both warnings, ``"ignore"`` silences both."""
    mode = getattr(ctx.options, "length_constants", "error")
    T = ctx.seq_len
    from ..boundary import last_tokens
    tokens = ctx.tokens or (last_tokens() if ctx.world_size > 1 else ())
    if mode == "ignore" or ((not T or T < 2) and not tokens):
        return
    pl = ctx.placements
    suspects = _length_suspects(T)
    rows = {}  # multiples of the flattened token counts: suspect on mixed values only
    for n in tokens:
        if n != T and n >= 2:
            for m in range(1, 17):
                rows.setdefault(float(m * n), f"{m}·{n} (rows: {m} × B·T_local)")
                rows.setdefault(1.0 / (m * n), f"1/({m}·{n}) (rows)")
    derived, mixed = set(), set()  # from the sequence at all; from sequence-mixing values
    summed = set()  # from sums over the rows / the sequence (where a row count divides)
    for node in gm.graph.nodes:
        ins = node.all_input_nodes
        if not isinstance(pl.get(node, Replicate()), Replicate) or any(a in derived for a in ins):
            derived.add(node)
        made = (node.meta.get("spcompile") or {}).get("pass") == "rewrite"
        if made or node in ctx.mixing or node in ctx.count_uses or \
                isinstance(pl.get(node), (Pair, Partial)) or any(a in mixed for a in ins):
            mixed.add(node)
        if node in ctx.count_uses or isinstance(pl.get(node), Partial) or \
                "over the sequence" in ctx.mixing.get(node, "") or \
                (made and canonical_name(node) in ("_global_reduce", "allreduce")) or \
                any(a in summed for a in ins):
            summed.add(node)
    for node in gm.graph.nodes:
        if canonical_name(node) not in _ARITH or not any(
                a in derived for a in node.all_input_nodes):
            continue
        for c in [_literal(a) for a in list(node.args) + list(node.kwargs.values())]:
            hit = _suspect(c, suspects)
            strong = any(a in mixed for a in node.all_input_nodes)
            if hit is None and any(a in summed for a in node.all_input_nodes) and \
                    canonical_name(node) not in ("mod", "remainder", "fmod"):
                # (a modulus by the row count is arithmetic on row numbers: refused there)
                hit = _suspect(c, rows)
            if hit is None:
                continue
            where = source_line(node) or node.name
            moe = ("rows" in hit) * (
                " (HF's load_balancing_loss_func counts rows with routing_weights.shape[0] when "
                "attention_mask is None: pass attention_mask=torch.ones_like(input_ids), which "
                "makes the count a sum over the tokens)")
            msg = (f"spcompile: the constant {c} in {canonical_name(node)} at {where} equals "
                   f"{hit} for this rank's local length T = {T}"
                   + (" and is applied to a value that mixes the sequence or depends on "
                      "positions" if strong else "") +
                   f". If it was computed from the sequence length (x.shape[1], seq_len, "
                   f"a count of rows, ...), it is the LOCAL length here and the sharded result "
                   f"would be wrong: spcompile only sees the folded number. Derive the value "
                   f"from a tensor instead (e.g. torch.arange(T), a mean over the sequence)"
                   f"{moe}, or pass options={{'length_constants': 'ignore'}} if the number "
                   f"does not come from the sequence length.")
            report_local_length(ctx, msg, strong)


def _literal(a: Any) -> Any:
    """A number, or the number a constant tensor is made of (``torch.tensor(float(T))``,
    ``torch.full((), T)``, ``x.new_tensor(T)``): where a length folded into the graph hides."""
    if not isinstance(a, fx.Node) or a.op != "call_function" and a.op != "call_method":
        return a
    name = canonical_name(a)
    pos = {"tensor": 0, "as_tensor": 0, "scalar_tensor": 0, "full": 1, "full_like": 1,
           "new_tensor": 1, "new_full": 2}.get(name)
    if pos is None:
        return None
    key = "fill_value" if "full" in name else "data"
    v = a.args[pos] if len(a.args) > pos else a.kwargs.get(key)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _pair_dims(global_val: Any, local_val: Any, ctx: Ctx):
    """(d0, d1) when a value computed on the gathered sequence is a T×T value (two dims of
    the local length grew to the global one): it is cut back to this rank's diagonal block,
    the form every T×T value has on a rank."""
    if not isinstance(global_val, torch.Tensor) or not isinstance(local_val, torch.Tensor) or \
            global_val.dim() != local_val.dim():
        return None
    T, P = ctx.seq_len, ctx.world_size
    dims = [d for d in range(global_val.dim())
            if local_val.shape[d] == T and global_val.shape[d] == P * T]
    return tuple(dims) if len(dims) == 2 else None


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


def _reshard_after(gm: fx.GraphModule, ctx: Ctx, node: fx.Node, dim) -> None:
    with gm.graph.inserting_after(node), ctx.provenance(gm, None, node):
        if isinstance(dim, tuple):
            sl = gm.graph.call_function(spops.diagonal_block, (node, dim[0], dim[1],
                                                               ctx.group_name))
        else:
            sl = gm.graph.call_function(spops.shard_slice, (node, dim, ctx.group_name))
    set_meta(sl)
    sl.meta["spcompile_placement"] = Pair(*dim) if isinstance(dim, tuple) else Shard(dim)
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
        consumed = set()
        if node.op != "output" and not made_here:
            grown = {}
            for a in node.all_input_nodes:
                now, was = tensor_val(a), before.get(a)
                if now is not None and was is not None and len(was) == now.dim():
                    dims = [d for d in range(now.dim()) if now.shape[d] != was[d]]
                    if len(dims) == 1:
                        grown[a] = dims[0]
            if grown:  # a global value: sizes along the grown dim mean the global length
                consumed = _globalize_sizes(node, grown, ctx)
        if node.op == "output" or not made_here:
            _reshard_global_args(gm, ctx, node, before, P, consumed)
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


def _reshard_global_args(gm, ctx: Ctx, node: fx.Node, before, P: int, skip=()) -> None:
    replace = {}
    for a in node.all_input_nodes:
        if a in skip:
            continue
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


def _boundary_io(gm: fx.GraphModule, ctx: Ctx, pl) -> None:
    """Values crossing graph breaks (``spcompile.boundary``): a ``T×T`` value may not leave the
    graph (a rank holds only its diagonal block, which no later graph can complete); a
    replicated input that an earlier graph returned through ``replicated_output`` gets
    ``replicated_input`` (backward × P), so its gradient is divided by P once, not twice."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    from .dispatch import output_refusal
    for a in out.all_input_nodes:
        msg = output_refusal(ctx, a)
        if msg is not None:
            raise SequenceParallelError(msg)
        if isinstance(pl.get(a), Pair):
            raise SequenceParallelError(
                f"spcompile: the T×T value {canonical_name(a)} at {source_line(a) or a.name} "
                f"leaves the compiled graph (it is returned, or a graph break follows it): a "
                f"rank holds only its diagonal block of it, which nothing after the graph can "
                f"complete. Keep the scores inside one graph (move the graph break, e.g. a "
                f"print or a data-dependent branch, after the attention) and do not return "
                f"attention weights.")
    for n in [n for n in gm.graph.nodes if n.op == "placeholder"]:
        v = tensor_val(n)
        if not n.meta.get("spcompile_replicated_input") or v is None or \
                not v.dtype.is_floating_point or not n.users:
            continue
        with gm.graph.inserting_after(n), ctx.provenance(gm, None, n):
            w = gm.graph.call_function(torch.ops.spcompile.replicated_input.default,
                                       (n, ctx.world_size))
        set_meta(w)
        w.meta["spcompile_placement"] = Replicate()
        n.replace_all_uses_with(w, delete_user_cb=lambda u: u is not w)


def _ancestors_with(node: fx.Node):
    from .graph_utils import ancestors
    return ancestors(node) | {node}


def _has_param(node: fx.Node) -> bool:
    from .graph_utils import ancestors
    return any(n.op == "placeholder" and getattr(val(n), "requires_grad", False)
               for n in ancestors(node))


_INDEXING = ("integer index into the sequence axis", "slice of the sequence axis",
             "one-token slice of the sequence axis")


def _refuse_loops_over_the_sequence(ctx: Ctx) -> None:
    """Several indexings of one value along the sequence are a Python loop over tokens or
    chunks that Dynamo unrolled with the *local* count: gathering around each index would
    compute the first shard's chunks on every rank. Refuse it, loudly."""
    from .patterns.loop_recurrence import TWO_STEPS
    for f in ctx.near_misses:
        if f.pattern == "loop_recurrence" and f.reason == TWO_STEPS:
            # (one read per rank: gathering it would read the first rank's block everywhere)
            raise SequenceParallelError(
                f"spcompile: a Python loop over tokens or chunks at "
                f"{source_line(f.node) or f.node.name}, unrolled with this rank's local count, "
                f"was not rewritten: {TWO_STEPS}.")
    why = [f.reason for f in ctx.near_misses if f.pattern == "loop_recurrence"]
    delta = (" A state that is multiplied by a matrix built from the tokens (the delta rule "
             "of DeltaNet / Gated DeltaNet, S - beta k (k S)) has no sequence-parallel form in "
             "spcompile yet." if why and "not affine in its state" in why[0] else "")
    why = (f" Not rewritten as a loop with a carried state: {why[0]}." if why else "")
    relay = [f.reason for f in ctx.near_misses if f.pattern == "loop_relay"]
    if relay:
        delta = ""
        why += f" Not run as a relay (each rank's loop after the one before): {relay[0]}."

    def refuse(what: str):
        raise SequenceParallelError(
            f"spcompile: {what}: a Python loop over tokens or chunks, unrolled with this rank's "
            f"local count. spcompile cannot make it sequence parallel by gathering.{why}{delta} "
            f"Write the layer in a supported form (masked quadratic, segsum, cumsum), declare "
            f"it with @spcompile.linear_attention / @spcompile.ssm_scan, or run it on the whole "
            f"sequence inside the model: y = spcompile.shard_sequence(layer("
            f"spcompile.gather_sequence(x, grad='reduce_scatter'))) (exact; it moves the whole "
            f"sequence).")

    for node, reason in ctx.mixing.items():
        # ``for h_t in h.unbind(1)`` / ``h.split(C, 1)``: gathered, the pieces would be the
        # global sequence's, and the unrolled loop reads only as many as this rank has
        if canonical_name(node) in ("unbind", "split") and reason.endswith(
                "along the sequence axis") and any(canonical_name(u) == "getitem"
                                                   for u in node.users):
            refuse(f"{canonical_name(node)} along the sharded sequence axis at "
                   f"{source_line(node) or node.name}, its pieces used one by one")
    from .sequence_axis import ONE_CHUNK_INDEX
    for node, reason in ctx.mixing.items():
        if reason == ONE_CHUNK_INDEX and node.users:
            refuse(f"an index into the chunk axis at {source_line(node) or node.name}, which "
                   f"holds one chunk per rank (x.view(B, T // C, C, ...) with T = C locally)")
    by_source: dict = {}
    for node, reason in ctx.mixing.items():
        p = ctx.placements.get(node.args[0]) if node.args else None
        if isinstance(p, Shard) and p.order:
            continue  # rows in the order of a sort (MoE dispatch): its own refusal says why
        if canonical_name(node) == "getitem" and reason in _INDEXING and node.users:
            by_source.setdefault(node.args[0], []).append(node)
    T = ctx.seq_len
    for src, nodes in by_source.items():
        p = ctx.placements.get(src)
        if not isinstance(p, Shard):
            continue
        # the axis indexed: the tokens (length T), or the chunks of a sequence split in two
        # (x.view(B, T // C, C, D)): its own length counts
        n = shape(src)[p.dim] if shape(src) is not None else T
        n = n if n < T else T  # a value longer than the sequence (a cat of two) reads as T
        spans = [sp for sp in (seq_span(x, p.dim, n) for x in nodes) if sp is not None]
        one_chunk = n != T and spans == [(0, n)]  # a loop over chunks with one per rank
        if len(nodes) >= 3 or tiles_axis(spans, n) or one_chunk:
            refuse(f"{len(nodes)} slices/indexes along the sharded sequence axis of one value "
                   f"(first at {source_line(nodes[0]) or nodes[0].name})")


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
    _check_length_constants(gm, ctx)
    _refuse_loops_over_the_sequence(ctx)  # first: it can say why the loop was not taken
    _refuse_local_length_writes(gm, ctx)
    _globalize_length_constants(gm, ctx)
    before = _output_shapes(gm)
    local_shapes = {n: tuple(tensor_val(n).shape) for n in gm.graph.nodes
                    if tensor_val(n) is not None}
    for _ in range(1000):
        pl = analyze(gm, ctx)
        if _allreduce_counts(gm, ctx):
            continue
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
    _boundary_io(gm, ctx, pl)
    _wrap_replicated_outputs(gm, ctx)
    gm.recompile()
    return gm
