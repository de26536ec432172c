"""Pass 2 — sequence_axis: which dimension of each value is the (sharded) sequence axis.

Placements (one per node, in ``ctx.placements``):

* ``Replicate()`` — the same on every rank (parameters, constants, global reductions);
* ``Shard(dim)`` — this rank holds its contiguous slice of the sequence along ``dim``
  (``merged=True`` when the sequence was flattened into a larger dim, e.g. ``[B*T, V]`` logits:
  fine for token-local ops and reductions, not a contiguous slice);
* ``Partial()`` — a sum over the sequence of which this rank holds its part (``kᵀ v``);
* ``Pair(d0, d1)`` — a ``T×T`` value (attention scores, masks) of which a rank sees its diagonal
  block: only a detected pattern may consume it;
* ``Mixing(reason)`` — an op mixes tokens along the sharded axis and no rule covers it: a
  pattern must match it, or the fallback gathers around it.

The token dispatch of MoE layers (sort the flattened rows by expert, grouped matmuls, unsort;
``spcompile.passes.dispatch``) adds rows in the order of a sort (``Shard(..., order=key)``),
row numbers (``RowIndex``), per-expert counts of this rank's rows (``GroupCounts``) and the
two results of ``sort`` (``Outputs``).

Inputs: a user input is ``Shard(seq_dim)`` (option ``seq_dim``, per-input ``input_seq_dims``
or ``spcompile.mark_sequence``) when it has that dim; parameters and buffers are ``Replicate``.
The rules below are the ``RULES`` table: op name → function(node, placements) → Placement.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from .graph_utils import (ancestors as _ancestors, arg, bind_args, canonical_name, shape,
                          tensor_val, val)
from .pipeline import Ctx, register_pass


# fresh tensors shaped like their input (its values are not read)
_SHAPE_LIKE = {"ones_like", "zeros_like", "full_like", "empty_like"}
# batched linear algebra whose result drops the two matrix dims (a scalar per matrix)
_LINALG_SCALAR = {"linalg_det", "det", "logdet"}
# torch's fused recurrent layers (traced since spcompile sets Dynamo's allow_rnn): relayed
# (patterns/loop_relay.py)
_RNN_OPS = {"gru": "nn.GRU", "lstm": "nn.LSTM", "rnn_tanh": "nn.RNN", "rnn_relu": "nn.RNN"}


@dataclass(frozen=True)
class Replicate:
    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Shard:
    dim: int
    merged: bool = False
    # merged: the stride (in elements of the merged dim) of the sequence factor inside it, e.g.
    # 1 for [B, T, D] → [B*T, D]; 0 = unknown (the sequence cannot be taken apart again)
    inner: int = 0
    # rows: rank-local rows that eager code picked between compiled graphs (the tokens MoE
    # routing sent to one expert): token-local ops only; nothing may reduce or mix them
    rows: bool = False
    # order: "" = token order; else the key of the sort (``dispatch``) whose order the rows are
    # in (merged, inner 0): this rank's rows permuted by its own sort, row-by-row ops only
    order: str = ""

    def at(self, dim: int) -> "Shard":
        """The same sequence axis (merged, stride, rows, order) at another dim."""
        return Shard(dim, self.merged, self.inner, self.rows, self.order)

    def __str__(self) -> str:
        if self.rows:
            return f"Rows({self.dim})"
        if self.order:
            return f"S({self.dim},order of {self.order})"
        return f"S({self.dim}{f',merged/{self.inner}' if self.merged else ''})"


@dataclass(frozen=True)
class Partial:
    def __str__(self) -> str:
        return "P(sum)"


@dataclass(frozen=True)
class Pair:
    d0: int
    d1: int

    def __str__(self) -> str:
        return f"Pair({self.d0},{self.d1})"


@dataclass(frozen=True)
class Mixing:
    reason: str
    dim: Optional[int] = None

    def __str__(self) -> str:
        return f"Mixing({self.reason})"


@dataclass(frozen=True)
class RowIndex:
    """Row numbers of this rank's rows (dim 0 of the value; constant along its other dims):
    ``x[idx]`` takes the rows of an ``x`` laid out as ``src`` (``n_src`` rows) into the layout
    ``dst``. The indices of a sort along the token axis, ``perm // k``, the inverse
    permutation. ``bijective``: a permutation of ``range(n_src)``."""
    src: Shard
    n_src: int
    dst: Shard
    bijective: bool

    def __str__(self) -> str:
        return f"RowIndex({self.src}->{self.dst})"


@dataclass(frozen=True)
class GroupCounts:
    """Per-group (expert) counts of this rank's rows (``histc``/``bincount`` of their ids) or,
    ``cumulative``, their ``cumsum``: the group offsets of a grouped matmul over rows sorted by
    those ids. As a value anywhere else they mean the global counts, their sum over ranks.
    ``ids``: the node counted; ``why``: why they cannot be offsets ("" = they can)."""
    ids: str
    cumulative: bool = False
    why: str = ""

    def __str__(self) -> str:
        return f"{'Offsets' if self.cumulative else 'Counts'}({self.ids})"


@dataclass(frozen=True)
class Outputs:
    """One placement per result of a multi-output op (``sort``: values, indices)."""
    items: Tuple[Any, ...]

    def __str__(self) -> str:
        return "(" + ", ".join(str(p) for p in self.items) + ")"


R = Replicate()
Placement = Any

# ------------------------------------------------------------------ op tables
ELEMENTWISE = {
    "add", "sub", "mul", "div", "neg", "pow", "exp", "log", "sigmoid", "tanh", "relu", "silu",
    "gelu", "elu", "softplus", "mish", "abs", "sqrt", "rsqrt", "square", "reciprocal", "clamp",
    "clamp_min", "clamp_max", "exp2", "log1p", "expm1", "sin", "cos", "erf", "where",
    "masked_fill", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "invert", "float", "half",
    "bfloat16", "double", "to", "type_as", "contiguous", "clone", "detach", "dropout",
    "logical_not", "logical_and", "logical_or", "bitwise_not", "maximum", "minimum", "sign",
    "floor", "ceil", "round", "floordiv", "mod", "truediv", "rsub", "leaky_relu", "hardswish",
    "hardsigmoid", "relu6", "selu", "celu", "glu_", "lerp", "addcmul", "addcdiv", "mul_", "add_",
    "div_", "sub_", "exp_", "float_power", "fmod", "remainder", "atan", "asin", "acos", "sinh",
    "cosh", "logsigmoid", "softsign", "type", "alias", "requires_grad_", "sigmoid_", "tanh_",
    "int", "long", "bool", "nan_to_num", "isnan", "isinf", "isfinite", "silu_", "relu_",
    "zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like",
    "log_sigmoid", "logsigmoid", "hardtanh", "softshrink", "hardshrink", "tanhshrink", "gelu_",
    "mish_", "logit", "xlogy", "square_", "pow_", "rsqrt_", "sqrt_", "clamp_", "masked_fill_",
    "polar", "complex", "real", "imag", "angle", "conj", "conj_physical", "floor_divide_",
    "remainder_", "bitwise_and_", "bitwise_or_", "floor_divide", "bitwise_and", "bitwise_or",
}
CREATION = {"ones", "zeros", "full", "empty", "arange", "tensor", "eye", "rand", "randn",
            "randint", "linspace", "as_tensor", "tril_indices", "triu_indices", "ones_like_",
            "new_ones", "new_zeros", "new_full", "new_empty", "new_tensor", "scalar_tensor"}
REDUCTIONS = {"sum": "sum", "mean": "mean", "amax": "max", "amin": "min", "max": "max",
              "min": "min", "logsumexp": "logsumexp", "var": "var", "std": "std",
              "norm": "norm", "prod": "prod", "all": "all", "any": "any",
              "count_nonzero": "sum", "argmax": "argmax", "argmin": "argmin"}
# ops along one dim: canonical name → (index of the dim argument, its default)
_DIM_ARG = {"topk": (2, -1), "sort": (1, -1), "argsort": (1, -1), "glu": (1, -1)}


def reduction_args(node: fx.Node, name: str) -> Optional[Dict[str, Any]]:
    """``dims``, ``keepdim`` (and ``p`` of a norm, ``correction`` of var/std) of a reduction
    call, whatever the overload: ``torch.norm(x, p, dim, keepdim)``, ``x.norm(dim=1)``,
    ``torch.var(x, dim, unbiased, keepdim)``, ``x.var(False)``, ``x.std(1, correction=0)``;
    None where the arguments are not plain numbers."""
    a, kw = list(node.args[1:]), dict(node.kwargs)
    out: Dict[str, Any] = {}
    if name == "norm":
        if len(a) > 3:
            return None  # (out= / dtype= given positionally)
        vals = bind_args(node, ["p", "dim", "keepdim"])
        out["p"] = vals.get("p", "fro")
        out["dims"] = vals.get("dim")
        out["keepdim"] = vals.get("keepdim", False)
    elif name in ("var", "std"):
        unbiased = True
        if a and isinstance(a[0], bool):  # x.var(False)
            unbiased, a = a[0], a[1:]
            dims, keep = None, False
        else:
            dims = a[0] if a else kw.get("dim")
            rest = a[1:]
            if rest and isinstance(rest[0], bool) and len(rest) >= 2:
                unbiased, keep = rest[0], rest[1]  # var(x, dim, unbiased, keepdim)
            elif rest and isinstance(rest[0], bool):
                unbiased, keep = rest[0], kw.get("keepdim", False)
            elif rest:
                return None
            else:
                keep = kw.get("keepdim", False)
        unbiased = kw.get("unbiased", unbiased)
        corr = kw.get("correction", 1 if unbiased else 0)
        if corr is None:
            corr = 1
        if not isinstance(corr, (int, float)):
            return None
        out.update(dims=dims, keepdim=keep, correction=float(corr))
    elif name == "logsumexp":
        vals = bind_args(node, ["dim", "keepdim"], {"keepdim": False})
        out["dims"], out["keepdim"] = vals.get("dim"), vals["keepdim"]
    else:
        return None
    d = out["dims"]
    if not (d is None or isinstance(d, int) or isinstance(d, (list, tuple)) and
            all(isinstance(i, int) for i in d)) or not isinstance(out["keepdim"], bool):
        return None
    return out


def batch_norm_args(node: fx.Node) -> Optional[Dict[str, Any]]:
    """The arguments of ``F.batch_norm(x, running_mean, running_var, weight, bias, training,
    momentum, eps)`` or ``torch.batch_norm(x, weight, bias, running_mean, running_var,
    training, momentum, eps, cudnn_enabled)``, by name; None for another target."""
    import torch.nn.functional as F
    if node.op == "call_function" and node.target is F.batch_norm:
        names = ["running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"]
        defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1,
                    "eps": 1e-5}
    elif node.op == "call_function" and node.target is torch.batch_norm:
        names = ["weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
                 "cudnn_enabled"]
        defaults = {}
    else:
        return None
    out = bind_args(node, names, defaults)
    if not all(k in out for k in ("running_mean", "running_var", "weight", "bias", "training",
                                  "momentum", "eps")):
        return None
    if not isinstance(out["momentum"], (int, float, type(None))) or \
            not isinstance(out["eps"], (int, float)) or not isinstance(out["training"], bool):
        return None
    return out


def _nd(node: Any) -> int:
    s = shape(node)
    return -1 if s is None else len(s)


def _norm(d: int, nd: int) -> int:
    return d % nd if nd > 0 else d


class Analyzer:
    """Forward propagation of placements over the graph, in topological order."""

    def __init__(self, gm: fx.GraphModule, ctx: Ctx) -> None:
        self.gm, self.ctx = gm, ctx
        self.pl: Dict[fx.Node, Placement] = {}
        self.mixing: Dict[fx.Node, str] = {}  # ops that mix tokens: a pattern or the fallback
        self.demoted: set = set()  # arange(T) candidates that turned out not to be positions
        self.not_positions: set = set()  # arange(n) a rule read as row numbers 0..n-1
        self.conflicts: Dict[fx.Node, str] = {}
        self.perms: Dict[str, Any] = {}  # sort key → dispatch.Permutation (see dispatch)
        self.count_uses: Dict[fx.Node, List[fx.Node]] = {}  # ops using GroupCounts as values
        self.user_gathered: set = set()  # spcompile.gather_sequence calls in the model
        self._fresh_state()

    def _fresh_state(self) -> None:
        """What one propagation collects besides placements (also for a sub-analysis of a
        custom autograd function's body, which never runs ``run_once``)."""
        self.vmapped: Dict[Any, bool] = {}  # vmap levels whose batch dim is the sequence
        self.unit_chunks: Dict[fx.Node, int] = {}  # views splitting T into (1 chunk, T)
        self.perms, self.count_uses = {}, {}
        self.pos = {n: i for i, n in enumerate(self.gm.graph.nodes)}

    def get(self, a: Any) -> Placement:
        if isinstance(a, fx.Node):
            return self.pl.get(a, R)
        if isinstance(a, (list, tuple)):
            ps = [self.get(x) for x in a]
            return next((p for p in ps if not isinstance(p, Replicate)), R)
        return R

    # -------------------------------------------------------- inputs
    def input_placement(self, index: int, node: fx.Node, example: Any,
                        eager_made: bool = False, nested: bool = False) -> Placement:
        """An input's placement: an explicit mark (``input_seq_dims``, ``mark_sequence``), else
        the placement an earlier compiled graph gave the tensor when it returned it (a value
        crossing a graph break, see ``spcompile.boundary``), else ``Shard(seq_dim)`` when that
        dim has the sequence length, else replicated. ``eager_made``: the graph is the rest of a
        frame after a graph break and the input is the value the breaking instruction left on
        the stack (``torch.where(mask)``, ``h[mask]``, an opaque call): without a tag and
        without the sequence length it is refused, not taken for replicated. Such an input (or
        one of a ``nested`` frame, see ``run_once``) whose dim 0 is a token count ``B*T_local``
        of the sequence inputs is the flattened sequence (a ``[B*T, E]`` router output)."""
        from ..boundary import read_tag
        opts = self.ctx.options
        if not isinstance(example, torch.Tensor):
            return R
        if isinstance(example, torch.nn.Parameter) or _is_param_or_buffer(node):
            return R
        seq_dims = getattr(opts, "input_seq_dims", {}) or {}
        marked = getattr(example, "_spcompile_seq_dim", "unset")
        user_name = _user_name(node)
        explicit = index in seq_dims or user_name in seq_dims or marked != "unset"
        tag = None if explicit else read_tag(example)
        if tag is not None and tag[2]:  # returned by an earlier graph: its placement there
            p, wrapped, _ = tag
            if wrapped:
                node.meta["spcompile_replicated_input"] = True
            if isinstance(p, Shard) and not p.merged and p.dim < example.dim() and \
                    self.ctx.seq_len is None:
                self.ctx.seq_len = int(example.shape[p.dim])
            return p
        if index in seq_dims:
            dim = seq_dims[index]
        elif user_name in seq_dims:
            dim = seq_dims[user_name]
        elif marked != "unset":
            dim = marked
        else:
            dim = opts.seq_dim
        if dim is None or example.dim() == 0:
            return R
        if example.dim() > (dim if dim >= 0 else -dim - 1):
            d = dim % example.dim()
            T = int(example.shape[d])
            lead, lead_nd = getattr(self, "_lead", None) or (None, 0)
            if not explicit and lead is not None and d == len(lead) and \
                    example.dim() < lead_nd and self.ctx.seq_len in (None, T) and (
                    len(example.shape[:d]) != len(lead) or
                    any(int(a) not in (int(b), 1) for a, b in zip(example.shape[:d], lead))):
                # a weight-like tensor (a function's [D, D] argument, an unregistered module
                # attribute) whose dim happens to have the local length: its leading dims are
                # not the batch of the sequence inputs
                self.ctx.notes.append(
                    f"input {user_name or node.name} (shape {tuple(example.shape)}) has the "
                    f"sequence length on dim {d} but leading dims {tuple(example.shape[:d])}, "
                    f"not the batch {tuple(lead)} of the other sequence inputs: treated as not "
                    f"sequence-shaped (mark it with spcompile.mark_sequence(t, {d}) if wrong)")
                return R
            if self.ctx.seq_len is None:
                self.ctx.seq_len = T
                return Shard(d)
            if self.ctx.seq_len == T:
                return Shard(d)
        if tag is not None:  # a graph was given it before: its placement there
            return tag[0]
        if not explicit and (eager_made or nested) and self.ctx.world_size > 1 and \
                example.dim() >= 1 and int(example.shape[0]) in self.token_counts():
            return Shard(0, True, 1)  # [B*T_local, ...]: flattened tokens, batch-major
        if nested and not explicit:
            return R  # see run_once: rows, when no input is sequence-shaped
        if not explicit and eager_made and self.ctx.world_size > 1:
            from .fallback import SequenceParallelError
            raise SequenceParallelError(
                f"spcompile: input {user_name or node.name} (shape {tuple(example.shape)}) of a "
                f"graph Dynamo compiled after a graph break was computed outside the compiled "
                f"graphs, by eager code between them (a data-dependent op such as "
                f"torch.where(mask), nonzero, boolean indexing, or a part Dynamo skipped), and "
                f"has no dim of this rank's sequence length {self.ctx.seq_len}: spcompile cannot "
                f"tell whether it holds this rank's tokens (e.g. a flattened [B*T, E] router "
                f"output, token indices) or a value that is the same on every rank. Avoid the "
                f"graph break there (e.g. route MoE experts without data-dependent shapes), or "
                f"mark the tensor before the call: spcompile.mark_sequence(t, None) for a "
                f"replicated value, spcompile.mark_sequence(t, dim) for a sequence-shaped one.")
        if example.dim() > (dim if dim >= 0 else -dim - 1):
            self.ctx.notes.append(
                f"input {user_name or node.name} has length {example.shape[dim % example.dim()]} "
                f"on dim {dim % example.dim()}, not the sequence length {self.ctx.seq_len}: "
                f"treated as not sequence-shaped (mark it with spcompile.mark_sequence or "
                f"input_seq_dims if that is wrong)")
        return R

    def token_counts(self, own: bool = False) -> set:
        """``B*T_local`` (also ``B*H*T_local`` for ``[B, H, T, d]``) of the sequence-shaped
        inputs placed so far, else (unless ``own``) of the graph that ran last."""
        from ..boundary import last_tokens
        counts = set()
        for n, p in self.pl.items():
            s = shape(n)
            if n.op == "placeholder" and isinstance(p, Shard) and not p.merged and \
                    s is not None and p.dim < len(s):
                counts.add(math.prod(int(x) for x in s[:p.dim + 1]))
                counts.add(int(s[0]) * int(s[p.dim]))
        return counts if counts or own else set(last_tokens())

    def rows_inputs(self, placeholders: List[fx.Node], examples: List[Any]) -> None:
        """A frame that eager code called in the middle of a compiled forward, with no
        sequence-shaped input: its tensor inputs are rank-local rows that the eager code made
        (``hidden[top_x]``, the tokens an MoE router sent to one expert), the same kind of value
        the full-sequence run gives this function, only this rank's part. They are ``Rows`` on
        their first dim longer than 1 (else dim 0): token-local ops keep them; anything that
        reduces or mixes rows is refused (``check_rows``)."""
        for n, ex in zip(placeholders, examples):
            if not isinstance(ex, torch.Tensor) or ex.dim() == 0 or \
                    isinstance(ex, torch.nn.Parameter) or _is_param_or_buffer(n) or \
                    getattr(ex, "_spcompile_seq_dim", "unset") != "unset":
                continue
            dims = list(ex.shape[:-1]) if ex.dim() > 1 else list(ex.shape)
            d = next((i for i, x in enumerate(dims) if int(x) > 1), 0)
            self.pl[n] = Shard(d, True, 0, True)
        self.ctx.rows_frame = True
        self.ctx.seq_len = None
        self.ctx.notes = [m for m in self.ctx.notes if "not sequence-shaped" not in m]
        self.ctx.notes.append("a function eager code called with rank-local rows (no "
                              "sequence-shaped input): run token by token as it is")

    # -------------------------------------------------------- main loop
    def run(self) -> Dict[fx.Node, Placement]:
        """Propagate; an ``arange(T)`` whose values end up combined with a sequence axis along
        some other dim (``arange(heads)`` when heads == T_local) is demoted and the analysis
        runs again."""
        for _ in range(8):
            pl = self.run_once()
            bad = set()
            for node, why in self.conflicts.items():
                from .graph_utils import ancestors
                bad |= {a for a in ancestors(node) | {node}
                        if self.is_positions(a)}
            bad |= {a for a in self.not_positions if self.is_positions(a)}
            if not bad:
                return pl
            self.demoted |= bad
        return pl

    def run_once(self) -> Dict[fx.Node, Placement]:
        self.pl, self.mixing, self.conflicts = {}, {}, {}
        self._fresh_state()
        self.ctx.mixing = self.mixing
        self.ctx.dispatch, self.ctx.count_uses = self.perms, self.count_uses
        from ..boundary import called_from_compiled_frame, in_resume_frame, last_seq_len, \
            read_tag
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        examples = list(self.ctx.example_inputs)
        examples = [examples[i] if i < len(examples) else val(n)
                    for i, n in enumerate(placeholders)]
        produced = [not _is_param_or_buffer(n) and (read_tag(ex) or (0, 0, False))[2]
                    for n, ex in zip(placeholders, examples)]
        resume = self.ctx.world_size > 1 and in_resume_frame()
        # a function the eager part of a compiled forward calls: its length is that forward's
        nested = self.ctx.world_size > 1 and not resume and called_from_compiled_frame()
        if nested and self.ctx.seq_len is None:
            self.ctx.seq_len = last_seq_len()
        # values an earlier graph returned first: their placement fixes the sequence length
        # (after a graph break without one, the length of the graph that ran last does)
        order = sorted(range(len(placeholders)), key=lambda i: not produced[i])
        self._lead = _batch_of_inputs(placeholders, examples, self.ctx.options)
        for i in order:
            if not produced[i] and resume and self.ctx.seq_len is None:
                self.ctx.seq_len = last_seq_len()
            self.pl[placeholders[i]] = self.input_placement(
                i, placeholders[i], examples[i],
                eager_made=resume and _from_stack(placeholders[i]), nested=nested)
        if nested and not any(isinstance(self.pl[n], Shard) for n in placeholders) and any(
                isinstance(ex, torch.Tensor) and ex.dim() > 0 and not _is_param_or_buffer(n) and
                not isinstance(ex, torch.nn.Parameter) for n, ex in zip(placeholders, examples)):
            # (a frame with no tensor input of its own, cosFormer's get_index(seq_len), keeps
            # the caller's length: an arange(seq_len) there is this rank's positions)
            self.rows_inputs(placeholders, examples)
        self.ctx.tokens = tuple(sorted(self.token_counts(own=True)))
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            try:
                p = self.rule(node)
            except Exception as e:  # a rule that cannot decide must not pass silently
                from .fallback import SequenceParallelError
                if isinstance(e, SequenceParallelError):  # a rule's own refusal
                    raise
                if any(not isinstance(self.get(a), Replicate) for a in node.all_input_nodes):
                    p = Mixing(f"could not analyse {canonical_name(node)}: {e}")
                else:
                    p = R
            if isinstance(p, Mixing) and not any(isinstance(self.get(a), Mixing)
                                                 for a in node.all_input_nodes):
                # the op itself mixes tokens: record it, and give its value the placement it
                # has once computed over the whole sequence, so analysis goes on past it
                self.mixing[node] = p.reason
                ideal = self.ideal(node, p)
                if ideal is not None:
                    p = ideal
            self.pl[node] = p
        return self.pl

    def ideal(self, node: fx.Node, p: "Mixing") -> Optional[Placement]:
        """Placement of a mixing op's value when computed on the global sequence."""
        out = shape(node)
        if out is None:
            if isinstance(p.dim, int) and isinstance(val(node), (tuple, list)):
                return Shard(p.dim)  # cummax/cummin: (values, indices), both on the sequence
            return Replicate() if p.dim is None else None
        if p.dim == "replicate":
            return R
        if isinstance(p.dim, int):
            return Shard(p.dim % max(len(out), 1))
        for a in node.all_input_nodes:  # same shape as a sharded input: same sequence dim
            q = self.get(a)
            if isinstance(q, Shard) and shape(a) == out:
                return Shard(q.dim)
        for a in node.all_input_nodes:
            q = self.get(a)
            if isinstance(q, Shard) and shape(a) is not None and q.dim < len(out) and \
                    out[q.dim] == shape(a)[q.dim]:
                return Shard(q.dim)
        return None

    def is_positions(self, node: fx.Node) -> bool:
        """``arange(T_local)`` (or ``arange(s, s + T_local)``, or ``linspace(a, b, T_local)``):
        this rank's positions along the sequence (DESIGN.md §1), unless an earlier round found
        that its values line up with some other axis."""
        if node in self.demoted or self.ctx.seq_len is None:
            return False
        return positions_form(node, self.ctx.seq_len) is not None

    def rule(self, node: fx.Node) -> Placement:
        meta = node.meta.get("spcompile_placement")
        if meta is not None:  # ops a rewrite created know their own placement
            return meta
        if self.is_positions(node):
            return Shard(0)
        name = canonical_name(node) or ""
        if name in _LIKE_OTHER and node.args and isinstance(node.args[0], fx.Node):
            # P.type_as(x), P.to(x): the other tensor lends only its dtype/device
            return self.get(node.args[0])
        if name == "getitem" and isinstance(node.args[0], fx.Node) and \
                canonical_name(node.args[0]) in _RNN_OPS and node.args[0] in self.mixing:
            # (output, h_n[, c_n]) of a gathered nn.GRU / LSTM / RNN: the output runs along the
            # sequence like the input (this rank's part of it), the final states are global
            src = self.get(node.args[0].args[0])
            if node.args[1] == 0 and isinstance(src, Shard):
                return Shard(src.dim)
            return R
        ins = node.all_input_nodes
        ps = [self.get(a) for a in ins]
        if name in _USER_GATHERS:
            return self.user_gather(node)
        if name == "narrow" and ps and isinstance(ps[0], Replicate):
            p = self.user_shard(node)
            if p is not None:
                return p
        if all(isinstance(p, Replicate) for p in ps):
            return R
        if name in _SHAPE_LIKE and ps and isinstance(ps[0], Pair) and len(ps) == 1:
            # ones_like(scores): a rank's block of the global constant is the constant of its
            # block, like torch.ones(T, T) built with the local length (then a mask by value)
            return R
        if any(isinstance(p, Mixing) for p in ps):
            return Mixing("input is mixed", None)
        from .dispatch import route  # sorted rows, row numbers, group counts (MoE dispatch)
        p = route(self, node, name, ps)
        if p is not None:
            return p
        if any(isinstance(p, Pair) for p in ps) and name not in ELEMENTWISE:
            if name in ("matmul",):
                return self.matmul(node)
            if name == "permute":
                return self.permute(node)
            if name in ("softmax", "log_softmax") and isinstance(self.get(node.args[0]), Pair):
                pp = self.get(node.args[0])
                d = arg(node, 1, "dim")
                if isinstance(d, int) and d % _nd(node) == pp.d1:
                    return pp  # row softmax of scores: still T×T, for the attention pattern
            if name in ("reshape", "view", "unsqueeze", "squeeze", "expand", "contiguous",
                        "clone", "to", "float", "type_as", "repeat") and \
                    len(node.all_input_nodes) >= 1:
                pp = self.get(node.args[0])
                ish, osh = shape(node.args[0]), shape(node)
                if isinstance(pp, Pair) and ish and osh and (pp.d0, pp.d1) == (
                        len(ish) - 2, len(ish) - 1) and tuple(ish[-2:]) == tuple(osh[-2:]):
                    return Pair(len(osh) - 2, len(osh) - 1)
            if name == "getitem" and isinstance(self.get(node.args[0]), Pair):
                q = _pair_index(self.get(node.args[0]), node.args[1], _nd(node.args[0]))
                if q is not None:  # mask[None, None], bias[:, None]: new unit dims only
                    return q
            if name in ("tril", "triu") and isinstance(self.get(node.args[0]), Pair):
                pp = self.get(node.args[0])
                if (pp.d0, pp.d1) == (_nd(node) - 2, _nd(node) - 1):
                    return pp  # the diagonal block of tril(A) is tril of A's diagonal block
            if name == "sum" and isinstance(self.get(node.args[0]), Pair):
                pp = self.get(node.args[0])
                d = arg(node, 1, "dim")
                d = d[0] if isinstance(d, (list, tuple)) and len(d) == 1 else d
                if isinstance(d, int) and d % _nd(node.args[0]) == pp.d1:
                    return Mixing("row sums of T×T scores", pp.d0)
            return Mixing(f"{name} of a T×T value")
        fn = RULES.get(name)
        if fn is not None:
            return fn(self, node)
        if name in REDUCTIONS and not _binary_max_min(node, name):
            # before the pointwise test: ATen's max/min have a pointwise overload (max.other)
            return self.reduction(node, name)
        if name in ELEMENTWISE or _is_pointwise(name):
            return self.elementwise(node)
        if name in _RNN_OPS:
            return Mixing(f"a nonlinear recurrence over the sequence ({_RNN_OPS[name]}) has no "
                          f"sequence-parallel form")
        return Mixing(f"no rule for {name} on a sharded value")

    # -------------------------------------------------------- rules
    def elementwise(self, node: fx.Node) -> Placement:
        out_nd = _nd(node)
        if out_nd < 0:
            return Mixing("elementwise op without a tensor output")
        res: Optional[Placement] = None
        shards: List[Tuple[int, tuple]] = []  # (output dim, operand shape right-aligned)
        for a in node.all_input_nodes:
            p = self.get(a)
            nd = _nd(a)
            if isinstance(p, Shard):
                shards.append((p.dim + out_nd - nd, (1,) * (out_nd - nd) + tuple(shape(a))))
            if isinstance(p, Replicate):
                continue
            if isinstance(p, Partial):
                name = canonical_name(node)
                if name in ("mul", "div", "neg", "to", "float", "contiguous", "clone", "type_as",
                            "detach", "half", "bfloat16", "double") and \
                        all(isinstance(self.get(b), Replicate) for b in node.all_input_nodes
                            if b is not a):
                    q = Partial()
                else:
                    return Mixing("non-linear op on a partial sum")
            elif isinstance(p, Shard):
                q = p.at(p.dim + out_nd - nd)
            elif isinstance(p, Pair):
                q = Pair(p.d0 + out_nd - nd, p.d1 + out_nd - nd)
            else:
                return Mixing(str(p))
            if res is None:
                res = q
            elif res != q:
                if isinstance(res, Shard) and isinstance(q, Shard) and res.order != q.order:
                    return Mixing(f"rows in different orders ({res} vs {q}): row i of one is "
                                  f"not the token of row i of the other")
                if isinstance(res, Shard) and isinstance(q, Shard) and res.dim == q.dim:
                    res = Shard(res.dim, res.merged or q.merged, res.inner or q.inner,
                                res.rows or q.rows)
                elif isinstance(res, Pair) and isinstance(q, Shard) and q.dim in (res.d0, res.d1):
                    pass
                elif isinstance(q, Pair) and isinstance(res, Shard) and res.dim in (q.d0, q.d1):
                    res = q
                elif isinstance(res, Shard) and isinstance(q, Shard) and \
                        _outer(shards, res.dim, q.dim):
                    # an outer combination of two sequence axes (i - j, c_i - c_j): T×T
                    res = Pair(min(res.dim, q.dim), max(res.dim, q.dim))
                else:
                    self.conflicts[node] = f"{res} vs {q}"
                    return Mixing(f"inputs sharded differently ({res} vs {q})")
        # a replicated operand that spans the sequence length on the sharded dim broadcasts a
        # *local-length* constant: fine (token-local), nothing to do. Not so for rows in the
        # order of a sort: a constant per position there (arange over the sorted rows, a
        # capacity rank) is not a function of the row.
        if isinstance(res, Shard) and res.order:
            from .dispatch import position_constant
            bad = position_constant(self, node, res.dim)
            if bad is not None:
                return Mixing(f"{canonical_name(node)} combines the rows sorted at "
                              f"{self.sort_line(res.order)} with {bad}, which varies along them "
                              f"by position: on a rank that is the position among its own rows")
        return res if res is not None else R

    def sort_line(self, key: str) -> str:
        """The user line of the sort whose order ``key`` names (for messages)."""
        from .pipeline import source_line
        info = self.perms.get(key)
        return (source_line(info.node) or info.node.name) if info is not None else key

    def reduction(self, node: fx.Node, name: str) -> Placement:
        x = node.args[0]
        p = self.get(x)
        nd = _nd(x)
        ra = reduction_args(node, name) if name in ("norm", "var", "std") else None
        if ra is not None:
            dims, keep = ra["dims"], ra["keepdim"]
        else:
            dims = arg(node, 1, "dim", None)
            keep = bool(arg(node, 2, "keepdim", False))
        if name in ("max", "min") and len(node.args) < 2 and "dim" not in node.kwargs:
            dims = None
        if isinstance(dims, int):
            dims = (dims,)
        all_dims = dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0)
        if not isinstance(p, Shard):
            return Mixing(f"{name} of {p}")
        red = set(range(nd)) if all_dims else {_norm(d, nd) for d in dims}
        if p.dim in red:  # a global value: the reduction family or the fallback computes it
            return Mixing(f"{name} over the sequence", "replicate")
        if isinstance(val(node), tuple):  # max(dim) returns (values, indices)
            new = p.dim - sum(1 for d in red if d < p.dim) if not keep else p.dim
            return p.at(new)
        new = p.dim if keep else p.dim - sum(1 for d in red if d < p.dim)
        return p.at(new)

    def getitem(self, node: fx.Node) -> Placement:
        x, idx = node.args[0], node.args[1]
        p = self.get(x)
        if x in self.unit_chunks and isinstance(p, Shard):
            k = self.unit_chunks[x]
            items = idx if isinstance(idx, tuple) else (idx,)
            if Ellipsis not in items and None not in items and len(items) > k and \
                    isinstance(items[k], int) and all(i == slice(None) for i in items[:k]):
                return Mixing(ONE_CHUNK_INDEX, "replicate")
        if isinstance(val(x), (tuple, list)):  # picking an output of a multi-output op
            if isinstance(p, (Shard, Replicate, Partial)):
                return p
            return Mixing(str(p))
        if not isinstance(p, Shard):
            return Mixing(f"indexing a {p} value")
        sh = shape(x)
        if not isinstance(idx, tuple):
            idx = (idx,)
        if any(isinstance(i, (fx.Node, list, torch.Tensor)) for i in idx):
            # advanced indexing: token-local only if the sequence dim is untouched
            return Mixing("advanced indexing of a sharded value")
        # expand Ellipsis
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        out_dim = 0
        in_dim = 0
        res = None
        for i in idx:
            if i is Ellipsis:
                skip = len(sh) - n_real
                if in_dim <= p.dim < in_dim + skip:
                    res = p.at(out_dim + (p.dim - in_dim))
                in_dim += skip
                out_dim += skip
            elif i is None:
                out_dim += 1
            elif isinstance(i, int):
                if in_dim == p.dim:
                    return Mixing("integer index into the sequence axis", "replicate")
                in_dim += 1
            elif isinstance(i, slice):
                if in_dim == p.dim:
                    full = slice(None).indices(sh[in_dim])
                    if i.indices(sh[in_dim]) != full:
                        if _one_token(i):  # x[:, :1], x[:, -1:]: one global token, kept 2-D
                            return Mixing(ONE_TOKEN_SLICE, "replicate")
                        return Mixing("slice of the sequence axis", p.dim)
                    res = p.at(out_dim)
                in_dim += 1
                out_dim += 1
            else:
                return Mixing(f"index {i!r}")
        if res is None and p.dim >= in_dim:
            res = p.at(out_dim + (p.dim - in_dim))
        return res if res is not None else Mixing("index dropped the sequence axis")

    def reshape(self, node: fx.Node) -> Placement:
        x = node.args[0]
        p = self.get(x)
        if not isinstance(p, Shard):
            return Mixing(f"reshape of {p}") if not isinstance(p, Partial) else Partial()
        ish, osh = shape(x), shape(node)
        if p.order:  # sorted rows: only reshapes that keep the row dim whole
            pre, acc = math.prod(ish[:p.dim]), 1
            for j, s in enumerate(osh):
                if acc == pre and s == ish[p.dim]:
                    return p.at(j)
                acc *= s
            return Mixing(f"reshape regroups the rows sorted at {self.sort_line(p.order)} (on a "
                          f"rank, consecutive sorted rows are not those of the full sequence)")
        q = _map_reshape(ish, osh, p, self.ctx.seq_len)
        split = _sequence_split(node, ish, osh, p)
        if split is not None:
            inferred, j, m = split
            if inferred > 0:  # view(B, 2, -1, D): the block is a fraction of the LENGTH
                from .fallback import SequenceParallelError
                from .pipeline import source_line
                raise SequenceParallelError(
                    f"spcompile: {canonical_name(node)} at {source_line(node) or node.name} "
                    f"splits the sequence into a fixed number of blocks ({tuple(osh[j:j + m])} "
                    f"here, the block size -1 inferred from the length): on the whole sequence each "
                    f"block holds {self.ctx.world_size}x the tokens it holds here and spans "
                    f"ranks, so ops within a block would need other ranks' tokens in a way "
                    f"spcompile does not rewrite. Use "
                    f"blocks of a fixed size with the count inferred (x.view(B, -1, C, D): "
                    f"blocks stay inside a rank), or compute the layer on the whole sequence "
                    f"(outside the sequence-parallel model).")
            if inferred == 0:  # view(B, -1, C, D): fixed blocks, their count is the shard's
                if osh[j] == 1:
                    self.unit_chunks[node] = j
                return Shard(j)
        if isinstance(q, Shard) and not q.merged and q.dim > 0 and osh[q.dim - 1] == 1 and \
                len(osh) == len(ish) + 1 and osh[q.dim] == ish[p.dim] and \
                tuple(osh[:q.dim - 1]) == tuple(ish[:p.dim]):
            # x.view(B, T // C, C, D) with one chunk per rank: a loop over the chunks would be
            # unrolled once, its carried state invisible (see getitem)
            self.unit_chunks[node] = q.dim - 1
        return q

    def permute(self, node: fx.Node) -> Placement:
        x = node.args[0]
        p = self.get(x)
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) \
            else node.args[1:]
        nd = _nd(x)
        dims = [_norm(d, nd) for d in dims]
        if isinstance(p, Shard):
            return p.at(dims.index(p.dim))
        if isinstance(p, Pair):
            return Pair(dims.index(p.d0), dims.index(p.d1))
        return p

    def autograd_function(self, node: fx.Node) -> Placement:
        """``torch.autograd.Function.apply`` (Dynamo's ``autograd_function_apply``: forward and
        backward bodies, then the arguments). The forward body is analysed with the
        arguments' placements: if it treats tokens one by one, so does the function (its
        backward is the user's, applied to this rank's tokens); if it mixes tokens, the op
        mixes them too (the fallback computes it, user backward included, on the gathered
        sequence)."""
        body = val(node.args[0])
        if not isinstance(body, fx.GraphModule):
            return Mixing("custom autograd function (body not visible)")
        phs = [n for n in body.graph.nodes if n.op == "placeholder"]
        args = list(node.args[2:])
        if len(phs) != len(args):
            return Mixing("custom autograd function (arguments do not line up)")
        sub = Analyzer(body, self.ctx)
        sub.pl = {ph: self.get(a) for ph, a in zip(phs, args)}
        out = None
        for n in body.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                out = n
                break
            try:
                p = sub.rule(n)
            except Exception as e:  # noqa: BLE001 - cannot decide: mixing
                p = Mixing(f"could not analyse {canonical_name(n)}: {e}")
            if isinstance(p, Mixing):
                from .pipeline import source_line
                return Mixing(f"custom autograd function: {canonical_name(n)} at "
                              f"{source_line(n) or n.name} inside its forward {p.reason}")
            sub.pl[n] = p
        outs = out.args[0][0] if out is not None and isinstance(out.args[0], (tuple, list)) \
            and out.args[0] and isinstance(out.args[0][0], (tuple, list)) else None
        if outs is None:
            return Mixing("custom autograd function (outputs not understood)")
        ps = {str(sub.get(o)): sub.get(o) for o in outs if isinstance(o, fx.Node)}
        if len(ps) > 1:
            return Mixing(f"custom autograd function with outputs of different placements "
                          f"{sorted(ps)}")
        return next(iter(ps.values())) if ps else R

    def diff(self, node: fx.Node) -> Placement:
        """``torch.diff(x, n, dim, prepend, append)``: along the sequence axis it reads the
        previous token (a halo), elsewhere it is token-local."""
        x = node.args[0]
        p = self.get(x)
        d = _norm(arg(node, 2, "dim", -1), _nd(x))
        if isinstance(p, Shard) and not p.merged and d == p.dim:
            return Mixing("difference along the sequence axis", p.dim)
        if isinstance(p, Shard) and d != p.dim:
            return p
        return self.elementwise(node) if not isinstance(p, Shard) else Mixing("diff")

    def add_batch_dim(self, node: fx.Node) -> Placement:
        """``_add_batch_dim(x, bdim, level)`` (Dynamo's trace of ``vmap``): inside, values are
        one slice of ``x`` with ``bdim`` removed. Vmapped over the sequence, each slice is one
        token: replicated inside, sharded again when the batch dim comes back out."""
        x, bdim, level = node.args[0], node.args[1], node.args[2]
        p = self.get(x)
        if isinstance(p, Shard) and p.dim == _norm(bdim, _nd(x)):
            self.vmapped[level] = True
            return R
        if isinstance(p, Shard):
            return p.at(p.dim - (1 if p.dim > _norm(bdim, _nd(x)) else 0))
        return p

    def remove_batch_dim(self, node: fx.Node) -> Placement:
        """``_remove_batch_dim(y, level, batch_size, out_dim)``: the vmap's output."""
        y, level, out_dim = node.args[0], node.args[1], node.args[3]
        p = self.get(y)
        nd = _nd(node)
        if self.vmapped.get(level):
            if not isinstance(p, Replicate):
                return Mixing("a vmap over the sequence axis returns a value that also "
                              "depends on the sharded sequence")
            return Shard(_norm(out_dim, nd))
        if isinstance(p, Shard):
            return p.at(p.dim + (1 if p.dim >= _norm(out_dim, nd) else 0))
        return p

    def movedim(self, node: fx.Node) -> Placement:
        """``movedim(x, source, destination)`` (ints or sequences): a permutation."""
        x = node.args[0]
        p = self.get(x)
        nd = _nd(x)
        src, dst = arg(node, 1, "source"), arg(node, 2, "destination")
        src = [_norm(d, nd) for d in (src if isinstance(src, (list, tuple)) else [src])]
        dst = [_norm(d, nd) for d in (dst if isinstance(dst, (list, tuple)) else [dst])]
        order: List[Optional[int]] = [None] * nd  # output position → input dim
        for a, b in zip(src, dst):
            order[b] = a
        rest = iter(d for d in range(nd) if d not in src)
        order = [next(rest) if o is None else o for o in order]
        if isinstance(p, Shard):
            return p.at(order.index(p.dim))
        if isinstance(p, Pair):
            return Pair(order.index(p.d0), order.index(p.d1))
        return p

    def view_as_complex(self, node: fx.Node) -> Placement:
        """``[..., 2]`` real → ``[...]`` complex (drops the last dim)."""
        x = node.args[0]
        p = self.get(x)
        if isinstance(p, Shard) and p.dim < _nd(x) - 1:
            return p
        return Mixing(f"view_as_complex of {p}")

    def view_as_real(self, node: fx.Node) -> Placement:
        """``[...]`` complex → ``[..., 2]`` real (adds a last dim)."""
        p = self.get(node.args[0])
        return p if isinstance(p, (Shard, Pair)) else Mixing(f"view_as_real of {p}")

    def unsqueeze(self, node: fx.Node) -> Placement:
        x = node.args[0]
        p = self.get(x)
        d = _norm(arg(node, 1, "dim"), _nd(node))
        if isinstance(p, Shard):
            return p.at(p.dim + (1 if d <= p.dim else 0))
        return p

    def squeeze(self, node: fx.Node) -> Placement:
        return self.reshape(node)

    def matmul(self, node: fx.Node) -> Placement:
        a, b = node.args[0], node.args[1]
        pa, pb = self.get(a), self.get(b)
        na, nb, no = _nd(a), _nd(b), _nd(node)
        if na < 2 or nb < 2:
            return self._matmul_vector(pa, pb, na, nb)
        ra = rb = None  # roles: 'row', 'contr', 'batch'

        def role(p, nd, is_a):
            if isinstance(p, Replicate):
                return None
            if isinstance(p, Pair):
                return "pair"
            if not isinstance(p, Shard):
                return "other"
            if is_a:
                return {nd - 2: "row", nd - 1: "contr"}.get(p.dim, ("batch", p.dim - nd))
            return {nd - 2: "contr", nd - 1: "col"}.get(p.dim, ("batch", p.dim - nd))

        ra, rb = role(pa, na, True), role(pb, nb, False)
        if isinstance(pa, Shard) and isinstance(pb, Shard) and pa.order != pb.order:
            return Mixing(f"matmul of rows in different orders ({pa} vs {pb})")
        if ra == "pair" and rb == "contr":
            return Mixing("T×T scores times values", no - 2)
        if "pair" in (ra, rb) or "other" in (ra, rb):
            return Mixing("matmul with a T×T operand")
        if ra == "contr" and rb == "contr":
            return Partial()
        if ra == "contr" or rb == "contr":
            return Mixing("contraction over a sharded axis with a replicated operand")
        if ra == "row" and rb == "col":
            return Pair(no - 2, no - 1)
        if isinstance(ra, tuple) and isinstance(rb, tuple):
            if ra[1] != rb[1]:
                return Mixing("matmul operands sharded on different batch dims")
            return pa.at(no + ra[1])
        if isinstance(ra, tuple) and rb is None:
            return pa.at(no + ra[1])
        if isinstance(rb, tuple) and ra is None:
            return pb.at(no + rb[1])
        if ra == "row" and rb is None:
            return pa.at(no - 2)
        if rb == "col" and ra is None:
            return pb.at(no - 1)
        return Mixing("matmul with mixed sharding")

    @staticmethod
    def _matmul_vector(pa, pb, na: int, nb: int) -> Placement:
        """``x @ w`` with a vector ``w`` (a score per token: attention pooling's ``x @ q``)
        contracts ``x``'s last dim; ``v @ X`` contracts ``X``'s second to last. The sharded
        axis stays where it is, unless it is the one contracted."""
        if isinstance(pa, Replicate) and isinstance(pb, Replicate):
            return Replicate()
        if nb == 1 and na >= 2 and isinstance(pa, Shard) and isinstance(pb, Replicate) and \
                pa.dim < na - 1:
            return pa
        if na == 1 and nb >= 2 and isinstance(pb, Shard) and isinstance(pa, Replicate) and \
                pb.dim != nb - 2:
            return pb if pb.dim < nb - 2 else pb.at(nb - 2)
        return Mixing("matmul with a vector over the sequence axis")

    def linear(self, node: fx.Node) -> Placement:
        x = node.args[0]
        p = self.get(x)
        if not isinstance(p, Shard) or p.dim == _nd(x) - 1:
            return Mixing("linear over the sequence axis")
        if any(not isinstance(self.get(w), Replicate) for w in node.all_input_nodes[1:]):
            return Mixing("linear with a sharded weight")
        return p

    def softmax_like(self, node: fx.Node) -> Placement:
        x = node.args[0]
        p = self.get(x)
        d = _norm(arg(node, 1, "dim"), _nd(x))
        if isinstance(p, Shard) and p.dim != d:
            return p
        if isinstance(p, Pair) and d in (p.d0, p.d1):
            return Mixing("softmax over a T×T value")
        return Mixing(f"{canonical_name(node)} along the sequence axis", d)

    def cum(self, node: fx.Node) -> Placement:
        x = node.args[0]
        p = self.get(x)
        d = _norm(arg(node, 1, "dim"), _nd(x))
        if isinstance(p, Shard) and p.dim != d:
            return p
        return Mixing(f"{canonical_name(node)} along the sequence axis", d)

    def norm_layer(self, node: fx.Node) -> Placement:
        x = node.args[0]
        p = self.get(x)
        shp = arg(node, 1, "normalized_shape")
        k = len(shp) if isinstance(shp, (list, tuple)) else 1
        if isinstance(p, Shard) and p.dim < _nd(x) - k and all(
                isinstance(self.get(a), Replicate) for a in node.all_input_nodes[1:]):
            return p
        return Mixing("normalisation over the sequence axis")

    def embedding(self, node: fx.Node) -> Placement:
        ids, w = node.args[0], node.args[1]
        p = self.get(ids)
        if isinstance(p, Shard) and isinstance(self.get(w), Replicate):
            return p
        return Mixing("embedding with a sharded table")

    def group_norm(self, node: fx.Node) -> Placement:
        """``group_norm(x [N, C, *])``: statistics per sample over a group of channels and ALL
        trailing dims, so only a sequence folded into ``N`` (``[B*T, C]``) stays token-local;
        ``[B, C, T]`` (channels first) or ``[B, H, T, d]`` mixes tokens."""
        x = node.args[0]
        p = self.get(x)
        if isinstance(p, Shard) and p.dim == 0 and all(
                isinstance(self.get(a), Replicate) for a in node.all_input_nodes[1:]):
            return p
        if isinstance(p, Shard) and p.dim >= 2 and not (p.merged or p.rows or p.order) and \
                all(isinstance(self.get(a), Replicate) for a in node.all_input_nodes[1:]):
            return Mixing("group_norm statistics over the sequence axis", p.dim)
        return Mixing("group_norm over the sequence axis")

    def instance_norm(self, node: fx.Node) -> Placement:
        """``instance_norm(x [N, C, *])``: statistics per sample and channel over the trailing
        dims — the sequence among them in ``[B, C, T]``."""
        x = node.args[0]
        p = self.get(x)
        if isinstance(p, Shard) and p.dim >= 2 and not (p.merged or p.rows or p.order) and \
                all(isinstance(self.get(a), Replicate) for a in node.all_input_nodes[1:]):
            return Mixing("instance_norm statistics over the sequence axis", p.dim)
        return Mixing("instance_norm over the sequence axis")

    def batch_norm(self, node: fx.Node) -> Placement:
        """``batch_norm(x [N, C, *], ...)``: with running statistics (eval) a per-channel
        affine map, token-local; in training its statistics are over every dim but the
        channels', the sequence among them (``BatchNorm1d`` on ``[B, C, T]``): mixing, the
        result sharded as ``x``."""
        x = node.args[0]
        p = self.get(x)
        ba = batch_norm_args(node)
        if ba is None or not isinstance(p, Shard) or p.dim == 1 or p.merged or p.rows or \
                p.order or not all(isinstance(self.get(a), Replicate)
                                   for a in node.all_input_nodes[1:]):
            return Mixing("batch_norm over the sequence axis")
        if not ba["training"]:
            return p
        return Mixing("batch statistics over the sequence", p.dim)

    def dim_local(self, node: fx.Node) -> Placement:
        """Ops along one dim (``topk``, ``sort``, ``argsort``, ``glu``; the dim argument at the
        index ``_DIM_ARG`` gives, with its default): token-local unless that dim is the
        sequence."""
        x = node.args[0]
        p = self.get(x)
        index, default = _DIM_ARG[canonical_name(node)]
        d = arg(node, index, "dim", default)
        if isinstance(p, Shard) and isinstance(d, int) and _norm(d, _nd(x)) != p.dim and all(
                isinstance(self.get(a), Replicate) for a in node.all_input_nodes[1:]):
            return p
        return Mixing(f"{canonical_name(node)} along the sequence axis",
                      _norm(d, _nd(x)) if isinstance(d, int) else None)

    def one_hot(self, node: fx.Node) -> Placement:
        """``one_hot(idx, n)`` adds a last dim; with ``n = -1`` the width is the max of the
        (local) values."""
        p = self.get(node.args[0])
        n = arg(node, 1, "num_classes", -1)
        if isinstance(p, Shard) and isinstance(n, int) and n > 0:
            return p
        return Mixing("one_hot without num_classes (its width is a max over the sequence)",
                      "replicate")

    def index_along(self, node: fx.Node) -> Placement:
        """``scatter``/``gather``/``scatter_add``/``index_select``/``index_add`` (dim second) of
        a sharded ``x``: token-local when the indexed dim is not the sequence and every other
        non-replicated operand (the index, the source) is sharded like ``x``."""
        x = node.args[0]
        p = self.get(x)
        d = arg(node, 1, "dim")
        if isinstance(p, Shard) and isinstance(d, int) and _norm(d, _nd(x)) != p.dim and all(
                isinstance(self.get(a), Replicate) or self.get(a) == p
                for a in node.all_input_nodes[1:]):
            return p
        return Mixing(f"{canonical_name(node)} along the sequence axis")

    def repeat_interleave(self, node: fx.Node) -> Placement:
        """``repeat_interleave(x, r, dim)``: along another dim token-local; along the sequence
        with a fixed integer ``r`` each token is repeated in place (this rank's slice of the
        result is its own tokens, repeated); ``dim=None`` flattens."""
        x = node.args[0]
        p = self.get(x)
        r = arg(node, 1, "repeats")
        d = arg(node, 2, "dim")
        if d is None and _nd(x) == 1:
            d = 0  # dim=None flattens: a 1-D value is repeated along its one dim
        if isinstance(p, Shard) and isinstance(d, int) and not (
                isinstance(r, fx.Node) and not isinstance(self.get(r), Replicate)):
            if _norm(d, _nd(x)) != p.dim or (isinstance(r, int) and not p.merged):
                return p
            if isinstance(r, int) and p.merged and p.inner and not p.order and not p.rows:
                # flattened tokens [B*T, ...] → each row r times in place: [B*T*r, ...], the
                # sequence factor's stride grows r-fold (HF batched_mm's (token, choice) rows)
                return Shard(p.dim, True, p.inner * r)
        return Mixing("repeat_interleave along the sequence axis",
                      p.dim if isinstance(p, Shard) else None)

    def last_dim_local(self, node: fx.Node) -> Placement:
        """Ops that act on one dim only (``F.normalize(x, p, dim=1)``: dim 1 by default, the
        sequence of ``[B, T, D]``)."""
        x = node.args[0]
        p = self.get(x)
        dim = arg(node, 2, "dim", 1) if canonical_name(node) == "normalize" else -1
        if isinstance(p, Shard) and p.dim != _norm(dim, _nd(x)):
            return p
        return Mixing(f"{canonical_name(node)} along the sequence axis")

    def batched_linalg(self, node: fx.Node) -> Placement:
        """Linear algebra on the last two dims, batched over the others (``solve_triangular``,
        ``linalg.solve``, ``inv``, ``cholesky``, ``matrix_exp``, ``det``): a sequence axis among
        the batch dims (the chunks of a chunked form, ``[B, H, n, C, C]``) stays local; along
        the matrices' own axes it mixes."""
        off = None
        first = None
        for a in node.all_input_nodes:
            p = self.get(a)
            if isinstance(p, Replicate) or tensor_val(a) is None:
                continue
            if not isinstance(p, Shard) or p.rows or p.order:
                return Mixing(f"{canonical_name(node)} of a {p} value")
            o = p.dim - _nd(a)
            if o >= -2:
                return Mixing(f"{canonical_name(node)} along the sequence axis (a matrix axis)")
            if off is not None and o != off:
                return Mixing(f"{canonical_name(node)} of operands sharded on different dims")
            off, first = o, p
        if first is None:
            return R
        drop = 2 if canonical_name(node) in _LINALG_SCALAR else 0
        return first.at(_nd(node) + off + drop)

    def size_query(self, node: fx.Node) -> Placement:
        """Sizes, dims, ``x.new_zeros(...)``: Python numbers or fresh tensors (replicated).
        A tensor-valued attribute of a sharded value other than those below is not known."""
        if canonical_name(node) == "getattr" and isinstance(val(node), torch.Tensor) and \
                not isinstance(self.get(node.args[0]), Replicate):
            return Mixing(f"attribute {node.args[1]!r} of a sharded value")
        return R

    def split(self, node: fx.Node) -> Placement:
        x = node.args[0]
        p = self.get(x)
        d = _norm(arg(node, 2, "dim", 0), _nd(x))
        if isinstance(p, Shard) and p.dim != d:
            return p
        return Mixing("split along the sequence axis", d)

    def unbind(self, node: fx.Node) -> Placement:
        """``x.unbind(d)`` (dim is the 2nd argument; each piece loses dim ``d``), e.g. timm's
        ``qkv.reshape(B, T, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)``."""
        x = node.args[0]
        p = self.get(x)
        d = _norm(arg(node, 1, "dim", 0), _nd(x))
        if isinstance(p, Shard) and p.dim != d:
            return p.at(p.dim - (1 if d < p.dim else 0))
        if isinstance(p, (Replicate, Partial)):
            return p
        return Mixing("unbind along the sequence axis", d)

    def cat(self, node: fx.Node) -> Placement:
        tensors = node.args[0]
        d = arg(node, 1, "dim", 0)
        nd = _nd(node)
        d = _norm(d, nd)
        ps = [self.get(t) for t in tensors]
        shards = {p for p in ps if not isinstance(p, Replicate)}
        if len(shards) == 1 and isinstance(next(iter(shards)), Shard):
            p = next(iter(shards))
            if p.dim != d and all(isinstance(q, Shard) for q in ps):
                return p
        return Mixing("concatenation along the sequence axis" if any(
            isinstance(q, Shard) and q.dim == d for q in ps) else "cat of mixed placements", d)

    def stack(self, node: fx.Node) -> Placement:
        tensors = node.args[0]
        d = _norm(arg(node, 1, "dim", 0), _nd(node))
        ps = [self.get(t) for t in tensors]
        if all(isinstance(q, Shard) and q == ps[0] for q in ps):
            p = ps[0]
            return p.at(p.dim + (1 if d <= p.dim else 0))
        return Mixing("stack of mixed placements")

    def expand(self, node: fx.Node) -> Placement:
        x = node.args[0]
        p = self.get(x)
        if isinstance(p, Shard):
            return p.at(p.dim + _nd(node) - _nd(x))
        return p

    def repeat(self, node: fx.Node) -> Placement:
        """``x.repeat(*reps)`` / ``tile``: tiling the sequence (a count > 1 on its dim) gives
        ``[x; x]``, whose slice on a rank is not ``[x_r; x_r]``."""
        x = node.args[0]
        p = self.get(x)
        reps = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) \
            else node.args[1:]
        if not isinstance(p, Shard):
            return p
        out = _nd(node)
        reps = (1,) * (out - len(reps)) + tuple(reps)  # tile pads its dims on the left
        d = p.dim + out - _nd(x)
        if reps[d] != 1:
            return Mixing("repeat along the sequence axis", d)
        return p.at(d)

    def flatten(self, node: fx.Node) -> Placement:
        return self.reshape(node)

    def outer(self, node: fx.Node) -> Placement:
        """outer(a, b) = a[:, None] * b[None, :] (RoPE angles from positions)."""
        pa, pb = self.get(node.args[0]), self.get(node.args[1])
        if isinstance(pa, Shard) and isinstance(pb, Replicate):
            return pa.at(0)
        if isinstance(pb, Shard) and isinstance(pa, Replicate):
            return pb.at(1)
        if isinstance(pa, Shard) and isinstance(pb, Shard):
            return Pair(0, 1)
        return Mixing(f"outer of {pa} and {pb}")

    def sdpa(self, node: fx.Node) -> Placement:
        """Attention over dim -2. When q, k and v are sharded on another (batch) dim — blocks of
        the sequence ``x.view(B, T // C, C, D)`` attending within each block — it is local to
        each block; otherwise it mixes the sequence (the attention patterns take it)."""
        nd = _nd(node)
        q = arg(node, 0, "query")
        p = self.get(q) if isinstance(q, fx.Node) else None
        if isinstance(p, Shard) and not (p.merged or p.rows or p.order) and p.dim < nd - 2:
            d_right = nd - p.dim  # the sharded dim, counted from the right
            ok = True
            for a in node.all_input_nodes:
                pa, sa = self.get(a), shape(a)
                if sa is None:
                    continue
                if isinstance(pa, Shard):
                    ok &= not (pa.merged or pa.rows or pa.order) and \
                        len(sa) - pa.dim == d_right and sa[pa.dim] == shape(q)[p.dim]
                elif isinstance(pa, Replicate):
                    ok &= len(sa) < d_right or sa[len(sa) - d_right] == 1
                else:
                    ok = False
            if ok:
                return Shard(p.dim)
        if isinstance(p, Replicate) or p is None:
            # queries every rank holds (Perceiver latents, a pooling query): the attention
            # over the sequence's keys is the same on every rank, not sharded along the queries
            return Mixing("attention over the sequence", "replicate")
        return Mixing("attention over the sequence", nd - 2)

    def conv1d(self, node: fx.Node) -> Placement:
        """A pointwise ``conv1d`` (kernel 1, stride 1, no padding: Conformer's and Mamba's
        ``[B, C, T]`` projections) is token-local; any other mixes tokens."""
        x, w = node.args[0], arg(node, 1, "weight")
        p = self.get(x)
        ws = shape(w) if isinstance(w, fx.Node) else None
        stride, pad = arg(node, 3, "stride", 1), arg(node, 4, "padding", 0)
        one = lambda v: v in (1, (1,), [1])  # noqa: E731
        zero = lambda v: v in (0, (0,), [0], "valid")  # noqa: E731
        if isinstance(p, Shard) and ws is not None and ws[-1] == 1 and one(stride) and \
                zero(pad) and all(isinstance(self.get(a), Replicate)
                                  for a in node.all_input_nodes[1:]):
            return p
        return Mixing("convolution along the sequence", _nd(node) - 1)

    def pad(self, node: fx.Node) -> Placement:
        x = node.args[0]
        p = self.get(x)
        pads = arg(node, 1, "pad")
        nd = _nd(x)
        if isinstance(p, Shard):
            touched = {nd - 1 - i // 2 for i, v in enumerate(pads) if v != 0}
            if p.dim not in touched:
                return p
        return Mixing("padding along the sequence axis", getattr(p, "dim", None))

    def roll(self, node: fx.Node) -> Placement:
        x = node.args[0]
        p = self.get(x)
        dims = arg(node, 2, "dims", None)
        if not isinstance(p, Shard):
            return p if isinstance(p, Replicate) else Mixing(f"roll of a {p} value")
        if dims is None or (isinstance(dims, (list, tuple)) and not dims):
            return Mixing("roll of the flattened value (no dims)")
        nd = _nd(x)
        dims = [dims] if isinstance(dims, int) else list(dims)
        if p.dim not in {_norm(d, nd) for d in dims if isinstance(d, int)}:
            return p
        return Mixing("roll along the sequence axis", p.dim)

    def user_gather(self, node: fx.Node) -> Placement:
        """``spcompile.gather_sequence(x, dim)`` in the model: the whole sequence, the same on
        every rank (what follows runs on it as written)."""
        x, d = node.args[0], node.args[1]
        p = self.get(x)
        if isinstance(p, Shard) and not p.merged and isinstance(d, int) and \
                p.dim == d % max(_nd(x), 1):
            self.user_gathered.add(node)
            return R
        if isinstance(p, Replicate):  # not sequence data: an all-gather of copies
            return R
        return Mixing(f"gather_sequence along dim {d} of a {p} value")

    def user_shard(self, node: fx.Node) -> Optional[Placement]:
        """``spcompile.shard_sequence(y, dim)`` in the model (traced as ``y.narrow(dim, r·n, n)``
        on this rank) of a value computed from a ``gather_sequence``: this rank's shard again."""
        x = node.args[0]
        d, start, length = (list(node.args[1:4]) + [None] * 3)[:3]
        sx = shape(x)
        P, r = self.ctx.world_size, self.ctx.rank
        if sx is None or not all(isinstance(v, int) for v in (d, start, length)) or \
                not self.user_gathered:
            return None
        d = d % len(sx)
        if sx[d] != P * length or start != r * length or length != self.ctx.seq_len:
            return None
        if not (_ancestors(x) & self.user_gathered) and x not in self.user_gathered:
            return None
        return Shard(d)

    def flip(self, node: fx.Node) -> Placement:
        x = node.args[0]
        p = self.get(x)
        if not isinstance(p, Shard):
            return p if isinstance(p, Replicate) else Mixing(f"flip of a {p} value")
        if p.dim not in flip_dims(node):
            return p
        return Mixing("flip along the sequence axis", p.dim)

    def cross_entropy(self, node: fx.Node) -> Placement:
        red = node.kwargs.get("reduction", "mean")
        if red == "none":
            x = node.args[0]
            p = self.get(x)
            if isinstance(p, Shard) and p.dim != 1:
                return p.at(p.dim if p.dim == 0 else p.dim - 1)
            return Mixing("cross_entropy over the sequence axis")
        return Mixing(f"cross_entropy with reduction={red!r}", "replicate")


def _pair_index(p: "Pair", idx: Any, nd: int) -> Optional["Pair"]:
    """Placement of ``x[idx]`` for a T×T ``x`` when ``idx`` only adds unit dims (``None``) and
    keeps whole dims (``:``, ``...``); None otherwise."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if not all(i is None or i is Ellipsis or i == slice(None) for i in idx) or \
            sum(1 for i in idx if i is Ellipsis) > 1:
        return None
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    out, d_in, mapping = 0, 0, {}
    for i in idx:
        if i is None:
            out += 1
        elif i is Ellipsis:
            for _ in range(nd - n_real):
                mapping[d_in] = out
                d_in, out = d_in + 1, out + 1
        else:
            mapping[d_in] = out
            d_in, out = d_in + 1, out + 1
    while d_in < nd:
        mapping[d_in] = out
        d_in, out = d_in + 1, out + 1
    return Pair(mapping[p.d0], mapping[p.d1])


def positions_form(node: fx.Node, T: int) -> Optional[Tuple[str, Any, Any]]:
    """``("arange", start, None)`` for ``arange(start, start + T)`` (step 1) and
    ``("linspace", start, end)`` for ``linspace(start, end, T)``; None otherwise. Sizes read from
    the sequence mean the global length, so these are the global positions of this rank's
    tokens (rewritten by the positions family)."""
    name = canonical_name(node)
    a = list(node.args)
    kw = node.kwargs
    if name == "arange":
        start, end, step = (0, a[0], 1) if len(a) == 1 else (
            (a[0], a[1], a[2] if len(a) > 2 else 1) if len(a) >= 2 else (0, None, 1))
        start = kw.get("start", start)
        end = kw.get("end", end)
        step = kw.get("step", step)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                   for v in (start, end, step)) or step != 1 or end - start != T:
            return None
        return ("arange", start, None)
    if name == "linspace":
        start = a[0] if len(a) > 0 else kw.get("start")
        end = a[1] if len(a) > 1 else kw.get("end")
        steps = a[2] if len(a) > 2 else kw.get("steps")
        if steps != T or T < 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                         for v in (start, end)):
            return None
        return ("linspace", start, end)
    return None


def _outer(shards: List[Tuple[int, tuple]], d0: int, d1: int) -> bool:
    """Do the operands sharded on ``d0`` and ``d1`` broadcast against each other along the
    sequence (size 1 on the other's sequence dim), as in ``n[:, None] - n[None, :]``?"""
    for dim, shp in shards:
        other = d1 if dim == d0 else d0
        if shp[other] != 1:
            return False
    return True


def _size_args(node: fx.Node, ish: Sequence[int]) -> Optional[List[Any]]:
    """The sizes a ``view`` / ``reshape`` / ``unflatten`` node was called with, one per output
    dim (ints, possibly -1), or None when they are not literal."""
    name = canonical_name(node)
    if name in ("view", "reshape"):
        sizes = node.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
            sizes = sizes[0]
        sizes = arg(node, 1, "shape", None) if not sizes else sizes
    elif name == "unflatten":
        d, inner = arg(node, 1, "dim"), arg(node, 2, "sizes")
        if not isinstance(d, int) or not isinstance(inner, (list, tuple)):
            return None
        d = _norm(d, len(ish))
        sizes = list(ish[:d]) + list(inner) + list(ish[d + 1:])
    else:
        return None
    if not isinstance(sizes, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in sizes):
        return None
    return list(sizes)


def _sequence_split(node: fx.Node, ish: Sequence[int], osh: Sequence[int],
                    p: "Shard") -> Optional[Tuple[int, int, int]]:
    """A reshape that splits the (plain) sequence dim into ``m >= 2`` output dims ``j..j+m-1``
    and keeps every other dim, written with a ``-1``: → (index of the -1 among the split dims,
    j, m). The -1 tells which size comes from the length: ``view(B, -1, C, D)`` (index 0) has
    blocks of C tokens, ``view(B, 2, -1, D)`` a fixed number of blocks whose size is a fraction
    of the length. None otherwise (no -1 there: the sizes alone cannot tell)."""
    if p.merged or p.rows or p.order:
        return None
    d = p.dim
    m = len(osh) - len(ish) + 1
    if m < 2 or tuple(osh[:d]) != tuple(ish[:d]) or \
            tuple(osh[d + m:]) != tuple(ish[d + 1:]) or math.prod(osh[d:d + m]) != ish[d]:
        return None
    sizes = _size_args(node, ish)
    if sizes is None or len(sizes) != len(osh):
        return None
    minus = [i for i in range(m) if sizes[d + i] == -1]
    if len(minus) != 1:
        return None
    i = minus[0]
    if i > 0 and (osh[d + i] == 1 or math.prod(osh[d:d + m]) == osh[d + i]):
        # reshape(B, T, -1, n) with a unit -1 (a feature split that leaves T whole) or
        # view(B, 1, -1, D) (one block: the whole sequence): no split of the sequence
        return None
    return i, d, m


def _map_reshape(ish: Sequence[int], osh: Sequence[int], p: Shard,
                 T: Optional[int] = None) -> Placement:
    """Where does the sequence of input dim ``p.dim`` go in a reshape ``ish → osh``?

    The sequence is a factor of ``T`` elements with a fixed flat stride (row-major; a shard on a
    chunk count ``[n_chunks, C, ...]`` continues into the chunk dim), which a reshape keeps: an output dim with that stride and size ``T`` → that dim; output dims that
    tile it exactly → the sequence was split into ``[n_chunks, C, ...]``, shard on the chunk
    count; an output dim that contains it with neighbours → ``merged`` with the factor's stride
    inside it (``[B, T, D] → [B*T, D]``), which a later reshape takes apart again
    (``[B*T, D] → [B, T, D]``). A merged input of unknown stride stays merged or is refused.
    """
    if p.merged and (not p.inner or not T):
        pre = math.prod(ish[:p.dim])
        acc = 1
        for j, s in enumerate(osh):
            if s != 1 and acc * s > pre and acc < pre * ish[p.dim]:
                return Shard(j, True)  # the first output dim that overlaps it
            acc *= s
        return Mixing("reshape mixes a merged sequence axis")
    if p.merged:
        L, S = T, p.inner * math.prod(ish[p.dim + 1:])  # the factor's length and flat stride
    else:
        L, S = ish[p.dim], math.prod(ish[p.dim + 1:])
        if T and L != T and T % L == 0:  # a chunk count: the sequence goes on into the chunks
            k, n = p.dim + 1, L
            while k < len(ish) and n < T:
                n *= ish[k]
                k += 1
            if n == T:
                L, S = T, math.prod(ish[k:])
    strides = [math.prod(osh[j + 1:]) for j in range(len(osh))]
    for j, s in enumerate(osh):
        st = strides[j]
        if s == 1:
            continue
        if st == S and s == L:
            return Shard(j)
        if st <= S and S % st == 0 and (st * s) % (S * L) == 0:
            return Shard(j, True, S // st)
        if L % s == 0 and st == S * (L // s):  # the factor is split over dims j..k
            prod, k = 1, j
            while k < len(osh) and prod < L:
                prod *= osh[k]
                k += 1
            if prod == L and strides[k - 1] == S:
                return Shard(j)
    return Mixing("reshape mixes the sequence axis")


_POINTWISE_CACHE: Dict[str, bool] = {}


def _batch_of_inputs(placeholders, examples, opts) -> Optional[tuple]:
    """The leading dims (before the sequence dim) of the sequence inputs: those of the
    unmarked user input with the most dims (``x`` [B, T, D] over a [D, D] weight argument), or
    None when that is ambiguous (no such input, or a tie of different leading dims). Returns
    (leading dims, that input's number of dims)."""
    d = opts.seq_dim
    if not isinstance(d, int) or d < 0:
        return None
    best, lead, tie = -1, None, False
    for n, ex in zip(placeholders, examples):
        if not isinstance(ex, torch.Tensor) or isinstance(ex, torch.nn.Parameter) or \
                _is_param_or_buffer(n) or ex.dim() <= d or \
                getattr(ex, "_spcompile_seq_dim", "unset") != "unset":
            continue
        cur = tuple(int(v) for v in ex.shape[:d])
        if ex.dim() > best:
            best, lead, tie = ex.dim(), cur, False
        elif ex.dim() == best and cur != lead:
            tie = True
    return None if tie or lead is None else (lead, best)


def _binary_max_min(node: fx.Node, name: str) -> bool:
    """``torch.max(a, b)`` / ``a.min(b)`` of two tensors: elementwise, not a reduction."""
    if name not in ("max", "min"):
        return False
    other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    return isinstance(other, fx.Node) and isinstance(tensor_val(other), torch.Tensor)


def _is_pointwise(name: str) -> bool:
    """Is ``name`` an ATen op tagged pointwise (``log_sigmoid``, ``hardtanh``, ``logit``...)?

    Torch-level functions share their ATen op's name; ATen's own ``pointwise`` tag then says
    they act element by element, so no table has to list every activation.
    """
    if name in _POINTWISE_CACHE:
        return _POINTWISE_CACHE[name]
    ok = False
    for cand in (name, name + "_forward", name.rstrip("_")):
        packet = getattr(torch.ops.aten, cand, None)
        if packet is None:
            continue
        try:
            ok = any(torch.Tag.pointwise in getattr(packet, o).tags for o in packet.overloads())
        except Exception:  # noqa: BLE001 - an op without tags is not pointwise for us
            ok = False
        if ok:
            break
    _POINTWISE_CACHE[name] = ok
    return ok


ONE_TOKEN_SLICE = "one-token slice of the sequence axis"
ONE_CHUNK_INDEX = "index into a chunk axis holding one chunk per rank"
# ops whose tensor arguments after the first only lend a dtype / device
def flip_dims(node: fx.Node) -> List[int]:
    """The dims (non-negative, sorted) a ``flip`` / ``fliplr`` / ``flipud`` node reverses."""
    dims = {"fliplr": [1], "flipud": [0]}.get(canonical_name(node)) or arg(node, 1, "dims")
    dims = [dims] if isinstance(dims, int) else list(dims or ())
    nd = _nd(node.args[0])
    return sorted({_norm(d, nd) for d in dims if isinstance(d, int)})


_LIKE_OTHER = {"to", "type_as"}
_USER_GATHERS = {"spcompile::gather_sequence", "spcompile::gather_sequence_rs"}


def _one_token(i: slice) -> bool:
    """A slice that takes one token at a fixed global position: ``[k:k+1]`` (k >= 0) or
    ``[-k:-k+1]`` / ``[-1:]`` (from the end)."""
    a, b, st = i.start, i.stop, i.step
    if st not in (None, 1) or not all(isinstance(v, (int, type(None))) for v in (a, b)):
        return False
    if isinstance(a, int) and a >= 0:
        return b == a + 1 or (a == 0 and b == 1)
    if a is None:
        return b == 1
    return a < 0 and (b == a + 1 if a < -1 else b in (None,))


def _is_param_or_buffer(node: fx.Node) -> bool:
    ga = node.meta.get("grapharg")
    src = getattr(ga, "source", None)
    if src is None:
        return False
    name = getattr(src, "name", None)
    name = name() if callable(name) else (name if isinstance(name, str) else str(src))
    text = type(src).__name__ + " " + name + " " + str(src)
    return "ParamBuffer" in text or "_parameters" in text or "_buffers" in text or \
        "Parameter" in text


def _from_stack(node: fx.Node) -> bool:
    """Is the input a value Dynamo kept on the stack across a graph break (``___stack0``, or
    an item of it): the result of the instruction that broke the graph?"""
    src = getattr(node.meta.get("grapharg"), "source", None)
    for _ in range(16):
        if src is None:
            return False
        name = getattr(src, "local_name", None)
        if isinstance(name, str):
            return name.startswith("___stack")
        src = getattr(src, "base", None)
    return False


def _user_name(node: fx.Node) -> Optional[str]:
    ga = node.meta.get("grapharg")
    src = getattr(ga, "source", None)
    local = getattr(src, "local_name", None)
    return local


RULES: Dict[str, Callable[[Analyzer, fx.Node], Placement]] = {
    "getitem": Analyzer.getitem,
    "reshape": Analyzer.reshape, "view": Analyzer.reshape, "view_as": Analyzer.reshape,
    "reshape_as": Analyzer.reshape, "flatten": Analyzer.reshape, "unflatten": Analyzer.reshape,
    "squeeze": Analyzer.reshape,
    "permute": Analyzer.permute, "unsqueeze": Analyzer.unsqueeze,
    "movedim": Analyzer.movedim, "moveaxis": Analyzer.movedim, "diff": Analyzer.diff,
    "autograd_function_apply": Analyzer.autograd_function,
    "_add_batch_dim": Analyzer.add_batch_dim, "_remove_batch_dim": Analyzer.remove_batch_dim,
    "view_as_complex": Analyzer.view_as_complex, "view_as_real": Analyzer.view_as_real,
    "matmul": Analyzer.matmul, "linear": Analyzer.linear,
    "roll": Analyzer.roll,
    "flip": Analyzer.flip, "fliplr": Analyzer.flip, "flipud": Analyzer.flip,
    "softmax": Analyzer.softmax_like, "log_softmax": Analyzer.softmax_like,
    "cumsum": Analyzer.cum, "cumprod": Analyzer.cum, "cummax": Analyzer.cum,
    "cummin": Analyzer.cum, "logcumsumexp": Analyzer.cum,
    "layer_norm": Analyzer.norm_layer, "rms_norm": Analyzer.norm_layer,
    "group_norm": Analyzer.group_norm, "batch_norm": Analyzer.batch_norm,
    "instance_norm": Analyzer.instance_norm,
    "topk": Analyzer.dim_local, "sort": Analyzer.dim_local, "argsort": Analyzer.dim_local,
    "glu": Analyzer.dim_local, "one_hot": Analyzer.one_hot,
    "scatter": Analyzer.index_along, "scatter_add": Analyzer.index_along,
    "gather": Analyzer.index_along, "index_select": Analyzer.index_along,
    "index_add": Analyzer.index_along,
    "embedding": Analyzer.embedding, "normalize": Analyzer.last_dim_local,
    **{n: Analyzer.batched_linalg for n in (
        "linalg_solve_triangular", "solve_triangular", "linalg_solve", "linalg_inv", "inverse",
        "linalg_cholesky", "cholesky", "matrix_exp", "linalg_matrix_exp", "linalg_pinv",
        "pinverse", "linalg_det", "det", "logdet", "cholesky_solve", "cholesky_inverse")},
    "size": Analyzer.size_query, "dim": Analyzer.size_query, "shape": Analyzer.size_query,
    "getattr": Analyzer.size_query,
    # fresh tensors that only take the input's dtype/device (their sizes are Python ints)
    "new_zeros": Analyzer.size_query, "new_ones": Analyzer.size_query,
    "new_full": Analyzer.size_query, "new_empty": Analyzer.size_query,
    "split": Analyzer.split, "chunk": Analyzer.split, "unbind": Analyzer.unbind,
    "cat": Analyzer.cat, "concat": Analyzer.cat, "concatenate": Analyzer.cat,
    "stack": Analyzer.stack, "expand": Analyzer.expand, "expand_as": Analyzer.expand,
    "repeat_interleave": Analyzer.repeat_interleave,
    "broadcast_to": Analyzer.expand, "repeat": Analyzer.repeat, "tile": Analyzer.repeat,
    "outer": Analyzer.outer, "ger": Analyzer.outer,
    "sdpa": Analyzer.sdpa, "conv1d": Analyzer.conv1d, "pad": Analyzer.pad,
    "cross_entropy": Analyzer.cross_entropy,
}


def analyze(gm: fx.GraphModule, ctx: Ctx) -> Dict[fx.Node, Placement]:
    ctx.seq_len = None if not ctx.placements else ctx.seq_len
    pl = Analyzer(gm, ctx).run()
    ctx.placements = pl
    return pl


def _rows(p: Placement) -> bool:
    return isinstance(p, Shard) and p.rows


def check_rows(gm: fx.GraphModule, ctx: Ctx) -> None:
    """In a frame of rank-local rows (``Analyzer.rows_inputs``) every value computed from the
    rows must stay rows: a sum, mean, sort or scan over them, or anything that mixes them,
    would see only this rank's part of what the full-sequence run sees, so it is refused."""
    from .fallback import SequenceParallelError
    from .pipeline import source_line
    pl = ctx.placements
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output") or \
                not any(_rows(pl.get(a)) for a in node.all_input_nodes):
            continue
        if canonical_name(node) in CREATION:
            continue
        v = val(node)
        tensors = v if isinstance(v, (tuple, list)) else (v,)
        if node not in ctx.mixing and not any(isinstance(t, torch.Tensor) for t in tensors):
            continue
        if node not in ctx.mixing and _rows(pl.get(node)):
            continue
        raise SequenceParallelError(
            f"spcompile: {canonical_name(node)} at {source_line(node) or node.name} combines "
            f"rows across tokens, but this function was called by eager code with rank-local "
            f"rows only (no input has this rank's sequence length {last_seq_len_str()}): e.g. "
            f"the tokens an MoE router sent to one expert, picked with torch.where between "
            f"compiled graphs. Each rank holds only its own rows, so a reduction or mix over "
            f"them differs from the full-sequence run. Keep such a function token by token "
            f"(reduce in the caller over sequence-shaped values), route the experts without "
            f"data-dependent shapes, or mark a sequence-shaped input with "
            f"spcompile.mark_sequence(t, dim).")


def last_seq_len_str() -> str:
    from ..boundary import last_seq_len
    n = last_seq_len()
    return "unknown" if n is None else str(n)


@register_pass("sequence_axis")
def sequence_axis(gm: fx.GraphModule, ctx: Ctx) -> fx.GraphModule:
    """Placement (Shard/Replicate/Partial/Pair/Mixing) of every value."""
    analyze(gm, ctx)
    if ctx.rows_frame:
        check_rows(gm, ctx)
    for node, p in ctx.placements.items():
        node.meta["spcompile_placement_str"] = str(p)
    if ctx.world_size > 1 and ctx.seq_len is None and not ctx.rows_frame:
        ctx.notes.append("no sequence-shaped input found: nothing is sharded")
    return gm
