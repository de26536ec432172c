"""Annotations: tell spcompile what a function computes when detection cannot see it.

``@spcompile.linear_attention(q=..., k=..., v=..., decay=..., layout=..., scale=..., causal=...)``
and ``@spcompile.ssm_scan(C=..., B=..., x=..., log_decay=...)`` declare that the decorated
function returns the output of one linear scan (DESIGN.md §3)

    S_t = exp(g_t) ⊙ S_{t-1} + k_tᵀ v_t,      o_t = scale · q_t S_t

of (some of) its arguments. Calling the decorated function does not run its body: it calls the
marker op ``spcompile::declared_scan``, which computes ``spcompile.linear_scan`` (the fast chunked
kernel) and has that kernel's backward. So eager runs and P = 1 compiles simply get the kernel,
and in a compiled graph the marker is an op the ``declared`` pattern family finds by name and
rewrites into ``spcompile.ops.scan`` with the planned hand-off: sequence parallel at P > 1.

The declaration is a promise; ``verify=True`` checks it once, numerically, against the user's
own function on small random inputs (on the first eager call, and when the backend first sees
the marker), and raises :class:`DeclarationError` saying which outputs disagree and by how much.
``decorated.verify(*args)`` checks it on inputs of your choice.

``@spcompile.exclude`` marks a function whose ops no pattern family may rewrite (they are then
computed on the gathered sequence by the fallback): detection asks :func:`is_excluded` with the
user source lines in ``node.meta["stack_trace"]``.

Layouts: ``"bthd"`` (q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, log decay ``[H]`` /
``[B, T, H]`` / ``[B, T, H, K]``) or ``"bhtd"`` (``[B, H, T, D]``, log decay ``[H]`` /
``[B, H, T]`` / ``[B, H, T, K]``). The function must return ``o`` in the layout of ``v``.
"""
from __future__ import annotations

import functools
import inspect
import itertools
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .sequence import mark_sequence

LAYOUTS = ("bthd", "bhtd")
DECAY_KINDS = ("head", "scalar", "vector")


class DeclarationError(ValueError):
    """An annotation that does not describe its function (or cannot be used as written)."""


# ------------------------------------------------------------------ declarations
@dataclass
class Declaration:
    """What one decorated function promises to compute."""
    fn: Callable
    name: str
    q: str
    k: str
    v: str
    decay: Optional[str]
    decay_kind: Optional[str]
    layout: str
    scale: Optional[float]
    causal: bool
    verify: bool
    chunk_size: int
    positions: Dict[str, int] = field(default_factory=dict)  # arg name → positional index
    defaults: Dict[str, Any] = field(default_factory=dict)
    id: int = -1
    verified: bool = False

    def where(self) -> str:
        code = getattr(self.fn, "__code__", None)
        if code is None:
            return self.name
        return f"{self.name} ({os.path.basename(code.co_filename)}:{code.co_firstlineno})"


_DECLARATIONS: Dict[int, Declaration] = {}
_ids = itertools.count(1)
_lock = threading.Lock()


def declaration(decl_id: int) -> Declaration:
    """The declaration a marker op call refers to (the ``declared`` pattern reads it)."""
    try:
        return _DECLARATIONS[int(decl_id)]
    except KeyError:
        raise DeclarationError(f"spcompile: no annotation with id {decl_id} in this process; "
                               f"the graph was built by another process or the module was "
                               f"reloaded: recompile the model") from None


# ------------------------------------------------------------------ the marker op
@torch.library.custom_op("spcompile::declared_scan", mutates_args=())
def declared_scan(q: Tensor, k: Tensor, v: Tensor, log_decay: Optional[Tensor], scale: float,
                  causal: bool, chunk_size: int, decl_id: int) -> Tensor:
    """Marker of an annotated function: ``[B, T, H, *]`` in, ``o [B, T, H, V]`` out.

    Causal: ``spcompile::linear_scan``; non-causal (no decay): ``scale · q (Σ_t k_tᵀ v_t)``.
    ``decl_id`` names the :class:`Declaration` (for the pattern and for error messages).
    """
    if causal:
        o, _ = torch.ops.spcompile.linear_scan(q, k, v, log_decay, None, scale, chunk_size)
        return o.contiguous()
    f = torch.float64 if q.dtype == torch.float64 else torch.float32
    kv = torch.einsum("bthk,bthv->bhkv", k.to(f), v.to(f))
    return (scale * torch.einsum("bthk,bhkv->bthv", q.to(f), kv)).to(v.dtype).contiguous()


@declared_scan.register_fake
def _(q, k, v, log_decay, scale, causal, chunk_size, decl_id):
    B, T, H, _ = q.shape
    return q.new_empty(B, T, H, v.shape[-1], dtype=v.dtype)


def _declared_setup(ctx, inputs, output):
    q, k, v, log_decay, scale, causal, chunk_size, decl_id = inputs
    ctx.save_for_backward(q, k, v, log_decay)
    ctx.scale, ctx.causal, ctx.chunk_size = scale, causal, chunk_size


def _declared_backward(ctx, do):
    q, k, v, log_decay = ctx.saved_tensors
    if ctx.causal:
        B, T, H, K = q.shape
        dS = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64 if q.dtype == torch.float64
                         else torch.float32, device=q.device)
        dq, dk, dv, dg, _ = torch.ops.spcompile.linear_scan_bwd(
            q, k, v, log_decay, None, do.contiguous(), dS, ctx.scale, ctx.chunk_size)
        return dq, dk, dv, (dg if log_decay is not None else None), None, None, None, None
    f = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf, dof = q.to(f), k.to(f), v.to(f), do.to(f)
    kv = torch.einsum("bthk,bthv->bhkv", kf, vf)
    dq = ctx.scale * torch.einsum("bthv,bhkv->bthk", dof, kv)
    dkv = ctx.scale * torch.einsum("bthk,bthv->bhkv", qf, dof)
    dk = torch.einsum("bthv,bhkv->bthk", vf, dkv)
    dv = torch.einsum("bthk,bhkv->bthv", kf, dkv)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


declared_scan.register_autograd(_declared_backward, setup_context=_declared_setup)


# ------------------------------------------------------------------ layout helpers
def _to_bthd(x: Tensor, layout: str) -> Tensor:
    return x if layout == "bthd" else x.transpose(1, 2)


def _decay_to_bthd(g: Tensor, layout: str) -> Tensor:
    if layout == "bthd" or g.dim() == 1:
        return g
    return g.transpose(1, 2)  # [B, H, T] → [B, T, H];  [B, H, T, K] → [B, T, H, K]


def _check_shapes(d: Declaration, q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor]) -> None:
    """Shapes in bthd; a clear error naming the declaration when they do not fit."""
    from .kernels import check_linear_scan
    chk = check_linear_scan(q, k, v, g if d.causal else None)
    if not chk:
        raise DeclarationError(f"spcompile: {d.where()}: the declared arguments do not fit a "
                               f"linear scan in layout {d.layout!r}: {chk.reason}")
    if g is not None:
        kind = {1: "head", 3: "scalar", 4: "vector"}.get(g.dim())
        if d.decay_kind is not None and kind != d.decay_kind:
            raise DeclarationError(f"spcompile: {d.where()}: decay_kind={d.decay_kind!r} but "
                                   f"{d.decay!r} has shape {tuple(g.shape)} (a {kind} decay)")


def _pick(d: Declaration, args: tuple, kwargs: dict, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    i = d.positions.get(name)
    if i is not None and i < len(args):
        return args[i]
    if name in d.defaults:
        return d.defaults[name]
    raise TypeError(f"{d.name}() missing argument {name!r} (declared as a scan input)")


def _scale_for(d: Declaration, q: Tensor) -> float:
    return float(d.scale) if d.scale is not None else q.shape[-1] ** -0.5


def _call_declared(d: Declaration, args: tuple, kwargs: dict) -> Tensor:
    q, k, v = (_pick(d, args, kwargs, n) for n in (d.q, d.k, d.v))
    g = _pick(d, args, kwargs, d.decay) if d.decay is not None else None
    q4, k4, v4 = (_to_bthd(x, d.layout) for x in (q, k, v))
    g4 = None if g is None else _decay_to_bthd(g, d.layout)
    if not torch.compiler.is_compiling():
        _check_shapes(d, q4, k4, v4, g4)
        if d.verify and not d.verified:
            verify_declaration(d, args, kwargs)
    o = torch.ops.spcompile.declared_scan(q4, k4, v4, g4, _scale_for(d, q4), d.causal,
                                          d.chunk_size, d.id)
    return o if d.layout == "bthd" else o.transpose(1, 2)


# ------------------------------------------------------------------ verification
def _random_like(x: Tensor, B: int, T: int, layout: str, seq: bool, negative: bool,
                 gen: torch.Generator) -> Tensor:
    shape = list(x.shape)
    if seq and x.dim() >= 3:
        t_dim = 1 if layout == "bthd" else 2
        shape[0], shape[t_dim] = B, T
    dtype = x.dtype if x.dtype.is_floating_point else torch.float32
    r = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if negative:  # log decays: in (-1, 0), a realistic range
        r = -torch.sigmoid(r).to(dtype)
    return r.to(x.device)


def verify_declaration(d: Declaration, args: tuple, kwargs: dict, *, small: bool = True,
                       tol: float = 1e-3) -> float:
    """Run the user's function and the declared scan on random inputs; raise when they differ.

    With ``small`` the scan inputs get batch 1 and at most 24 steps (other arguments are passed
    as given). Returns the relative error; raises :class:`DeclarationError` above ``tol``.
    """
    gen = torch.Generator().manual_seed(1234)
    q0 = _pick(d, args, kwargs, d.q)
    t_dim = 1 if d.layout == "bthd" else 2
    B = 1 if small else q0.shape[0]
    T = min(q0.shape[t_dim], 24) if small else q0.shape[t_dim]
    new: Dict[str, Tensor] = {}
    for role, name in (("q", d.q), ("k", d.k), ("v", d.v), ("decay", d.decay)):
        if name is None:
            continue
        x = _pick(d, args, kwargs, name)
        seq = not (role == "decay" and x.dim() == 1)
        new[name] = _random_like(x, B, T, d.layout, seq, role == "decay", gen)
    call_args = list(args)
    call_kwargs = dict(kwargs)
    for name, x in new.items():
        if name in call_kwargs:
            call_kwargs[name] = x
        elif d.positions.get(name, 10 ** 9) < len(call_args):
            call_args[d.positions[name]] = x
        else:
            call_kwargs[name] = x
    with torch.no_grad():
        try:
            want = d.fn(*call_args, **call_kwargs)
        except Exception as e:
            raise DeclarationError(
                f"spcompile: {d.where()}: verification could not run the function on random "
                f"inputs (batch {B}, {T} steps): {type(e).__name__}: {e}. Call "
                f"`{d.name}.verify(...)` with inputs of your choice instead.") from None
        q, k, v = (_to_bthd(new[n], d.layout) for n in (d.q, d.k, d.v))
        g = None if d.decay is None else _decay_to_bthd(new[d.decay], d.layout)
        _check_shapes(d, q, k, v, g)
        got = declared_scan(q, k, v, g, _scale_for(d, q), d.causal, d.chunk_size, d.id)
        got = got if d.layout == "bthd" else got.transpose(1, 2)
    if not isinstance(want, Tensor) or tuple(want.shape) != tuple(got.shape):
        shape = tuple(want.shape) if isinstance(want, Tensor) else type(want).__name__
        raise DeclarationError(
            f"spcompile: {d.where()}: the function returns {shape} but the declared scan returns "
            f"{tuple(got.shape)} (layout {d.layout!r}); an annotated function must return o "
            f"in the layout of v")
    want64, got64 = want.double(), got.double()
    err = ((want64 - got64).abs().max() / want64.abs().max().clamp_min(1e-6)).item()
    if not err <= tol:
        raise DeclarationError(
            f"spcompile: {d.where()}: the declaration does not match the function: " +
            _diagnose(d, want64, got64, q, k, v, g, err))
    d.verified = True
    return err


def _diagnose(d: Declaration, want: Tensor, got: Tensor, q, k, v, g, err: float) -> str:
    """Name what disagrees: the output, and a guess (scale, decay, causality) when one fits."""
    msg = [f"output relative error {err:.2e} (max abs {(want - got).abs().max().item():.3g}) "
           f"on random inputs ({d.causal and 'causal' or 'non-causal'}, decay "
           f"{d.decay or 'none'}, scale {_scale_for(d, q):.4g}, layout {d.layout})"]
    fit = (want * got).sum() / (got * got).sum().clamp_min(1e-30)
    if ((want - fit * got).abs().max() / want.abs().max().clamp_min(1e-6)).item() < 1e-3:
        msg.append(f"; the outputs differ by a constant factor {fit.item():.4g}: declare "
                   f"scale={_scale_for(d, q) * fit.item():.6g}")
        return "".join(msg)
    t_dim = 1 if d.layout == "bthd" else 2
    first = want.narrow(t_dim, 0, 1)
    first_got = got.narrow(t_dim, 0, 1)
    if d.causal and ((first - first_got).abs().max() > 1e-3 * first.abs().max().clamp_min(1e-6)):
        msg.append("; the first step already differs: the function may not be causal "
                   "(declare causal=False) or q/k/v are bound to the wrong arguments")
    elif d.decay is None:
        msg.append("; the first steps agree and later ones drift: the function may apply a "
                   "decay (declare decay=...)")
    else:
        msg.append("; the first steps agree and later ones drift: check the decay's argument, "
                   "its kind (head/scalar/vector) and that it is a LOG decay (<= 0)")
    return "".join(msg)


# ------------------------------------------------------------------ the decorators
def _signature_maps(fn: Callable) -> Tuple[Dict[str, int], Dict[str, Any], List[str]]:
    sig = inspect.signature(fn)
    positions, defaults, names = {}, {}, []
    for i, (name, p) in enumerate(sig.parameters.items()):
        names.append(name)
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positions[name] = i
        if p.default is not p.empty:
            defaults[name] = p.default
    return positions, defaults, names


def _declare(fn: Callable, *, q: str, k: str, v: str, decay: Optional[str],
             decay_kind: Optional[str], layout: str, scale: Optional[float], causal: bool,
             verify: bool, chunk_size: int, what: str) -> Callable:
    positions, defaults, names = _signature_maps(fn)
    name = getattr(fn, "__qualname__", getattr(fn, "__name__", "function"))
    for role, arg_name in (("q", q), ("k", k), ("v", v), ("decay", decay)):
        if arg_name is not None and arg_name not in names:
            raise DeclarationError(
                f"spcompile.{what}: {role}={arg_name!r} is not an argument of {name}"
                f"({', '.join(names)})" + ("; decay= names the argument that holds the LOG "
                                           "decay (use decay_kind= for head/scalar/vector)"
                                           if role == "decay" and arg_name in DECAY_KINDS
                                           else ""))
    if layout not in LAYOUTS:
        raise DeclarationError(f"spcompile.{what}: layout={layout!r}; choose one of {LAYOUTS}")
    if decay_kind is not None and decay_kind not in DECAY_KINDS:
        raise DeclarationError(f"spcompile.{what}: decay_kind={decay_kind!r}; choose one of "
                               f"{DECAY_KINDS}")
    if not causal and decay is not None:
        raise DeclarationError(f"spcompile.{what}: a non-causal scan with a decay is not a "
                               f"linear scan spcompile can shard; drop decay= or causal=False")
    d = Declaration(fn, name, q, k, v, decay, decay_kind, layout, scale, causal, verify,
                    int(chunk_size), positions, defaults)
    with _lock:
        d.id = next(_ids)
        _DECLARATIONS[d.id] = d

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Tensor:
        return _call_declared(d, args, kwargs)

    wrapper.__spcompile_declaration__ = d  # type: ignore[attr-defined]
    wrapper.verify = lambda *a, **kw: verify_declaration(d, a, kw, small=False)  # type: ignore
    wrapper.reference = fn  # type: ignore[attr-defined]  # the undecorated function
    return wrapper


def linear_attention(*, q: str = "q", k: str = "k", v: str = "v", decay: Optional[str] = None,
                     decay_kind: Optional[str] = None, layout: str = "bthd",
                     scale: Optional[float] = None, causal: bool = True, verify: bool = False,
                     chunk_size: int = 64) -> Callable[[Callable], Callable]:
    """Declare that the decorated function computes causal linear attention (a linear scan).

    Args:
        q, k, v: names of the arguments that hold queries, keys, values (after any feature map).
        decay: name of the argument holding the LOG decay (``<= 0``): shape ``[H]`` (fixed per
            head: RetNet, lightning attention), ``[B, T, H]`` (data-dependent scalar: simple
            GLA, Mamba2) or ``[B, T, H, K]`` (GLA vector gates); ``[B, H, T(, K)]`` in "bhtd".
            None: no decay.
        decay_kind: optional check of that shape: "head" | "scalar" | "vector".
        layout: "bthd" (``[B, T, H, D]``) or "bhtd" (``[B, H, T, D]``).
        scale: output scale; None means ``K ** -0.5`` (pass ``1.0`` for unscaled forms).
        causal: False declares ``o = scale · q (Σ_t k_tᵀ v_t)`` over the whole sequence.
        verify: check the declaration against the function once (see :func:`verify_declaration`).
        chunk_size: chunk length of the kernel for eager calls.

    The function must return ``o`` (the layout of ``v``); its body is not run except to verify.
    """
    return lambda fn: _declare(fn, q=q, k=k, v=v, decay=decay, decay_kind=decay_kind,
                               layout=layout, scale=scale, causal=causal, verify=verify,
                               chunk_size=chunk_size, what="linear_attention")


def ssm_scan(*, C: str = "C", B: str = "B", x: str = "x", log_decay: str = "log_decay",
             decay_kind: Optional[str] = None, layout: str = "bthd", scale: float = 1.0,
             verify: bool = False, chunk_size: int = 64) -> Callable[[Callable], Callable]:
    """Declare a Mamba2 / SSD selective scan: ``h_t = exp(a_t) h_{t-1} + B_tᵀ x_t``, ``y_t =
    C_t h_t``, i.e. a linear scan with ``q = C``, ``k = B``, ``v = x`` (already multiplied by
    ``dt`` when the model does so) and log decay ``a = A·dt``.

    Args:
        C, B, x: argument names (``[B, T, H, N]``, ``[B, T, H, N]``, ``[B, T, H, P]``; grouped
            C/B must be expanded to H heads by the function's caller).
        log_decay: argument name of ``A·dt`` (``[B, T, H]``, or ``[H]`` / ``[B, T, H, N]``).
        scale: SSD has none, so the default is 1.0.
        Other arguments as :func:`linear_attention`.
    """
    return lambda fn: _declare(fn, q=C, k=B, v=x, decay=log_decay, decay_kind=decay_kind,
                               layout=layout, scale=scale, causal=True, verify=verify,
                               chunk_size=chunk_size, what="ssm_scan")


# ------------------------------------------------------------------ exclude
_EXCLUDED: Dict[str, List[Tuple[int, int, str]]] = {}  # file → [(first, last line, name)]


def exclude(fn: Callable) -> Callable:
    """Keep pattern families away from the ops of ``fn`` (they stay as written; at P > 1 the
    fallback computes any token mixing in them on the gathered sequence).

    Works by source location: an op is excluded when one frame of its user stack trace lies
    inside ``fn``'s source lines. Returns ``fn`` unchanged.
    """
    target = inspect.unwrap(fn)
    if isinstance(target, torch.nn.Module):
        target = type(target).forward
    if inspect.isclass(target):
        target = target.forward if issubclass(target, torch.nn.Module) else target
    try:
        lines, first = inspect.getsourcelines(target)
        path = inspect.getsourcefile(target)
    except (OSError, TypeError):
        raise DeclarationError(f"spcompile.exclude: cannot find the source of {fn!r}; exclusion "
                               f"works by source lines, so the function must come from a .py "
                               f"file") from None
    if path is None:
        raise DeclarationError(f"spcompile.exclude: {fn!r} has no source file")
    key = os.path.realpath(path)
    name = getattr(target, "__qualname__", str(target))
    _EXCLUDED.setdefault(key, []).append((first, first + len(lines) - 1, name))
    return fn


def _frames(stack_trace: str) -> List[Tuple[str, int]]:
    out = []
    for ln in stack_trace.splitlines():
        ln = ln.strip()
        if ln.startswith('File "') and ", line " in ln:
            path = ln.split('"')[1]
            try:
                lineno = int(ln.split(", line ")[1].split(",")[0])
            except ValueError:
                continue
            out.append((os.path.realpath(path), lineno))
    return out


def is_excluded(node: Any) -> Optional[str]:
    """The name of the ``@spcompile.exclude`` function an FX node's op comes from, or None.

    Reads ``node.meta["stack_trace"]`` (Dynamo's user frames).
    """
    if not _EXCLUDED:
        return None
    trace = getattr(node, "meta", {}).get("stack_trace")
    if not trace:
        return None
    for path, lineno in _frames(trace):
        for first, last, name in _EXCLUDED.get(path, ()):
            if first <= lineno <= last:
                return name
    return None


def match_excluded(match: Any) -> Optional[str]:
    """The excluded function a Match's anchor (or any of its nodes) comes from, or None."""
    for node in [match.anchor, *sorted(match.nodes, key=lambda n: n.name)]:
        name = is_excluded(node)
        if name is not None:
            return name
    return None


def sequence_input(x: Tensor, dim: Optional[int] = 1) -> Tensor:
    """Alias of :func:`spcompile.mark_sequence`: declare an input's sequence dim (None: not a
    sequence)."""
    return mark_sequence(x, dim)


__all__ = ["DeclarationError", "Declaration", "declaration", "declared_scan", "exclude",
           "is_excluded", "linear_attention", "match_excluded", "sequence_input", "ssm_scan",
           "verify_declaration"]
