"""Small helpers shared by the passes: op identity, example values, concrete evaluation."""
from __future__ import annotations

import logging
import operator
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx

Target = Any


def val(node: Any) -> Any:
    """The example value a node carries (``meta['example_value']`` or ``meta['val']``)."""
    if not isinstance(node, fx.Node):
        return node
    v = node.meta.get("example_value", node.meta.get("val"))
    if v is None and node.op == "get_attr" and node.graph.owning_module is not None:
        # a submodule Dynamo lifted (a higher-order op's body): the module itself
        obj: Any = node.graph.owning_module
        for part in node.target.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.nn.Module):
            return obj
    return v


def mutates(node: fx.Node) -> bool:
    """An in-place op (``buf.add_(1)``, ``x.index_add_(...)``, ``x[i] = v``, ``copy_``): its
    effect is the mutation, so it is kept even when its result is unused."""
    if node.op not in ("call_method", "call_function"):
        return False
    if node.op == "call_function" and (node.target is operator.setitem or
                                       node.target in _INPLACE_OPERATORS):
        return True
    if node.op == "call_function" and getattr(node.target, "__module__", None) in (
            "operator", "_operator"):
        return False  # operator.and_ / or_ are not in place (their names just end in _)
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return isinstance(name, str) and name.endswith("_") and not name.startswith("_")


def stateful(node: fx.Node) -> bool:
    """A call kept for its effect on torch's state, not for a value: functorch's level
    bookkeeping that Dynamo records around an inlined ``vmap`` / ``grad``
    (``_vmap_increment_nesting`` ... ``_vmap_decrement_nesting``); dropping it would leave the
    ``_add_batch_dim`` calls at the wrong level."""
    return node.op == "call_function" and (
        getattr(node.target, "__module__", "") or "").startswith(
            ("torch._functorch", "torch._C._functorch")) and val(node) is None


def inside_vmap(gm: fx.GraphModule) -> Set[fx.Node]:
    """The nodes Dynamo recorded inside an inlined ``vmap`` (between ``_vmap_increment_nesting``
    and its decrement): their example values are batched at a functorch level that is only
    live while the graph runs, so passes leave them as they are."""
    inner: Set[fx.Node] = set()
    depth = 0
    for n in gm.graph.nodes:
        name = getattr(n.target, "__name__", "") if n.op == "call_function" else ""
        if name == "_vmap_increment_nesting":
            depth += 1
        elif name == "_vmap_decrement_nesting":
            depth = max(0, depth - 1)
        elif depth:
            inner.add(n)
    return inner


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    """FX's dead-code elimination, keeping in-place mutations (FX treats every method call as
    pure: a BatchNorm's ``num_batches_tracked.add_(1)`` would vanish) and functorch's level
    bookkeeping (``stateful``)."""
    keep = lambda n: n.is_impure() or mutates(n) or stateful(n)  # noqa: E731
    for node in reversed(gm.graph.nodes):  # not Graph.eliminate_dead_code: it recurses into
        if not node.users and not keep(node):  # subgraphs with FX's own purity test, which
            gm.graph.erase_node(node)  # drops a custom autograd.Function's in-place writes
    attrs = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, child in gm.named_children():
        if name in attrs and isinstance(child, fx.GraphModule):
            eliminate_dead_code(child)
            child.recompile()


def seq_span(node: fx.Node, dim: int, T: int):
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


def tiles_axis(spans, T: int) -> bool:
    """Do the distinct ``[start, stop)`` spans (at least two) tile ``[0, T)`` exactly (the
    blocks of a Python loop over the sequence)?"""
    spans = sorted(set(spans))
    covered = 0
    for a, b in spans:
        if a != covered or b <= a:
            return False
        covered = b
    return len(spans) >= 2 and covered == T


def tensor_val(node: Any) -> Optional[torch.Tensor]:
    v = val(node)
    return v if isinstance(v, torch.Tensor) else None


def shape(node: Any) -> Optional[tuple]:
    v = tensor_val(node)
    return None if v is None else tuple(int(s) for s in v.shape)


def is_call(node: Any, *names: str) -> bool:
    """Is ``node`` a call of one of the canonical op ``names`` (see :func:`canonical_name`)?"""
    return isinstance(node, fx.Node) and canonical_name(node) in names


_FN_NAMES: Dict[Any, str] = {
    operator.matmul: "matmul", torch.matmul: "matmul", torch.bmm: "matmul", torch.mm: "matmul",
    operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div",
    operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
    operator.neg: "neg", torch.neg: "neg", operator.invert: "invert",
    operator.getitem: "getitem", operator.pow: "pow", torch.pow: "pow",
    operator.eq: "eq", operator.ne: "ne", operator.lt: "lt", operator.le: "le",
    operator.gt: "gt", operator.ge: "ge", operator.and_: "and", operator.or_: "or",
    torch.einsum: "einsum", torch.functional.einsum: "einsum",
    torch.nn.functional.linear: "linear", torch._C._nn.linear: "linear",
    torch.nn.functional.scaled_dot_product_attention: "sdpa",
    torch._C._nn.scaled_dot_product_attention: "sdpa",
    torch.nn.functional.softmax: "softmax", torch.softmax: "softmax",
    torch.nn.functional.log_softmax: "log_softmax", torch.log_softmax: "log_softmax",
    torch.nn.functional.cross_entropy: "cross_entropy",
    torch.nn.functional.embedding: "embedding", torch.embedding: "embedding",
    torch.nn.functional.conv1d: "conv1d", torch.conv1d: "conv1d",
    torch.nn.functional.pad: "pad", torch._C._nn.pad: "pad",
    torch.nn.functional.layer_norm: "layer_norm", torch.layer_norm: "layer_norm",
    torch.nn.functional.rms_norm: "rms_norm",
    torch.nn.functional.dropout: "dropout", torch.dropout: "dropout",
    torch.nn.functional.silu: "silu", torch.nn.functional.gelu: "gelu",
    torch._C._nn.gelu: "gelu", torch.nn.functional.relu: "relu", torch.relu: "relu",
    torch.nn.functional.elu: "elu", torch.nn.functional.softplus: "softplus",
    torch._C._nn.softplus: "softplus",
    torch.nn.functional.sigmoid: "sigmoid", torch.sigmoid: "sigmoid",
    torch.nn.functional.tanh: "tanh", torch.tanh: "tanh",
    torch.nn.functional.normalize: "normalize",
}
# Python's augmented assignments on tensors (``x /= s``): in place, named like the methods
_INPLACE_OPERATORS = {operator.iadd: "add_", operator.isub: "sub_", operator.imul: "mul_",
                      operator.itruediv: "div_", operator.ifloordiv: "floor_divide_",
                      operator.ipow: "pow_", operator.imod: "remainder_",
                      operator.iand: "bitwise_and_", operator.ior: "bitwise_or_"}
_FN_NAMES.update(_INPLACE_OPERATORS)
if hasattr(torch._C._nn, "elu"):
    _FN_NAMES[torch._C._nn.elu] = "elu"
if hasattr(torch.nn.functional, "mish"):
    _FN_NAMES[torch.nn.functional.mish] = "mish"

_METHOD_ALIASES = {"mm": "matmul", "bmm": "matmul", "__matmul__": "matmul", "multiply": "mul",
                   "divide": "div", "true_divide": "div", "subtract": "sub", "masked_fill_": None,
                   "transpose": "transpose", "swapaxes": "transpose", "swapdims": "transpose",
                   "mT": "mT"}


# fresh tensors and what they are filled with (None: the ``full`` value argument; ``empty``
# is unspecified, taken as 0): output buffers of loops, shifts written into a fresh buffer
FRESH_FILLS = {"zeros_like": 0.0, "new_zeros": 0.0, "zeros": 0.0, "ones_like": 1.0,
               "new_ones": 1.0, "ones": 1.0, "empty_like": 0.0, "new_empty": 0.0, "empty": 0.0,
               "full_like": None, "new_full": None, "full": None}


def canonical_name(node: fx.Node) -> Optional[str]:
    """One name per op whatever its spelling: 'matmul', 'mul', 'tril', 'cumsum', ..."""
    if node.op == "call_method":
        name = node.target
        return _METHOD_ALIASES.get(name, name) if name in _METHOD_ALIASES else name
    if node.op != "call_function":
        return None
    t = node.target
    if t in _FN_NAMES:
        return _FN_NAMES[t]
    if t is getattr and len(node.args) == 2 and isinstance(node.args[1], str):
        # tensor attributes that are ops (x.real of a complex tensor is elementwise)
        return {"mT": "mT", "T": "T", "shape": "shape", "real": "real", "imag": "imag",
                "data": "detach"}.get(node.args[1], "getattr")
    name = getattr(t, "__name__", None)
    mod = getattr(t, "__module__", "") or ""
    if name and (mod.startswith("torch") or mod == "" or mod == "builtins"):
        if isinstance(t, torch._ops.OpOverload) or isinstance(t, torch._ops.OpOverloadPacket):
            return f"{t.namespace}::{t._opname}" if hasattr(t, "_opname") else str(t)
        return name
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return f"{t.namespace}::{t._opname}"
    return name


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def bind_args(node: fx.Node, names: Sequence[str], defaults: Optional[dict] = None) -> dict:
    """The arguments after the first, by name: ``names`` in positional order, then the keywords
    among ``names`` (others are left out), over ``defaults``."""
    out = dict(defaults or {})
    out.update(dict(zip(names, node.args[1:])))
    out.update({k: v for k, v in node.kwargs.items() if k in names})
    return out


def one_entry_index(idx: Any, nd: int) -> Optional[Tuple[int, Any]]:
    """``(dim, entry)`` when a getitem index over ``nd`` dims is full slices except one entry
    (``S[:, :, i]``, ``buf[..., :-1, :]``; ``Ellipsis`` expanded), else None (no such entry,
    several, or a ``None``)."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if sum(1 for i in idx if i is Ellipsis) > 1 or any(i is None for i in idx):
        return None
    n_real = sum(1 for i in idx if i is not Ellipsis)
    out, cur = None, 0
    for i in idx:
        if i is Ellipsis:
            cur += nd - n_real
            continue
        if not (isinstance(i, slice) and i == slice(None)):
            if out is not None:
                return None
            out = (cur, i)
        cur += 1
    return out


def ancestors(node: fx.Node, stop: Optional[Set[fx.Node]] = None) -> Set[fx.Node]:
    seen: Set[fx.Node] = set()
    todo = [node]
    stop = stop or set()
    while todo:
        n = todo.pop()
        for inp in n.all_input_nodes:
            if inp not in seen and inp not in stop:
                seen.add(inp)
                todo.append(inp)
    return seen


def _no_autocast():
    import contextlib
    stack = contextlib.ExitStack()
    for dev in ("cpu", "cuda"):
        if dev == "cuda" and not torch.cuda.is_available():
            continue
        stack.enter_context(torch.autocast(dev, enabled=False))
    return stack


def evaluate(gm: fx.GraphModule, targets: Iterable[fx.Node], example_inputs: List[Any],
             cache: Optional[Dict[fx.Node, Any]] = None) -> List[Any]:
    """Concrete values of ``targets`` on the example inputs (runs only their ancestors).

    Runs in full precision: a graph compiled under ``torch.autocast`` would otherwise be
    evaluated in bf16/fp16 here and fail the value checks' tolerances."""
    targets = list(targets)
    cache = {} if cache is None else cache
    needed: Set[fx.Node] = set(targets)
    for t in targets:
        needed |= ancestors(t)
    # functorch's level bookkeeping has no data edges: run all of it, so that a needed op
    # inside an inlined vmap sees its level (increments and decrements stay balanced)
    needed |= {n for n in gm.graph.nodes if stateful(n)}
    # values at a functorch level live only during this run; the level calls always run
    batched = inside_vmap(gm) | {n for n in needed if stateful(n)}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    env: Dict[fx.Node, Any] = {}
    for n, x in zip(placeholders, example_inputs):
        env[n] = x
    with torch.no_grad(), _no_autocast():
        for n in gm.graph.nodes:
            if n not in needed or n.op in ("placeholder", "output"):
                continue
            if n in cache and n not in batched:
                env[n] = cache[n]
                continue
            args = fx.node.map_arg(n.args, lambda a: env[a])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
            if n.op == "call_function":
                env[n] = n.target(*args, **kwargs)
            elif n.op == "call_method":
                env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
            elif n.op == "get_attr":
                obj: Any = gm
                for part in n.target.split("."):
                    obj = getattr(obj, part)
                env[n] = obj
            elif n.op == "call_module":
                env[n] = gm.get_submodule(n.target)(*args, **kwargs)
            if n not in batched:
                cache[n] = env[n]
    return [env[t] for t in targets]


def depends_on_inputs(node: fx.Node, data_inputs: Set[fx.Node]) -> bool:
    return bool(ancestors(node) & data_inputs) or node in data_inputs


def _fake_mode_of(values: List[Any]):
    from torch._subclasses.fake_tensor import FakeTensor
    for v in values:
        if isinstance(v, FakeTensor):
            return v.fake_mode
    return None


def run_node_on_values(node: fx.Node, env_val=val) -> Any:
    """Compute a node's output from its inputs' example values (fake or real)."""
    args = fx.node.map_arg(node.args, env_val)
    kwargs = fx.node.map_arg(node.kwargs, env_val)
    leaves: List[Any] = []
    fx.node.map_aggregate((args, kwargs), lambda x: leaves.append(x) or x)
    mode = _fake_mode_of(leaves)

    def call():
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            obj: Any = node.graph.owning_module
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        raise NotImplementedError(node.op)

    if node.op == "get_attr":
        out = call()
        if mode is not None and isinstance(out, torch.Tensor):
            return mode.from_tensor(out, static_shapes=True)
        return out
    if mode is not None:
        # Real constants (e.g. get_attr buffers) must become fake in this mode.
        def fk(x):
            if isinstance(x, torch.Tensor) and not isinstance(x, torch._subclasses.FakeTensor):
                return mode.from_tensor(x, static_shapes=True)
            return x
        args = fx.node.map_aggregate(args, fk)
        kwargs = fx.node.map_aggregate(kwargs, fk)
        with mode, _quiet_fake_errors():
            return call()
    with torch.no_grad():
        return call()


class _quiet_fake_errors:
    """Silence FakeTensorMode's ERROR log of a failing meta function: the passes try ops on
    candidate shapes (a gathered input, a constant rebuilt with the global length) and report
    the failures they cannot recover from in their own error."""

    def __enter__(self):
        self.log = logging.getLogger("torch._subclasses.fake_tensor")
        self.level = self.log.level
        self.log.setLevel(logging.CRITICAL)

    def __exit__(self, *exc):
        self.log.setLevel(self.level)
        return False


def _autocast_at(node: fx.Node):
    """The ``torch.autocast`` region Dynamo recorded around ``node`` (``_enter_autocast`` ...
    ``_exit_autocast``): its (device, dtype, enabled) arguments, or None."""
    enter = getattr(torch.amp.autocast_mode, "_enter_autocast", None)
    if enter is None or not node.graph.find_nodes(op="call_function", target=enter):
        return None  # (the common case, without a walk)
    depth, n = 0, node.prev
    while n.op != "root":
        name = getattr(n.target, "__name__", "") if n.op == "call_function" else ""
        if name == "_exit_autocast":
            depth += 1
        elif name == "_enter_autocast":
            if depth == 0:
                return n.args[:3]
            depth -= 1
        n = n.prev
    return None


def set_meta(node: fx.Node) -> Any:
    """Fill ``meta['example_value']`` of a node a pass created, under the autocast state of
    where it sits (a matmul of fp32 and bf16 values is legal only inside the region)."""
    ac = _autocast_at(node)
    if ac is not None and len(ac) == 3 and ac[2]:
        with torch.autocast(ac[0], dtype=ac[1]):
            out = run_node_on_values(node)
    else:
        out = run_node_on_values(node)
    node.meta["example_value"] = out
    return out
