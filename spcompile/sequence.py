"""User helpers around the contract: shard inputs, gather outputs, sum parameter gradients.

These run eagerly, outside compiled graphs, on the sequence-parallel group: by default the WORLD
group when ``torch.distributed`` is initialised (as the backend), else none (P = 1). The work is
done by ``spcompile.collectives`` (bytes counted, shapes checked across ranks);
``gather_sequence``'s backward takes this rank's slice of the gradient (every rank holds the same
gathered value, so its gradient is not summed again).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from . import collectives
from .backend import resolve_group


def shard_sequence(x: Tensor, dim: int = 1, group: Any = None) -> Tensor:
    """This rank's contiguous slice of ``x`` along ``dim`` (the input each rank feeds)."""
    name, P, _ = resolve_group(group)
    n = x.shape[dim]
    if n % P:
        raise ValueError(
            f"spcompile.shard_sequence: sequence length {n} (dim {dim}) is not divisible by the "
            f"{P} ranks of the group; pad the sequence to a multiple of {P} (e.g. "
            f"{(n + P - 1) // P * P}) or choose a group size that divides {n}.")
    return collectives.shard_sequence(x, dim, name).contiguous()


def gather_sequence(x: Tensor, dim: int = 1, group: Any = None, grad: str = "slice") -> Tensor:
    """The full sequence from every rank's shard (all-gather along ``dim``, rank order).

    ``grad="slice"`` (default): what follows is replicated (a loss every rank computes the same
    way), so each rank takes its slice of the gradient. ``grad="reduce_scatter"``: what follows
    is re-sharded (``shard_sequence(layer(gather_sequence(x, grad="reduce_scatter")))``, a
    layer with no sequence-parallel form run on the whole sequence), so each rank holds part of
    the gradient: summed over the ranks, then sliced."""
    return collectives.gather_sequence(x, dim, resolve_group(group)[0], grad=grad)


def sync_gradients(module: torch.nn.Module, group: Any = None) -> None:
    """Sum every parameter's ``.grad`` over the SP group (the global gradient on every rank)."""
    collectives.sync_gradients(module, resolve_group(group)[0])


def mark_sequence(x: Tensor, dim: Optional[int] = 1) -> Tensor:
    """Declare which dim of an input is the sequence (``None``: not sequence-shaped).

    Marks the tensor object; the backend reads the mark when the tensor is a compiled
    function's input. Returns ``x`` itself.
    """
    x._spcompile_seq_dim = dim
    return x
