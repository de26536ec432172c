"""RetNet multi-scale retention (Sun et al., 2023), parallel form, as the reference code writes it.

Each head h has a fixed decay γ_h = 1 - 2^(-5-h); the decay mask is D[n, m] = γ^(n-m) for
n >= m and 0 above the diagonal, built from ``arange`` positions and ``pow``:

    Retention(X) = (Q Kᵀ ⊙ D) V,    then a per-head norm and a swish gate.

spcompile reads γ off the mask (a fixed per-head decay) and shards it as a decayed scan.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class MultiScaleRetention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.h, self.dk = n_heads, d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.g_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        gamma = 1 - 2 ** (-5 - torch.arange(n_heads, dtype=torch.float))
        self.register_buffer("gamma", gamma, persistent=False)

    def decay_mask(self, T: int, device) -> torch.Tensor:
        index = torch.arange(T, device=device)
        exponent = (index[:, None] - index[None, :]).float()  # n - m
        exponent = exponent.masked_fill(index[:, None] < index[None, :], float("inf"))
        return torch.pow(self.gamma[:, None, None], exponent)  # [H, T, T], γ^inf = 0

    def forward(self, x):
        B, T, D = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.dk).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.h, self.dk).transpose(1, 2) * self.dk ** -0.5
        v = self.v_proj(x).view(B, T, self.h, self.dk).transpose(1, 2)
        retention = (q @ k.transpose(-1, -2)) * self.decay_mask(T, x.device)
        o = retention @ v  # [B, H, T, dk]
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6)  # per-head RMS norm
        o = o.transpose(1, 2).reshape(B, T, D)
        return self.out_proj(F.silu(self.g_proj(x)) * o)


class RetNetBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.msr = MultiScaleRetention(d_model, n_heads)
        self.ffn = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(),
                                 nn.Linear(2 * d_model, d_model))

    def forward(self, x):
        x = x + self.msr(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class RetNet(nn.Module):
    def __init__(self, d_model: int = 32, n_heads: int = 4, n_layers: int = 2):
        super().__init__()
        self.layers = nn.ModuleList([RetNetBlock(d_model, n_heads) for _ in range(n_layers)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def factory():
    torch.manual_seed(0)
    return RetNet(), (torch.randn(2, 64, 32),)


if __name__ == "__main__":
    from _common import run_example
    run_example(factory)
