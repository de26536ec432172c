"""Spellings a red-team pass over unseen models found (session of 2026-12-02), written out as
small models:

* reductions with no ``dim`` (``h.max()``, ``torch.min(h)``, cosFormer's ``M = idx.max() + 1``
  over positions, performer-pytorch's ``torch.max(data_dash)`` stabiliser): ATen's ``max`` has a
  pointwise overload, and the analysis took them for elementwise ops (silently wrong);
* lengths hidden in tensor constructors (``torch.tensor(float(T))``, ``torch.full((), T)``):
  refused like the folded number itself;
* Mamba2 ``ssd_minimal``'s own ``segsum`` (``x[..., None].repeat(..., T)``, masked cumsum over
  dim -2) in the quadratic SSD form;
* prefix sums over a chunk axis (``h.view(B, T // C, C, D).sum(2).cumsum(1)``: fla's
  ``naive_chunk_linear_attn`` state pass).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class FullReductions(nn.Module):
    """``h - h.max()``, ``h * torch.min(h)``, ``h.amax(dim=1, keepdim=True)`` in one model."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.l = nn.Linear(d, d)

    def forward(self, x):
        h = self.l(x)
        return (h - h.max()) * torch.min(h).abs() + h.amax(dim=1, keepdim=True)


class CosFormerMaxIndex(nn.Module):
    """cosFormer's reweighting with ``M = idx.max() + 1`` read from positions (non-causal)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = F.relu(self.qkv(x)).chunk(3, -1)
        idx = torch.arange(1, T + 1, dtype=torch.float32)
        m = idx.max() + 1
        ang = (torch.pi / 2) * idx / m
        qs, qc = q * torch.sin(ang)[:, None], q * torch.cos(ang)[:, None]
        ks, kc = k * torch.sin(ang)[:, None], k * torch.cos(ang)[:, None]
        kv = torch.einsum("btd,bte->bde", ks, v) + 0 * torch.einsum("btd,bte->bde", kc, v)
        kv_c = torch.einsum("btd,bte->bde", kc, v)
        return torch.einsum("btd,bde->bte", qs, kv) + torch.einsum("btd,bde->bte", qc, kv_c)


class PerformerStabiliser(nn.Module):
    """performer-pytorch's older ``softmax_kernel`` for keys: ``stab = torch.max(data_dash)``
    over everything, detached (non-causal linear attention)."""

    def __init__(self, d: int = 16, m: int = 8):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.register_buffer("proj", torch.randn(m, d) * 0.3)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        dk = k @ self.proj.t()
        diag = (k ** 2).sum(-1, keepdim=True) / 2
        kp = torch.exp(dk - diag - torch.max(dk).detach()) + 1e-4
        qp = torch.exp(q @ self.proj.t() - (q ** 2).sum(-1, keepdim=True) / 2) + 1e-4
        ctx = kp.transpose(-1, -2) @ v
        return (qp @ ctx) / (qp @ kp.sum(1, keepdim=True).transpose(-1, -2))


class LengthInTensor(nn.Module):
    """``torch.arange(T) / torch.tensor(float(T))``: the length as a tensor constant."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.l = nn.Linear(d, d)

    def forward(self, x):
        T = x.shape[1]
        return self.l(x) * (torch.arange(T) / torch.tensor(float(T)))[:, None]


class LengthInFull(nn.Module):
    """``h.cumsum(1) / torch.full((), T)``."""

    def forward(self, x):
        return x.cumsum(1) / torch.full((), x.shape[1])


def ssd_segsum(x):
    """Mamba2 ``ssd_minimal``'s segsum: ``out[..., i, j] = Σ_{j < k <= i} x[..., k]``."""
    T = x.size(-1)
    x = x[..., None].repeat(*([1] * x.dim()), T)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool), diagonal=-1)
    x = x.masked_fill(~mask, 0)
    x_segsum = torch.cumsum(x, dim=-2)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool), diagonal=0)
    return x_segsum.masked_fill(~mask, -torch.inf)


class SSDMinimalQuadratic(nn.Module):
    """The quadratic SSD form with ``ssd_minimal``'s segsum: ``((C Bᵀ) ⊙ exp(segsum(A))) X``."""

    def __init__(self, d: int = 16, heads: int = 2, n: int = 4):
        super().__init__()
        self.h, self.n = heads, n
        self.x_proj = nn.Linear(d, d)
        self.bc = nn.Linear(d, 2 * heads * n)
        self.dt = nn.Linear(d, heads)

    def forward(self, x):
        B, T, D = x.shape
        xs = self.x_proj(x).view(B, T, self.h, -1).transpose(1, 2)        # [B, H, T, P]
        b, c = self.bc(x).view(B, T, 2, self.h, self.n).unbind(2)
        b, c = b.transpose(1, 2), c.transpose(1, 2)                         # [B, H, T, N]
        a = -F.softplus(self.dt(x)).transpose(1, 2)                         # [B, H, T]
        L = torch.exp(ssd_segsum(a))
        y = ((c @ b.transpose(-1, -2)) * L) @ xs
        return y.transpose(1, 2).reshape(B, T, D)


class ChunkStatePass(nn.Module):
    """The state pass of fla's ``naive_chunk_linear_attn``: per-chunk ``kᵀv`` sums, a prefix sum
    over the chunk axis, the exclusive state read by the chunk's queries, plus the intra-chunk
    causal part."""

    def __init__(self, d: int = 16, chunk: int = 4):
        super().__init__()
        self.qkv, self.c = nn.Linear(d, 3 * d), chunk

    def forward(self, x):
        B, T, D = x.shape
        C = self.c
        q, k, v = (t.view(B, T // C, C, D) for t in self.qkv(x).chunk(3, -1))
        kv = k.transpose(-1, -2) @ v                                        # [B, N, D, D]
        incl = kv.cumsum(1)
        excl = incl - kv
        inter = q @ excl
        mask = torch.tril(torch.ones(C, C, dtype=torch.bool))
        intra = ((q @ k.transpose(-1, -2)).masked_fill(~mask, 0)) @ v
        return (inter + intra).reshape(B, T, D)


class TwoStateFinals(nn.Module):
    """A loop with two carried states (RWKV-like numerator / denominator) returning both final
    states: each output reads its own chain's global final state."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.p = nn.Linear(d, 2 * d)
        self.w = nn.Parameter(torch.rand(d) * 0.5 + 0.4)

    def forward(self, x):
        k, v = self.p(x).chunk(2, -1)
        a = torch.zeros_like(x[:, 0])
        b = torch.zeros_like(x[:, 0])
        out = []
        for t in range(x.shape[1]):
            a = self.w * a + k[:, t] * v[:, t]
            b = self.w * b + k[:, t]
            out.append(a / (b.abs() + 1.0))
        return torch.stack(out, 1), a, b


class LossModules(nn.Module):
    """HF 4.x's ``loss_fct = CrossEntropyLoss(); loss_fct(logits.view(-1, V), labels.view(-1))``
    (``weight=None`` passed by keyword) and a class-weighted loss with label smoothing."""

    def __init__(self, vocab: int = 11, d: int = 16):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, d), nn.Linear(d, vocab)
        self.loss_fct = nn.CrossEntropyLoss()
        self.register_buffer("cw", torch.linspace(0.5, 2.0, vocab))
        self.v = vocab

    def forward(self, ids, labels):
        logits = self.head(self.emb(ids))
        a = self.loss_fct(logits.view(-1, self.v), labels.view(-1))
        b = F.cross_entropy(logits.view(-1, self.v), labels.view(-1), weight=self.cw,
                            label_smoothing=0.1)
        return a + 2 * b


def ids_and_labels(B: int = 2, T: int = 32, vocab: int = 11):
    def make():
        ids = torch.randint(0, vocab, (B, T))
        labels = torch.randint(0, vocab, (B, T))
        labels[:, ::5] = -100
        return [ids, labels]
    return make


class MultiTokenLosses(nn.Module):
    """Multi-token prediction: next-token and second-next-token losses on the same ids (two
    shifted losses of different widths)."""

    def __init__(self, vocab: int = 11, d: int = 16):
        super().__init__()
        self.emb, self.h1, self.h2 = nn.Embedding(vocab, d), nn.Linear(d, vocab), \
            nn.Linear(d, vocab)
        self.v = vocab

    def forward(self, ids):
        h = self.emb(ids)
        a = F.cross_entropy(self.h1(h)[:, :-1].reshape(-1, self.v), ids[:, 1:].reshape(-1))
        b = F.cross_entropy(self.h2(h)[:, :-2].reshape(-1, self.v), ids[:, 2:].reshape(-1))
        return a, b


class NarrowSpellings(nn.Module):
    """Position tables and tokens taken with ``narrow`` / ``split`` / ``select`` / a one-element
    list: ``pos.narrow(1, 0, T)``, ``torch.narrow(pe, 0, 0, T)``, ``pe.split(T, 0)[0]``, the last
    token by ``x.select(1, -1)`` and ``x[:, [-1], :]``, a shift by ``F.pad(x.narrow(1, 0, T - 1),
    (0, 0, 1, 0))``."""

    def __init__(self, d: int = 16, max_len: int = 64):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, max_len, d) * 0.1)
        self.register_buffer("pe", torch.randn(max_len, d))
        self.l = nn.Linear(d, d)

    def forward(self, x):
        T = x.shape[1]
        h = self.l(x + self.pos.narrow(1, 0, T)) * torch.narrow(self.pe, 0, 0, T)
        h = h + self.pe.split(T, 0)[0]
        last = h.select(1, -1)[:, None] + h[:, [-1], :]
        return F.pad(h.narrow(1, 0, T - 1), (0, 0, 1, 0)) + last


class IndexFromLength(nn.Module):
    """``x[:, T - 1]`` with T folded to the local length."""

    def forward(self, x):
        T = x.shape[1]
        return x[:, T - 1]


class HF4SequenceLengths(nn.Module):
    """transformers 4's sequence-classification pooling: ``(eq(ids, pad).argmax(-1) - 1) %
    ids.shape[-1]`` (the modulus is folded to the local length)."""

    def __init__(self, vocab: int = 11, d: int = 16):
        super().__init__()
        self.emb, self.score = nn.Embedding(vocab, d), nn.Linear(d, 3)

    def forward(self, ids):
        logits = self.score(self.emb(ids))
        lengths = (torch.eq(ids, 0).int().argmax(-1) - 1) % ids.shape[-1]
        return logits[torch.arange(ids.shape[0]), lengths]


class AutocastRoPEAttention(nn.Module):
    """RoPE tables from ``arange(T, dtype=float32)`` under ``torch.autocast``: q, k come out
    fp32 while v is bf16; SDPA under autocast casts all three."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.qkv, self.h = nn.Linear(d, 3 * d), heads

    def forward(self, x):
        B, T, D = x.shape
        with torch.autocast("cpu", dtype=torch.bfloat16):
            q, k, v = (t.view(B, T, self.h, -1).transpose(1, 2)
                       for t in self.qkv(x).chunk(3, -1))
            hd = q.shape[-1]
            inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
            ang = torch.outer(torch.arange(T, dtype=torch.float32), inv)
            cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

            def rot(t):
                t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
                return t * cos + torch.cat([-t2, t1], -1) * sin
            o = F.scaled_dot_product_attention(rot(q), rot(k), v, is_causal=True)
        return o.transpose(1, 2).reshape(B, T, D).float()


class VandermondeConv(nn.Module):
    """S4D's convolution view by conv1d: the kernel ``exp(-r · arange(L))`` has the sequence's
    length (built from positions)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.log_r = nn.Parameter(torch.rand(d) * 0.5)

    def forward(self, u):
        B, L, H = u.shape
        k = torch.exp(-torch.exp(self.log_r)[:, None] * torch.arange(L))
        y = F.conv1d(F.pad(u.transpose(1, 2), (L - 1, 0)), k.flip(-1)[:, None], groups=H)
        return y.transpose(1, 2)


class FilterCutToLength(nn.Module):
    """A long filter cut to the length, ``w[..., :T]`` with ``pad(T - 1)``."""

    def __init__(self, d: int = 16, max_len: int = 64):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, 1, max_len) * 0.1)

    def forward(self, x):
        T = x.shape[1]
        return F.conv1d(F.pad(x.transpose(1, 2), (T - 1, 0)), self.w[..., :T],
                        groups=x.shape[-1]).transpose(1, 2)


class WideCausalConv(nn.Module):
    """A causal conv reaching further back than one shard (k - 1 = 19 > 16 local tokens)."""

    def __init__(self, d: int = 16, k: int = 20):
        super().__init__()
        self.conv = nn.Conv1d(d, d, k, groups=d, padding=k - 1)

    def forward(self, x):
        T = x.shape[1]
        return self.conv(x.transpose(1, 2))[..., :T].transpose(1, 2)


class SSDSharedBC(nn.Module):
    """Mamba2 with ``ngroups = 1``: B and C shared by the heads in the quadratic SSD form,
    as the four-operand einsum ``btn,bsn,bhts,bshp->bthp`` and as ``(C @ Bᵀ)[:, None] * L @ x``."""

    def __init__(self, d: int = 16, heads: int = 2, n: int = 4):
        super().__init__()
        self.h, self.n = heads, n
        self.proj = nn.Linear(d, 2 * n + heads + d)

    def forward(self, u):
        B, T, D = u.shape
        Bm, Cm, dt, xs = torch.split(self.proj(u), [self.n, self.n, self.h, D], -1)
        cs = (-F.softplus(dt)).transpose(1, 2).cumsum(-1)                      # [B, H, T]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        L = (cs[..., :, None] - cs[..., None, :]).masked_fill(~causal, -torch.inf).exp()
        xh = xs.view(B, T, self.h, -1)
        y1 = torch.einsum("btn,bsn,bhts,bshp->bthp", Cm, Bm, L, xh)
        y2 = (((Cm @ Bm.transpose(-1, -2)).unsqueeze(1) * L) @ xh.transpose(1, 2)).transpose(1, 2)
        return (y1 + y2).reshape(B, T, D)


class RWKV4NaiveWKV(nn.Module):
    """RWKV-4's naive WKV recurrence with its token shift: exclusive readout
    ``(a + e^{u+k} v) / (b + e^{u+k})`` before ``a = w a + e^k v``, ``b = w b + e^k``; the final
    states are unused (Dynamo drops the last update)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.time_decay = nn.Parameter(torch.linspace(-2, 1, d))
        self.time_first = nn.Parameter(torch.full((d,), -1.2))
        self.mix = nn.Parameter(torch.rand(d))
        self.key, self.value = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.shift = nn.ZeroPad2d((0, 0, 1, -1))

    def forward(self, x):
        B, T, C = x.size()
        xx = self.shift(x)
        xk = x * self.mix + xx * (1 - self.mix)
        k, v = self.key(xk), self.value(x)
        w = torch.exp(-torch.exp(self.time_decay))
        a = torch.zeros(B, C)
        b = torch.zeros(B, C)
        out = []
        for t in range(T):
            kt, vt = k[:, t], v[:, t]
            e = torch.exp(self.time_first + kt)
            out.append((a + e * vt) / (b + e))
            a = w * a + torch.exp(kt) * vt
            b = w * b + torch.exp(kt)
        return torch.stack(out, 1)


class ExclusiveGatedReadout(nn.Module):
    """``o_t = q_t * s`` before ``s = g_t * s + k_t`` (elementwise state, final unused)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.p = nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, g = self.p(x).chunk(3, -1)
        g = torch.sigmoid(g)
        s = torch.zeros_like(x[:, 0])
        out = []
        for t in range(x.shape[1]):
            out.append(q[:, t] * s)
            s = g[:, t] * s + k[:, t]
        return torch.stack(out, 1)


class PlainTensorWeight(nn.Module):
    """An unregistered tensor attribute (not a Parameter or buffer) of shape [D, D] with D equal
    to the local length: a weight, not a sequence input."""

    def __init__(self, d: int = 16):
        super().__init__()
        torch.manual_seed(1)
        self.W = torch.randn(d, d) * 0.3

    def forward(self, x):
        return (x @ self.W).cumsum(1)


class HalfLinearAttention(nn.Module):
    """Normalised causal linear attention run in bf16 parameters (the value check must accept
    bf16 rounding on every rank alike)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        T = x.shape[1]
        q, k, v = F.elu(self.qkv(x)).add(1).chunk(3, -1)
        a = (q @ k.mT) * torch.tril(torch.ones(T, T, dtype=x.dtype))
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


class CastOutputBuffer(nn.Module):
    """fla's ``torch_simple_gla`` recurrent reference: the output buffer made as
    ``torch.zeros(B, H, T, V).to(q)`` and written step by step."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.qkv, self.g, self.h = nn.Linear(d, 3 * d), nn.Linear(d, heads), heads

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.h, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        g = F.logsigmoid(self.g(x)).transpose(1, 2)                       # [B, H, T]
        S = torch.zeros(B, self.h, q.shape[-1], v.shape[-1])
        o = torch.zeros(B, self.h, T, v.shape[-1]).to(q)
        for i in range(T):
            S = S * g[:, :, i].exp()[..., None, None] + k[:, :, i, :, None] * v[:, :, i, None, :]
            o[:, :, i] = (q[:, :, i, :, None] * S).sum(-2)
        return o.transpose(1, 2).reshape(B, T, D)
