"""Lightning attention (Qin et al., 2024, Lightning Attention-2), blocked, declared.

Linear attention with a fixed per-head decay λ = exp(-s_h) (ALiBi-style slopes), computed the
way the paper's Algorithm 1 does: split the sequence into blocks of ``BLOCK`` steps; inside a
block a masked quadratic form with decay ``λ^(i-j)``, across blocks a running ``kv`` state that
is decayed by ``λ^BLOCK`` and read with ``λ^(i+1)`` factors:

    O_intra = [(Q Kᵀ) ⊙ M] V,       O_inter = (Q ⊙ λ^(i+1)) KV,
    KV ← λ^BLOCK · KV + (K ⊙ λ^(BLOCK-1-j))ᵀ V

A Python loop over blocks is not a pattern; ``@spcompile.linear_attention`` declares the
function as a scan with log decay ``-s`` per head, and the backend shards it.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import spcompile

BLOCK = 16


def get_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi slopes, as lightning attention's reference uses for its decays."""
    start = 2 ** (-(2 ** -(math.log2(n_heads) - 3)))
    return torch.tensor([start * start ** i for i in range(n_heads)])


@spcompile.linear_attention(q="q", k="k", v="v", decay="log_decay", layout="bhtd", scale=1.0,
                            verify=True)
def lightning_attention(q, k, v, log_decay):
    """q, k: [B, H, T, D], v: [B, H, T, E], log_decay: [H] (= -slope) → [B, H, T, E]."""
    B, H, T, D = q.shape
    s = -log_decay.view(1, H, 1, 1)
    kv = q.new_zeros(B, H, D, v.shape[-1])
    out = []
    for start in range(0, T, BLOCK):
        qi, ki, vi = (t[:, :, start:start + BLOCK] for t in (q, k, v))
        n = qi.shape[2]
        idx = torch.arange(n, device=q.device, dtype=q.dtype)
        diff = (idx[:, None] - idx[None, :]).masked_fill(idx[:, None] < idx[None, :],
                                                         float("inf"))
        mask = torch.exp(-s * diff)  # λ^(i-j) below the diagonal, 0 above
        o_intra = ((qi @ ki.transpose(-1, -2)) * mask) @ vi
        q_decay = torch.exp(-s * (idx + 1).view(1, 1, n, 1))
        o_inter = (qi * q_decay) @ kv
        out.append(o_intra + o_inter)
        k_decay = torch.exp(-s * (n - 1 - idx).view(1, 1, n, 1))
        kv = torch.exp(-s * n) * kv + (ki * k_decay).transpose(-1, -2) @ vi
    return torch.cat(out, dim=2)


class LightningLayer(nn.Module):
    def __init__(self, d_model: int = 32, n_heads: int = 4):
        super().__init__()
        self.h = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.register_buffer("log_decay", -get_slopes(n_heads), persistent=False)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.h, -1).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        q, k = F.silu(q), F.silu(k)  # TransNormer's kernel
        o = lightning_attention(q, k, v, self.log_decay)
        o = F.rms_norm(o.transpose(1, 2).reshape(B, T, D), (D,))
        return self.out(o)


class LightningModel(nn.Module):
    def __init__(self, d_model: int = 32, n_layers: int = 2):
        super().__init__()
        self.norms = nn.ModuleList([nn.LayerNorm(d_model) for _ in range(n_layers)])
        self.layers = nn.ModuleList([LightningLayer(d_model) for _ in range(n_layers)])
        self.mlps = nn.ModuleList([nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.SiLU(),
                                                 nn.Linear(2 * d_model, d_model))
                                   for _ in range(n_layers)])

    def forward(self, x):
        for norm, layer, mlp in zip(self.norms, self.layers, self.mlps):
            x = x + layer(norm(x))
            x = x + mlp(x)
        return x


def factory():
    torch.manual_seed(0)
    return LightningModel(), (torch.randn(2, 64, 32),)


if __name__ == "__main__":
    from _common import run_example
    run_example(factory)
