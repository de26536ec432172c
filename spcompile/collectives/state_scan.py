"""Exclusive scan of recurrent states across ranks: the hand-off of every sequence-parallel scan.

Rank ``r`` holds its shard's final state from zero ``S_r`` ``[B, H, K, V]`` and total log decay
``a_r`` (None | ``[B, H]`` | ``[B, H, K]``). It needs the true incoming state

    I_r = Σ_{j<r} exp(Σ_{j<i<r} a_i) ⊙ S_j,   i.e.  I_0 = 0,  I_{r+1} = e^{a_r} ⊙ I_r + S_r.

Strategies (DESIGN.md §4):

* ``allgather`` (LASP-2): one all_gather of ``(S_r, a_r)``; each rank folds the ``r`` states
  before it locally (a short loop, never differences of cumulative decays, so decays that
  underflow to 0 or are -inf give exact zeros, not NaN).
* ``allscan`` (ZeCO All-Scan): a chain r-1 → r → r+1 in ``blocks`` blocks along K. Each block is
  combined with the rank's own block and forwarded as soon as it arrives, so rank r+1 works on
  block 0 while rank r still waits for block 1: ``(P-1+n_blocks)`` short hops instead of
  ``(P-1)`` long ones. Each rank receives and sends exactly one state; the last rank sends none.
* ``ring`` (LASP-1): the same chain with one block (no pipelining): the baseline.

Backward (the mirror image): with ``G_r = dL/dI_r`` the reverse exclusive scan
``D_r = Σ_{m>r} exp(Σ_{r<i<m} a_i) ⊙ G_m`` is the same scan run from the last rank down, so
``dS_r = D_r`` and ``da_r = Σ (D_r ⊙ e^{a_r} ⊙ I_r)`` over V (and K for a scalar decay).
Point-to-point calls stay inside custom ops (torch.compile refuses isend/irecv in graphs).
:func:`start_scan` returns a pending handle so callers can compute while the hand-off runs
(async all_gather, or the chain on a helper thread).
"""
from __future__ import annotations

import threading
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from . import runtime as rt

STRATEGIES = ("allgather", "allscan", "ring")
DEFAULT_BLOCKS = 4

__all__ = ["exclusive_state_scan", "start_scan", "STRATEGIES", "decay_grad"]


# ------------------------------------------------------------------------------------ local math

def apply_decay(x: Tensor, a: Optional[Tensor]) -> Tensor:
    """``e^a ⊙ x`` for x [B, H, K', V] and a None | [B, H] | [B, H, K']."""
    if a is None:
        return x
    w = a.to(x.dtype).exp()
    return x * (w[..., None, None] if a.dim() == x.dim() - 2 else w[..., None])


def decay_grad(D: Tensor, a: Optional[Tensor], incoming: Tensor) -> Optional[Tensor]:
    """dL/da of ``e^a ⊙ I + S`` given D = dL/d(out): ``D ⊙ e^a ⊙ I`` reduced to a's shape."""
    if a is None:
        return None
    prod = apply_decay(D * incoming, a)
    red = prod.sum(dim=(-1, -2)) if a.dim() == D.dim() - 2 else prod.sum(dim=-1)
    return red.to(a.dtype)


def _block_decay(a: Optional[Tensor], state_dim: int, k0: int, k1: int) -> Optional[Tensor]:
    if a is None or a.dim() == state_dim - 2:
        return a
    return a[..., k0:k1]


def _check_inputs(state: Tensor, a: Optional[Tensor], strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"exclusive_state_scan: unknown strategy {strategy!r}; choose one of "
                         f"{STRATEGIES}")
    if state.dim() != 4:
        raise ValueError(f"exclusive_state_scan: state must be [B, H, K, V], got "
                         f"{tuple(state.shape)}")
    if a is not None:
        B, H, K, _ = state.shape
        if tuple(a.shape) not in ((B, H), (B, H, K)):
            raise ValueError(f"exclusive_state_scan: log_decay {tuple(a.shape)} must be None, "
                             f"[B, H]={(B, H)} or [B, H, K]={(B, H, K)} for state "
                             f"{tuple(state.shape)}")


# ---------------------------------------------------------------------------------- the strategies

class _Pending:
    """Result of a started scan: ``result()`` waits (bounded by the timeout) and returns it."""

    def __init__(self, fn=None, thread_fn=None, device: Optional[torch.device] = None):
        self._fn = fn
        self._box = {}
        self._thread = None
        if thread_fn is not None:
            def run():
                try:
                    if device is not None and device.type == "cuda":
                        torch.cuda.set_device(device)  # a new thread starts on device 0
                    self._box["out"] = thread_fn()
                except BaseException as e:  # noqa: BLE001 - re-raised by result()
                    self._box["err"] = e
            self._thread = threading.Thread(target=run, name="spcompile-state-scan", daemon=True)
            self._thread.start()

    def result(self) -> Tensor:
        if self._thread is not None:
            self._thread.join()
            if "err" in self._box:
                raise self._box["err"]
            return self._box["out"]
        return self._fn()


def _chain_order(P: int, reverse: bool):
    """(position of a rank in the chain, its predecessor, its successor) as functions."""
    if not reverse:
        return (lambda r: r), (lambda r: r - 1), (lambda r: r + 1)
    return (lambda r: P - 1 - r), (lambda r: r + 1), (lambda r: r - 1)


def _scan_chain(x: Tensor, a: Optional[Tensor], pg: ProcessGroup, n_blocks: int, reverse: bool,
                label: str, what: str) -> Tensor:
    """The chain (ring: 1 block, allscan: n_blocks): receive, combine, forward each block."""
    P, r = pg.size(), pg.rank()
    pos, pred, succ = _chain_order(P, reverse)
    K = x.shape[-2]
    splits = torch.arange(K).tensor_split(max(1, min(n_blocks, K)))
    bounds = [(int(b[0]), int(b[-1]) + 1) for b in splits if len(b)]
    incoming = torch.zeros_like(x)
    # Blocks are received into their own contiguous buffers (K-slices of [B,H,K,V] are strided).
    bufs = [x.new_empty(x.shape[:-2] + (k1 - k0, x.shape[-1])) for k0, k1 in bounds]
    recv_works = []
    if pos(r) > 0:
        recv_works = [rt.p2p(pg, what, label, recvs=[(buf, pred(r), i)])[0]
                      for i, buf in enumerate(bufs)]
    send_works = []
    for i, (k0, k1) in enumerate(bounds):
        if recv_works:
            rt.wait(recv_works[i], what, pg)
            incoming[..., k0:k1, :] = bufs[i]
        if pos(r) < P - 1:
            out = apply_decay(incoming[..., k0:k1, :], _block_decay(a, x.dim(), k0, k1))
            out = (out + x[..., k0:k1, :]).contiguous()
            send_works += rt.p2p(pg, what, label, sends=[(out, succ(r), i)])
    rt.wait_all(send_works, what, pg)
    return incoming


def _fold_gathered(xs: Tensor, as_: Optional[Tensor], r: int, reverse: bool) -> Tensor:
    """Local combine after the all_gather: fold the ranks before r in chain order."""
    P = xs.shape[0]
    order = range(r) if not reverse else range(P - 1, r, -1)
    acc = torch.zeros_like(xs[0])
    for j in order:
        acc = apply_decay(acc, None if as_ is None else as_[j]) + xs[j]
    return acc


def start_scan(x: Tensor, a: Optional[Tensor], pg: ProcessGroup, strategy: str, blocks: int,
               reverse: bool = False, what: str = "exclusive_state_scan") -> _Pending:
    """Start the exclusive scan of ``(x, a)`` over ``pg`` (reverse: from the last rank down)."""
    label = strategy
    if strategy == "allgather":
        n = x.numel()
        parts = [x.reshape(-1)] + ([] if a is None else [a.reshape(-1).to(x.dtype)])
        packed = torch.cat(parts)
        out, work = rt.all_gather(packed, pg, what, label, async_op=True)
        P, r = pg.size(), pg.rank()

        def finish():
            rt.wait(work, what, pg)
            xs = out[:, :n].reshape((P,) + tuple(x.shape))
            as_ = None if a is None else out[:, n:].reshape((P,) + tuple(a.shape)).to(a.dtype)
            return _fold_gathered(xs, as_, r, reverse)
        return _Pending(fn=finish)
    n_blocks = 1 if strategy == "ring" else blocks
    return _Pending(thread_fn=lambda: _scan_chain(x, a, pg, n_blocks, reverse, label, what),
                    device=x.device)


def run_scan(x, a, pg, strategy, blocks, reverse=False, what="exclusive_state_scan") -> Tensor:
    """Synchronous :func:`start_scan` (the chain runs on this thread)."""
    if strategy == "allgather":
        return start_scan(x, a, pg, strategy, blocks, reverse, what).result()
    n_blocks = 1 if strategy == "ring" else blocks
    return _scan_chain(x, a, pg, n_blocks, reverse, strategy, what)


# --------------------------------------------------------------------------------- the custom ops

@torch.library.custom_op("spcompile::exclusive_state_scan", mutates_args=())
def _exclusive_state_scan(state: Tensor, log_decay: Optional[Tensor], group: str, strategy: str,
                          blocks: int) -> Tensor:
    pg = rt.resolve_group(group)
    if pg is None or pg.size() == 1:
        return torch.zeros_like(state)
    B, H, K, V = state.shape
    rt.check_uniform(pg, "exclusive_state_scan", {
        "state shape B": B, "state shape H": H, "state shape K": K, "state shape V": V,
        "dtype": rt.dtype_code(state.dtype),
        "log_decay rank": -1 if log_decay is None else log_decay.dim()}, like=state)
    return run_scan(state.contiguous(), log_decay, pg, strategy, blocks)


@_exclusive_state_scan.register_fake
def _(state, log_decay, group, strategy, blocks):
    return torch.empty_like(state)


@torch.library.custom_op("spcompile::exclusive_state_scan_bwd", mutates_args=())
def _exclusive_state_scan_bwd(grad: Tensor, log_decay: Optional[Tensor], incoming: Tensor,
                              group: str, strategy: str, blocks: int) -> Tuple[Tensor, Tensor]:
    """→ (dstate, dlog_decay or an empty tensor when log_decay is None)."""
    pg = rt.resolve_group(group)
    if pg is None or pg.size() == 1:
        D = torch.zeros_like(grad)
    else:
        D = run_scan(grad.contiguous(), log_decay, pg, strategy, blocks, reverse=True,
                     what="exclusive_state_scan backward")
    da = decay_grad(D, log_decay, incoming)
    return D, (grad.new_empty(0) if da is None else da.contiguous())


@_exclusive_state_scan_bwd.register_fake
def _(grad, log_decay, incoming, group, strategy, blocks):
    return torch.empty_like(grad), (grad.new_empty(0) if log_decay is None
                                    else torch.empty_like(log_decay))


def _setup(ctx, inputs, output):
    state, log_decay, group, strategy, blocks = inputs
    ctx.save_for_backward(log_decay, output)
    ctx.has_decay = log_decay is not None
    ctx.args = (group, strategy, blocks)


def _backward(ctx, grad):
    log_decay, incoming = ctx.saved_tensors
    if grad is None:
        grad = torch.zeros_like(incoming)
    dS, da = _exclusive_state_scan_bwd(grad.contiguous(), log_decay, incoming, *ctx.args)
    return dS, (da if ctx.has_decay else None), None, None, None


_exclusive_state_scan.register_autograd(_backward, setup_context=_setup)


def exclusive_state_scan(state: Tensor, log_decay: Optional[Tensor] = None, *,
                         strategy: str = "allgather", group: rt.GroupLike = None,
                         blocks: Optional[int] = None) -> Tensor:
    """The incoming state of this rank: ``Σ_{j<r} exp(Σ_{j<i<r} a_i) ⊙ S_j`` (zeros on rank 0).

    Args:
        state: ``[B, H, K, V]`` (fp32/fp64): this rank's final state computed from zero.
        log_decay: this shard's total log decay: None | ``[B, H]`` | ``[B, H, K]``.
        strategy: "allgather" (LASP-2) | "allscan" (ZeCO, pipelined in ``blocks`` K-blocks) |
            "ring" (LASP-1).
        group: ProcessGroup, its name, or None (P = 1: returns zeros, no communication).
        blocks: K-blocks for "allscan" (default 4, at most K).
    Returns:
        ``[B, H, K, V]`` like ``state``; differentiable w.r.t. state and log_decay.
    """
    _check_inputs(state, log_decay, strategy)
    name = rt.group_name(group)
    if rt.group_size(name) == 1:
        return torch.zeros_like(state)
    nb = DEFAULT_BLOCKS if blocks is None else int(blocks)
    if nb < 1:
        raise ValueError(f"exclusive_state_scan: blocks must be >= 1, got {blocks}")
    return _exclusive_state_scan(state, log_decay, name, strategy, nb)
