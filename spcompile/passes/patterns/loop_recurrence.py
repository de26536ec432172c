"""Recurrences written as Python loops over tokens or blocks (HF Mamba's ``slow_forward``,
lightning attention's block loop, RNN-style linear recurrences).

Dynamo unrolls such a loop with this rank's *local* count: step ``k`` reads tokens (or a block)
``k`` of the shard, updates a carried state and emits a value. The unrolled program is exactly the
global loop's steps for this rank's tokens **if** (a) the state entering the rank is the global
one, and (b) no step depends on its own number (the body is the same for every step). Both are
checked here, and (a) is then made true:

* **steps** — the reads: several getitems of one sharded value along the sequence whose spans
  tile ``[0, T_local)``; step ``k`` = the ``k``-th span. Every node is given the set of steps it
  depends on (the carried state does not count); a node of one step belongs to that step's body,
  a ``stack``/``cat`` of one value per step in order is the loop's output (sharded along its
  axis), anything else that mixes steps is refused.
* **the state chain** — from a replicated root (``zeros``, a learned ``h0``) a path of
  elementwise ops that are *affine and diagonal in the state*: ``s·a``, ``s/a``, ``s±b``, ``-s``,
  casts, whose other operands never depend on the state. So the rank's map on its entering state
  is ``s_out = D ⊙ s_in + S_loc``.
* **the body is step-invariant** — every step's nodes, in order, have the same fingerprint (op,
  literal arguments, which read/state/earlier node they use), so a rank that restarts the
  counter at 0 computes the same thing as the global loop at its offset (``γ ** t`` in the body,
  a partial last block, an ``if t == 0`` branch: refused).

The rewrite computes, next to the loop, a copy of the chain from zero (``S_loc``) and its linear
part on ones (``D``), all-gathers them (``P`` states each way: LASP-2's hand-off), folds the
earlier ranks' ``(D, S_loc)`` into the state entering this rank (starting from the root's value,
so a learned ``h0`` enters on rank 0 only), and feeds that to the loop in place of the root.
Uses of the final state after the loop get the fold over all ranks (the global final state).
Gradients flow through the fold and the all-gather (its backward is a reduce-scatter).
"""
from __future__ import annotations

import heapq
import operator
from typing import Dict, Iterable, List, Optional, Set, Tuple

import torch
import torch.fx as fx

from ..graph_utils import (FRESH_FILLS, ancestors, arg, canonical_name, mutates, seq_span,
                           set_meta, shape, tensor_val, tiles_axis)
from ..pipeline import Ctx, source_line
from ..sequence_axis import Replicate, Shard
from .base import FailedMatch, Found, Match, Pattern

_INDEXING = ("integer index into the sequence axis", "slice of the sequence axis",
             "one-token slice of the sequence axis")
# ops whose tensor inputs only lend their shape/dtype/device
_SHAPE_ONLY = {"zeros_like", "ones_like", "empty_like", "full_like", "new_zeros", "new_ones",
               "new_empty", "new_full", "size", "dim", "shape"}
# fresh tensors of one constant: the same on every rank whatever their shape argument
_CONST_FACTORIES = {"zeros", "zeros_like", "new_zeros", "ones", "ones_like", "new_ones",
                    "full", "full_like", "new_full"}
_CASTS = {"to", "float", "double", "half", "bfloat16", "type_as", "clone", "contiguous"}
_AFFINE = {"add", "sub", "mul", "div", "neg"} | _CASTS
_COMBINE = {"stack", "cat", "concat", "concatenate"}


def _state_operand_ok(u: fx.Node, s: fx.Node) -> bool:
    """Is ``u`` affine and diagonal in ``s`` (its one state operand, the first for sub/div)?"""
    name = canonical_name(u)
    if name not in _AFFINE or shape(u) is None or shape(u) != shape(s):
        return False
    if name in _CASTS:
        if u.args[0] is not s or any(a is s for a in u.args[1:]):
            return False
        v = tensor_val(u)
        return v is not None and v.dtype.is_floating_point
    ins = [a for a in list(u.args) + list(u.kwargs.values()) if a is s]
    if len(ins) != 1 or not u.args or s not in u.args[:2]:
        return False
    if name == "div" and u.args[0] is not s:
        return False  # b / s is not affine in s
    if name in ("add", "sub") and len(u.args) > 2 or "alpha" in u.kwargs:
        return False
    if name in ("div",) and (len(u.args) > 2 or u.kwargs):
        return False  # rounding modes
    return True


def _unit(n: int, T: int) -> Optional[int]:
    """Tokens per entry of a sharded axis of length ``n``: 1 on the sequence axis, ``T // n``
    on a chunk axis (``x.view(B, T // C, C, D)``: ``n`` chunks of ``C`` tokens on this rank),
    None where ``n`` does not divide ``T``."""
    if n == T:
        return 1
    return T // n if 1 < n < T and T % n == 0 else None


def _axis_span(node: fx.Node, dim: int, n: int, T: int) -> Optional[Tuple[int, int]]:
    """The token span ``[start, stop)`` a getitem takes along ``dim`` (length ``n``): entries
    of a chunk axis count ``T // n`` tokens each, so a loop over ``kv[:, i]`` (chunk ``i``) and
    one over ``x[:, i*C:(i+1)*C]`` (its tokens) have the same steps."""
    u = _unit(n, T)
    sp = seq_span(node, dim, n) if u is not None else None
    return None if sp is None else (sp[0] * u, sp[1] * u)


def _missing_last(spans, T: int) -> Optional[tuple]:
    """Spans (of one length ``C``) that tile ``[0, T - C)``: the reads of a value only the
    state update uses, whose last step's update Dynamo dropped (the final state is dead; an
    exclusive readout ``ys.append(f(s)); s = a_t s + b_t`` needs no token of the last step).
    → all the steps' spans, the missing last one added; None otherwise. (One span: two steps
    per rank, which ``_match`` refuses by name — the dead update cannot be checked.)"""
    spans = sorted(set(spans))
    lens = {b - a for a, b in spans}
    if not spans or len(lens) != 1 or spans[0][0] != 0:
        return None
    C = lens.pop()
    end = spans[-1][1]
    if end + C != T or not tiles_axis(spans + [(end, T)], T):
        return None
    return tuple(spans) + ((end, T),)


# fresh tensors an output buffer may be (its content before the loop's writes is overwritten)
_FRESH = set(FRESH_FILLS)


_CASTS = {"to", "type_as", "float", "half", "bfloat16", "double", "contiguous", "clone"}


def _is_fresh(n: fx.Node) -> bool:
    """A fresh tensor, perhaps cast (fla's ``torch.zeros(B, H, T, V).to(q)``)."""
    for _ in range(4):
        name = canonical_name(n)
        if name in _FRESH:
            return True
        if name not in _CASTS or not n.args or not isinstance(n.args[0], fx.Node) or \
                len(n.args[0].users) != 1:
            return False
        n = n.args[0]
    return False


def _write_index(idx, sh: tuple, T: int, spans: Dict[Tuple[int, int], int], want: Optional[int]):
    """A write ``y[idx] = v`` into a buffer of shape ``sh``: → (dim, step, pattern) when exactly
    one entry (the one on dim ``want`` if given) takes a loop step's span of a length-``T`` axis;
    ``pattern`` is the index with that entry reduced to its kind (the same for every step)."""
    idx = list(idx) if isinstance(idx, tuple) else [idx]
    if any(isinstance(i, (fx.Node, bool)) or not (i is None or i is Ellipsis or
                                                  isinstance(i, (int, slice))) for i in idx):
        return None
    if any(isinstance(i, slice) and not all(isinstance(b, (int, type(None)))
                                            for b in (i.start, i.stop, i.step)) for i in idx):
        return None
    if idx.count(Ellipsis) > 1:
        return None
    if Ellipsis in idx:
        e = idx.index(Ellipsis)
        used = sum(1 for i in idx if i is not None and i is not Ellipsis)
        idx[e:e + 1] = [slice(None)] * (len(sh) - used)
    cands, d = [], 0
    for j, i in enumerate(idx):
        if i is None:
            continue
        if d >= len(sh):
            return None
        u = _unit(sh[d], T) if i != slice(None) else None
        if u is not None and (u == 1 or want == d):  # (a chunk axis: the buffer's sharded one)
            n = sh[d]
            if isinstance(i, int):
                sp = (i % n * u, (i % n + 1) * u)
            elif i.step in (None, 1):
                a, b, _ = i.indices(n)
                sp = (a * u, b * u)
            else:
                sp = None
            if sp in spans:
                cands.append((d, j, spans[sp]))
        d += 1
    if want is not None:
        cands = [c for c in cands if c[0] == want]
    if len(cands) != 1:
        return None
    d, j, k = cands[0]
    pattern = tuple(type(i).__name__ if n == j else repr(i) for n, i in enumerate(idx))
    return d, k, pattern


def _update_ops(z: fx.Node, chain: List[fx.Node], chain_step: Dict[fx.Node, int],
                k: int) -> list:
    """The ops of step ``k``'s updates of one state chain, each with what its operands are
    (the state, or the kind of op that made them)."""
    out, prev = [], z
    for c in chain:
        if chain_step.get(c) == k:
            out.append((canonical_name(c), tuple(
                "state" if a is prev else canonical_name(a) if isinstance(a, fx.Node) else repr(a)
                for a in c.args)))
        prev = c
    return out


def _flat(x):
    """The tuples nested in a fingerprint."""
    if isinstance(x, tuple):
        yield x
        for a in x:
            yield from _flat(a)


def _fold_states(root, S_loc, D, group_name: str):
    """→ (the state entering this rank, the global final state): the ranks' maps
    ``s ↦ D_j ⊙ s + S_loc_j`` applied in rank order to the root's value — those of the earlier
    ranks for the first, all of them for the second. One all-gather of ``(S_loc, D)`` (its
    backward is one reduce-scatter). Every rank runs the same ops (only the ``where`` masks
    differ), so the backward's collectives come in the same order on every rank."""
    if not group_name:
        return root, root
    from ...collectives import group_rank, group_size
    r, P = group_rank(group_name), group_size(group_name)
    dt = S_loc.dtype
    both = torch.stack([S_loc, D.to(dt)]).unsqueeze(0).contiguous()
    alls = torch.ops.spcompile.gather_sequence_rs(both, 0, group_name, "loop_carry")
    acc = fin = root.to(dt)
    for j in range(P):
        Sj, Dj = alls[j, 0], alls[j, 1]
        acc = torch.where(torch.tensor(j < r), Dj * acc + Sj, acc)
        fin = Dj * fin + Sj
    return acc.to(root.dtype), fin.to(root.dtype)


TWO_STEPS = ("the last step's update is unused and there are only two steps per rank, so the "
             "update cannot be checked against another step (use more tokens or blocks per "
             "rank, or use the final state: return it with the output)")


def step_read_groups(gm: fx.GraphModule, ctx: Ctx):
    """The reads of an unrolled loop: ``(spans, {read: span})`` per group of getitems (or
    unbind/split pieces) of sharded values whose spans tile this rank's ``[0, T_local)`` (or miss
    only the last step's, read by a dead update), one group per distinct tiling."""
    T = ctx.seq_len
    if T is None:
        return
    pl = ctx.placements
    by_src: Dict[fx.Node, List[Tuple[fx.Node, Tuple[int, int]]]] = {}
    for node, reason in list(ctx.mixing.items()):
        if canonical_name(node) != "getitem" or reason not in _INDEXING or not node.users:
            continue
        p = pl.get(node.args[0])
        if not isinstance(p, Shard) or p.merged:
            continue
        if all(canonical_name(u) in _SHAPE_ONLY for u in node.users):
            continue  # ``zeros_like(kv[:, 0])``: lends a shape, reads no step's tokens
        sx = shape(node.args[0])
        sp = _axis_span(node, p.dim, sx[p.dim], T) if sx is not None else None
        if sp is not None:
            by_src.setdefault(node.args[0], []).append((node, sp))
    # ``for h_t in h.unbind(1)`` / ``for blk in h.split(C, dim=1)``: the pieces are the reads
    for node, _ in list(ctx.mixing.items()):
        name = canonical_name(node)
        if name not in ("unbind", "split") or not node.users:
            continue
        x = node.args[0]
        p = pl.get(x)
        if not isinstance(p, Shard) or p.merged or shape(x) is None:
            continue
        nd = len(shape(x))
        if name == "unbind":
            d, C = arg(node, 1, "dim", 0), 1
        else:
            C = arg(node, 1, "split_size", node.kwargs.get("split_size_or_sections"))
            d = arg(node, 2, "dim", 0)
        if not isinstance(C, int) or isinstance(C, bool) or C < 1 or not isinstance(d, int) \
                or d % nd != p.dim:
            continue
        pieces = -(-T // C)
        rs = []
        for u in node.users:
            if canonical_name(u) != "getitem" or not isinstance(u.args[1], int):
                rs = []
                break
            k = u.args[1] % pieces
            rs.append((u, (k * C, min((k + 1) * C, T))))
        if rs:
            by_src[node] = rs
    groups: Dict[tuple, Dict[fx.Node, Tuple[int, int]]] = {}
    for src, rs in by_src.items():
        spans = [sp for _, sp in rs]
        if tiles_axis(spans, T):
            groups.setdefault(tuple(sorted(set(spans))), {}).update(dict(rs))
        else:
            full = _missing_last(spans, T)
            if full is not None:  # read by the last step's (dead) update only
                groups.setdefault(full, {}).update(dict(rs))
    for spans, reads in groups.items():
        # a source computed from this group's reads belongs to a later loop (the next
        # layer, fed by this loop's outputs): found once this loop is rewritten
        srcs = {r.args[0] for r in reads}
        later = {src for src in srcs if ancestors(src) & set(reads)}
        reads = {r: sp for r, sp in reads.items() if r.args[0] not in later}
        if not reads:
            continue
        yield spans, reads


class _Loop:
    """What ``find`` learned about one unrolled loop (the rewrite reads it)."""

    def __init__(self):
        self.reads: Dict[fx.Node, int] = {}  # read → step
        self.read_len: Dict[fx.Node, int] = {}  # read → tokens it takes
        self.read_dim: Dict[fx.Node, int] = {}  # read → the source's sequence dim
        self.read_unit: Dict[fx.Node, int] = {}  # read → tokens per entry of that dim
        self.spans: List[Tuple[int, int]] = []
        self.per_step: List[List[fx.Node]] = []
        self.chain_step: Dict[fx.Node, int] = {}
        self.shape_reads: Set[fx.Node] = set()  # reads that only lend a shape
        self.chains: List[Tuple[fx.Node, List[fx.Node]]] = []  # (root, chain)
        self.body: Dict[fx.Node, int] = {}  # node → step (reads, chain nodes, body nodes)
        self.combiners: Dict[fx.Node, int] = {}  # stack/cat → output dim
        # stack/cats of the bare states entering each step (the root first): an exclusive
        # readout ``rec.append(s); s = a_t s + b_t`` — the root's place takes the entering state
        self.entering: Set[fx.Node] = set()
        self.after: Dict[fx.Node, Set[fx.Node]] = {}  # after-loop node → finals it reads
        self.n = 0
        self.synth: Set[int] = set()  # chains whose last-step update Dynamo dropped (dead)
        # outputs written in place: y[:, t] = v (setitem) or y[:, t].copy_(v)
        self.writes: Dict[fx.Node, int] = {}  # setitem / copy_ → step
        self.write_views: Dict[fx.Node, int] = {}  # the y[:, t] a copy_ writes into → step
        self.write_key: Dict[fx.Node, tuple] = {}  # write / view → (buffer, length, index)
        self.buffers: Dict[fx.Node, int] = {}  # buffer written → its sequence dim


class LoopRecurrence(Pattern):
    name = "loop_recurrence"
    kind = "loop_scan"

    def find(self, gm: fx.GraphModule, ctx: Ctx) -> Iterable[Found]:
        for spans, reads in step_read_groups(gm, ctx):
            found = self._match(gm, ctx, list(spans), reads)
            if found is not None:
                yield found

    # ---------------------------------------------------------------- analysis
    def _match(self, gm, ctx: Ctx, spans, reads, trims=None) -> Optional[Found]:
        trims = dict(trims or {})
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        first = min(reads, key=order.get)
        fail = lambda why: FailedMatch(self.name, first, why)  # noqa: E731
        L = _Loop()
        L.n = len(spans)
        step_of_span = {sp: k for k, sp in enumerate(spans)}
        why = self._find_writes(gm, ctx, L, step_of_span, order)
        if why:
            return fail(why)
        reads = {r: sp for r, sp in reads.items() if r not in L.write_views}
        for r, sp in reads.items():
            L.reads[r] = step_of_span[sp]
            L.read_len[r] = sp[1] - sp[0]
            p = ctx.placements.get(r.args[0])
            # None: a piece of an unbind/split (its index is the step)
            L.read_dim[r] = p.dim if canonical_name(r.args[0]) not in ("unbind", "split") \
                and isinstance(p, Shard) else None
            if L.read_dim[r] is not None:
                L.read_unit[r] = _unit(shape(r.args[0])[p.dim], ctx.seq_len) or 1
            if all(canonical_name(u) in _SHAPE_ONLY for u in r.users):
                L.shape_reads.add(r)
        L.spans = list(spans)

        # the latest step each node has read (through any input; shape-only uses carry no
        # data); the nodes downstream of the reads are those with one
        mstep: Dict[fx.Node, int] = {}
        for n in gm.graph.nodes:
            if n in L.reads and n not in L.shape_reads:
                mstep[n] = L.reads[n]
            elif canonical_name(n) not in _SHAPE_ONLY:
                mstep[n] = max((mstep.get(a, -1) for a in n.all_input_nodes), default=-1)
        dep = {n for n, k in mstep.items() if k >= 0}

        # state chains: from a replicated root, the path of affine-diagonal updates that reaches
        # the latest step (then the longest): a readout of the same shape is a side branch
        memo: Dict[fx.Node, Tuple[int, int, List[fx.Node]]] = {}
        banned: Set[fx.Node] = set()  # updates found to use another state-dependent value

        def longest(s: fx.Node) -> Tuple[int, int, List[fx.Node]]:
            if s in memo:
                return memo[s]
            memo[s] = (mstep.get(s, -1), 0, [])
            best = memo[s]
            for u in sorted(s.users, key=order.get):
                if u not in banned and _state_operand_ok(u, s):
                    reach_u, n_u, path_u = longest(u)
                    cand = (max(reach_u, mstep.get(u, -1)), n_u + 1, [u] + path_u)
                    if cand[:2] > best[:2]:
                        best = cand
            memo[s] = best
            return best

        # a chain's other operands must not depend on any state. An update that fails this is
        # taken out and the chains are found again: a readout after the last update that
        # combines two states (0.5 * (s_prev + s)) is then no update, and a chain that ends too
        # soon is dropped (e.g. the next layer's loop, fed by this loop's outputs: found after
        # this loop's rewrite; if its nodes then read across steps, the body check refuses)
        first_bad = None
        while True:
            memo.clear()
            L.chains = []
            in_chain: Set[fx.Node] = set()
            for z in gm.graph.nodes:
                if z in in_chain or z in dep or z.op == "output" or tensor_val(z) is None:
                    continue
                if not isinstance(ctx.placements.get(z), Replicate) and \
                        canonical_name(z) not in _CONST_FACTORIES:
                    continue
                if not tensor_val(z).dtype.is_floating_point:
                    continue
                if not any(u not in banned and _state_operand_ok(u, z) for u in z.users):
                    continue
                chain = longest(z)[2]
                if trims.get(z):
                    chain = chain[:-trims[z]]
                if len(chain) < L.n or not any(c in dep for c in chain):
                    continue
                L.chains.append((z, chain))
                in_chain |= set(chain)
            if not L.chains:
                return fail(first_bad or "no carried state: no replicated initial value updated "
                                         "by an affine elementwise chain across the steps")
            state_nodes = in_chain | {z for z, _ in L.chains}
            reach: Set[fx.Node] = set(state_nodes)
            for n in gm.graph.nodes:
                if n not in reach and canonical_name(n) not in _SHAPE_ONLY and \
                        any(a in reach for a in n.all_input_nodes):
                    reach.add(n)
            new_bad = set()
            for z, chain in L.chains:
                prev = z
                for c in chain:
                    bad = [a for a in c.all_input_nodes if a is not prev and a in reach]
                    if bad:
                        first_bad = first_bad or (
                            f"the state update {c.name} ({canonical_name(c)}) also uses "
                            f"{bad[0].name}, which depends on a carried state: the recurrence "
                            f"is not affine in its state")
                        new_bad.add(c)
                        break
                    prev = c
            if not new_bad:
                break
            banned |= new_bad
        roots = {z for z, _ in L.chains}
        chain_of: Dict[fx.Node, Tuple[int, int]] = {}
        for ci, (z, chain) in enumerate(L.chains):
            chain_of[z] = (ci, -1)
            for i, c in enumerate(chain):
                chain_of[c] = (ci, i)

        # steps of every node through the tokens it reads (carried states do not count)
        rtag: Dict[fx.Node, frozenset] = {}
        chain_step: Dict[fx.Node, int] = {}
        for n in gm.graph.nodes:
            if n in L.reads:
                rtag[n] = frozenset() if n in L.shape_reads else frozenset({L.reads[n]})
                continue
            if n in roots or canonical_name(n) in _SHAPE_ONLY or n in L.write_views or \
                    n.op in ("placeholder", "get_attr", "output"):
                rtag[n] = frozenset()
                continue
            rt: Set[int] = set()
            for a in n.all_input_nodes:
                if a not in state_nodes and a not in L.combiners:
                    rt |= rtag.get(a, frozenset())
            if n in L.writes:  # the value written at step k's span is step k's
                if rt - {L.writes[n]}:
                    return fail(f"{canonical_name(n)} at {source_line(n) or n.name} writes a "
                                f"value of another loop step into step {L.writes[n]}'s tokens")
                rtag[n] = frozenset({L.writes[n]})
                continue
            if n in in_chain:
                if len(rt) > 1:
                    return fail(f"the state update {n.name} reads tokens of several steps")
                rtag[n] = frozenset(rt)
                if rt:
                    chain_step[n] = next(iter(rt))
                continue
            if len(rt) > 1:
                if canonical_name(n) in _COMBINE:
                    L.combiners[n] = -1
                    rtag[n] = frozenset()
                    continue
                return fail(f"{canonical_name(n)} at {source_line(n) or n.name} combines values "
                            f"of several loop steps (only a stack/cat of one value per step is "
                            f"understood)")
            rtag[n] = frozenset(rt)
        # chain nodes without a read take the step of the next update that has one
        for ci, (z, chain) in enumerate(L.chains):
            known = [chain_step[c] for c in chain if c in chain_step]
            if not known:
                return fail("the carried state never takes tokens of a step")
            nxt = None
            for c in reversed(chain):
                if c in chain_step:
                    nxt = chain_step[c]
                else:
                    chain_step[c] = nxt if nxt is not None else known[-1]
            steps = [chain_step[c] for c in chain]
            if steps != sorted(steps):
                return fail("the carried state is not updated in step order")
            if set(steps) == set(range(L.n - 1)) and L.n > 2:
                # the last step's update is dead code (the final state is not used): rebuilt
                # from the step before it when the rank's state is needed
                L.synth.add(ci)
            elif set(steps) == set(range(L.n - 1)):
                return fail(TWO_STEPS)
            elif set(steps) != set(range(L.n)):
                return fail("the carried state is not updated once per step in step order")
            nsteps = L.n - 1 if ci in L.synth else L.n
            counts = [steps.count(k) for k in range(nsteps)]
            extra = counts[-1] - counts[0]
            if extra > 0 and len(set(counts[:-1])) == 1 and not trims.get(z):
                # ops of the state's shape after the last step's update (a cast or a product
                # for the readout, post-processing of the final state): not the recurrence
                trims[z] = extra
                return self._match(gm, ctx, spans, reads, trims)
            if extra < 0 and counts[-1] > 0 and len(set(counts[:-1])) == 1 and \
                    trims.get(z, 0) < 8 and L.n > 2:
                # the last step does less: an exclusive readout (o_t = q_t * s before s = g_t *
                # s + k_t) whose final state is unused — Dynamo dropped the last update, and
                # the last readout, of the state's shape, continued the chain. Cut it off: the
                # last update is then rebuilt from the step before (see L.synth)
                trims[z] = trims.get(z, 0) + counts[-1]
                return self._match(gm, ctx, spans, reads, trims)
            if extra == 0 and ci not in L.synth and L.n > 2 and not trims.get(z) and \
                    _update_ops(z, chain, chain_step, 0) != \
                    _update_ops(z, chain, chain_step, L.n - 1):
                # the last step's "update" is not step 0's: a readout of the state's shape
                # (RWKV's (h + u k_t v_t) * r_t) continued the chain where the last update
                # is dead — cut it off, the last update is then rebuilt (see L.synth)
                trims[z] = counts[-1]
                return self._match(gm, ctx, spans, reads, trims)
            if len(set(counts)) != 1:
                hint = ""
                if len(set(counts[:-1])) == 1 and 0 < counts[-1] < counts[0]:
                    hint = (" (the last step does less: an exclusive readout o_t = f(s) taken "
                            "before s is updated, whose final state is unused, so Dynamo "
                            "dropped the last update; use or return the final state, e.g. "
                            "return torch.stack(out, 1), s)")
                return fail("the carried state is updated a different number of times in "
                            "different steps" + hint)
        if L.synth and len(L.synth) != len(L.chains):
            return fail("some carried states are updated in the last step and some are not")
        # every node that reads tokens belongs to that step; a node that only reads carried
        # states (a cast, s[:, None]) belongs to the step that uses it
        views: List[fx.Node] = []
        view_owner: Dict[fx.Node, Optional[int]] = {}  # view → step of the state it reads
        for n in gm.graph.nodes:
            if n in state_nodes or n in L.reads or n in L.combiners:
                continue
            if rtag.get(n):
                L.body[n] = next(iter(rtag[n]))
                continue
            ow: Set[int] = set()
            from_state = False
            for a in n.all_input_nodes:
                if a in state_nodes or a in view_owner:
                    from_state = True
                    if a in chain_step:
                        ow.add(chain_step[a])
                    elif view_owner.get(a) is not None:
                        ow.add(view_owner[a])
                elif a in L.body:
                    ow.add(L.body[a])
            tensors = (n.args[0] if n.args else n.kwargs.get("tensors")) \
                if canonical_name(n) in _COMBINE else None
            if tensors is not None and (len(ow) > 1 or from_state and isinstance(
                    tensors, (list, tuple)) and len(tensors) == L.n):
                # (the states entering each step, stacked: with two steps, the root and one
                # update — one step among its inputs)
                L.combiners[n] = -1
                continue
            if len(ow) > 1 and not from_state:
                return fail(f"{canonical_name(n)} at {source_line(n) or n.name} combines "
                            f"values of several loop steps (only a stack/cat of one value per "
                            f"step is understood)")
            if from_state:
                # a readout of the states (several: the state before and after an update,
                # s_prev + s): the step is settled below, and the fingerprints check it
                views.append(n)
                view_owner[n] = max(ow) if ow else None
            elif ow:
                L.body[n] = next(iter(ow))
        for r in L.reads:
            if r not in L.shape_reads:
                L.body[r] = L.reads[r]
        for c in in_chain:
            L.body[c] = chain_step[c]
        for v, k in L.write_views.items():
            L.body[v] = k
        # a readout of the states that goes straight into a stack/cat (or a write) belongs to
        # the step of its place there: tanh(s) taken before the update (an exclusive output)
        # is step k's, though the state it reads is step k - 1's
        place: Dict[fx.Node, int] = {}
        for cmb in L.combiners:
            tensors = cmb.args[0] if cmb.args else cmb.kwargs.get("tensors")
            if isinstance(tensors, (list, tuple)) and len(tensors) == L.n:
                for i, t in enumerate(tensors):
                    place.setdefault(t, i)
        for n in reversed(views):
            used = {L.body[u] for u in n.users if u in L.body}
            own = view_owner[n]
            if used:
                L.body[n] = min(used)
            elif n in place:
                L.body[n] = place[n]
            elif own is not None:
                L.body[n] = own

        # the output of the loop: stack/cat of one value per step, in order
        T = ctx.seq_len
        last_of_step = {}  # chain node → the step it ends (its state enters the next)
        for ci, (z, chain) in enumerate(L.chains):
            for c, nxt in zip(chain, chain[1:] + [None]):
                if nxt is None or chain_step[nxt] != chain_step[c]:
                    last_of_step[c] = chain_step[c]
        for cmb in list(L.combiners):
            tensors = cmb.args[0] if cmb.args else cmb.kwargs.get("tensors")
            if isinstance(tensors, (list, tuple)) and len(tensors) == L.n and \
                    tensors[0] in roots and all(last_of_step.get(t) == k for k, t in
                                                enumerate(tensors[1:])) and \
                    all(chain_of[t][0] == chain_of[tensors[0]][0] for t in tensors[1:]):
                L.entering.add(cmb)  # the states entering steps 0 .. n-1
            elif not isinstance(tensors, (list, tuple)) or \
                    [L.body.get(t) for t in tensors] != list(range(L.n)):
                return fail(f"{canonical_name(cmb)} at {cmb.name} does not take one value per "
                            f"loop step in step order")
            d = cmb.args[1] if len(cmb.args) > 1 else cmb.kwargs.get("dim", 0)
            out = shape(cmb)
            d %= len(out)
            if out[d] != T and not (_unit(out[d], T) and out[d] == L.n):
                return fail(f"{canonical_name(cmb)} at {cmb.name} does not rebuild the "
                            f"sequence axis (length {out[d]}, not {T}, nor one entry per "
                            f"step: a chunk axis)")
            L.combiners[cmb] = d

        # final-state uses after the loop: extra nodes at the end of the last step that read
        # only carried states (no tokens)
        per_step: List[List[fx.Node]] = [[] for _ in range(L.n)]
        for n in gm.graph.nodes:
            if n in L.body:
                per_step[L.body[n]].append(n)
        base = len(per_step[0])
        last = per_step[-1]
        for n in last[base:]:
            if rtag.get(n) or n in in_chain:
                return fail(f"the last loop step has more operations than the first "
                            f"({canonical_name(n)} at {n.name}): the body depends on the step")
        per_step[-1] = last[:base]
        finals = {chain[-1] for _, chain in L.chains}
        after: Set[fx.Node] = set()
        for n in last[base:]:  # graph order
            del L.body[n]
            after.add(n)
            for a in n.all_input_nodes:
                if a in state_nodes and a not in finals:
                    return fail(f"{n.name} after the loop reads an intermediate carried state")
                if a in finals:
                    L.after.setdefault(n, set()).add(a)
                elif a in L.body:
                    return fail(f"{n.name} after the loop reads a value of the last step")

        # the body is the same in every step
        fps = [self._fingerprints(per_step[k], k, L, chain_of, chain_step) for k in range(L.n)]
        ref_last = fps[0]
        if L.synth:  # the last step is step 0 without its (dead) update
            live = {n for n in per_step[0] if n in L.writes or
                    any(u in L.combiners and u not in L.entering for u in n.users)}
            for n in reversed(per_step[0]):
                if n in live:
                    live |= {a for a in n.all_input_nodes if a in per_step[0]}
            ref_last = self._fingerprints([n for n in per_step[0] if n in live], 0, L,
                                          chain_of, chain_step)
        for k in range(1, L.n):
            ref = ref_last if k == L.n - 1 else fps[0]
            if fps[k] == ref:
                continue
            i = next((i for i, (x, y) in enumerate(zip(fps[k], ref)) if x != y),
                     min(len(fps[k]), len(ref)))
            steps_k = per_step[k]
            node = steps_k[min(i, len(steps_k) - 1)] if steps_k else first
            return fail(f"loop step {k} differs from step 0 at {canonical_name(node)} "
                        f"({node.name}): the body depends on the step number (a counter "
                        f"used as a number, a partial block, a branch)")
        if any(any(x[:1] == ("step",) for x in _flat(fp)) for fps_k in fps for fp in fps_k):
            return fail("a loop step uses a value of another step other than the carried state")
        L.per_step, L.chain_step = per_step, chain_step
        # every value of the body that leaves it goes to a combiner, a state, or nowhere
        for n, k in L.body.items():
            for u in n.users:
                if u in L.body or u in L.combiners or u in state_nodes or u in after:
                    continue
                if n in finals:  # the final state after the loop (or returned)
                    L.after.setdefault(u, set()).add(n)
                    continue
                return fail(f"{n.name} of loop step {k} is used after the loop by {u.name}")
        covered = set(L.body) | set(L.combiners) | set(L.reads) | state_nodes | \
            set(L.writes) | set(L.write_views) | \
            {r.args[0] for r in L.reads if L.read_dim[r] is None}
        return Match(self.kind, self.name, L.chains[0][1][0], nodes=covered,
                     info={"steps": L.n, "states": len(L.chains),
                           "step_tokens": spans[0][1] - spans[0][0],
                           "only_strategy": "allgather", "_loop": L,
                           "form": "Python loop with a carried state (unrolled)"})

    @staticmethod
    def _find_writes(gm, ctx: Ctx, L: _Loop, spans: Dict[Tuple[int, int], int],
                     order: Dict[fx.Node, int]) -> Optional[str]:
        """Outputs written in place, ``y[:, t] = v`` / ``y[:, t].copy_(v)`` into a buffer made
        before the loop: each step writes its own span of the buffer's sequence axis, so the
        writes of this rank's steps fill this rank's shard of ``y`` (the buffer is sharded
        there). Fills ``L.writes``; → why the loop's writes cannot be taken, or None."""
        T = ctx.seq_len
        per_buf: Dict[fx.Node, List[Tuple[fx.Node, Optional[fx.Node], int, int]]] = {}
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is operator.setitem:
                base, idx, view = n.args[0], n.args[1], None
            elif canonical_name(n) == "copy_" and n.args and \
                    canonical_name(n.args[0]) == "getitem" and len(n.args[0].users) == 1:
                view = n.args[0]
                base, idx = view.args[0], view.args[1]
            else:
                continue
            if not isinstance(base, fx.Node) or shape(base) is None:
                continue
            p = ctx.placements.get(base)
            want = p.dim if isinstance(p, Shard) else None
            w = _write_index(idx, shape(base), T, spans, want)
            if w is None:
                continue
            d, k, pattern = w
            per_buf.setdefault(base, []).append((n, view, d, k))
            L.write_key[n] = (base.name, pattern)
            if view is not None:
                L.write_key[view] = (base.name, pattern)
        for base, ws in per_buf.items():
            where = source_line(ws[0][0]) or ws[0][0].name
            p = ctx.placements.get(base)
            if not _is_fresh(base):
                return (f"outputs written in place into {base.name} ({where}), which is not a "
                        f"fresh tensor made before the loop (torch.empty / zeros / new_zeros / "
                        f"zeros_like ...)")
            if len({d for *_, d, _ in ws}) != 1 or (p is not None and not isinstance(
                    p, (Shard, Replicate))) or (isinstance(p, Shard) and p.merged):
                return (f"the in-place writes into {base.name} ({where}) do not all write along "
                        f"one sequence axis of the buffer")
            if {k for *_, k in ws} != set(range(L.n)):
                return (f"the in-place writes into {base.name} ({where}) do not fill the span "
                        f"of every loop step")
            mine = {w for w, *_ in ws} | {v for _, v, *_ in ws if v is not None}
            last = max(order[w] for w, *_ in ws)
            for u in base.users:
                if u not in mine and order[u] < last:
                    return (f"{u.name} ({canonical_name(u)}) uses the output buffer {base.name} "
                            f"({where}) before the loop has written all of it")
            for w, view, d, k in ws:
                L.writes[w] = k
                if view is not None:
                    L.write_views[view] = k
            L.buffers[base] = ws[0][2]
        return None

    @staticmethod
    def _fingerprints(nodes, k, L: _Loop, chain_of, chain_step) -> List[tuple]:
        local = {n: i for i, n in enumerate(nodes)}
        base: Dict[int, int] = {}  # chain → index of its first update in step k
        for ci, (z, chain) in enumerate(L.chains):
            idx = [i for i, c in enumerate(chain) if chain_step[c] == k]
            base[ci] = idx[0] if idx else len(chain)  # no update: entering = last

        def ref(x):
            if isinstance(x, fx.Node):
                if x in chain_of:
                    ci, i = chain_of[x]
                    return ("state", ci, i - base[ci])
                if x in local:
                    return ("local", local[x])
                if x in L.body:
                    return ("step", L.body[x] - k)
                return ("inv", x.name)
            if isinstance(x, (list, tuple)):
                return (type(x).__name__,) + tuple(ref(a) for a in x)
            if isinstance(x, dict):
                return tuple(sorted((key, ref(v)) for key, v in x.items()))
            if isinstance(x, slice):
                return ("slice", ref(x.start), ref(x.stop), ref(x.step))
            return ("lit", repr(x))

        out = []
        for n in nodes:
            if n in L.reads:
                src = n.args[0]
                idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
                out.append(("read", src.name, L.read_len[n], repr(tuple(
                    type(i).__name__ if isinstance(i, (int, slice)) else repr(i) for i in idx))))
                continue
            if n in L.write_views:  # y[:, t] of y[:, t].copy_(v)
                out.append(("write view",) + L.write_key[n])
                continue
            if n in L.writes and n.target is operator.setitem:  # y[:, t] = v
                out.append(("write",) + L.write_key[n] + (ref(n.args[2:]), ref(dict(n.kwargs))))
                continue
            out.append((n.op, str(n.target), ref(n.args), ref(dict(n.kwargs))))
        return out

    # ---------------------------------------------------------------- rewrite
    def rewrite(self, gm: fx.GraphModule, ctx: Ctx, m: Match) -> None:
        if ctx.world_size == 1:
            return
        L: _Loop = m.info["_loop"]
        g = gm.graph
        created: Set[fx.Node] = set()
        for ci in sorted(L.synth):
            self._rebuild_last_update(g, L, ci)
        for z, chain in L.chains:
            end = chain[-1]
            with g.inserting_before(end.next), ctx.provenance(gm, m, end):
                new: List[fx.Node] = []

                def mk(fn, args, kwargs=None):
                    n = g.call_function(fn, tuple(args), kwargs or {})
                    set_meta(n)
                    new.append(n)
                    return n

                zero = mk(torch.zeros_like, (z,))
                one = mk(torch.ones_like, (z,))
                s_loc, lin, prev = zero, one, z
                for c in chain:
                    s_loc = self._copy(g, c, prev, s_loc, new)
                    lin = self._linear(g, c, prev, lin, new)
                    prev = c
                folded = mk(_fold_states, (z, s_loc, lin, ctx.group_name))
                s_in = mk(operator.getitem, (folded, 0))
                final = None
                if any(end in fs for fs in L.after.values()):
                    final = mk(operator.getitem, (folded, 1))
            created |= set(new)
            for n in new:
                n.meta["spcompile_placement"] = Replicate()
            # only the loop's own uses: a root like a parameter may be used elsewhere too
            z.replace_all_uses_with(s_in, delete_user_cb=lambda u: u not in created and
                                    (u in L.body or u in L.entering))
            if final is not None:
                for n, fs in L.after.items():
                    if end in fs:  # (a node may read several chains' final states)
                        n.replace_input_with(end, final)
        # placements the later analyses must not recompute as mixing
        for n in L.reads:
            n.meta["spcompile_placement"] = Replicate()
            if L.read_dim[n] is None:  # the unbind/split itself: pieces for this rank's steps
                n.args[0].meta["spcompile_placement"] = Replicate()
        for n in L.body:
            n.meta["spcompile_placement"] = Replicate()
        for n, d in L.combiners.items():
            n.meta["spcompile_placement"] = Shard(d)
        for n, d in L.buffers.items():  # written in place: this rank's steps fill its shard
            n.meta["spcompile_placement"] = Shard(d)
        _stable_toposort(g)
        # what reads the loop's output (the next layer) was analysed as per-step values: find
        # its families now that the output is known to be sharded
        from ..detect import redetect
        redetect(gm, ctx)

    def _rebuild_last_update(self, g: fx.Graph, L: _Loop, ci: int) -> None:
        """Dynamo dropped the last step's update (nothing used the final state); the rank's
        state after its shard needs it: clone the previous step's update with the last step's
        reads (the body was checked to be the same in every step)."""
        z, chain = L.chains[ci]
        k = L.n - 2
        upd = [c for c in chain if L.chain_step[c] == k]
        i0 = chain.index(upd[0])
        entering = chain[i0 - 1] if i0 > 0 else z
        nodes = L.per_step[k]
        need = set(upd)
        for n in reversed(nodes):
            if n in need:
                need |= {a for a in n.all_input_nodes if a in nodes}
        mapping = {entering: chain[-1]}
        out = next(n for n in g.nodes if n.op == "output")
        new_chain = []
        with g.inserting_before(out):
            for n in nodes:
                if n not in need:
                    continue
                if n in L.reads:
                    mapping[n] = self._read_at(g, n, L, L.n - 1)
                    continue
                c = g.node_copy(n, lambda x: mapping.get(x, x))
                set_meta(c)
                mapping[n] = c
                if n in upd:
                    new_chain.append(c)
        chain.extend(new_chain)

    @staticmethod
    def _read_at(g: fx.Graph, r: fx.Node, L: _Loop, step: int) -> fx.Node:
        """Read ``r``'s source as ``r`` does, at ``step``'s span (an existing read if any)."""
        src = r.args[0]
        if L.read_dim[r] is None:  # a piece of an unbind/split
            for other, s in L.reads.items():
                if s == step and other.args[0] is src:
                    return other
            n = g.call_function(operator.getitem, (src, step))
            set_meta(n)
            n.meta["spcompile_placement"] = Replicate()  # this rank's token, not a global index
            return n
        idx = list(r.args[1] if isinstance(r.args[1], tuple) else (r.args[1],))
        a, b = L.spans[step]
        u = L.read_unit.get(r, 1)
        a, b = a // u, b // u
        d = 0
        for i, it in enumerate(idx):
            if it is None:
                continue
            if d == L.read_dim[r]:
                idx[i] = a if isinstance(it, int) else slice(a, b, it.step)
                break
            d += 1
        new_idx = tuple(idx) if isinstance(r.args[1], tuple) else idx[0]
        for other, s in L.reads.items():
            if s == step and other.args[0] is src and other.args[1] == new_idx:
                return other
        n = g.call_function(operator.getitem, (src, new_idx))
        set_meta(n)
        n.meta["spcompile_placement"] = Replicate()  # this rank's tokens, not a global index
        return n

    @staticmethod
    def _copy(g: fx.Graph, c: fx.Node, prev: fx.Node, new_prev: fx.Node, new: list) -> fx.Node:
        n = g.node_copy(c, lambda x: new_prev if x is prev else x)
        set_meta(n)
        new.append(n)
        return n

    @staticmethod
    def _linear(g: fx.Graph, c: fx.Node, prev: fx.Node, lin: fx.Node, new: list) -> fx.Node:
        """The linear part of update ``c`` (in its state operand ``prev``) applied to ``lin``."""
        name = canonical_name(c)
        if name in ("add", "sub"):
            if name == "sub" and c.args[1] is prev:
                n = g.call_function(operator.neg, (lin,))
            else:
                return lin
        elif name in _CASTS or name in ("mul", "div", "neg"):
            n = g.node_copy(c, lambda x: lin if x is prev else x)
        else:  # pragma: no cover - _state_operand_ok admits nothing else
            raise AssertionError(name)
        set_meta(n)
        new.append(n)
        return n


def _stable_toposort(g: fx.Graph) -> None:
    """Reorder ``g`` so every node follows its inputs, keeping the original order otherwise
    (the entering state is computed after the loop's reads, and the loop must follow it)."""
    nodes = list(g.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    # an in-place write (y[:, t] = v, y[:, t].copy_(v)) stays after every earlier use of the
    # tensor it writes and before every later one, though no edge says so
    after: Dict[fx.Node, List[fx.Node]] = {n: list(n.users) for n in nodes}
    for n in nodes:
        if not mutates(n) or not n.args or not isinstance(n.args[0], fx.Node):
            continue
        bases = {n.args[0]}
        if canonical_name(n.args[0]) == "getitem" and isinstance(n.args[0].args[0], fx.Node):
            bases.add(n.args[0].args[0])
        for b in bases:
            for u in b.users:
                if pos[u] > pos[n] and u not in after[n]:
                    after[n].append(u)
                elif pos[u] < pos[n] and n not in after[u]:
                    after[u].append(n)
    indeg = {n: 0 for n in nodes}
    for n in nodes:
        for u in after[n]:
            indeg[u] += 1
    heap = [(pos[n], n.name, n) for n in nodes if indeg[n] == 0]
    heapq.heapify(heap)
    order = []
    while heap:
        _, _, n = heapq.heappop(heap)
        order.append(n)
        for u in after[n]:
            indeg[u] -= 1
            if indeg[u] == 0:
                heapq.heappush(heap, (pos[u], u.name, u))
    if len(order) != len(nodes):
        raise RuntimeError("spcompile: loop rewrite produced a cycle")
    # placeholders first, output last: a stable sort keeps them there
    for a, b in zip(order, order[1:]):
        if a.next is not b:
            a.append(b)
