"""Worker-side checks for tests/test_ssd_dist.py: Mamba2's chunked SSD reference
(``ssd_minimal``) sharded — the inter-chunk recurrence over the sharded chunk axis gets the
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
