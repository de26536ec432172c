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


def rope(x, positions, base: float = 10000.0):
    """Rotary embedding on [B, H, T, D] with positions [T] (GPT-NeoX style halves)."""
    D = x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    ang = positions.float()[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    rot = torch.cat([-x2, x1], dim=-1)
    return x * cos + rot * sin


class SoftmaxAttention(nn.Module):
    """Causal softmax attention with RoPE from arange positions (SDPA or the manual form)."""

    def __init__(self, d: int = 16, heads: int = 2, kv_heads: int = 2):
        super().__init__()
        self.h, self.hkv, self.dh = heads, kv_heads, d // heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * kv_heads * self.dh)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        q = self.q(x).view(B, T, self.h, self.dh).transpose(1, 2)
        k, v = self.kv(x).view(B, T, 2, self.hkv, self.dh).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        pos = torch.arange(T, device=x.device)
        q, k = rope(q, pos), rope(k, pos)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=self.hkv != self.h)
        return self.o(o.transpose(1, 2).reshape(B, T, D))


class ShortConv(nn.Module):
    """Mamba-style causal depthwise conv1d (padding k-1, then keep the first T outputs)."""

    def __init__(self, d: int = 16, k: int = 4):
        super().__init__()
        self.conv = nn.Conv1d(d, d, k, padding=k - 1, groups=d)

    def forward(self, x):
        T = x.shape[1]
        return F.silu(self.conv(x.transpose(1, 2))[..., :T]).transpose(1, 2)


class Hybrid(nn.Module):
    """Linear attention + softmax attention (RoPE, GQA) + causal conv; returns (y, mean loss)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.b1 = Block(LinearAttention(d, spelling="masked_fill"), d)
        self.conv = ShortConv(d)
        self.b2 = Block(SoftmaxAttention(d, heads=2, kv_heads=1), d)

    def forward(self, x):
        y = self.b2(x + self.conv(self.b1(x)))
        return y, y.square().mean()


class Unsupported(nn.Module):
    """Mixes tokens with an op no pattern covers (an FFT along the sequence, FNet/Hyena's
    global convolution)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        h = self.lin(x)
        return h + torch.fft.fft(h, dim=1).real * 0.1


class RetNetRetention(nn.Module):
    """Multi-scale retention (RetNet) in its parallel form: D[n, m] = γ^(n-m) for n >= m."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        gammas = 1 - 2 ** (-5 - torch.arange(heads, dtype=torch.float32))
        self.register_buffer("gammas", gammas)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)
        n = torch.arange(T, device=x.device)
        diff = (n[:, None] - n[None, :]).float()
        decay = self.gammas.view(-1, 1, 1) ** diff.clamp_min(0)
        decay = decay.masked_fill(diff < 0, 0.0)  # [H, T, T]
        ret = (q @ k.transpose(-1, -2)) * self.dh ** -0.5 * decay
        o = ret @ v
        return self.o(o.transpose(1, 2).reshape(B, T, D))


def segsum(x):
    """Stable segment sum (Mamba2 reference): out[..., i, j] = sum_{j<k<=i} x[..., k]."""
    T = x.size(-1)
    cs = torch.cumsum(x, dim=-1)
    out = cs[..., :, None] - cs[..., None, :]
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
    return out.masked_fill(~mask, -torch.inf)


class SSDLayer(nn.Module):
    """Mamba2 SSD, quadratic (non-chunked) form: y = (C Bᵀ ⊙ exp(segsum(A·dt))) (x·dt)."""

    def __init__(self, d: int = 16, heads: int = 2, state: int = 8):
        super().__init__()
        self.h, self.p, self.n = heads, d // heads, state
        self.in_proj = nn.Linear(d, d + 2 * heads * state + heads)
        self.A_log = nn.Parameter(torch.log(torch.linspace(1.0, 4.0, heads)))
        self.out = nn.Linear(d, d)

    def forward(self, u):
        B_, T, D = u.shape
        x, Bm, Cm, dt = torch.split(self.in_proj(u), [D, self.h * self.n, self.h * self.n, self.h],
                                    dim=-1)
        x = x.view(B_, T, self.h, self.p)
        Bm = Bm.view(B_, T, self.h, self.n)
        Cm = Cm.view(B_, T, self.h, self.n)
        dt = F.softplus(dt)  # [B, T, H]
        A = -torch.exp(self.A_log)  # [H]
        L = torch.exp(segsum((A * dt).transpose(1, 2)))  # [B, H, T, T]
        y = torch.einsum("bthn,bshn,bhts,bshp->bthp", Cm, Bm, L, x * dt.unsqueeze(-1))
        return self.out(y.reshape(B_, T, D))


class GPT2Attention(nn.Module):
    """GPT-2 style: a registered causal ``bias`` buffer, ``masked_fill(-inf)``, softmax, ``/√d``."""

    def __init__(self, d: int = 16, heads: int = 2, max_len: int = 256):
        super().__init__()
        self.h = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len)).view(
            1, 1, max_len, max_len))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class CumsumLinearTransformer(nn.Module):
    """Katharopoulos et al. in the cumsum form, with the normaliser q · cumsum(k)."""

    def __init__(self, d: int = 16, heads: int = 2, eps: float = 1e-6):
        super().__init__()
        self.h, self.eps = heads, eps
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.h, D // self.h).unbind(2)
        q, k = F.elu(q) + 1, F.elu(k) + 1
        kv = torch.einsum("bthd,bthe->bthde", k, v).cumsum(dim=1)
        num = torch.einsum("bthd,bthde->bthe", q, kv)
        den = torch.einsum("bthd,bthd->bth", q, k.cumsum(dim=1)).unsqueeze(-1) + self.eps
        return self.out((num / den).reshape(B, T, D))


class NonCausalLinearAttention(nn.Module):
    """Global (non-causal) linear attention q (kᵀ v) / (q · Σk)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        q, k = F.elu(q) + 1, F.elu(k) + 1
        kv = k.transpose(-1, -2) @ v  # [B, D, D]: a sum over the sequence
        z = k.sum(dim=1, keepdim=True)  # [B, 1, D]
        return (q @ kv) / (q * z).sum(-1, keepdim=True)


class CatShift(nn.Module):
    """Token shift spelled with cat + slice (a halo, like ``F.pad(h, (0, 0, 1, -1))``)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        h = self.lin(x)
        shifted = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        return x + shifted * h.sigmoid()


class FNetMix(nn.Module):
    """FNet's token mixing, ``fft`` along the sequence (no pattern: computed through the
    fallback, on the gathered sequence)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        h = self.lin(x)
        return x + torch.fft.fft(torch.fft.fft(h, dim=-1), dim=1).real


class TokenLoop(nn.Module):
    """A recurrence written as a Python loop over tokens (rewritten with its carried state:
    tests/test_loops_dist.py)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        h = self.lin(x)
        s, outs = torch.zeros_like(h[:, 0]), []
        for t in range(x.shape[1]):
            s = 0.9 * s + h[:, t]
            outs.append(s)
        return torch.stack(outs, dim=1)


class ZooMix(nn.Module):
    """Assorted model-zoo spellings: learned position embedding from arange, a manual RMSNorm,
    an additive ``-inf`` causal mask from ``triu(full(-inf))``, ``Tensor.softmax``, bmm with a
    [B*H, T, D] layout, and SDPA with a boolean causal ``attn_mask``."""

    def __init__(self, d: int = 16, heads: int = 2, max_len: int = 128):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.pos = nn.Embedding(max_len, d)
        self.w = nn.Parameter(torch.ones(d))
        self.qkv = nn.Linear(d, 3 * d)
        self.qkv2 = nn.Linear(d, 3 * d)

    def rms(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w

    def forward(self, x):
        B, T, D = x.shape
        x = x + self.pos(torch.arange(T, device=x.device))
        q, k, v = self.qkv(self.rms(x)).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, T, self.h, self.dh).transpose(1, 2).reshape(B * self.h, T, self.dh)
                   for t in (q, k, v))
        mask = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
        att = (torch.bmm(q, k.transpose(1, 2)) / math.sqrt(self.dh) + mask).softmax(dim=-1)
        y = torch.bmm(att, v).reshape(B, self.h, T, self.dh).transpose(1, 2).reshape(B, T, D)
        x = x + y
        q, k, v = (t.view(B, T, self.h, self.dh).transpose(1, 2)
                   for t in self.qkv2(x).chunk(3, dim=-1))
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        return x + y.transpose(1, 2).reshape(B, T, D)


class HeadsEqualLength(nn.Module):
    """``arange(heads)`` where heads equals the local length: not positions (must not shift)."""

    def __init__(self, d: int = 16, heads: int = 8):
        super().__init__()
        self.h = heads
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        slopes = 2.0 ** (-(torch.arange(self.h, device=x.device).float() + 1))  # ALiBi-style
        y = self.lin(x).view(B, T, self.h, D // self.h)
        return (y * slopes[None, None, :, None]).reshape(B, T, D)


class BlockLoop(nn.Module):
    """Lightning-attention style loop over two blocks with a carried state (Python loop)."""

    def __init__(self, d: int = 16, block: int = 4):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.block = block

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        T, C = x.shape[1], self.block
        kv = torch.zeros(x.shape[0], x.shape[2], x.shape[2])
        outs = []
        for i in range(T // C):
            qi, ki, vi = (t[:, i * C:(i + 1) * C] for t in (q, k, v))
            intra = ((qi @ ki.transpose(1, 2)) * torch.ones(C, C).tril()) @ vi
            outs.append(intra + qi @ kv)
            kv = kv + ki.transpose(1, 2) @ vi
        return torch.cat(outs, dim=1)


def segsum_exact(x):
    """Mamba2 reference segsum (naive cumsum difference)."""
    T = x.size(-1)
    x_cumsum = torch.cumsum(x, dim=-1)
    x_segsum = x_cumsum[..., :, None] - x_cumsum[..., None, :]
    mask = torch.tril(torch.ones(T, T, device=x.device, dtype=torch.bool), diagonal=0)
    return x_segsum.masked_fill(~mask, -torch.inf)


def ssd_minimal_discrete(X, A, B, C, block_len, initial_states=None):
    """Mamba2's chunked SSD reference ("ssd_minimal"), written with reshapes instead of einops.
    X: [b, T, h, p]; A: [b, T, h]; B, C: [b, T, h, n]."""
    b, T, h, p = X.shape
    c = T // block_len
    X, B, C = (t.reshape(b, c, block_len, *t.shape[2:]) for t in (X, B, C))
    A = A.reshape(b, c, block_len, h).permute(0, 3, 1, 2)  # b h c l
    A_cumsum = torch.cumsum(A, dim=-1)
    L = torch.exp(segsum_exact(A))
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, L, X)
    decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, X)
    if initial_states is None:
        initial_states = torch.zeros_like(states[:, :1])
    states = torch.cat([initial_states, states], dim=1)
    decay_chunk = torch.exp(segsum_exact(F.pad(A_cumsum[:, :, :, -1], (1, 0))))
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states = new_states[:, :-1]
    state_decay_out = torch.exp(A_cumsum)
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, state_decay_out)
    return (Y_diag + Y_off).reshape(b, T, h, p)


class ChunkedSSD(nn.Module):
    """A Mamba2 mixer around the chunked reference SSD (block length 4)."""

    def __init__(self, d: int = 16, heads: int = 2, state: int = 4, block: int = 4):
        super().__init__()
        self.h, self.n, self.block = heads, state, block
        self.proj = nn.Linear(d, d + 2 * heads * state + heads)
        self.A_log = nn.Parameter(torch.log(torch.linspace(1.0, 4.0, heads)))
        self.out = nn.Linear(d, d)

    def forward(self, u):
        b, T, D = u.shape
        x, B, C, dt = torch.split(self.proj(u), [D, self.h * self.n, self.h * self.n, self.h], -1)
        dt = F.softplus(dt)
        A = -torch.exp(self.A_log) * dt  # [b, T, h]
        y = ssd_minimal_discrete((x * dt.repeat_interleave(D // self.h, -1)).view(
            b, T, self.h, -1), A, B.view(b, T, self.h, self.n), C.view(b, T, self.h, self.n),
            self.block)
        return self.out(y.reshape(b, T, D))


class LlamaAttention(nn.Module):
    """HF-Llama-style eager attention: RoPE from position_ids, repeat_kv (GQA), finfo.min
    causal mask, float32 softmax; and nn.MultiheadAttention (computed by the fallback)."""

    def __init__(s, d=16, h=4, hkv=2):
        super().__init__(); s.h, s.hkv, s.dh = h, hkv, d//h
        s.q=nn.Linear(d,d,bias=False); s.k=nn.Linear(d,hkv*s.dh,bias=False); s.v=nn.Linear(d,hkv*s.dh,bias=False); s.o=nn.Linear(d,d,bias=False)
        inv = 1.0/(10000**(torch.arange(0, s.dh, 2).float()/s.dh)); s.register_buffer("inv_freq", inv, persistent=False)
    def forward(s, x):
        B,T,_=x.shape
        q=s.q(x).view(B,T,s.h,s.dh).transpose(1,2); k=s.k(x).view(B,T,s.hkv,s.dh).transpose(1,2); v=s.v(x).view(B,T,s.hkv,s.dh).transpose(1,2)
        position_ids = torch.arange(T, device=x.device).unsqueeze(0).expand(B, -1)
        inv = s.inv_freq[None, :, None].float().expand(B, -1, 1)
        freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1); cos, sin = emb.cos()[:, None], emb.sin()[:, None]
        def rot(t): t1, t2 = t[..., :t.shape[-1]//2], t[..., t.shape[-1]//2:]; return torch.cat((-t2, t1), -1)
        q = q*cos + rot(q)*sin; k = k*cos + rot(k)*sin
        k = k[:, :, None].expand(B, s.hkv, s.h//s.hkv, T, s.dh).reshape(B, s.h, T, s.dh)
        v = v[:, :, None].expand(B, s.hkv, s.h//s.hkv, T, s.dh).reshape(B, s.h, T, s.dh)
        w = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(s.dh)
        mask = torch.full((T, T), torch.finfo(x.dtype).min).triu(1)
        w = w + mask[None, None]
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(w, v).transpose(1, 2).reshape(B, T, -1)
        return s.o(out)
class TorchMHA(nn.Module):
    def __init__(s): super().__init__(); s.m = nn.MultiheadAttention(16, 2, batch_first=True)
    def forward(s, x):
        T = x.shape[1]; mask = nn.Transformer.generate_square_subsequent_mask(T)
        return s.m(x, x, x, attn_mask=mask, need_weights=False, is_causal=True)[0]


class GLAParallel(nn.Module):
    """GLA's parallel form with vector gates: (q ⊙ e^{G}) (k ⊙ e^{-G})ᵀ ⊙ causal, G = cumsum(log g)."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d)
        self.gate = nn.Linear(d, d)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.h, self.dh).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, -1))
        g = F.logsigmoid(self.gate(x)).view(B, T, self.h, self.dh).transpose(1, 2) / 8
        G = g.cumsum(dim=2)  # [B, H, T, d]
        qg, kg = q * G.exp(), k * (-G).exp()
        A = (qg @ kg.transpose(-1, -2)) * torch.ones(T, T).tril() * self.dh ** -0.5
        o = A @ v
        return self.o(o.transpose(1, 2).reshape(B, T, D))
