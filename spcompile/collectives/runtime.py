"""Plumbing shared by every collective: groups by name, byte counters, timeouts, input checks.

* **Groups cross FX graphs by name.** Custom ops take ``group: str`` (``ProcessGroup.group_name``)
  and resolve it when they run; ``""`` means "no group": ``P = 1``, rank 0, no communication.
* **Traffic.** Every transfer calls :func:`record` with the bytes this rank put on and took off the
  wire. Point-to-point transfers count exactly; collectives count what the bandwidth-optimal
  (ring) algorithm moves per rank, the convention of nccl-tests:
  all_gather ``(P-1)·n_in`` each way, reduce_scatter ``(P-1)/P·n_in``, all_reduce ``2(P-1)/P·n``,
  all_to_all ``(P-1)/P·n``. Counters are process-wide (background threads count too).
* **Timeouts.** Every wait goes through :func:`wait`, which bounds it by :func:`get_timeout`
  (``set_timeout`` or ``SPCOMPILE_COLLECTIVE_TIMEOUT``, default 300 s) and turns a stuck or broken
  peer into :class:`CollectiveError` naming the collective, the rank and what to do.
* **Uniform inputs.** :func:`check_uniform` all-gathers a few integers (shape, dtype code) so that
  every rank sees the same table and raises the same ``ValueError`` together (no rank is left
  waiting). ``set_validation(False)`` / ``SPCOMPILE_COLLECTIVE_VALIDATE=0`` skips it (one round
  trip less per call).
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from .. import _compat

GroupLike = Union[ProcessGroup, str, None]

__all__ = ["CollectiveError", "Traffic", "count_traffic", "record", "set_timeout", "get_timeout",
           "set_validation", "group_name", "resolve_group", "group_size", "group_rank", "wait",
           "check_uniform", "p2p", "GroupLike"]


class CollectiveError(RuntimeError):
    """A collective did not complete: a peer failed, never arrived, or the link broke."""


# ----------------------------------------------------------------------------------------- groups

def group_name(group: GroupLike) -> str:
    """The name that crosses FX graphs: ``group.group_name``; ``""`` for None (P = 1)."""
    if group is None:
        return ""
    if isinstance(group, str):
        return group
    if isinstance(group, ProcessGroup):
        return group.group_name
    raise TypeError(f"group must be a ProcessGroup, its name (str) or None; got {type(group)}")


def resolve_group(group: GroupLike) -> Optional[ProcessGroup]:
    """ProcessGroup for a group or its name; None for None / ``""`` (P = 1)."""
    if group is None or isinstance(group, ProcessGroup):
        return group
    if group == "":
        return None
    try:
        return _compat.resolve_process_group(group)
    except Exception as e:  # noqa: BLE001 - add what to do
        raise ValueError(f"spcompile.collectives: no process group named {group!r} in this "
                         f"process ({e}); pass group.group_name of a live group, or '' for "
                         f"P = 1") from e


def group_size(group: GroupLike) -> int:
    """Number of ranks in the group (1 for None / ``""``)."""
    pg = resolve_group(group)
    return 1 if pg is None else pg.size()


def group_rank(group: GroupLike) -> int:
    """This process's rank inside the group (0 for None / ``""``)."""
    pg = resolve_group(group)
    return 0 if pg is None else pg.rank()


# Dynamo cannot trace the C++ group registry; for a given name these are constants, so let it
# call them at trace time and bake the result in (what ``torch._dynamo.assume_constant_result``
# does; set directly so that importing this module does not import torch._dynamo/triton).
for _fn in (group_size, group_rank):
    _fn._dynamo_marked_constant = True  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------- traffic

@dataclass
class Traffic:
    """Bytes this rank sent and received while the ``count_traffic`` block was open."""
    sent_bytes: int = 0
    recv_bytes: int = 0
    by_strategy: Dict[str, Tuple[int, int]] = field(default_factory=dict)

    def _add(self, label: str, sent: int, recv: int) -> None:
        self.sent_bytes += sent
        self.recv_bytes += recv
        s, r = self.by_strategy.get(label, (0, 0))
        self.by_strategy[label] = (s + sent, r + recv)


_active: List[Traffic] = []
_active_lock = threading.Lock()


@contextmanager
def count_traffic() -> Iterator[Traffic]:
    """``with count_traffic() as t: ...`` → t.sent_bytes, t.recv_bytes, t.by_strategy."""
    t = Traffic()
    with _active_lock:
        _active.append(t)
    try:
        yield t
    finally:
        with _active_lock:
            _active.remove(t)


def record(label: str, sent: int, recv: int) -> None:
    """Add bytes moved by this rank to every open counter, under ``label`` (the strategy)."""
    with _active_lock:
        for t in _active:
            t._add(label, int(sent), int(recv))


def nbytes(x: Tensor) -> int:
    return x.numel() * x.element_size()


# --------------------------------------------------------------------------------------- timeouts

_ENV_TIMEOUT = "SPCOMPILE_COLLECTIVE_TIMEOUT"
_ENV_VALIDATE = "SPCOMPILE_COLLECTIVE_VALIDATE"
_timeout: Optional[float] = None
_validate: Optional[bool] = None


def set_timeout(seconds: Optional[float]) -> None:
    """Bound every spcompile collective wait by ``seconds`` (None: back to env/default)."""
    global _timeout
    if seconds is not None and seconds <= 0:
        raise ValueError(f"timeout must be positive seconds, got {seconds}")
    _timeout = None if seconds is None else float(seconds)


def get_timeout() -> float:
    if _timeout is not None:
        return _timeout
    return float(os.environ.get(_ENV_TIMEOUT, "300"))


def set_validation(on: Optional[bool]) -> None:
    """Turn the cross-rank input check on/off (None: back to env, default on)."""
    global _validate
    _validate = on


def validation_enabled() -> bool:
    if _validate is not None:
        return _validate
    return os.environ.get(_ENV_VALIDATE, "1").lower() not in ("0", "false", "no", "off")


def _where(pg: Optional[ProcessGroup]) -> str:
    if pg is None:
        return "rank 0 of 1"
    return f"rank {pg.rank()} of {pg.size()} in group {pg.group_name!r}"


def wait(work, what: str, pg: Optional[ProcessGroup]) -> None:
    """Wait for ``work`` at most ``get_timeout()`` seconds; a failure becomes CollectiveError."""
    if work is None:
        return
    timeout = get_timeout()
    try:
        work.wait(_compat.timedelta(timeout))
    except Exception as e:  # noqa: BLE001 - gloo/nccl raise RuntimeError subclasses
        raise CollectiveError(
            f"spcompile {what}: {_where(pg)} did not complete within the {timeout:g} s timeout "
            f"({type(e).__name__}: {str(e).strip()[:300]}). A peer rank probably raised, exited or "
            f"never reached this call: check the other ranks' errors first. If the peers are "
            f"merely slow, raise the limit with spcompile.collectives.set_timeout(seconds) or "
            f"the environment variable {_ENV_TIMEOUT}.") from e


# ----------------------------------------------------------------------------------- input check

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.bool, torch.uint8, torch.int8, torch.int16]


def dtype_code(dt: torch.dtype) -> int:
    return _DTYPES.index(dt) if dt in _DTYPES else 99


def check_uniform(pg: Optional[ProcessGroup], what: str, fields: Dict[str, int],
                  hint: str = "", like: Optional[Tensor] = None) -> None:
    """Raise the same ValueError on every rank unless each field is equal across ranks.

    ``fields`` maps a readable name ("local length T", "dtype", ...) to an int. One small
    all_gather (counted under "validate") on ``like``'s device (NCCL needs CUDA tensors);
    skipped when validation is off or P = 1.
    """
    if pg is None or pg.size() == 1 or not validation_enabled():
        return
    names = list(fields)
    mine = torch.tensor([fields[n] for n in names], dtype=torch.int64,
                        device=None if like is None else like.device)
    table, _ = all_gather(mine, pg, f"{what} (input check)", "validate")
    for i, n in enumerate(names):
        col = table[:, i].tolist()
        if any(c != col[0] for c in col):
            shown = ([str(_DTYPES[c]) if 0 <= c < len(_DTYPES) else "?" for c in col]
                     if n == "dtype" else col)
            raise ValueError(f"spcompile {what}: {n} differs across the ranks of group "
                             f"{pg.group_name!r} (per rank: {shown}). Every rank must pass "
                             f"same-shaped, same-dtype shards{hint}.")


# -------------------------------------------------------------------------------- point-to-point

def p2p(pg: ProcessGroup, what: str, label: str,
        sends: Sequence[Tuple[Tensor, int, int]] = (),
        recvs: Sequence[Tuple[Tensor, int, int]] = ()) -> List:
    """Post ``sends`` [(tensor, dst group rank, tag)] and ``recvs`` [(buffer, src, tag)].

    Returns the works for :func:`wait_all`. Bytes are counted here. Two or more transfers go
    through one ``batch_isend_irecv``: NCCL runs the send and the receive of a rank pair on one
    stream, so posting a ring's send before its receive one by one deadlocks at P = 2.
    """
    ops = [(dist.irecv, buf, src, tag) for buf, src, tag in recvs] + \
        [(dist.isend, t, dst, tag) for t, dst, tag in sends]
    for fn, t, _, _ in ops:
        record(label, nbytes(t) if fn is dist.isend else 0, nbytes(t) if fn is dist.irecv else 0)
    if len(ops) == 1:
        fn, t, peer, tag = ops[0]
        return [fn(t, _compat.global_rank(pg, peer), group=pg, tag=tag)]
    return dist.batch_isend_irecv([dist.P2POp(fn, t, _compat.global_rank(pg, peer), group=pg,
                                              tag=tag) for fn, t, peer, tag in ops])


def wait_all(works: Sequence, what: str, pg: ProcessGroup) -> None:
    for w in works:
        wait(w, what, pg)


def all_gather(x: Tensor, pg: ProcessGroup, what: str, label: str, async_op: bool = False):
    """All-gather along a new leading dim: [*s] → [P, *s]. Returns (out, work|None)."""
    P = pg.size()
    flat = x.contiguous().reshape(-1)
    out_flat = flat.new_empty(P * flat.numel())
    work = _compat.all_gather_single(out_flat, flat, group=pg, async_op=True)
    out = out_flat.view((P,) + tuple(x.shape))
    record(label, (P - 1) * nbytes(x), (P - 1) * nbytes(x))
    if not async_op:
        wait(work, what, pg)
        work = None
    return out, work


def all_reduce(x: Tensor, op: str, pg: ProcessGroup, what: str, label: str) -> Tensor:
    """Out-of-place all_reduce with ``op`` in {"sum", "max"}."""
    P = pg.size()
    out = x.contiguous().clone()
    red = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    work = dist.all_reduce(out, op=red, group=pg, async_op=True)
    record(label, 2 * (P - 1) * nbytes(out) // P, 2 * (P - 1) * nbytes(out) // P)
    wait(work, what, pg)
    return out


def reduce_scatter(x: Tensor, pg: ProcessGroup, what: str, label: str) -> Tensor:
    """Sum over ranks of ``x`` [P, *s] then this rank's slice [*s]."""
    P = pg.size()
    flat = x.contiguous().reshape(-1)
    out = flat.new_empty(flat.numel() // P)
    work = _compat.reduce_scatter_single(out, flat, group=pg, async_op=True)
    out = out.view(tuple(x.shape[1:]))
    record(label, (P - 1) * nbytes(out), (P - 1) * nbytes(out))
    wait(work, what, pg)
    return out


def all_to_all(x: Tensor, pg: ProcessGroup, what: str, label: str) -> Tensor:
    """``x`` [P, *s]: block p goes to rank p; returns [P, *s] with block p from rank p."""
    P = pg.size()
    x = x.contiguous()
    out = torch.empty_like(x)
    work = _compat.all_to_all_single(out, x, group=pg, async_op=True)
    moved = (P - 1) * nbytes(x) // P
    record(label, moved, moved)
    wait(work, what, pg)
    return out
