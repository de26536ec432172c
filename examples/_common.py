"""Shared by the examples' ``__main__``: start the process group under torchrun, run the model
sharded with the ``sp`` backend and compare it with the full-sequence eager run.

Every example has ``factory() -> (model, example_inputs)`` with full-sequence inputs
(sequence dim 1). ``python examples/X.py`` runs at P = 1; ``spcompile run --nproc 2
examples/X.py`` (or torchrun) runs it on 2 ranks, each feeding its contiguous shard.
"""
from __future__ import annotations

import copy
import os
import sys
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist

import spcompile


def init_distributed() -> Tuple[int, int]:
    """(rank, world size); starts gloo (CPU) or NCCL (GPU) when launched by torchrun."""
    if "RANK" not in os.environ or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def is_sequence(x: Any, T: int) -> bool:
    mark = getattr(x, "_spcompile_seq_dim", "unset")
    return isinstance(x, torch.Tensor) and mark is not None and x.dim() >= 2 and x.shape[1] == T


def _seq_len(inputs: Sequence[Any]) -> int:
    return next(x.shape[1] for x in inputs if isinstance(x, torch.Tensor) and x.dim() >= 2)


def sharded_vs_eager(model: torch.nn.Module, inputs: Sequence[Any], rank: int, P: int,
                     **options: Any) -> Tuple[Dict[str, float], Any]:
    """Relative errors of the sharded compiled run against the full eager run: every output,
    the gradients of floating inputs, and the parameter gradients summed over the group.
    Returns (errors, the backend, which holds the explain reports)."""
    T = _seq_len(inputs)
    n = T // P
    seq = [is_sequence(x, T) for x in inputs]
    gen = torch.Generator().manual_seed(123)

    def leafs(xs):
        return [x.detach().clone().requires_grad_() if isinstance(x, torch.Tensor)
                and x.dtype.is_floating_point else x for x in xs]

    def seeds(outs):  # fixed random weights so that the backward checks every output element
        return [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]

    full = leafs(inputs)
    ref = model(*full)
    refs = list(ref) if isinstance(ref, (tuple, list)) else [ref]
    ws = seeds(refs)
    sum(((o * w).sum() for o, w in zip(refs, ws)), torch.zeros(())).backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    sm = copy.deepcopy(model)
    sm.zero_grad(set_to_none=True)
    be = spcompile.backend(**options)
    compiled = torch.compile(sm, backend=be)
    local = leafs([spcompile.shard_sequence(x, 1) if s else x for x, s in zip(inputs, seq)])
    for x, orig, s in zip(local, inputs, seq):
        if isinstance(x, torch.Tensor) and hasattr(orig, "_spcompile_seq_dim"):
            x._spcompile_seq_dim = orig._spcompile_seq_dim
    out = compiled(*local)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]

    def mine(t, ref_t):
        return ref_t[:, rank * n:(rank + 1) * n] if t.dim() >= 2 and ref_t.shape[1] == T and \
            t.shape[1] == n else ref_t

    loss = sum(((o * mine(o, w)).sum() for o, w in zip(outs, ws)), torch.zeros(()))
    loss.backward()
    spcompile.sync_gradients(sm)

    def rel(a, b):
        return ((a.detach().double() - b.detach().double()).abs().max() /
                b.detach().double().abs().max().clamp_min(1e-6)).item()

    errs: Dict[str, float] = {}
    for i, (o, r) in enumerate(zip(outs, refs)):
        errs[f"output {i}"] = rel(o, mine(o, r))
    for i, (x, xf, s) in enumerate(zip(local, full, seq)):
        if isinstance(x, torch.Tensor) and x.grad is not None:
            errs[f"input {i} grad"] = rel(x.grad, xf.grad[:, rank * n:(rank + 1) * n] if s
                                          else xf.grad)
    worst = 0.0
    for k, p in sm.named_parameters():
        if k in ref_grads:
            worst = max(worst, rel(p.grad if p.grad is not None else torch.zeros_like(p),
                                   ref_grads[k]))
    errs["parameter grads"] = worst
    return errs, be


def run_example(factory: Callable[[], Tuple[torch.nn.Module, Sequence[Any]]],
                tol: float = 1e-4, **options: Any) -> None:
    """The examples' ``__main__``: sharded (or P = 1) compiled run vs eager; exit 1 on FAIL."""
    rank, P = init_distributed()
    torch.manual_seed(0)
    model, inputs = factory()
    errs, be = sharded_vs_eager(model, inputs, rank, P, **options)
    if rank == 0:
        for rep in be.reports:
            for m in rep.matches:
                print(f"  match {m.kind:<12} {m.pattern:<24} {m.strategy:<14} {m.source}")
            for f in rep.fallbacks:
                print(f"  fallback {f}")
    ok = all(e <= tol for e in errs.values())
    print(f"[rank {rank}/{P}] " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) +
          f"  -> {'PASS' if ok else 'FAIL'}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(0 if ok else 1)
