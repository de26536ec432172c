"""Worker-side checks for tests/test_ssd_dist.py: Mamba2's chunked SSD reference
(``ssd_minimal``) and HF's ``torch_forward`` spelling of it sharded — the inter-chunk recurrence over the sharded chunk axis gets the
incoming state of the earlier ranks — against the full-sequence eager run."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from _checks_backend import compare_sharded
from models import ChunkedSSD, segsum_exact


def ssd_with_state(X, A, B, C, block_len, initial_states):
    """ssd_minimal with a given initial state, returning (Y, final_state) as the original."""
    b, T, h, p = X.shape
    c = T // block_len
    X, B, C = (t.reshape(b, c, block_len, *t.shape[2:]) for t in (X, B, C))
    A = A.reshape(b, c, block_len, h).permute(0, 3, 1, 2)
    A_cumsum = torch.cumsum(A, dim=-1)
    L = torch.exp(segsum_exact(A))
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, L, X)
    decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, X)
    states = torch.cat([initial_states, states], dim=1)
    decay_chunk = torch.exp(segsum_exact(F.pad(A_cumsum[:, :, :, -1], (1, 0))))
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]
    state_decay_out = torch.exp(A_cumsum)
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, state_decay_out)
    return (Y_diag + Y_off).reshape(b, T, h, p), final_state


class SSDWithState(nn.Module):
    """A learned initial state (replicated), and the final state returned as a second output."""

    def __init__(self, d: int = 16, heads: int = 2, state: int = 4, block: int = 4):
        super().__init__()
        self.h, self.n, self.block = heads, state, block
        self.proj = nn.Linear(d, d + 2 * heads * state + heads)
        self.A_log = nn.Parameter(torch.log(torch.linspace(1.0, 4.0, heads)))
        self.h0 = nn.Parameter(0.5 * torch.randn(1, 1, heads, d // heads, state))
        self.out = nn.Linear(d, d)

    def forward(self, u):
        b, T, D = u.shape
        x, B, C, dt = torch.split(self.proj(u), [D, self.h * self.n, self.h * self.n, self.h], -1)
        dt = F.softplus(dt)
        A = -torch.exp(self.A_log) * dt
        y, final = ssd_with_state(x.view(b, T, self.h, -1) * dt.unsqueeze(-1), A,
                                  B.view(b, T, self.h, self.n), C.view(b, T, self.h, self.n),
                                  self.block, self.h0.expand(b, -1, -1, -1, -1))
        return self.out(y.reshape(b, T, D)), final.square().sum()


def _pad_by(x, pad_size):
    shape = (0, 0, 0, 0, 0, pad_size, 0, 0) if x.dim() == 4 else (0, 0, 0, pad_size, 0, 0)
    return F.pad(x, shape, mode="constant", value=0)


def _into_chunks(x, pad_size, chunk):
    x = _pad_by(x, pad_size)
    return x.reshape(x.shape[0], -1, chunk, *x.shape[2:])


def segment_sum(x):
    """HF's numerically stable segsum: expand, mask, cumsum over the rows, mask again."""
    n = x.size(-1)
    x = x[..., None].expand(*x.size(), n)
    x = x.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool), diagonal=-1), 0)
    x = torch.cumsum(x, dim=-2)
    return x.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool), diagonal=0), -torch.inf)


class HFMamba2Mixer(nn.Module):
    """The SSD part of HF transformers' Mamba2 ``torch_forward`` (the path without the CUDA
    kernels): broadcast products summed over an axis instead of einsums, ``segment_sum``,
    ``(decay_chunk.transpose(1, 3)[..., None, None] * states[:, :, None]).sum(1)``."""

    def __init__(self, d: int = 16, heads: int = 2, state: int = 4, chunk: int = 4):
        super().__init__()
        self.h, self.hd, self.n, self.chunk = heads, d // heads, state, chunk
        self.in_proj = nn.Linear(d, d + 2 * state + heads)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, heads + 1).float()))
        self.D = nn.Parameter(torch.ones(heads))
        self.out_proj = nn.Linear(d, d)

    def forward(self, u):
        bsz, T, D = u.shape
        hs, B, C, dt = torch.split(self.in_proj(u), [D, self.n, self.n, self.h], -1)
        dt = F.softplus(dt)
        A = -torch.exp(self.A_log.float())
        hs = hs.reshape(bsz, T, -1, self.hd).float()
        B = B.reshape(bsz, T, -1, self.n).float().repeat(1, 1, self.h, 1)
        C = C.reshape(bsz, T, -1, self.n).float().repeat(1, 1, self.h, 1)
        pad_size = (self.chunk - T % self.chunk) % self.chunk
        D_residual = self.D[..., None] * _pad_by(hs, pad_size)
        hs = hs * dt[..., None]
        A = A.to(hs.dtype) * dt
        hs, A, B, C = [_into_chunks(t, pad_size, self.chunk) for t in (hs, A, B, C)]
        A = A.permute(0, 3, 1, 2)
        A_cumsum = torch.cumsum(A, dim=-1)
        L = torch.exp(segment_sum(A))
        G = (C[:, :, :, None, :, :] * B[:, :, None, :, :, :]).sum(dim=-1)
        M = (G[..., None] * L.permute(0, 2, 3, 4, 1)[..., None]).sum(dim=-1)
        Y_diag = (M[..., None] * hs[:, :, None]).sum(dim=3)
        decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)
        B_decay = B * decay_states.permute(0, -2, -1, 1)[..., None]
        states = (B_decay[..., None, :] * hs[..., None]).sum(dim=2)
        previous_states = torch.zeros_like(states[:, :1])
        states = torch.cat([previous_states, states], dim=1)
        decay_chunk = torch.exp(segment_sum(F.pad(A_cumsum[:, :, :, -1], (1, 0))))
        decay_chunk = decay_chunk.transpose(1, 3)
        new_states = (decay_chunk[..., None, None] * states[:, :, None, ...]).sum(dim=1)
        states, ssm_state = new_states[:, :-1], new_states[:, -1]
        state_decay_out = torch.exp(A_cumsum)
        C_times_states = C[..., None, :] * states[:, :, None, ...]
        Y_off = C_times_states.sum(-1) * state_decay_out.permute(0, 2, 3, 1)[..., None]
        y = (Y_diag + Y_off).reshape(bsz, -1, self.h, self.hd) + D_residual
        return self.out_proj(y.reshape(bsz, T, -1)), ssm_state.square().mean()


def _kinds(be):
    return [(m.pattern, m.strategy) for r in be.reports for m in r.matches]


def _fallbacks(be):
    return [str(f) for r in be.reports for f in r.fallbacks]


def check_chunked_ssd(rank, P, rec):
    for strategy in (("allgather", "ring") if P == 2 else ("allscan",)):
        be = compare_sharded(rank, P, rec, f"ssd_minimal/{strategy}", lambda: ChunkedSSD(),
                             strategy=strategy)
        kinds = _kinds(be)
        rec.true(f"ssd_minimal/{strategy}: inter-chunk recurrence matched, zero fallbacks",
                 ("chunk_state_recurrence", strategy) in kinds and not _fallbacks(be),
                 f"{kinds} {_fallbacks(be)}"[:300])


def check_ssd_with_state(rank, P, rec):
    be = compare_sharded(rank, P, rec, "ssd with initial/final state", lambda: SSDWithState())
    rec.true("ssd with initial/final state: matched, zero fallbacks",
             any(k == "chunk_state_recurrence" for k, _ in _kinds(be)) and not _fallbacks(be),
             f"{_kinds(be)} {_fallbacks(be)}"[:300])


def check_hf_mamba2(rank, P, rec):
    strategy = "allgather" if P == 2 else "allscan"
    be = compare_sharded(rank, P, rec, f"HF Mamba2 torch_forward/{strategy}",
                         lambda: HFMamba2Mixer(), strategy=strategy)
    rec.true(f"HF Mamba2 torch_forward/{strategy}: mul-sum recurrence matched, zero fallbacks",
             ("chunk_state_recurrence", strategy) in _kinds(be) and not _fallbacks(be),
             f"{_kinds(be)} {_fallbacks(be)}"[:300])
