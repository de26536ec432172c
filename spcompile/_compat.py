"""Version shims for torch.distributed (the GPU machine has torch 2.11, this one 2.13).

torch 2.13 renamed a few collectives (``all_gather_single``, ``reduce_scatter_single``) and
marks the old names deprecated; 2.11 only has the old ones. Everything in spcompile calls the
names below, which pick whichever exists, so neither version warns nor breaks.
"""
from __future__ import annotations

import datetime
from typing import Optional

import torch.distributed as dist
from torch.distributed import ProcessGroup

__all__ = ["all_gather_single", "reduce_scatter_single", "all_to_all_single",
           "resolve_process_group", "global_rank", "timedelta", "dist_available",
           "mark_side_effect"]


def dist_available() -> bool:
    """True when torch.distributed is built and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_to_all_single = dist.all_to_all_single


def resolve_process_group(name: str) -> ProcessGroup:
    """The ProcessGroup registered under ``name`` (``group.group_name``)."""
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(name)


def global_rank(group: ProcessGroup, group_rank: int) -> int:
    """Global rank of ``group_rank`` in ``group`` (what send/recv's ``dst``/``src`` expect)."""
    return dist.get_global_rank(group, group_rank)


def timedelta(seconds: Optional[float]) -> datetime.timedelta:
    return datetime.timedelta(seconds=float(seconds if seconds is not None else 0.0))


def mark_side_effect(op) -> None:
    """Tell FX (and so AOTAutograd's dead-code elimination and partitioner) that ``op`` must
    run even when its result is unused: a collective whose result one rank happens not to use
    (a rank-dependent branch) would otherwise vanish from that rank's graph only, and the
    other ranks would wait for it forever."""
    import torch.fx.node as fx_node
    if hasattr(fx_node, "has_side_effect"):
        fx_node.has_side_effect(op)
    else:  # pragma: no cover - older torch
        fx_node._side_effectful_functions.add(op)
