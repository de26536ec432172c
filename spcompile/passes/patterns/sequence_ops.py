"""The smaller families: everything else that crosses the sequence axis in model-zoo code.

| family        | what it looks like in user code                          | sharded form            |
|---------------|----------------------------------------------------------|-------------------------|
| attention     | ``F.scaled_dot_product_attention`` (causal or not, GQA)  | ``sp_attention``        |
| causal_conv   | ``conv1d(x, w, padding=k-1)[..., :T]``, ``conv1d(pad(x, (k-1, 0)), w)`` | halo of k-1 tokens |
| token_shift   | ``F.pad(x, (0, 0, s, -s))``, ``cat([zeros, x[:, :-s]], 1)``, left shifts | halo of s tokens |
| roll          | ``torch.roll(x, s, dims=1)``                             | halo on a ring          |
| windows       | ``F.pad(x, (0, 0, w - 1, 0)).unfold(1, w, 1)``           | halos each way          |
| flip          | ``x.flip(1)``, ``torch.fliplr(x)`` (bidirectional scans) | the mirror rank's shard |
| softmax       | ``softmax(x, dim=seq)`` (AFT, attention pooling)         | global max and sum      |
| positions     | ``torch.arange(T)``, ``table[:T]`` (RoPE caches, pe)     | offset by rank·T_local  |
| reduction     | ``sum``/``mean``/``amax``/``amin`` over the sequence     | local + all-reduce      |
| cross_entropy | ``F.cross_entropy(logits, target)`` (mean)               | sums + all-reduce       |
| prefix scans  | ``cumsum``/``cumprod``/``logcumsumexp``/``cummax``/``cummin`` along the sequence | local + exclusive scan of rank totals |
| leading rows  | ``scan(cat([h0, x]))[:, 1:]``, ``F.pad(a, (0, 0, 1, 0))`` (minGRU paper form) | scans get the earlier ranks' totals after the rows |

Each ``find`` looks at ops the sequence_axis pass recorded as mixing (or, for positions, at the
creation ops that read the local length) and checks its preconditions; a near miss says which.
At P = 1 every family still matches (``explain`` shows it) but there is nothing to rewrite.
"""
from __future__ import annotations

import operator
from typing import Iterable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from ... import ops as spops
from ..graph_utils import (arg, bind_args, canonical_name, evaluate, mutates, one_entry_index,
                           set_meta, shape, tensor_val, val)
from ..pipeline import Ctx, source_line
from ..sequence_axis import (ONE_TOKEN_SLICE, Pair, Replicate, Shard, flip_dims,
                             positions_form)
from .base import FailedMatch, Found, Match, Pattern
from .linear_attention import user_inputs_reached


def _call(g: fx.Graph, fn, args, kwargs=None) -> fx.Node:
    n = g.call_function(fn, tuple(args), kwargs or {})
    set_meta(n)
    return n


def _mixing(ctx: Ctx, *names: str):
    for node, reason in list(ctx.mixing.items()):
        if canonical_name(node) in names:
            yield node, reason


def _finish(ctx: Ctx, anchor: fx.Node, new: fx.Node, placement) -> None:
    new.meta["spcompile_placement"] = placement
    anchor.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    anchor.meta["spcompile_replaced_by"] = new  # later matches bound to it read ``new``


def _replace_call(gm, ctx: Ctx, m: Match, fn, args, placement) -> None:
    """The common rewrite: ``fn(*args)`` before the anchor (with the match's provenance), the
    anchor's uses redirected to it; nothing at P = 1."""
    if ctx.world_size == 1:
        return
    g = gm.graph
    with g.inserting_before(m.anchor), ctx.provenance(gm, m, m.anchor):
        out = _call(g, fn, args)
    _finish(ctx, m.anchor, out, placement)


# ------------------------------------------------------------------ softmax attention
def _autocast_like_sdpa(q, k, v):
    """Under ``torch.autocast`` SDPA runs in the autocast dtype (it casts q, k, v itself: fp32
    RoPE'd q, k with bf16 v are fine eagerly); the sequence-parallel op is a custom op that
    autocast does not see, so the casts are made here, as SDPA would."""
    dev = q.device.type
    try:
        on = torch.is_autocast_enabled(dev)
        dt = torch.get_autocast_dtype(dev)
    except (TypeError, AttributeError, RuntimeError):  # older torch: the CUDA-only spelling
        on = dev == "cuda" and torch.is_autocast_enabled()
        dt = torch.get_autocast_gpu_dtype() if on else None
    if not on or dt is None:
        return q, k, v
    return tuple(t.to(dt) if t.is_floating_point() and t.dtype != dt else t for t in (q, k, v))


def _sdpa_sp(q, k, v, causal: bool, scale: Optional[float], enable_gqa: bool, strategy: str,
             group_name: str):
    from ...collectives import sp_attention
    q, k, v = _autocast_like_sdpa(q, k, v)
    bar = torch.ops.spcompile.layout_barrier  # pins the layouts of the gradients (see ops.py)
    o = sp_attention(bar(q), bar(k), bar(v), causal=causal, scale=scale, strategy=strategy,
                     group=group_name, enable_gqa=enable_gqa)
    return bar(o)


class SDPAttention(Pattern):
    name = "sdpa"
    kind = "attention"

    def find(self, gm, ctx: Ctx) -> Iterable[Found]:
        pl = ctx.placements
        for node, _ in _mixing(ctx, "sdpa"):
            q, k, v = node.args[:3]
            mask = arg(node, 3, "attn_mask")
            dropout = arg(node, 4, "dropout_p", 0.0)
            causal = bool(arg(node, 5, "is_causal", False))
            scale = node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)
            gqa = bool(node.kwargs.get("enable_gqa", False))
            shapes = [shape(x) for x in (q, k, v)]
            rq = self._replicated_queries(gm, ctx, node, q, k, v, mask, dropout, causal,
                                          scale, gqa, shapes)
            if rq is not None:
                yield rq
                continue
            if any(s is None or len(s) != 4 for s in shapes):
                yield FailedMatch(self.name, node, "attention inputs are not [B, H, T, D]")
                continue
            if not all(isinstance(pl.get(x), Shard) and pl.get(x).dim == 2 for x in (q, k, v)):
                yield FailedMatch(self.name, node, "q, k, v are not sharded on dim -2")
                continue
            if dropout:
                yield FailedMatch(self.name, node, "attention dropout is not supported sharded")
                continue
            if mask is not None:
                m = evaluate(gm, [mask], ctx.example_inputs, ctx.values)[0]
                T = shapes[0][2]
                tril = torch.ones(T, T, dtype=torch.bool).tril()
                # a mask that depends on the data (a padding mask) is never read by value
                data = user_inputs_reached(mask, set())
                pm = pl.get(mask)
                general = m.dim() >= 2 and tuple(m.shape[-2:]) == (T, T) and (
                    (isinstance(pm, Pair) and (pm.d0, pm.d1) == (m.dim() - 2, m.dim() - 1)) or
                    (isinstance(pm, Shard) and pm.dim == m.dim() - 1) or
                    isinstance(pm, Replicate))
                if not data and m.dtype == torch.bool and m.shape[-2:] == (T, T) and bool(
                        (m == tril).all()):
                    causal = True
                elif not data and m.dtype != torch.bool and m.shape[-2:] == (T, T) and bool(
                        (torch.isneginf(m) == ~tril).all()) and bool((m[..., tril] == 0).all()):
                    causal = True
                elif general:
                    # any other T×T mask (ALiBi bias, sliding window, causal + padding): K/V
                    # all-gathered, the mask's rows for this rank's queries recomputed at the
                    # global length
                    B, H, T, D = shapes[0]
                    yield Match(self.kind, self.name, node, bindings={"q": q, "k": k, "v": v,
                                                                      "mask": mask},
                                info={"causal": False, "scale": scale, "gqa": gqa or
                                      shapes[1][1] != H, "B": B, "H": H, "H_kv": shapes[1][1],
                                      "D": D, "mask": "rows recomputed",
                                      "only_strategy": "kv_allgather"})
                    continue
                else:
                    yield FailedMatch(self.name, node, "attention mask is not a causal mask")
                    continue
            B, H, T, D = shapes[0]
            yield Match(self.kind, self.name, node, bindings={"q": q, "k": k, "v": v},
                        info={"causal": causal, "scale": scale, "gqa": gqa or
                              shapes[1][1] != H, "B": B, "H": H, "H_kv": shapes[1][1], "D": D})

    def _replicated_queries(self, gm, ctx: Ctx, node, q, k, v, mask, dropout, causal, scale,
                            gqa, shapes) -> Optional[Found]:
        """Queries every rank holds (Perceiver latents, a learned pooling query, a Q-Former)
        over keys and values sharded along the sequence: → the match (or near miss) of that
        form, None for other placements."""
        pl = ctx.placements
        if not isinstance(pl.get(q), Replicate) or any(s is None for s in shapes) or \
                len(shapes[0]) < 3:
            return None
        nd = len(shapes[1])
        if not all(isinstance(pl.get(x), Shard) and pl.get(x).dim == nd - 2 and
                   not (pl.get(x).merged or pl.get(x).rows or pl.get(x).order)
                   for x in (k, v)):
            return None
        if dropout or causal:
            return FailedMatch(self.name, node, "replicated queries over sharded keys with "
                                                "dropout or is_causal")
        if len(shapes[0]) != nd or (nd >= 4 and (shapes[1][-3] == 0 or
                                                  shapes[0][-3] % shapes[1][-3])):
            return FailedMatch(self.name, node, "replicated queries: query and key heads do "
                                                "not line up")
        if mask is not None:
            pm, sm = pl.get(mask), shape(mask)
            ok = sm is not None and ((isinstance(pm, Shard) and pm.dim == len(sm) - 1) or
                                     (isinstance(pm, Replicate) and sm[-1] == 1))
            if not ok:
                return FailedMatch(self.name, node, "replicated queries with a mask that is "
                                                    "not sharded along the keys")
        return Match(self.kind, "sdpa_replicated_queries", node,
                     bindings={"q": q, "k": k, "v": v, "mask": mask},
                     info={"causal": False, "scale": scale, "queries": "replicated",
                           "gqa": gqa, "only_strategy": "allreduce",
                           "form": "replicated queries: partial softmax combined by LSE"})

    def rewrite(self, gm, ctx: Ctx, m: Match) -> None:
        if ctx.world_size == 1:
            return
        g = gm.graph
        if m.info.get("queries") == "replicated":
            b = m.bindings
            _replace_call(gm, ctx, m, _sdpa_replicated_queries,
                          (b["q"], b["k"], b["v"], b["mask"], m.info["scale"], m.info["gqa"],
                           ctx.group_name), Replicate())
            return
        if "mask" in m.bindings:
            from ..fallback import _GlobalRebuild
            mask = m.bindings["mask"]
            with g.inserting_before(m.anchor), ctx.provenance(gm, m, m.anchor):
                rb = _GlobalRebuild(gm, ctx, f"the attention mask at {m.source}",
                                    "an SDPA attn_mask")
                k, v = rb.gather(m.bindings["k"], 2), rb.gather(m.bindings["v"], 2)
                full = rb(mask)
                Tg = ctx.seq_len * ctx.world_size
                if tuple(shape(full)[-2:]) != (Tg, Tg):
                    from ..fallback import SequenceParallelError
                    raise SequenceParallelError(
                        f"spcompile: the attention mask at {m.source} could not be rebuilt for "
                        f"the global sequence (shape {shape(full)}, want [..., {Tg}, {Tg}]): "
                        f"build it from the sequence length (arange(T), ones(T, T)) or from a "
                        f"sequence-shaped input.")
                rows = _call(g, _row_block, (full, len(shape(mask)) - 2, ctx.group_name))
                out = _call(g, F.scaled_dot_product_attention, (m.bindings["q"], k, v),
                            {"attn_mask": rows, "scale": m.info["scale"],
                             "enable_gqa": m.info["gqa"]})
            _finish(ctx, m.anchor, out, Shard(2))
            return
        with g.inserting_before(m.anchor), ctx.provenance(gm, m, m.anchor):
            out = _call(g, _sdpa_sp, (m.bindings["q"], m.bindings["k"], m.bindings["v"],
                                      m.info["causal"], m.info["scale"], m.info["gqa"],
                                      m.strategy, ctx.group_name))
        _finish(ctx, m.anchor, out, Shard(2))


def _sdpa_replicated_queries(q, k, v, mask, scale, gqa: bool, group_name: str):
    """SDPA of queries every rank holds over this rank's keys and values, combined over the
    ranks by the softmax's log-sum-exp (flash-decoding's combine): the global max, then the
    sums of the weights and of the weighted values (three all-reduces of ``[..., Lq, ·]``;
    no key or value leaves its rank)."""
    if k.dim() >= 3 and q.dim() == k.dim() and q.shape[-3] != k.shape[-3] and k.dim() >= 4:
        rep = q.shape[-3] // k.shape[-3]  # grouped-query attention (enable_gqa)
        k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    s = scale if scale is not None else q.shape[-1] ** -0.5
    ct = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scores = (q.to(ct) @ k.to(ct).transpose(-2, -1)) * s
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool \
            else scores + mask.to(ct)
    mx = spops.allreduce(scores.detach().amax(-1, keepdim=True), "max", group_name)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    w = torch.exp(scores - mx)
    den = spops.allreduce(w.sum(-1, keepdim=True), "sum", group_name)
    num = spops.allreduce(w @ v.to(ct), "sum", group_name)
    # a query whose keys are all masked out attends to nothing: 0, as torch's SDPA gives
    out = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)),
                      torch.zeros_like(num))
    return out.to(q.dtype)


def _row_block(x, dim: int, group_name: str):
    """This rank's rows (``dim``) of a global T×T value."""
    from ...collectives import group_rank, group_size
    n = x.shape[dim] // group_size(group_name)
    return x.narrow(dim, group_rank(group_name) * n, n)


# ------------------------------------------------------------------ halos
def _halo(x, width: int, dim: int, group_name: str):
    from ...collectives import halo_exchange
    return halo_exchange(x, width, dim=dim, group=group_name)


def _causal_conv1d(x, w, b, width: int, stride, dilation, groups: int, group_name: str):
    """conv1d over [halo | x] with no padding: the causal conv of this rank's tokens."""
    halo = _halo(x, width, -1, group_name) if group_name else x.new_zeros(
        *x.shape[:-1], width)
    return torch.ops.spcompile.layout_barrier(
        F.conv1d(torch.cat([halo, x], dim=-1), w, b, stride, 0, dilation, groups))



def _centred_conv1d(x, w, b, left: int, right: int, dilation, groups: int, group_name: str):
    """conv1d over [previous rank's last ``left`` | x | next rank's first ``right``] with no
    padding: a length-preserving convolution (Conformer's depthwise conv, ``padding='same'``)
    of this rank's tokens; zeros beyond the ends of the sequence, as the padding gives."""
    parts = [x]
    if left:
        parts.insert(0, _end_halo(x, left, -1, 0.0, group_name, False))
    if right:
        parts.append(_end_halo(x, right, -1, 0.0, group_name, True))
    return torch.ops.spcompile.layout_barrier(
        F.conv1d(torch.cat(parts, dim=-1), w, b, 1, 0, dilation, groups))


def _conv_params(node: fx.Node):
    stride = arg(node, 3, "stride", 1)
    padding = arg(node, 4, "padding", 0)
    dilation = arg(node, 5, "dilation", 1)
    groups = arg(node, 6, "groups", 1)
    one = lambda v: v[0] if isinstance(v, (list, tuple)) else v  # noqa: E731
    return one(stride), padding if isinstance(padding, str) else one(padding), one(dilation), groups


class CausalConv1d(Pattern):
    name = "causal_conv1d"
    kind = "halo"

    def find(self, gm, ctx: Ctx) -> Iterable[Found]:
        from ..fallback import SequenceParallelError, _length_constant
        pl, memo = ctx.placements, {}
        for node, _ in _mixing(ctx, "conv1d"):
            x, w = node.args[0], node.args[1]
            px = pl.get(x)
            if not (isinstance(px, Shard) and px.dim == len(shape(x)) - 1):
                yield FailedMatch(self.name, node, "conv1d input not sharded on its last dim")
                continue
            stride, padding, dilation, groups = _conv_params(node)
            k = shape(w)[-1]
            width = dilation * (k - 1)
            T = shape(x)[-1]
            if stride != 1:
                yield FailedMatch(self.name, node, "strided convolution along the sequence")
                continue
            bias = arg(node, 2, "bias")
            for t in (w, bias):
                if not isinstance(t, fx.Node):
                    continue
                if not isinstance(pl.get(t), Replicate) or _length_constant(t, ctx, memo):
                    raise SequenceParallelError(
                        f"spcompile: the convolution at {source_line(node) or node.name} has a "
                        f"kernel built from the sequence (from positions, or cut to the local "
                        f"length {ctx.seq_len}, kernel {k}): a long convolution whose kernel "
                        f"grows with the sequence (S4 / Hyena's convolution view) has no "
                        f"sharded form here. Compute it with an FFT (spcompile gathers the "
                        f"sequence around it), or run the layer on the whole sequence: "
                        f"spcompile.shard_sequence(layer(spcompile.gather_sequence(x, "
                        f"grad='reduce_scatter'))).")
            too_wide = bool(ctx.seq_len and width > ctx.seq_len)
            users = list(node.users)
            if too_wide and padding != "same" and 2 * padding != width:
                yield FailedMatch(self.name, node, f"the kernel reaches {width} tokens back, "
                                                   f"beyond the previous rank ({ctx.seq_len} "
                                                   f"tokens)")
                continue
            if padding == width and len(users) == 1 and canonical_name(users[0]) == "getitem" \
                    and self._is_head_slice(users[0], T):
                yield Match(self.kind, self.name, users[0],
                            bindings={"x": x, "w": w, "b": arg(node, 2, "bias")},
                            nodes={node, users[0]},
                            info={"width": width, "dilation": dilation, "groups": groups,
                                  "form": "padding=k-1 then [..., :T]"})
                continue
            src = x
            if padding == 0 and canonical_name(src) == "pad" and not too_wide:
                pads = arg(src, 1, "pad")
                if list(pads[:2]) == [width, 0] and all(p == 0 for p in pads[2:]):
                    inner = src.args[0]
                    yield Match(self.kind, self.name, node,
                                bindings={"x": inner, "w": w, "b": arg(node, 2, "bias")},
                                nodes={node, src},
                                info={"width": width, "dilation": dilation, "groups": groups,
                                      "form": "pad (k-1, 0) then conv"})
                    continue
            # a centred ("same") convolution: the output keeps the length, each side padded
            if padding == "same":
                left = width // 2
                two = (left, width - left)
            elif isinstance(padding, int) and 2 * padding == width:
                two = (padding, padding)
            else:
                two = None
            inner = x
            if padding == 0 and canonical_name(x) == "pad":
                pads = arg(x, 1, "pad")
                if len(pads) >= 2 and sum(pads[:2]) == width and min(pads[:2]) >= 0 and \
                        all(p == 0 for p in pads[2:]) \
                        and (arg(x, 2, "mode", "constant") == "constant") and \
                        arg(x, 3, "value", None) in (None, 0, 0.0):
                    two, inner = (pads[0], pads[1]), x.args[0]
            if two is not None and ctx.seq_len and max(two) > ctx.seq_len:
                yield FailedMatch(self.name, node, f"the kernel reaches {max(two)} tokens into "
                                                   f"a neighbour, beyond its {ctx.seq_len}")
                continue
            if two is not None:
                yield Match(self.kind, "centred_conv1d", node,
                            bindings={"x": inner, "w": w, "b": arg(node, 2, "bias")},
                            nodes={node} | ({x} if inner is not x else set()),
                            info={"width": width, "left": two[0], "right": two[1],
                                  "dilation": dilation, "groups": groups,
                                  "form": f"centred: {two[0]} tokens before, {two[1]} after"})
                continue
            yield FailedMatch(self.name, node, f"conv1d is not causal nor centred "
                                               f"(padding={padding}, kernel {k}, output not "
                                               f"cut to the first T)")

    @staticmethod
    def _is_head_slice(node: fx.Node, T: int) -> bool:
        idx = node.args[1]
        if not isinstance(idx, tuple):
            idx = (idx,)
        last = idx[-1]
        if not isinstance(last, slice) or last.step not in (None, 1) or last.start not in (None,
                                                                                           0):
            return False
        rest_ok = all(i is Ellipsis or (isinstance(i, slice) and i == slice(None))
                      for i in idx[:-1])
        return rest_ok and last.stop in (T, -(shape(node.args[0])[-1] - T))

    def rewrite(self, gm, ctx: Ctx, m: Match) -> None:
        x = m.bindings["x"]
        if ctx.world_size == 1:
            return
        g = gm.graph
        conv = next(n for n in m.nodes if canonical_name(n) == "conv1d")
        stride, _, dilation, groups = _conv_params(conv)
        with g.inserting_before(m.anchor), ctx.provenance(gm, m, m.anchor):
            if "left" in m.info:
                out = _call(g, _centred_conv1d, (x, m.bindings["w"], m.bindings["b"],
                                                 m.info["left"], m.info["right"], dilation,
                                                 groups, ctx.group_name))
            else:
                out = _call(g, _causal_conv1d, (x, m.bindings["w"], m.bindings["b"],
                                                m.info["width"], stride, dilation, groups,
                                                ctx.group_name))
        _finish(ctx, m.anchor, out, Shard(len(shape(out)) - 1))


def _end_halo(x, s: int, dim: int, fill, group_name: str, from_next: bool):
    """The ``s`` tokens along ``dim`` a neighbour holds: the previous rank's last ones, or with
    ``from_next`` the next rank's first ones; ``fill`` (a number, or a block the user
    concatenated) beyond the end of the sequence, on rank 0 / the last rank. A where, not a
    branch: the halo is used on every rank, so its backward (a neighbour exchange) runs on
    every rank too."""
    from ...collectives import group_rank, group_size, halo_exchange, halo_from_next
    exchange = halo_from_next if from_next else halo_exchange
    halo = exchange(x, s, dim=dim, group=group_name or None)  # zeros at the chain's end
    if not isinstance(fill, torch.Tensor) and fill in (None, 0, 0.0, False):
        return halo
    at_end = not group_name or group_rank(group_name) == (
        group_size(group_name) - 1 if from_next else 0)
    fill = fill if isinstance(fill, torch.Tensor) else torch.full_like(halo, fill)
    return torch.where(torch.tensor(at_end, device=x.device), fill, halo)


def _shift_prev(x, s: int, dim: int, fill, group_name: str):
    """x shifted right by ``s`` along ``dim``: the previous rank's last ``s`` tokens, then its
    own but the last ``s``; on rank 0 ``fill`` in front (``F.pad(x, (s, -s))``: zeros;
    ``cat([bos, x[:, :-1]])``: the block)."""
    return torch.ops.spcompile.layout_barrier(torch.cat(
        [_end_halo(x, s, dim, fill, group_name, False), x.narrow(dim, 0, x.shape[dim] - s)],
        dim=dim))


def _shift_next(x, s: int, dim: int, fill, group_name: str):
    """x shifted left by ``s`` along ``dim``: its tokens after the first ``s``, then the next
    rank's first ``s`` (``fill`` on the last rank, as ``pad(x, (0, s), value=fill)[..., s:]``
    gives at the end of the sequence)."""
    return torch.ops.spcompile.layout_barrier(torch.cat(
        [x.narrow(dim, s, x.shape[dim] - s), _end_halo(x, s, dim, fill, group_name, True)],
        dim=dim))


def _roll(x, s: int, dim: int, group_name: str):
    """``torch.roll(x, s, dim)`` of the global sequence (``s`` in (-T_local, T_local)): a
    shift whose halo comes round a ring (rank 0 gets the last rank's tail)."""
    from ...collectives import halo_roll
    n = x.shape[dim]
    if s > 0:
        halo = halo_roll(x, s, dim=dim, group=group_name or None)
        out = torch.cat([halo, x.narrow(dim, 0, n - s)], dim=dim)
    else:
        halo = halo_roll(x, -s, dim=dim, from_next=True, group=group_name or None)
        out = torch.cat([x.narrow(dim, -s, n + s), halo], dim=dim)
    return torch.ops.spcompile.layout_barrier(out)


def _sliced_end(node, pl):
    """``x[..., :n - s, ...]`` (the head of a shard, all but its last ``s`` tokens) → ``(x, dim,
    s)``; ``x[..., s:, ...]`` (all but the first ``s``) → ``(x, dim, -s)``; else None. Only small
    shifts (``2 s < n``): a cut at half the shard or beyond (``x[:, :T // 2]``) reads as a
    length, not a shift."""
    if not isinstance(node, fx.Node) or canonical_name(node) != "getitem" or \
            not isinstance(node.args[0], fx.Node):
        return None
    x = node.args[0]
    px, sx = pl.get(x), shape(x)
    if not isinstance(px, Shard) or px.merged or px.order or sx is None:
        return None
    sl = _seq_slice(node, px.dim, len(sx))
    if sl is None or not all(v is None or isinstance(v, int) for v in sl):
        return None
    n = sx[px.dim]
    a, b, _ = slice(*sl).indices(n)
    if a == 0 and 0 < n - b and 2 * (n - b) < n:
        return x, px.dim, n - b
    if b == n and 0 < a and 2 * a < n:
        return x, px.dim, -a
    return None


def _private(cut: fx.Node, user: fx.Node) -> set:
    """``{cut}`` if ``user`` is its only use (the match then covers it), else nothing: a cut
    used elsewhere too is still a slice the fallback computes, and what follows it there holds
    global values (detect drops matches downstream of it)."""
    return {cut} if set(cut.users) == {user} else set()


def _covered(ctx: Ctx) -> set:
    """The nodes earlier families' matches cover (detection appends to ``ctx.matches``)."""
    return set().union(*(m.nodes for m in ctx.matches)) if ctx.matches else set()


def _fill_block(node, ctx: Ctx, dim: int, s: int) -> bool:
    """A block concatenated in front of (or after) a shift: the same on every rank
    (replicated: zeros, a learned start token) and ``s`` long on ``dim``."""
    sh = shape(node)
    return isinstance(node, fx.Node) and isinstance(ctx.placements.get(node), Replicate) and \
        sh is not None and len(sh) > dim and sh[dim] == s


class TokenShift(Pattern):
    """Shifts of the sequence by ``s`` tokens, in their spellings:

    * right (the previous rank's last ``s`` tokens in front, the fill on rank 0):
      ``F.pad(x, (0, 0, s, -s))`` (RWKV's ``ZeroPad2d``), ``F.pad(x[:, :-s], (0, 0, s, 0))``,
      ``F.pad(x, (0, 0, s, 0))[:, :-s]``, ``torch.cat([zeros / bos, x[:, :-s]], 1)``;
    * left (the next rank's first ``s`` tokens at the end, the fill on the last rank):
      ``F.pad(x, (0, s), value=v)[..., s:]`` (HF 5's next-token labels),
      ``F.pad(x[:, s:], (0, 0, 0, s))``, ``torch.cat([x[:, s:], zeros], 1)``.

    The fill is the pad value or the concatenated block, which must be replicated (the same
    on every rank: zeros, a learned start token) and ``s`` long."""
    name = "token_shift"
    kind = "halo"

    def find(self, gm, ctx: Ctx) -> Iterable[Found]:
        yield from self._find_cat(ctx)
        pl = ctx.placements
        for node, _ in _mixing(ctx, "pad"):
            x = node.args[0]
            px = pl.get(x)
            pads = list(arg(node, 1, "pad"))
            mode = arg(node, 2, "mode", "constant")
            value = arg(node, 3, "value", None)
            cut = _sliced_end(x, pl)
            if cut is not None and mode == "constant":  # pad(x[:, :-s], (s, 0)): cut, then pad
                found = self._pad_of_cut(node, x, cut, pads, value)
                if found is not None:
                    yield found
                    continue
            if not isinstance(px, Shard) or px.merged or mode != "constant":
                yield FailedMatch(self.name, node, "pad of a non-sharded value or not constant")
                continue
            nd = len(shape(x))
            pos = 2 * (nd - 1 - px.dim)
            if pos + 1 >= len(pads):
                continue
            left, right = pads[pos], pads[pos + 1]
            others = pads[:pos] + pads[pos + 2:]
            cuts = [_seq_slice(u, px.dim, nd) if canonical_name(u) == "getitem" else None
                    for u in node.users]
            if left == 0 and right > 0 and all(p == 0 for p in others) and cuts and all(
                    c is not None and c[0] == right and c[1] in (None, shape(node)[px.dim])
                    for c in cuts) and right <= shape(x)[px.dim]:
                for u in node.users:
                    yield Match(self.kind, "next_token_shift", u, bindings={"x": x},
                                nodes={node, u}, info={"shift": -right, "dim": px.dim,
                                                       "fill": 0 if value is None else value})
                continue
            if right == 0 and left > 0 and all(p == 0 for p in others) and cuts and all(
                    c is not None and c[0] in (None, 0) and c[1] is not None and
                    slice(*c).indices(shape(node)[px.dim])[1] == shape(x)[px.dim]
                    for c in cuts) and 2 * left < shape(x)[px.dim]:
                for u in node.users:  # pad(x, (s, 0))[:, :-s]: pad, then cut
                    yield Match(self.kind, self.name, u, bindings={"x": x}, nodes={node, u},
                                info={"shift": left, "dim": px.dim,
                                      "fill": 0 if value is None else value})
                continue
            if value not in (None, 0, 0.0):
                yield FailedMatch(self.name, node, "pad of the sequence with a non-zero value "
                                                   "that is not a left shift")
                continue
            if left > 0 and right == -left and all(p == 0 for p in others):
                yield Match(self.kind, self.name, node, bindings={"x": x},
                            info={"shift": left, "dim": px.dim})
            elif not (left > 0 and right == 0 and any(canonical_name(u) == "conv1d"
                                                      for u in node.users)):
                yield FailedMatch(self.name, node, f"padding ({left}, {right}) along the "
                                                   f"sequence is not a shift")

    def _pad_of_cut(self, node, cut_node, cut, pads, value) -> Optional[Match]:
        x, dim, s = cut
        nd = len(shape(x))
        pos = 2 * (nd - 1 - dim)
        if pos + 1 >= len(pads) or any(p != 0 for p in pads[:pos] + pads[pos + 2:]):
            return None
        lo, hi = pads[pos], pads[pos + 1]
        if not ((s > 0 and (lo, hi) == (s, 0)) or (s < 0 and (lo, hi) == (0, -s))):
            return None
        return Match(self.kind, self.name, node, bindings={"x": x},
                     nodes={node} | _private(cut_node, node),
                     info={"shift": s, "dim": dim, "fill": 0 if value is None else value})

    def _find_cat(self, ctx: Ctx) -> Iterable[Found]:
        pl, covered = ctx.placements, _covered(ctx)
        for node, _ in _mixing(ctx, "cat", "concat", "concatenate"):
            if node in covered:
                continue
            pieces = node.args[0] if node.args else ()
            if not isinstance(pieces, (list, tuple)) or len(pieces) != 2:
                continue
            for i_cut, i_fill in ((1, 0), (0, 1)):
                cut = _sliced_end(pieces[i_cut], pl)
                if cut is None:
                    continue
                x, dim, s = cut
                d = arg(node, 1, "dim", 0)
                if not isinstance(d, int) or d % len(shape(node)) != dim or \
                        (s > 0) != (i_cut == 1):
                    continue
                fill = pieces[i_fill]
                if not _fill_block(fill, ctx, dim, abs(s)):
                    yield FailedMatch(self.name, node, "the block concatenated to the shifted "
                                      "slice is not replicated or not as long as the shift")
                    break
                yield Match(self.kind, self.name, node, bindings={"x": x, "fill": fill},
                            nodes={node} | _private(pieces[i_cut], node),
                            info={"shift": s, "dim": dim, "fill": "block"})
                break

    def rewrite(self, gm, ctx: Ctx, m: Match) -> None:
        fill = m.info.get("fill", 0)
        fill = m.bindings["fill"] if fill == "block" else fill
        shift = m.info["shift"]
        _replace_call(gm, ctx, m, _shift_next if shift < 0 else _shift_prev,
                      (m.bindings["x"], abs(shift), m.info["dim"], fill, ctx.group_name),
                      Shard(m.info["dim"]))


def _pad_halos(x, lo: int, hi: int, dim: int, fill, group_name: str):
    """``F.pad(x, (lo, hi), value=fill)`` along the sequence as windows over it see it: the
    previous rank's last ``lo`` tokens in front, the next rank's first ``hi`` after (``fill``
    beyond the ends of the sequence)."""
    parts = [x]
    if lo:
        parts.insert(0, _end_halo(x, lo, dim, fill, group_name, False))
    if hi:
        parts.append(_end_halo(x, hi, dim, fill, group_name, True))
    return torch.ops.spcompile.layout_barrier(torch.cat(parts, dim=dim))


class PaddedWindows(Pattern):
    """``F.pad(x, (lo, hi)).unfold(seq, lo + hi + 1, 1)``: the window of tokens around each
    token (``lo = w - 1, hi = 0``: causal windows for local attention or a convolution written
    by hand; centred windows). On a rank the padding is the neighbours' tokens (a halo each
    way), the sequence's ends keep the pad value."""
    name = "padded_windows"
    kind = "halo"

    def find(self, gm, ctx: Ctx) -> Iterable[Found]:
        pl = ctx.placements
        for node, _ in _mixing(ctx, "pad"):
            x = node.args[0]
            px, sx = pl.get(x), shape(x)
            users = list(node.users)
            if not users or not all(u.op == "call_method" and u.target == "unfold"
                                    for u in users):
                continue
            if not isinstance(px, Shard) or px.merged or px.order or sx is None or \
                    arg(node, 2, "mode", "constant") != "constant":
                yield FailedMatch(self.name, node, "windows over a pad that is not constant or "
                                                   "of a value not sharded plainly")
                continue
            pads = list(arg(node, 1, "pad"))
            pos = 2 * (len(sx) - 1 - px.dim)
            if pos + 1 >= len(pads) or any(p != 0 for p in pads[:pos] + pads[pos + 2:]):
                continue
            lo, hi = pads[pos], pads[pos + 1]
            n = sx[px.dim]
            want = (px.dim, lo + hi + 1, 1)
            got = [(arg(u, 1, "dimension") % len(sx) if isinstance(arg(u, 1, "dimension"), int)
                    else None, arg(u, 2, "size"), arg(u, 3, "step")) for u in users]
            if lo < 0 or hi < 0 or lo > n or hi > n or any(g != want for g in got):
                yield FailedMatch(self.name, node, f"unfold{got[0]} over pad ({lo}, {hi}) is "
                                  f"not one window of {lo + hi + 1} per token (step 1), or it "
                                  f"reaches past a neighbour (local length {n})")
                continue
            value = arg(node, 3, "value", None)
            yield Match(self.kind, self.name, node, bindings={"x": x}, nodes={node, *users},
                        info={"lo": lo, "hi": hi, "dim": px.dim,
                              "fill": 0 if value is None else value})

    def rewrite(self, gm, ctx: Ctx, m: Match) -> None:
        if ctx.world_size == 1:
            return
        g = gm.graph
        with g.inserting_before(m.anchor), ctx.provenance(gm, m, m.anchor):
            out = _call(g, _pad_halos, (m.bindings["x"], m.info["lo"], m.info["hi"],
                                        m.info["dim"], m.info["fill"], ctx.group_name))
        out.meta["spcompile_placement"] = Replicate()  # n + lo + hi long: only windows read it
        users = list(m.anchor.users)
        m.anchor.replace_all_uses_with(out)
        for u in users:  # one window per token of this rank
            u.meta["spcompile_placement"] = Shard(m.info["dim"])


class SequenceRoll(Pattern):
    """``torch.roll(x, s, dims=seq)``: the global sequence rotated by ``s`` (``|s| <
    T_local``; shifts of the whole ``T`` taken modulo ``T``): a shift whose halo comes round a
    ring, rank 0 getting the last rank's tail (``torch.roll(ids, -1, 1)`` for next-token
    labels: the last rank gets rank 0's head)."""
    name = "roll"
    kind = "halo"

    def find(self, gm, ctx: Ctx) -> Iterable[Found]:
        for node, _ in _mixing(ctx, "roll"):
            x = node.args[0]
            px, sx = ctx.placements.get(x), shape(x)
            shifts = arg(node, 1, "shifts")
            shifts = shifts[0] if isinstance(shifts, (list, tuple)) and len(shifts) == 1 else \
                shifts
            dims = arg(node, 2, "dims")
            dims = dims[0] if isinstance(dims, (list, tuple)) and len(dims) == 1 else dims
            if not isinstance(px, Shard) or px.merged or px.order or sx is None or \
                    not isinstance(shifts, int) or not isinstance(dims, int):
                yield FailedMatch(self.name, node, "not one integer shift of one dim")
                continue
            n = sx[px.dim]
            T = n * max(ctx.world_size, 1)
            if shifts % n == 0 or 2 * abs(shifts) == n:
                # torch.roll(x, T) / roll(x, T // 2) with T = x.shape[1]: Dynamo folded the
                # LOCAL length into the number; a literal of that size is a coincidence
                msg = (f"spcompile: torch.roll by {shifts} at {source_line(node) or node.name} "
                       f"along the sharded sequence: {shifts} is a multiple or half of this "
                       f"rank's local length {n}, so it probably came from x.shape (the local "
                       f"length), and the roll of the global sequence would be by another "
                       f"amount. Roll by a number that does not come from the length, or pass "
                       f"options={{'length_constants': 'ignore'}} if it is a literal.")
                from ..fallback import report_local_length
                report_local_length(ctx, msg)
            s = shifts % T
            s = s if s < n else s - T if T - s < n else None
            if s is None:
                yield FailedMatch(self.name, node, f"a roll by {shifts} reaches past the "
                                  f"neighbouring rank (local length {n})")
                continue
            yield Match(self.kind, self.name, node, bindings={"x": x},
                        info={"shift": s, "dim": px.dim})

    def rewrite(self, gm, ctx: Ctx, m: Match) -> None:
        if not m.info["shift"]:  # a whole turn (length_constants='ignore'): the identity
            m.anchor.replace_all_uses_with(m.bindings["x"])
            return
        _replace_call(gm, ctx, m, _roll, (m.bindings["x"], m.info["shift"], m.info["dim"],
                                          ctx.group_name), Shard(m.info["dim"]))


def _flip(x, dims, dim: int, group_name: str):
    """``torch.flip(x, dims)`` of the global sequence: the other dims flipped locally, the
    sequence by the mirror exchange."""
    from ...collectives import flip_sequence
    others = [d for d in dims if d != dim]
    y = x.flip(others) if others else x
    return flip_sequence(y, dim=dim, group=group_name or None)


class SequenceFlip(Pattern):
    """``x.flip(1)`` / ``torch.flip(x, [1])`` / ``torch.fliplr`` along the sequence
    (bidirectional SSMs and scans: Vision Mamba, Caduceus, ``scan(x.flip(1)).flip(1)``): rank r
    gets rank P-1-r's shard, reversed (one exchange with the mirror rank)."""
    name = "flip"
    kind = "halo"

    def find(self, gm, ctx: Ctx) -> Iterable[Found]:
        # an associative scan's reverse=True is spelled with flips around it: that family
        # takes them (they feed its leaves or read its outputs)
        scans = set().union(*(m.nodes for m in ctx.matches if m.pattern == "associative_scan"))
        for node, _ in _mixing(ctx, "flip", "fliplr", "flipud"):
            if node in scans or node.args[0] in scans or any(u in scans for u in node.users):
                continue
            x = node.args[0]
            px, sx = ctx.placements.get(x), shape(x)
            if not isinstance(px, Shard) or px.merged or px.order or sx is None:
                yield FailedMatch(self.name, node, "flip of a value not sharded plainly")
                continue
            yield Match(self.kind, self.name, node, bindings={"x": x},
                        info={"dims": flip_dims(node), "dim": px.dim})

    def rewrite(self, gm, ctx: Ctx, m: Match) -> None:
        _replace_call(gm, ctx, m, _flip, (m.bindings["x"], m.info["dims"], m.info["dim"],
                                          ctx.group_name), Shard(m.info["dim"]))


def _global_softmax(x, dim: int, log: bool, dtype, group_name: str):
    """softmax / log_softmax over a sharded ``dim``: the global max (no gradient: softmax does
    not depend on it) and the global sum of exponentials, one all-reduce each."""
    if dtype is not None:
        x = x.to(dtype)
    out_dtype = x.dtype
    if x.dtype in (torch.float16, torch.bfloat16):  # as torch: accumulate in fp32
        x = x.float()
    m = spops.allreduce(x.detach().amax(dim, keepdim=True), "max", group_name)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf: torch gives nan too
    z = x - m
    s = spops.allreduce(torch.exp(z).sum(dim, keepdim=True), "sum", group_name)
    return (z - torch.log(s) if log else torch.exp(z) / s).to(out_dtype)


class SequenceSoftmax(Pattern):
    """``softmax`` / ``log_softmax`` along the sequence (AFT's ``softmax(k, dim=1)``, attention
    pooling over the tokens, Efficient Attention's key softmax): local exponentials normalised
    by the global max and sum (two small all-reduces)."""
    name = "sequence_softmax"
    kind = "reduction"

    def find(self, gm, ctx: Ctx) -> Iterable[Found]:
        for node, reason in _mixing(ctx, "softmax", "log_softmax"):
            x = node.args[0]
            px = ctx.placements.get(x)
            if not isinstance(px, Shard) or px.merged or px.order or \
                    not reason.endswith("along the sequence axis"):
                continue
            yield Match(self.kind, self.name, node, bindings={"x": x},
                        info={"dim": px.dim, "log": canonical_name(node) == "log_softmax",
                              "dtype": arg(node, 2, "dtype", None)})

    def rewrite(self, gm, ctx: Ctx, m: Match) -> None:
        _replace_call(gm, ctx, m, _global_softmax, (m.bindings["x"], m.info["dim"],
                                                    m.info["log"], m.info["dtype"],
                                                    ctx.group_name), Shard(m.info["dim"]))


_SHAPE_ONLY_USERS = {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like",
                     "randn_like", "new_zeros", "new_ones", "new_full", "new_empty", "size",
                     "dim"}


class ShapeOnlySlice(Pattern):
    """``torch.zeros_like(x[:, :1])``: a slice of the sequence read only for its shape, dtype
    and device (a shift's zero block, a start-token buffer). Any ``k`` of this rank's tokens
    have them: no communication."""
    name = "shape_only_slice"
    kind = "shape"

    def find(self, gm, ctx: Ctx) -> Iterable[Found]:
        covered = _covered(ctx)
        for node, _ in _mixing(ctx, "getitem"):
            if node in covered:  # part of an earlier family's match (a chunked SSD's init)
                continue
            x = node.args[0]
            px, sx, so = ctx.placements.get(x), shape(x), shape(node)
            if not node.users or not all(canonical_name(u) in _SHAPE_ONLY_USERS and
                                         u.args and u.args[0] is node for u in node.users):
                continue
            if not isinstance(px, Shard) or px.merged or sx is None or so is None:
                continue
            e = one_entry_index(node.args[1], len(sx))
            if len(so) == len(sx) - 1 and e is not None and e[0] == px.dim and \
                    isinstance(e[1], int) and not isinstance(e[1], bool):
                # ``torch.zeros_like(kv[:, 0])`` (a loop's initial state): any token will do
                yield Match(self.kind, self.name, node, bindings={"x": x},
                            info={"dim": px.dim, "length": None})
                continue
            if len(so) != len(sx):
                continue
            sl = _seq_slice(node, px.dim, len(sx))
            n = sx[px.dim]
            if sl is None or not all(v is None or isinstance(v, int) for v in sl):
                continue
            a, b, _ = slice(*sl).indices(n)
            k = b - a
            # the first or last k tokens (their count does not depend on the shard length)
            fixed = (sl[0] in (None, 0) and isinstance(sl[1], int) and 0 <= sl[1] < n) or \
                (isinstance(sl[0], int) and sl[0] < 0 and sl[1] is None)
            if fixed and 0 <= 2 * k < n:
                yield Match(self.kind, self.name, node, bindings={"x": x},
                            info={"dim": px.dim, "length": k})

    def rewrite(self, gm, ctx: Ctx, m: Match) -> None:
        if m.info["length"] is None:
            _replace_call(gm, ctx, m, torch.select, (m.bindings["x"], m.info["dim"], 0),
                          Replicate())
            return
        _replace_call(gm, ctx, m, torch.narrow, (m.bindings["x"], m.info["dim"], 0,
                                                 m.info["length"]), Replicate())



def _diff_sp(x, dim: int, prepend, group_name: str):
    """``torch.diff(x, dim=dim, prepend=prepend)`` on this rank's shard: the token before the
    shard is the previous rank's last one, ``prepend`` (a global value) on the first rank."""
    if not group_name:
        return torch.diff(x, dim=dim, prepend=prepend)
    shape_1 = list(x.shape)
    shape_1[dim] = 1
    prev = _end_halo(x, 1, dim, prepend.expand(shape_1).to(x.dtype), group_name, False)
    return torch.diff(x, dim=dim, prepend=prev)


class SequenceDiff(Pattern):
    """``torch.diff(x, dim=seq, prepend=p)`` (HF's packed-sequence detection: ``diff(
    position_ids, prepend=position_ids[:, :1] - 1)``): each rank needs the token before its
    shard, a halo of one; ``p`` (one global token) only enters on the first rank. Without a
    one-token ``prepend`` the result is shorter than the sequence (near miss: the fallback)."""
    name = "sequence_diff"
    kind = "halo"

    def find(self, gm, ctx: Ctx) -> Iterable[Found]:
        pl = ctx.placements
        for node, _ in _mixing(ctx, "diff"):
            x = node.args[0]
            px = pl.get(x)
            n = arg(node, 1, "n", 1)
            prepend, append = arg(node, 3, "prepend"), arg(node, 4, "append")
            if not isinstance(px, Shard) or px.merged:
                continue
            if n != 1 or append is not None:
                yield FailedMatch(self.name, node, "only n=1 with prepend= is handled "
                                                   "(append= or n>1 changes the length)")
                continue
            sp = shape(prepend) if isinstance(prepend, fx.Node) else None
            if sp is None or px.dim >= len(sp) or sp[px.dim] != 1 or \
                    not isinstance(pl.get(prepend), Replicate):
                yield FailedMatch(self.name, node, "prepend= is not one replicated token (the "
                                                   "result would be shorter than the sequence)")
                continue
            yield Match(self.kind, self.name, node, bindings={"x": x, "prepend": prepend},
                        info={"dim": px.dim, "width": 1})

    def rewrite(self, gm, ctx: Ctx, m: Match) -> None:
        if ctx.world_size == 1:
            return
        g = gm.graph
        with g.inserting_before(m.anchor), ctx.provenance(gm, m, m.anchor):
            out = _call(g, _diff_sp, (m.bindings["x"], m.info["dim"], m.anchor.args[3]
                                      if len(m.anchor.args) > 3 else m.anchor.kwargs["prepend"],
                                      ctx.group_name))
        _finish(ctx, m.anchor, out, Shard(m.info["dim"]))


# ------------------------------------------------------------------ writes at fixed positions
def _write_site(node: fx.Node):
    """→ (written value, index, kind) of an in-place write: ``y[idx] = v`` (setitem) or an
    in-place method on a view ``y[idx].fill_(v)`` / ``.zero_()`` / ``.copy_(v)``; else None."""
    if node.op == "call_function" and node.target is operator.setitem:
        return node.args[0], node.args[1], "setitem"
    if mutates(node) and node.args and isinstance(node.args[0], fx.Node) and \
            canonical_name(node.args[0]) == "getitem" and len(node.args[0].users) == 1:
        view = node.args[0]
        return view.args[0], view.args[1], "view"
    return None


def _index_span(idx, dim: int, nd: int, N: int):
    """Global ``[a, b)`` that ``idx`` takes along ``dim`` of a length-``N`` axis (``(0, N)`` when
    it leaves that dim whole), the position of its entry in ``idx`` (None if absent), and
    whether it was an int. None when the entry is not a constant int / step-1 slice, or the
    index holds tensors (advanced indexing) or ``None``s."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(i is None or isinstance(i, (fx.Node, torch.Tensor, list)) for i in idx):
        return None
    n_real = sum(1 for i in idx if i is not Ellipsis)
    d = 0
    for k, i in enumerate(idx):
        if i is Ellipsis:
            d += nd - n_real
            continue
        if d == dim:
            if isinstance(i, int) and not isinstance(i, bool):
                g = i % N
                return g, g + 1, k, True
            if isinstance(i, slice) and i.step in (None, 1) and all(
                    isinstance(v, (int, type(None))) for v in (i.start, i.stop)):
                a, b, _ = i.indices(N)
                return a, max(a, b), k, False
            return None
        d += 1
    return 0, N, None, False


def _writes_tile(idxs, p, sh) -> bool:
    """Do the writes' indexes tile the local axis (the steps of an unrolled loop over the
    tokens)? Indexes from the end (``y[:, -1]``) are no loop's."""
    if not isinstance(p, Shard) or sh is None:
        return True
    n = sh[p.dim]
    spans = []
    for idx in idxs:
        items = idx if isinstance(idx, tuple) else (idx,)
        if any((isinstance(i, int) and not isinstance(i, bool) and i < 0) or (
                isinstance(i, slice) and any(isinstance(v, int) and v < 0
                                             for v in (i.start, i.stop))) for i in items):
            continue
        sp = _index_span(idx, p.dim, len(sh), n)
        if sp is None:
            return True
        spans.append(sp[:2])
    return len(spans) > 2 or _tiles_or_all_but_last(spans, n)


class FixedPositionWrite(Pattern):
    """``y[:, 0] = bos``, ``y[:, -1] = 0``, ``y[:, :1].fill_(0)``, ``mask[:, :k] = 1`` on a
    sharded ``y``: the position is global (DESIGN.md §1), so only the rank that holds it writes,
    at its local offset; the others leave ``y`` as it is. Writes inside a Python loop over the
    sequence belong to that loop (``loop_recurrence``)."""
    name = "fixed_position_write"
    kind = "positions"

    def find(self, gm, ctx: Ctx) -> Iterable[Found]:
        pl, T, P = ctx.placements, ctx.seq_len, ctx.world_size
        if T is None:
            return
        covered = set()
        for m in ctx.matches:
            covered |= set(m.nodes)
        sites = {n: _write_site(n) for n in gm.graph.nodes}
        per_base: dict = {}
        for n, site in sites.items():
            if site is not None:
                per_base.setdefault(site[0], []).append(site[1])
        for node in gm.graph.nodes:
            site = sites[node]
            if site is None or node in covered:
                continue
            y, idx, form = site
            if len(per_base[y]) > 1 and _writes_tile(per_base[y], pl.get(y), shape(y)):
                yield FailedMatch(self.name, node, "several writes into one value along the "
                                                   "sequence (a Python loop over tokens)")
                continue
            py, sy = pl.get(y), shape(y)
            if not isinstance(py, Shard) or sy is None or sy[py.dim] != T:
                continue
            if py.merged:
                yield FailedMatch(self.name, node, "a write into flattened tokens [B*T, ...]")
                continue
            span = _index_span(idx, py.dim, len(sy), T * P)
            if span is None:
                yield FailedMatch(self.name, node, "the write's index along the sequence is not "
                                                   "a constant int or slice")
                continue
            a, b, pos, is_int = span
            if (a, b) == (0, T * P):
                continue  # the whole axis: token by token
            if form == "view" and node.users:
                yield FailedMatch(self.name, node, "the result of the in-place write is used")
                continue
            v = node.args[2] if form == "setitem" else (node.args[1] if len(node.args) > 1
                                                          else None)
            yield Match(self.kind, self.name, node,
                        nodes={node} | ({node.args[0]} if form == "view" else set()),
                        info={"span": (a, b), "pos": pos, "int": is_int, "dim": py.dim,
                              "form": form, "_v": v})

    def rewrite(self, gm, ctx: Ctx, m: Match) -> None:
        if ctx.world_size == 1:
            return
        from ...collectives import group_rank
        node, T = m.anchor, ctx.seq_len
        r = group_rank(ctx.group_name) if ctx.group_name else 0
        a, b = m.info["span"]
        lo, hi = max(a, r * T), min(b, (r + 1) * T)
        view = node.args[0] if m.info["form"] == "view" else None
        node.meta["spcompile_write"] = "global position"
        if lo >= hi:  # not this rank's tokens: no write
            node.replace_all_uses_with(node.args[0]) if node.users else None
            gm.graph.erase_node(node)
            if view is not None and not view.users:
                gm.graph.erase_node(view)
            return
        idx = list(node.args[1] if m.info["form"] == "setitem" else view.args[1])
        idx = idx if isinstance(idx, list) else [idx]
        idx[m.info["pos"]] = lo - r * T if m.info["int"] else slice(lo - r * T, hi - r * T)
        v = m.info["_v"]
        d_out = m.info["dim"]
        if isinstance(v, fx.Node) and not m.info["int"] and shape(v) is not None:
            # a value with the slice's length along the written axis: its part for this rank
            sv, n = shape(v), b - a
            k = len(sv) - (len(shape(node.args[0] if view is None else view)) - d_out)
            if 0 <= k < len(sv) and sv[k] == n and n > 1 and (lo, hi) != (a, b):
                with gm.graph.inserting_before(node), ctx.provenance(gm, m, node):
                    v2 = _call(gm.graph, torch.narrow, (v, k, lo - a, hi - lo))
                node.args = tuple(v2 if x is v else x for x in node.args)
        if view is None:
            node.args = (node.args[0], tuple(idx)) + tuple(node.args[2:])
        else:
            view.args = (view.args[0], tuple(idx))
            set_meta(view)
        node.meta["spcompile_placement"] = Replicate() if view is None else \
            node.meta.get("spcompile_placement")
        if view is not None:
            view.meta["spcompile_placement"] = Replicate()


# ------------------------------------------------------------------ positions
class Positions(Pattern):
    """``arange(T_local)`` and ``table[:T_local]`` mean global positions (DESIGN.md §1)."""
    name = "positions"
    kind = "positions"

    def find(self, gm, ctx: Ctx) -> Iterable[Found]:
        T = ctx.seq_len
        if T is None:
            return
        pl = ctx.placements
        for node in gm.graph.nodes:
            name = canonical_name(node)
            if name in ("arange", "linspace"):
                # the analysis kept it as positions (Shard(0)) after checking its alignment
                form = positions_form(node, T)
                if pl.get(node) == Shard(0) and form is not None:
                    info = {"form": "arange(T)" if form[1] == 0 else f"arange({form[1]}, T+"
                                                                     f"{form[1]})"}
                    if form[0] == "linspace":
                        info = {"form": f"linspace({form[1]}, {form[2]}, T)",
                                "linspace": (form[1], form[2])}
                    yield Match(self.kind, self.name, node, info=info)
            elif name == "getitem" and isinstance(pl.get(node.args[0]), Replicate):
                src = node.args[0]
                sh = shape(src)
                idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
                if sh is None or not isinstance(src, fx.Node) or \
                        sum(i is Ellipsis for i in idx) > 1:
                    continue
                if Ellipsis in idx:  # cos_cached[:, :, :seq_len, ...]
                    e = idx.index(Ellipsis)
                    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
                    idx = idx[:e] + (slice(None),) * (len(sh) - n_real) + idx[e + 1:]
                hits, d = [], 0
                for i in idx:
                    if i is None:
                        continue
                    if isinstance(i, slice) and i.start in (None, 0) and i.stop == T and \
                            i.step in (None, 1) and sh[d] > T:
                        hits.append(d)
                    d += 1
                if len(hits) == 1:  # a T×T slice (a mask buffer) is not a position table
                    yield Match(self.kind, self.name, node,
                                info={"form": "table[:T]", "dim": hits[0],
                                      "table_len": sh[hits[0]], "index": idx})

    def rewrite(self, gm, ctx: Ctx, m: Match) -> None:
        if ctx.world_size == 1:
            return
        g = gm.graph
        T = ctx.seq_len
        node = m.anchor
        if "linspace" in m.info:
            a, b = m.info["linspace"]
            with g.inserting_after(node), ctx.provenance(gm, m, node):
                out = _call(g, spops.global_linspace, (node, a, b, T, ctx.group_name))
            _finish(ctx, node, out, Shard(0))
            return
        if m.info["form"].startswith("arange("):
            with g.inserting_after(node), ctx.provenance(gm, m, node):
                out = _call(g, spops.global_positions, (node, T, ctx.group_name))
            _finish(ctx, node, out, Shard(0))
            return
        need = T * ctx.world_size
        if m.info["table_len"] < need:
            from ..fallback import SequenceParallelError
            raise SequenceParallelError(
                f"spcompile: a position table of length {m.info['table_len']} is sliced to the "
                f"sequence length at {m.source}; the global sequence has {need} tokens. Build "
                f"the table for at least {need} positions.")
        src = node.args[0]
        with g.inserting_before(node), ctx.provenance(gm, m, node):
            window = _call(g, _rank_window, (src, m.info["dim"], T, ctx.group_name))
            idx = tuple(slice(None) if isinstance(i, slice) and i.stop == T else i
                        for i in m.info["index"])
            out = _call(g, operator.getitem, (window, idx))
        # this rank's window of the table: a sharded value (gathering it, as a fallback around a
        # token-mixing consumer does, gives back the global table[:P·T])
        _finish(ctx, node, out, Shard(_out_dim(idx, m.info["dim"])))


def _out_dim(idx, src_dim: int) -> int:
    """Output dim of source dim ``src_dim`` after indexing with ``idx`` (no Ellipsis)."""
    d_in = d_out = 0
    for i in idx:
        if i is None:
            d_out += 1
            continue
        if d_in == src_dim:
            return d_out
        d_in += 1
        d_out += 0 if isinstance(i, int) else 1
    return d_out + (src_dim - d_in)


def _rank_window(table, dim: int, T: int, group_name: str):
    return table.narrow(dim, spops.sequence_offset(group_name, T), T)


# ------------------------------------------------------------------ reductions
def _global_reduce(x, kind: str, world_size: int, group_name: str):
    if kind == "sum":
        return torch.ops.spcompile.allreduce(x, "sum", group_name)
    if kind == "mean":
        return torch.ops.spcompile.allreduce(x, "sum", group_name) / world_size
    if kind == "max":
        return torch.ops.spcompile.allreduce(x, "max", group_name)
    return -torch.ops.spcompile.allreduce(-x, "max", group_name)  # min


class SequenceReduction(Pattern):
    name = "reduction"
    kind = "reduction"
    KINDS = {"sum": "sum", "mean": "mean", "amax": "max", "amin": "min", "max": "max",
             "min": "min"}

    def find(self, gm, ctx: Ctx) -> Iterable[Found]:
        for node, reason in _mixing(ctx, *self.KINDS):
            if not isinstance(ctx.placements.get(node.args[0]), Shard):
                # e.g. row sums of a T×T value: a rank holds only its diagonal block
                yield FailedMatch(self.name, node, f"{reason}: not a reduction of a sharded "
                                                   f"sequence")
                continue
            op = self.KINDS[canonical_name(node)]
            if isinstance(val(node), tuple):  # torch.max(x, dim) → (values, indices)
                d = arg(node, 1, "dim")
                nd = len(shape(node.args[0]))
                xv = val(node.args[0])
                if not isinstance(d, int) or d % nd != ctx.placements[node.args[0]].dim or \
                        op not in ("max", "min") or not xv.dtype.is_floating_point:
                    yield FailedMatch(self.name, node, "max/min with indices over several dims")
                    continue
                yield Match(self.kind, "reduction_with_index", node,
                            info={"op": op, "dim": d % nd,
                                  "keepdim": bool(arg(node, 2, "keepdim", False))})
                continue
            yield Match(self.kind, self.name, node, info={"op": op})

    def rewrite(self, gm, ctx: Ctx, m: Match) -> None:
        if ctx.world_size == 1:
            return
        g = gm.graph
        if "dim" in m.info:
            with g.inserting_before(m.anchor), ctx.provenance(gm, m, m.anchor):
                out = _call(g, _global_max_with_index,
                            (m.anchor.args[0], m.info["dim"], m.info["keepdim"],
                             m.info["op"] == "min", ctx.group_name))
            _finish(ctx, m.anchor, out, Replicate())
            for u in out.users:
                u.meta["spcompile_placement"] = Replicate()
            return
        with g.inserting_after(m.anchor), ctx.provenance(gm, m, m.anchor):
            out = _call(g, _global_reduce, (m.anchor, m.info["op"], ctx.world_size,
                                            ctx.group_name))
        _finish(ctx, m.anchor, out, Replicate())
        m.anchor.meta["spcompile_placement"] = Replicate()


def _reduced_dims(dims, nd: int) -> tuple:
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return tuple(range(nd))
    return tuple(sorted({d % nd for d in ((dims,) if isinstance(dims, int) else dims)}))


def _drop(y, dims: tuple, keepdim: bool):
    return y if keepdim else y.squeeze(dims) if dims else y


def _global_logsumexp(x, dims, keepdim: bool, group_name: str):
    """``logsumexp`` over dims that include the sharded one: the ranks' own logsumexps
    combined with a max-shifted sum (two all-reduces)."""
    dims = _reduced_dims(dims, x.dim())
    lse = torch.logsumexp(x, dims, keepdim=True)
    m = spops.allreduce(lse.detach(), "max", group_name)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    out = m + torch.log(spops.allreduce(torch.exp(lse - m), "sum", group_name))
    return _drop(out, dims, keepdim)


def _global_moments(x, dims, P: int, group_name: str):
    """(mean, sum of squared deviations from it, element count) over ``dims``, which include
    the sharded one, across all ranks (every rank holds as many elements): the global mean
    first, then the deviations from it — two all-reduces, stable as torch's own."""
    n = 1
    for d in dims:
        n *= x.shape[d]
    mean = spops.allreduce(x.mean(dims, keepdim=True), "sum", group_name) / P
    ss = spops.allreduce(((x - mean) ** 2).sum(dims, keepdim=True), "sum", group_name)
    return mean, ss, n * P


def _channel_affine(y, weight, bias):
    """``y * weight + bias`` per channel (dim 1) of ``[N, C, *]``."""
    shp = [1, y.shape[1]] + [1] * (y.dim() - 2)
    if weight is not None:
        y = y * weight.view(shp)
    return y + bias.view(shp) if bias is not None else y


def _global_var(x, dims, correction: float, keepdim: bool, std: bool, P: int,
                group_name: str):
    """``var`` / ``std`` over dims that include the sharded one: the global sum of squared
    deviations divided by ``N - correction`` as torch does."""
    dims = _reduced_dims(dims, x.dim())
    _, ss, N = _global_moments(x if x.is_floating_point() else x.float(), dims, P, group_name)
    var = ss / max(N - correction, 0)
    out = var.sqrt() if std else var
    return _drop(out, dims, keepdim)


def _global_norm(x, p, dims, keepdim: bool, group_name: str):
    """A vector norm over dims that include the sharded one: ``(Σ |x|^p)^(1/p)`` with the sum
    over all ranks (the max for p = inf)."""
    dims = _reduced_dims(dims, x.dim())
    if p in (float("inf"), "inf"):
        out = spops.allreduce(x.abs().amax(dims, keepdim=True), "max", group_name)
    elif p in (float("-inf"), "-inf"):
        out = -spops.allreduce(-x.abs().amin(dims, keepdim=True), "max", group_name)
    elif p == 1:
        out = spops.allreduce(x.abs().sum(dims, keepdim=True), "sum", group_name)
    else:
        q = 2.0 if p in (None, "fro", 2) else float(p)
        s = spops.allreduce((x.abs() ** q).sum(dims, keepdim=True), "sum", group_name)
        safe = torch.where(s > 0, s, torch.ones_like(s))  # torch's gradient at 0 is 0
        out = torch.where(s > 0, safe.sqrt() if q == 2.0 else safe ** (1.0 / q),
                          torch.zeros_like(s))
    return _drop(out, dims, keepdim)


class SequenceStatistic(Pattern):
    """``logsumexp``, ``var`` / ``std`` and vector ``norm`` over the sequence (a pooled
    logsumexp, statistics pooling ``[mean, std]`` over the frames, an L2 norm over the
    tokens): exact from the ranks' partial statistics, a few small all-reduces instead of
    gathering the sequence."""
    name = "sequence_statistic"
    kind = "reduction"

    def find(self, gm, ctx: Ctx) -> Iterable[Found]:
        from ..sequence_axis import reduction_args
        for node, reason in _mixing(ctx, "logsumexp", "var", "std", "norm"):
            x = node.args[0]
            px = ctx.placements.get(x)
            xv = tensor_val(x)
            if not isinstance(px, Shard) or px.merged or px.order or px.rows or xv is None or \
                    not reason.endswith("over the sequence"):
                continue
            name = canonical_name(node)
            ra = reduction_args(node, name)
            if ra is None:
                yield FailedMatch(self.name, node, f"{name}: arguments not understood")
                continue
            if name == "norm" and (xv.is_complex() or ra["p"] == 0 or not isinstance(
                    ra["p"], (int, float, type(None))) and ra["p"] not in ("fro", "inf",
                                                                           "-inf")):
                yield FailedMatch(self.name, node, f"norm with p={ra['p']!r}")
                continue
            if name == "norm" and ra["p"] == "fro" and ra["dims"] is not None and \
                    not isinstance(ra["dims"], int) and len(ra["dims"]) > 2:
                yield FailedMatch(self.name, node, "Frobenius norm over more than two dims")
                continue
            if node.kwargs.get("dtype") is not None or node.kwargs.get("out") is not None:
                yield FailedMatch(self.name, node, f"{name} with dtype/out")
                continue
            yield Match(self.kind, self.name, node, bindings={"x": x},
                        info=dict(ra, op=name))

    def rewrite(self, gm, ctx: Ctx, m: Match) -> None:
        i, x = m.info, m.bindings["x"]
        if i["op"] == "logsumexp":
            fn, args = _global_logsumexp, (x, i["dims"], i["keepdim"], ctx.group_name)
        elif i["op"] == "norm":
            fn, args = _global_norm, (x, i["p"], i["dims"], i["keepdim"], ctx.group_name)
        else:
            fn, args = _global_var, (x, i["dims"], i["correction"], i["keepdim"],
                                     i["op"] == "std", ctx.world_size, ctx.group_name)
        _replace_call(gm, ctx, m, fn, args, Replicate())


def _global_batch_norm(x, running_mean, running_var, weight, bias, momentum, eps: float,
                       P: int, group_name: str):
    """Training-mode ``batch_norm`` of a value sharded along the sequence (every rank holds
    as many elements per channel): the statistics over the batch and the whole sequence from
    two all-reduces (the global mean, then the squared deviations), the running statistics
    updated as on one device (the unbiased variance, ``N / (N - 1)``)."""
    out_dtype = x.dtype
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # (torch's accumulation)
    mean, ss, N = _global_moments(x, [0] + list(range(2, x.dim())), P, group_name)
    var = ss / N
    y = _channel_affine((x - mean) * torch.rsqrt(var + eps), weight, bias)
    if running_mean is not None and momentum is not None:
        m = float(momentum)
        running_mean.mul_(1 - m).add_(mean.detach().flatten().to(running_mean.dtype) * m)
    if running_var is not None and momentum is not None:
        m = float(momentum)
        unbiased = var.detach().flatten() * (N / max(N - 1, 1))
        running_var.mul_(1 - m).add_(unbiased.to(running_var.dtype) * m)
    return y.to(out_dtype)


class SequenceBatchNorm(Pattern):
    """``BatchNorm1d`` in training on ``[B, C, T]`` (Conformer's convolution module, TCNs):
    batch statistics over the sharded sequence from all-reduced partial sums, no gather."""
    name = "sequence_batch_norm"
    kind = "reduction"

    def find(self, gm, ctx: Ctx) -> Iterable[Found]:
        from ..sequence_axis import batch_norm_args
        for node, reason in _mixing(ctx, "batch_norm"):
            if reason != "batch statistics over the sequence":
                continue
            ba = batch_norm_args(node)  # (the rule read them already: plain numbers)
            yield Match(self.kind, self.name, node,
                        bindings={"x": node.args[0], "rm": ba["running_mean"],
                                  "rv": ba["running_var"], "w": ba["weight"], "b": ba["bias"]},
                        info={"momentum": ba["momentum"], "eps": float(ba["eps"]),
                              "dim": ctx.placements[node.args[0]].dim})

    def rewrite(self, gm, ctx: Ctx, m: Match) -> None:
        b = m.bindings
        _replace_call(gm, ctx, m, _global_batch_norm,
                      (b["x"], b["rm"], b["rv"], b["w"], b["b"], m.info["momentum"],
                       m.info["eps"], ctx.world_size, ctx.group_name), Shard(m.info["dim"]))


def _global_group_norm(x, groups: int, weight, bias, eps: float, P: int, group_name: str):
    """``group_norm`` (``instance_norm``: one group per channel) of ``[N, C, *]`` sharded along
    a trailing dim: per sample and group, the mean over every rank's tokens, then the summed
    squared deviations (two all-reduces), the biased variance as torch uses."""
    out_dtype = x.dtype
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    g = xf.reshape(x.shape[0], groups, -1)
    mean, ss, N = _global_moments(g, [-1], P, group_name)
    y = ((g - mean) * torch.rsqrt(ss / N + eps)).reshape(x.shape)
    return _channel_affine(y, weight, bias).to(out_dtype)


class SequenceGroupNorm(Pattern):
    """``GroupNorm`` / ``InstanceNorm1d`` (no running statistics) on ``[B, C, T]`` or
    ``[B, H, T, d]``: statistics per sample and group over the whole sequence from
    all-reduced partial sums, no gather."""
    name = "sequence_group_norm"
    kind = "reduction"

    def find(self, gm, ctx: Ctx) -> Iterable[Found]:
        import torch.nn.functional as Fn
        for node, reason in _mixing(ctx, "group_norm", "instance_norm"):
            if not reason.endswith("statistics over the sequence axis"):
                continue
            x = node.args[0]
            sx, px = shape(x), ctx.placements.get(x)
            if node.op != "call_function" or sx is None or len(sx) < 3 or \
                    not isinstance(px, Shard) or px.dim < 2 or px.merged or px.rows or \
                    px.order or not all(isinstance(ctx.placements.get(a), Replicate)
                                        for a in node.all_input_nodes[1:]):
                yield FailedMatch(self.name, node, "normalisation arguments not understood")
                continue
            if node.target is Fn.group_norm:
                a = bind_args(node, ["num_groups", "weight", "bias", "eps"])
                G, w, b, eps = a.get("num_groups"), a.get("weight"), a.get("bias"), \
                    a.get("eps", 1e-5)
            elif node.target is Fn.instance_norm:
                a = bind_args(node, ["running_mean", "running_var", "weight", "bias",
                                     "use_input_stats", "momentum", "eps"])
                if a.get("running_mean") is not None or a.get("running_var") is not None or \
                        a.get("use_input_stats", True) is not True:
                    yield FailedMatch(self.name, node, "instance_norm with running statistics")
                    continue
                G, w, b, eps = sx[1], a.get("weight"), a.get("bias"), a.get("eps", 1e-5)
            else:
                yield FailedMatch(self.name, node, "normalisation spelled another way")
                continue
            if not isinstance(G, int) or G < 1 or sx[1] % G or not isinstance(eps, (int, float)):
                yield FailedMatch(self.name, node, "group count or eps not understood")
                continue
            yield Match(self.kind, self.name, node, bindings={"x": x, "w": w, "b": b},
                        info={"groups": G, "eps": float(eps),
                              "dim": ctx.placements[x].dim})

    def rewrite(self, gm, ctx: Ctx, m: Match) -> None:
        b = m.bindings
        _replace_call(gm, ctx, m, _global_group_norm,
                      (b["x"], m.info["groups"], b["w"], b["b"], m.info["eps"], ctx.world_size,
                       ctx.group_name), Shard(m.info["dim"]))


def _global_max_with_index(x, dim: int, keepdim: bool, is_min: bool, group_name: str):
    """``torch.max(x, dim)`` (``min``) over the sharded sequence dim: (values, global indices),
    as on one device — the index is the FIRST global position holding the extreme, and the
    value's gradient goes to that element only (on its rank), as torch's backward does."""
    sign = -1.0 if is_min else 1.0
    lv, li = torch.max(x * sign, dim, keepdim=True)
    pos = (li + spops.sequence_offset(group_name, x.shape[dim])).to(torch.float64)
    gv = torch.ops.spcompile.allreduce(lv.detach(), "max", group_name)
    cand = torch.where(lv.detach() == gv, pos, torch.full_like(pos, float("inf")))
    gi = -torch.ops.spcompile.allreduce(-cand, "max", group_name)
    owner = pos == gi
    # only the owner's element takes part in the max: its backward sends the summed gradient
    # there alone (ties between ranks resolved as torch does, to the first position)
    vals = torch.ops.spcompile.allreduce(
        torch.where(owner, lv, torch.full_like(lv, float("-inf"))), "max", group_name) * sign
    idx = gi.to(torch.long)
    if not keepdim:
        vals, idx = vals.squeeze(dim), idx.squeeze(dim)
    return vals, idx


def _global_cross_entropy(logits, target, kwargs: dict, group_name: str):
    kw = dict(kwargs)
    ignore = kw.get("ignore_index", -100)
    kw["reduction"] = "sum"
    total = F.cross_entropy(logits, target, **kw)
    weight = kw.get("weight")
    if target.dtype.is_floating_point:  # class probabilities: every row counts
        count = torch.tensor(float(target.numel() // max(target.shape[1] if target.dim() > 1
                                                          else 1, 1)), device=logits.device)
    elif weight is not None:  # class weights: the mean divides by the weights of the targets
        keep = target != ignore
        count = torch.where(keep, weight[target.clamp(min=0)], 0).sum().to(total.dtype)
    else:
        count = (target != ignore).sum().to(total.dtype)
    total = torch.ops.spcompile.allreduce(total, "sum", group_name)
    count = torch.ops.spcompile.allreduce(count.detach(), "sum", group_name)
    return total / count


class CrossEntropy(Pattern):
    name = "cross_entropy"
    kind = "reduction"

    def find(self, gm, ctx: Ctx) -> Iterable[Found]:
        for node, _ in _mixing(ctx, "cross_entropy"):
            red = node.kwargs.get("reduction", "mean")
            if red not in ("mean", "sum"):
                yield FailedMatch(self.name, node, f"reduction={red!r}")
                continue
            w = node.kwargs.get("weight", node.args[2] if len(node.args) > 2 else None)
            if len(node.args) > 3 or (w is not None and not (
                    isinstance(w, fx.Node) and isinstance(ctx.placements.get(w), Replicate))):
                yield FailedMatch(self.name, node, "class weights that are not one replicated "
                                                   "tensor, or legacy positional arguments")
                continue
            yield Match(self.kind, self.name, node, info={"reduction": red})

    def rewrite(self, gm, ctx: Ctx, m: Match) -> None:
        if ctx.world_size == 1:
            return
        g = gm.graph
        node = m.anchor
        kw = {k: v for k, v in node.kwargs.items() if k != "reduction"}
        if len(node.args) > 2:
            kw["weight"] = node.args[2]
        if kw.get("weight", 0) is None:
            del kw["weight"]  # nn.CrossEntropyLoss passes weight=None
        with g.inserting_before(node), ctx.provenance(gm, m, node):
            if m.info["reduction"] == "mean":
                out = _call(g, _global_cross_entropy, (node.args[0], node.args[1], kw,
                                                       ctx.group_name))
            else:
                local = _call(g, F.cross_entropy, (node.args[0], node.args[1]),
                              dict(kw, reduction="sum"))
                out = _call(g, _global_reduce, (local, "sum", ctx.world_size, ctx.group_name))
        _finish(ctx, node, out, Replicate())


# ------------------------------------------------------------------ shifted next-token loss
def _ignore_head(labels, s: int, dim: int, ignore: int, group_name: str):
    """``labels`` with the first ``s`` GLOBAL positions set to ``ignore`` (rank 0's head).
    The same ops on every rank (the offset is a number): a rank-dependent graph can order the
    compiled backward's collectives differently on different ranks."""
    off = 0
    if group_name:
        from ...collectives import group_rank
        off = group_rank(group_name) * labels.shape[dim]
    pos = torch.arange(labels.shape[dim], device=labels.device) + off
    head = (pos < s).view(*([1] * dim), -1, *([1] * (labels.dim() - dim - 1)))
    return torch.where(head, torch.full_like(labels, ignore), labels)


_LOSS_CHAIN = ("contiguous", "view", "reshape", "flatten", "float", "to", "clone", "type_as")


def _through_chain(n: fx.Node):
    """Back from a loss input through layout-only ops to what feeds them."""
    chain = []
    while isinstance(n, fx.Node) and canonical_name(n) in _LOSS_CHAIN:
        chain.append(n)
        n = n.args[0]
    return n, chain


def _seq_slice(node: fx.Node, dim: int, nd: int):
    """(start, stop) of a getitem's plain slice along ``dim``, None unless every other index
    keeps its dim whole."""
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    d, found = 0, None
    for i in idx:
        if i is None:
            return None
        if i is Ellipsis:
            d += nd - n_real
            continue
        if not isinstance(i, slice) or i.step not in (None, 1):
            return None
        if d == dim:
            found = (i.start, i.stop)
        elif i != slice(None):
            return None
        d += 1
    return found


class ShiftedLoss(Pattern):
    """HF's next-token loss inside ``forward``: ``logits[..., :-s, :]`` against
    ``labels[..., s:]`` (through ``contiguous``/``view``) into ``cross_entropy``. The pairs
    cross shard boundaries; on a rank they are the previous rank's last ``s`` logits (a halo)
    followed by its own, against its own labels with the first ``s`` global positions ignored —
    the same pairs, the same mean, no gather."""
    name = "shifted_loss"
    kind = "halo"

    def find(self, gm, ctx: Ctx) -> Iterable[Found]:
        pl, T = ctx.placements, ctx.seq_len
        for ce in gm.graph.nodes:
            if canonical_name(ce) != "cross_entropy" or len(ce.args) < 2:
                continue
            a, ca = _through_chain(ce.args[0])
            b, cb = _through_chain(ce.args[1])
            if canonical_name(a) != "getitem" or canonical_name(b) != "getitem" or \
                    a not in ctx.mixing or b not in ctx.mixing:
                continue
            pa, pb = pl.get(a.args[0]), pl.get(b.args[0])
            if not (isinstance(pa, Shard) and isinstance(pb, Shard)) or pa.merged or pb.merged:
                continue
            sa = _seq_slice(a, pa.dim, len(shape(a.args[0])))
            sb = _seq_slice(b, pb.dim, len(shape(b.args[0])))
            if sa is None or sb is None:
                yield FailedMatch(self.name, ce, "loss inputs are not plain slices of the "
                                                 "sequence")
                continue
            s = sb[0] if isinstance(sb[0], int) else 0
            stop_a = sa[1] - T if isinstance(sa[1], int) and sa[1] > 0 else sa[1]
            ok = sa[0] in (None, 0) and isinstance(stop_a, int) and stop_a == -s and \
                0 < s <= T and sb[1] in (None, T)
            val_b = val(b)
            if not ok or val_b is None or val_b.dtype.is_floating_point:
                yield FailedMatch(self.name, ce, "not logits[:-s] against labels[s:] (class "
                                                 "indices)")
                continue
            private = all(list(n.users) == [nxt] for n, nxt in zip([a] + ca[::-1],
                                                                    ca[::-1] + [ce])) and \
                all(list(n.users) == [nxt] for n, nxt in zip([b] + cb[::-1], cb[::-1] + [ce]))
            explicit = any(canonical_name(n) in ("view", "reshape") and -1 not in [
                v for v in n.args[1:] if isinstance(v, int)] + list(
                    n.args[1] if len(n.args) > 1 and isinstance(n.args[1], (tuple, list)) else [])
                for n in ca + cb)
            if not private or explicit:
                yield FailedMatch(self.name, ce, "the shifted slices are used elsewhere or "
                                                 "reshaped with explicit lengths")
                continue
            yield Match(self.kind, self.name, a, nodes={a, b},
                        bindings={"logits": a.args[0], "labels": b.args[0], "b": b},
                        info={"shift": s, "dim": pa.dim, "labels_dim": pb.dim,
                              "ignore_index": ce.kwargs.get("ignore_index", -100)})

    def rewrite(self, gm, ctx: Ctx, m: Match) -> None:
        if ctx.world_size == 1:
            return
        g = gm.graph
        a, b = m.anchor, m.bindings["b"]
        with g.inserting_before(a), ctx.provenance(gm, m, a):
            out = _call(g, _shift_prev, (m.bindings["logits"], m.info["shift"], m.info["dim"],
                                         0, ctx.group_name))
        _finish(ctx, a, out, Shard(m.info["dim"]))
        with g.inserting_before(b), ctx.provenance(gm, m, b):
            lab = _call(g, _ignore_head, (m.bindings["labels"], m.info["shift"],
                                          m.info["labels_dim"], m.info["ignore_index"],
                                          ctx.group_name))
        _finish(ctx, b, lab, Shard(m.info["labels_dim"]))
        _refresh_below(lab)
        _refresh_below(out)


def _refresh_below(n: fx.Node) -> None:
    """Recompute example values of the layout chain below a replaced node."""
    todo = list(n.users)
    while todo:
        u = todo.pop()
        if canonical_name(u) in _LOSS_CHAIN:
            set_meta(u)
            todo.extend(u.users)


# ------------------------------------------------------------------ one token by index
def _from_owner(y, owner: int, group_name: str):
    """``y`` (computed on every rank) as held by rank ``owner``, on every rank."""
    if not group_name:
        return y
    from ...collectives import group_rank
    keep = y * (1.0 if group_rank(group_name) == owner else 0.0)  # one graph on every rank
    return torch.ops.spcompile.allreduce(keep, "sum", group_name)


class SequenceIndex(Pattern):
    """``h[:, -1]``, ``h[:, 0]`` (last-token / CLS pooling), ``h[:, :1]`` / ``h[:, -1:]``: one
    token picked by a constant index (or a one-token slice) along the sequence. The index is a global position; the rank that holds it
    contributes, an all-reduce gives it to every rank. Several indexings of one value (a Python
    loop over tokens) are left to the fallback, which refuses them."""
    name = "sequence_index"
    kind = "reduction"

    def find(self, gm, ctx: Ctx) -> Iterable[Found]:
        pl = ctx.placements
        covered = set()
        for m in ctx.matches:
            covered |= set(m.nodes)
        for node, reason in _mixing(ctx, "getitem"):
            if reason not in ("integer index into the sequence axis", ONE_TOKEN_SLICE) or \
                    node in covered:
                continue
            if any(mutates(u) for u in node.users):
                continue  # y[:, :1].fill_(0): a write at a position (fixed_position_write)
            x = node.args[0]
            px = pl.get(x)
            sh = shape(x)
            if not isinstance(px, Shard) or px.merged or sh is None:
                continue
            idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            pos = _index_position(idx, px.dim, len(sh), slices=reason == ONE_TOKEN_SLICE)
            if pos is None:
                yield FailedMatch(self.name, node, "index into the sequence axis is not a "
                                                   "plain integer")
                continue
            siblings = [u for u, r in ctx.mixing.items() if u is not node and
                        canonical_name(u) == "getitem" and u.args[0] is x and u.users]
            n = sh[px.dim]  # the tokens, or the chunk axis of a sequence split in two
            if (siblings or n != ctx.seq_len) and _loop_like([node] + siblings, px.dim,
                                                              len(sh), n):
                yield FailedMatch(self.name, node, "several indexings of one value along the "
                                                   "sequence (a loop over tokens)")
                continue
            i = idx[pos]
            at = i if isinstance(i, int) else (i.start or 0)
            if n == ctx.seq_len:
                from ..fallback import local_length_index
                local_length_index(ctx, node, at, n)
            yield Match(self.kind, self.name, node, info={
                "index": at, "pos": pos,
                "dim": px.dim, "keepdim": isinstance(i, slice),
                # zeros_like(x[:, :1]): only the shape is read, nothing to fetch
                "shape_only": all(canonical_name(u) in _SHAPE_ONLY_USERS for u in node.users)})

    def rewrite(self, gm, ctx: Ctx, m: Match) -> None:
        if ctx.world_size == 1:
            return
        node = m.anchor
        if m.info.get("shape_only"):
            node.meta["spcompile_placement"] = Replicate()
            return
        T, P = shape(node.args[0])[m.info["dim"]], ctx.world_size  # the indexed axis' length
        g_idx = m.info["index"] % (T * P)
        if not -T * P <= m.info["index"] < T * P:
            return  # out of range eagerly too: leave it (and its error) as written
        owner, local = divmod(g_idx, T)
        idx = list(node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],))
        idx[m.info["pos"]] = slice(local, local + 1) if m.info.get("keepdim") else local
        g = gm.graph
        with g.inserting_before(node), ctx.provenance(gm, m, node):
            y = _call(g, operator.getitem, (node.args[0], tuple(idx)))
            out = _call(g, _from_owner, (y, owner, ctx.group_name))
        _finish(ctx, node, out, Replicate())


_SHAPE_ONLY_USERS = {"zeros_like", "ones_like", "empty_like", "full_like", "new_zeros",
                     "new_ones", "new_empty", "new_full", "size", "dim", "shape"}


def _tiles_or_all_but_last(spans, n: int) -> bool:
    """Spans of one width that tile ``[0, n)``, or all of it but the last block (the last step
    of an unrolled loop whose update Dynamo dropped because the final state is unused)."""
    from ..graph_utils import tiles_axis
    spans = sorted(set(spans))
    if not spans:
        return False
    if spans == [(0, n)] or tiles_axis(spans, n):
        return True
    widths = {b - a for a, b in spans}
    if len(widths) != 1:
        return False
    w = widths.pop()
    return spans[0][0] == 0 and spans[-1][1] == n - w and (
        len(spans) == 1 or tiles_axis(spans, n - w))


def _loop_like(nodes, dim: int, nd: int, T: int) -> bool:
    """Do these indexings of one value look like Dynamo's unrolled loop over its tokens: plain
    non-negative indexes (or slices) that tile this rank's ``[0, T)``? ``h[:, 0]`` and
    ``h[:, -1]`` (first and last token) do not; ``h[:, t]`` for every local ``t`` does
    (also without its last step, dead when the final state is unused), and more than two do."""
    spans = []
    for n in nodes:
        idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
        pos = _index_position(idx, dim, nd) if not any(isinstance(i, slice) and i != slice(None)
                                                       for i in idx) else None
        if pos is not None:
            i = idx[pos]
            if i >= 0:  # (an index from the end is no unrolled loop's)
                spans.append((i, i + 1))
            continue
        if any(isinstance(i, (fx.Node, list, torch.Tensor)) for i in idx):
            continue  # advanced indexing (HF masks index positions by tensors): not a loop read
        sp = _seq_slice(n, dim, nd)
        if sp is None:
            return True  # something else along the sequence: leave it to the loop checks
        a, b = sp
        if not ((a is not None and a < 0) or (b is not None and b < 0)):
            spans.append((a or 0, T if b is None else b))
    return len(spans) > 2 or _tiles_or_all_but_last(spans, T)


def _index_position(idx, dim: int, nd: int, slices: bool = False):
    """Position in ``idx`` of the plain int (``slices``: the one-token slice) that indexes
    input dim ``dim`` (None otherwise)."""
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    d = 0
    for k, i in enumerate(idx):
        if i is None:
            continue
        if i is Ellipsis:
            d += nd - n_real
            continue
        if d == dim:
            if slices:
                return k if isinstance(i, slice) else None
            return k if isinstance(i, int) and not isinstance(i, bool) else None
        d += 1
    return None


# ------------------------------------------------------------------ associative scans
def _scan_dtype(node: fx.Node):
    return node.kwargs.get("dtype") if canonical_name(node) in ("cumsum", "cumprod") else None


def _chunk_axis(x: fx.Node, dim: int, ctx: Ctx) -> bool:
    """``x``'s sequence axis counts chunks (``h.view(B, T // C, C, D)``, then e.g. ``sum(2)``:
    fla's ``naive_chunk_linear_attn``): a divisor of the shard length reached from a view that
    split the sequence. Each rank's chunks are then a contiguous block, like its tokens."""
    n, T = (shape(x) or [0] * (dim + 1))[dim], ctx.seq_len
    if not T or not n or n >= T or T % n:
        return False
    pl, cur = ctx.placements, x
    for _ in range(32):
        if canonical_name(cur) in ("view", "reshape", "unflatten"):
            src = cur.args[0]
            ps = pl.get(src)
            return isinstance(src, fx.Node) and isinstance(ps, Shard) and not ps.merged and \
                (shape(src) or [0] * (ps.dim + 1))[ps.dim] == T
        ins = [a for a in cur.all_input_nodes if isinstance(pl.get(a), Shard) and
               (shape(a) or [0] * (pl.get(a).dim + 1))[pl.get(a).dim] == n]
        if not ins:
            return False
        cur = ins[0]  # (kᵀ v of chunks: either operand tells)
    return False


class SequenceScan(Pattern):
    """``cumsum``, ``cumprod``, ``logcumsumexp``, ``cummax``, ``cummin`` along the sequence
    (function or method, any dim spelling, ``dtype=``): the local scan combined with the
    exclusive scan of the earlier ranks' totals (``spcompile.ops.sequence_scan``); cummax/cummin
    indices become global positions. Matches are named after the op."""
    name = "prefix_scan"
    kind = "cumsum"

    def find(self, gm, ctx: Ctx) -> Iterable[Found]:
        covered = set()
        for m in ctx.matches:
            covered |= set(m.nodes)
        for node, _ in _mixing(ctx, *spops.SCANS):
            if node in covered:
                continue
            op, x = canonical_name(node), node.args[0]
            px, sx = ctx.placements.get(x), shape(x)
            if not isinstance(px, Shard) or px.merged or sx is None:
                yield FailedMatch(op, node, "the scanned value is not a plain shard of the "
                                            "sequence")
                continue
            if sx[px.dim] != ctx.seq_len and not _chunk_axis(x, px.dim, ctx):
                yield FailedMatch(op, node, f"the scanned value has {sx[px.dim]} rows along the "
                                            f"sequence, not the shard's {ctx.seq_len} (rows put "
                                            f"in front or cut off)")
                continue
            yield Match(self.kind, op, node, info={"op": op, "dim": px.dim,
                                                  "dtype": _scan_dtype(node)})

    def rewrite(self, gm, ctx: Ctx, m: Match) -> None:
        if ctx.world_size == 1 or not m.anchor.users:
            return
        _replace_scan(gm, ctx, m, m.anchor, m.info["dim"], 0)


def _replace_scan(gm, ctx: Ctx, m: Match, node: fx.Node, dim: int, head: int) -> None:
    kw = {"dtype": _scan_dtype(node)} if _scan_dtype(node) is not None else {}
    if head:
        kw["head"] = head
    with gm.graph.inserting_before(node), ctx.provenance(gm, m, node):
        out = _call(gm.graph, spops.sequence_scan, (node.args[0], dim, canonical_name(node),
                                                    ctx.group_name), kw)
    _finish(ctx, node, out, Shard(dim))


class LeadingRowScan(Pattern):
    """``scan(cat([h0, x]))[:, 1:]``, the minGRU/minLSTM paper's form: initial-state rows put in
    front of the sequence (``torch.cat([h_0, x], dim=1)`` with a replicated ``h_0``,
    ``F.pad(a, (0, 0, 1, 0))``), elementwise math and scans on the longer value, the rows cut
    off again by ``[:, 1:]``. Run locally, every rank computes ``[h0 ; its tokens]``: the front
    rows are the same on every rank and only the scans are wrong, so they become
    ``sequence_scan(..., head=k)`` (the earlier ranks' totals of the sequence rows enter after
    the front rows). Anything else that reads the longer value (``[:, -1]``, a reduction, a
    return) is a near miss: the fallback gathers it."""
    name = "leading_row_scan"
    kind = "cumsum"
    SCANS = ("cumsum", "cumprod", "logcumsumexp")

    def find(self, gm, ctx: Ctx) -> Iterable[Found]:
        T, pl, done = ctx.seq_len, ctx.placements, set()
        for sl, reason in _mixing(ctx, "getitem"):
            x = sl.args[0]
            px, sx = pl.get(x), shape(x)
            if sl in done or reason != "slice of the sequence axis" or T is None or \
                    not isinstance(px, Shard) or px.merged or sx is None or sx[px.dim] <= T:
                continue
            k, d = sx[px.dim] - T, px.dim
            if not self._drops_rows(sl, d, k, len(sx)):
                continue
            region, slices, why = self._region(x, d, k, ctx)
            if why:
                yield FailedMatch(self.name, sl, why)
                continue
            done |= slices
            scans = [n for n in region if canonical_name(n) in self.SCANS]
            yield Match(self.kind, self.name, sl, nodes=region | slices,
                        info={"rows": k, "dim": d, "scans": sorted(canonical_name(n)
                                                                   for n in scans),
                              "_scans": scans, "_keep": region | slices})

    @staticmethod
    def _drops_rows(node: fx.Node, d: int, k: int, nd: int) -> bool:
        cut = _seq_slice(node, d, nd)
        return cut is not None and cut[0] == k and cut[1] in (None, shape(node.args[0])[d])

    def _region(self, start: fx.Node, d: int, k: int, ctx: Ctx):
        """The connected values of length T + k along ``d`` around ``start``: created by a
        front pad/cat, transformed by elementwise ops and scans, left only through ``[k:]``."""
        from ..sequence_axis import ELEMENTWISE, _is_pointwise
        T, pl = ctx.seq_len, ctx.placements
        nd = len(shape(start))

        def longer(a) -> bool:
            sa = shape(a)
            return isinstance(pl.get(a), Shard) and pl.get(a).dim == d and sa is not None and \
                len(sa) == nd and sa[d] == T + k

        def plain(a) -> bool:
            sa = shape(a)
            return isinstance(pl.get(a), Shard) and pl.get(a) == Shard(d) and sa is not None \
                and len(sa) == nd and sa[d] == T

        region, slices, todo = set(), set(), [start]
        while todo:
            n = todo.pop()
            if n in region:
                continue
            region.add(n)
            name = canonical_name(n)
            if name == "pad":
                pads = list(arg(n, 1, "pad"))
                pos = 2 * (nd - 1 - d)
                want = [0] * len(pads)
                if pos + 1 < len(pads):
                    want[pos] = k
                if pads != want or arg(n, 2, "mode", "constant") != "constant" or \
                        not plain(n.args[0]):
                    return region, slices, f"pad {pads} is not {k} row(s) in front of the sequence"
            elif name in ("cat", "concat", "concatenate"):
                parts = list(n.args[0])
                front = parts[:-1]
                if _norm_dim(arg(n, 1, "dim", 0), nd) != d or not plain(parts[-1]) or \
                        not all(isinstance(pl.get(p), Replicate) for p in front) or \
                        sum(shape(p)[d] for p in front) != k:
                    return region, slices, "cat along the sequence is not replicated rows in " \
                                           "front of the sequence"
            elif name in self.SCANS:
                if _norm_dim(arg(n, 1, "dim"), nd) != d or not longer(n.args[0]):
                    return region, slices, f"{name} not along the sequence"
                todo.append(n.args[0])
            elif name in ELEMENTWISE or _is_pointwise(name):
                for a in n.all_input_nodes:
                    if longer(a):
                        todo.append(a)
                    elif not _no_extent(a, d, nd, pl):
                        return region, slices, f"{name} combines the value with its leading " \
                                               f"row(s) with something else along the sequence"
            else:
                return region, slices, f"{name} on the value with its leading row(s)"
            for u in n.users:
                if canonical_name(u) == "getitem" and self._drops_rows(u, d, k, nd):
                    slices.add(u)
                elif longer(u) and (canonical_name(u) in self.SCANS or
                                    canonical_name(u) in ELEMENTWISE or
                                    _is_pointwise(canonical_name(u) or "")):
                    todo.append(u)
                else:
                    return region, slices, f"{canonical_name(u) or u.op} at " \
                                           f"{source_line(u) or u.name} reads the value with " \
                                           f"its leading row(s)"
        return region, slices, None

    def rewrite(self, gm, ctx: Ctx, m: Match) -> None:
        if ctx.world_size == 1:
            return
        d, k = m.info["dim"], m.info["rows"]
        for n in m.info["_keep"]:  # the local computation is right as written: [h0 ; tokens]
            n.meta["spcompile_placement"] = Shard(d)
        for n in m.info["_scans"]:
            _replace_scan(gm, ctx, m, n, d, k)


def _norm_dim(d, nd: int):
    return d % nd if isinstance(d, int) else d


def _no_extent(a, d: int, nd: int, pl) -> bool:
    """A replicated operand that broadcasts along ``d`` (size 1 there, or fewer dims)."""
    if not isinstance(a, fx.Node):
        return True
    sa = shape(a)
    if not isinstance(pl.get(a), Replicate):
        return False
    if sa is None:
        return True
    pos = d - (nd - len(sa))
    return pos < 0 or sa[pos] == 1
