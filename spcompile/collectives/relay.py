"""The relay: a region of the graph run rank after rank, its carried state passed along.

For a recurrence that has no parallel form (a GRU/LSTM cell, the delta rule of DeltaNet, any
step that is not affine and elementwise in its state), the global loop over ``T = P·T_local``
tokens is exactly the ranks' local loops run one after the other, each started from the state the
rank before it ended with. ``relay_region`` does that for one region (an unrolled loop lifted out
of the model's graph into a small FX module):

* forward: rank ``r > 0`` receives the entering state from rank ``r - 1``, every rank runs the
  region, rank ``r < P - 1`` sends its final state to rank ``r + 1``. Rank 0 starts from the
  model's own initial state (the region's root inputs).
* backward (``relay_region_bwd``): the mirror image. Rank ``r < P - 1`` receives dL/d(final
  state) from rank ``r + 1``, the region is recomputed with autograd (its activations are not
  kept: the backward is one more forward), and dL/d(entering state) goes to rank ``r - 1``.

A loop from the last token to the first (``RegionSpec.reverse``) is relayed the other way, from
rank ``P - 1`` down to rank 0. The ranks run the region in turn (P times one rank's loop, plus the hops): exact, every rank
holds only its own tokens' activations, and no speed-up for that layer. The region is one custom
op, so nothing is scheduled between a rank's receive and its send: every rank calls the relays
(and every other collective) in the same order, and a rank only ever waits for the rank before it
(forward) or after it (backward), so no order of the other collectives can deadlock it.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import Tensor

from . import runtime as rt

__all__ = ["RegionSpec", "register_region", "relay_region"]


@dataclass
class RegionSpec:
    """One lifted region: ``gm(*inputs)`` → its outputs. ``roots[i]`` is the input position of
    carried state ``i`` (replaced by the state received from the rank before), ``finals[i]`` the
    output position of the state after the region (sent to the rank after). ``out_meta`` gives
    the outputs' (shape, dtype) for the fake kernel."""
    gm: fx.GraphModule
    roots: List[int]
    finals: List[int]
    out_meta: List[Tuple[Tuple[int, ...], torch.dtype]]
    tag: int = 0
    where: str = ""
    # the region draws random numbers (dropout): the forward's RNG state is kept for the
    # recompute (on the CPU, and on each CUDA device in ``cuda``), as torch.utils.checkpoint
    reverse: bool = False  # the state flows from the last rank to the first
    # the torch.autocast region the loop sat in ((device, dtype, enabled) of Dynamo's
    # _enter_autocast): re-entered around the region, which runs outside the compiled graph
    autocast: Optional[tuple] = None
    random: bool = False
    cuda: List[int] = field(default_factory=list)
    rng_sizes: List[int] = field(default_factory=list)


_REGIONS: Dict[str, RegionSpec] = {}
_ids = itertools.count(1)


def register_region(spec: RegionSpec) -> str:
    """Keep ``spec`` for the ops (looked up by the returned key when they run)."""
    n = next(_ids)
    spec.tag = 1000 + n  # (P2P tag: one per region)
    if spec.random:
        spec.rng_sizes = [torch.get_rng_state().numel()] + [
            torch.cuda.get_rng_state(d).numel() for d in spec.cuda]
    key = f"relay{n}"
    _REGIONS[key] = spec
    return key


def _spec(key: str) -> RegionSpec:
    try:
        return _REGIONS[key]
    except KeyError:
        raise RuntimeError(f"spcompile relay_region: no region {key!r} in this process (a graph "
                           f"compiled by spcompile is run in another process?)") from None


def _fresh(outs: List[Tensor], ins: List[Tensor]) -> List[Tensor]:
    """Custom ops may not return their inputs or views of them: clone those (and repeats)."""
    seen = {t.untyped_storage().data_ptr() for t in ins if isinstance(t, Tensor)}
    res = []
    for o in outs:
        p = o.untyped_storage().data_ptr()
        if p in seen:
            o = o.clone()
        else:
            seen.add(p)
        res.append(o)
    return res


def _exchange(spec: RegionSpec, pg, what: str, send: Optional[List[Tensor]], to: int,
              recv_like: Optional[List[Tensor]], frm: int) -> List[Tensor]:
    """Receive tensors shaped like ``recv_like`` from group rank ``frm`` (if any), then send
    ``send`` to ``to`` (if any): one call per direction, in that order."""
    got: List[Tensor] = []
    if recv_like is not None:
        bufs = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in recv_like]
        works = rt.p2p(pg, what, "relay", recvs=[(b, frm, spec.tag + 10000 * i)
                                                   for i, b in enumerate(bufs)])
        rt.wait_all(works, what, pg)
        got = bufs
    if send is not None:
        works = rt.p2p(pg, what, "relay", sends=[(t.contiguous(), to, spec.tag + 10000 * i)
                                                  for i, t in enumerate(send)])
        rt.wait_all(works, what, pg)
    return got


@torch.library.custom_op("spcompile::relay_region", mutates_args=())
def _relay_region(inputs: List[Tensor], key: str, group: str) -> List[Tensor]:
    """→ the region's outputs, then the states that entered it (saved for the backward)."""
    spec = _spec(key)
    pg = rt.resolve_group(group)
    ins = list(inputs)
    pos, prev, nxt, P = _order(spec, pg)
    what = f"relay_region ({spec.where}) forward"
    if pos > 0:
        got = _exchange(spec, pg, what, None, 0, [ins[i] for i in spec.roots], prev)
        for i, t in zip(spec.roots, got):
            ins[i] = t
    rng = _rng_state(spec)
    with torch.no_grad(), _autocast(spec):
        outs = list(spec.gm(*ins))
    outs = [o.to(dt) if o.dtype != dt else o for o, (_, dt) in zip(outs, spec.out_meta)]
    if pos < P - 1:
        _exchange(spec, pg, what, [outs[i] for i in spec.finals], nxt, None, 0)
    # (strides as the fake kernel's: contiguous outputs, the entering states laid out as
    # the roots)
    entering = [torch.empty_like(inputs[i]).copy_(ins[i]) for i in spec.roots]
    return _fresh([o.contiguous() for o in outs], list(inputs)) + entering + rng


@_relay_region.register_fake
def _(inputs, key, group):
    spec = _spec(key)
    dev = inputs[0].device if inputs else None
    outs = [inputs[0].new_empty(s, dtype=dt) if inputs else torch.empty(s, dtype=dt, device=dev)
            for s, dt in spec.out_meta]
    return outs + [torch.empty_like(inputs[i]) for i in spec.roots] + [
        torch.empty(n, dtype=torch.uint8) for n in spec.rng_sizes]


def _autocast(spec: RegionSpec):
    if not spec.autocast:
        return contextlib.nullcontext()
    dev, dt, on = (tuple(spec.autocast) + (None, None, True))[:3]
    return torch.autocast(device_type=dev, dtype=dt, enabled=bool(on))


def _rng_state(spec: RegionSpec) -> List[Tensor]:
    if not spec.random:
        return []
    return [torch.get_rng_state()] + [torch.cuda.get_rng_state(d) for d in spec.cuda]


@contextlib.contextmanager
def _rng_restored(spec: RegionSpec, rng: List[Tensor]):
    """Run the block with the RNG state the forward had (restoring the current one after)."""
    if not spec.random or not rng:
        yield
        return
    with torch.random.fork_rng(devices=spec.cuda):
        torch.set_rng_state(rng[0])
        for d, st in zip(spec.cuda, rng[1:]):
            torch.cuda.set_rng_state(st, d)
        yield


@contextlib.contextmanager
def _autograd_inside_op():
    """A custom op's kernel runs below the autograd dispatch keys (they are excluded): let the
    recompute record a graph again, and restore the keys after."""
    with torch._C._PreserveDispatchKeyGuard():
        for k in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.ADInplaceOrView):
            torch._C._dispatch_tls_set_dispatch_key_excluded(k, False)
        with torch.enable_grad():
            yield


def _order(spec: RegionSpec, pg):
    """(this rank's place in the relay, the rank before it, the rank after it, P): ranks in
    order, or from the last to the first for a loop run from the last token to the first."""
    if pg is None or pg.size() == 1:
        return 0, 0, 0, 1
    P, r = pg.size(), pg.rank()
    if spec.reverse:
        return P - 1 - r, r + 1, r - 1, P
    return r, r - 1, r + 1, P


def _differentiable(t: Tensor) -> bool:
    return t.dtype.is_floating_point or t.dtype.is_complex


@torch.library.custom_op("spcompile::relay_region_bwd", mutates_args=())
def _relay_region_bwd(inputs: List[Tensor], grads: List[Tensor], rng: List[Tensor], key: str,
                      group: str) -> List[Tensor]:
    """``inputs`` with the entering states in the roots' places; ``grads`` one per output.
    → one gradient per input (zeros where none); the roots' gradients on the relay's first rank
    only (the other ranks' entering-state gradients go to the rank before)."""
    spec = _spec(key)
    pg = rt.resolve_group(group)
    pos, prev, nxt, P = _order(spec, pg)
    what = f"relay_region ({spec.where}) backward"
    grads = list(grads)
    if pos < P - 1:  # dL/d(final state) from the rank after
        got = _exchange(spec, pg, what, None, 0, [grads[i] for i in spec.finals], nxt)
        for i, g in zip(spec.finals, got):
            grads[i] = grads[i] + g
    with _autograd_inside_op(), _rng_restored(spec, rng), _autocast(spec):
        xs = [t.detach().requires_grad_(_differentiable(t)) for t in inputs]
        outs = [o.to(dt) if o.dtype != dt else o
                for o, (_, dt) in zip(spec.gm(*xs), spec.out_meta)]
        pairs = [(o, g) for o, g in zip(outs, grads) if isinstance(o, Tensor) and o.requires_grad]
        diff = [x for x in xs if x.requires_grad]
        res = torch.autograd.grad([o for o, _ in pairs], diff, [g for _, g in pairs],
                                  allow_unused=True) if pairs and diff else [None] * len(diff)
    it = iter(res)
    out = []
    for x in xs:
        g = next(it) if x.requires_grad else None
        out.append(torch.zeros_like(x) if g is None else torch.empty_like(x).copy_(g))
    if pos > 0:  # the entering states came from the rank before: their gradients go back there
        _exchange(spec, pg, what, [out[i] for i in spec.roots], prev, None, 0)
        for i in spec.roots:
            out[i] = torch.zeros_like(out[i])
    return out


@_relay_region_bwd.register_fake
def _(inputs, grads, rng, key, group):
    return [torch.empty_like(t) for t in inputs]


def _setup(ctx, inputs, output):
    ins, key, group = inputs
    spec = _spec(key)
    n_out = len(spec.out_meta)
    entering = output[n_out:n_out + len(spec.roots)]
    saved = list(ins)
    for i, e in zip(spec.roots, entering):
        saved[i] = e
    ctx.n_in = len(saved)
    ctx.save_for_backward(*saved, *output[n_out + len(spec.roots):])
    ctx.args = (key, group)
    ctx.n_out = n_out
    ctx.diff = [_differentiable(t) for t in ins]


def _backward(ctx, grads):
    saved = list(ctx.saved_tensors)
    saved, rng = saved[:ctx.n_in], saved[ctx.n_in:]
    key, group = ctx.args
    spec = _spec(key)
    gs = []
    for g, (s, dt) in zip(grads[:ctx.n_out], spec.out_meta):
        if g is None:
            g = saved[0].new_zeros(s, dtype=dt) if saved else torch.zeros(s, dtype=dt)
        gs.append(g.contiguous())
    res = _relay_region_bwd(saved, gs, rng, key, group)
    return [g if d else None for g, d in zip(res, ctx.diff)], None, None


_relay_region.register_autograd(_backward, setup_context=_setup)


def relay_region(inputs: List[Tensor], key: str, group: str) -> List[Tensor]:
    """Run region ``key`` rank after rank (see the module docstring)."""
    return torch.ops.spcompile.relay_region(list(inputs), key, group)
