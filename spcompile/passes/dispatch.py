"""Token dispatch (MoE): this rank's rows sorted by expert, transformed row by row, put back.

transformers 5's default MoE experts (``grouped_mm_experts_forward``), torchtitan and Megablocks
sort the flattened ``[B*T*k]`` (token, choice) rows by their expert id, gather the tokens in that
order (``x[perm // k]``), run one matmul per expert over contiguous groups of rows
(``grouped_mm`` with offsets ``cumsum(histc(sorted_ids))``) and put the rows back in token order
(``out[perm] = y``, ``y[argsort(perm)]``, ``index_add_`` into zeros, ...). Each row is
transformed by a function of that row and its own expert id only, so with the flattened tokens
of this rank every rank computes exactly its rows of the global result, with no communication.
These rules (called from ``sequence_axis``) check that, one op at a time:

* ``sort``/``argsort`` of per-row ids along the token axis → the sorted values are rows in the
  order of that sort (``Shard(0, merged, order=key)``), the indices are row numbers
  (``RowIndex``: ``x[idx]`` takes rows laid out as ``src`` into the layout ``dst``);
* row numbers only index (``x[perm]``, ``index_select``, ``gather``), write
  (``out[perm] = y``, ``index_copy``, ``scatter``, ``index_add``/``scatter_add`` into a fresh
  buffer), invert (``argsort(perm)``, ``inv[perm] = arange(n)``) or drop the choice
  (``perm // k``: the token of a (token, choice) row); any other arithmetic on them is refused;
* between sort and unsort only row-by-row ops run (``sequence_axis`` refuses to regroup the rows,
  to mix orders, or to combine them with a per-position constant such as ``arange`` over them);
  a table looked up by per-row ids (``weight[expert_ids]``, HF's ``batched_mm``) is row by row;
* ``histc``/``bincount`` of the ids count this rank's rows per expert (``GroupCounts``); their
  ``cumsum`` are the offsets under which a grouped matmul (``F.grouped_mm``, ``torch._grouped_mm``,
  HF's ``transformers::grouped_mm_fallback``) of rows sorted by the same ids in ascending order
  is row by row. Used as a value anywhere else (a load-balancing loss) counts mean the global
  counts: the fallback all-reduces them for that use.

A layout is ``(order, rows, inner)``: the order ("" = token order, else the sort's key), the
local row count and the stride of the sequence factor inside the rows (``Shard.inner``; 0 in a
sorted order). Row numbers fit a value whose layout is their ``src``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import torch
import torch.fx as fx

from .graph_utils import arg, canonical_name, shape, tensor_val
from .sequence_axis import (GroupCounts, Mixing, Outputs, Replicate, RowIndex, Shard, _nd, _norm,
                            positions_form)

R = Replicate()

# matmuls over contiguous groups of rows, one weight per group (offs: the groups' ends)
GROUPED_MM = {"grouped_mm", "_grouped_mm", "transformers::grouped_mm_fallback",
              "transformers.grouped_mm_fallback"}
SORTS = {"sort", "argsort"}
COUNTS = {"histc", "bincount"}
_CASTS = {"to", "float", "double", "half", "bfloat16", "int", "long", "type", "type_as",
          "contiguous", "clone", "detach"}
_VIEWS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "expand",
          "expand_as", "repeat", "getitem", "permute"}
_SHAPE_ONLY = {"zeros_like", "ones_like", "empty_like", "full_like", "new_zeros", "new_ones",
               "new_empty", "new_full", "size", "dim", "shape", "getattr", "numel"}
_FRESH = {"empty", "zeros", "ones", "full", "new_empty", "new_zeros", "new_ones", "new_full",
          "empty_like", "zeros_like", "ones_like", "full_like"}
_CONST = _FRESH - {"empty", "new_empty", "empty_like"}
# writes of rows by row numbers: name → kind ("copy" overwrites, "add"/"reduce" accumulate)
_WRITES = {"setitem": "copy", "index_copy": "copy", "index_copy_": "copy", "scatter": "copy",
           "scatter_": "copy", "index_add": "add", "index_add_": "add", "scatter_add": "add",
           "scatter_add_": "add", "scatter_reduce": "reduce", "scatter_reduce_": "reduce",
           "index_reduce": "reduce", "index_reduce_": "reduce", "index_put": "put",
           "index_put_": "put"}
_INDICES_OF = {"topk", "sort", "max", "min", "kthvalue", "mode"}  # ops returning (values, indices)


@dataclass
class Permutation:
    """One sort of rows along the token axis and what the program does with its order."""
    node: fx.Node  # the sort / argsort
    ids: fx.Node  # the values sorted (casts and flattening views skipped)
    descending: bool
    rows: int
    gathers: List[fx.Node] = field(default_factory=list)  # rows taken into the sorted order
    grouped: List[fx.Node] = field(default_factory=list)  # grouped matmuls over its groups
    back: List[fx.Node] = field(default_factory=list)  # rows put back in token order
    counts: List[fx.Node] = field(default_factory=list)  # histc/bincount of its ids


# ------------------------------------------------------------------ helpers
def layout(an, p: Any, n: int) -> Optional[Tuple[str, int, int]]:
    """``(order, rows, inner)`` of a value placed ``p`` with ``n`` rows on dim 0 (None: not
    rows of this rank on dim 0, or their token layout is unknown)."""
    if not isinstance(p, Shard) or p.dim != 0 or p.rows:
        return None
    if p.order:
        return (p.order, n, 0)
    if p.merged:
        return ("", n, p.inner) if p.inner else None
    T = an.ctx.seq_len  # a plain shard [T_local * s]: rows are tokens, s per token
    return ("", n, n // T) if T and n % T == 0 else None


def _strip(node: Any) -> Any:
    """Back through casts and flattening views to the value they carry."""
    while isinstance(node, fx.Node) and canonical_name(node) in (
            _CASTS | {"view", "reshape", "flatten", "squeeze"}) and node.args and \
            isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _sorted_values_of(an, node: Any) -> Optional[Permutation]:
    """The permutation whose sorted values ``node`` is (``sort(ids)[0]``), else None."""
    node = _strip(node)
    if isinstance(node, fx.Node) and canonical_name(node) == "getitem" and \
            node.args[1] == 0 and isinstance(node.args[0], fx.Node):
        return an.perms.get(node.args[0].name)
    return None


def _ids_of(an, node: Any) -> Any:
    """What a count or a sort counts/sorts: the ids themselves for their sorted values."""
    perm = _sorted_values_of(an, node)
    return perm.ids if perm is not None else _strip(node)


def _nonnegative(an, node: Any, depth: int = 0) -> bool:
    """Are the values surely ≥ 0 (indices of topk/sort/max/argsort, ...)?"""
    node = _strip(node)
    if not isinstance(node, fx.Node) or depth > 8:
        return False
    name = canonical_name(node)
    if name in ("argsort", "argmax", "argmin", "bincount", "abs"):
        return True
    if name in ("clamp", "clamp_min") and isinstance(arg(node, 1, "min"), (int, float)) and \
            arg(node, 1, "min") >= 0:
        return True
    if name == "getitem" and isinstance(node.args[0], fx.Node):
        src = node.args[0]
        if canonical_name(src) in _INDICES_OF and node.args[1] == 1:
            return True
        if canonical_name(src) == "sort" and node.args[1] == 0:
            return _nonnegative(an, src.args[0], depth + 1)
    return False


def _leading_index(idx: Any) -> Optional[fx.Node]:
    """The tensor of ``x[t]`` / ``x[t, :]`` / ``x[t, ...]`` / ``x[t, None]`` (an index along
    dim 0 only)."""
    if isinstance(idx, fx.Node):
        return idx
    if isinstance(idx, tuple) and idx and isinstance(idx[0], fx.Node) and all(
            i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None))
            for i in idx[1:]):
        return idx[0]  # (trailing None: unit dims after the rows, x[perm, None])
    return None


def _uniform(node: Any) -> bool:
    """A fresh tensor of one constant (``zeros``, ``ones_like``, ``full``...), maybe cast or
    broadcast: the same in every row."""
    node = _strip(node)
    while isinstance(node, fx.Node) and canonical_name(node) in ("expand", "expand_as",
                                                                  "unsqueeze"):
        node = node.args[0]
    return not isinstance(node, fx.Node) or canonical_name(node) in _CONST


def _arange_of(node: Any, n: int) -> Optional[fx.Node]:
    """``arange(n)`` (maybe cast): the row numbers ``0..n-1`` themselves."""
    node = _strip(node)
    if isinstance(node, fx.Node) and canonical_name(node) == "arange" and \
            positions_form(node, n) == ("arange", 0, None):
        return node
    return None


def _is_int(node: Any) -> bool:
    v = tensor_val(node)
    return v is not None and not v.dtype.is_floating_point and not v.dtype.is_complex and \
        v.dtype != torch.bool


def _perm(an, key: str) -> Optional[Permutation]:
    return an.perms.get(key)


def _note(an, idx: RowIndex, node: fx.Node) -> None:
    """Record, for ``explain``, a read or write by row numbers of a permutation."""
    if idx.dst.order and not idx.src.order and _perm(an, idx.dst.order) is not None:
        _perm(an, idx.dst.order).gathers.append(node)
    elif idx.src.order and not idx.dst.order and _perm(an, idx.src.order) is not None:
        _perm(an, idx.src.order).back.append(node)


def _first_dim(node: fx.Node) -> Optional[int]:
    """The input dim a ``permute`` puts first."""
    dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) \
        else node.args[1:]
    return _norm(dims[0], len(dims)) if dims and isinstance(dims[0], int) else None


def _used_before(an, buf: fx.Node, node: fx.Node) -> bool:
    pos = an.pos
    return any(u is not node and pos.get(u, 1 << 30) < pos.get(node, 0) and
               canonical_name(u) not in _SHAPE_ONLY for u in buf.users)


def _reads_refused(an, idx: RowIndex) -> str:
    key = idx.dst.order or idx.src.order
    return f"the sort at {an.sort_line(key)}" if key else "a sort"


# ------------------------------------------------------------------ the entry point
def route(an, node: fx.Node, name: str, ps: List[Any]) -> Optional[Any]:
    """The placement of ``node`` when a dispatch rule decides it, else None (the usual
    rules run)."""
    if name in SORTS:
        return _sort(an, node, name)
    if name in COUNTS:
        return _counts(an, node, name)
    if name in GROUPED_MM:
        return _grouped_mm(an, node, name)
    if name in _WRITES:
        p = _write(an, node, name)
        if p is not None:
            return p
    if name in ("getitem", "index_select", "gather"):
        p = _read(an, node, name)
        if p is not None:
            return p
    special = [p for p in ps if isinstance(p, (RowIndex, GroupCounts, Outputs))]
    if not special:
        return None
    if name in _SHAPE_ONLY:
        return R  # a fresh tensor that only takes the shape (or a size)
    if any(isinstance(p, Outputs) for p in ps):
        return Mixing(f"{name} of the raw results of a sort")
    if any(isinstance(p, RowIndex) for p in ps):
        return _row_numbers(an, node, name)
    return _counts_value(an, node, name)


# ------------------------------------------------------------------ sorts
def _sort(an, node: fx.Node, name: str) -> Optional[Any]:
    """``sort``/``argsort`` of per-row values along the token axis (1-D): a permutation of this
    rank's rows. ``argsort`` of a permutation is its inverse."""
    x = node.args[0]
    p = an.get(x)
    dim = arg(node, 1, "dim", -1)
    desc = bool(arg(node, 2, "descending", False))
    if isinstance(p, RowIndex):
        if not p.bijective or _nd(x) != 1 or desc:
            return Mixing(f"{name} of row numbers that are not a permutation (e.g. perm // k), "
                          f"or in descending order: not the inverse permutation")
        inv = RowIndex(p.dst, shape(x)[0], p.src, True)
        _note(an, inv, node)
        return inv if name == "argsort" else Outputs((Mixing("sorted row numbers"), inv))
    if not isinstance(p, Shard) or p.rows or p.dim != 0 or _nd(x) != 1 or \
            not isinstance(dim, int) or _norm(dim, 1) != 0 or any(
                not isinstance(an.get(a), Replicate) for a in node.all_input_nodes[1:]):
        return None  # along another dim (dim_local), or not rows: the usual rules
    n = shape(x)[0]
    if layout(an, p, n) is None:
        return Mixing(f"{name} of rows whose layout along the tokens is unknown")
    key = node.name
    an.perms[key] = Permutation(node, _ids_of(an, x), desc, n)
    rows = Shard(0, True, 0, False, key)
    idx = RowIndex(p, n, rows, True)
    return idx if name == "argsort" else Outputs((rows, idx))


# ------------------------------------------------------------------ reads by row numbers
def _read(an, node: fx.Node, name: str) -> Optional[Any]:
    """``x[idx]``, ``index_select(x, 0, idx)``, ``gather(x, 0, idx)``: rows by row numbers, or
    a replicated table looked up by per-row ids (``weight[expert_ids]``)."""
    x = node.args[0]
    px = an.get(x)
    if name == "getitem":
        if isinstance(px, Outputs):
            i = node.args[1]
            ok = isinstance(i, int) and -len(px.items) <= i < len(px.items)
            return px.items[i] if ok else Mixing("indexing the results of a sort")
        index, dim = _leading_index(node.args[1]), 0
        if index is None:
            return _read_pairs(an, node)
    else:
        dim, index = arg(node, 1, "dim"), arg(node, 2, "index")
    if not isinstance(index, fx.Node) or not isinstance(dim, int) or _nd(x) < 1 or \
            _norm(dim, _nd(x)) != 0:
        return None
    pi = an.get(index)
    if isinstance(pi, RowIndex):
        if _nd(index) != (_nd(x) if name == "gather" else 1):
            return Mixing(f"{name} by row numbers of another shape")
        want, got = layout(an, pi.src, pi.n_src), layout(an, px, shape(x)[0])
        if got is None or got != want:
            return Mixing(f"{name} by row numbers of other rows ({pi.n_src} rows {pi.src}, "
                          f"from {_reads_refused(an, pi)}) of a value {px} with "
                          f"{shape(x)[0]} rows")
        _note(an, pi, node)
        return pi.dst
    if isinstance(px, Replicate) and isinstance(pi, Shard) and not pi.rows and _is_int(index) \
            and (name != "index_select" or _nd(index) == 1):
        return pi.at(pi.dim)  # a table row per row: weight[expert_ids], bias[sorted_ids]
    return None


def _read_pairs(an, node: fx.Node) -> Optional[Any]:
    """``w[perm // k, perm % k]``: row numbers for dim 0 and, for the next dims, per-row values
    aligned with them (the choice of each sorted row): one element per row, in their order."""
    idx = node.args[1]
    if not isinstance(idx, tuple) or len(idx) < 2 or not all(isinstance(i, fx.Node)
                                                             for i in idx):
        return None
    pi = an.get(idx[0])
    if not isinstance(pi, RowIndex) or any(_nd(i) != 1 for i in idx):
        return None
    x = node.args[0]
    n = shape(idx[0])[0]
    want = layout(an, pi.dst, n)
    if layout(an, an.get(x), shape(x)[0]) != layout(an, pi.src, pi.n_src) or any(
            layout(an, an.get(i), shape(i)[0]) != want for i in idx[1:]):
        return Mixing("indexing by row numbers together with values that are not aligned "
                      "with them")
    _note(an, pi, node)
    return pi.dst


# ------------------------------------------------------------------ writes by row numbers
def _write_args(node: fx.Node, name: str):
    """(buffer, dim, index, value) of a write."""
    if name == "setitem":
        return node.args[0], 0, _leading_index(node.args[1]), node.args[2]
    if name.startswith("index_put"):
        ind = node.args[1]
        one = ind[0] if isinstance(ind, (list, tuple)) and len(ind) == 1 else None
        return node.args[0], 0, one, node.args[2]
    src = "source" if name.startswith("index_") else "src"
    value = arg(node, 3, src, node.kwargs.get("value"))
    return node.args[0], arg(node, 1, "dim"), arg(node, 2, "index"), value


def _write(an, node: fx.Node, name: str) -> Optional[Any]:
    """Rows written by row numbers (``out[perm] = y``, ``index_copy``, ``scatter``,
    ``index_add``/``scatter_add``/``scatter_reduce`` into a fresh buffer) and the inverse
    permutation ``inv[perm] = arange(n)``; or a histogram of per-row ids spelled as a scatter
    (``zeros(E).scatter_add_(0, ids, w)``: a sum over rows)."""
    buf, dim, index, value = _write_args(node, name)
    kind = _WRITES[name]
    if kind == "put":
        kind = "add" if bool(arg(node, 3, "accumulate", False)) else "copy"
    if kind == "copy" and name.startswith("scatter") and node.kwargs.get("reduce"):
        kind = "reduce"  # scatter(..., reduce="add" / "multiply")
    if not isinstance(index, fx.Node) or not isinstance(buf, fx.Node):
        return None
    pi, pb = an.get(index), an.get(buf)
    inplace = name == "setitem" or name.endswith("_")
    if not isinstance(pi, RowIndex):
        return _histogram(an, node, name, kind, buf, dim, index, value, inplace)
    if not isinstance(dim, int) or _norm(dim, _nd(buf)) != 0:
        return Mixing(f"{name} by row numbers along another dim than the rows")
    if not name.startswith("scatter") and _nd(index) != 1:
        return Mixing(f"{name} by row numbers with more than one dim")
    if shape(buf)[0] != pi.n_src:
        return Mixing(f"{name} by row numbers of {pi.n_src} rows into {shape(buf)[0]} rows")
    n_idx = shape(index)[0]
    ar = _arange_of(value, n_idx)
    if ar is not None and kind == "copy" and pi.bijective and \
            canonical_name(buf) in _FRESH and _nd(index) == 1:
        if an.is_positions(ar):  # arange(n) with n = T_local: row numbers, not positions
            an.not_positions.add(ar)
        result: Any = RowIndex(pi.dst, n_idx, pi.src, True)  # the inverse permutation
    else:
        if isinstance(value, fx.Node):
            pv = an.get(value)
            sv = shape(value)
            if isinstance(pv, Replicate):
                if not _uniform(value) and sv is not None and len(sv) == _nd(buf) and sv[0] > 1:
                    return Mixing(f"{name} writes a value that is the same on every rank but "
                                  f"varies along the rows (one per sorted position)")
            elif layout(an, pv, sv[0] if sv else -1) != layout(an, pi.dst, n_idx):
                return Mixing(f"{name} writes rows {pv} by row numbers of other rows "
                              f"({pi.dst}, from {_reads_refused(an, pi)})")
        if kind == "copy" and not pi.bijective:
            return Mixing(f"{name} overwrites rows by row numbers that repeat (e.g. perm // k): "
                          f"which write wins is not defined; accumulate with index_add_ / "
                          f"scatter_add_ instead")
        if kind != "copy" and not _uniform(buf) and \
                layout(an, pb, shape(buf)[0]) != layout(an, pi.src, pi.n_src):
            return Mixing(f"{name} accumulates rows into a buffer {pb} that is not a fresh "
                          f"constant or the same rows")
        result = pi.src
    if inplace and pb != result:
        if canonical_name(buf) not in _FRESH or _used_before(an, buf, node):
            return Mixing(f"{name} writes in place into a buffer that is not fresh or is read "
                          f"before the write")
        an.pl[buf] = result  # later reads of the buffer see what the write made of it
    if not isinstance(result, RowIndex):  # rows written back where the index took them from
        _note(an, RowIndex(pi.dst, n_idx, pi.src, pi.bijective), node)
    return result


def _histogram(an, node, name, kind, buf, dim, index, value, inplace) -> Optional[Any]:
    """``zeros(E).scatter_add(0, ids, w)`` / ``index_add``: per-row ids (data, not row numbers)
    into a fresh replicated buffer: a sum over this rank's rows (``Partial``)."""
    from .sequence_axis import Partial
    pi, pb = an.get(index), an.get(buf)
    if kind != "add" or inplace or not isinstance(pb, Replicate) or not _uniform(buf) or \
            not isinstance(pi, Shard) or pi.rows or not isinstance(dim, int) or _nd(index) != 1:
        return None
    lay = layout(an, pi, shape(index)[0])
    pv = an.get(value) if isinstance(value, fx.Node) else R
    if lay is None or not (isinstance(pv, Replicate) and _uniform(value) or
                           layout(an, pv, (shape(value) or (-1,))[0]) == lay):
        return None
    return Partial()


# ------------------------------------------------------------------ row numbers as values
def _row_numbers(an, node: fx.Node, name: str) -> Any:
    """Ops on row numbers: casts, broadcasting views that keep the rows on dim 0, ``// c``
    (the token of a (token, choice) row), ``% c`` (the choice: a per-row value); nothing
    else."""
    x = node.args[0] if node.args else None
    p = an.get(x) if isinstance(x, fx.Node) else None
    others = [] if name in ("expand_as", "view_as", "reshape_as", "type_as") else [
        a for a in node.all_input_nodes if a is not x]  # (the *_as operand lends its shape)
    ok = isinstance(p, RowIndex) and all(isinstance(an.get(a), Replicate) for a in others)
    if ok and name in _CASTS:
        return p
    if ok and name in _VIEWS and shape(node) and shape(x) and shape(node)[0] == shape(x)[0] \
            and (name != "permute" or _first_dim(node) == 0):
        return p  # still row i → one row number (constant along the other dims)
    c = node.args[1] if len(node.args) > 1 else None
    floor = name in ("floordiv", "floor_divide") or (
        name == "div" and node.kwargs.get("rounding_mode") == "floor")
    if ok and (floor or name in ("remainder", "mod", "fmod")) and isinstance(c, int) and c > 0 \
            and not isinstance(c, bool):
        lay = layout(an, p.src, p.n_src)
        if lay is not None and not lay[0] and lay[2] % c == 0:
            if floor:  # (token, choice) rows → tokens: the rows of a layout with s/c per token
                return RowIndex(Shard(0, True, lay[2] // c), lay[1] // c, p.dst, False)
            return p.dst  # the choice of each row: a per-row value
    return Mixing(f"{name} uses row numbers of this rank's rows (from "
                  f"{_reads_refused(an, p) if isinstance(p, RowIndex) else 'a sort'}) as "
                  f"values: on a rank they number its own rows only")


# ------------------------------------------------------------------ counts and groups
def _counts(an, node: fx.Node, name: str) -> Optional[Any]:
    """``histc``/``bincount`` of per-row ids: this rank's count of rows per group."""
    x = node.args[0]
    p = an.get(x)
    if not isinstance(p, Shard) or p.rows or any(
            a is not x and not isinstance(an.get(a), Replicate) for a in node.all_input_nodes):
        return None
    why = ""
    if name == "histc":
        bins, lo, hi = arg(node, 1, "bins", 100), arg(node, 2, "min", 0), arg(node, 3, "max", 0)
        if not all(isinstance(v, (int, float)) for v in (bins, lo, hi)) or hi <= lo:
            return Mixing("histc with min = max takes its range from the data (on a rank, its "
                          "own rows): pass min and max")
        if lo > 0 or not _nonnegative(an, x):
            why = (f"histc(min={lo}) of values not known to be ≥ {lo} (rows below the range "
                   f"would shift every group)")
    elif arg(node, 1, "weights") is not None:
        why = "a weighted bincount is not a count of rows"
    return GroupCounts(getattr(_ids_of(an, x), "name", str(x)), False, why)


def _counts_value(an, node: fx.Node, name: str) -> Any:
    """Counts kept as counts (casts; ``cumsum`` → the groups' offsets), else used as values:
    then they mean the global counts, their sum over ranks (``count_uses``: the fallback
    all-reduces them for this op)."""
    x = node.args[0] if node.args else None
    p = an.get(x) if isinstance(x, fx.Node) else None
    if isinstance(p, GroupCounts) and len(node.all_input_nodes) == 1:
        if name in _CASTS:
            return p
        if name == "cumsum" and _nd(x) == 1 and not p.cumulative and \
                _norm(arg(node, 1, "dim", 0), 1) == 0:
            return GroupCounts(p.ids, True, p.why)
    counts = [a for a in node.all_input_nodes if isinstance(an.get(a), GroupCounts)]
    saved = {a: an.pl[a] for a in counts}
    try:
        for a in counts:
            an.pl[a] = R
        placement = an.rule(node)
    finally:
        an.pl.update(saved)
    an.count_uses[node] = counts
    return placement


def _grouped_mm(an, node: fx.Node, name: str) -> Any:
    """``grouped_mm(x, w, offs)``: row i of ``x`` times ``w[g]`` for the group ``g`` of row i.
    Row by row when ``x`` holds rows sorted ascending by ids and ``offs`` is the ``cumsum`` of
    this rank's counts of those ids."""
    x, w = node.args[0], node.args[1]
    offs = arg(node, 2, "offs")
    px, po = an.get(x), an.get(offs) if isinstance(offs, fx.Node) else None
    rest = [a for a in node.all_input_nodes if a is not x and a is not offs]
    why = None
    if not isinstance(px, Shard) or not px.order or px.dim != 0 or _nd(x) != 2:
        why = f"its input {px} is not 2-D rows in the order of a sort"
    elif _nd(w) != 3 or not all(isinstance(an.get(a), Replicate) for a in rest):
        why = "its weights are not one replicated [groups, in, out] tensor"
    elif not isinstance(po, GroupCounts) or not po.cumulative:
        why = f"its offsets {po or offs} are not the cumsum of this rank's per-group counts"
    else:
        perm = _perm(an, px.order)
        if perm is None or getattr(perm.ids, "name", None) != po.ids:
            why = f"its offsets count {po.ids}, not the ids the rows were sorted by"
        elif perm.descending:
            why = "the rows are sorted in descending order (groups are ascending)"
        elif po.why:
            why = po.why
    if why is not None:
        return Mixing(f"{name} whose groups are not those of this rank's sorted rows: {why}")
    _perm(an, px.order).grouped.append(node)
    return px


def position_constant(an, node: fx.Node, dim: int) -> Optional[str]:
    """A replicated operand of ``node`` that varies along ``dim`` of its result (not a fresh
    constant, not broadcast there), named; None when there is none."""
    out_nd = _nd(node)
    for a in node.all_input_nodes:
        if not isinstance(an.get(a), Replicate):
            continue
        s = shape(a)
        k = dim - (out_nd - len(s)) if s is not None else -1
        if k < 0 or s[k] == 1 or _uniform(a):
            continue
        return f"{canonical_name(a) or a.op} {tuple(s)}"
    return None


def refusal(ctx, node: fx.Node, where: str, reason: str) -> Optional[str]:
    """The error for an op no rule covers whose input holds sorted rows or row numbers: each
    rank sorts its own rows, so only row-by-row work is exact between sort and unsort."""
    pl = ctx.placements
    keys = []
    for a in node.all_input_nodes:
        p = pl.get(a)
        if isinstance(p, Shard) and p.order:
            keys.append(p.order)
        elif isinstance(p, RowIndex):
            keys.append(p.dst.order or p.src.order or "?")
        elif isinstance(p, GroupCounts):
            return (f"spcompile: {where} ({reason}) uses this rank's per-group counts "
                    f"({p}: torch.histc / bincount of its own rows' ids) on values that are not "
                    f"rows sorted by those ids: gathering the sequence around it would pair the "
                    f"global rows with this rank's counts. Sort the rows by the same ids first "
                    f"(torch.sort / argsort along the flattened tokens) and keep the grouped "
                    f"matmul between the sort and the way back to token order.")
    if not keys:
        return None
    perm = ctx.dispatch.get(keys[0])
    from .pipeline import source_line
    at = (source_line(perm.node) or perm.node.name) if perm is not None else keys[0]
    return (f"spcompile: {where} ({reason}) works on this rank's rows in the order of the sort "
            f"at {at} (MoE token dispatch), in a way that is not row by row. Each rank sorts "
            f"only its own rows, so between the sort and the way back to token order only "
            f"row-by-row work gives the rows of the full-sequence run: per-row ops, matmuls "
            f"with per-row or grouped weights (grouped_mm with offsets = cumsum of "
            f"torch.histc/bincount of the sorted ids), gathers by the permutation and its "
            f"inverse (out[perm] = y, index_copy, scatter, index_add_ into zeros, "
            f"y[argsort(perm)]). Slicing or splitting the sorted rows, a capacity limit by "
            f"position among them, or a reduction over them per expert depends on every "
            f"rank's rows (expert-choice or capacity-limited routing gives different results "
            f"sharded): route each token on its own (token-choice top-k without dropping), or "
            f"keep the sequence dim separate and do it before flattening the tokens.")


def output_refusal(ctx, node: fx.Node) -> Optional[str]:
    """The error for sorted rows or row numbers that leave the compiled graph."""
    p = ctx.placements.get(node)
    if not (isinstance(p, (RowIndex, Outputs)) or (isinstance(p, Shard) and p.order)):
        return None
    from .pipeline import source_line
    key = p.order if isinstance(p, Shard) else getattr(getattr(p, "dst", None), "order", "")
    key = key or (p.src.order if isinstance(p, RowIndex) else "")
    perm = ctx.dispatch.get(key)
    at = (source_line(perm.node) or perm.node.name) if perm is not None else "a sort"
    return (f"spcompile: {canonical_name(node) or node.name} at {source_line(node) or node.name}"
            f" leaves the compiled graph (it is returned, or a graph break follows it, e.g. "
            f".tolist() of per-expert counts for torch.split, or torch.bincount) while it holds "
            f"this rank's rows in the order of the sort at {at} (or their row numbers): on a "
            f"rank that order is of its own rows only, and no later graph can tell. Keep the "
            f"whole dispatch in one graph: group sizes from torch.histc(ids.float(), bins=E, "
            f"min=0, max=E-1) and torch.cumsum, experts through F.grouped_mm / "
            f"torch._grouped_mm (transformers' grouped_mm experts_implementation) or per-row "
            f"weights + bmm (batched_mm), and the rows back in token order before returning.")


__all__ = ["GROUPED_MM", "Permutation", "layout", "output_refusal", "position_constant",
           "refusal", "route"]
