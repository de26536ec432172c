"""Cost formulas as sympy expressions, and their fast numeric twins.

Everything here is *per rank, per layer, forward pass* unless a caller asks for training
(``training=True`` adds a backward whose compute terms cost twice the forward's — the usual
2x rule for matmul-dominated kernels — and whose hand-off moves the same bytes in the reverse
direction with the same overlap).

Problem symbols: ``B, T, H, d_k, d_v, C, P`` (``T`` is the GLOBAL sequence length; a rank holds
``T/P`` tokens), ``K`` (All-Scan pipeline blocks), ``H_kv`` (GQA key/value heads), ``W`` (halo
width in tokens), ``N_ch`` (halo channels), ``n_bytes`` (all-reduce message), and element sizes
``e_in`` (activations, e.g. 2 for bf16) and ``e_st`` (states and log-decays, 4 for fp32).
Machine symbols: ``alpha`` (latency per message or per algorithm step, s), ``beta`` (link
bandwidth, bytes/s), ``F`` (flop rate, flop/s), ``M`` (memory bandwidth, bytes/s).  A hardware
profile supplies ``alpha``/``beta`` *per collective and per P* (hierarchical clusters), so each
strategy's formula uses one (alpha, beta) pair: the one of the collective it issues.

Collective models (alpha-beta, Hockney):

* all-gather — **ring** algorithm: ``(P-1)(alpha + m/beta)`` for ``m`` bytes per rank.  NCCL
  implements AllGather only as a ring, and gloo's allgather is a ring too, so this is the model
  of what actually runs; recursive doubling (``log2 P`` latency steps) is provided for reference.
* all-reduce — **ring** ``2(P-1)(alpha + m/(P beta))`` (reduce-scatter + all-gather; bandwidth
  optimal, what NCCL/gloo use for large messages) and **binary tree** ``2 ceil(log2 P)(alpha +
  m/beta)`` (reduce + broadcast; latency optimal, what wins for small messages).  The planner's
  ``allreduce`` kind ranks the two.
* all-to-all — **pairwise exchange**: ``(P-1)(alpha + m/(P beta))`` for a local tensor of ``m``
  bytes (each of the P-1 steps moves one ``m/P`` slice).
* point-to-point chain (LASP-1 ring of states): ``(P-1)`` hops of ``alpha + m/beta`` plus the
  per-hop combine; pipelined chain (ZeCO All-Scan): ``K`` blocks, ``P-2+K`` pipeline steps of
  ``alpha + m/(K beta)`` (the first block needs ``P-1`` hops, each later block one more step).

Local compute uses the roofline ``max(flops/F, bytes/M)`` per kernel, with the two-kernel
chunked structure of flash-linear-attention: a *state* kernel (per-chunk states ``h``, written to
memory) and an *output* kernel (intra-chunk ``(QK^T ⊙ Γ)V`` plus inter-chunk ``Q h``), then a
*correction* ``o += (q ⊙ e^{cumg}) S_in`` once the incoming state is known.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable, Dict, Mapping, Tuple

import sympy as sp

# ---- symbols ---------------------------------------------------------------------------------
B, T, H, d_k, d_v, C, P = sp.symbols("B T H d_k d_v C P", positive=True)
K, H_kv, W, N_ch, n_bytes = sp.symbols("K H_kv W N_ch n_bytes", positive=True)
e_in, e_st = sp.symbols("e_in e_st", positive=True)
alpha, beta, F, M = sp.symbols("alpha beta F M", positive=True)

SYMBOLS: Dict[str, sp.Symbol] = {s.name: s for s in (B, T, H, d_k, d_v, C, P, K, H_kv, W, N_ch,
                                                      n_bytes, e_in, e_st, alpha, beta, F, M)}
T_loc = T / P                        # tokens per rank
MULTI = sp.Piecewise((0, sp.Eq(P, 1)), (1, True))   # 0 when there is no one to talk to

DECAY_KINDS = ("none", "head", "scalar", "vector")


def roofline(flops: sp.Expr, nbytes: sp.Expr) -> sp.Expr:
    """Time of one kernel: bound by whichever of compute and memory traffic is slower."""
    return sp.Max(flops / F, nbytes / M)


# ---- collectives (alpha-beta) ----------------------------------------------------------------
def allgather_ring(m: sp.Expr, p: sp.Expr = P) -> sp.Expr:
    """Ring all-gather of ``m`` bytes per rank: P-1 steps, each one message of m bytes."""
    return (p - 1) * (alpha + m / beta)


def allgather_recursive_doubling(m: sp.Expr, p: sp.Expr = P) -> sp.Expr:
    """Recursive-doubling all-gather: log2(P) latency steps, same (P-1)m bytes on the wire."""
    return sp.log(p, 2) * alpha + (p - 1) * m / beta


def allreduce_ring(m: sp.Expr, p: sp.Expr = P) -> sp.Expr:
    """Ring all-reduce = reduce-scatter + all-gather of m/P slices: 2(P-1) steps."""
    return 2 * (p - 1) * (alpha + m / (p * beta))


def allreduce_tree(m: sp.Expr, p: sp.Expr = P) -> sp.Expr:
    """Binary-tree reduce then broadcast of the whole message: 2*ceil(log2 P) steps."""
    return 2 * sp.ceiling(sp.log(p, 2)) * (alpha + m / beta)


def alltoall_pairwise(m: sp.Expr, p: sp.Expr = P) -> sp.Expr:
    """Pairwise-exchange all-to-all of a local tensor of m bytes: P-1 slices of m/P."""
    return (p - 1) * (alpha + m / (p * beta))


def p2p(m: sp.Expr) -> sp.Expr:
    """One send/recv of m bytes."""
    return alpha + m / beta


def chain(m: sp.Expr, hop_work: sp.Expr = sp.Integer(0), p: sp.Expr = P) -> sp.Expr:
    """Un-pipelined chain along ranks 0→1→…→P-1: P-1 hops, each a message plus the hop's work."""
    return (p - 1) * (alpha + m / beta + hop_work)


def pipelined_chain(m: sp.Expr, blocks: sp.Expr = K, hop_work: sp.Expr = sp.Integer(0),
                    p: sp.Expr = P) -> sp.Expr:
    """Chain of ``blocks`` pipelined pieces: P-2+K steps of one block's message and work.

    Multiplied by MULTI so that P = 1 (no chain at all) costs nothing for any K."""
    return MULTI * (p - 2 + blocks) * (alpha + m / (blocks * beta) + hop_work / blocks)


# ---- linear scan (state hand-off) ------------------------------------------------------------
def state_bytes() -> sp.Expr:
    """|S|: one rank's state for one layer, B·H·d_k·d_v fp32."""
    return B * H * d_k * d_v * e_st


def handoff_decay_bytes(decay: str) -> sp.Expr:
    """Bytes of a shard's total log decay that travel with the state (none: nothing)."""
    _check_decay(decay)
    return {"none": sp.Integer(0), "head": B * H * e_st, "scalar": B * H * e_st,
            "vector": B * H * d_k * e_st}[decay]


def input_decay_bytes(decay: str) -> sp.Expr:
    """Bytes of log-decay input a rank's kernels read (per kernel pass)."""
    _check_decay(decay)
    return {"none": sp.Integer(0), "head": H * e_st, "scalar": B * T_loc * H * e_st,
            "vector": B * T_loc * H * d_k * e_st}[decay]


def _check_decay(decay: str) -> None:
    if decay not in DECAY_KINDS:
        raise ValueError(f"decay must be one of {DECAY_KINDS}; got {decay!r}")


def scan_local_terms(decay: str = "none") -> Dict[str, sp.Expr]:
    """The local chunk-scan kernels of one rank (T/P tokens, chunk C), each a roofline.

    * ``state``: per-chunk states h = Σ k^T v (2·d_k·d_v flops per token and head); reads k, v,
      decay; writes T_loc/C states of d_k·d_v fp32.
    * ``intra``: output kernel, (QK^T⊙Γ)V within chunks (2·C·(d_k+d_v) per token and head) plus
      Q·h (2·d_k·d_v); reads q, k, v, h, decay; writes o.
    * ``correction``: o += (q ⊙ e^{cumg}) S_in (2·d_k·d_v); reads q, o, decay, S_in; writes o.
    """
    tok = B * T_loc * H
    chunk_states = (T_loc / C) * B * H * d_k * d_v * e_st
    g = input_decay_bytes(decay)
    state = roofline(2 * tok * d_k * d_v,
                     tok * (d_k + d_v) * e_in + g + chunk_states)
    intra = roofline(2 * tok * C * (d_k + d_v) + 2 * tok * d_k * d_v,
                     tok * (2 * d_k + 2 * d_v) * e_in + g + chunk_states)
    correction = MULTI * roofline(2 * tok * d_k * d_v,
                                  tok * (d_k + 2 * d_v) * e_in + g + state_bytes())
    return {"state": state, "intra": intra, "correction": correction}


SCAN_STRATEGIES = ("allgather", "allscan", "ring")
RING_SCHEDULES = ("handoff", "lasp1")


def scan_handoff(strategy: str, decay: str = "none", ring_schedule: str = "handoff"
                 ) -> Dict[str, sp.Expr]:
    """The hand-off of one strategy as named terms (communication and its combine work).

    * ``allgather`` (LASP-2): ring all-gather of (state, total decay); each rank then folds the
      states of the ranks before it, read P states and write one: ``combine = P|S|/M``.
    * ``allscan`` (ZeCO All-Scan): pipelined chain of K blocks; each hop folds the block it
      received into its own (read 2, write 1 block): hop work ``3|S|/M`` split over K.
    * ``ring`` (LASP-1 ring of states): un-pipelined chain with the same per-hop fold.  With
      ``ring_schedule="lasp1"`` each hop also runs the rank's whole local chunk scan, as LASP-1's
      reference implementation does (recv → local kernels from the received state → send).
    """
    m = state_bytes() + handoff_decay_bytes(decay)
    fold = 3 * state_bytes() / M
    if strategy == "allgather":
        return {"comm": allgather_ring(m), "combine": MULTI * P * state_bytes() / M}
    if strategy == "allscan":
        return {"comm": pipelined_chain(m, K, fold)}
    if strategy == "ring":
        if ring_schedule not in RING_SCHEDULES:
            raise ValueError(f"ring_schedule must be one of {RING_SCHEDULES}; got "
                             f"{ring_schedule!r}")
        work = fold
        if ring_schedule == "lasp1":
            loc = scan_local_terms(decay)
            work = fold + loc["state"] + loc["intra"] + loc["correction"]
        return {"comm": chain(m, work)}
    raise ValueError(f"linear_scan strategy must be one of {SCAN_STRATEGIES}; got {strategy!r}")


def scan_terms(strategy: str, decay: str = "none", ring_schedule: str = "handoff"
               ) -> Tuple[Dict[str, sp.Expr], sp.Expr]:
    """Named terms and the critical-path total of a sequence-parallel linear scan.

    Overlap (what runs concurrently with what):
    * allgather: ``state + max(intra, comm) + combine + correction`` — the states are gathered
      while the intra-chunk kernel runs (LASP-2).
    * allscan: ``state + max(intra, comm) + correction`` — the block pipeline runs beside the
      local compute (ZeCO); the folds are inside ``comm``.
    * ring: ``state + intra + comm + correction`` — nothing overlaps the chain (compute waits).
      Under ``lasp1`` the chain already contains every rank's local compute, so the total is
      ``comm + state + intra + correction`` with the last rank's own kernels added once.
    """
    terms = dict(scan_local_terms(decay))
    terms.update(scan_handoff(strategy, decay, ring_schedule))
    if strategy == "allgather":
        total = terms["state"] + sp.Max(terms["intra"], terms["comm"]) + terms["combine"] \
            + terms["correction"]
    elif strategy == "allscan":
        total = terms["state"] + sp.Max(terms["intra"], terms["comm"]) + terms["correction"]
    else:
        total = terms["state"] + terms["intra"] + terms["comm"] + terms["correction"]
    return terms, total


def scan_memory(strategy: str, decay: str = "none") -> sp.Expr:
    """Bytes a rank holds for one layer: activations, chunk states, hand-off buffers."""
    tok = B * T_loc * H
    act = tok * (2 * d_k + 2 * d_v) * e_in + input_decay_bytes(decay)
    chunk_states = (T_loc / C) * B * H * d_k * d_v * e_st
    m = state_bytes() + handoff_decay_bytes(decay)
    buffers = {"allgather": P * m, "allscan": 2 * m, "ring": 2 * m}[strategy]
    return act + chunk_states + buffers


# ---- softmax attention (hybrid layers) -------------------------------------------------------
ATTENTION_STRATEGIES = ("kv_allgather", "ring_attention", "ulysses")


def attention_compute(causal: bool, q_tokens: sp.Expr, k_tokens: sp.Expr, heads: sp.Expr,
                      kv_heads: sp.Expr) -> sp.Expr:
    """Flash-attention roofline for ``q_tokens`` queries against ``k_tokens`` keys.

    flops 2·(d_k+d_v) per (query, key, head), halved when causal: the causal work is assumed
    load-balanced over ranks (zig-zag sharding), so every rank does 1/P of the global half.
    Bytes: q and o once, k and v once (blocks stay on chip)."""
    frac = sp.Rational(1, 2) if causal else sp.Integer(1)
    flops = frac * 2 * B * heads * q_tokens * k_tokens * (d_k + d_v)
    nbytes = (B * q_tokens * heads * (d_k + d_v) * e_in
              + B * k_tokens * kv_heads * (d_k + d_v) * e_in)
    return roofline(flops, nbytes)


def attention_terms(strategy: str, causal: bool = True) -> Tuple[Dict[str, sp.Expr], sp.Expr]:
    """Named terms and total of a softmax-attention layer with T/P query tokens per rank.

    * kv_allgather (LASP-2H): all-gather K and V (``m = B·T_loc·H_kv·(d_k+d_v)·e_in``), then
      attend T_loc queries to all T keys; the gather is not overlapped.
    * ring_attention: P steps; each computes one (T_loc × T_loc) block while the next K/V block
      travels: ``blk + (P-1)·max(blk, alpha + m/beta) + (P-1)·merge`` (log-sum-exp merge of
      fp32 partial outputs, ``3·B·T_loc·H·d_v·e_st`` bytes).
    * ulysses: all-to-all q, k, v to (full T, H/P heads), attend, all-to-all o back; needs
      ``H % P == 0`` and ``H_kv % P == 0`` (checked by the planner).
    """
    mkv = B * T_loc * H_kv * (d_k + d_v) * e_in
    if strategy == "kv_allgather":
        terms = {"comm": allgather_ring(mkv),
                 "attention": attention_compute(causal, T_loc, T, H, H_kv)}
        return terms, terms["comm"] + terms["attention"]
    if strategy == "ring_attention":
        blk = attention_compute(causal, T_loc, T_loc, H, H_kv)
        merge = MULTI * (P - 1) * 3 * B * T_loc * H * d_v * e_st / M
        comm_step = p2p(mkv)
        terms = {"attention": P * blk, "comm": MULTI * (P - 1) * comm_step, "merge": merge}
        total = blk + (P - 1) * sp.Max(blk, comm_step) + merge
        return terms, total
    if strategy == "ulysses":
        m_in = B * T_loc * (H * d_k + H_kv * d_k + H_kv * d_v) * e_in
        m_out = B * T_loc * H * d_v * e_in
        terms = {"comm": alltoall_pairwise(m_in) + alltoall_pairwise(m_out),
                 "attention": attention_compute(causal, T, T, H / P, H_kv / P)}
        return terms, terms["comm"] + terms["attention"]
    raise ValueError(f"attention strategy must be one of {ATTENTION_STRATEGIES}; got "
                     f"{strategy!r}")


def attention_memory(strategy: str) -> sp.Expr:
    """Bytes a rank holds for one attention layer (inputs, output, exchanged K/V)."""
    local = B * T_loc * (H * (d_k + d_v) + H_kv * (d_k + d_v)) * e_in
    if strategy == "kv_allgather":
        return local + B * T * H_kv * (d_k + d_v) * e_in
    if strategy == "ring_attention":
        return local + 2 * B * T_loc * H_kv * (d_k + d_v) * e_in + B * T_loc * H * d_v * e_st
    if strategy == "ulysses":
        return local + B * T * (H * (d_k + d_v) + H_kv * (d_k + d_v)) * e_in / P
    raise ValueError(f"attention strategy must be one of {ATTENTION_STRATEGIES}")


# ---- halo and all-reduce ---------------------------------------------------------------------
HALO_STRATEGIES = ("p2p", "allgather")
ALLREDUCE_STRATEGIES = ("ring", "tree")


def halo_terms(strategy: str) -> Tuple[Dict[str, sp.Expr], sp.Expr]:
    """Halo of W tokens × N_ch channels from rank r-1: one send/recv, or an all-gather of every
    rank's tail (each rank then keeps its left neighbour's)."""
    m = B * W * N_ch * e_in
    if strategy == "p2p":
        t = MULTI * p2p(m)
    elif strategy == "allgather":
        t = allgather_ring(m)
    else:
        raise ValueError(f"halo strategy must be one of {HALO_STRATEGIES}; got {strategy!r}")
    return {"comm": t}, t


def allreduce_terms(strategy: str) -> Tuple[Dict[str, sp.Expr], sp.Expr]:
    """All-reduce of n_bytes (a Partial value, e.g. the global k^T v of non-causal attention)."""
    if strategy == "ring":
        t = allreduce_ring(n_bytes)
    elif strategy == "tree":
        t = MULTI * allreduce_tree(n_bytes)
    else:
        raise ValueError(f"allreduce strategy must be one of {ALLREDUCE_STRATEGIES}; got "
                         f"{strategy!r}")
    return {"comm": t}, t


def optimal_blocks() -> sp.Expr:
    """K* minimising the All-Scan chain: d/dK (P-2+K)(alpha + c/K) = 0 → sqrt((P-2)·c/alpha),
    with c = m/beta + fold (the per-hop bytes time of the whole state)."""
    c = sp.Symbol("c", positive=True)
    f = (P - 2 + K) * (alpha + c / K)
    sol = sp.solve(sp.diff(f, K), K)
    return [s for s in sol if s.is_positive is not False][0]


# ---- fast numeric evaluation -----------------------------------------------------------------
@lru_cache(maxsize=None)
def _lambdified(expr: sp.Expr) -> Tuple[Tuple[str, ...], Callable[..., float]]:
    free = tuple(sorted(s.name for s in expr.free_symbols))
    fn = sp.lambdify([SYMBOLS[n] for n in free], expr, modules=["math"])
    return free, fn


def fast(expr: sp.Expr) -> Callable[[Mapping[str, float]], float]:
    """A plain-Python evaluator of ``expr`` (lambdify to ``math``), compiled once per expr."""
    free, fn = _lambdified(expr)

    def evaluate(values: Mapping[str, float]) -> float:
        try:
            return float(fn(*[values[n] for n in free]))
        except KeyError as err:
            raise KeyError(f"no value for symbol {err.args[0]!r}; expression needs "
                           f"{list(free)}") from None
    return evaluate


def exact(expr: sp.Expr, values: Mapping[str, float]) -> float:
    """Evaluate with sympy itself (substitute, then evalf) — the slow reference for ``fast``."""
    subs = {SYMBOLS[n]: sp.Integer(v) if float(v).is_integer() else sp.Float(v, 30)
            for n, v in values.items() if n in SYMBOLS}
    return float(expr.xreplace(subs).evalf(30))

