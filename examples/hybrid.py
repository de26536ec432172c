"""A hybrid model: linear-attention layers interleaved with a softmax-attention layer (RoPE
positions from ``arange``), and a mean loss — the shape of recent hybrid LMs.

* linear attention: the masked quadratic form (elu+1 features) → a sequence-parallel scan;
* softmax attention: ``F.scaled_dot_product_attention(..., is_causal=True)`` with rotary
  embeddings whose positions come from ``torch.arange(T)`` → KV exchange, global positions;
* the loss ``((out - target) ** 2).mean()`` → a global mean on every rank.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, T: int, device=None):
        t = torch.arange(T, device=device, dtype=self.inv_freq.dtype)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


class SoftmaxAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.h = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o = nn.Linear(d_model, d_model, bias=False)
        self.rope = RotaryEmbedding(d_model // n_heads)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.h, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        cos, sin = self.rope(T, x.device)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(o.transpose(1, 2).reshape(B, T, D))


class LinearAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.h = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.h, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        q, k = F.elu(q) + 1, F.elu(k) + 1
        a = (q @ k.transpose(-1, -2)) * torch.tril(torch.ones(T, T, device=x.device))
        o = (a @ v) / (a.sum(-1)[..., None] + 1e-6)
        return self.o(o.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, mixer: nn.Module, d_model: int):
        super().__init__()
        self.ln1, self.ln2, self.mixer = nn.RMSNorm(d_model), nn.RMSNorm(d_model), mixer
        self.mlp = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.SiLU(),
                                 nn.Linear(2 * d_model, d_model))

    def forward(self, x):
        x = x + self.mixer(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Hybrid(nn.Module):
    def __init__(self, d_model: int = 32, n_heads: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList([Block(LinearAttention(d_model, n_heads), d_model),
                                     Block(SoftmaxAttention(d_model, n_heads), d_model),
                                     Block(LinearAttention(d_model, n_heads), d_model)])
        self.head = nn.Linear(d_model, d_model)

    def forward(self, x, target):
        for block in self.blocks:
            x = block(x)
        return ((self.head(x) - target) ** 2).mean()


def factory():
    torch.manual_seed(0)
    return Hybrid(), (torch.randn(2, 64, 32), torch.randn(2, 64, 32))


if __name__ == "__main__":
    from _common import run_example
    run_example(factory)
