"""Gated linear attention with vector (per-key-channel) gates (Yang et al., 2024), declared.

GLA's gate ``α_t ∈ (0, 1)^{d_k}`` decays each key channel of the state separately:

    S_t = diag(α_t) S_{t-1} + k_tᵀ v_t,     o_t = q_t S_t

The layer's own function is GLA's reference recurrence (a loop over time, as fla's
``naive_recurrent_gla`` writes it) — correct but slow, and a loop no pattern should have to
recognise. ``@spcompile.linear_attention`` declares what it computes: eagerly the chunked
kernel runs instead, and under the ``sp`` backend it becomes a sequence-parallel scan.
``verify=True`` checks the declaration against the loop once.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import spcompile


@spcompile.linear_attention(q="q", k="k", v="v", decay="gk", layout="bhtd", scale=1.0,
                            verify=True)
def recurrent_gla(q, k, v, gk):
    """q, k, gk: [B, H, T, K] (gk = log α_t), v: [B, H, T, V] → o [B, H, T, V]."""
    B, H, T, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1])
    o = torch.zeros_like(v)
    for t in range(T):
        S = S * gk[:, :, t].exp()[..., None] + k[:, :, t, :, None] * v[:, :, t, None, :]
        o[:, :, t] = (q[:, :, t, :, None] * S).sum(-2)
    return o


class GatedLinearAttention(nn.Module):
    def __init__(self, d_model: int = 32, n_heads: int = 4, gate_low_rank: int = 8,
                 gate_logit_normalizer: float = 16.0):
        super().__init__()
        self.h, self.dk = n_heads, d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.g_proj = nn.Linear(d_model, d_model, bias=False)
        self.gk_proj = nn.Sequential(nn.Linear(d_model, gate_low_rank, bias=False),
                                     nn.Linear(gate_low_rank, d_model))
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.norm = nn.LayerNorm(self.dk, elementwise_affine=False)
        self.gate_logit_normalizer = gate_logit_normalizer

    def forward(self, x):
        B, T, D = x.shape

        def heads(t):
            return t.view(B, T, self.h, self.dk).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)) * self.dk ** -0.5, heads(self.k_proj(x)), \
            heads(self.v_proj(x))
        gk = heads(F.logsigmoid(self.gk_proj(x)) / self.gate_logit_normalizer)
        o = self.norm(recurrent_gla(q, k, v, gk))  # [B, H, T, dk]
        o = o.transpose(1, 2).reshape(B, T, D)
        return self.o_proj(F.silu(self.g_proj(x)) * o)


class GLAModel(nn.Module):
    def __init__(self, d_model: int = 32, n_layers: int = 2):
        super().__init__()
        self.norms = nn.ModuleList([nn.LayerNorm(d_model) for _ in range(n_layers)])
        self.layers = nn.ModuleList([GatedLinearAttention(d_model) for _ in range(n_layers)])

    def forward(self, x):
        for norm, layer in zip(self.norms, self.layers):
            x = x + layer(norm(x))
        return x


def factory():
    torch.manual_seed(0)
    return GLAModel(), (torch.randn(2, 64, 32),)


if __name__ == "__main__":
    from _common import run_example
    run_example(factory)
