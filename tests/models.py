"""Small models written the way model zoos write them, for the backend tests.

Every model maps ``x: [B, T, D]`` to ``[B, T, D]`` (or a tuple) and has a ``spelling`` argument
where the same computation is commonly written several ways.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LinearAttention(nn.Module):
    """Causal linear attention (Katharopoulos et al.) in the masked quadratic form."""

    def __init__(self, d: int = 16, heads: int = 2, spelling: str = "mul", max_len: int = 256):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.heads, self.spelling = heads, spelling
        self.register_buffer("causal", torch.tril(torch.ones(max_len, max_len)))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        q, k = F.elu(q) + 1, F.elu(k) + 1
        s = self.spelling
        if s == "mul":
            a = (q @ k.transpose(-1, -2)) * torch.tril(torch.ones(T, T, device=x.device))
        elif s == "einsum":
            a = torch.einsum("bhid,bhjd->bhij", q, k) * torch.tril(torch.ones(T, T))
        elif s == "mT":
            a = (q @ k.mT) * torch.ones(T, T).tril()
        elif s == "transpose21":
            a = torch.matmul(q, k.transpose(-2, -1)) * torch.ones(T, T).tril()
        elif s == "buffer":
            a = (q @ k.transpose(-1, -2)) * self.causal[:T, :T]
        elif s == "masked_fill":
            mask = torch.ones(T, T, dtype=torch.bool).tril()
            a = (q @ k.transpose(-1, -2)).masked_fill(~mask, 0.0)
        elif s == "where":
            mask = torch.ones(T, T, dtype=torch.bool).tril()
            a = torch.where(mask, q @ k.transpose(-1, -2), torch.zeros(()))
        else:
            raise ValueError(s)
        o = a @ v if s != "einsum" else torch.einsum("bhij,bhjd->bhid", a, v)
        return self.out(o.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, mixer: nn.Module, d: int = 16):
        super().__init__()
        self.norm1, self.mixer = nn.LayerNorm(d), mixer
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def two_layer(spelling: str = "mul", d: int = 16) -> nn.Module:
    return nn.Sequential(Block(LinearAttention(d, spelling=spelling), d),
                         Block(LinearAttention(d, spelling=spelling), d))


class NoMix(nn.Module):
    """Token-local only: nothing to make sequence parallel."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 32), nn.SiLU(), nn.Linear(32, d))

    def forward(self, x):
        return x + self.net(x)
