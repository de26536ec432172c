"""More model-zoo spellings, written the way papers, HF transformers, fla and the official repos
write them (plain PyTorch, nothing from spcompile). tests/models.py holds the first batch.

Every model takes ``x: [B, T, D]`` (float) unless it says otherwise.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------- 1. HF causal-LM loss
class HFCausalLM(nn.Module):
    """``forward(input_ids, labels)`` → ``(loss, logits)`` with HF's shift inside forward."""

    def __init__(self, vocab: int = 11, d: int = 16, k: int = 3):
        super().__init__()
        self.vocab = vocab
        self.wte = nn.Embedding(vocab, d)
        self.conv = nn.Conv1d(d, d, k, padding=k - 1, groups=d)
        self.ln = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids, labels):
        T = input_ids.shape[1]
        h = self.wte(input_ids)
        h = h + self.conv(h.transpose(1, 2))[..., :T].transpose(1, 2)
        logits = self.lm_head(self.ln(h))
        shift_logits = logits[..., :-1, :].contiguous()
        shift_labels = labels[..., 1:].contiguous()
        loss = F.cross_entropy(shift_logits.view(-1, self.vocab), shift_labels.view(-1))
        return loss, logits


# ---------------------------------------------------------------- 2. RWKV token shift + time_mix
class RWKVChannelMix(nn.Module):
    """RWKV-4 channel mix: ``nn.ZeroPad2d((0, 0, 1, -1))`` token shift and ``time_mix`` lerps."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.time_shift = nn.ZeroPad2d((0, 0, 1, -1))
        self.time_mix_k = nn.Parameter(torch.rand(1, 1, d))
        self.time_mix_r = nn.Parameter(torch.rand(1, 1, d))
        self.key = nn.Linear(d, 2 * d, bias=False)
        self.receptance = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(2 * d, d, bias=False)

    def forward(self, x):
        xx = self.time_shift(x)
        xk = x * self.time_mix_k + xx * (1 - self.time_mix_k)
        xr = torch.lerp(xx, x, self.time_mix_r)
        k = torch.square(torch.relu(self.key(xk)))
        return torch.sigmoid(self.receptance(xr)) * self.value(k)


# ---------------------------------------------------------------- 3. decay masks
def _slopes(h: int) -> torch.Tensor:
    return torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)])


class LightningDecay(nn.Module):
    """TransNormer / lightning attention: ``exp(-s (i - j))`` from ``arange`` broadcasting and
    ``torch.where(i >= j, ..., 0)``."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d)
        self.register_buffer("slope", _slopes(heads))
        self.o = nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.h, self.dh).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        q, k = F.silu(q), F.silu(k)
        i = torch.arange(T, device=x.device)[:, None]
        j = torch.arange(T, device=x.device)[None, :]
        s = self.slope[:, None, None]
        mask = torch.where(i >= j, torch.exp(-s * (i - j)), torch.zeros(()))
        o = torch.matmul(q @ k.transpose(-1, -2) * mask, v)
        return self.o(o.transpose(1, 2).reshape(B, T, D))


class RetNetTorchscale(nn.Module):
    """torchscale's RetNet: decay mask ``masked_fill(inf)``, ``exp``, ``nan_to_num``, normalised
    by ``mask / mask.sum(-1, keepdim=True).sqrt()`` (row sums over the GLOBAL positions); with
    ``qk_norm`` the retention scores are normalised by ``qk.abs().sum(-1).clamp(min=1)``."""

    def __init__(self, d: int = 16, heads: int = 2, qk_norm: bool = False):
        super().__init__()
        self.h, self.dh, self.qk_norm = heads, d // heads, qk_norm
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.register_buffer("decay", torch.log(1 - 2 ** (-5 - torch.arange(heads,
                                                                          dtype=torch.float))))

    def forward(self, x):
        B, T, D = x.shape
        index = torch.arange(T).to(self.decay)
        mask = torch.tril(torch.ones(T, T).to(self.decay))
        mask = torch.masked_fill(index[:, None] - index[None, :], ~mask.bool(), float("inf"))
        mask = torch.exp(mask * self.decay[:, None, None])
        mask = torch.nan_to_num(mask)
        mask = mask / mask.sum(dim=-1, keepdim=True).sqrt()
        q, k, v = (t.view(B, T, self.h, self.dh).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        qk = q @ k.transpose(-1, -2) * self.dh ** -0.5
        qk = qk * mask
        if self.qk_norm:
            qk = qk / qk.detach().abs().sum(dim=-1, keepdim=True).clamp(min=1)
        o = torch.matmul(qk, v)
        return self.o(o.transpose(1, 2).reshape(B, T, D))


# ---------------------------------------------------------------- 4. Based
class TaylorExp(nn.Module):
    """Based's feature map: [1, x/√√d, (x⊗x)/√(2d)]."""

    def __init__(self, d: int):
        super().__init__()
        self.rd, self.rrd = math.sqrt(d), math.sqrt(math.sqrt(d))
        self.r2 = math.sqrt(2)

    def forward(self, x):
        x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(start_dim=-2) / self.r2
        return torch.cat([x[..., :1] ** 0, x / self.rrd, x2 / self.rd], dim=-1)


class BasedLinearAttention(nn.Module):
    """Based: Taylor feature map, causal linear attention, masked ("parallel") or cumsum form."""

    def __init__(self, d: int = 16, heads: int = 2, feat: int = 4, form: str = "masked"):
        super().__init__()
        self.h, self.f, self.dh, self.form = heads, feat, d // heads, form
        self.q = nn.Linear(d, heads * feat, bias=False)
        self.k = nn.Linear(d, heads * feat, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.fmap = TaylorExp(feat)

    def forward(self, x, eps: float = 1e-6):
        B, T, D = x.shape
        q = self.q(x).view(B, T, self.h, self.f).transpose(1, 2)
        k = self.k(x).view(B, T, self.h, self.f).transpose(1, 2)
        v = self.v(x).view(B, T, self.h, self.dh).transpose(1, 2)
        q, k = self.fmap(q), self.fmap(k)
        if self.form == "masked":
            A = torch.einsum("bhnd,bhmd->bhnm", q, k).tril()
            y = A @ v / (A.sum(-1, keepdim=True) + eps)
        else:  # the official repo's "quadratic-free" causal form
            q, k, v = q.unsqueeze(-2), k.unsqueeze(-2), v.unsqueeze(-1)
            kv = (k * v).cumsum(dim=2)
            y = (q * kv).sum(-1) / ((q * k.cumsum(dim=2)).sum(-1) + eps)
        return self.o(y.transpose(1, 2).reshape(B, T, D))


class FlaNaiveBased(nn.Module):
    """fla's ``naive_parallel_based``: ``1 + s + s²/2`` of the scores, masked_fill_, normalised."""

    def __init__(self, d: int = 16, heads: int = 2, feat: int = 4):
        super().__init__()
        self.h, self.f, self.dh = heads, feat, d // heads
        self.qk = nn.Linear(d, 2 * heads * feat, bias=False)
        self.v = nn.Linear(d, d, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        q, k = (t.view(B, T, self.h, self.f).transpose(1, 2)
                for t in self.qk(x).chunk(2, dim=-1))
        v = self.v(x).view(B, T, self.h, self.dh).transpose(1, 2)
        q = q * (q.shape[-1] ** -0.5)
        attn = q @ k.transpose(-2, -1)
        attn = 1 + attn + 1 / 2 * (attn ** 2)
        attn.masked_fill_(~torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device)), 0)
        o = attn @ v
        z = attn.sum(-1)
        o = o / (z[..., None] + 1e-6)
        return o.transpose(1, 2).reshape(B, T, D)


# ---------------------------------------------------------------- 5. HGRN / simple GLA
class SimpleGLAMasked(nn.Module):
    """Data-dependent scalar decay in masked form:
    ``exp(G[..., :, None] - G[..., None, :]).masked_fill(~tril, 0)``, ``G = cumsum(logsigmoid)``."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d)
        self.g = nn.Linear(d, heads)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.h, self.dh).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        g = F.logsigmoid(self.g(x)).transpose(1, 2) / 10  # [B, H, T]
        G = g.cumsum(-1)
        tril = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
        decay = torch.exp(G[..., :, None] - G[..., None, :]).masked_fill(~tril, 0)
        o = (q @ k.transpose(-1, -2) * self.dh ** -0.5 * decay) @ v
        return self.o(o.transpose(1, 2).reshape(B, T, D))


# ---------------------------------------------------------------- 6. Meta Llama
def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0):
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device)
    freqs = torch.outer(t, freqs).float()
    return torch.polar(torch.ones_like(freqs), freqs)  # complex64


def reshape_for_broadcast(freqs_cis, x):
    ndim = x.ndim
    shape = [d if i == 1 or i == ndim - 1 else 1 for i, d in enumerate(x.shape)]
    return freqs_cis.view(*shape)


def apply_rotary_emb(xq, xk, freqs_cis):
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = reshape_for_broadcast(freqs_cis, xq_)
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def repeat_kv(x, n_rep: int):
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return (x[:, :, :, None, :].expand(bs, slen, n_kv_heads, n_rep, head_dim)
            .reshape(bs, slen, n_kv_heads * n_rep, head_dim))


class MetaLlamaAttention(nn.Module):
    """meta-llama/llama model.py: complex RoPE (``freqs_cis[:T]`` buffer), repeat_kv, SDPA."""

    def __init__(self, d: int = 16, heads: int = 4, kv_heads: int = 2, max_len: int = 256):
        super().__init__()
        self.h, self.hkv, self.dh = heads, kv_heads, d // heads
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, kv_heads * self.dh, bias=False)
        self.wv = nn.Linear(d, kv_heads * self.dh, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        self.register_buffer("freqs_cis", precompute_freqs_cis(self.dh, max_len * 2),
                             persistent=False)

    def forward(self, x):
        bsz, seqlen, _ = x.shape
        freqs_cis = self.freqs_cis[:seqlen]
        xq = self.wq(x).view(bsz, seqlen, self.h, self.dh)
        xk = self.wk(x).view(bsz, seqlen, self.hkv, self.dh)
        xv = self.wv(x).view(bsz, seqlen, self.hkv, self.dh)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis)
        keys, values = repeat_kv(xk, self.h // self.hkv), repeat_kv(xv, self.h // self.hkv)
        xq, keys, values = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        out = F.scaled_dot_product_attention(xq, keys, values, is_causal=True)
        return self.wo(out.transpose(1, 2).contiguous().view(bsz, seqlen, -1))


class ComplexRoPEInForward(nn.Module):
    """Complex RoPE computed in forward from ``arange(T)`` with ``torch.polar``."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        freqs = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
        ang = torch.outer(torch.arange(T, device=x.device).float(), freqs)
        cis = torch.polar(torch.ones_like(ang), ang)
        xc = torch.view_as_complex(self.lin(x).reshape(B, T, D // 2, 2))
        return torch.view_as_real(xc * cis).flatten(2)


# ---------------------------------------------------------------- 7. ALiBi / sliding window
class ALiBiAttention(nn.Module):
    """ALiBi (Press et al.): bias ``slope · (j - i)`` from arange, causal, manual softmax."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d)
        self.register_buffer("slopes", _slopes(heads))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.h, self.dh).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        pos = torch.arange(T, device=x.device)
        rel = pos[None, :] - pos[:, None]  # j - i
        bias = self.slopes[:, None, None] * rel[None]  # [H, T, T]
        causal = torch.triu(torch.full((T, T), float("-inf"), device=x.device), diagonal=1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.dh) + bias + causal
        att = att.softmax(dim=-1)
        return (att @ v).transpose(1, 2).reshape(B, T, D)


class ALiBiSDPA(nn.Module):
    """ALiBi bias + causal ``-inf`` as a float ``attn_mask`` to SDPA."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d)
        self.register_buffer("slopes", _slopes(heads))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.h, self.dh).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        ctx = torch.arange(T)[:, None]
        mem = torch.arange(T)[None, :]
        bias = (mem - ctx).float() * self.slopes.view(-1, 1, 1)
        bias = bias.masked_fill(mem > ctx, float("-inf"))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return o.transpose(1, 2).reshape(B, T, D)


class SlidingWindowSDPA(nn.Module):
    """Mistral-style sliding-window causal mask (boolean, window W) passed to SDPA."""

    def __init__(self, d: int = 16, heads: int = 2, window: int = 5):
        super().__init__()
        self.h, self.dh, self.w = heads, d // heads, window
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.h, self.dh).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        i = torch.arange(T, device=x.device).unsqueeze(1)
        j = torch.arange(T, device=x.device).unsqueeze(0)
        mask = (j <= i) & (j > i - self.w)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return o.transpose(1, 2).reshape(B, T, D)


# ---------------------------------------------------------------- 8. Hyena FFT conv
def fftconv(u, k, D):
    seqlen = u.shape[-1]
    fft_size = 2 * seqlen
    k_f = torch.fft.rfft(k, n=fft_size) / fft_size
    u_f = torch.fft.rfft(u.to(dtype=k.dtype), n=fft_size)
    y = torch.fft.irfft(u_f * k_f, n=fft_size, norm="forward")[..., :seqlen]
    return y + u * D.unsqueeze(-1)


class HyenaFFTConv(nn.Module):
    """Hyena's long convolution through the FFT (the safari repo's ``fftconv_ref``), with an
    implicit filter from positions ``linspace(0, 1, T)``."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.filt = nn.Linear(1, d)
        self.D = nn.Parameter(torch.randn(d))

    def forward(self, x):
        B, T, D = x.shape
        t = torch.linspace(0, 1, T, device=x.device)[:, None]  # [T, 1]
        k = (torch.sin(self.filt(t) * 3) * torch.exp(-t * 2)).transpose(0, 1)  # [D, T]
        u = self.proj(x).transpose(1, 2)  # [B, D, T]
        return fftconv(u, k, self.D).transpose(1, 2)


def fftconv_unnormalised(u, k):
    """Long convolution through the FFT with the default ``norm`` (no length in the code)."""
    n = 2 * u.shape[-1]
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)
    return y[..., :u.shape[-1]]


class FFTConvFixedFilter(nn.Module):
    """FFT long convolution with a filter parameter of the max length, sliced ``[:, :T]``."""

    def __init__(self, d: int = 16, max_len: int = 256):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.k = nn.Parameter(torch.randn(d, max_len) * 0.1)
        self.D = nn.Parameter(torch.randn(d))

    def forward(self, x):
        T = x.shape[1]
        u = self.proj(x).transpose(1, 2)
        return (fftconv_unnormalised(u, self.k[:, :T]) + u * self.D[:, None]).transpose(1, 2)


# ---------------------------------------------------------------- 9. cosFormer
class CosFormer(nn.Module):
    """cosFormer (official repo): ``index = π/2 · arange(1, T + 1)``, ``sin/cos(index / M)``,
    non-causal ``q (kᵀ v)``."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x, eps: float = 1e-6):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.h, self.dh).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        q, k = F.relu(q), F.relu(k)
        m = T
        index = (math.pi / 2 * torch.arange(1, m + 1)).reshape(1, 1, -1, 1)
        q_ = torch.cat([q * torch.sin(index / m), q * torch.cos(index / m)], dim=-1)
        k_ = torch.cat([k * torch.sin(index / m), k * torch.cos(index / m)], dim=-1)
        kv = torch.einsum("bhnd,bhnm->bhdm", k_, v)
        z = 1 / torch.clamp_min(torch.einsum("bhnd,bhd->bhn", q_, k_.sum(dim=2)), eps)
        o = torch.einsum("bhnd,bhdm,bhn->bhnm", q_, kv, z)
        return o.transpose(1, 2).reshape(B, T, D)


# ---------------------------------------------------------------- 10. heads with non-sequence outputs
class MeanPoolClassifier(nn.Module):
    """A linear-attention encoder layer + mean-pool over the sequence + a classifier head."""

    def __init__(self, d: int = 16, classes: int = 3):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        T = x.shape[1]
        q, k, v = self.qkv(x).chunk(3, -1)
        q, k = F.elu(q) + 1, F.elu(k) + 1
        a = (q @ k.transpose(1, 2)).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), 0)
        h = x + a @ v
        return self.head(h.mean(dim=1))


class SumOverLengthPool(nn.Module):
    """Mean pooling spelled ``h.sum(1) / h.shape[1]``: the length is a folded Python number."""

    def __init__(self, d: int = 16, classes: int = 3):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return self.head(h.sum(dim=1) / h.shape[1])


class LogitsAndHidden(nn.Module):
    """Returns ``(logits, last_hidden)``: a sequence output and the final token's hidden state
    (``h[:, -1]``, a non-sequence output read at the global last position)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        h = torch.tanh(self.inp(x)).cumsum(dim=1)
        return self.out(h), h[:, -1]


class FixedTemperature(nn.Module):
    """A running sum divided by a fixed temperature of 16 (a constant that is NOT the length)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return torch.tanh(self.lin(x).cumsum(dim=1) / 16.0)


class PaddedAttention(nn.Module):
    """HF-style padding: ``forward(x, attention_mask)`` with a ``[B, T]`` 0/1 mask folded into
    the causal mask (``min`` where masked), position ids from ``attention_mask.cumsum(-1) - 1``;
    ``form="sdpa"`` passes the 4-D float mask to SDPA, ``"eager"`` adds it to the scores."""

    def __init__(self, d: int = 16, heads: int = 2, form: str = "sdpa"):
        super().__init__()
        self.h, self.dh, self.form = heads, d // heads, form
        self.qkv = nn.Linear(d, 3 * d)
        self.pos = nn.Embedding(512, d)

    def forward(self, x, attention_mask):
        B, T, D = x.shape
        position_ids = attention_mask.long().cumsum(-1) - 1
        position_ids.masked_fill_(attention_mask == 0, 1)
        x = x + self.pos(position_ids)
        q, k, v = (t.view(B, T, self.h, self.dh).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        neg = torch.finfo(x.dtype).min
        causal = torch.triu(torch.full((T, T), neg, device=x.device), diagonal=1)
        pad = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * neg
        mask = (causal[None, None] + pad).clamp(min=neg)
        if self.form == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            w = q @ k.transpose(-1, -2) / math.sqrt(self.dh) + mask
            o = torch.softmax(w, dim=-1) @ v
        return o.transpose(1, 2).reshape(B, T, D)


class PaddedLinearAttention(nn.Module):
    """Causal linear attention with a ``[B, T]`` padding mask multiplied into the keys' side of
    the mask (``tril * attention_mask[:, None, None, :]``)."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x, attention_mask):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.h, self.dh).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        q, k = F.elu(q) + 1, F.elu(k) + 1
        m = torch.ones(T, T, device=x.device).tril() * attention_mask[:, None, None, :].to(x.dtype)
        o = (q @ k.transpose(-1, -2) * m) @ v
        return o.transpose(1, 2).reshape(B, T, D)


class T5RelativeBias(nn.Module):
    """T5's bucketed relative position bias (``memory - context`` from arange, log buckets,
    an ``nn.Embedding`` of buckets → ``[1, H, T, T]``) added to the scores, causal."""

    def __init__(self, d: int = 16, heads: int = 2, buckets: int = 8, max_distance: int = 32):
        super().__init__()
        self.h, self.dh, self.nb, self.maxd = heads, d // heads, buckets, max_distance
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.relative_attention_bias = nn.Embedding(buckets, heads)

    def bucket(self, relative_position):
        n = -torch.min(relative_position, torch.zeros_like(relative_position))
        max_exact = self.nb // 2
        is_small = n < max_exact
        large = max_exact + (torch.log(n.float() / max_exact + 1e-6) /
                             math.log(self.maxd / max_exact) * (self.nb - max_exact)).to(torch.long)
        large = torch.min(large, torch.full_like(large, self.nb - 1))
        return torch.where(is_small, n, large)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.h, self.dh).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        context = torch.arange(T, dtype=torch.long)[:, None]
        memory = torch.arange(T, dtype=torch.long)[None, :]
        bias = self.relative_attention_bias(self.bucket(memory - context))
        bias = bias.permute([2, 0, 1]).unsqueeze(0)
        bias = bias + torch.triu(torch.full((T, T), float("-inf")), 1)
        w = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1)
        return (w @ v).transpose(1, 2).reshape(B, T, D)


class MaskedMeanPool(nn.Module):
    """Sentence-embedding pooling: ``(h * m).sum(1) / m.sum(1)`` with a ``[B, T]`` mask input."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x, attention_mask):
        h = torch.tanh(self.lin(x))
        m = attention_mask[..., None].float()
        return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
