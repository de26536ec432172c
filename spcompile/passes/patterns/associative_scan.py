"""``torch._higher_order_ops.associative_scan`` along the sequence.

HF's Mamba / FalconMamba / Jamba / Zamba mixers (``use_associative_scan=True``, their default
under ``torch.compile``), and S5 / LRU / GateLoop code written against torch's API, compute the
selective-scan recurrence as an associative scan with a user ``combine_fn``::

    def combine_fn(left, right):                       # (a, b) ∘ (a', b') = (a a', a' b + b')
        a_left, b_left = left; a_right, b_right = right
        return a_left * a_right, a_right * b_left + b_right
    _, all_states = associative_scan(combine_fn, (dA, dBu), dim=2, combine_mode=...)

An inclusive scan under an associative operator ``∘`` splits across ranks exactly: every rank
scans its own shard (``y_loc``), the ranks' totals (the last element of each ``y_loc``) are
all-gathered, and rank ``r`` combines the earlier ranks' totals into its prefix ``p_r`` and
returns ``p_r ∘ y_loc`` (``∘`` broadcast along the scan axis). ``reverse=True`` is the same in the
flipped frame, where the "earlier" ranks are the later ones. Nothing about ``∘`` is assumed
beyond associativity, which ``associative_scan`` already requires of it.

Dynamo records the call in one of two forms, both handled:

* ``combine_mode="pointwise"`` (CUDA): one ``torch.ops.higher_order.associative_scan`` node
  whose first argument is the combine subgraph. Sharded, this rank's scan is recomputed with
  torch's generic algorithm (differentiable op by op), since the op's own backward gives wrong
  gradients for scans of several leaves in torch <= 2.13 (pytorch#172568).
* ``combine_mode="generic"`` (CPU; HF picks it off GPU): Dynamo inlines torch's
  ``generic_associative_scan`` — strided ``aten.slice``\\ s, the combine under ``vmap``,
  interleaving ``stack``/``cat`` — for this rank's length. The combine is read back from the
  first ``vmap`` block (its ``_add_batch_dim`` inputs are the even/odd slices of the leaves),
  the whole region is replaced by ``spcompile``'s local scan + carry, and the extraction is
  checked by value: the region's outputs on the example inputs must equal the local scan
  computed with the extracted combine.

Leaves must be plain shards of the sequence on the scan axis (``movedim(x, seq_dim, 0)``, then
``flip`` for ``reverse``). A combine that reads tensors from outside (lifted parameters) is not
taken: the near miss says so and the fallback gathers the sequence.
"""
from __future__ import annotations

import operator
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx

from ..graph_utils import canonical_name, evaluate, set_meta, shape
from ..pipeline import Ctx
from ..sequence_axis import Shard
from .base import FailedMatch, Found, Match, Pattern

HOP = getattr(torch.ops.higher_order, "associative_scan", None)
_VMAP_MACHINERY = {"lazy_load_decompositions", "_vmap_increment_nesting",
                   "_vmap_decrement_nesting"}


# ------------------------------------------------------------------ runtime
def _vmapped(combine):
    """``combine`` (2n flat args: left leaves, then right leaves → n outputs) applied slice by
    slice along dim 0, as ``associative_scan`` applies it."""
    def flat(*args):
        out = combine(*args)
        return tuple(out) if isinstance(out, (list, tuple)) else (out,)
    return torch.vmap(flat, in_dims=0, out_dims=0)


def local_associative_scan(combine, leaves: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Inclusive scan of ``leaves`` along dim 0 under ``combine`` (torch's generic algorithm)."""
    from torch._higher_order_ops.associative_scan import generic_associative_scan
    fn = _vmapped(combine)
    return list(generic_associative_scan(lambda *a: list(fn(*a)), list(leaves)))


def associative_carry(combine, ys: Sequence[torch.Tensor], reverse: bool,
                      group_name: str) -> Tuple[torch.Tensor, ...]:
    """``p_r ∘ ys``: this rank's local inclusive scans ``ys`` (scan axis 0) combined with the
    prefix of the earlier ranks' totals (the later ranks' for ``reverse``). One all-gather of
    the totals per leaf; its backward is one reduce-scatter on every rank (every rank uses the
    gathered totals, the first one through a ``where`` that keeps its own values)."""
    ys = list(ys)
    if not group_name:
        return tuple(ys)
    from ...collectives import group_rank, group_size
    r, P = group_rank(group_name), group_size(group_name)
    fn = _vmapped(combine)
    # the leaves' totals travel packed in ONE all-gather: with one per leaf, ranks whose fold
    # differs (it depends on the rank) could run the backward reduce-scatters in another order
    tots = [y.narrow(0, y.shape[0] - 1, 1) for y in ys]
    dt = tots[0].dtype
    for t in tots[1:]:
        dt = torch.promote_types(dt, t.dtype)
    flat = torch.cat([t.reshape(1, -1).to(dt) for t in tots], dim=1)
    packed = torch.ops.spcompile.gather_sequence_rs(flat.contiguous(), 0, group_name,
                                                    "associative_scan")  # [P, sum of sizes]
    alls, at = [], 0
    for t in tots:
        n = t.numel()
        alls.append(packed[:, at:at + n].reshape((P,) + tuple(t.shape[1:])).to(t.dtype))
        at += n
    order = list(range(P - 1, -1, -1)) if reverse else list(range(P))
    pos = order.index(r)
    acc = [a.narrow(0, order[0], 1) for a in alls]
    for k in range(1, max(pos, 1)):
        acc = list(fn(*acc, *[a.narrow(0, order[k], 1) for a in alls]))
    # the first rank in scan order has no prefix: its dummy prefix (its own total) is combined
    # too and dropped by the where, so that the gathered totals are used on every rank
    comb = fn(*[p.expand_as(y) for p, y in zip(acc, ys)], *ys)
    if pos == 0:
        keep = torch.zeros((), dtype=torch.bool, device=ys[0].device)
        return tuple(torch.where(keep, c, y) for c, y in zip(comb, ys))
    return tuple(comb)


def sp_associative_scan(combine, leaves: Sequence[torch.Tensor], reverse: bool,
                        group_name: str) -> Tuple[torch.Tensor, ...]:
    """The sequence-parallel scan of the generic form: local scan, then the carry."""
    return associative_carry(combine, local_associative_scan(combine, leaves), reverse,
                             group_name)


# ------------------------------------------------------------------ finding the scans
def _name(n: fx.Node) -> str:
    if n.op != "call_function":
        return canonical_name(n) or ""
    return getattr(n.target, "__name__", "") or ""


def _is_slice(n: Any, start, stop, step) -> Optional[fx.Node]:
    """``aten.slice(x, 0, start, stop, step)`` → x."""
    if not (isinstance(n, fx.Node) and n.op == "call_function" and
            n.target in (torch.ops.aten.slice, torch.ops.aten.slice.Tensor)):
        return None
    a = list(n.args) + [None] * (5 - len(n.args))
    dim, s0, s1, st = a[1:5]
    st = 1 if st is None else st
    if dim not in (0, None) or s0 != start or st != step:
        return None
    if stop is None and s1 not in (None, 2 ** 63 - 1):
        return None
    if stop is not None and s1 != stop:
        return None
    return a[0]


def _vmap_block(start: fx.Node) -> List[fx.Node]:
    """The nodes of one ``vmap`` call: from ``_vmap_increment_nesting`` to its decrement."""
    out, depth, n = [], 0, start
    while n is not None and n.op != "output":
        name = _name(n)
        if name == "_vmap_increment_nesting":
            depth += 1
        elif name == "_vmap_decrement_nesting":
            depth -= 1
            if depth == 0:
                out.append(n)
                return out
        out.append(n)
        n = n.next
    return []


def _combine_from_block(block: List[fx.Node]) -> Tuple[Optional[fx.GraphModule], str, list]:
    """The combine function of a generic scan, read back from its first ``vmap`` block:
    ``_add_batch_dim`` inputs become placeholders, the ops between are copied, the
    ``_remove_batch_dim`` inputs are the outputs. → (module, why-not, the batch-dim sources)."""
    adds = [n for n in block if _name(n) == "_add_batch_dim"]
    removes = [n for n in block if _name(n) == "_remove_batch_dim"]
    inner = set(block)
    if not adds or len(removes) * 2 != len(adds):
        return None, "the combine block does not take two leaves per output", []
    g = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    for i, a in enumerate(adds):
        if a.args[1] != 0:
            return None, "the combine is vmapped on a dim other than the scan dim", []
        env[a] = g.placeholder(f"x{i}")
    for n in block:
        if n in env or n in removes or _name(n) in _VMAP_MACHINERY or n.op != "call_function" \
                and n.op != "call_method":
            continue
        for a in n.all_input_nodes:
            if a not in env:
                where = "outside the scan" if a not in inner else "the vmap machinery"
                return None, (f"the combine function reads {a.name} from {where} (lifted "
                              f"tensors are not supported)"), []
        env[n] = g.node_copy(n, lambda a: env[a])
    outs = []
    for rm in removes:
        src = rm.args[0]
        if src not in env:
            return None, "a combine output is not computed inside the combine", []
        outs.append(env[src])
    g.output(tuple(outs))
    return fx.GraphModule(torch.nn.Module(), g), "", [a.args[0] for a in adds]


def _refuse_one_token_scans(gm: fx.GraphModule) -> None:
    """With one token per rank, torch's generic scan has nothing to do and Dynamo records no
    scan at all (the leaves come back as they went in): there is nothing to rewrite, and the
    result would be this rank's token alone. Refuse rather than be silently wrong."""
    for n in gm.graph.nodes:
        if "associative_scan(" in (n.meta.get("stack_trace") or "") and n.op != "placeholder":
            from ..fallback import SequenceParallelError
            from ..pipeline import source_line
            raise SequenceParallelError(
                f"spcompile: the associative_scan at {source_line(n) or n.name} runs on one "
                f"token per rank, where torch records no scan to make sequence parallel. Use "
                f"fewer ranks or longer sequences (at least two tokens per rank).")


class _Scan:
    def __init__(self, form: str, leaves: List[fx.Node], reverse: bool):
        self.form, self.leaves, self.reverse = form, leaves, reverse
        self.combine: Any = None  # GraphModule (generic) or the get_attr node (hop)
        self.outputs: Dict[int, fx.Node] = {}  # leaf index → node holding its scan (scan frame)
        self.region: Set[fx.Node] = set()  # generic: the inlined scan, replaced as a whole
        self.hop: Optional[fx.Node] = None


def _unflip(n: fx.Node) -> Tuple[fx.Node, bool]:
    if canonical_name(n) == "flip":
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dims")
        if isinstance(dims, (list, tuple)) and list(dims) == [0] and \
                isinstance(n.args[0], fx.Node):
            return n.args[0], True
    return n, False


class AssociativeScan(Pattern):
    name = "associative_scan"
    kind = "cumsum"

    def find(self, gm: fx.GraphModule, ctx: Ctx) -> Iterable[Found]:
        if ctx.seq_len == 1 and ctx.world_size > 1:
            _refuse_one_token_scans(gm)
        seen: Set[fx.Node] = set()
        for node in gm.graph.nodes:
            if node in seen:
                continue
            if HOP is not None and node.op == "call_function" and node.target is HOP:
                found = self._hop(gm, ctx, node)
            elif _name(node) == "_vmap_increment_nesting":
                found = self._generic(gm, ctx, node)
            else:
                continue
            if found is None:
                continue
            if isinstance(found, Match):
                seen |= found.nodes
            yield found

    # -------------------------------------------------------------- checks shared by both forms
    def _leaves_ok(self, ctx: Ctx, leaves: List[fx.Node]) -> Tuple[Optional[str], bool]:
        pl, T = ctx.placements, ctx.seq_len
        flips = set()
        for x in leaves:
            base, flipped = _unflip(x)
            flips.add(flipped)
            p = pl.get(base)
            if not (isinstance(p, Shard) and p.dim == 0 and not p.merged):
                return ("a scanned leaf is not this rank's shard of the sequence on the scan "
                        "axis"), False
            if shape(base)[0] != T:
                return (f"a scanned leaf has {shape(base)[0]} rows along the sequence, not the "
                        f"shard's {T}"), False
        if len(flips) != 1:
            return "some leaves are flipped and some are not", False
        return None, flips.pop()

    # -------------------------------------------------------------- the higher-order op
    def _hop(self, gm, ctx: Ctx, node: fx.Node) -> Optional[Found]:
        combine, xs = node.args[0], node.args[1]
        extra = node.args[2] if len(node.args) > 2 else ()
        if not isinstance(xs, (list, tuple)) or not all(isinstance(x, fx.Node) for x in xs):
            return None
        if not any(isinstance(ctx.placements.get(_unflip(x)[0]), Shard) for x in xs):
            return None  # not along the sequence
        if extra:
            return FailedMatch(self.name, node, "the combine function reads tensors from "
                                                "outside (lifted inputs are not supported)")
        why, reverse = self._leaves_ok(ctx, list(xs))
        if why:
            return FailedMatch(self.name, node, why)
        s = _Scan("hop", list(xs), reverse)
        s.combine, s.hop = combine, node
        for u in node.users:
            if canonical_name(u) == "getitem" and isinstance(u.args[1], int):
                s.outputs[u.args[1]] = u
        return Match(self.kind, self.name, node, nodes={node, *s.outputs.values()},
                     info={"leaves": len(xs), "reverse": reverse, "form": "associative_scan "
                           "higher-order op (combine_mode='pointwise')", "_scan": s,
                           "owns_nodes": True})

    # -------------------------------------------------------------- the inlined generic scan
    def _generic(self, gm, ctx: Ctx, start: fx.Node) -> Optional[Found]:
        block = _vmap_block(start)
        if not block:
            return None
        combine, why, srcs = _combine_from_block(block)
        if not srcs and combine is None:
            return None
        n = len(srcs) // 2
        leaves = []
        for i in range(n):  # the first level: even and odd slices of every leaf
            a = _is_slice(srcs[i], 0, -1, 2)
            b = _is_slice(srcs[n + i], 1, None, 2)
            if a is None or a is not b:
                return None  # a later level (or not a scan): found from its first block
            leaves.append(a)
        if not any(isinstance(ctx.placements.get(_unflip(x)[0]), Shard) for x in leaves):
            return None
        if combine is None:
            return FailedMatch(self.name, start, why)
        why, reverse = self._leaves_ok(ctx, leaves)
        if why:
            return FailedMatch(self.name, start, why)
        s = _Scan("generic", leaves, reverse)
        s.combine = combine
        region = self._region(gm, leaves)
        s.region = region
        outs = [x for x in region if any(u not in region for u in x.users)]
        if not outs:
            return None
        # which leaf each visible output scans: checked by value against the extracted combine
        try:
            vals = evaluate(gm, leaves + outs, ctx.example_inputs, ctx.values)
            ref = local_associative_scan(combine, [v.double() if v.is_floating_point() else v
                                                   for v in vals[:n]])
        except Exception as e:  # noqa: BLE001
            return FailedMatch(self.name, start, f"could not evaluate the scan on the example "
                                                 f"inputs ({type(e).__name__}: {e})")
        for o, v in zip(outs, vals[n:]):
            j = next((j for j, r_ in enumerate(ref) if tuple(r_.shape) == tuple(v.shape) and
                      torch.allclose(v.double(), r_.double(), rtol=1e-4, atol=1e-5)), None)
            if j is None:
                return FailedMatch(self.name, start, f"{o.name} of the inlined scan does not "
                                                     f"equal the scan under the combine read "
                                                     f"back from its vmap block")
            s.outputs[j] = o
        return Match(self.kind, self.name, outs[0], nodes=set(region),
                     info={"leaves": n, "reverse": reverse, "form": "associative_scan "
                           "(combine_mode='generic', inlined by Dynamo)", "_scan": s,
                           "owns_nodes": True})

    @staticmethod
    def _region(gm, leaves: List[fx.Node]) -> Set[fx.Node]:
        """The inlined scan: descendants of the leaves up to (not including) the ``flip`` /
        ``movedim`` back to the user's layout, plus the vmap bookkeeping calls among them."""
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        region: Set[fx.Node] = set()
        todo = [u for x in leaves for u in x.users]
        while todo:
            u = todo.pop()
            if u in region or u.op == "output":
                continue
            name = canonical_name(u)
            if name in ("movedim", "moveaxis", "flip"):
                continue
            region.add(u)
            todo.extend(u.users)
        if region:
            lo, hi = min(order[n] for n in region), max(order[n] for n in region)
            for n in gm.graph.nodes:
                if lo <= order[n] <= hi and _name(n) in _VMAP_MACHINERY:
                    region.add(n)
        return region

    # -------------------------------------------------------------- rewrite
    def rewrite(self, gm: fx.GraphModule, ctx: Ctx, m: Match) -> None:
        s: _Scan = m.info["_scan"]
        if ctx.world_size == 1:
            return
        g = gm.graph
        n = len(s.leaves)
        if s.form == "hop":
            # this rank's scan is recomputed with torch's generic algorithm, not the op: the
            # op's own backward is wrong for scans of several leaves in torch <= 2.13
            # (pytorch#172568: the multiplier leaf of an affine scan gets no gradient)
            combine, anchor = s.combine, s.hop
            region = {anchor, *s.outputs.values()}
            where = anchor
        else:
            attr = f"_spcompile_combine_{m.id}"
            gm.add_submodule(attr, s.combine)
            combine, anchor, region = None, m.anchor, s.region
            where = min(region, key=lambda x: list(g.nodes).index(x))
        with g.inserting_before(where), ctx.provenance(gm, m, anchor):
            if combine is None:
                combine = g.get_attr(attr)
                combine.meta["example_value"] = s.combine
            new = g.call_function(sp_associative_scan, (combine, list(s.leaves), s.reverse,
                                                        ctx.group_name))
            set_meta(new)
            outs = {}
            for j in range(n):
                outs[j] = g.call_function(operator.getitem, (new, j))
                set_meta(outs[j])
                outs[j].meta["spcompile_placement"] = Shard(0)
        new.meta["spcompile_placement"] = Shard(0)
        for j, o in s.outputs.items():
            o.replace_all_uses_with(outs[j], delete_user_cb=lambda u: u not in region)
        order = {x: i for i, x in enumerate(g.nodes)}
        for x in sorted(region, key=order.get, reverse=True):
            if not x.users:
                g.erase_node(x)
        visible = list(outs.values())
        # the flips around the scan (reverse=True) hold this rank's shard, reversed
        if s.reverse:
            for x in s.leaves:
                x.meta["spcompile_placement"] = Shard(0)
            for o in visible:
                for u in o.users:
                    if _unflip(u)[1]:
                        u.meta["spcompile_placement"] = Shard(0)
        # what reads the scan (h[:, -1] of the states, the next layer) was analysed as mixed
        # values: find its families now that the scan's outputs are known to be sharded
        from ..detect import redetect
        redetect(gm, ctx)
