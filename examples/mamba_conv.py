"""A Mamba-style block (Mamba2 layout): in-projection, causal depthwise conv1d, SSD scan, gate.

The short causal convolution is written as Mamba's reference does: ``nn.Conv1d`` with
``groups=channels`` and ``padding=k-1``, then the first ``T`` outputs kept (``[..., :T]``). At
P > 1 a rank needs the last ``k-1`` tokens of the previous rank: a halo exchange. The SSD part
uses the scores-then-values spelling of the quadratic form with ``exp(segsum(A·dt))``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def segsum(x: torch.Tensor) -> torch.Tensor:
    T = x.size(-1)
    x_cumsum = torch.cumsum(x, dim=-1)
    x_segsum = x_cumsum[..., :, None] - x_cumsum[..., None, :]
    mask = torch.tril(torch.ones(T, T, device=x.device, dtype=torch.bool), diagonal=0)
    return x_segsum.masked_fill(~mask, -torch.inf)


class MambaBlock(nn.Module):
    def __init__(self, d_model: int = 32, n_heads: int = 4, d_state: int = 8, d_conv: int = 4,
                 expand: int = 2):
        super().__init__()
        d_inner = expand * d_model
        self.h, self.n, self.p, self.d_inner = n_heads, d_state, d_inner // n_heads, d_inner
        conv_dim = d_inner + 2 * n_heads * d_state
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * n_heads * d_state + n_heads,
                                 bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, kernel_size=d_conv, groups=conv_dim,
                                padding=d_conv - 1)
        self.A_log = nn.Parameter(torch.log(torch.linspace(1.0, 8.0, n_heads)))
        self.dt_bias = nn.Parameter(torch.full((n_heads,), -1.0))
        self.D = nn.Parameter(torch.ones(n_heads))
        self.norm = nn.RMSNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, u):
        b, T, _ = u.shape
        z, xBC, dt = torch.split(self.in_proj(u),
                                 [self.d_inner, self.d_inner + 2 * self.h * self.n, self.h],
                                 dim=-1)
        xBC = F.silu(self.conv1d(xBC.transpose(1, 2))[..., :T].transpose(1, 2))
        x, B, C = torch.split(xBC, [self.d_inner, self.h * self.n, self.h * self.n], dim=-1)
        x = x.view(b, T, self.h, self.p)
        B = B.view(b, T, self.h, self.n)
        C = C.view(b, T, self.h, self.n)
        dt = F.softplus(dt + self.dt_bias)  # [b, T, H]
        A = -torch.exp(self.A_log)
        L = torch.exp(segsum((A * dt).transpose(1, 2)))  # [b, H, T, T]
        scores = torch.einsum("bthn,bshn->bhts", C, B) * L
        y = torch.einsum("bhts,bshp->bthp", scores, x * dt[..., None])
        y = y + x * self.D[:, None]
        y = self.norm(y.reshape(b, T, self.d_inner) * F.silu(z))
        return self.out_proj(y)


class MambaModel(nn.Module):
    def __init__(self, d_model: int = 32, n_layers: int = 2):
        super().__init__()
        self.norms = nn.ModuleList([nn.RMSNorm(d_model) for _ in range(n_layers)])
        self.blocks = nn.ModuleList([MambaBlock(d_model) for _ in range(n_layers)])

    def forward(self, x):
        for norm, block in zip(self.norms, self.blocks):
            x = x + block(norm(x))
        return x


def factory():
    torch.manual_seed(0)
    return MambaModel(), (torch.randn(2, 64, 32),)


if __name__ == "__main__":
    from _common import run_example
    run_example(factory)
