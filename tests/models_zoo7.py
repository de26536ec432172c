"""Spellings a red-team pass over unseen models found (session of 2026-12-02, second), written
out as small models:

* torch's fused recurrent layers (``nn.GRU``, ``nn.LSTM``, ``nn.RNN``): Dynamo broke the graph
  at them by default and ran them eagerly on the shard, each rank's recurrence restarting from
  zero (silently wrong); spcompile now has them traced (Dynamo's ``allow_rnn``) and runs
  them as a relay (``hx`` is the state entering the rank);
* attention within blocks of the sequence (``x.view(B, T // C, C, D)`` into SDPA, heads inside
  the blocks): the blocks are a batch dim of the attention, local to each rank;
* a block split written with ``-1``: ``view(B, -1, C, D)`` (fixed blocks; at one block per rank
  they were taken for the whole sequence) and ``view(B, 2, -1, D)`` / ``unflatten(1, (2, -1))``
  (a fixed number of blocks whose size is a fraction of the length: refused, was silently
  wrong);
* RWKV's ``nn.ZeroPad2d((0, 0, 1, -1))`` time shift, a positional filter from
  ``torch.linspace(0, 1, T)``, a running mean ``cumsum / arange(1, T + 1)``, an in-place
  ``cumsum_``, SDPA's ``enable_gqa=True``;
* masks made with ``torch.ones_like(scores)`` (were gathered), ``nn.MultiheadAttention`` /
  ``nn.TransformerEncoderLayer`` with ``generate_square_subsequent_mask``;
* ``torch.max(h, dim=1)`` / ``min`` with indices over the sequence (were gathered): the global
  first index, the gradient to that element only.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

D = 16


class GRULayer(nn.Module):
    """``nn.GRU(batch_first=True)`` between two projections."""

    def __init__(self, d: int = D):
        super().__init__()
        self.a, self.g, self.b = nn.Linear(d, d), nn.GRU(d, 12, batch_first=True), nn.Linear(12, d)

    def forward(self, x):
        return self.b(self.g(self.a(x))[0])


class TwoLayerLSTM(nn.Module):
    """A 2-layer ``nn.LSTM``; the final (h, c) is used too."""

    def __init__(self, d: int = D):
        super().__init__()
        self.g = nn.LSTM(d, 12, num_layers=2, batch_first=True)  # hidden != T_local
        self.b = nn.Linear(12, d)

    def forward(self, x):
        y, (h, c) = self.g(x)
        return self.b(y + h[-1][:, None] * c[-1].sum(-1)[:, None, None])


class TimeMajorRNN(nn.Module):
    """``nn.RNN`` on ``[T, B, D]`` (time major)."""

    def __init__(self, d: int = D):
        super().__init__()
        self.g, self.b = nn.RNN(d, 12), nn.Linear(12, d)

    def forward(self, x):
        return self.b(self.g(x.transpose(0, 1))[0].transpose(0, 1))


class GRUCellLoop(nn.Module):
    """``nn.GRUCell`` stepped in a Python loop: a nonlinear recurrence, no parallel form."""

    def __init__(self, d: int = D):
        super().__init__()
        self.c = nn.GRUCell(d, d)

    def forward(self, x):
        h, outs = x.new_zeros(x.shape[0], x.shape[2]), []
        for t in range(x.shape[1]):
            h = self.c(x[:, t], h)
            outs.append(h)
        return torch.stack(outs, 1)


class BlockLocalSDPA(nn.Module):
    """Causal attention within blocks of 4 tokens: ``view(B, T // 4, 4, 3D)`` into SDPA."""

    def __init__(self, d: int = D, c: int = 4):
        super().__init__()
        self.qkv, self.c = nn.Linear(d, 3 * d), c

    def forward(self, x):
        B, T, E = x.shape
        q, k, v = self.qkv(x).view(B, T // self.c, self.c, 3 * E).chunk(3, -1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).reshape(B, T, E)


class BlockLocalHeads(nn.Module):
    """Blocks of 4 with 2 heads inside: ``[3, B, n, H, C, d]`` permuted, masked SDPA."""

    def __init__(self, d: int = D):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        B, T, E = x.shape
        q, k, v = self.qkv(x).view(B, T // 4, 4, 3, 2, E // 2).permute(3, 0, 1, 4, 2, 5)
        m = torch.ones(4, 4, dtype=torch.bool).tril()
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        return o.transpose(2, 3).reshape(B, T, E)


class InferredBlockCount(nn.Module):
    """``view(B, -1, C, E)`` blocks with a prefix sum inside each; C = 8 is one block per rank
    at T = 32 on 4 ranks (was taken for the whole sequence), two on 2 ranks."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.c = c

    def forward(self, x):
        B, T, E = x.shape
        return torch.reshape(x, (B, -1, self.c, E)).cumsum(2).reshape(B, T, E)


class FixedBlockCount(nn.Module):
    """Two halves of the sequence, the block size inferred: ``x.view(B, 2, -1, E)``."""

    def forward(self, x):
        B, T, E = x.shape
        return x.view(B, 2, -1, E).cumsum(2).reshape(B, T, E)


class FixedBlockCountUnflatten(nn.Module):
    """The same with ``unflatten(1, (2, -1))`` into attention within each half."""

    def __init__(self, d: int = D):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(1, (2, -1)).chunk(3, -1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).flatten(1, 2)


class RWKVZeroPadShift(nn.Module):
    """RWKV-4's ``nn.ZeroPad2d((0, 0, 1, -1))`` time shift with a learned mix."""

    def __init__(self, d: int = D):
        super().__init__()
        self.shift = nn.ZeroPad2d((0, 0, 1, -1))
        self.mix = nn.Parameter(torch.rand(d))
        self.l = nn.Linear(d, d)

    def forward(self, x):
        return self.l(x * self.mix + self.shift(x) * (1 - self.mix))


class LinspaceFilter(nn.Module):
    """A positional filter from ``torch.linspace(0, 1, T)`` (Hyena's implicit filter input)."""

    def __init__(self, d: int = D):
        super().__init__()
        self.l = nn.Linear(1, d)

    def forward(self, x):
        t = torch.linspace(0, 1, x.shape[1])[None, :, None]
        return x * self.l(t).sin()


class RunningMeanInPlace(nn.Module):
    """``h.cumsum_(1)`` in place, then divided by ``arange(1, T + 1)``: a running mean."""

    def __init__(self, d: int = D):
        super().__init__()
        self.l = nn.Linear(d, d)

    def forward(self, x):
        h = self.l(x)
        h.cumsum_(1)
        T = x.shape[1]
        return h / torch.arange(1, T + 1, device=x.device).view(1, T, 1)


class GQAEnable(nn.Module):
    """Causal SDPA with 4 query heads over 2 key/value heads, ``enable_gqa=True``."""

    def __init__(self, d: int = D):
        super().__init__()
        self.q, self.kv = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, 4, 4).transpose(1, 2)
        k, v = self.kv(x).view(B, T, 2, 8).transpose(1, 2).chunk(2, -1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return o.transpose(1, 2).reshape(B, T, -1)


class OnesLikeScoresMask(nn.Module):
    """``torch.ones_like(scores).tril()`` as the causal mask of softmax attention."""

    def __init__(self, d: int = D):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        sc = q @ k.transpose(-1, -2) / 4
        sc = sc.masked_fill(torch.ones_like(sc).tril() == 0, float("-inf"))
        return sc.softmax(-1) @ v


class OnesLikeBoolLinear(nn.Module):
    """Linear attention masked by ``torch.tril(torch.ones_like(scores, dtype=torch.bool))``."""

    def __init__(self, d: int = D):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = (F.elu(self.qkv(x)) + 1).chunk(3, -1)
        sc = q @ k.transpose(-1, -2)
        return torch.where(torch.tril(torch.ones_like(sc, dtype=torch.bool)), sc, 0.) @ v


class MHASubsequentMask(nn.Module):
    """``nn.MultiheadAttention`` with ``nn.Transformer.generate_square_subsequent_mask(T)``."""

    def __init__(self, d: int = D):
        super().__init__()
        self.a = nn.MultiheadAttention(d, 2, batch_first=True)

    def forward(self, x):
        m = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.a(x, x, x, attn_mask=m, need_weights=False)[0]


class CausalEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer(batch_first=True)`` with a causal ``src_mask``."""

    def __init__(self, d: int = D):
        super().__init__()
        self.l = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)

    def forward(self, x):
        m = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.l(x, src_mask=m, is_causal=True)


class MaxOverSequence(nn.Module):
    """Max/min pooling over the sequence with indices: ``h.max(dim=1)``, ``torch.min(h, 1)``,
    ``max(1, keepdim=True)[0]``, and a ReLU'd value (ties at 0: the first position wins)."""

    def __init__(self, d: int = D):
        super().__init__()
        self.l = nn.Linear(d, d)

    def forward(self, x):
        h = self.l(x)
        v, i = h.max(dim=1)
        r = torch.relu(h - 1.5)
        out = v * 2 + torch.min(h, 1).values + h.max(1, keepdim=True)[0].sum(1)
        return out, i.float(), torch.max(r, dim=1).values, torch.max(r, dim=1).indices.float()
