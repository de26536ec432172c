"""The ``sp`` torch.compile backend: options → pass pipeline → delegate compiler.

``torch.compile(model, backend="sp")`` reaches :func:`sp_backend` through the
``torch_dynamo_backends`` entry point (the only registration route: a second
``register_backend`` for the same name fails with "duplicate name"). Dynamo hands a string
backend its ``options=`` dict as a keyword. :func:`backend` returns a configured callable for
``torch.compile(model, backend=spcompile.backend(...))``.

The rewrite runs on the Dynamo (torch-level) graph, before AOTAutograd, so the backward of every
spcompile op is that op's own autograd formula.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from . import collectives as _collectives  # noqa: F401  (registers the collective ops)
from . import ops as _ops  # noqa: F401  (registers spcompile::allreduce)
from ._compat import mark_side_effect

# ops that communicate: every rank must run each of them, in the same order, whether or not
# its own result is used (see mark_side_effect)
COLLECTIVE_OPS = ("allreduce", "all_reduce", "gather_sequence", "gather_sequence_rs",
                  "reduce_scatter_sequence", "halo_exchange", "halo_exchange_bwd",
                  "halo_from_next", "halo_from_next_bwd", "halo_roll", "halo_roll_bwd",
                  "flip_sequence",
                  "exclusive_state_scan", "exclusive_state_scan_bwd", "seq_to_heads",
                  "heads_to_seq", "ring_attention", "ring_attention_bwd",
                  "sequence_logcumsumexp", "sequence_logcumsumexp_backward", "sp_scan_overlap",
                  "sp_scan_overlap_bwd")
for _name in COLLECTIVE_OPS:
    _packet = getattr(torch.ops.spcompile, _name, None)
    if _packet is not None:
        for _ov in _packet.overloads():
            mark_side_effect(getattr(_packet, _ov))

STRATEGIES = ("auto", "allgather", "allscan", "ring")
ATTENTION_STRATEGIES = ("auto", "kv_allgather", "ring_attention", "ulysses")
COMPILERS = ("aot_eager", "inductor", "eager")
LENGTH_CONSTANTS = ("error", "warn", "ignore")


@dataclass
class Options:
    """Backend options (``torch.compile(..., options={...})`` or ``spcompile.backend(...)``).

    group: process group (or its name) for sequence parallelism; default the WORLD group when
        torch.distributed is initialized, else none (P = 1).
    seq_dim: sequence dimension of sequence-shaped inputs (default 1: ``[B, T, ...]``).
    strategy: state hand-off for scans: auto (cost model) | allgather | allscan | ring.
    attention_strategy: softmax layers: auto | kv_allgather | ring_attention | ulysses.
    strict: refuse (instead of gathering around) sequence-mixing ops no pattern covers.
    compiler: delegate compiler for the rewritten graph: aot_eager | inductor | eager.
    chunk_size: chunk length of the scan kernels.
    disable: pass names to switch off.
    dump_dir: write readable graphs before/after each pass (also ``SPCOMPILE_DUMP_DIR``).
    hardware: cost-model hardware profile (name or path) for ``strategy="auto"``.
    input_seq_dims: per-input override {input index or name: seq dim, or None = not sequence}.
    verbose: print the pass records and matches for every compiled graph.
    length_constants: what to do at P > 1 with arithmetic on a sequence value whose constant
        equals the local length T (or 2T, 1/T, 1/(2T)), which is what a number computed from
        ``x.shape[1]`` folds to (also inside ``torch.tensor(T)``, a ``T×T`` constant or a
        modulus), and with an index or slice bound into the sequence in the upper half of the
        shard (``x[:, T - 1]``): "error" (default), "warn" or "ignore".
    """
    group: Any = None
    seq_dim: int = 1
    strategy: str = "auto"
    attention_strategy: str = "auto"
    strict: bool = False
    compiler: str = "aot_eager"
    chunk_size: int = 64
    disable: Tuple[str, ...] = ()
    dump_dir: Optional[str] = None
    hardware: Optional[str] = None
    input_seq_dims: Dict[Any, Optional[int]] = field(default_factory=dict)
    verbose: bool = False
    length_constants: str = "error"
    world_size: Optional[int] = None  # planning only (explain with a fake group)

    @classmethod
    def make(cls, options: Optional[Dict[str, Any]] = None, **kw: Any) -> "Options":
        merged = dict(options or {})
        merged.update(kw)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - names)
        if unknown:
            raise TypeError(f"spcompile: unknown option(s) {unknown}; valid options are "
                            f"{sorted(names)}")
        opts = cls(**merged)
        opts.validate()
        return opts

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"spcompile: strategy={self.strategy!r}; choose one of {STRATEGIES}")
        if self.attention_strategy not in ATTENTION_STRATEGIES:
            raise ValueError(f"spcompile: attention_strategy={self.attention_strategy!r}; "
                             f"choose one of {ATTENTION_STRATEGIES}")
        if self.compiler not in COMPILERS and not callable(self.compiler):
            raise ValueError(f"spcompile: compiler={self.compiler!r}; choose one of {COMPILERS} "
                             f"or pass a backend callable")
        if self.length_constants not in LENGTH_CONSTANTS:
            raise ValueError(f"spcompile: length_constants={self.length_constants!r}; choose one "
                             f"of {LENGTH_CONSTANTS}")
        if int(self.chunk_size) < 1:
            raise ValueError(f"spcompile: chunk_size must be positive, got {self.chunk_size}")
        if isinstance(self.disable, str):
            self.disable = (self.disable,)
        self.disable = tuple(self.disable)
        from .passes.pipeline import pipeline
        names = [p.name for p in pipeline()]
        unknown = sorted(set(self.disable) - set(names))
        if unknown:
            raise ValueError(f"spcompile: unknown pass name(s) in disable={unknown}; the passes "
                             f"are {names}")


def resolve_group(group: Any) -> Tuple[str, int, int]:
    """(group name, world size, rank) for the option value; ('', 1, 0) when there is none."""
    import torch.distributed as dist
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return "", 1, 0
        group = dist.group.WORLD
    if isinstance(group, str):
        if group == "":
            return "", 1, 0
        from torch.distributed.distributed_c10d import _resolve_process_group
        group = _resolve_process_group(group)
    size = dist.get_world_size(group)
    if size == 1:
        return "", 1, 0
    return group.group_name, size, dist.get_rank(group)


def _delegate(compiler: Any) -> Callable:
    if callable(compiler):
        return compiler
    if compiler == "eager":
        return lambda gm, example_inputs: gm.forward
    from torch._dynamo.backends.registry import lookup_backend
    return lookup_backend(compiler)


def transform(gm: fx.GraphModule, example_inputs: Sequence[Any], opts: Options):
    """Run the pass pipeline on a Dynamo graph; returns (rewritten gm, ctx)."""
    from .passes.pipeline import Ctx, run_pipeline
    from .passes.fallback import SequenceParallelError
    for x in example_inputs:
        if isinstance(x, torch.SymInt) or (isinstance(x, torch.Tensor)
                                           and any(isinstance(s, torch.SymInt) for s in x.shape)):
            raise SequenceParallelError(
                "spcompile: the graph has dynamic shapes (Dynamo recompiled it for a new length); "
                "sequence parallelism needs static shard lengths. Compile with "
                "torch.compile(..., dynamic=False), or keep the sequence length fixed.")
    for node in gm.graph.nodes:
        v = node.meta.get("example_value")
        for t in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(t, torch.SymInt) or (isinstance(t, torch.Tensor) and any(
                    isinstance(s, torch.SymInt) for s in t.shape)):
                from .passes.pipeline import source_line
                raise SequenceParallelError(
                    f"spcompile: {node.name} at {source_line(node) or node.name} has a "
                    f"data-dependent shape (nonzero, torch.where(mask), boolean indexing, "
                    f"unique... captured with torch._dynamo.config."
                    f"capture_dynamic_output_shape_ops or capture_scalar_outputs); sequence "
                    f"parallelism needs static shapes. Write it with fixed shapes (e.g. MoE "
                    f"routing that weights every expert by a scattered top-k mask) or leave "
                    f"those options off so that Dynamo breaks the graph there.")
    name, size, rank = resolve_group(opts.group)
    if opts.world_size is not None and opts.world_size != size:
        if size != 1:
            raise ValueError(f"spcompile: world_size={opts.world_size} but the group has {size} "
                             f"ranks; drop world_size (it is for planning without a group)")
        size = int(opts.world_size)
    ctx = Ctx(options=opts, example_inputs=list(example_inputs), group_name=name,
              world_size=size, rank=rank)
    gm = run_pipeline(gm, ctx)
    return gm, ctx


def _static_recompiles() -> None:
    """Make Dynamo recompile a new input shape statically instead of generalising it.

    By default Dynamo turns a dimension symbolic the second time it sees it change (a smaller
    last batch, a new sequence length); spcompile needs static shard lengths, so it switches that
    off (``torch._dynamo.config.automatic_dynamic_shapes = False``). It also makes hitting the
    recompile limit an error (``fail_on_recompile_limit_hit``): Dynamo would otherwise run the
    frame eagerly, which on a shard of the sequence gives silently wrong numbers. Both are
    process-wide Dynamo settings; ``dynamic=True`` still gets the clear error of ``transform``.
    """
    import torch._dynamo.config as cfg
    cfg.automatic_dynamic_shapes = False
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True


def _trace_rnns() -> None:
    """Let Dynamo put ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` into the graph (``allow_rnn``).

    By default Dynamo breaks the graph at those modules and runs them eagerly, where spcompile
    cannot see them: on a shard of the sequence each rank's recurrence would restart from a zero
    state, silently wrong. Traced, they run as a relay (``rnn_relay``: ``hx`` is the state
    entering the rank; a bidirectional layer's reverse direction is relayed the other way). Set
    when
    spcompile is imported, i.e. before Dynamo traces anything for the ``sp`` backend; it is a
    process-wide Dynamo setting (it only changes how other backends see those three modules).
    """
    import torch._dynamo.config as cfg
    if hasattr(cfg, "allow_rnn"):
        cfg.allow_rnn = True


_trace_rnns()


class SPBackend:
    """A configured backend: ``torch.compile(model, backend=SPBackend(opts))``."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.reports: List[Any] = []  # one explain.Report per compiled graph
        self._eager_warned: set = set()  # functions Dynamo runs eagerly (warned)

    def __call__(self, gm: fx.GraphModule, example_inputs: List[Any]) -> Callable:
        from .explain import Report
        _static_recompiles()
        gm, ctx = transform(gm, example_inputs, self.opts)
        report = Report.from_ctx(ctx, gm)
        self.reports.append(report)
        if self.opts.verbose:
            print(report)
        fn = _delegate(self.opts.compiler)(gm, example_inputs)
        if ctx.world_size > 1:  # values crossing graph breaks keep their placement
            from .boundary import input_tags, output_tags, tagging, warn_eager_frames
            warn_eager_frames(self._eager_warned)
            fn = tagging(fn, output_tags(gm, ctx), input_tags(gm, ctx), ctx.seq_len, ctx.tokens)
            if ctx.rows_frame:  # token by token (checked): no need to recompile per row count
                from .boundary import eager_after_first_run, frame_code
                fn = eager_after_first_run(fn, frame_code())
        return fn

    def __repr__(self) -> str:
        return f"spcompile.backend({self.opts})"


def backend(**options: Any) -> SPBackend:
    """A configured ``sp`` backend: ``torch.compile(m, backend=spcompile.backend(strategy=...))``.

    Accepts the fields of :class:`Options`.
    """
    return SPBackend(Options.make(**options))


def sp_backend(gm: fx.GraphModule, example_inputs: List[Any],
               options: Optional[Dict[str, Any]] = None) -> Callable:
    """The ``"sp"`` entry point: ``torch.compile(m, backend="sp", options={...})``."""
    return SPBackend(Options.make(options))(gm, example_inputs)
