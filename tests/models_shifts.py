"""Token shifts as model-zoo code spells them (RWKV / fla token shift, recurrentgemma's Conv1D
windows, next-token labels via torch.roll, learned start tokens), each a right or left shift of
the sequence by a few tokens: on a rank, a halo from a neighbour; and the other whole-sequence
rearrangements of that kind: flips (bidirectional scans), softmax over the tokens
(tests/_checks_shifts.py)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CatZerosShift(nn.Module):
    """``torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)``: RWKV time-mix, written by
    hand (the zero block's slice is read only for its shape)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.l = nn.Linear(d, d)
        self.mix = nn.Parameter(torch.rand(d))

    def forward(self, x):
        x = self.l(x)
        xx = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        return x * self.mix + xx * (1 - self.mix)


class NewZerosShift(nn.Module):
    """``torch.cat([x.new_zeros(B, 1, D), x[:, :T - 1]], 1)``: the stop written with the
    length (was refused: a slice at a local offset)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.l = nn.Linear(d, d)

    def forward(self, x):
        x = self.l(x)
        B, T, D = x.shape
        return x - torch.cat([x.new_zeros(B, 1, D), x[:, :T - 1]], 1)


class PadOfCut(nn.Module):
    """``F.pad(x[:, :-s], (0, 0, s, 0))`` (right by s) and ``F.pad(x[:, s:], (0, 0, 0, s),
    value=1.0)`` (left by s, ones at the end of the sequence)."""

    def __init__(self, d: int = 16, s: int = 2):
        super().__init__()
        self.l, self.s = nn.Linear(d, d), s

    def forward(self, x):
        x = self.l(x)
        s = self.s
        return x + F.pad(x[:, :-s], (0, 0, s, 0)) + F.pad(x[:, s:], (0, 0, 0, s), value=1.0)


class CutOfPad(nn.Module):
    """``F.pad(x, (0, 0, 1, 0))[:, :-1]``: pad in front, then cut the end."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.l = nn.Linear(d, d)

    def forward(self, x):
        x = self.l(x)
        return x * F.pad(x, (0, 0, 1, 0))[:, :-1]


class ConvWindows(nn.Module):
    """recurrentgemma's ``Conv1D``: ``sum_s pad(x[:, :T - s], s) * w[width - s - 1]`` over a
    Python loop of ``temporal_width`` shifts (was refused as a loop over tokens)."""

    def __init__(self, d: int = 16, width: int = 4):
        super().__init__()
        self.l = nn.Linear(d, d)
        self.w = nn.Parameter(torch.randn(width, d) / width)
        self.b = nn.Parameter(torch.zeros(d))
        self.width = width

    def forward(self, x):
        x = self.l(x)
        T = x.shape[1]
        out = torch.zeros_like(x)
        for shift in range(self.width):
            win = F.pad(x[:, 0:T - shift], (0, 0, shift, 0))
            out = out + win * self.w[self.width - shift - 1]
        return out + self.b


class NextTokenCat(nn.Module):
    """``torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], 1)``: the next token (a left
    shift; was refused as a loop over tokens)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.l = nn.Linear(d, d)

    def forward(self, x):
        x = self.l(x)
        return x + torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], 1)


class StartTokenCat(nn.Module):
    """A learned start token in front: ``cat([bos.expand(B, 1, D), x[:, :-1]], 1)`` (rank 0
    gets the token, the others their neighbour's last one; the token's gradient from rank 0)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.l = nn.Linear(d, d)
        self.bos = nn.Parameter(torch.randn(1, 1, d))

    def forward(self, x):
        x = self.l(x)
        return x * torch.cat([self.bos.expand(x.shape[0], 1, -1), x[:, :-1]], dim=1)


class RollShift(nn.Module):
    """``torch.roll(x, 1, 1)`` then ``y[:, 0] = 0`` (a shift spelled as a rotation), and
    ``x.roll(2, dims=1)`` kept circular; a roll along the features stays local."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.l = nn.Linear(d, d)

    def forward(self, x):
        x = self.l(x)
        y = torch.roll(x, shifts=1, dims=1)
        y[:, 0] = 0
        return x + y + 0.5 * x.roll(2, dims=1) + torch.roll(x, 3, -1)


class RollBy(nn.Module):
    """``torch.roll(x, shift, 1)`` by a fixed amount (a long rotation reaches past the
    neighbour: computed on the gathered sequence)."""

    def __init__(self, shift: int, d: int = 16):
        super().__init__()
        self.l, self.shift = nn.Linear(d, d), shift

    def forward(self, x):
        return torch.roll(self.l(x), self.shift, 1)


class RollLabels(nn.Module):
    """Next-token labels as ``torch.roll(ids, -1, 1)`` with ``labels[:, -1] = -100``, into the
    mean cross-entropy."""

    def __init__(self, d: int = 16, vocab: int = 11):
        super().__init__()
        self.e, self.h = nn.Embedding(vocab, d), nn.Linear(d, vocab)

    def forward(self, ids):
        logits = self.h(self.e(ids))
        labels = torch.roll(ids, shifts=-1, dims=1)
        labels[:, -1] = -100
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))


class CentredWindows(nn.Module):
    """Windows each way: ``F.pad(x, (0, 0, 1, 1), value=-1.0).unfold(1, 3, 1)`` (a
    non-causal local mix over the previous, own and next token) and causal windows of 4
    through ``pad(x.transpose(1, 2), (3, 0)).unfold(2, 4, 1)`` on ``[B, D, T]``."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.l = nn.Linear(d, d)
        self.k3 = nn.Parameter(torch.randn(d, 3))
        self.k4 = nn.Parameter(torch.randn(d, 4))

    def forward(self, x):
        x = self.l(x)
        around = (F.pad(x, (0, 0, 1, 1), value=-1.0).unfold(1, 3, 1) * self.k3).sum(-1)
        causal = (F.pad(x.transpose(1, 2), (3, 0)).unfold(2, 4, 1) * self.k4[:, None]).sum(-1)
        return around + causal.transpose(1, 2)


class BidirectionalScan(nn.Module):
    """Vision Mamba / Caduceus style: a forward scan and the same scan over ``x.flip([1])``,
    flipped back; plus ``torch.fliplr`` and a flip of two dims at once."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.l, self.g = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        x = self.l(x)
        a = torch.sigmoid(self.g(x))
        fw = torch.cumsum(x * a, 1)
        bw = torch.cumsum((x * a).flip([1]), 1).flip([1])
        return fw + bw + torch.fliplr(x) * 0.5 + torch.flip(x, dims=(1, 2)) * 0.25


class AFTSimple(nn.Module):
    """AFT-simple: ``softmax(k, dim=1)`` over the tokens (in fp32 via ``dtype=``) weighting the
    values, and an attention pooling ``log_softmax`` over the tokens."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        # no bias: softmax over the tokens is shift-invariant, its gradient is 0 up to rounding
        self.score = nn.Linear(d, 1, bias=False)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        w = torch.softmax(k, dim=1, dtype=torch.float32)
        pooled = (self.score(x).log_softmax(dim=-2).exp() * v).sum(1, keepdim=True)
        return torch.sigmoid(q) * (w * v).sum(1, keepdim=True) + pooled


class RollByLength(nn.Module):
    """``torch.roll(x, T // 2, 1)`` with ``T = x.shape[1]``: Dynamo folds the local length into
    the shift (refused: the global roll is by another amount)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.l = nn.Linear(d, d)

    def forward(self, x):
        x = self.l(x)
        return torch.roll(x, x.shape[1] // 2, 1)


class FirstTokenPad(nn.Module):
    """Edge padding: ``cat([x[:, :1], x[:, :-1]], dim=-2)`` (rank 0 repeats the sequence's
    first token, the others take their neighbour's last)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.l = nn.Linear(d, d)

    def forward(self, x):
        x = self.l(x)
        return x * torch.cat([x[:, :1], x[:, :-1]], dim=-2)


class BosIds(nn.Module):
    """Token ids shifted right with a start id, ``cat([full_like(ids[:, :1], bos), ids[:, :-1]])``,
    then embedded."""

    def __init__(self, d: int = 16, vocab: int = 11):
        super().__init__()
        self.e, self.l = nn.Embedding(vocab, d), nn.Linear(d, d)

    def forward(self, ids):
        prev = torch.cat([torch.full_like(ids[:, :1], 5), ids[:, :-1]], 1)
        return self.l(self.e(ids) + self.e(prev))


class SharedCut(nn.Module):
    """The cut ``c = x[:, :-1]`` of a shift also summed over the tokens: ``c`` is T - 1 long,
    computed on the gathered sequence, and what reads it too (was silently wrong: the shift
    claimed the cut and the sum was taken for a shard's)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.l = nn.Linear(d, d)

    def forward(self, x):
        x = self.l(x)
        c = x[:, :-1]
        return torch.cat([torch.zeros_like(x[:, :1]), c], 1) + c.sum(1, keepdim=True)


class GatedDeltaLoop(nn.Module):
    """HF's ``torch_recurrent_gated_delta_rule`` (Qwen3-Next, Gated DeltaNet) as a loop over
    tokens: the state is multiplied by ``I - beta k kᵀ`` (not a diagonal decay: refused, with a
    message that says so and what to do)."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.qkv, self.gb, self.h = nn.Linear(d, 3 * d), nn.Linear(d, 2 * heads), heads

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.h, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        k = F.normalize(k, dim=-1)
        g, beta = self.gb(x).chunk(2, -1)
        g, beta = F.logsigmoid(g).transpose(1, 2), beta.sigmoid().transpose(1, 2)
        out = torch.zeros_like(v)
        S = torch.zeros(B, self.h, k.shape[-1], v.shape[-1])
        for i in range(T):
            S = S * g[:, :, i].exp()[..., None, None]
            kv_mem = (S * k[:, :, i].unsqueeze(-1)).sum(-2)
            delta = (v[:, :, i] - kv_mem) * beta[:, :, i].unsqueeze(-1)
            S = S + k[:, :, i].unsqueeze(-1) * delta.unsqueeze(-2)
            out[:, :, i] = (S * q[:, :, i].unsqueeze(-1)).sum(-2)
        return out.transpose(1, 2).reshape(B, T, D)


class GatedDeltaOnWholeSequence(GatedDeltaLoop):
    """What the refusal suggests: the layer run on the whole sequence inside the model,
    ``shard_sequence(layer(gather_sequence(x, grad="reduce_scatter")))`` (exact, no
    fallback; the loop unrolls with the global length)."""

    def forward(self, x):
        import spcompile
        full = spcompile.gather_sequence(x, dim=1, grad="reduce_scatter")
        return spcompile.shard_sequence(super().forward(full), dim=1)


# ---------------------------------------------------------------- constant mixing matrices
class RunningSum(nn.Module):
    """``torch.tril(torch.ones(T, T)) @ x``: the running sum as a matrix product."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.p = nn.Linear(d, d)

    def forward(self, x):
        T = x.shape[1]
        return torch.tril(torch.ones(T, T)) @ self.p(x)


class BagOfWords(nn.Module):
    """The "bag of words" running mean of GPT tutorials, both spellings: a row-normalised
    ``tril`` (``wei / wei.sum(1, keepdim=True)``) and ``softmax`` of zeros with ``-inf``
    above the diagonal."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.p = nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        tril = torch.tril(torch.ones(T, T))
        wei = tril / tril.sum(1, keepdim=True)
        a = wei @ self.p(x)
        wei2 = torch.zeros((T, T)).masked_fill(tril == 0, float("-inf"))
        wei2 = F.softmax(wei2, dim=-1)
        return a + wei2 @ x


class FixedEMA(nn.Module):
    """A per-head exponential moving average as a matrix, ``γ_h^(i-j)`` over ``j <= i``
    built from ``arange`` (Mega-style EMA without the FFT), and one from a buffer."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.h = heads
        self.register_buffer("gamma", torch.tensor([0.9, 0.5]))

    def forward(self, x):
        B, T, D = x.shape
        i = torch.arange(T)
        dist = i[:, None] - i[None, :]
        m = torch.where(dist >= 0, self.gamma[:, None, None] ** dist.clamp(min=0),
                        torch.zeros(()))
        y = m @ x.view(B, T, self.h, -1).transpose(1, 2)
        return y.transpose(1, 2).reshape(B, T, D)


class LocalScaledConstant(nn.Module):
    """A constant made with the local length whose values vary along it, meeting the
    sequence elementwise: ``x * torch.ones(T, 1).cumsum(0)`` (token i scaled by i + 1)."""

    def forward(self, x):
        T = x.shape[1]
        return x * torch.ones(T, 1).cumsum(0) + x.cumsum(1) / torch.ones(T, 1).cumsum(0)


class RunningSumOverLength(nn.Module):
    """``(tril(ones(T, T)) / T) @ x``: the number T is folded to the local length."""

    def forward(self, x):
        T = x.shape[1]
        return (torch.tril(torch.ones(T, T)) / T) @ x


# ---------------------------------------------------------------- shifts written into a buffer
class BartShiftTokens(nn.Module):
    """HF BART/mBART/Pegasus ``shift_tokens_right``: the ids written one place right into a
    fresh ``new_zeros`` buffer, the start token at 0, ``-100`` replaced by the pad id."""

    def __init__(self, vocab: int = 11, d: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)

    def forward(self, ids):
        shifted = ids.new_zeros(ids.shape)
        shifted[:, 1:] = ids[:, :-1].clone()
        shifted[:, 0] = 2
        shifted.masked_fill_(shifted == -100, 1)
        return self.emb(shifted) + self.emb(ids)


class BufferShifts(nn.Module):
    """Token shifts written into fresh buffers: ``xx = zeros_like(x); xx[:, 1:] = x[:, :-1]``,
    a left shift into ``empty_like`` with its tail set, and a time-major ``y[1:] = x[:-1]``
    into a float64 buffer."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.p = nn.Linear(d, d)

    def forward(self, x):
        x = self.p(x)
        xx = torch.zeros_like(x)
        xx[:, 1:] = x[:, :-1]
        nxt = torch.empty_like(x)
        nxt[:, :-2] = x[:, 2:]
        nxt[:, -2:] = 0.5
        tm = x.transpose(0, 1)
        y = torch.zeros(tm.shape, dtype=torch.float64)
        y[1:] = tm[:-1]
        return xx + nxt * x + y.float().transpose(0, 1)
