"""Python loops over tokens whose state update has no parallel form, run as a relay.

``loop_recurrence`` takes loops whose carried state is updated affinely and elementwise (their
hand-off is one all-gather). Everything else a loop may carry — a GRU/LSTM cell's hidden state,
the delta rule's ``S (I - β k kᵀ) + β v kᵀ``, xLSTM's stabilised ``(C, n, m)``, any nonlinear
step — is still exact sequence parallel if the ranks run their local loops one after the other,
each starting from the state the rank before it ended with (``collectives.relay``). This family
finds such loops and lifts each into one ``relay_region`` op.

What is checked (on the loop Dynamo unrolled with this rank's local count):

* **steps** — the reads that tile ``[0, T_local)`` (as ``loop_recurrence``'s); every node gets the
  latest step it reads through any input, and the nodes of each step are listed in graph order.
* **the body is the same in every step** — each node's fingerprint (op, literal arguments, and
  what each operand is: a node of the same step by position, a node of the step before by
  position, a read of the step by source, a value from outside the loop by structure) must be
  the same in every step. Step 0 is compared with step 1 where step 1 uses values of step 0,
  step 0 uses values from before the loop: those are the **roots** (the initial state, and what
  the first step computes from it alone), and the step-0 positions they fill are the carried
  state. A body that reads its counter as a number, a partial last block, a branch on the step:
  refused. The last step may lack what Dynamo dropped as dead (the update of a final state
  nothing uses): those values are rebuilt from the body when the next rank needs them.
* **what leaves the loop** — a stack/cat of one value per step in order (sharded along its axis),
  outputs written in place into a fresh buffer at each step's span (the buffer is sharded), and
  values of the last step (the final state: the global one is the last rank's, broadcast). Any
  other value of a step used after the loop is refused.

The rewrite moves the loop's nodes into a small FX module (``collectives.relay.RegionSpec``) and
calls it through ``spcompile::relay_region``: the roots are replaced by the state received from
the rank before, the last step's carried values are sent to the rank after. The backward
recomputes the region. Costs: the ranks run the loop in turn (no speed-up for this layer; memory
is split), one state each way per rank and direction.
"""
from __future__ import annotations

import operator
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

import torch
import torch.fx as fx

from ..graph_utils import _autocast_at, canonical_name, mutates, shape, tensor_val
from ..pipeline import Ctx, source_line
from ..sequence_axis import Replicate, Shard
from .base import FailedMatch, Found, Match, Pattern
from .loop_recurrence import (_COMBINE, _SHAPE_ONLY, LoopRecurrence, _Loop, _stable_toposort,
                              _unit, step_read_groups)


class _Fail(Exception):
    pass


_SERIAL = ("no parallel form: the ranks run it in turn, each from the state the rank before "
           "ended with (exact; serial)")


TWO_STEPS_RELAY = ("only two steps per rank, and the state leaving the rank is not in the graph "
                   "(the next step's part of it, or a final state nothing uses): it cannot be "
                   "rebuilt from a step checked against another (use more tokens per rank, or "
                   "return the final state)")


def _is_node(x) -> bool:
    return isinstance(x, fx.Node)


class _Relay:
    """What ``find`` learned about one loop (the rewrite reads it)."""

    def __init__(self):
        self.L = _Loop()
        self.steps: List[List[fx.Node]] = []  # step → its nodes, graph order
        self.region: List[fx.Node] = []  # every node lifted into the relay, graph order
        self.synth: List[Tuple[int, int]] = []  # (step, template position) rebuilt
        self.aligned: Dict[int, Dict[int, fx.Node]] = {}  # step → template position → node
        self.carried: List[Tuple[int, fx.Node]] = []  # (template position j, root) per state
        self.carried_at: Dict[Tuple[int, tuple], int] = {}  # (step-0 node, operand path) → j
        self.combiners: Dict[fx.Node, int] = {}  # stack/cat → the sequence dim of its output
        self.finals_out: Set[fx.Node] = set()  # last-step values used after the loop
        self.reverse = False  # the loop runs from the last token to the first


class LoopRelay(Pattern):
    name = "loop_relay"
    kind = "loop_scan"

    def find(self, gm: fx.GraphModule, ctx: Ctx) -> Iterable[Found]:
        if getattr(ctx.options, "loops", "relay") == "refuse":
            return
        affine = LoopRecurrence()
        for spans, reads in step_read_groups(gm, ctx):
            if isinstance(affine._match(gm, ctx, list(spans), dict(reads)), Match):
                continue  # the all-gather form takes it
            order = {n: i for i, n in enumerate(gm.graph.nodes)}
            first = min(reads, key=order.get)
            # two loops over one value (a forward and a reversed one): each reads every span
            # once, one after the other; the first is taken here, the next once it is rewritten
            cands = [dict(reads)]
            srt = sorted(reads, key=order.get)
            n = len(spans)
            if len(srt) > n and len(srt) % n == 0:
                chunks = [srt[i:i + n] for i in range(0, len(srt), n)]
                if all(sorted(reads[r] for r in c) == sorted(spans) for c in chunks):
                    cands.insert(0, {r: reads[r] for r in chunks[0]})
            R, why = None, None
            for cand in cands:
                try:
                    R = self._analyze(gm, ctx, list(spans), cand, order)
                    break
                except _Fail as e:
                    why = why or str(e)
            if R is None:
                yield FailedMatch(self.name, first, why)
                continue
            L = R.L
            yield Match(self.kind, self.name, first, nodes=set(R.region) | set(L.reads),
                        info={"steps": L.n, "states": len(R.carried),
                              "step_tokens": spans[0][1] - spans[0][0],
                              "only_strategy": "relay", "_relay": R, "owns_nodes": True,
                              "_only_reason": _SERIAL,
                              "form": "Python loop, state carried rank to rank (serial)"})

    # ---------------------------------------------------------------- analysis
    def _analyze(self, gm, ctx: Ctx, spans, reads, order) -> _Relay:
        R = _Relay()
        L = R.L
        L.n = n = len(spans)
        if n < 2:
            raise _Fail("one step per rank")
        step_of_span = {sp: k for k, sp in enumerate(spans)}
        why = LoopRecurrence._find_writes(gm, ctx, L, step_of_span, order)
        if why:
            raise _Fail(why)
        reads = {r: sp for r, sp in reads.items() if r not in L.write_views}
        for r, sp in reads.items():
            L.reads[r] = step_of_span[sp]
            L.read_len[r] = sp[1] - sp[0]
            p = ctx.placements.get(r.args[0])
            L.read_dim[r] = p.dim if canonical_name(r.args[0]) not in ("unbind", "split") \
                and isinstance(p, Shard) else None
            if L.read_dim[r] is not None:
                L.read_unit[r] = _unit(shape(r.args[0])[p.dim], ctx.seq_len) or 1
            if all(canonical_name(u) in _SHAPE_ONLY for u in r.users):
                L.shape_reads.add(r)
        L.spans = list(spans)
        # ``for t in reversed(range(T))``: the steps run from the last span to the first (the
        # reads of each step come earlier in the graph the later their span): number the steps
        # in the loop's order; the relay then runs from the last rank to the first
        first = {}
        for r, k in L.reads.items():
            first[k] = min(first.get(k, order[r]), order[r])
        if len(first) == n and all(first[k] > first[k + 1] for k in range(n - 1)):
            R.reverse = True
            flip = lambda k: n - 1 - k  # noqa: E731
            L.reads = {r: flip(k) for r, k in L.reads.items()}
            L.writes = {w: flip(k) for w, k in L.writes.items()}
            L.write_views = {v: flip(k) for v, k in L.write_views.items()}
            L.spans = L.spans[::-1]

        # the latest step each node reads (shape-only reads carry no step)
        mstep: Dict[fx.Node, int] = {}
        for nd in gm.graph.nodes:
            if nd in L.reads:
                mstep[nd] = -1 if nd in L.shape_reads else L.reads[nd]
            elif nd in L.write_views:
                mstep[nd] = L.write_views[nd]
            elif nd.op in ("call_function", "call_method", "call_module"):
                mstep[nd] = max((mstep.get(a, -1) for a in nd.all_input_nodes), default=-1)
                if nd in L.writes:
                    mstep[nd] = max(mstep[nd], L.writes[nd])
        steps: List[List[fx.Node]] = [[] for _ in range(n)]
        for nd in gm.graph.nodes:
            if mstep.get(nd, -1) >= 0:
                steps[mstep[nd]].append(nd)
        R.steps = steps
        if all(x in L.reads for s_ in steps[:-1] for x in s_) and steps[-1]:
            raise _Fail("every step reads the last step's tokens: a loop from the last token "
                        "to the first carries its state against the ranks' order (write it as a "
                        "forward loop between two torch.flip(x, [1]) along the sequence)")
        pos = [{x: i for i, x in enumerate(s)} for s in steps]
        ext_keys: Dict[fx.Node, Any] = {}

        def ext_key(a: fx.Node):
            """What a value from outside the loop is, by structure (a ``W.t()`` recomputed in
            each step is the same value every time)."""
            if a in ext_keys:
                return ext_keys[a]
            ext_keys[a] = ("node", a.name)  # (cycles: none in a graph; recursion guard)
            if a.op in ("call_function", "call_method") and not mutates(a) and \
                    canonical_name(a) not in ("rand", "randn", "rand_like", "randn_like",
                                              "dropout", "bernoulli", "multinomial"):
                key = ("call", a.op, str(a.target),
                       fx.node.map_aggregate(a.args, lambda x: ext_key(x) if _is_node(x) else x),
                       tuple(sorted((k, str(v)) for k, v in a.kwargs.items())))
                ext_keys[a] = _freeze(key)
            return ext_keys[a]

        def fp(nd: fx.Node, k: int) -> tuple:
            def ref(a, path=()):
                if a in pos[k]:
                    return ("self", pos[k][a])
                if k > 0 and a in pos[k - 1]:
                    return ("prev", pos[k - 1][a])
                if mstep.get(a, -1) >= 0:
                    raise _Fail(f"{nd.name} ({canonical_name(nd)}) in loop step {k} uses "
                                f"{a.name} of step {mstep[a]}: only the step before is carried")
                return ("ext", ext_key(a), a)
            if nd in L.reads:
                return ("read", ref(nd.args[0]), L.read_len[nd], L.read_dim[nd])
            if nd in L.writes:
                return ("write", L.write_key[nd], ref(nd.args[0]),
                        _walk(nd.args[_write_value_at(nd):], (3,), ref))
            if nd in L.write_views:
                return ("wview", L.write_key[nd], ref(nd.args[0]))
            return (nd.op, str(nd.target), _walk(nd.args, (2,), ref),
                    _walk(nd.kwargs, (3,), ref))

        fps = [[fp(x, k) for x in steps[k]] for k in range(n - 1)]
        fps.append([])
        for x in steps[n - 1]:  # (what follows the loop may read any step: a stack)
            try:
                fps[n - 1].append(fp(x, n - 1))
            except _Fail:
                break
        template = fps[0]
        roots: Dict[int, fx.Node] = {}  # carried position j (in a step) → step 0's value
        carried_at: Dict[Tuple[int, tuple], int] = {}  # (template node, operand path) → j
        plain_at: Set[Tuple[int, tuple]] = set()

        def same(a, t, ti: int, mt: Optional[Dict[int, int]] = None,
                 mt_prev: Optional[Dict[int, int]] = None) -> bool:
            """Is actual fingerprint ``a`` (of a step ≥ 1) the template's ``t`` (step 0's node
            ``ti``)? Where the step uses a value of the step before and step 0 one from before
            the loop, that operand is carried: learnt (kept only if the whole node matches).
            ``mt`` / ``mt_prev`` map positions of this step / the step before to the template's
            (the last two steps may lack dead nodes)."""
            found: List[Tuple[tuple, int, fx.Node]] = []
            plain: List[tuple] = []

            def walk(a, t, path) -> bool:
                if isinstance(a, tuple) and a[:1] == ("prev",) and isinstance(t, tuple) and \
                        t[:1] == ("ext",):
                    j = a[1] if mt_prev is None else mt_prev.get(a[1], -1)
                    found.append((path, j, t[2]))
                    return j >= 0
                if isinstance(a, tuple) and a[:1] == ("ext",) and isinstance(t, tuple) and \
                        t[:1] == ("ext",):
                    plain.append(path)
                    return a[1] == t[1]
                if isinstance(a, tuple) and a[:1] == ("self",) and isinstance(t, tuple) and \
                        t[:1] == ("self",):
                    return (mt.get(a[1]) if mt is not None else a[1]) == t[1]
                if isinstance(a, tuple) and isinstance(t, tuple):
                    return len(a) == len(t) and all(walk(x, y, path + (i,))
                                                    for i, (x, y) in enumerate(zip(a, t)))
                return a == t

            if not walk(a, t, ()):
                return False
            for path, j, root in found:
                if (ti, path) in plain_at or carried_at.get((ti, path), j) != j or (
                        j in roots and roots[j] is not root and
                        ext_key(roots[j]) != ext_key(root)):
                    return False
            if any((ti, path) in carried_at for path in plain):
                return False
            for path, j, root in found:
                roots.setdefault(j, root)
                carried_at[(ti, path)] = j
            plain_at.update((ti, path) for path in plain)
            return True

        def differs(k: int, bad: int):
            nd = steps[k][min(bad, len(steps[k]) - 1)] if steps[k] else next(iter(L.reads))
            return _Fail(f"loop step {k} differs from step 0 at {canonical_name(nd)} "
                         f"({nd.name}, {source_line(nd) or '?'}): the body depends on the "
                         f"step number (a counter used as a number, a partial block, a branch)")

        for k in range(1, n - 2):
            if len(fps[k]) != len(template) or not all(
                    same(a, t, i) for i, (a, t) in enumerate(zip(fps[k], template))):
                raise differs(k, next((i for i, (a, t) in enumerate(zip(fps[k], template))
                                       if not same(a, t, i)), min(len(fps[k]), len(template))))
        # the last two steps: the template's nodes in order, less what Dynamo dropped as dead
        # (the last update when the final state is unused, and what the step before computed
        # for it alone); after the last step's, what follows the loop
        aligned: Dict[int, Dict[int, fx.Node]] = {}
        matched = 0
        for k in sorted({max(1, n - 2), n - 1}):
            mt: Dict[int, int] = {}
            mt_prev = None if k - 1 not in aligned else \
                {pos[k - 1][x]: t for t, x in aligned[k - 1].items()}
            ti = 0
            matched = 0
            for i, a in enumerate(fps[k]):
                hit = next((t for t in range(ti, len(template))
                            if same(a, template[t], t, mt, mt_prev)), None)
                if hit is None:
                    break
                mt[i] = hit
                ti = hit + 1
                matched = i + 1
            if k < n - 1 and matched != len(steps[k]):
                raise differs(k, matched)
            aligned[k] = {t: steps[k][i] for i, t in mt.items()}
        for k in range(n - 2):
            aligned.setdefault(k, dict(enumerate(steps[k])))
        R.aligned = aligned
        post = steps[n - 1][matched:]
        if not roots:
            raise _Fail("no state is carried from one step to the next")
        for j, root in sorted(roots.items()):
            p = ctx.placements.get(root)
            tv, xv = tensor_val(root), tensor_val(steps[0][j])
            if tv is None or xv is None:
                raise _Fail(f"the carried value {steps[0][j].name} is not a tensor")
            if isinstance(p, Shard):
                raise _Fail(f"the loop's initial state {root.name} is sharded (it comes from "
                            f"this rank's tokens): only an initial state the same on every "
                            f"rank can start rank 0's loop")
            if tuple(tv.shape) != tuple(xv.shape) or tv.dtype != xv.dtype:
                raise _Fail(f"the initial state {root.name} {tuple(tv.shape)} {tv.dtype} and "
                            f"the carried value {steps[0][j].name} {tuple(xv.shape)} "
                            f"{xv.dtype} differ in shape or dtype")
        R.carried = sorted(roots.items())
        R.carried_at = carried_at
        # the state leaving the rank: the last step's carried values, rebuilt from the body
        # where they do not exist (the next step's part, or what Dynamo dropped as dead)
        step0 = {x: i for i, x in enumerate(steps[0])}
        need: Set[Tuple[int, int]] = set()
        todo = [(n - 1, j) for j, _ in R.carried]
        while todo:
            k, t = todo.pop()
            if k < 0 or t in aligned[k] or (k, t) in need:
                continue
            need.add((k, t))
            x = steps[0][t]
            if x in L.writes or mutates(x):
                raise _Fail(f"the last step's state needs {x.name}, which writes in place")
            for path, a in _operands(x, L):
                j = carried_at.get((t, path))
                if j is not None:
                    todo.append((k - 1, j))
                elif a in step0:
                    todo.append((k, step0[a]))
        if need and n < 3:
            raise _Fail(TWO_STEPS_RELAY)
        R.synth = sorted(need)

        # the region: every step's nodes, the last step's template part, the stack/cats
        region = [x for k in range(n - 1) for x in steps[k]] + steps[n - 1][:matched]
        inside = set(region)
        T = ctx.seq_len
        for c in post:
            if canonical_name(c) not in _COMBINE:
                continue
            tensors = c.args[0] if c.args else c.kwargs.get("tensors")
            if not isinstance(tensors, (list, tuple)) or len(tensors) != n or \
                    [mstep.get(t) for t in tensors] != (list(range(n))[::-1] if R.reverse
                                                         else list(range(n))) or \
                    not all(t in inside for t in tensors):
                continue
            d = c.args[1] if len(c.args) > 1 else c.kwargs.get("dim", 0)
            out = shape(c)
            if out is None or not isinstance(d, int):
                continue
            d %= len(out)
            if out[d] != T and not (_unit(out[d], T) and out[d] == n):
                raise _Fail(f"{canonical_name(c)} at {c.name} does not rebuild the sequence "
                            f"axis (length {out[d]}, not {T}, nor one entry per step)")
            R.combiners[c] = d
            inside.add(c)
        for r in L.reads:  # ``x.unbind(1)`` / ``x.split(C, 1)``: its pieces are the reads
            if L.read_dim[r] is None and r in inside:
                src = r.args[0]
                if all(u in inside for u in src.users):
                    inside.add(src)
        R.region = [x for x in gm.graph.nodes if x in inside]
        last_vals = set(steps[n - 1][:matched])
        for x in R.region:
            if x in R.combiners:
                continue
            for u in x.users:
                if u in inside:
                    continue
                if x in last_vals:
                    R.finals_out.add(x)
                    continue
                raise _Fail(f"{x.name} of loop step {mstep[x]} is used after the loop by "
                            f"{u.name} ({source_line(u) or '?'}): only the last step's values "
                            f"(the final state) and a stack/cat of one value per step may be")
            if mutates(x) and x not in L.writes and x.args and _is_node(x.args[0]) and \
                    x.args[0] not in inside:
                raise _Fail(f"{x.name} ({canonical_name(x)}) writes in place into "
                            f"{x.args[0].name}, made before the loop")
        for x in R.region:
            if x.op == "call_module":
                raise _Fail(f"{x.name} calls a module Dynamo did not inline")
            for a in x.all_input_nodes:
                if a not in inside and tensor_val(a) is None and \
                        not isinstance(a.meta.get("example_value"), (int, float, bool)):
                    raise _Fail(f"{x.name} uses {a.name}, neither a tensor nor a number")
        return R

    # ---------------------------------------------------------------- rewrite
    def rewrite(self, gm: fx.GraphModule, ctx: Ctx, m: Match) -> None:
        if ctx.world_size == 1:
            return
        from ...collectives.relay import RegionSpec, register_region, relay_region
        R: _Relay = m.info["_relay"]
        L = R.L
        n = L.n
        inside = set(R.region)
        sub = fx.Graph()
        env: Dict[fx.Node, fx.Node] = {}
        ext: List[fx.Node] = []  # main-graph values the region reads, in input order
        consts: Dict[fx.Node, Any] = {}

        def ext_in(a: fx.Node) -> fx.Node:
            if a in env:
                return env[a]
            v = a.meta.get("example_value")
            if tensor_val(a) is None and isinstance(v, (int, float, bool)):
                consts[a] = v
                return v
            ph = sub.placeholder(f"in_{len(ext)}")
            ph.meta["example_value"] = a.meta.get("example_value")
            ext.append(a)
            env[a] = ph
            return ph

        root_ph: Dict[int, fx.Node] = {}  # carried position → the state placeholder
        roots_in: List[fx.Node] = []
        for j, root in R.carried:
            ph = sub.placeholder(f"state_{len(roots_in)}")
            ph.meta["example_value"] = root.meta.get("example_value")
            root_ph[j] = ph
            roots_in.append(root)
        buf_clone: Dict[fx.Node, fx.Node] = {}
        for b in L.buffers:
            buf_clone[b] = sub.call_method("clone", (ext_in(b),))
        step0 = {x: i for i, x in enumerate(R.steps[0])}

        def plain(a: fx.Node) -> Any:
            if a in buf_clone:
                return buf_clone[a]
            if a in inside:
                return env[a]
            return ext_in(a)

        for x in R.region:
            if x in step0:  # the operands carried into step 0 are the entering states
                t = step0[x]
                env[x] = _copy_node(sub, x, L, lambda a, path, t=t: root_ph[R.carried_at[(
                    t, path)]] if (t, path) in R.carried_at else plain(a))
            else:
                env[x] = sub.node_copy(x, plain)
        # the state leaving the rank where the graph lacks it: step 0's nodes with the reads
        # of their step and the values of the step before
        built: Dict[Tuple[int, int], fx.Node] = {}

        def get(k: int, t: int):
            if t in R.aligned[k]:
                return env[R.aligned[k][t]]
            if (k, t) in built:
                return built[(k, t)]
            x = R.steps[0][t]

            def f(a, path):
                j = R.carried_at.get((t, path))
                if j is not None:  # the state entering step k
                    return get(k - 1, j) if k > 0 else root_ph[j]
                if a in step0:
                    return get(k, step0[a])
                return buf_clone[a] if a in buf_clone else ext_in(a)

            built[(k, t)] = self._read_at_sub(sub, x, L, k, lambda a: f(a, None)) \
                if x in L.reads else _copy_node(sub, x, L, f)
            return built[(k, t)]

        finals_sub = [get(n - 1, j) for j, _ in R.carried]
        outs: List[fx.Node] = []  # main-graph nodes whose uses take the op's outputs
        out_sub: List[fx.Node] = []
        for x in R.region:
            if x in R.combiners or x in R.finals_out:
                outs.append(x)
                out_sub.append(env[x])
        for b in L.buffers:
            outs.append(b)
            out_sub.append(buf_clone[b])
        n_public = len(outs)
        sub.output(tuple(out_sub + finals_sub))
        sub_gm = fx.GraphModule(gm, sub)
        out_meta = []
        for x in outs:
            v = tensor_val(x)
            out_meta.append((tuple(v.shape), v.dtype))
        for j, _ in R.carried:
            v = tensor_val(R.steps[0][j])
            out_meta.append((tuple(v.shape), v.dtype))
        spec = RegionSpec(sub_gm, roots=list(range(len(ext), len(ext) + len(roots_in))),
                          finals=list(range(n_public, n_public + len(R.carried))),
                          out_meta=out_meta, where=source_line(m.anchor) or m.anchor.name,
                          random=any(_draws_random(x) for x in R.region) or any(
                              _draws_random(R.steps[0][t]) for _, t in R.synth),
                          cuda=_cuda_devices(ext + roots_in), reverse=R.reverse,
                          autocast=_autocast_at(R.region[0]))
        # (the placeholders: ext first, then the states: reorder to match)
        phs = [p for p in sub.nodes if p.op == "placeholder"]
        order = [env[a] for a in ext] + [root_ph[j] for j, _ in R.carried]
        for p in phs:
            if p not in order:
                raise AssertionError(p)
        first_other = next(x for x in sub.nodes if x.op != "placeholder")
        for p in order:
            first_other.prepend(p)
        sub_gm.recompile()
        key = register_region(spec)
        g = gm.graph
        end = R.region[-1]
        with g.inserting_after(end), ctx.provenance(gm, m, m.anchor):
            call = g.call_function(relay_region, ([*ext, *roots_in], key, ctx.group_name))
            call.meta["example_value"] = [x.meta.get("example_value") for x in outs] + [
                R.steps[0][j].meta.get("example_value") for j, _ in R.carried]
            call.meta["spcompile_placement"] = Replicate()
            gets = []
            prev = call
            for i, x in enumerate(outs):
                with g.inserting_after(prev):
                    gi = g.call_function(operator.getitem, (call, i))
                gi.meta["example_value"] = x.meta.get("example_value")
                prev = gi
                gets.append(gi)
                if x in R.combiners:
                    gi.meta["spcompile_placement"] = Shard(R.combiners[x])
                elif x in L.buffers:
                    gi.meta["spcompile_placement"] = Shard(L.buffers[x])
            final_get = {}
            for x, gi in zip(outs, gets):
                if x in R.finals_out:
                    with g.inserting_after(prev):
                        glob = g.call_function(_last_ranks, (gi, ctx.group_name, R.reverse))
                    glob.meta["example_value"] = x.meta.get("example_value")
                    glob.meta["spcompile_placement"] = Replicate()
                    gi.meta["spcompile_placement"] = Replicate()
                    prev = glob
                    final_get[x] = glob
        for x, gi in zip(outs, gets):
            repl = final_get.get(x, gi)
            if x in L.buffers:
                x.replace_all_uses_with(repl, delete_user_cb=lambda u: u not in inside and
                                        u is not call)
            else:
                x.replace_all_uses_with(repl, delete_user_cb=lambda u: u not in inside)
        for x in reversed(R.region):
            if x.users:
                raise AssertionError(f"loop_relay: {x.name} still used by {list(x.users)}")
            g.erase_node(x)
        for r in L.shape_reads:  # (a shape lent to the initial state: not a read of tokens)
            r.meta["spcompile_placement"] = Replicate()
        _stable_toposort(g)
        from ..detect import redetect
        redetect(gm, ctx)

    @staticmethod
    def _read_at_sub(sub: fx.Graph, r: fx.Node, L: _Loop, step: int, f) -> fx.Node:
        """``r``'s read at ``step``'s span, in the region graph (its source mapped by ``f``)."""
        src = f(r.args[0])
        if L.read_dim[r] is None:
            return sub.call_function(operator.getitem, (src, step))
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
        return sub.call_function(operator.getitem,
                                 (src, tuple(idx) if isinstance(r.args[1], tuple) else idx[0]))


def _walk(v, path: tuple, leaf):
    """``v``'s structure with every node replaced by ``leaf(node, path)``, as nested tuples whose
    indices are the paths (a fingerprint; ``_rebuild`` walks the same way)."""
    if _is_node(v):
        return leaf(v, path)
    if isinstance(v, (tuple, list)):
        return tuple(_walk(e, path + (i,), leaf) for i, e in enumerate(v))
    if isinstance(v, slice):
        return ("slice", _walk(v.start, path + (1,), leaf), _walk(v.stop, path + (2,), leaf),
                _walk(v.step, path + (3,), leaf))
    if isinstance(v, dict):
        return tuple((k, _walk(v[k], path + (i, 1), leaf)) for i, k in enumerate(sorted(v)))
    return _freeze(v)


def _rebuild(v, path: tuple, leaf):
    """``v`` with every node replaced by ``leaf(node, path)`` (paths as ``_walk``'s)."""
    if _is_node(v):
        return leaf(v, path)
    if isinstance(v, (tuple, list)):
        return type(v)(_rebuild(e, path + (i,), leaf) for i, e in enumerate(v))
    if isinstance(v, slice):
        return slice(_rebuild(v.start, path + (1,), leaf), _rebuild(v.stop, path + (2,), leaf),
                     _rebuild(v.step, path + (3,), leaf))
    if isinstance(v, dict):
        return {k: _rebuild(v[k], path + (i, 1), leaf) for i, k in enumerate(sorted(v))}
    return v


def _write_value_at(nd: fx.Node) -> int:
    """Where a write's value operands start: ``setitem(buf, idx, v)`` 2, ``view.copy_(v)`` 1."""
    return 2 if nd.op == "call_function" and nd.target is operator.setitem else 1


def _operands(x: fx.Node, L: _Loop) -> List[Tuple[tuple, fx.Node]]:
    """(path, node) of every operand of ``x``, paths as in its fingerprint."""
    out: List[Tuple[tuple, fx.Node]] = []
    rec = lambda a, path: out.append((path, a))  # noqa: E731
    if x in L.writes:
        _walk(x.args[_write_value_at(x):], (3,), rec)
        out.append(((), x.args[0]))
    elif x in L.reads or x in L.write_views:
        out.append(((), x.args[0]))
    else:
        _walk(x.args, (2,), rec)
        _walk(x.kwargs, (3,), rec)
    return out


def _copy_node(sub: fx.Graph, x: fx.Node, L: _Loop, leaf) -> fx.Node:
    """``x`` in ``sub``, each operand node ``a`` at ``path`` (its fingerprint's) replaced by
    ``leaf(a, path)``; the buffer/view a write writes and a read's source take path ``()``."""
    if x in L.writes:
        i = _write_value_at(x)
        args = (leaf(x.args[0], ()),) + tuple(_rebuild(x.args[1:i], (9,), lambda a, p: leaf(
            a, None))) + tuple(_rebuild(tuple(x.args[i:]), (3,), leaf))
        kwargs = dict(x.kwargs)
    elif x in L.reads or x in L.write_views:
        args = (leaf(x.args[0], ()),) + tuple(x.args[1:])
        kwargs = dict(x.kwargs)
    else:
        args = _rebuild(tuple(x.args), (2,), leaf)
        kwargs = _rebuild(dict(x.kwargs), (3,), leaf)
    n = sub.create_node(x.op, x.target, tuple(args), kwargs)
    n.meta = dict(x.meta)
    return n


def _freeze(x):
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(a) for a in x)
    if isinstance(x, slice):
        return ("slice", x.start, x.stop, x.step)
    if isinstance(x, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    if isinstance(x, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return str(x)
    return x


def _last_ranks(x: torch.Tensor, group: str, first: bool = False) -> torch.Tensor:
    """The last rank's value of ``x`` on every rank (the global final state; the first rank's
    for a loop from the last token to the first); the gradient goes to that rank's ``x``."""
    if not group:
        return x
    from ...collectives import group_size
    P = group_size(group)
    alls = torch.ops.spcompile.gather_sequence_rs(x.unsqueeze(0).contiguous(), 0, group,
                                                  "relay")
    return alls[0 if first else P - 1]


_RNN = {"gru": 1, "rnn_tanh": 1, "rnn_relu": 1, "lstm": 2}  # op → states (h, c)


class RNNRelay(Pattern):
    """torch's fused recurrent layers (``nn.GRU``, ``nn.LSTM``, ``nn.RNN``; any number of layers,
    unidirectional) run as a relay: ``torch.gru(x, hx, params, ...)`` takes the state entering
    the rank as ``hx`` and returns the state leaving it, so the op itself is the region. A
    bidirectional layer is taken apart: per layer, the forward direction is relayed from the
    first rank to the last, the reverse direction (the shard flipped, run, flipped back) from
    the last to the first, and the next layer reads both, concatenated."""
    name = "rnn_relay"
    kind = "loop_scan"

    def find(self, gm: fx.GraphModule, ctx: Ctx) -> Iterable[Found]:
        if ctx.seq_len is None:
            return
        for nd in gm.graph.nodes:
            name = canonical_name(nd)
            if name not in _RNN or nd not in ctx.mixing or nd.op != "call_function" or \
                    len(nd.args) < 9:
                continue
            x, hx, params = nd.args[0], nd.args[1], nd.args[2]
            bidir, batch_first = nd.args[7], nd.args[8]
            p = ctx.placements.get(x)
            if not isinstance(bidir, bool) or not isinstance(nd.args[4], int):
                continue
            sx = shape(x)
            if not isinstance(p, Shard) or p.merged or sx is None or len(sx) != 3 or \
                    p.dim != (1 if batch_first else 0):
                continue
            hs = list(hx) if isinstance(hx, (list, tuple)) else [hx]
            if len(hs) != _RNN[name] or not all(_is_node(h) and isinstance(
                    ctx.placements.get(h), Replicate) for h in hs):
                yield FailedMatch(self.name, nd, "the initial state hx is not the same on every "
                                                 "rank (it comes from this rank's tokens)")
                continue
            if not all(_is_node(w) for w in params) or any(
                    canonical_name(u) != "getitem" or not isinstance(u.args[1], int)
                    for u in nd.users):
                continue
            yield Match(self.kind, self.name, nd, nodes={nd, *nd.users},
                        info={"states": len(hs), "layers": nd.args[4], "only_strategy": "relay",
                              "owns_nodes": True, "_only_reason": _SERIAL,
                              "form": f"{_RNN_NAMES[name]}, state carried rank to rank "
                                      f"(serial)"})

    def rewrite(self, gm: fx.GraphModule, ctx: Ctx, m: Match) -> None:
        if ctx.world_size == 1:
            return
        if m.anchor.args[7]:
            return self._rewrite_bidirectional(gm, ctx, m)
        from ...collectives.relay import RegionSpec, register_region, relay_region
        nd = m.anchor
        x, hx, params = nd.args[0], nd.args[1], list(nd.args[2])
        hs = list(hx) if isinstance(hx, (list, tuple)) else [hx]
        sub = fx.Graph()
        ph_x = sub.placeholder("x")
        ph_w = [sub.placeholder(f"w{i}") for i in range(len(params))]
        ph_h = [sub.placeholder(f"state_{i}") for i in range(len(hs))]
        h_arg = tuple(ph_h) if isinstance(hx, (list, tuple)) else ph_h[0]
        call = sub.call_function(nd.target, (ph_x, h_arg, ph_w) + tuple(nd.args[3:]),
                                 dict(nd.kwargs))
        outs = [sub.call_function(operator.getitem, (call, i)) for i in range(1 + len(hs))]
        sub.output(tuple(outs + outs[1:]))  # (the public outputs, then the finals)
        sub_gm = fx.GraphModule(torch.nn.Module(), sub)
        vals = nd.meta.get("example_value")
        metas = [(tuple(v.shape), v.dtype) for v in vals]
        n_pub = len(metas)
        spec = RegionSpec(sub_gm, roots=list(range(1 + len(params), 1 + len(params) + len(hs))),
                          finals=list(range(n_pub, n_pub + len(hs))),
                          out_meta=metas + metas[1:], where=source_line(nd) or nd.name,
                          random=_draws_random(nd), cuda=_cuda_devices([x, *params, *hs]),
                          autocast=_autocast_at(nd))
        key = register_region(spec)
        g = gm.graph
        with g.inserting_before(nd), ctx.provenance(gm, m, nd):
            r = g.call_function(relay_region, ([x, *params, *hs], key, ctx.group_name))
            r.meta["example_value"] = list(vals) + list(vals[1:]) + [h.meta.get(
                "example_value") for h in hs]
            r.meta["spcompile_placement"] = Replicate()
        seq = 1 if nd.args[8] else 0
        for u in list(nd.users):
            i = u.args[1]
            with g.inserting_before(u):
                gi = g.call_function(operator.getitem, (r, i))
                gi.meta["example_value"] = u.meta.get("example_value")
                if i == 0:
                    gi.meta["spcompile_placement"] = Shard(seq)
                    new = gi
                else:  # the final state: the last rank's
                    gi.meta["spcompile_placement"] = Replicate()
                    new = g.call_function(_last_ranks, (gi, ctx.group_name))
                    new.meta["example_value"] = u.meta.get("example_value")
                    new.meta["spcompile_placement"] = Replicate()
            u.replace_all_uses_with(new)
            g.erase_node(u)
        g.erase_node(nd)
        from ..detect import redetect
        redetect(gm, ctx)


    def _rewrite_bidirectional(self, gm: fx.GraphModule, ctx: Ctx, m: Match) -> None:
        from ...collectives.relay import RegionSpec, register_region, relay_region
        from ..graph_utils import set_meta
        nd = m.anchor
        x, hx, params = nd.args[0], nd.args[1], list(nd.args[2])
        has_b, layers, dropout, train, _, batch_first = nd.args[3:9]
        hs = list(hx) if isinstance(hx, (list, tuple)) else [hx]
        k = len(params) // (2 * layers)  # weights per layer and direction
        seq = 1 if batch_first else 0
        vals = nd.meta.get("example_value")
        g = gm.graph
        finals: List[List[fx.Node]] = [[] for _ in hs]
        cur = x

        def mk(fn, args, placement):
            n = g.call_function(fn, tuple(args))
            set_meta(n)
            n.meta["spcompile_placement"] = placement
            return n

        with g.inserting_before(nd), ctx.provenance(gm, m, nd):
            for layer in range(layers):
                outs = []
                for d in (0, 1):
                    i = 2 * layer + d
                    w = params[i * k:(i + 1) * k]
                    h_in = [mk(operator.getitem, (h, slice(i, i + 1)), Replicate()) for h in hs]
                    sub = fx.Graph()
                    ph_x = sub.placeholder("x")
                    ph_w = [sub.placeholder(f"w{j}") for j in range(len(w))]
                    ph_h = [sub.placeholder(f"state_{j}") for j in range(len(hs))]
                    xin = sub.call_function(torch.flip, (ph_x, [seq])) if d else ph_x
                    call = sub.call_function(nd.target, (
                        xin, tuple(ph_h) if isinstance(hx, (list, tuple)) else ph_h[0], ph_w,
                        has_b, 1, 0.0, train, False, batch_first))
                    o = sub.call_function(operator.getitem, (call, 0))
                    if d:
                        o = sub.call_function(torch.flip, (o, [seq]))
                    fin = [sub.call_function(operator.getitem, (call, 1 + j))
                           for j in range(len(hs))]
                    sub.output(tuple([o] + fin + fin))
                    # (metas: this direction's part of the layer's output and states)
                    o_meta = vals[0][..., :vals[0].shape[-1] // 2]
                    f_meta = [v[i:i + 1] for v in vals[1:]]
                    metas = [o_meta] + f_meta
                    spec = RegionSpec(fx.GraphModule(torch.nn.Module(), sub),
                                      roots=list(range(1 + len(w), 1 + len(w) + len(hs))),
                                      finals=list(range(len(metas), len(metas) + len(hs))),
                                      out_meta=[(tuple(v.shape), v.dtype) for v in metas + f_meta],
                                      where=source_line(nd) or nd.name, reverse=bool(d),
                                      random=False, cuda=_cuda_devices([x, *params, *hs]),
                                      autocast=_autocast_at(nd))
                    key = register_region(spec)
                    r = g.call_function(relay_region, ([cur, *w, *h_in], key, ctx.group_name))
                    r.meta["example_value"] = metas + f_meta + [tensor_val(h) for h in h_in]
                    r.meta["spcompile_placement"] = Replicate()
                    og = g.call_function(operator.getitem, (r, 0))
                    og.meta["example_value"] = o_meta
                    og.meta["spcompile_placement"] = Shard(seq)
                    outs.append(og)
                    for j in range(len(hs)):
                        fg = g.call_function(operator.getitem, (r, 1 + j))
                        fg.meta["example_value"] = f_meta[j]
                        fg.meta["spcompile_placement"] = Replicate()
                        finals[j].append(mk(_last_ranks, (fg, ctx.group_name, bool(d)),
                                            Replicate()))
                cur = mk(torch.cat, (outs, -1), Shard(seq))
                if dropout and train and layer < layers - 1:
                    cur = mk(torch.nn.functional.dropout, (cur, float(dropout), True),
                             Shard(seq))
            states = [mk(torch.cat, (f, 0), Replicate()) for f in finals]
        for u in list(nd.users):
            i = u.args[1]
            u.replace_all_uses_with(cur if i == 0 else states[i - 1])
            g.erase_node(u)
        g.erase_node(nd)
        from ..detect import redetect
        redetect(gm, ctx)


_RNN_NAMES = {"gru": "nn.GRU", "lstm": "nn.LSTM", "rnn_tanh": "nn.RNN", "rnn_relu": "nn.RNN"}


_RANDOM = {"dropout", "dropout_", "feature_dropout", "alpha_dropout", "feature_alpha_dropout",
           "dropout1d", "dropout2d", "dropout3d", "native_dropout", "rand", "randn", "randint",
           "rand_like", "randn_like", "randint_like", "bernoulli", "bernoulli_", "multinomial",
           "normal", "normal_", "uniform_", "randperm", "rrelu", "poisson", "exponential_"}


def _draws_random(x: fx.Node) -> bool:
    """Does ``x`` draw random numbers (dropout, ``rand``; a fused RNN's inter-layer dropout)?"""
    name = canonical_name(x)
    if name in _RNN:
        return len(x.args) > 6 and bool(x.args[5]) and bool(x.args[6])
    return name in _RANDOM


def _cuda_devices(nodes) -> List[int]:
    out = []
    for a in nodes:
        v = tensor_val(a)
        if v is not None and v.device.type == "cuda":
            i = v.device.index or 0
            if i not in out:
                out.append(i)
    return out
