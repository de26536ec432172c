"""The planner: evaluate every strategy of a match kind, rank them, explain the choice.

``plan(kind, B=..., T=..., ...)`` returns one :class:`Choice` per strategy, cheapest first;
strategies that violate a constraint (``H % P`` for Ulysses, a memory limit, a forced strategy
that cannot run) come last with ``feasible=False``, ``seconds=inf`` and the reason.  Results are
cached by (kind, shapes, profile content, options), so calling it once per Match is cheap.

Evaluation goes through the lambdified formulas (:func:`formulas.fast`); the sympy expressions
stay available for printing and for :func:`crossover`, which finds where two strategies cost the
same (sign changes on a grid, then ``sympy.nsolve`` with a bracketing solver on the exact
expression) and :func:`crossover_formula`, which solves the communication terms symbolically.
"""
from __future__ import annotations

import math
import types
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import sympy as sp

from . import formulas as fm
from .profiles import Profile, load_profile

KINDS: Dict[str, Tuple[str, ...]] = {
    "linear_scan": fm.SCAN_STRATEGIES,
    "attention": fm.ATTENTION_STRATEGIES,
    "halo": fm.HALO_STRATEGIES,
    "allreduce": fm.ALLREDUCE_STRATEGIES,
}

# which collective each strategy issues, and in which pattern (see profiles.Profile.link)
LINKS: Dict[Tuple[str, str], Tuple[str, str]] = {
    ("linear_scan", "allgather"): ("allgather", "collective"),
    ("linear_scan", "allscan"): ("p2p", "chain"),
    ("linear_scan", "ring"): ("p2p", "chain"),
    ("attention", "kv_allgather"): ("allgather", "collective"),
    ("attention", "ring_attention"): ("p2p", "hop"),
    ("attention", "ulysses"): ("alltoall", "collective"),
    ("halo", "p2p"): ("p2p", "hop"),
    ("halo", "allgather"): ("allgather", "collective"),
    ("allreduce", "ring"): ("allreduce", "collective"),
    ("allreduce", "tree"): ("allreduce", "collective"),
}

EXTRAS: Dict[str, Dict[str, Any]] = {
    "linear_scan": {"decay": "none", "C": 64, "e_in": 2, "e_st": 4, "blocks": None,
                    "ring_schedule": "handoff", "training": False},
    "attention": {"H_kv": None, "causal": True, "e_in": 2, "e_st": 4, "training": False},
    "halo": {"width": 3, "channels": None, "e_in": 2},
    "allreduce": {"nbytes": None, "e_st": 4},
}
MAX_BLOCKS = 64


@dataclass(frozen=True)
class Choice:
    """One strategy's prediction: total seconds, the named terms, and why it ranks where it does."""
    strategy: str
    seconds: float
    breakdown: Mapping[str, float]
    reason: str
    feasible: bool = True
    memory_bytes: float = 0.0
    params: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.feasible:
            return f"{self.strategy}: infeasible ({self.reason})"
        return f"{self.strategy}: {self.seconds * 1e3:.4g} ms ({self.reason})"


class InfeasibleStrategy(ValueError):
    """A forced strategy cannot run for these shapes (the message says why)."""


# ---- expressions per (kind, strategy, options) -----------------------------------------------
@lru_cache(maxsize=None)
def expressions(kind: str, strategy: str, decay: str = "none", causal: bool = True,
                ring_schedule: str = "handoff", training: bool = False
                ) -> Tuple[Dict[str, sp.Expr], sp.Expr, sp.Expr]:
    """(terms, total, memory) sympy expressions of one strategy of one kind."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}; got {kind!r}")
    if strategy not in KINDS[kind]:
        raise ValueError(f"{kind} strategies are {list(KINDS[kind])}; got {strategy!r}")
    if kind == "linear_scan":
        terms, total = fm.scan_terms(strategy, decay, ring_schedule)
        memory = fm.scan_memory(strategy, decay)
    elif kind == "attention":
        terms, total = fm.attention_terms(strategy, causal)
        memory = fm.attention_memory(strategy)
    elif kind == "halo":
        terms, total = fm.halo_terms(strategy)
        memory = fm.B * fm.W * fm.N_ch * fm.e_in * (fm.P if strategy == "allgather" else 1)
    else:
        terms, total = fm.allreduce_terms(strategy)
        memory = 2 * fm.n_bytes
    terms = dict(terms)
    if training:
        # backward: compute twice as long (F, M halved), the same communication again
        bwd = total.subs({fm.F: fm.F / 2, fm.M: fm.M / 2})
        terms["backward"] = bwd
        total = total + bwd
    return terms, total, memory


# ---- plan ------------------------------------------------------------------------------------
def plan(kind: str, *, B: int, T: int, H: int, d_k: int, d_v: int, P: int,
         hardware: Union[str, Profile, None] = None, strategy: Optional[str] = None,
         memory_limit: Optional[float] = None, **extra: Any) -> List[Choice]:
    """Rank the strategies of ``kind`` for these shapes (T = GLOBAL length), cheapest first.

    kinds and extras: ``linear_scan`` (decay "none"|"head"|"scalar"|"vector", C, e_in, e_st,
    blocks (All-Scan K; None = optimal), ring_schedule "handoff"|"lasp1", training),
    ``attention`` (H_kv, causal, e_in, e_st, training), ``halo`` (width, channels, e_in),
    ``allreduce`` (nbytes, e_st).  ``strategy=`` forces one (InfeasibleStrategy if it cannot
    run); ``memory_limit`` (bytes per rank) excludes strategies that need more.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}; got {kind!r}")
    unknown = set(extra) - set(EXTRAS[kind])
    if unknown:
        raise TypeError(f"plan({kind!r}) got unknown options {sorted(unknown)}; it accepts "
                        f"{sorted(EXTRAS[kind])}")
    for name, val in (("B", B), ("T", T), ("H", H), ("d_k", d_k), ("d_v", d_v), ("P", P)):
        if int(val) != val or val < 1:
            raise ValueError(f"{name} must be a positive integer; got {val!r}")
    if T % P:
        raise ValueError(f"T={T} (global length) is not divisible by P={P}; pad the sequence "
                         f"or pick a P that divides it")
    if strategy is not None and strategy not in KINDS[kind]:
        raise ValueError(f"{kind} strategies are {list(KINDS[kind])}; got strategy={strategy!r}")
    profile = load_profile(hardware)
    opts = dict(EXTRAS[kind])
    opts.update(extra)
    key = (kind, (B, T, H, d_k, d_v, P), profile, strategy, memory_limit,
           tuple(sorted(opts.items())))
    choices = _plan_cached(*key)
    if strategy is not None and not choices[0].feasible:
        raise InfeasibleStrategy(f"strategy {strategy!r} cannot run for {kind} with "
                                 f"B={B}, T={T}, H={H}, d_k={d_k}, d_v={d_v}, P={P}: "
                                 f"{choices[0].reason}")
    return list(choices)


def choose(kind: str, **kwargs: Any) -> Choice:
    """The cheapest feasible strategy (``plan(...)[0]``); raises if none can run."""
    best = plan(kind, **kwargs)[0]
    if not best.feasible:
        raise InfeasibleStrategy(f"no {kind} strategy can run: " +
                                 "; ".join(str(c) for c in plan(kind, **kwargs)))
    return best


def plan_cache_info() -> Any:
    """functools cache statistics of the planner (hits, misses, size)."""
    return _plan_cached.cache_info()


def clear_cache() -> None:
    _plan_cached.cache_clear()


def values_for(kind: str, strategy: str, shapes: Mapping[str, float], profile: Profile,
               opts: Mapping[str, Any]) -> Dict[str, float]:
    """Numbers for every symbol a strategy's expressions may use."""
    collective, pattern = LINKS[(kind, strategy)]
    alpha, beta = profile.link(collective, int(round(shapes["P"])), pattern)
    v = {n: float(shapes[n]) for n in ("B", "T", "H", "d_k", "d_v", "P")}
    v.update(alpha=alpha, beta=beta, F=profile.flops, M=profile.mem_bw,
             e_in=float(opts.get("e_in", 2)), e_st=float(opts.get("e_st", 4)),
             C=float(opts.get("C", 64)), K=1.0)
    h_kv = opts.get("H_kv")
    v["H_kv"] = float(v["H"] if h_kv is None else h_kv)
    v["W"] = float(opts.get("width", 0) or 0)
    ch = opts.get("channels")
    v["N_ch"] = float(v["H"] * v["d_k"] if ch is None else ch)
    nb = opts.get("nbytes")
    v["n_bytes"] = float(v["B"] * v["H"] * v["d_k"] * v["d_v"] * v["e_st"] if nb is None else nb)
    return v


def best_blocks(values: Mapping[str, float], decay: str, ring_schedule: str = "handoff",
                training: bool = False) -> int:
    """The integer K in [1, MAX_BLOCKS] nearest the analytic optimum with the lower cost."""
    p = values["P"]
    m = values["B"] * values["H"] * values["d_k"] * values["d_v"] * values["e_st"]
    c = m / values["beta"] + 3 * m / values["M"]
    k_star = math.sqrt(max(p - 2, 0.0) * c / values["alpha"]) if p > 2 else 1.0
    limit = int(min(MAX_BLOCKS, values["B"] * values["H"] * values["d_k"]))
    cands = sorted({max(1, min(limit, int(math.floor(k_star)))),
                    max(1, min(limit, int(math.ceil(k_star))))})
    f = fm.fast(_allscan_comm(decay))
    return min(cands, key=lambda k: f({**values, "K": float(k)}))


@lru_cache(maxsize=None)
def _allscan_comm(decay: str) -> sp.Expr:
    return fm.scan_handoff("allscan", decay)["comm"]


@lru_cache(maxsize=4096)
def _plan_cached(kind: str, shape: Tuple[int, ...], profile: Profile, strategy: Optional[str],
                 memory_limit: Optional[float], opts_items: Tuple[Tuple[str, Any], ...]
                 ) -> Tuple[Choice, ...]:
    opts = dict(opts_items)
    shapes = dict(zip(("B", "T", "H", "d_k", "d_v", "P"), shape))
    names = (strategy,) if strategy is not None else KINDS[kind]
    feasible: List[Choice] = []
    excluded: List[Choice] = []
    for name in names:
        why_not = _constraint(kind, name, shapes, opts)
        values = values_for(kind, name, shapes, profile, opts)
        params: Dict[str, Any] = {"alpha": values["alpha"], "beta": values["beta"]}
        if kind == "linear_scan" and name == "allscan":
            k = opts.get("blocks") or best_blocks(values, opts["decay"])
            values["K"] = float(k)
            params["blocks"] = int(k)
        terms, total, memory = expressions(
            kind, name, decay=opts.get("decay", "none"), causal=bool(opts.get("causal", True)),
            ring_schedule=opts.get("ring_schedule", "handoff"),
            training=bool(opts.get("training", False)))
        mem = fm.fast(memory)(values)
        if why_not is None and memory_limit is not None and mem > memory_limit:
            why_not = (f"needs {mem / 2**20:.1f} MiB per rank > memory_limit "
                       f"{memory_limit / 2**20:.1f} MiB")
        if why_not is not None:
            excluded.append(Choice(name, math.inf, types.MappingProxyType({}), why_not,
                                   feasible=False, memory_bytes=mem,
                                   params=types.MappingProxyType(params)))
            continue
        breakdown = {t: fm.fast(e)(values) for t, e in terms.items()}
        feasible.append(Choice(name, fm.fast(total)(values), types.MappingProxyType(breakdown),
                               "", memory_bytes=mem, params=types.MappingProxyType(params)))
    feasible.sort(key=lambda c: c.seconds)
    ranked = [_with_reason(c, feasible, kind, strategy is not None) for c in feasible]
    return tuple(ranked + excluded)


def _constraint(kind: str, strategy: str, shapes: Mapping[str, int], opts: Mapping[str, Any]
                ) -> Optional[str]:
    """Why ``strategy`` cannot run for these shapes, or None."""
    P, H = shapes["P"], shapes["H"]
    if kind == "linear_scan":
        if opts["decay"] not in fm.DECAY_KINDS:
            raise ValueError(f"decay must be one of {fm.DECAY_KINDS}; got {opts['decay']!r}")
        blocks = opts.get("blocks")
        if strategy == "allscan" and blocks is not None and blocks < 1:
            return f"blocks={blocks} must be >= 1"
    if kind == "attention":
        h_kv = H if opts.get("H_kv") is None else opts["H_kv"]
        if H % h_kv:
            raise ValueError(f"H={H} must be a multiple of H_kv={h_kv} (GQA groups)")
        if strategy == "ulysses":
            if H % P:
                return f"ulysses needs H % P == 0; H={H}, P={P}"
            if h_kv % P:
                return f"ulysses needs H_kv % P == 0; H_kv={h_kv}, P={P}"
    if kind == "halo":
        width = opts.get("width") or 0
        if width > shapes["T"] // P:
            return (f"halo width {width} exceeds the {shapes['T'] // P} tokens a rank holds; "
                    f"use fewer ranks or a longer sequence")
    return None


def _with_reason(c: Choice, ranked: Sequence[Choice], kind: str, forced: bool) -> Choice:
    best = ranked[0]
    top = sorted(c.breakdown.items(), key=lambda kv: -kv[1])[:2]
    parts = ", ".join(f"{n} {v * 1e3:.3g} ms" for n, v in top)
    if forced:
        reason = f"forced by strategy=; largest terms: {parts}"
    elif c is best:
        if len(ranked) > 1:
            runner = ranked[1]
            reason = (f"cheapest, {runner.seconds / c.seconds:.3g}x ahead of {runner.strategy}; "
                      f"largest terms: {parts}")
        else:
            reason = f"only feasible strategy; largest terms: {parts}"
    else:
        reason = f"{c.seconds / best.seconds:.3g}x the time of {best.strategy}; largest terms: " \
                 f"{parts}"
    if kind == "linear_scan" and "comm" in c.breakdown and "intra" in c.breakdown \
            and c.strategy in ("allgather", "allscan"):
        hidden = "hidden behind" if c.breakdown["comm"] <= c.breakdown["intra"] else "exceeds"
        reason += f"; comm {hidden} intra-chunk compute"
    return Choice(c.strategy, c.seconds, c.breakdown, reason, c.feasible, c.memory_bytes,
                  c.params)


# ---- crossovers ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Crossover:
    """Where ``a`` and ``b`` cost the same as ``solve_for`` grows.

    ``value`` is the continuous solution; ``first`` the first grid point (integer P, or T) past
    it; ``after`` the strategy that is cheaper beyond it.  ``equation`` is the sympy equation that
    was solved (all other symbols substituted by numbers)."""
    kind: str
    a: str
    b: str
    solve_for: str
    value: float
    first: float
    after: str
    equation: Any
    note: str = ""

    def __str__(self) -> str:
        return (f"{self.a} = {self.b} at {self.solve_for} ≈ {self.value:.6g} "
                f"({self.after} cheaper beyond){' — ' + self.note if self.note else ''}")


def crossover(kind: str, a: str, b: str, solve_for: str = "P", *,
              hardware: Union[str, Profile, None] = None, lo: Optional[float] = None,
              hi: Optional[float] = None, **fixed: Any) -> List[Crossover]:
    """All points in [lo, hi] where strategies ``a`` and ``b`` of ``kind`` tie.

    ``fixed`` gives the other shapes (B, H, d_k, d_v and T or P) and the kind's options.  P is
    scanned over integers (the link parameters change with P on hierarchical profiles), T over a
    log grid; each sign change is refined with ``sympy.nsolve`` (bisection on the bracket)
    applied to the exact sympy expression of cost(a) - cost(b).
    """
    if solve_for not in ("P", "T"):
        raise ValueError(f"solve_for must be 'P' or 'T'; got {solve_for!r}")
    for s in (a, b):
        if s not in KINDS.get(kind, ()):
            raise ValueError(f"{kind} strategies are {list(KINDS.get(kind, ()))}; got {s!r}")
    profile = load_profile(hardware)
    opts = dict(EXTRAS[kind])
    opts.update({k: v for k, v in fixed.items() if k in EXTRAS[kind]})
    shapes = {k: v for k, v in fixed.items() if k not in EXTRAS[kind]}
    need = {"B", "H", "d_k", "d_v", "T", "P"} - {solve_for}
    missing = need - set(shapes)
    if missing:
        raise TypeError(f"crossover needs {sorted(missing)} as keyword arguments")
    if solve_for == "P":
        grid = list(range(int(lo or 1), int(hi or 4096) + 1))
    else:
        lo_t = float(lo or shapes["P"] * float(opts.get("C", 64)))
        hi_t = float(hi or 2.0 ** 31)
        n = 400
        grid = [lo_t * (hi_t / lo_t) ** (i / (n - 1)) for i in range(n)]

    def cost_and_expr(strategy: str, x: float) -> Tuple[float, sp.Expr, Dict[str, float]]:
        sh = dict(shapes, **{solve_for: x})
        values = values_for(kind, strategy, sh, profile, opts)
        if kind == "linear_scan" and strategy == "allscan":
            values["K"] = float(opts.get("blocks") or best_blocks(values, opts["decay"]))
        _, total, _ = expressions(kind, strategy, decay=opts.get("decay", "none"),
                                  causal=bool(opts.get("causal", True)),
                                  ring_schedule=opts.get("ring_schedule", "handoff"),
                                  training=bool(opts.get("training", False)))
        return fm.fast(total)(values), total, values

    diffs: List[Optional[float]] = []
    for x in grid:
        sh = dict(shapes, **{solve_for: x})
        if solve_for == "P" or kind == "halo":
            sh_int = {k: int(round(v)) for k, v in sh.items()}
            if any(_constraint(kind, s, sh_int, opts) for s in (a, b)):
                diffs.append(None)          # one of them cannot run here: no tie to report
                continue
        ca, _, _ = cost_and_expr(a, x)
        cb, _, _ = cost_and_expr(b, x)
        diffs.append(ca - cb)
    out: List[Crossover] = []
    var = fm.SYMBOLS[solve_for]
    for i in range(1, len(grid)):
        d0, d1 = diffs[i - 1], diffs[i]
        if d0 is None or d1 is None or d0 == 0 or (d0 > 0) == (d1 > 0):
            continue
        x0, x1 = grid[i - 1], grid[i]
        # exact expression with the machine/shape numbers of the upper point, var left free
        _, ea, va = cost_and_expr(a, x1)
        _, eb, vb = cost_and_expr(b, x1)
        sub_a = {fm.SYMBOLS[k]: v for k, v in va.items() if k != solve_for}
        sub_b = {fm.SYMBOLS[k]: v for k, v in vb.items() if k != solve_for}
        diff_expr = ea.subs(sub_a) - eb.subs(sub_b)
        equation = sp.Eq(ea.subs(sub_a), eb.subs(sub_b))
        note = ""
        try:
            f0 = float(diff_expr.subs(var, x0))
            f1 = float(diff_expr.subs(var, x1))
            if (f0 > 0) == (f1 > 0):
                raise ValueError("no root in bracket with fixed link parameters")
            root = float(sp.nsolve(diff_expr, var, (x0, x1), solver="bisect", verify=False))
        except Exception:  # a jump of the link parameters between x0 and x1, or a flat stretch
            root = float(x1)
            note = "the costs jump across this point (network level or pipeline depth changes)"
        out.append(Crossover(kind, a, b, solve_for, root, x1, a if d1 < 0 else b, equation,
                             note))
    return out


def crossover_formula(kind: str, a: str, b: str, solve_for: str = "P",
                      decay: str = "none") -> List[sp.Expr]:
    """Symbolic tie point of the *communication* terms of ``a`` and ``b`` (sympy.solve).

    alpha/beta are renamed per collective (``alpha_allgather``, ``alpha_p2p``, ...).  Compute
    terms hold max() and are left out; this is the answer to "from which P (or T) does
    ``b``'s hand-off cost less than ``a``'s", with every other quantity a symbol."""
    var = fm.SYMBOLS[solve_for]

    def comm(s: str) -> sp.Expr:
        if kind == "linear_scan":
            e = fm.scan_handoff(s, decay)["comm"]
        else:
            e = expressions(kind, s)[0]["comm"]
        # each collective has its own alpha/beta on real machines: keep them apart
        coll = LINKS[(kind, s)][0]
        return e.subs({fm.alpha: sp.Symbol(f"alpha_{coll}", positive=True),
                       fm.beta: sp.Symbol(f"beta_{coll}", positive=True)})

    eq = (comm(a) - comm(b)).subs(fm.MULTI, 1)
    sols = sp.solve(sp.Eq(eq, 0), var)
    return [x for x in sols if x != 1]      # P = 1 ties trivially (nothing is sent)
