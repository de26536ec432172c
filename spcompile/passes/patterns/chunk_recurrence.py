"""Chunked SSD's inter-chunk recurrence (Mamba2's ``ssd_minimal``, chunked GLA/RetNet forms).

Chunked scan code splits the sequence into chunks, computes each chunk's own state, and then
runs the recurrence *across chunks* as a small quadratic form over the chunk axis::

    states      = cat([initial_states, states], dim=1)            # [b, c+1, h, p, n]
    decay_chunk = exp(segsum(F.pad(A_cumsum[..., -1], (1, 0))))   # [b, h, c+1, c+1]
    new_states  = einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    # or HF's einsum("bzch,bzhpn->bchpn", decay_chunk.transpose(1, 3), states), or HF's
    # (decay_chunk.transpose(1, 3)[..., None, None] * states[:, :, None]).sum(1)
    states      = new_states[:, :-1]        # the state entering each chunk
    final_state = new_states[:, -1]

With the chunk axis sharded, every rank runs exactly this on its own chunks, starting from its
own ``initial_states``. That is right for the chunks of a rank once its first slot holds the
state entering the rank, ``S_in(r)``, instead of ``initial_states``. The product is linear in
that slot, so the rewrite keeps the user's computation and adds the correction

    new_states += decay_chunk[..., :, 0:1] · (S_in(r) − slot₀)

where ``S_in`` comes from the cross-rank state hand-off (``exclusive_state_scan``, the strategy
the plan picks) of each rank's own total — the last row of its local result, minus the initial
state's share on ranks other than the first — decayed by the rank's total log decay
``sum(A_last)``. ``new_states[:, :-1]`` is then this rank's shard of the global entering states;
``new_states[:, -1]`` (the state after this rank's chunks) is the global final state on the last
rank only, so it is broadcast from there.

Checked by value on the example inputs: the Pair operand must be lower-triangular with
``D[z, z-1] = exp(a[z-1])`` and ``D[-1, 0] = exp(Σ a)`` for the padded chunk decays ``a``, the
prepended slot must be one step long, and the result may only be used through slices that drop
the last slot or pick it.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Set, Tuple

import torch
import torch.fx as fx

from ..graph_utils import ancestors, arg, canonical_name, evaluate, set_meta, shape
from ..pipeline import Ctx
from ..sequence_axis import Pair, Replicate, Shard
from .base import FailedMatch, Found, Match, Pattern

_LAYOUT = {"permute", "reshape", "view", "contiguous", "clone", "flatten", "unflatten"}
_ZEROS = {"zeros_like", "zeros", "new_zeros"}
_STRATEGIES = ("allgather", "allscan", "ring")


def _is_view_index(n: fx.Node) -> bool:
    """``x[..., None]``, ``x[:, :, None]``: a getitem that only inserts axes."""
    if canonical_name(n) != "getitem" or not isinstance(n.args[0], fx.Node):
        return False
    idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
    return all(i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None))
               for i in idx)


def _through_layout_back(n: fx.Node) -> Tuple[fx.Node, List[fx.Node]]:
    chain = []
    while (canonical_name(n) in _LAYOUT or _is_view_index(n)) and isinstance(n.args[0], fx.Node):
        chain.append(n)
        n = n.args[0]
    return n, chain


def _chunk_carry(M, D, R, a, zero_init: bool, strategy: str, group_name: str,
                 blocks: Optional[int]):
    """The rewrite's runtime: M + D[..., :, :1] · (S_in − R[..., :1, :]) (see the module doc).
    M = D @ R: [*batch, c+1, F]; D: [*batch, c+1, c+1]; a: [*batch, c] (per-chunk log decays)."""
    from ...collectives import exclusive_state_scan, group_rank
    r = group_rank(group_name)
    batch = M.shape[:-2]
    F_ = M.shape[-1]
    nb = 1
    for s in batch:
        nb *= int(s)
    R0 = R[..., 0:1, :]
    own = M[..., -1, :]  # this rank's state after its chunks, from its slot 0
    not_first = 0.0 if r == 0 else 1.0  # a number, not a branch: one graph on every rank
    if not zero_init:
        own = own - not_first * (D[..., -1, 0:1] * R0[..., 0, :])  # without the initial share
    tot = a.sum(-1)  # [*batch]
    sdt = torch.float64 if M.dtype == torch.float64 else torch.float32
    s_in = exclusive_state_scan(own.reshape(1, nb, F_, 1).to(sdt),
                                tot.reshape(1, nb).to(sdt), strategy=strategy,
                                group=group_name, blocks=blocks)
    s_in = s_in.reshape(*batch, 1, F_).to(M.dtype)
    delta = s_in if zero_init else s_in - not_first * R0
    return M + D[..., :, 0:1] * delta


def _chunk_carry_mulsum(S, Dx, Rx, tot_x, k: int, j: int, zero_init: bool, strategy: str,
                        group_name: str, blocks: Optional[int]):
    """The same correction for ``S = (Dx * Rx).sum(k)`` (HF's spelling): ``k`` is the source
    chunk axis of the product, ``j`` the target chunk axis (where ``Rx`` has size 1); ``tot_x``
    is the rank's total log decay laid out like ``Dx``."""
    from ...collectives import exclusive_state_scan, group_rank
    r = group_rank(group_name)
    jr = j - 1 if k < j else j  # the target axis in S
    R0 = Rx.narrow(k, 0, 1)
    own = S.narrow(jr, S.shape[jr] - 1, 1)  # this rank's state after its chunks
    corner = Dx.narrow(j, Dx.shape[j] - 1, 1).narrow(k, 0, 1)
    not_first = 0.0 if r == 0 else 1.0  # a number, not a branch: one graph on every rank
    if not zero_init:
        own = own - not_first * (corner * R0).sum(k)
    tot = tot_x.narrow(j, tot_x.shape[j] - 1, 1).narrow(k, 0, 1).sum(k)
    tot = tot.expand(own.shape)
    sdt = torch.float64 if S.dtype == torch.float64 else torch.float32
    n = own.numel()
    s_in = exclusive_state_scan(own.reshape(1, n, 1, 1).to(sdt), tot.reshape(1, n).to(sdt),
                                strategy=strategy, group=group_name, blocks=blocks)
    s_in = s_in.reshape(own.shape).to(S.dtype).unsqueeze(k)
    delta = s_in if zero_init else s_in - not_first * R0
    return S + (Dx.narrow(k, 0, 1) * delta).sum(k)


def _from_last_rank(x, group_name: str):
    """The value of the last rank on every rank (sum of a one-hot contribution)."""
    from ...collectives import group_rank, group_size
    keep = 1.0 if group_rank(group_name) == group_size(group_name) - 1 else 0.0
    return torch.ops.spcompile.allreduce(x * keep, "sum", group_name)


class ChunkStateRecurrence(Pattern):
    name = "chunk_state_recurrence"
    kind = "linear_scan"

    def find(self, gm: fx.GraphModule, ctx: Ctx) -> Iterable[Found]:
        for M in list(ctx.mixing):
            if canonical_name(M) == "matmul" and isinstance(M.args[0], fx.Node):
                found = self._match(gm, ctx, M)
            elif canonical_name(M) == "mul" and len(M.users) == 1 and \
                    canonical_name(next(iter(M.users))) == "sum":
                found = self._match_mulsum(gm, ctx, M, next(iter(M.users)))
            else:
                continue
            if found is not None:
                yield found

    def _common(self, gm, ctx: Ctx, anchor: fx.Node, C: fx.Node, D: fx.Node):
        """Checks shared by both forms: the cat, its initial state, the padded decays under D.
        → (covered nodes, zero_init, pad input a) or a FailedMatch."""
        pl = ctx.placements
        tensors = C.args[0]
        cdim = arg(C, 1, "dim", 0) % len(shape(C))
        if len(tensors) != 2:
            return FailedMatch(self.name, anchor, "the concatenation has more than two parts")
        init, U = tensors
        if not (isinstance(pl.get(U), Shard) and pl.get(U).dim == cdim):
            return FailedMatch(self.name, anchor, "the chunk states are not sharded on the cat axis")
        if shape(init)[cdim] != 1:
            return FailedMatch(self.name, anchor, "the prepended initial state is not one chunk long")
        covered: Set[fx.Node] = {C}
        zero_init = canonical_name(init) in _ZEROS
        if zero_init:
            src = init.args[0] if init.args and isinstance(init.args[0], fx.Node) else None
            if src is not None and src in ctx.mixing and len(src.users) == 1:
                covered.add(src)  # zeros_like(states[:, :1]): only its shape is read
        elif not isinstance(pl.get(init), Replicate):
            return FailedMatch(self.name, anchor, "the initial state is neither zeros nor replicated")
        pads = [n for n in ancestors(D) | {D} if canonical_name(n) == "pad" and n in ctx.mixing]
        # the nearest pads only: an earlier layer's (upstream through the residual stream of a
        # stacked model) is an ancestor of this layer's own
        up = set().union(*(ancestors(n) for n in pads)) if pads else set()
        pads = [n for n in pads if n not in up]
        if len(pads) != 1:
            return FailedMatch(self.name, anchor, "no single padded chunk decay under the decay matrix")
        pad = pads[0]
        a = pad.args[0]
        amounts = list(arg(pad, 1, "pad"))
        if amounts[:2] != [1, 0] or any(x != 0 for x in amounts[2:]) or \
                not isinstance(pl.get(a), Shard) or pl.get(a).dim != len(shape(a)) - 1:
            return FailedMatch(self.name, anchor, "the chunk decay is not padded by one in front")
        cums = [n for n in ancestors(D) if n in ctx.mixing and canonical_name(n) == "cumsum"
                and pad in (ancestors(n) | {n})]
        covered |= {pad, *cums}
        return covered, zero_init, a

    def _match_mulsum(self, gm, ctx: Ctx, Mu: fx.Node, S: fx.Node) -> Optional[Found]:
        """``(Dx * Rx).sum(k)`` with ``Rx`` a view of ``cat([init, states])`` (HF's Mamba2)."""
        x, y = Mu.args[:2]
        if not (isinstance(x, fx.Node) and isinstance(y, fx.Node)):
            return None
        cx, cy = _through_layout_back(x)[0], _through_layout_back(y)[0]
        if canonical_name(cy) == "cat" and cy in ctx.mixing:
            Dx, Rx, C = x, y, cy
        elif canonical_name(cx) == "cat" and cx in ctx.mixing:
            Dx, Rx, C = y, x, cx
        else:
            return None
        D, dchain = _through_layout_back(Dx)
        sM, sD, sR = shape(Mu), shape(Dx), shape(Rx)
        k = arg(S, 1, "dim")
        if isinstance(k, (list, tuple)) and len(k) == 1:
            k = k[0]
        if not isinstance(k, int) or arg(S, 2, "keepdim", False) or len(sD) != len(sM) or \
                len(sR) != len(sM) or shape(D) is None or len(shape(D)) < 2:
            return FailedMatch(self.name, S, "not a sum over one axis of a broadcast product")
        k %= len(sM)
        n = shape(D)[-1]
        js = [d for d in range(len(sM)) if d != k and sR[d] == 1 and sD[d] == n]
        if sD[k] != n or sR[k] != n or len(js) != 1:
            return FailedMatch(self.name, S, "the product does not pair the chunk axes")
        got = self._common(gm, ctx, S, C, D)
        if isinstance(got, FailedMatch):
            return got
        covered, zero_init, a = got
        outs, finals, bad = self._users(ctx, S)
        if bad is not None:
            return FailedMatch(self.name, S, bad)
        try:
            Dv, av, Rv = (t.double() for t in evaluate(gm, [D, a, C], ctx.example_inputs,
                                                        ctx.values))
        except Exception as e:  # noqa: BLE001
            return FailedMatch(self.name, S, f"could not evaluate the example values ({e})")
        why = self._check_decay(Dv, av)
        if why:
            return FailedMatch(self.name, S, why)
        nb = 1
        for s_ in shape(D)[:-2]:
            nb *= int(s_)
        return Match(self.kind, self.name, S, bindings={"D": D, "Dx": Dx, "Rx": Rx, "a": a},
                     nodes=covered | {Mu, S} | set(outs) | set(finals),
                     info={"decay": "scalar", "heads": nb, "d_k": max(1, Rv.numel() // (n * nb)),
                           "d_v": 1, "zero_init": zero_init,
                           "_finals": finals, "_form": "mulsum", "_k": k, "_j": js[0],
                           "_dchain": dchain,
                           "form": "(exp(segsum(pad(a)))ᵀ[..., None, None] * cat([init, states])"
                                   "[:, :, None]).sum(1)"})

    def _match(self, gm, ctx: Ctx, M: fx.Node) -> Optional[Found]:
        pl = ctx.placements
        D, R = M.args[0], M.args[1]
        sD, sR = shape(D), shape(R)
        if sD is None or sR is None or len(sD) < 2:
            return None
        nd = len(sD)
        pD = pl.get(D)
        # the decay matrix: a T×T value on its last two axes, or (HF's segment_sum: expand,
        # masks, cumsum over the rows) a square matrix the analysis saw as rows of the chunk
        # axis; either way its values are checked below
        if isinstance(pD, Pair):
            if not (pD.d0 == nd - 2 and pD.d1 == nd - 1):
                return None
        elif sD[-1] != sD[-2] or sR[-2] != sD[-1]:
            return None
        C, _chain = _through_layout_back(R)
        if canonical_name(C) != "cat" or C not in ctx.mixing:
            return None  # a T×T value times values, but not a chunk recurrence
        got = self._common(gm, ctx, M, C, D)
        if isinstance(got, FailedMatch):
            return got
        covered, zero_init, a = got
        covered.add(M)
        # uses of the result: layout ops, then slices that drop or pick the last slot
        outs, finals, bad = self._users(ctx, M)
        if bad is not None:
            return FailedMatch(self.name, M, bad)
        covered |= set(outs) | set(finals)
        try:
            Dv, av, Rv = (x.double() for x in evaluate(gm, [D, a, R], ctx.example_inputs,
                                                        ctx.values))
        except Exception as e:  # noqa: BLE001
            return FailedMatch(self.name, M, f"could not evaluate the example values ({e})")
        why = self._check_decay(Dv, av) or (None if Rv.shape[-2] == Dv.shape[-1] else
                                            "the states do not line up with the decay matrix")
        if why:
            return FailedMatch(self.name, M, why)
        nb = 1
        for s_ in sD[:-2]:
            nb *= int(s_)
        return Match(self.kind, self.name, M, bindings={"D": D, "R": R, "a": a},
                     nodes=covered,
                     info={"decay": "scalar", "heads": nb, "d_k": int(sR[-1]), "d_v": 1,
                           "zero_init": zero_init, "_finals": finals, "_form": "matmul",
                           "form": "exp(segsum(pad(a))) @ cat([init, states])"})

    @staticmethod
    def _users(ctx: Ctx, M: fx.Node):
        """Slices of the result: [..., :-1, ...] (entering states) and [..., -1, ...] (final)."""
        outs, finals = [], []
        todo = list(M.users)
        while todo:
            u = todo.pop()
            name = canonical_name(u)
            if name in _LAYOUT:
                todo.extend(u.users)
                continue
            if name == "getitem" and u in ctx.mixing:
                idx = u.args[1] if isinstance(u.args[1], tuple) else (u.args[1],)
                p = ctx.placements.get(u.args[0])
                d = p.dim if isinstance(p, Shard) else None
                if d is not None and d < len(idx) and all(
                        isinstance(i, slice) and i == slice(None) for i in idx[:d]):
                    i = idx[d]
                    if isinstance(i, slice) and i.start in (None, 0) and i.stop == -1 \
                            and i.step in (None, 1):
                        outs.append(u)
                        continue
                    if isinstance(i, int) and i == -1:
                        finals.append(u)
                        continue
            return outs, finals, (f"the recurrence's result is used by {name} ({u.name}), not "
                                  f"only through [:, :-1] / [:, -1] slices of the chunk axis")
        if not outs and not finals:
            return outs, finals, "the recurrence's result is unused"
        return outs, finals, None

    @staticmethod
    def _check_decay(D: torch.Tensor, a: torch.Tensor) -> Optional[str]:
        """D must be exp(segsum) of the chunk decays padded with one leading zero."""
        n = D.shape[-1]
        if a.shape[-1] != n - 1 or tuple(a.shape[:-1]) != tuple(D.shape[:-2]):
            return (f"shapes do not line up: decay matrix {tuple(D.shape)}, chunk decays "
                    f"{tuple(a.shape)}")
        upper = torch.ones(n, n, dtype=torch.bool).triu(1)
        if n > 1 and D[..., upper].abs().max() > 1e-6 * max(1.0, D.abs().max().item()):
            return "the decay matrix is not lower-triangular"
        if (torch.diagonal(D, dim1=-2, dim2=-1) - 1).abs().max() > 1e-4:
            return "the decay matrix's diagonal is not one"
        if n > 1:
            sub = torch.diagonal(D, offset=-1, dim1=-2, dim2=-1)
            if (sub - a.exp()).abs().max() > 1e-4 * max(1.0, sub.abs().max().item()):
                return "the decay matrix's steps are not exp(chunk decays)"
            corner = D[..., -1, 0]
            if (corner - a.sum(-1).exp()).abs().max() > 1e-4 * max(1.0, corner.abs().max().item()):
                return "the decay matrix is not exp(segsum) of the chunk decays"
        return None

    @staticmethod
    def _decay_total_like_dx(g: fx.Graph, m: Match) -> fx.Node:
        """The rank's total log decay Σa, broadcast to the decay matrix and sent through the
        same layout ops that turned the decay matrix into the product's operand."""
        D, a = m.bindings["D"], m.bindings["a"]
        tot = g.call_function(torch.sum, (a, -1))
        set_meta(tot)
        tot = g.call_function(torch.reshape, (tot, tuple(shape(a)[:-1]) + (1, 1)))
        set_meta(tot)
        tot = g.call_function(torch.Tensor.expand, (tot, tuple(shape(D))))
        set_meta(tot)
        for n in reversed(m.info["_dchain"]):  # D → ... → Dx, replayed on tot
            prev = n.args[0]
            tot = g.node_copy(n, lambda x, prev=prev, tot=tot: tot if x is prev else x)
            set_meta(tot)
        return tot

    def rewrite(self, gm: fx.GraphModule, ctx: Ctx, m: Match) -> None:
        if ctx.world_size == 1:
            return
        M = m.anchor
        strategy = m.strategy if m.strategy in _STRATEGIES else "allgather"
        # the covered ops stay in the graph and now compute this rank's part: tell the later
        # analyses (fallback) they are sharded, not mixing
        for n in m.nodes:
            p = ctx.placements.get(n)
            dim = getattr(p, "dim", None)
            if n is M:
                dim = len(shape(M)) - 2
            elif dim is None:
                src = next((a for a in n.all_input_nodes
                            if isinstance(ctx.placements.get(a), Shard)), None)
                dim = ctx.placements[src].dim if src is not None else None
            if dim is not None:
                n.meta["spcompile_placement"] = Shard(dim)
        g = gm.graph
        if m.info["_form"] == "matmul":
            with g.inserting_after(M), ctx.provenance(gm, m, M):
                new = g.call_function(_chunk_carry, (M, m.bindings["D"], m.bindings["R"],
                                                     m.bindings["a"], m.info["zero_init"],
                                                     strategy, ctx.group_name,
                                                     m.info.get("blocks")))
                set_meta(new)
        else:
            with g.inserting_before(M.next), ctx.provenance(gm, m, M):  # in order, after M
                tot_x = self._decay_total_like_dx(g, m)
                new = g.call_function(_chunk_carry_mulsum, (
                    M, m.bindings["Dx"], m.bindings["Rx"], tot_x, m.info["_k"], m.info["_j"],
                    m.info["zero_init"], strategy, ctx.group_name, m.info.get("blocks")))
                set_meta(new)
        new.meta["spcompile_placement"] = ctx.placements.get(M)
        M.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        for f in m.info["_finals"]:
            with g.inserting_after(f), ctx.provenance(gm, m, f):
                b = g.call_function(_from_last_rank, (f, ctx.group_name))
                set_meta(b)
            b.meta["spcompile_placement"] = Replicate()
            f.replace_all_uses_with(b, delete_user_cb=lambda u: u is not b)
