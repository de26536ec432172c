"""Chunked linear scan in plain PyTorch: the CPU path and the reference for the Triton kernels.

Within a chunk of ``C`` steps the recurrence is a masked quadratic form; across chunks the state
advances by one matrix product (DESIGN.md §3):

    b      = cumsum(g) inside the chunk                       (log decay from the chunk start)
    O_n    = scale · [ (Q ⊙ e^b) S_{n-1} + ((Q Kᵀ) ⊙ e^{b_i - b_j} ⊙ tril) V ]
    S_n    = e^{b_last} ⊙ S_{n-1} + (K ⊙ e^{b_last - b})ᵀ V

Every exponent is a difference ``b_i - b_j`` with ``j <= i`` (or ``b_last - b``), so with
non-positive log decays nothing overflows. Per-step log decays are clamped at ``LOG_DECAY_FLOOR``
(``exp(-40) ≈ 4e-18``, zero for every practical purpose) so that a decay of exactly 0
(``-inf`` in log space) gives neither ``inf - inf`` nor NaN.

Vector (GLA) decays use chunks of at most ``VECTOR_CHUNK`` steps, because their intra-chunk
form needs a ``[C, C, K]`` tensor of pairwise decays.
Everything runs in fp32 (fp64 when the inputs are fp64); the output is cast back to ``v.dtype``
and the state stays fp32.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

LOG_DECAY_FLOOR = -40.0
VECTOR_CHUNK = 16


def decay_kind(log_decay: Optional[torch.Tensor]) -> str:
    """'none' | 'head' ([H]) | 'scalar' ([B, T, H]) | 'vector' ([B, T, H, K])."""
    if log_decay is None:
        return "none"
    return {1: "head", 3: "scalar", 4: "vector"}[log_decay.dim()]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunks(x: torch.Tensor, N: int, C: int) -> torch.Tensor:
    """[B, T, H, ...] → [B, H, N, C, ...], zero-padded to N·C steps."""
    B, T = x.shape[:2]
    pad = N * C - T
    if pad:
        x = torch.cat([x, x.new_zeros(B, pad, *x.shape[2:])], dim=1)
    x = x.reshape(B, N, C, *x.shape[2:])
    return x.movedim(3, 1)  # B, H, N, C, ...


class _Chunked:
    """The chunked view of one call's inputs, shared by the forward and the backward.

    ``qc, kc, vc``: [B, H, N, C, K|V]; ``b``: cumulative log decay inside each chunk
    ([B, H, N, C] for head/scalar, [B, H, N, C, K] for vector, None for plain); ``pair``: the
    intra-chunk decay mask (``[.., C, C]`` or ``[.., C, C, K]``; the causal 0/1 mask for plain).
    """

    def __init__(self, q, k, v, log_decay, chunk_size):
        B, T, H, K = q.shape
        self.B, self.T, self.H, self.K, self.V = B, T, H, K, v.shape[-1]
        self.cdt = cdt = compute_dtype(q)
        self.kind = kind = decay_kind(log_decay)
        C = max(1, min(chunk_size, VECTOR_CHUNK) if kind == "vector" else chunk_size)
        self.C = C = min(C, max(T, 1))
        self.N = N = max(1, math.ceil(T / C))
        self.qc, self.kc, self.vc = (_chunks(x.to(cdt), N, C) for x in (q, k, v))
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        self.b = None
        if kind == "none":
            self.pair = causal.to(cdt)
            self.strict = causal.tril(-1).to(cdt)
            return
        g = log_decay.to(cdt)
        # the clamp's gradient mask (clamp_min passes the gradient where g >= floor)
        self.g_live = g >= LOG_DECAY_FLOOR
        g = g.clamp_min(LOG_DECAY_FLOOR)
        if kind == "head":
            g = g.view(1, 1, H).expand(B, T, H)
        if kind == "vector":
            self.b = b = _chunks(g, N, C).cumsum(-2)  # [B, H, N, C, K]
            diff = b.unsqueeze(-2) - b.unsqueeze(-3)  # [B, H, N, C(i), C(j), K]
            self.pair = diff.masked_fill(~causal.unsqueeze(-1), -math.inf).exp()
            self.strict = self.pair * causal.tril(-1).unsqueeze(-1)  # pair without its diagonal
        else:
            self.b = b = _chunks(g, N, C).cumsum(-1)  # [B, H, N, C]
            self.pair = (b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(~causal, -math.inf).exp()
            self.strict = self.pair * causal.tril(-1)

    def scores(self) -> torch.Tensor:
        """A = (Q Kᵀ) ⊙ pair: [B, H, N, C, C]."""
        if self.kind == "vector":
            return torch.einsum("bhnik,bhnjk,bhnijk->bhnij", self.qc, self.kc, self.pair)
        return (self.qc @ self.kc.transpose(-1, -2)) * self.pair

    def decayed(self):
        """(q ⊙ e^b, k ⊙ e^{b_last - b}, chunk decay e^{b_last} shaped to scale S, or None)."""
        if self.kind == "none":
            return self.qc, self.kc, None
        b = self.b
        if self.kind == "vector":
            b_last = b[..., -1:, :]  # [B, H, N, 1, K]
            return (self.qc * b.exp(), self.kc * (b_last - b).exp(),
                    b_last.exp().transpose(-1, -2))  # [B, H, N, K, 1]
        b_last = b[..., -1:]
        return (self.qc * b.exp().unsqueeze(-1), self.kc * (b_last - b).exp().unsqueeze(-1),
                b_last.exp().unsqueeze(-1))  # [B, H, N, 1, 1]

    def unchunk(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, N, C, ...] → [B, T, H, ...] (padding dropped)."""
        x = x.movedim(1, 3)
        return x.reshape(self.B, self.N * self.C, *x.shape[3:])[:, :self.T]


def _states_before(S0, U, chunk_decay):
    """S_prev[n]: the state entering chunk n, and the final state (the sequential part)."""
    prev = []
    S = S0
    for n in range(U.shape[2]):
        prev.append(S)
        S = (S if chunk_decay is None else chunk_decay[:, :, n] * S) + U[:, :, n]
    return torch.stack(prev, dim=2), S


def chunked_linear_scan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        log_decay: Optional[torch.Tensor], scale: float,
                        initial_state: Optional[torch.Tensor], chunk_size: int = 64
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """q, k: [B, T, H, K]; v: [B, T, H, V]; log_decay: None | [H] | [B, T, H] | [B, T, H, K];
    initial_state: None | [B, H, K, V] → (o [B, T, H, V] in v.dtype, final state fp32/fp64)."""
    c = _Chunked(q, k, v, log_decay, chunk_size)
    S0 = (q.new_zeros(c.B, c.H, c.K, c.V, dtype=c.cdt) if initial_state is None
          else initial_state.to(c.cdt))
    q_dec, k_dec, chunk_decay = c.decayed()
    o_intra = c.scores() @ c.vc  # [B, H, N, C, V]
    U = k_dec.transpose(-1, -2) @ c.vc  # [B, H, N, K, V]: each chunk's own state contribution
    S_prev, S = _states_before(S0, U, chunk_decay)
    o = (o_intra + q_dec @ S_prev) * scale
    return c.unchunk(o).to(v.dtype), S


def chunked_linear_scan_bwd(q, k, v, log_decay, scale, initial_state, chunk_size, do, dS):
    """Hand-written VJP of ``chunked_linear_scan`` for ``<o, do> + <S_T, dS>``.

    → [dq, dk, dv, dlog_decay or None, dinitial_state or None], in the inputs' dtypes. The state
    is recomputed chunk by chunk (one [K, V] product per chunk); the state gradient runs the same
    recurrence backwards, ``G_{n-1} = e^{b_last,n} ⊙ G_n + (q ⊙ e^b)_nᵀ dO_n``; everything else
    is batched over chunks. With ``A = (Q Kᵀ) ⊙ pair``, the decay gradient follows from
    ``∂A/∂b_i = +A`` (row) and ``-A`` (column), i.e. ``db = dQ_A ⊙ Q - dK_A ⊙ K``.
    """
    c = _Chunked(q, k, v, log_decay, chunk_size)
    cdt = c.cdt
    S0 = (q.new_zeros(c.B, c.H, c.K, c.V, dtype=cdt) if initial_state is None
          else initial_state.to(cdt))
    q_dec, k_dec, chunk_decay = c.decayed()
    A = c.scores()
    U = k_dec.transpose(-1, -2) @ c.vc
    S_prev, _ = _states_before(S0, U, chunk_decay)
    dO = _chunks(do.to(cdt), c.N, c.C) * scale  # [B, H, N, C, V] (padding rows are 0)

    # state gradients: G[n] = d loss / d (state after chunk n)
    W = q_dec.transpose(-1, -2) @ dO  # [B, H, N, K, V]: chunk n's outputs' pull on S_prev[n]
    G_after = [None] * c.N
    G = dS.to(cdt)
    for n in range(c.N - 1, -1, -1):
        G_after[n] = G
        G = (G if chunk_decay is None else chunk_decay[:, :, n] * G) + W[:, :, n]
    dS0 = G
    Gs = torch.stack(G_after, dim=2)  # [B, H, N, K, V]

    dq_dec = dO @ S_prev.transpose(-1, -2)  # [B, H, N, C, K]
    dk_dec = c.vc @ Gs.transpose(-1, -2)  # [B, H, N, C, K]
    dA = dO @ c.vc.transpose(-1, -2)  # [B, H, N, C, C]; only ever used times pair
    dvc = A.transpose(-1, -2) @ dO + k_dec @ Gs
    # the diagonal of A does not depend on the decays (pair_ii = 1): it is added apart from the
    # strictly lower part, so that its row and column terms cancel exactly in db below
    diag = torch.diagonal(dA, dim1=-2, dim2=-1).unsqueeze(-1)  # [B, H, N, C, 1]
    if c.kind == "vector":
        T3 = dA.unsqueeze(-1) * c.strict  # [B, H, N, C(i), C(j), K]
        dq_s = torch.einsum("bhnijk,bhnjk->bhnik", T3, c.kc)
        dk_s = torch.einsum("bhnijk,bhnik->bhnjk", T3, c.qc)
    else:
        dAp = dA * c.strict
        dq_s = dAp @ c.kc
        dk_s = dAp.transpose(-1, -2) @ c.qc
    dq_a, dk_a = dq_s + diag * c.kc, dk_s + diag * c.qc

    dlog = None
    if c.kind == "none":
        dqc, dkc = dq_a + dq_dec, dk_a + dk_dec
    else:
        b = c.b if c.kind == "vector" else c.b.unsqueeze(-1)
        b_last = b[..., -1:, :]
        dqc = dq_a + dq_dec * b.exp()
        dkc = dk_a + dk_dec * (b_last - b).exp()
        # d loss / d b per step and key channel ([B, H, N, C, K]; summed over K below for
        # head/scalar decays, whose b has no K axis). The last row's k_dec = k does not depend
        # on b, so its +/- terms are left out rather than cancelled in floating point.
        e_k = dk_dec * k_dec
        e_k = torch.cat([e_k[..., :-1, :], torch.zeros_like(e_k[..., -1:, :])], dim=-2)
        db = dq_s * c.qc - dk_s * c.kc + dq_dec * q_dec - e_k
        # b_last enters k_dec (+) and the chunk decay e^{b_last} that scales S_{n-1}
        db_last = (e_k.sum(-2)
                   + (Gs * S_prev * chunk_decay).sum(-1))  # [B, H, N, K]
        db = torch.cat([db[..., :-1, :], db[..., -1:, :] + db_last.unsqueeze(-2)], dim=-2)
        # b = cumsum(g) inside the chunk → dg = reverse cumsum of db
        dg = db.flip(-2).cumsum(-2).flip(-2)
        dg = c.unchunk(dg if c.kind == "vector" else dg.sum(-1))  # [B, T, H(, K)]
        if c.kind == "head":
            dg = dg.sum(dim=(0, 1))
        dlog = (dg * c.g_live).to(log_decay.dtype)

    dq = c.unchunk(dqc).to(q.dtype)
    dk = c.unchunk(dkc).to(k.dtype)
    dv = c.unchunk(dvc).to(v.dtype)
    dh0 = None if initial_state is None else dS0.to(initial_state.dtype)
    return [dq, dk, dv, dlog, dh0]
