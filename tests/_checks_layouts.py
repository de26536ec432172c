"""Worker-side checks for tests/test_layouts_dist.py: layouts and spellings of other code bases —
timm's ``qkv.permute(2, 0, 3, 1, 4).unbind(0)``, Megatron's sequence-first ``[s, b, h]`` layout
with ``baddbmm`` scores (``seq_dim=0``), ``nn.MultiheadAttention`` / ``nn.TransformerEncoder`` —
sharded on gloo ranks against the full eager run."""
from __future__ import annotations

import copy
import math

import torch
import torch._dynamo
import torch.nn as nn
import torch.nn.functional as F

import spcompile
from _checks_backend import compare_sharded


class TimmAttention(nn.Module):
    """timm's Attention (causal here): one qkv projection, permute, unbind(0), SDPA."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.h = heads

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class TimmLinearAttention(nn.Module):
    """The same projection spelling feeding masked causal linear attention."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.h = heads

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = F.elu(q) + 1, F.elu(k) + 1
        a = (q @ k.transpose(-2, -1)) * torch.tril(torch.ones(N, N))
        return (a @ v).transpose(1, 2).reshape(B, N, C)


class MegatronCoreAttention(nn.Module):
    """Megatron's core attention in [s, b, h]: baddbmm scores into an empty buffer (beta=0),
    causal masked_fill, softmax, bmm, back to [s, b, h]."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.np, self.hn = heads, d // heads

    def forward(self, x):
        s, b, _ = x.shape
        q, k, v = self.qkv(x).view(s, b, self.np, 3 * self.hn).split(self.hn, dim=-1)
        q, k, v = (t.reshape(s, b * self.np, self.hn) for t in (q, k, v))
        buf = torch.empty(b * self.np, s, s, dtype=x.dtype, device=x.device)
        scores = torch.baddbmm(buf, q.transpose(0, 1), k.transpose(0, 1).transpose(1, 2),
                               beta=0.0, alpha=1.0 / math.sqrt(self.hn))
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=x.device), diagonal=1)
        probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
        ctx = torch.bmm(probs, v.transpose(0, 1))
        ctx = ctx.view(b, self.np, s, self.hn).permute(2, 0, 1, 3).reshape(s, b, -1)
        return self.proj(ctx)


class SeqFirstLinearAttention(nn.Module):
    """Linear attention in [s, b, h] with 'sbhd' einsums and a qkv unbind(3)."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.h = heads

    def forward(self, x):
        s, b, d = x.shape
        q, k, v = self.qkv(x).view(s, b, self.h, 3, d // self.h).unbind(3)
        q, k = F.elu(q) + 1, F.elu(k) + 1
        a = torch.einsum("sbhd,tbhd->bhst", q, k) * torch.tril(torch.ones(s, s))
        return torch.einsum("bhst,tbhd->sbhd", a, v).reshape(s, b, d)


class SeqFirstStack(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.lin, self.core = SeqFirstLinearAttention(d), MegatronCoreAttention(d)
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.lin(self.n1(x))
        x = x + self.core(self.n2(x))
        return x, x.pow(2).mean()


class TutorialTransformerLM(nn.Module):
    """The PyTorch tutorial's causal encoder: nn.TransformerEncoder, square subsequent mask."""

    def __init__(self, d=16):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=32, dropout=0.0,
                                           batch_first=True)
        self.enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.size(1))
        return self.enc(x, mask=mask, is_causal=True)


class MHABoolMask(nn.Module):
    """nn.MultiheadAttention with a boolean triu mask (True = masked out), weights unused."""

    def __init__(self, d=16):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        T = x.size(1)
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        h = self.norm(x)
        out, _ = self.attn(h, h, h, attn_mask=mask)  # need_weights defaults to True
        return x + out


class MHASeqFirstBidirectional(nn.Module):
    """Sequence-first nn.MultiheadAttention without a mask (an encoder), then a mean."""

    def __init__(self, d=16):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 4)

    def forward(self, x):  # x [B, T, D] → the module wants [T, B, D]
        y = self.attn(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1),
                      need_weights=False)[0]
        return y.transpose(0, 1), y.mean()


def _fallbacks(be):
    return [str(f) for r in be.reports for f in r.fallbacks]


def check_timm(rank, P, rec):
    for name, make in (("timm sdpa", TimmAttention), ("timm linear", TimmLinearAttention)):
        be = compare_sharded(rank, P, rec, name, make)
        rec.true(f"{name}: zero fallbacks", not _fallbacks(be), str(_fallbacks(be))[:300])


def check_seq_first(rank, P, rec):
    torch.manual_seed(0)
    m = SeqFirstStack()
    T, B = 32, 2
    x = torch.randn(T, B, 16)
    xf = x.clone().requires_grad_()
    ref, loss = m(xf)
    (ref.sum() + loss).backward()
    ref_grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    sm = copy.deepcopy(m)
    sm.zero_grad()
    torch._dynamo.reset()
    be = spcompile.backend(seq_dim=0)
    xs = spcompile.shard_sequence(x, dim=0).requires_grad_()
    out, l2 = torch.compile(sm, backend=be)(xs)
    (out.sum() + l2).backward()
    spcompile.sync_gradients(sm)
    n = T // P
    rec.close("seq-first: output", out, ref[rank * n:(rank + 1) * n])
    rec.close("seq-first: loss", l2, loss)
    rec.close("seq-first: input grad", xs.grad, xf.grad[rank * n:(rank + 1) * n])
    worst = max(((p.grad - ref_grads[pn]).abs().max() / ref_grads[pn].abs().max()).item()
                for pn, p in sm.named_parameters())
    rec.rows.append(dict(name="seq-first: parameter grads", err=worst, tol=1e-4, info=""))
    kinds = sorted(m_.kind for r in be.reports for m_ in r.matches)
    rec.true("seq-first: scan + attention matched, zero fallbacks",
             {"linear_scan", "attention"} <= set(kinds) and not _fallbacks(be),
             f"{kinds} {_fallbacks(be)}"[:300])


def check_torch_nn_attention(rank, P, rec):
    for name, make in (("nn.TransformerEncoder causal", TutorialTransformerLM),
                       ("nn.MultiheadAttention bool mask", MHABoolMask),
                       ("nn.MultiheadAttention seq-first, no mask", MHASeqFirstBidirectional)):
        be = compare_sharded(rank, P, rec, name, make)
        kinds = sorted(m.kind for r in be.reports for m in r.matches)
        rec.true(f"{name}: lowered to attention, zero fallbacks",
                 "attention" in kinds and not _fallbacks(be), f"{kinds} {_fallbacks(be)}"[:300])
