"""Graph-break boundaries: what a value that leaves one compiled graph is when it enters the next.

Dynamo splits a model at a graph break (a data-dependent branch, ``print``, ``.item()``,
``torch.where(mask)``...) into several graphs; the values that cross a break are plain tensors,
outputs of one graph and inputs of the next. Guessing their placement from the shape (the option
``seq_dim``) is wrong for any value that is not ``[B, T, ...]`` (``[B, H, T, d]`` heads, a
``[B*T, E]`` router output) and for replicated values (a global loss).

So every compiled graph's run tags the tensors it returns with the placement spcompile gave them,
together with the tensor's version counter, and the next graph takes that placement over the
guess from the shape. A tensor mutated in place since (``index_add_`` in eager code) has a new
version: its tag is stale and ignored. The inputs a graph was given are tagged too (unless they
already carry a tag), but such a tag only ever replaces a refusal: a user input that is not
sequence-shaped (a conditioning vector) and crosses a break is known to be replicated.

In the graph Dynamo compiles for the rest of a frame after a graph break (a
``torch_dynamo_resume_in_`` function), the value the breaking instruction left on the stack
(``___stack0``: the result of ``torch.where(mask)``, ``h[mask]``, an opaque call) was computed
by eager code; without a tag and without a dim of the local length (of the tagged inputs, else
of the graph that ran last) its relation to the sharded sequence is unknown (this rank's tokens
picked by a mask? a replicated value?), so it is refused (``mark_sequence`` says which).

A replicated value that a graph returned through ``replicated_output`` (backward ÷ P) and that a
later graph consumes is marked as such: the later graph's own output wrapper divides by P again,
so the input gets ``replicated_input`` (backward × P) to keep one division in all.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import torch

_ATTR = "_spcompile_tag"
_LAST = {"seq_len": None}  # the local sequence length of the graph that ran last


def last_seq_len() -> Optional[int]:
    """This rank's local sequence length in the compiled graph that ran last (a reference for
    the inputs of a graph Dynamo compiles after a graph break in the same forward)."""
    return _LAST["seq_len"]


def in_resume_frame() -> bool:
    """Is Dynamo compiling the rest of a frame after a graph break (a ``torch_dynamo_resume_in_``
    function), whose inputs are values of the part before it?"""
    try:
        from torch._guards import TracingContext
        tc = TracingContext.try_get()
        code = getattr(tc, "traced_code", None) if tc is not None else None
        return bool(code) and code[0].co_name.startswith("torch_dynamo_resume_in_")
    except Exception:  # noqa: BLE001 - no tracing context: not inside Dynamo
        return False


def _version(t: torch.Tensor) -> Optional[int]:
    try:
        return int(t._version)
    except Exception:  # noqa: BLE001 - inference tensors track no version
        return None


def read_tag(x: Any) -> Optional[Tuple[Any, bool, bool]]:
    """``(placement, wrapped, produced)`` of a tensor a compiled graph returned
    (``produced``) or was given, or None (untagged, or mutated since)."""
    tag = getattr(x, _ATTR, None) if isinstance(x, torch.Tensor) else None
    if tag is None:
        return None
    placement, wrapped, produced, version = tag
    if version is not None and version != _version(x):
        return None
    return placement, wrapped, produced


def _tag(x: Any, placement: Any, wrapped: bool, produced: bool) -> None:
    if not isinstance(x, torch.Tensor) or isinstance(x, torch.nn.Parameter):
        return
    if not produced and read_tag(x) is not None:
        return  # an input keeps the tag of the graph that made it
    try:
        setattr(x, _ATTR, (placement, wrapped, produced, _version(x)))
    except Exception:  # noqa: BLE001 - a tensor that takes no attributes stays untagged
        pass


def output_tags(gm: torch.fx.GraphModule, ctx: Any) -> List[Optional[Tuple[Any, bool]]]:
    """``(placement, wrapped)`` per graph output (None where it is not a tensor value)."""
    from .passes.sequence_axis import Replicate
    out = next(n for n in gm.graph.nodes if n.op == "output")
    args = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    tags: List[Optional[Tuple[Any, bool]]] = []
    for a in args:
        if not isinstance(a, torch.fx.Node):
            tags.append(None)
            continue
        wrapped = a.target is torch.ops.spcompile.replicated_output.default
        p = Replicate() if wrapped else ctx.placements.get(a, a.meta.get("spcompile_placement"))
        tags.append(None if p is None else (p, wrapped))
    return tags


def input_tags(gm: torch.fx.GraphModule, ctx: Any) -> List[Optional[Any]]:
    """The placement spcompile gave each graph input (None for parameters and buffers)."""
    from .passes.sequence_axis import _is_param_or_buffer
    return [None if _is_param_or_buffer(n) else ctx.placements.get(n)
            for n in gm.graph.nodes if n.op == "placeholder"]


def tagging(fn: Callable, outs: List[Optional[Tuple[Any, bool]]],
            ins: List[Optional[Any]], seq_len: Optional[int] = None) -> Callable:
    """``fn`` that tags its inputs (where they carry no valid tag yet) and outputs."""
    def run(*args: Any) -> Any:
        if seq_len is not None:
            _LAST["seq_len"] = seq_len
        for x, p in zip(args, ins):
            if p is not None:
                _tag(x, p, False, produced=False)
        result = fn(*args)
        flat = result if isinstance(result, (tuple, list)) else (result,)
        for y, t in zip(flat, outs):
            if t is not None:
                _tag(y, t[0], t[1], produced=True)
        return result
    return run
