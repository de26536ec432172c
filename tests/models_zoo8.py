"""Red-team spellings, round 8: flash-linear-attention's naive references (``torch_simple_gla``'s
chunk loop over a state buffer ``S[:, :, i] = S[:, :, i - 1].clone() * ...``,
``naive_recurrent_gla``, ``naive_chunk_linear_attn``, RWKV-6's bonus loop, HGRN), einops
spellings (``rearrange``, ``einops.einsum`` in mamba-minimal), loops over a chunk axis,
statistics over the sequence (``logsumexp``, ``var`` / ``std`` overloads, vector norms,
attention pooling ``softmax(x @ q, dim=1)``) and replicated queries over sharded keys
(Perceiver latents, a pooling ``nn.MultiheadAttention``, a padded pooling SDPA).

Feature sizes (24) differ from the local lengths (16 at P = 2, 8 at P = 4)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import einsum as eeinsum
from einops import rearrange, repeat

D, H, T, B = 24, 2, 32, 2


def inp():
    return [torch.randn(B, T, D)]


def inp64():
    return [torch.randn(B, 2 * T, D)]


def inp_mask():
    m = torch.ones(B, T)
    m[0, 20:] = 0
    return [torch.randn(B, T, D), m]


def heads(m, x, n=3):
    return rearrange(m(x), 'b t (k h d) -> k b h t d', k=n, h=H)


def normalize_output(q, k, o):
    k = k.cumsum(-2)
    z = (q * k).sum(-1, keepdim=True)
    return o / (z + 1e-10)


class SimpleGLANaiveChunk(nn.Module):
    """fla's ``torch_simple_gla``: einops chunks, a per-chunk state buffer filled by a loop
    that reads the slot before (``S[:, :, i] = S[:, :, i - 1].clone() * decay + kv``)."""

    def __init__(self, C: int = 4):
        super().__init__()
        self.qkv, self.g, self.C = nn.Linear(D, 3 * D), nn.Linear(D, H), C

    def forward(self, x):
        q, k, v = heads(self.qkv, x)
        g = F.logsigmoid(self.g(x)).transpose(1, 2)  # [b, h, t]
        C = self.C
        q = rearrange(q, 'b h (n c) d -> b h n c d', c=C) * q.shape[-1] ** -0.5
        k = rearrange(k, 'b h (n c) d -> b h n c d', c=C)
        v = rearrange(v, 'b h (n c) d -> b h n c d', c=C)
        g = rearrange(g, 'b h (n c) -> b h n c', c=C).cumsum(-1)
        kv = k.transpose(-1, -2) @ (v * (-g + g[:, :, :, -1, None]).exp()[..., None])
        S = torch.zeros_like(kv)
        for i in range(1, g.shape[-2]):
            S[:, :, i] = S[:, :, i - 1].clone() * g[:, :, i - 1, -1, None, None].exp() + \
                kv[:, :, i - 1]
        inter = (q * g[..., None].exp()) @ S
        attn = (q @ k.transpose(-1, -2)) * (g[..., None] - g[..., None, :]).exp()
        attn = attn.masked_fill(torch.triu(torch.ones(C, C, dtype=torch.bool), diagonal=1), 0)
        return rearrange(inter + attn @ v, 'b h n c d -> b (n c) (h d)')


class NaiveRecurrentGLA(nn.Module):
    """fla's ``naive_recurrent_gla``: a token loop, ``o[:, :, i] = (q_i[..., None] * h).sum(-2)``."""

    def __init__(self):
        super().__init__()
        self.qkv, self.g = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        q, k, v = heads(self.qkv, x)
        gk = rearrange(F.logsigmoid(self.g(x)) / 8, 'b t (h d) -> b h t d', h=H)
        b, h_, t, K = q.shape
        h = q.new_zeros(b, h_, K, K)
        o = torch.zeros_like(v)
        for i in range(t):
            q_i, k_i, v_i = q[:, :, i] * K ** -0.5, k[:, :, i], v[:, :, i]
            h = h * gk[:, :, i].exp()[..., None] + k_i[..., None] * v_i[..., None, :]
            o[:, :, i] = (q_i[..., None] * h).sum(-2)
        return rearrange(o, 'b h t d -> b t (h d)')


class NaiveChunkLinearAttn(nn.Module):
    """fla's ``naive_chunk_linear_attn``: ``kv.cumsum(2)`` over the chunk axis, shifted by
    ``cat([zeros_like(kv[:, :, :1]), kv[:, :, :-1]], 2)``, intra-chunk scores masked in place
    (``masked_fill_``); optionally the ``normalize_output`` denominator."""

    def __init__(self, C: int = 4, normalize: bool = False):
        super().__init__()
        self.qkv, self.C, self.normalize = nn.Linear(D, 3 * D), C, normalize

    def forward(self, x):
        q, k, v = heads(self.qkv, x)
        if self.normalize:
            q, k = F.elu(q) + 1, F.elu(k) + 1
        scale = q.shape[-1] ** -0.5
        q0, k0 = q, k
        q = rearrange(q, 'b h (n c) d -> b h n c d', c=self.C) * scale
        k = rearrange(k, 'b h (n c) d -> b h n c d', c=self.C)
        v = rearrange(v, 'b h (n c) d -> b h n c d', c=self.C)
        kv = (k.transpose(-1, -2) @ v).cumsum(2)
        kv = torch.cat([torch.zeros_like(kv[:, :, :1]), kv[:, :, :-1]], dim=2)
        mask = torch.triu(torch.ones(self.C, self.C, dtype=torch.bool), diagonal=1)
        o = q @ kv + (q @ k.transpose(-1, -2)).masked_fill_(mask, 0) @ v
        o = rearrange(o, 'b h n c d -> b h (n c) d')
        if self.normalize:
            o = normalize_output(q0 * scale, k0, o)
        return rearrange(o, 'b h t d -> b t (h d)')


class HGRNRecurrent(nn.Module):
    """fla's ``naive_recurrent_hgrn``: ``h = g_t.exp() * h + i_t``, ``o[:, t] = h``."""

    def __init__(self):
        super().__init__()
        self.i, self.f = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        i, g = self.i(x), F.logsigmoid(self.f(x))
        h = torch.zeros(i.shape[0], i.shape[2])
        o = torch.zeros_like(i)
        for t in range(i.shape[1]):
            h = g[:, t].exp() * h + i[:, t]
            o[:, t] = h
        return o


class RWKV6Naive(nn.Module):
    """fla's ``naive_recurrent_rwkv6``: the readout ``(h + u * kv_t) * r_t`` has the state's
    shape and comes before the update, so in the last step (whose update is dead) it looks
    like one."""

    def __init__(self):
        super().__init__()
        self.rkv, self.w = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.u = nn.Parameter(torch.randn(H, D // H) * 0.1)

    def forward(self, x):
        r, k, v = heads(self.rkv, x)
        w = rearrange(-torch.exp(self.w(x).clamp(max=1)), 'b t (h d) -> b h t d', h=H).exp()
        b, h_, t, K = r.shape
        o = torch.zeros_like(v)
        h = torch.zeros(b, h_, K, K)
        for i in range(t):
            kv_i = k[:, :, i][..., None] * v[:, :, i, :][..., None, :]
            o[:, :, i] = ((h + self.u[None, ..., None] * kv_i) * r[:, :, i, :][..., None]).sum(-2)
            h = h * w[:, :, i][..., None] + kv_i
        return rearrange(o, 'b h t d -> b t (h d)')


class MambaMinimal(nn.Module):
    """johnma2006/mamba-minimal's block: ``einops.einsum``, ``conv1d(x)[:, :, :l]``, a loop
    appending ``y`` per token."""

    def __init__(self, d_inner: int = 12, n: int = 4, d_conv: int = 4):
        super().__init__()
        self.d_inner, self.n = d_inner, n
        self.in_proj = nn.Linear(D, 2 * d_inner)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, 2 + 2 * n, bias=False)
        self.dt_proj = nn.Linear(2, d_inner)
        A = repeat(torch.arange(1, n + 1).float(), 'n -> d n', d=d_inner)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, D)

    def forward(self, x):
        b, l, _ = x.shape
        x, res = self.in_proj(x).split(split_size=[self.d_inner, self.d_inner], dim=-1)
        x = rearrange(x, 'b l d_in -> b d_in l')
        x = rearrange(self.conv1d(x)[:, :, :l], 'b d_in l -> b l d_in')
        x = F.silu(x)
        A = -torch.exp(self.A_log.float())
        delta, Bm, Cm = self.x_proj(x).split(split_size=[2, self.n, self.n], dim=-1)
        delta = F.softplus(self.dt_proj(delta))
        deltaA = torch.exp(eeinsum(delta, A, 'b l d_in, d_in n -> b l d_in n'))
        deltaB_u = eeinsum(delta, Bm, x, 'b l d_in, b l n, b l d_in -> b l d_in n')
        h = torch.zeros((b, self.d_inner, self.n))
        ys = []
        for i in range(l):
            h = deltaA[:, i] * h + deltaB_u[:, i]
            ys.append(eeinsum(h, Cm[:, i, :], 'b d_in n, b n -> b d_in'))
        y = torch.stack(ys, dim=1) + x * self.D
        return self.out_proj(y * F.silu(res))


class ChunkStateLoop(nn.Module):
    """A decayed state handed on between chunks of ``view(B, n, C, D)`` by a Python loop over
    the chunk axis, in four spellings: ``fla`` (a buffer slot computed from the one before),
    ``write`` (the state written into a buffer before each update), ``list`` (appended before
    each update, the state started as ``zeros_like(kv[:, 0])``), ``inclusive``
    (``S[:, 0] = kv[:, 0]``: the state starts from a chunk, not from a constant)."""

    def __init__(self, mode: str, C: int = 4, final: bool = False):
        super().__init__()
        self.qkv, self.g, self.mode, self.C = nn.Linear(D, 3 * D), nn.Linear(D, 1), mode, C
        self.final = final  # ``list`` also returns the final state

    def forward(self, x):
        b, t, _ = x.shape
        C = self.C
        n = t // C
        q, k, v = (z.view(b, n, C, D) for z in self.qkv(x).chunk(3, -1))
        a = torch.sigmoid(self.g(x)).view(b, n, C).prod(-1)  # a decay per chunk
        kv = k.transpose(-1, -2) @ v
        if self.mode == "fla":
            S = torch.zeros_like(kv)
            for i in range(1, n):
                S[:, i] = S[:, i - 1].clone() * a[:, i - 1, None, None] + kv[:, i - 1]
        elif self.mode == "write":
            S, st = torch.zeros_like(kv), torch.zeros_like(kv[:, 0])
            for i in range(n):
                S[:, i] = st
                st = st * a[:, i, None, None] + kv[:, i]
        elif self.mode == "list":
            st, rec = torch.zeros_like(kv[:, 0]), []
            for i in range(n):
                rec.append(st)
                st = st * a[:, i, None, None] + kv[:, i]
            S = torch.stack(rec, 1)
            if self.final:
                return (q @ S).reshape(b, t, D), st
        else:  # inclusive
            S = torch.zeros_like(kv)
            S[:, 0] = kv[:, 0]
            for i in range(1, n):
                S[:, i] = S[:, i - 1].clone() * a[:, i, None, None] + kv[:, i]
        return (q @ S).reshape(b, t, D)


class FlashMixedChunk(nn.Module):
    """FLASH / GAU mixed-chunk attention: relu² scores inside each chunk plus linear attention
    across chunks (``cumsum`` over the chunk axis, shifted by ``F.pad(..., (0, 0, 0, 0, 1,
    -1))``), all in einops and ``torch.einsum``."""

    def __init__(self, C: int = 4):
        super().__init__()
        self.qk, self.v, self.C = nn.Linear(D, 2 * D), nn.Linear(D, D), C

    def forward(self, x):
        q, k = self.qk(x).chunk(2, -1)
        v = self.v(x)
        q, k, v = (rearrange(z, 'b (g n) d -> b g n d', n=self.C) for z in (q, k, v))
        attn = F.relu(torch.einsum('b g i d, b g j d -> b g i j', q, k) / self.C) ** 2
        attn = attn.masked_fill(torch.ones(self.C, self.C, dtype=torch.bool).triu(1), 0.)
        quad = torch.einsum('b g i j, b g j d -> b g i d', attn, v)
        lin_kv = torch.einsum('b g n d, b g n e -> b g d e', k, v) / self.C
        lin_kv = F.pad(lin_kv.cumsum(dim=1), (0, 0, 0, 0, 1, -1), value=0.)
        lin = torch.einsum('b g d e, b g n d -> b g n e', lin_kv, q)
        return rearrange(quad + lin, 'b g n d -> b (g n) d')


class EinopsSDPA(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        q, k, v = heads(self.qkv, x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(rearrange(y, 'b h t d -> b t (h d)'))


class LucidrainsCausal(nn.Module):
    """lucidrains' attention: ``einsum('b h i d, b h j d -> b h i j')``, a causal mask
    ``ones(i, j, dtype=bool).triu(j - i + 1)`` filled with ``-finfo.max``."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D, bias=False)

    def forward(self, x):
        q, k, v = map(lambda z: rearrange(z, 'b n (h d) -> b h n d', h=H),
                      self.qkv(x).chunk(3, dim=-1))
        sim = torch.einsum('b h i d, b h j d -> b h i j', q, k) * q.shape[-1] ** -0.5
        i, j = sim.shape[-2:]
        mask = torch.ones(i, j, device=x.device, dtype=torch.bool).triu(j - i + 1)
        attn = sim.masked_fill(mask, -torch.finfo(sim.dtype).max).softmax(dim=-1)
        out = torch.einsum('b h i j, b h j d -> b h i d', attn, v)
        return rearrange(out, 'b h n d -> b n (h d)')


class NeoXRotary(nn.Module):
    """GPT-NeoX rotary: ``cos_cached[:, :, :seq_len, ...]`` of a max-length buffer."""

    def __init__(self, max_len: int = 128):
        super().__init__()
        hd = D // H
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        freqs = torch.einsum("i,j->ij", torch.arange(max_len).float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cached", emb.cos()[None, None], persistent=False)
        self.register_buffer("sin_cached", emb.sin()[None, None], persistent=False)
        self.qkv = nn.Linear(D, 3 * D)

    def forward(self, x):
        q, k, v = heads(self.qkv, x)
        seq_len = x.shape[1]
        cos, sin = self.cos_cached[:, :, :seq_len, ...], self.sin_cached[:, :, :seq_len, ...]

        def rot(z):
            return torch.cat((-z[..., z.shape[-1] // 2:], z[..., :z.shape[-1] // 2]), dim=-1)

        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return rearrange(o, 'b h t d -> b t (h d)')


class RollShift(nn.Module):
    """A token shift by ``torch.roll`` with the wrapped-around token zeroed: in place
    (``xs[:, 0] = 0``) or by a position mask."""

    def __init__(self, in_place: bool = True):
        super().__init__()
        self.lin, self.in_place = nn.Linear(D, D), in_place

    def forward(self, x):
        if self.in_place:
            xs = torch.roll(x, shifts=1, dims=1)
            xs[:, 0] = 0
        else:
            xs = torch.roll(x, 1, 1) * (torch.arange(x.shape[1]) > 0).float()[None, :, None]
        return self.lin(x + xs)


# ---------------------------------------------------------------- statistics over the sequence
class Statistic(nn.Module):
    """``f(tanh(linear(x)))`` for a reduction ``f`` over the sequence."""

    def __init__(self, f):
        super().__init__()
        self.lin, self.f = nn.Linear(D, D), f

    def forward(self, x):
        return self.f(torch.tanh(self.lin(x)))


STATISTICS = {
    "torch.logsumexp(y, dim=1)": lambda y: torch.logsumexp(y, dim=1),
    "y.logsumexp((1, 2), keepdim=True)": lambda y: y.logsumexp((1, 2), keepdim=True),
    "y.std(dim=1)": lambda y: y.std(dim=1),
    "torch.std(y, 1, False, True)": lambda y: torch.std(y, 1, False, True),
    "y.var(1, correction=0)": lambda y: y.var(1, correction=0),
    "y.var()": lambda y: y.var(),
    "y.var(False)": lambda y: y.var(False),
    "y.norm(dim=1)": lambda y: y.norm(dim=1),
    "torch.norm(y, 1, 1)": lambda y: torch.norm(y, 1, 1),
    "torch.norm(y, inf, dim=1, keepdim=True)":
        lambda y: torch.norm(y, float("inf"), dim=1, keepdim=True),
    "y.norm()": lambda y: y.norm(),
    "statistics pooling cat([mean, std])": lambda y: torch.cat([y.mean(1), y.std(1)], -1),
    "torch.linalg.vector_norm(y, dim=1)": lambda y: torch.linalg.vector_norm(y, dim=1),
    "F.normalize(y, p=1, dim=1)": lambda y: F.normalize(y, p=1, dim=1),
    "nn.AdaptiveAvgPool1d(1) on [B, C, T]":
        lambda y: nn.AdaptiveAvgPool1d(1)(y.transpose(1, 2)).squeeze(-1),
    "F.adaptive_max_pool1d(x, 1) on [B, C, T]":
        lambda y: F.adaptive_max_pool1d(y.transpose(1, 2), 1).flatten(1),
}


class AttentionPool(nn.Module):
    """Attention pooling: ``softmax(x @ q, dim=1)`` with a learned vector ``q``."""

    def __init__(self):
        super().__init__()
        self.q, self.head = nn.Parameter(torch.randn(D)), nn.Linear(D, 5)

    def forward(self, x):
        w = torch.softmax(x @ self.q, dim=1)
        return self.head((w.unsqueeze(-1) * x).sum(1))


class VectorTimesTokens(nn.Module):
    """``v @ x.transpose(1, 2)``: a vector on the left, a score per token."""

    def __init__(self):
        super().__init__()
        self.v = nn.Parameter(torch.randn(D))

    def forward(self, x):
        return (self.v @ x.transpose(1, 2)).softmax(-1)[..., None] * x


# ---------------------------------------------------------------- replicated queries
class PerceiverLatents(nn.Module):
    """Learned latents attend over the whole (sharded) sequence, non-causal; with
    ``gqa`` one key/value head shared by the query heads (``enable_gqa=True``)."""

    def __init__(self, L: int = 3, gqa: bool = False):
        super().__init__()
        self.lat, self.kv, self.gqa = nn.Parameter(torch.randn(1, L, D)), nn.Linear(D, 2 * D), gqa

    def forward(self, x):
        k, v = self.kv(x).chunk(2, -1)
        q = rearrange(self.lat.expand(x.shape[0], -1, -1), 'b n (h d) -> b h n d', h=H)
        if self.gqa:
            k, v = (z[..., None, :, :D // H] for z in (k, v))
            o = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            k, v = (rearrange(z, 'b n (h d) -> b h n d', h=H) for z in (k, v))
            o = F.scaled_dot_product_attention(q, k, v)
        return rearrange(o, 'b h n d -> b n (h d)')


class PoolingMHA(nn.Module):
    """A learned query attends over the tokens through ``nn.MultiheadAttention``."""

    def __init__(self):
        super().__init__()
        self.q = nn.Parameter(torch.randn(1, 1, D))
        self.mha = nn.MultiheadAttention(D, 2, batch_first=True)

    def forward(self, x):
        o, _ = self.mha(self.q.expand(x.shape[0], -1, -1), x, x, need_weights=False)
        return o[:, 0]


class PaddedPooling(nn.Module):
    """A pooling query over the tokens with a key padding mask from ``attention_mask``."""

    def __init__(self):
        super().__init__()
        self.q, self.kv = nn.Parameter(torch.randn(1, 1, 1, D)), nn.Linear(D, 2 * D)

    def forward(self, x, m):
        k, v = self.kv(x)[:, None].chunk(2, -1)
        return F.scaled_dot_product_attention(self.q.expand(x.shape[0], -1, -1, -1), k, v,
                                              attn_mask=m[:, None, None, :].bool())


# ---------------------------------------------------------------- centred convolutions, batch norm
class CentredConv(nn.Module):
    """A depthwise convolution that keeps the length: ``padding='same'`` (odd or even kernel,
    any dilation), ``padding=(k - 1) // 2``, or ``F.pad(x, (left, right))`` then no padding."""

    def __init__(self, k: int = 3, padding="same", dilation: int = 1, pad=None):
        super().__init__()
        self.pad = pad
        self.conv = nn.Conv1d(D, D, k, padding=0 if pad else padding, dilation=dilation,
                              groups=D if pad is None else 2)

    def forward(self, x):
        y = x.transpose(1, 2)
        if self.pad:
            y = F.pad(y, self.pad)
        return self.conv(y).transpose(1, 2)


class ConformerConvModule(nn.Module):
    """Conformer's convolution module: pointwise conv + GLU, depthwise conv with
    ``padding=(k - 1) // 2``, ``BatchNorm1d`` (training: batch statistics over the whole
    sequence; eval: running statistics), SiLU, pointwise conv, residual."""

    def __init__(self, k: int = 5, train: bool = True):
        super().__init__()
        self.pw1 = nn.Conv1d(D, 2 * D, 1)
        self.dw = nn.Conv1d(D, D, k, padding=(k - 1) // 2, groups=D, bias=False)
        self.bn = nn.BatchNorm1d(D)
        self.pw2 = nn.Conv1d(D, D, 1)
        self.train(train)

    def forward(self, x):
        y = F.glu(self.pw1(x.transpose(1, 2)), dim=1)
        y = self.pw2(F.silu(self.bn(self.dw(y))))
        return x + y.transpose(1, 2)


# ---------------------------------------------------------------- mamba_ssm's ssd_minimal, in einops
def ssd_segsum(x):
    """``ssd_minimal``'s segsum, with einops' ``repeat``."""
    n = x.size(-1)
    x = repeat(x, "... d -> ... d e", e=n)
    x = x.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool), diagonal=-1), 0)
    x_segsum = torch.cumsum(x, dim=-2)
    return x_segsum.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool)), -torch.inf)


def ssd_minimal_discrete(X, A, Bm, C, block_len):
    X, A, Bm, C = [rearrange(z, "b (c l) ... -> b c l ...", l=block_len) for z in (X, A, Bm, C)]
    A = rearrange(A, "b c l h -> b h c l")
    A_cumsum = torch.cumsum(A, dim=-1)
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, Bm, torch.exp(ssd_segsum(A)), X)
    decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bm, decay_states, X)
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)
    decay_chunk = torch.exp(ssd_segsum(F.pad(A_cumsum[:, :, :, -1], (1, 0))))
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]
    Y_off = torch.einsum('bclhn,bchpn,bhcl->bclhp', C, states, torch.exp(A_cumsum))
    return rearrange(Y_diag + Y_off, "b c l h p -> b (c l) h p"), final_state


class SSDMinimalEinops(nn.Module):
    """mamba_ssm's ``ssd_minimal_discrete`` as written (einops), returning the final state.
    (The decay is ``-exp`` rather than ``-softplus``: torch 2.13's AOTAutograd fails on this
    graph's backward with softplus here, with any backend — ``aot_eager`` too.)"""

    def __init__(self, n: int = 4, block: int = 4):
        super().__init__()
        self.x, self.bc, self.dt = nn.Linear(D, D), nn.Linear(D, 2 * H * n), nn.Linear(D, H)
        self.block = block

    def forward(self, x):
        X = rearrange(self.x(x), "b l (h p) -> b l h p", h=H)
        Bm, C = rearrange(self.bc(x), "b l (two h n) -> two b l h n", two=2, h=H)
        A = -torch.exp(self.dt(x).clamp(max=2))
        y, final = ssd_minimal_discrete(X, A, Bm, C, self.block)
        return rearrange(y, "b l h p -> b l (h p)"), final


class RetNetXPos(nn.Module):
    """Retention with xPos (torchscale): rotary angles and a per-position scale
    ``((i + 0.4·d) / 1.4·d) ** (pos / 512)``; the ``512`` (xPos' ``scale_base``) equals 16 ×
    ``B·T_local`` here, and is no row count (it divides positions, not a sum over rows)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.register_buffer("gamma", 1 - 2 ** (-5 - torch.arange(H, dtype=torch.float)))

    def forward(self, x):
        b, t, _ = x.shape
        hd = D // H
        q, k, v = (z.view(b, t, H, hd).transpose(1, 2) for z in self.qkv(x).chunk(3, -1))
        pos = torch.arange(t, dtype=torch.float)
        sc = ((torch.arange(0, hd, 2) + 0.4 * hd) / (1.4 * hd))[None, :] ** (pos[:, None] / 512)
        ang = pos[:, None] / (10000 ** (torch.arange(0, hd, 2).float() / hd))[None]
        sin, cos = torch.sin(ang), torch.cos(ang)

        def rot(z, s):
            z1, z2 = z[..., ::2], z[..., 1::2]
            return torch.stack([z1 * cos * s - z2 * sin * s, z1 * sin * s + z2 * cos * s],
                               -1).flatten(-2)

        q, k = rot(q, sc), rot(k, 1 / sc)
        i = torch.arange(t)
        decay = self.gamma[:, None, None] ** (i[:, None] - i[None, :]).clamp(min=0).float()
        att = (q @ k.transpose(-1, -2)) * (decay * (i[:, None] >= i[None, :]))
        return (att @ v).transpose(1, 2).reshape(b, t, D)


class TorchBatchNorm(nn.Module):
    """``torch.batch_norm(x, weight, bias, running_mean, running_var, training, ...)``: the
    argument order differs from ``F.batch_norm``'s."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D, bias=False)
        self.w, self.b = nn.Parameter(torch.rand(D) + 0.5), nn.Parameter(torch.randn(D))
        self.register_buffer("rm", torch.zeros(D))
        self.register_buffer("rv", torch.ones(D))

    def forward(self, x):
        y = torch.tanh(self.lin(x)).transpose(1, 2)
        return torch.batch_norm(y, self.w, self.b, self.rm, self.rv, True, 0.1, 1e-5,
                                False).transpose(1, 2)


def inp_mask_empty_row():
    """A key padding mask with one sample's tokens all masked (its pooled output is 0)."""
    m = torch.ones(B, T)
    m[0, 10:] = 0
    m[1] = 0
    return [torch.randn(B, T, D), m]


class GroupNormOverTime(nn.Module):
    """``nn.GroupNorm`` on ``[B, C, T]`` (1-D U-Nets, audio), on ``[B, H, T, d]`` with one
    group per head, or ``nn.InstanceNorm1d`` (affine, no running statistics)."""

    def __init__(self, form: str = "bct"):
        super().__init__()
        self.form = form
        self.lin = nn.Linear(D, D, bias=False)
        self.norm = {"bct": nn.GroupNorm(4, D), "heads": nn.GroupNorm(H, H),
                     "instance": nn.InstanceNorm1d(D, affine=True)}[form]

    def forward(self, x):
        y = torch.tanh(self.lin(x))
        if self.form == "heads":
            y = y.view(y.shape[0], y.shape[1], H, -1).transpose(1, 2)
            return self.norm(y).transpose(1, 2).reshape(x.shape)
        return self.norm(y.transpose(1, 2)).transpose(1, 2)


class LatentsPooledHead(nn.Module):
    """Perceiver latents, then ops over the latent axis (dim 1, the axis the sequence has in
    the input): ``head(latents).sum(1)`` is replicated, no reduction over the sequence."""

    def __init__(self):
        super().__init__()
        self.pool, self.head = PerceiverLatents(L=2), nn.Linear(D, 3)

    def forward(self, x):
        return self.head(self.pool(x)).sum(1), self.pool(x).mean(1)


class GroupNormSequenceChannels(nn.Module):
    """``F.group_norm`` on ``[B, T, D]``: the sequence is the channel dim, split into groups —
    no statistic the reduction families compute (gathered)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        return F.group_norm(torch.tanh(self.lin(x)), 4)
