"""Pass 1 — canonicalize: many spellings, one vocabulary.

* arguments passed by keyword move into ``args`` where they could be positional
  (``F.conv1d(x, weight=w, bias=b, ...)``), so later passes read operands in one place;
* ``baddbmm(inp, a, b, beta, alpha)`` → ``beta·inp + alpha·(a @ b)`` (``inp`` dropped at beta 0);
  ``addmm(bias, x, w)`` likewise (GPT-2's ``Conv1D``);
* ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``) → projections + SDPA;
* every matrix product (``@``, ``torch.matmul``, ``bmm``, ``Tensor.matmul``, two-operand
  ``einsum`` contractions, multi-operand ``einsum`` chains split pairwise) → ``torch.matmul``,
  with ``torch.permute``/``reshape`` around it where the einsum's letters ask for it;
* every transpose spelling (``.mT``, ``.T``, ``transpose(-1, -2)``/``(-2, -1)``, ``swapaxes``,
  ``.t()``) → ``torch.permute`` with a full permutation;
* tensor methods with a same-named ``torch`` function *and the same argument order*
  (``x.tril()``, ``x.exp()``, ``x.cumsum(1)``, ``x.masked_fill(m, 0)``, ...) → the function
  (not ``x.where(c, y)`` = ``torch.where(c, x, y)``, nor varargs methods such as ``flip``).

Checkpointed blocks (``torch.utils.checkpoint``) and other ``wrap`` bodies are inlined first,
keeping their recompute tags (``inline_hops.py``). Later passes then match one form. Masks are
not rewritten here: detection checks them by value.
"""
from __future__ import annotations

import inspect
import operator
import string
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from .graph_utils import (FRESH_FILLS, bind_args, canonical_name, eliminate_dead_code,
                          inside_vmap, mutates, one_entry_index, set_meta, shape, stateful,
                          tensor_val, val)
from .pipeline import Ctx, register_pass

_METHODS_TO_FUNCTIONS = {
    "tril", "triu", "exp", "log", "cumsum", "cumprod", "masked_fill", "sum", "mean", "softmax",
    "log_softmax", "sigmoid", "tanh", "relu", "abs", "sqrt", "rsqrt", "square", "reciprocal",
    "clamp", "clamp_min", "clamp_max", "amax", "amin", "logsumexp", "unsqueeze",
    "cummax", "cummin", "diff", "sort", "argsort", "topk", "var",
    "std", "norm", "exp2", "log1p", "expm1", "neg", "sin", "cos", "erf", "logcumsumexp",
}


def _replace(gm: fx.GraphModule, old: fx.Node, new: fx.Node) -> None:
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)


def _new(gm: fx.GraphModule, before: fx.Node, target: Any, args: tuple, kwargs=None,
         op: str = "call_function") -> fx.Node:
    with gm.graph.inserting_before(before):
        n = gm.graph.create_node(op, target, args, kwargs or {})
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in before.meta:
            n.meta[key] = before.meta[key]
    set_meta(n)
    return n


def _permute(gm, before, x: fx.Node, perm: Sequence[int]) -> fx.Node:
    if list(perm) == list(range(len(perm))):
        return x
    return _new(gm, before, torch.permute, (x, tuple(perm)))


def _reshape(gm, before, x: fx.Node, new_shape: Sequence[int]) -> fx.Node:
    if tuple(shape(x)) == tuple(new_shape):
        return x
    return _new(gm, before, torch.reshape, (x, tuple(new_shape)))


# ---------------------------------------------------------------- einsum → matmul
def _parse_einsum(eq: str, ndims: Sequence[int]) -> Optional[Tuple[List[str], str]]:
    """Expand '...' into fresh upper-case letters; returns (input subscripts, output)."""
    eq = eq.replace(" ", "")
    if "->" not in eq:
        return None  # implicit output: let it be
    lhs, out = eq.split("->")
    ins = lhs.split(",")
    if len(ins) != len(ndims):
        return None
    ell_n = 0
    for s, nd in zip(ins, ndims):
        if "..." in s:
            ell_n = max(ell_n, nd - (len(s) - 3))
    fresh = [c for c in string.ascii_uppercase][:ell_n]
    res = []
    for s, nd in zip(ins, ndims):
        if "..." in s:
            k = nd - (len(s) - 3)
            s = s.replace("...", "".join(fresh[ell_n - k:]))
        res.append(s)
    out = out.replace("...", "".join(fresh))
    return res, out


def _lower_einsum2(gm, node: fx.Node, a: fx.Node, b: fx.Node, sa: str, sb: str, so: str
                   ) -> Optional[fx.Node]:
    """One two-operand einsum as permute → reshape → matmul → reshape → permute."""
    if len(set(sa)) != len(sa) or len(set(sb)) != len(sb):
        return None  # diagonals: not a product
    sha, shb = shape(a), shape(b)
    if sha is None or shb is None:
        return None
    size = {}
    for s, sh in ((sa, sha), (sb, shb)):
        for c, d in zip(s, sh):
            if c in size and size[c] != d and 1 not in (size[c], d):
                return None
            size[c] = max(size.get(c, 1), d)
    for c in sa + sb:
        if c not in so and not (c in sa and c in sb):
            return None  # a letter summed inside one operand: not a plain product
    batch = [c for c in so if c in sa and c in sb]
    left = [c for c in so if c in sa and c not in sb]
    right = [c for c in so if c in sb and c not in sa]
    contr = [c for c in sa if c in sb and c not in so]
    if set(so) != set(batch + left + right):
        return None
    # operands with batch letters missing are broadcast by matmul only if they are leading;
    # keep it simple: every batch letter must be present in both.
    pa = _permute(gm, node, a, [sa.index(c) for c in batch + left + contr])
    pb = _permute(gm, node, b, [sb.index(c) for c in batch + contr + right])
    bsh_a = [sha[sa.index(c)] for c in batch]
    bsh_b = [shb[sb.index(c)] for c in batch]
    L = 1
    for c in left:
        L *= size[c]
    R = 1
    for c in right:
        R *= size[c]
    K = 1
    for c in contr:
        K *= size[c]
    ra = _reshape(gm, node, pa, bsh_a + [L, K])
    rb = _reshape(gm, node, pb, bsh_b + [K, R])
    mm = _new(gm, node, torch.matmul, (ra, rb))
    out_order = batch + left + right
    res = _reshape(gm, node, mm, [shape(mm)[i] for i in range(len(batch))]
                   + [size[c] for c in left + right])
    return _permute(gm, node, res, [out_order.index(c) for c in so])


def _lower_einsum(gm: fx.GraphModule, node: fx.Node) -> bool:
    eq = node.args[0]
    ops = list(node.args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if not isinstance(eq, str) or len(ops) < 2 or not all(isinstance(o, fx.Node) for o in ops):
        return False
    shapes = [shape(o) for o in ops]
    if any(s is None for s in shapes):
        return False
    parsed = _parse_einsum(eq, [len(s) for s in shapes])
    if parsed is None:
        return False
    subs, out = parsed
    # Split a chain left to right: keep the letters that later operands or the output need.
    cur, cur_s = ops[0], subs[0]
    for i in range(1, len(ops)):
        later = set(out).union(*[set(s) for s in subs[i + 1:]]) if i + 1 < len(subs) else set(out)
        nxt = subs[i]
        keep = [c for c in dict.fromkeys(cur_s + nxt) if c in later]
        if set(keep) == set(cur_s) | set(nxt):
            # a broadcasting product: keep the letter order of the operand that has the most
            # (``bts`` times ``bhts`` is ``bhts``: a T×T value stays in its last two dims)
            big, small = (nxt, cur_s) if len(nxt) >= len(cur_s) else (cur_s, nxt)
            keep = [c for c in dict.fromkeys(big + small) if c in later]
        if i == len(ops) - 1:
            keep = list(out)
        step_out = "".join(keep)
        elementwise = set(step_out) == set(cur_s) | set(nxt)
        if elementwise:
            # no contraction: a broadcasting multiply after aligning letters
            res = _align_mul(gm, node, cur, cur_s, ops[i], nxt, step_out)
        else:
            res = _lower_einsum2(gm, node, cur, ops[i], cur_s, nxt, step_out)
        if res is None:
            return False
        cur, cur_s = res, step_out
    node.replace_all_uses_with(cur)
    gm.graph.erase_node(node)
    return True


def _align(gm, node, x: fx.Node, s: str, target: str) -> fx.Node:
    """Permute/unsqueeze ``x`` (letters ``s``) to broadcast against letters ``target``."""
    present = [c for c in target if c in s]
    x = _permute(gm, node, x, [s.index(c) for c in present])
    full = [shape(x)[present.index(c)] if c in present else 1 for c in target]
    return _reshape(gm, node, x, full)


def _align_mul(gm, node, a, sa, b, sb, so) -> Optional[fx.Node]:
    if len(set(sa)) != len(sa) or len(set(sb)) != len(sb):
        return None
    xa = _align(gm, node, a, sa, so)
    xb = _align(gm, node, b, sb, so)
    return _new(gm, node, operator.mul, (xa, xb))


# ---------------------------------------------------------------- transposes
def _transpose_perm(nd: int, d0: int, d1: int) -> List[int]:
    perm = list(range(nd))
    d0, d1 = d0 % nd, d1 % nd
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return perm


def _canon_transpose(gm: fx.GraphModule, node: fx.Node) -> bool:
    name = canonical_name(node)
    x = node.args[0]
    sh = shape(x) if isinstance(x, fx.Node) else None
    if sh is None:
        return False
    nd = len(sh)
    if name in ("mT",) or (name == "T" and nd == 2) or (name == "t" and nd == 2):
        perm = _transpose_perm(nd, -1, -2)
    elif name == "transpose" or (node.op == "call_function" and node.target in (
            torch.transpose, torch.swapaxes, torch.swapdims)):
        d0, d1 = node.args[1], node.args[2]
        if not isinstance(d0, int) or not isinstance(d1, int):
            return False
        perm = _transpose_perm(nd, d0, d1)
    elif name == "permute" and node.op == "call_method":
        dims = node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        perm = [d % nd for d in dims]
    else:
        return False
    new = _permute(gm, node, x, perm)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return True


_VIEW_OPS = {"view", "reshape", "transpose", "permute", "getitem", "expand", "unsqueeze",
             "squeeze", "t", "T", "mT", "narrow", "unflatten", "flatten", "view_as", "unbind",
             "split", "chunk", "diagonal", "as_strided", "select", "movedim", "swapaxes",
             "expand_as", "contiguous", "unfold", "detach", "alias", "real", "imag",
             "view_as_real", "view_as_complex"}


def _functionalize_inplace(gm: fx.GraphModule) -> None:
    """``a.masked_fill_(m, 0)`` on an intermediate → ``a2 = a.masked_fill(m, 0)``, later uses
    of ``a`` read ``a2`` (fla's ``naive_parallel_based`` masks its scores in place). Only where
    nothing else aliases ``a`` (no view of it, and it is no view): a mutation seen through a
    view stays as written."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    batched = inside_vmap(gm)
    for node in list(gm.graph.nodes):
        t = node.target
        if node in batched or node.op != "call_method" or not isinstance(t, str) or not t.endswith("_") or \
                t.startswith("_") or not hasattr(torch.Tensor, t[:-1]):
            continue
        a = node.args[0] if node.args else None
        if not isinstance(a, fx.Node) or a.op in ("placeholder", "get_attr") or \
                canonical_name(a) in _VIEW_OPS or \
                any(canonical_name(u) in _VIEW_OPS for u in a.users):
            continue
        new = _new(gm, node, t[:-1], tuple(node.args), dict(node.kwargs), op="call_method")
        later = [u for u in a.users if u is not node and u is not new and order.get(u, -1) > order[node]]
        for u in later:
            u.replace_input_with(a, new)
        _replace(gm, node, new)


def _fill_value(buf: fx.Node):
    """The value a fresh buffer is filled with (``zeros_like`` 0, ``full(size, v)`` v; the
    unwritten part of an ``empty`` buffer is unspecified: 0), or None if unknown."""
    name = canonical_name(buf)
    v = FRESH_FILLS.get(name, "no")
    if v == "no":
        return None
    if v is None:
        v = buf.kwargs.get("fill_value", buf.args[1] if len(buf.args) > 1 else None)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _one_slice_index(idx, nd: int):
    """``(dim, start, stop)`` when ``idx`` is full slices except one ``a:b`` (step 1) slice,
    else None (``buf[:, 1:]``, ``buf[..., :-1, :]``)."""
    e = one_entry_index(idx, nd)
    if e is None or not isinstance(e[1], slice) or e[1].step not in (None, 1) or \
            not all(v is None or (isinstance(v, int) and not isinstance(v, bool))
                    for v in (e[1].start, e[1].stop)):
        return None
    return e[0], e[1].start, e[1].stop


def _fresh_buffer_slice_writes(gm: fx.GraphModule) -> None:
    """``y = torch.zeros_like(x); y[:, 1:] = x[:, :-1]`` (BART's ``shift_tokens_right``,
    a token shift into a fresh buffer) → ``y2 = cat([fill, x[:, :-1]], 1)``, later uses of
    ``y`` read ``y2``: the same values, and the concatenation the shift families know. Only
    one slice write per buffer (a loop writing slices keeps its writes), only where nothing
    aliases the buffer, and only for a value of exactly the written region's shape."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    batched = inside_vmap(gm)
    for node in list(gm.graph.nodes):
        if node in batched or node.op != "call_function" or node.target is not operator.setitem:
            continue
        buf, idx, v = node.args
        if not isinstance(buf, fx.Node) or not isinstance(v, fx.Node):
            continue
        fill = _fill_value(buf)
        bv, vv = tensor_val(buf), tensor_val(v)
        if fill is None or bv is None or vv is None or \
                any(canonical_name(u) in _VIEW_OPS for u in buf.users):
            continue
        writes = [u for u in buf.users if u.op == "call_function" and
                  u.target is operator.setitem and u.args[0] is buf and
                  isinstance(u.args[2], fx.Node) and
                  _one_slice_index(u.args[1], bv.dim()) is not None]
        if writes != [node]:
            continue
        dim, a, b = _one_slice_index(idx, bv.dim())
        n = bv.shape[dim]
        a, b, _ = slice(a, b).indices(n)
        want = list(bv.shape)
        want[dim] = max(b - a, 0)
        if b <= a or tuple(vv.shape) != tuple(want):
            continue
        src = v
        if canonical_name(v) in ("clone", "contiguous", "detach") and len(v.users) == 1 and \
                isinstance(v.args[0], fx.Node):
            src = v.args[0]  # ids[:, :-1].clone(): the concatenation copies anyway
        if torch.tensor(fill, dtype=torch.float64).to(vv.dtype).item() != fill:
            continue  # the fill must survive the value's dtype (cast after the concatenation)
        with gm.graph.inserting_before(node):
            parts = []
            for length in (a, None, n - b):
                if length is None:
                    parts.append(src)
                elif length > 0:
                    size = list(bv.shape)
                    size[dim] = length
                    parts.append(_new(gm, node, torch.full, (tuple(size), fill),
                                      {"dtype": vv.dtype, "device": vv.device}))
            new = _new(gm, node, torch.cat, (parts, dim))
            if vv.dtype != bv.dtype:
                new = _new(gm, node, "to", (new, bv.dtype), op="call_method")
        later = [u for u in buf.users if u is not node and order.get(u, -1) > order[node]]
        for u in later:
            u.replace_input_with(buf, new)
        gm.graph.erase_node(node)
        if not buf.users:
            gm.graph.erase_node(buf)
        if src is not v and not v.users:
            gm.graph.erase_node(v)


def _slot_index(idx, nd: int):
    """``(dim, i)`` when ``idx`` is full slices except one integer ``i`` (``S[:, :, i]``,
    ``S[..., i, :]``), else None."""
    e = one_entry_index(idx, nd)
    return e if e is not None and isinstance(e[1], int) and not isinstance(e[1], bool) \
        else None


def _forward_slot_reads(gm: fx.GraphModule) -> None:
    """A fresh buffer as a loop's state store, each slot computed from the one before (fla's
    naive chunk references: ``S = torch.zeros_like(kv); for i in range(1, n): S[:, :, i] =
    S[:, :, i - 1].clone() * decay + kv[:, :, i - 1]``) → every read of a slot takes the value
    last written there, so the recurrence becomes a chain of values the loop family knows. A
    slot read before any write holds the fill: the read becomes ``torch.full`` of it, and that
    (no-op) write is made explicit where the read was, so the buffer's writes name every slot's
    value. Only for buffers used by nothing else until their last write, whose reads are used
    before their slot is written again and not mutated, with values of the slot's exact shape
    and dtype."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    batched = inside_vmap(gm)

    def views_of(n: fx.Node) -> set:
        """``n`` and every view taken of it (transitively)."""
        out, todo = {n}, [n]
        while todo:
            for u in todo.pop().users:
                if canonical_name(u) in _VIEW_OPS and u.args and u.args[0] in out and \
                        u not in out:
                    out.add(u)
                    todo.append(u)
        return out

    def view_base(n: fx.Node) -> fx.Node:
        while canonical_name(n) in _VIEW_OPS and n.args and isinstance(n.args[0], fx.Node):
            n = n.args[0]
        return n

    def mutated(n: fx.Node) -> bool:
        """Is ``n``'s storage written anywhere (through ``n``, its base or any view)?"""
        for v in views_of(view_base(n)):
            if any(mutates(u) and u.args and u.args[0] is v for u in v.users):
                return True
        return False

    for buf in list(gm.graph.nodes):
        fill = _fill_value(buf)
        bv = tensor_val(buf)
        if fill is None or "empty" in (canonical_name(buf) or "") or bv is None or \
                buf in batched or bv.dim() == 0:
            continue
        users = sorted(buf.users, key=order.get)
        events, dims, ok = [], set(), True
        for u in users:
            if u.op == "call_function" and u.target is operator.setitem and u.args[0] is buf:
                si = _slot_index(u.args[1], bv.dim())
                v = tensor_val(u.args[2]) if isinstance(u.args[2], fx.Node) else None
                if si is None or v is None:
                    ok = False
                    break
                events.append(("w", u, si))
                dims.add(si[0])
            elif canonical_name(u) == "getitem" and u.args[0] is buf and \
                    _slot_index(u.args[1], bv.dim()) is not None:
                si = _slot_index(u.args[1], bv.dim())
                events.append(("r", u, si))
                dims.add(si[0])
            else:
                events.append(("other", u, None))
        writes = [e for e in events if e[0] == "w"]
        if not ok or len(dims) != 1 or not writes or not any(e[0] == "r" for e in events):
            continue
        last_w = max(order[e[1]] for e in writes)
        if any(e[0] == "other" and (order[e[1]] < last_w or mutates(e[1]) or
                                     canonical_name(e[1]) in _VIEW_OPS) for e in events):
            continue  # the whole buffer read inside the loop, mutated, or viewed: keep it
        d = dims.pop()
        n = bv.shape[d]
        slot_shape = tuple(bv.shape[:d] + bv.shape[d + 1:])
        for e in events:
            if e[0] == "w":
                v = tensor_val(e[1].args[2])
                if tuple(v.shape) != slot_shape or v.dtype != bv.dtype or \
                        mutated(e[1].args[2]):
                    ok = False  # (a value changed after it was written: the slot keeps it)
        # a read's uses come before its slot's next write, and none writes through it
        for k, e in enumerate(events):
            if e[0] != "r":
                continue
            nxt = next((order[f[1]] for f in events[k + 1:] if f[0] == "w" and
                        f[2][1] % n == e[2][1] % n), None)
            uses = [u for v in views_of(e[1]) for u in v.users]
            if any(mutates(u) or (nxt is not None and order[u] > nxt) for u in uses):
                ok = False
        if not ok:
            continue
        last: dict = {}
        for kind, u, (_, i) in [e for e in events if e[0] != "other"]:
            i %= n
            if kind == "w":
                last[i] = u.args[2]
                continue
            if i not in last:
                f = _new(gm, u, torch.full, (slot_shape, fill),
                         {"dtype": bv.dtype, "device": bv.device})
                _new(gm, u, operator.setitem, (buf, u.args[1], f))
                last[i] = f
            _replace(gm, u, last[i])


def _index_at(dim: int, item: Any, nd: int) -> tuple:
    """The getitem index that applies ``item`` at ``dim`` and keeps every other dim."""
    return (slice(None),) * (dim % nd) + (item,)


def _from_user_gather(node: fx.Node) -> bool:
    from .graph_utils import ancestors
    from .sequence_axis import _USER_GATHERS
    return any(canonical_name(a) in _USER_GATHERS for a in ancestors(node))


def _slicing_spellings(gm: fx.GraphModule) -> None:
    """One spelling for taking part of a dim: ``x.narrow(d, a, n)`` → ``x[..., a:a + n]``,
    ``x.select(d, i)`` → ``x[..., i]``, ``x.split(n, d)[i]`` (a piece only indexed) →
    ``x[..., i·n:(i + 1)·n]``, ``x[:, [-1]]`` → ``x[:, -1:]``, so that the families that read
    slices (position tables ``table[:T]``, shifts ``x[:, :T - s]``, one token ``h[:, -1:]``) see
    every spelling. A narrow of a value computed from ``spcompile.gather_sequence`` stays (it is
    the user's own ``shard_sequence``)."""
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        name = canonical_name(node)
        x = node.args[0] if node.args else None
        xv = tensor_val(x) if isinstance(x, fx.Node) else None
        if xv is None or xv.dim() == 0:
            continue
        nd = xv.dim()
        new_idx = None
        if name == "narrow":
            d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            a = node.args[2] if len(node.args) > 2 else node.kwargs.get("start")
            n = node.args[3] if len(node.args) > 3 else node.kwargs.get("length")
            if all(isinstance(v, int) and not isinstance(v, bool) for v in (d, a, n)) and \
                    not _from_user_gather(node):
                a = a % xv.shape[d] if a < 0 else a
                new_idx = _index_at(d, slice(a, a + n), nd)
        elif name == "select":
            d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            i = node.args[2] if len(node.args) > 2 else node.kwargs.get("index")
            if isinstance(d, int) and isinstance(i, int):
                new_idx = _index_at(d, i, nd)
        elif name == "getitem" and isinstance(node.args[1], (list, tuple)):
            idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            lists = [j for j, i in enumerate(idx) if isinstance(i, list)]
            if len(lists) == 1 and len(idx[lists[0]]) == 1 and \
                    isinstance(idx[lists[0]][0], int) and Ellipsis not in idx[:lists[0]] and \
                    None not in idx[:lists[0]]:
                i = idx[lists[0]][0]
                sl = slice(i, i + 1 if i != -1 else None)
                new_idx = idx[:lists[0]] + (sl,) + idx[lists[0] + 1:]
        elif name in ("split", "chunk") and node.users and all(
                canonical_name(u) == "getitem" and isinstance(u.args[1], int)
                for u in node.users):
            n = node.args[1] if len(node.args) > 1 else node.kwargs.get(
                "split_size_or_sections", node.kwargs.get("split_size", node.kwargs.get("chunks")))
            d = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            if isinstance(n, int) and isinstance(d, int) and n > 0:
                L = xv.shape[d]
                size = n if name == "split" else -(-L // n)
                for u in list(node.users):
                    k = u.args[1] % (-(-L // size))
                    piece = _new(gm, u, operator.getitem,
                                 (x, _index_at(d, slice(k * size, min((k + 1) * size, L)), nd)))
                    _replace(gm, u, piece)
                if not node.users:
                    gm.graph.erase_node(node)
            continue
        if new_idx is None:
            continue
        new = _new(gm, node, operator.getitem, (x, new_idx))
        _replace(gm, node, new)


def _global_pool_to_reduction(gm: fx.GraphModule, node: fx.Node, name: str) -> None:
    """``F.adaptive_avg_pool1d(x, 1)`` / ``adaptive_max_pool1d(x, 1)`` (a classifier's global
    pooling over ``[B, C, T]``) → ``x.mean(-1, keepdim=True)`` / ``x.max(-1, keepdim=True)[0]``:
    the same values, and reductions the reduction family knows."""
    size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
    if size not in (1, (1,), [1]) or not isinstance(node.args[0], fx.Node) or \
            node.kwargs.get("return_indices") or (len(node.args) > 2 and node.args[2]) or \
            isinstance(val(node), tuple):
        return
    if name == "adaptive_avg_pool1d":
        new = _new(gm, node, torch.mean, (node.args[0], -1), {"keepdim": True})
    else:  # the values of torch.max(x, -1): the gradient to the first maximum, as the pool's
        new = _new(gm, node, operator.getitem,
                   (_new(gm, node, torch.max, (node.args[0], -1), {"keepdim": True}), 0))
    _replace(gm, node, new)


def _norms_to_norm(gm: fx.GraphModule, node: fx.Node, name: str) -> None:
    """``F.normalize(x, p, dim, eps)`` → ``x / torch.norm(x, p, dim, keepdim=True)
    .clamp_min(eps)`` (torch's own formula) and ``torch.linalg.vector_norm(x, ord, dim,
    keepdim)`` → ``torch.norm(x, ord, dim, keepdim)``: one norm for the families (a norm over
    the sequence — ``F.normalize``'s default ``dim=1`` on ``[B, T, D]`` — is all-reduced)."""
    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node) or node.kwargs.get("out") is not None:
        return
    if name == "normalize":
        names, defaults = ["p", "dim", "eps"], {"p": 2.0, "dim": 1, "eps": 1e-12}
    else:
        names, defaults = ["ord", "dim", "keepdim"], {"ord": 2, "dim": None, "keepdim": False}
        if node.kwargs.get("dtype") is not None or len(node.args) > 4:
            return
    a = bind_args(node, names, defaults)
    if any(k not in names for k in node.kwargs) or not isinstance(a["dim"], (int, tuple, list,
                                                                            type(None))):
        return
    if name == "normalize":
        if not isinstance(a["dim"], int) or not isinstance(a["eps"], (int, float)):
            return
        n = _new(gm, node, torch.norm, (x, a["p"], a["dim"]), {"keepdim": True})
        n = _new(gm, node, torch.clamp_min, (n, a["eps"]))
        new = _new(gm, node, operator.truediv, (x, n))
    else:
        new = _new(gm, node, torch.norm, (x, a["ord"], a["dim"]), {"keepdim": a["keepdim"]})
    _replace(gm, node, new)


def _signatures(target: Any) -> List[inspect.Signature]:
    """The Python signatures of a torch function (its overloads') or of a plain function."""
    from torch.fx.operator_schemas import get_signature_for_torch_op
    try:
        sigs = get_signature_for_torch_op(target)
    except Exception:  # noqa: BLE001 - no schema for this callable
        sigs = None
    if not sigs:
        try:
            sigs = [inspect.signature(target)]
        except (TypeError, ValueError):
            return []
    return sigs


# methods whose argument order is not the torch function's (x.where(c, y) = where(c, x, y))
_METHOD_ORDER_DIFFERS = {"where"}


def _positional_kwargs(gm: fx.GraphModule) -> None:
    """Arguments passed by keyword that could be positional move into ``args``, in order:
    ``F.conv1d(x, weight=w, bias=b, padding=3, groups=D)`` → ``conv1d(x, w, b, padding=3,
    groups=D)`` (HF's causal-conv reference). Only a run of leading parameters is moved, and
    only where every overload that accepts the call names that position alike; defaults are
    not filled in. Later passes can then read operands from ``node.args``."""
    for node in gm.graph.nodes:
        if not node.kwargs or node.target is operator.getitem:
            continue
        if node.op == "call_function":
            sigs = _signatures(node.target)
        elif node.op == "call_method" and isinstance(node.target, str) and \
                node.target not in _METHOD_ORDER_DIFFERS and hasattr(torch, node.target):
            # x.baddbmm(batch1=a, batch2=b): the method mirrors torch.baddbmm(input, ...)
            sigs = [sg for sg in _signatures(getattr(torch, node.target))
                    if next(iter(sg.parameters), None) in ("input", "self")]
        else:
            continue
        binding = []
        for sig in sigs:
            try:
                sig.bind(*node.args, **node.kwargs)
            except TypeError:
                continue
            binding.append(list(sig.parameters.values()))
        if not binding:
            continue
        args, kwargs = list(node.args), dict(node.kwargs)
        while True:
            i = len(args)
            ps = [params[i] if i < len(params) else None for params in binding]
            if any(p is None or p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                   for p in ps) or len({p.name for p in ps}) != 1 or ps[0].name not in kwargs:
                break
            args.append(kwargs.pop(ps[0].name))
        if len(args) != len(node.args):
            node.args, node.kwargs = tuple(args), kwargs


def _lower_add_matmul(gm: fx.GraphModule, node: fx.Node) -> None:
    """``addmm(bias, x, w)`` / ``baddbmm(inp, a, b)`` with ``beta=β, alpha=α`` (positional or
    keyword) → ``β·inp + α·(a @ b)``: GPT-2's ``Conv1D`` on ``x.view(-1, D)``, Megatron's core
    attention scores ``baddbmm(empty, q, kᵀ, beta=0, alpha=1/√d)``, Bloom's ALiBi
    ``alibi.baddbmm(batch1=q, batch2=k)``. With β = 0 ``inp`` is ignored, as torch ignores it
    (its NaNs do not propagate); symbolic coefficients leave the op as it is (opaque)."""
    inp, a, b = node.args[:3]
    beta = node.kwargs.get("beta", node.args[3] if len(node.args) > 3 else 1)
    alpha = node.kwargs.get("alpha", node.args[4] if len(node.args) > 4 else 1)
    if isinstance(beta, fx.Node) or isinstance(alpha, fx.Node) or \
            set(node.kwargs) - {"beta", "alpha"}:
        return
    out = _new(gm, node, torch.matmul, (a, b))
    if alpha != 1:
        out = _new(gm, node, operator.mul, (out, alpha))
    if beta != 0:
        scaled = inp if beta == 1 else _new(gm, node, operator.mul, (inp, beta))
        out = _new(gm, node, operator.add, (scaled, out))
    _replace(gm, node, out)


_MHA_PARAMS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight",
               "in_proj_bias", "bias_k", "bias_v", "add_zero_attn", "dropout_p",
               "out_proj_weight", "out_proj_bias", "training", "key_padding_mask", "need_weights",
               "attn_mask", "use_separate_proj_weight", "q_proj_weight", "k_proj_weight",
               "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal")
_MHA_DEFAULTS = {"training": True, "key_padding_mask": None, "need_weights": True,
                 "attn_mask": None, "use_separate_proj_weight": False, "q_proj_weight": None,
                 "k_proj_weight": None, "v_proj_weight": None, "static_k": None,
                 "static_v": None, "average_attn_weights": True, "is_causal": False}


def _lower_mha(gm: fx.GraphModule, node: fx.Node) -> None:
    """``F.multi_head_attention_forward`` (``nn.MultiheadAttention``, ``nn.Transformer*``) →
    projections, ``scaled_dot_product_attention`` and the output projection, so that the
    attention family sees it. Only the plain case is lowered: no ``bias_k``/``bias_v``,
    ``add_zero_attn``, ``static_k/v``, key padding mask, attention dropout while training, and
    the attention weights unused; anything else stays one opaque op (gathered by the fallback)."""
    a = dict(_MHA_DEFAULTS)
    a.update(zip(_MHA_PARAMS, node.args))
    a.update(node.kwargs)
    drop = a["dropout_p"]
    if (a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"]
            or a["static_k"] is not None or a["static_v"] is not None
            or a["key_padding_mask"] is not None or isinstance(drop, fx.Node)
            or (drop and a["training"])):
        return
    if any(not (u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0)
           for u in node.users):
        return  # the attention weights are read
    q_in, k_in, v_in = a["query"], a["key"], a["value"]
    if not all(isinstance(t, fx.Node) and len(shape(t) or ()) == 3 for t in (q_in, k_in, v_in)):
        return  # unbatched [T, E] inputs: left alone
    T, B, E = shape(q_in)
    S = shape(k_in)[0]
    H = int(a["num_heads"])
    bias = a["in_proj_bias"]
    if a["use_separate_proj_weight"]:
        ws = [a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]]
    else:
        ws = [_new(gm, node, operator.getitem, (_new(gm, node, torch.chunk,
                                                      (a["in_proj_weight"], 3)), i))
              for i in range(3)]
    bs = [None] * 3
    if bias is not None:
        chunks = _new(gm, node, torch.chunk, (bias, 3))
        bs = [_new(gm, node, operator.getitem, (chunks, i)) for i in range(3)]
    heads = []
    for x, w, b, L in ((q_in, ws[0], bs[0], T), (k_in, ws[1], bs[1], S), (v_in, ws[2], bs[2], S)):
        y = _new(gm, node, torch._C._nn.linear, (x, w, b))
        y = _new(gm, node, torch.reshape, (y, (L, B, H, -1)))
        heads.append(_new(gm, node, torch.permute, (y, (1, 2, 0, 3))))  # [B, H, L, hd]
    mask, causal = a["attn_mask"], bool(a["is_causal"])
    if causal and not a["need_weights"]:
        mask = None  # is_causal with a mask given: torch uses the causal kernel and no mask
    elif mask is not None:
        mv = node.meta.get("example_value")
        dt = (mv[0] if isinstance(mv, (tuple, list)) else mv).dtype
        if getattr(tensor_val(mask), "dtype", None) == torch.bool:  # True = masked out → additive -inf
            zeros = _new(gm, node, torch.zeros_like, (mask,), {"dtype": dt})
            mask = _new(gm, node, torch.masked_fill, (zeros, mask, float("-inf")))
        if len(shape(mask)) == 3:  # [B*H, T, S]
            mask = _new(gm, node, torch.reshape, (mask, (B, H, T, S)))
        causal = False
    o = _new(gm, node, torch._C._nn.scaled_dot_product_attention, tuple(heads),
             {"attn_mask": mask, "dropout_p": 0.0, "is_causal": causal})
    o = _new(gm, node, torch.permute, (o, (2, 0, 1, 3)))  # [T, B, H, hd]
    o = _new(gm, node, torch.reshape, (o, (T, B, E)))
    o = _new(gm, node, torch._C._nn.linear, (o, a["out_proj_weight"], a["out_proj_bias"]))
    for u in list(node.users):
        _replace(gm, u, o)
    gm.graph.erase_node(node)


_NONDETERMINISTIC = {"rand", "randn", "randint", "rand_like", "randn_like", "randint_like",
                     "dropout", "bernoulli", "multinomial", "normal", "randperm", "empty",
                     "empty_like", "new_empty"}


def _hoist_parameter_values(gm: fx.GraphModule) -> None:
    """Values computed from parameters and constants only, spelled the same way more than once
    (a Python loop recomputing ``torch.sigmoid(self.u)[None]`` or ``exp(-slope * C)`` in every
    step) become one node: the loop family then sees the same body in every step. Only pure,
    deterministic ops whose inputs nothing mutates."""
    from .sequence_axis import _is_param_or_buffer
    mutated = set()
    for n in gm.graph.nodes:
        if mutates(n) and n.args and isinstance(n.args[0], fx.Node):
            mutated.add(n.args[0])
    static: dict = {}  # node → is it computed from parameters (and constants) only
    seen: dict = {}
    batched = inside_vmap(gm)
    for n in list(gm.graph.nodes):
        if n.op == "placeholder":
            static[n] = _is_param_or_buffer(n) and n not in mutated
            continue
        if n.op == "get_attr":
            static[n] = n not in mutated and isinstance(val(n), torch.Tensor)
            continue
        # only values that read a parameter: fresh tensors (a state's zeros, a mask's ones)
        # keep one node per spelling, the families tell them apart by node
        if n.op not in ("call_function", "call_method") or n in batched or mutates(n) or \
                stateful(n) or n.is_impure() or (canonical_name(n) or "") in _NONDETERMINISTIC \
                or n in mutated or not n.all_input_nodes or \
                not all(static.get(a, False) for a in n.all_input_nodes) or \
                not isinstance(val(n), torch.Tensor):
            static[n] = False
            continue
        static[n] = True
        try:
            key = (n.op, n.target, repr(n.args), repr(sorted(n.kwargs.items())))
        except Exception:  # noqa: BLE001 - an argument without a stable repr: leave it
            continue
        first = seen.setdefault(key, n)
        if first is not n:
            n.replace_all_uses_with(first)
            gm.graph.erase_node(n)
            static.pop(n, None)


_EPS_WRAPPERS = {"add", "sub", "clamp", "clamp_min", "clip"}


def _is_own_row_sum(d: Any, A: fx.Node) -> bool:
    """``d`` is ``A.sum(-1, keepdim=True)``, perhaps plus a constant or clamped from below
    (``+ eps``, ``.clamp(min=eps)``): the normaliser of normalised linear attention."""
    while isinstance(d, fx.Node) and canonical_name(d) in _EPS_WRAPPERS:
        tensors = [a for a in list(d.args) + list(d.kwargs.values()) if isinstance(a, fx.Node)]
        if len(tensors) != 1 or d.args[0] is not tensors[0]:
            return False
        d = tensors[0]
    if not (isinstance(d, fx.Node) and canonical_name(d) == "sum" and d.args and
            d.args[0] is A):
        return False
    dims = d.args[1] if len(d.args) > 1 else d.kwargs.get("dim")
    keep = d.args[2] if len(d.args) > 2 else d.kwargs.get("keepdim", False)
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    nd = len(shape(A) or ())
    return bool(keep) and len(dims) == 1 and isinstance(dims[0], int) and \
        dims[0] % max(nd, 1) == nd - 1


def _row_scale_after_product(gm: fx.GraphModule) -> None:
    """``(A / d) @ V`` with ``d`` A's own row sum (Hedgehog/lolcats'
    ``a / (a.sum(-1, keepdim=True) + eps)`` before the value product) → ``(A @ V) / d``: the
    same numbers up to rounding, and the normalised causal linear attention the family knows.
    Other row scales (xLSTM's ``max(|C.sum|, exp(-m))``) keep the user's order: no pattern
    takes them, and a fallback should compute what the user wrote."""
    for node in list(gm.graph.nodes):
        if canonical_name(node) != "matmul" or node.op != "call_function" or len(node.args) != 2:
            continue
        a = node.args[0]
        if not (isinstance(a, fx.Node) and canonical_name(a) == "div" and len(a.users) == 1 and
                len(a.args) == 2 and isinstance(a.args[1], fx.Node)):
            continue
        A, d = a.args
        if not _is_own_row_sum(d, A):
            continue
        sa, sd, so = shape(A), shape(d), shape(node)
        if sa is None or sd is None or so is None or len(sd) < 2 or sd[-1] != 1 or \
                len(sa) < 2 or sd[-2] != sa[-2] or len(sd) > len(so):
            continue
        prod = _new(gm, node, torch.matmul, (A, node.args[1]))
        out = _new(gm, node, operator.truediv, (prod, d))
        if shape(out) != so:
            _replace(gm, out, prod)  # broadcasting changed the shape: undo
            gm.graph.erase_node(prod) if not prod.users else None
            continue
        _replace(gm, node, out)
        if not a.users:
            gm.graph.erase_node(a)


@register_pass("canonicalize")
def canonicalize(gm: fx.GraphModule, ctx: Ctx) -> fx.GraphModule:
    """Spellings → one vocabulary (matmul, permute, torch functions)."""
    from .inline_hops import inline_wrappers
    inline_wrappers(gm)  # activation-checkpointed / wrapped bodies → the flat graph
    _slicing_spellings(gm)
    _fresh_buffer_slice_writes(gm)
    _forward_slot_reads(gm)
    _functionalize_inplace(gm)
    _positional_kwargs(gm)
    batched = inside_vmap(gm)  # an inlined vmap's body (torch's associative_scan) stays as is
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or node in batched:
            continue
        name = canonical_name(node)
        if name == "einsum":
            _lower_einsum(gm, node)
        elif name in ("baddbmm", "addmm") and len(node.args) >= 3:
            _lower_add_matmul(gm, node)
        elif name in ("adaptive_avg_pool1d", "adaptive_max_pool1d"):
            _global_pool_to_reduction(gm, node, name)
        elif name in ("normalize", "linalg_vector_norm") and node.op == "call_function":
            _norms_to_norm(gm, node, name)
        elif name == "multi_head_attention_forward":
            _lower_mha(gm, node)
        elif name == "matmul" and not (node.op == "call_function" and
                                       node.target is torch.matmul):
            new = _new(gm, node, torch.matmul, tuple(node.args[:2]))
            _replace(gm, node, new)
        elif name in ("mT", "T", "t", "transpose", "permute") or (
                node.op == "call_function" and node.target in (torch.transpose, torch.swapaxes,
                                                               torch.swapdims)):
            _canon_transpose(gm, node)
        elif node.op == "call_method" and name in _METHODS_TO_FUNCTIONS and \
                hasattr(torch, name) and isinstance(node.args[0], fx.Node):
            new = _new(gm, node, getattr(torch, name), tuple(node.args), dict(node.kwargs))
            _replace(gm, node, new)
    _positional_kwargs(gm)  # the methods turned into functions above
    _row_scale_after_product(gm)
    _hoist_parameter_values(gm)
    eliminate_dead_code(gm)
    gm.recompile()
    return gm
