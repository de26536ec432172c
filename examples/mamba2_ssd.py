"""Mamba2 / SSD layer (Dao & Gu, 2024) in its quadratic "attention" form — equally simple GLA.

Data-dependent scalar decay per head and step, ``a_t = A·dt_t`` (A < 0), and the SSD mask
``L = exp(segsum(a))`` with segsum[i, j] = Σ_{j<k<=i} a_k (-inf above the diagonal), written as
the minimal SSD reference does, then the quadratic einsum

    Y = einsum("bthn,bshn,bhts,bshp->bthp", C, B, L, X)      (X = x·dt)

spcompile reads the cumsum inside the mask as the log decay and shards it as a gated scan.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def segsum(x: torch.Tensor) -> torch.Tensor:
    """[..., T] → [..., T, T]: x_cumsum[i] - x_cumsum[j], -inf above the diagonal."""
    T = x.size(-1)
    x_cumsum = torch.cumsum(x, dim=-1)
    x_segsum = x_cumsum[..., :, None] - x_cumsum[..., None, :]
    mask = torch.tril(torch.ones(T, T, device=x.device, dtype=torch.bool), diagonal=0)
    return x_segsum.masked_fill(~mask, -torch.inf)


class SSD(nn.Module):
    def __init__(self, d_model: int = 32, n_heads: int = 4, d_state: int = 8):
        super().__init__()
        self.h, self.n, self.p = n_heads, d_state, d_model // n_heads
        self.in_proj = nn.Linear(d_model, d_model + 2 * n_heads * d_state + n_heads)
        self.A_log = nn.Parameter(torch.log(torch.linspace(1.0, 8.0, n_heads)))
        self.dt_bias = nn.Parameter(torch.zeros(n_heads))
        self.D = nn.Parameter(torch.ones(n_heads))
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, u):
        b, T, d = u.shape
        x, B, C, dt = torch.split(self.in_proj(u), [d, self.h * self.n, self.h * self.n, self.h],
                                  dim=-1)
        x = x.view(b, T, self.h, self.p)
        B = B.view(b, T, self.h, self.n)
        C = C.view(b, T, self.h, self.n)
        dt = F.softplus(dt + self.dt_bias)  # [b, T, H]
        A = -torch.exp(self.A_log)  # [H]
        L = torch.exp(segsum((A * dt).transpose(1, 2)))  # [b, H, T, T]
        X = x * dt[..., None]
        y = torch.einsum("bthn,bshn,bhts,bshp->bthp", C, B, L, X)
        y = y + x * self.D[:, None]
        return self.out_proj(y.reshape(b, T, d))


class SSDModel(nn.Module):
    def __init__(self, d_model: int = 32, n_layers: int = 2):
        super().__init__()
        self.norms = nn.ModuleList([nn.LayerNorm(d_model) for _ in range(n_layers)])
        self.mixers = nn.ModuleList([SSD(d_model) for _ in range(n_layers)])

    def forward(self, x):
        for norm, mixer in zip(self.norms, self.mixers):
            x = x + mixer(norm(x))
        return x


def factory():
    torch.manual_seed(0)
    return SSDModel(), (torch.randn(2, 64, 32),)


if __name__ == "__main__":
    from _common import run_example
    run_example(factory)
