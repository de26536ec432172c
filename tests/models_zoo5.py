"""Spellings found by running real HF transformers 5 models (tests/test_hf_dist.py runs those
models themselves), written out here without the transformers dependency:

* torch's ``associative_scan`` (HF Mamba's default ``use_associative_scan`` path): the generic
  form Dynamo inlines on CPU, the higher-order op, ``reverse=True``, a nonlinear single-leaf
  combine (``logaddexp``) and a non-diagonal (matrix) recurrence;
* ``torch.autograd.Function`` layers (Bloom's GeLU in training), token-local or not;
* keyword arguments (``F.conv1d(x, weight=w, ...)``, HF's causal-conv reference), GPT-2's
  ``Conv1D`` (``addmm`` on ``x.view(-1, D)``), in-place ``/=`` on routing weights;
* transformers 5's Mamba2 chunk scan (``einsum("bzch,bzhpn->bchpn", decay_chunk.transpose(1,
  3), states)``), two layers stacked;
* HF masking_utils: packed-sequence detection from position ids (``torch.diff(pos, prepend=
  pos[:, :1] - 1)``, ``cumsum``), the mask built by advanced indexing at positions, then SDPA —
  with positions made inside the model, and with packed ``position_ids`` given as an input;
* ``torch.func.vmap`` inside the model; one-token slices ``h[:, :1]`` / ``h[:, -1:]``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._higher_order_ops.associative_scan import associative_scan, associative_scan_op


# ---------------------------------------------------------------- associative scans
def affine_combine(left, right):
    """(a, b) ∘ (a', b') = (a a', a' b + b'): h_t = a_t h_{t-1} + b_t as a scan."""
    a_left, b_left = left
    a_right, b_right = right
    return a_left * a_right, a_right * b_left + b_right


class SelectiveScanAS(nn.Module):
    """HF ``mamba_selective_scan`` with ``use_associative_scan``: ``[B, D, L, N]`` tensors,
    scan dim 2, states read out by ``C`` and the last state ``all_states[:, :, -1]``.
    ``form="hop"`` calls the higher-order op directly (what Dynamo records for
    ``combine_mode="pointwise"`` on CUDA), ``"generic"`` the API on CPU."""

    def __init__(self, d: int = 16, n: int = 4, reverse: bool = False, form: str = "generic"):
        super().__init__()
        self.inp, self.dt = nn.Linear(d, d), nn.Linear(d, d)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1.0)).repeat(d, 1))
        self.Bp, self.Cp = nn.Linear(d, n), nn.Linear(d, n)
        self.reverse, self.form = reverse, form

    def forward(self, x):
        u = self.inp(x).transpose(1, 2)  # [B, D, L]
        dt = F.softplus(self.dt(x)).transpose(1, 2)
        A = -torch.exp(self.A_log)
        dA = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
        dBu = dt[:, :, :, None] * self.Bp(x)[:, None, :, :] * u[:, :, :, None]
        if self.form == "generic":
            _, hs = associative_scan(affine_combine, (dA, dBu), dim=2, reverse=self.reverse,
                                     combine_mode="generic")
        else:
            a0, b0 = dA.movedim(2, 0), dBu.movedim(2, 0)
            if self.reverse:
                a0, b0 = a0.flip([0]), b0.flip([0])
            outs = associative_scan_op(lambda a1, b1, a2, b2: [a1 * a2, a2 * b1 + b2],
                                       [a0, b0], ())
            hs = outs[1].flip([0]) if self.reverse else outs[1]
            hs = hs.movedim(0, 2)
        y = (hs * self.Cp(x)[:, None, :, :]).sum(-1)  # [B, D, L]
        return y.transpose(1, 2), hs[:, :, -1].square().mean()


class LogAddScan(nn.Module):
    """One leaf, a nonlinear associative combine: ``logaddexp`` (a log-space cumulative sum)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return associative_scan(torch.logaddexp, self.lin(x), dim=1, combine_mode="generic")


class MatrixScan(nn.Module):
    """A non-diagonal linear recurrence ``h_t = A_t h_{t-1} + b_t`` as a scan of ``(A, b)``
    pairs (a combine with matrix products: not elementwise)."""

    def __init__(self, d: int = 16, n: int = 3):
        super().__init__()
        self.A, self.b, self.n = nn.Linear(d, n * n), nn.Linear(d, n), n

    def forward(self, x):
        B, T, _ = x.shape
        A = 0.5 * torch.tanh(self.A(x)).reshape(B, T, self.n, self.n)

        def comb(left, right):
            Al, bl = left
            Ar, br = right
            return Ar @ Al, (Ar @ bl[..., None])[..., 0] + br
        _, h = associative_scan(comb, (A, self.b(x)), dim=1, combine_mode="generic")
        return h


class ScanThenAttention(nn.Module):
    """A Mamba-like scan layer stacked under a causal SDPA layer (a hybrid)."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.scan = SelectiveScanAS(d)
        self.qkv, self.h = nn.Linear(d, 3 * d), heads

    def forward(self, x):
        y, _ = self.scan(x)
        h = x + y
        B, T, D = h.shape
        q, k, v = self.qkv(h).view(B, T, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return h + o.transpose(1, 2).reshape(B, T, D)


# ---------------------------------------------------------------- custom autograd functions
class _SiLUGate(torch.autograd.Function):
    """x · sigmoid(x) · g with a hand-written backward (a fused activation)."""

    @staticmethod
    def forward(ctx, x, g):
        ctx.save_for_backward(x, g)
        return x * torch.sigmoid(x) * g

    @staticmethod
    def backward(ctx, grad):
        x, g = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * g * (s + x * s * (1 - s)), grad * x * s


class _PrefixSum(torch.autograd.Function):
    """A cumulative sum along dim 1 with a hand-written backward: it mixes tokens."""

    @staticmethod
    def forward(ctx, x):
        return x.cumsum(1)

    @staticmethod
    def backward(ctx, grad):
        return grad.flip(1).cumsum(1).flip(1)


class FusedGateMLP(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.up, self.gate, self.down = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(_SiLUGate.apply(self.up(x), self.gate(x)))


class CustomPrefixSum(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return _PrefixSum.apply(self.lin(x)) * 0.1


# ---------------------------------------------------------------- keyword / GPT-2 spellings
class KeywordCausalConv(nn.Module):
    """HF's ``causal_conv1d_fn`` reference: weights by keyword, ``[..., :seq_len]``."""

    def __init__(self, d: int = 16, k: int = 4):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, k) * 0.3)
        self.b = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        h = x.transpose(1, 2)
        _, D, T = h.shape
        out = F.conv1d(h, weight=self.w.unsqueeze(1), bias=self.b, padding=self.w.shape[-1] - 1,
                       groups=D)[:, :, :T]
        return F.silu(out).transpose(1, 2)


class GPT2Conv1D(nn.Module):
    """GPT-2's ``Conv1D``: ``torch.addmm(bias, x.view(-1, D), weight)``."""

    def __init__(self, d: int = 16, f: int = 24):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(d, f) * 0.2), nn.Parameter(torch.zeros(f))
        self.w2, self.b2 = nn.Parameter(torch.randn(f, d) * 0.2), nn.Parameter(torch.zeros(d))

    def forward(self, x):
        B, T, D = x.shape
        h = torch.addmm(self.b1, x.view(-1, D), self.w1)
        h = torch.addmm(self.b2, F.gelu(h), self.w2, beta=0.5, alpha=2.0)
        return h.view(B, T, D)


class RouterNormalise(nn.Module):
    """Mixtral's router in transformers 5: top-k of the softmax over ``[B*T, E]``, then
    ``router_top_value /= router_top_value.sum(dim=-1, keepdim=True)`` in place."""

    def __init__(self, d: int = 16, e: int = 4):
        super().__init__()
        self.gate, self.proj = nn.Linear(d, e, bias=False), nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        probs = F.softmax(self.gate(flat), dim=-1, dtype=torch.float)
        top, idx = torch.topk(probs, 2, dim=-1)
        top /= top.sum(dim=-1, keepdim=True)
        y = self.proj(flat) * top.sum(-1, keepdim=True) + idx.float().mean(-1, keepdim=True)
        return y.view(B, T, D)


# ---------------------------------------------------------------- transformers 5's Mamba2 chunks
def _segment_sum(x):
    n = x.size(-1)
    x = x[..., None].expand(*x.size(), n)
    x = x.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool), diagonal=-1), 0)
    x = torch.cumsum(x, dim=-2)
    return x.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool), diagonal=0), -torch.inf)


class Mamba2ChunkScan(nn.Module):
    """transformers 5's ``mamba2_chunk_scan`` reference: einsums, the inter-chunk recurrence
    ``einsum("bzch,bzhpn->bchpn", exp(segment_sum(pad(A_cumsum[..., -1]))).transpose(1, 3),
    states)``; ``layers`` of them stacked with residuals."""

    def __init__(self, d: int = 16, heads: int = 2, state: int = 4, chunk: int = 4,
                 layers: int = 2):
        super().__init__()
        self.h, self.hd, self.n, self.chunk = heads, d // heads, state, chunk
        self.proj = nn.ModuleList(nn.Linear(d, d + 2 * state + heads) for _ in range(layers))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, heads + 1).float()))
        self.out = nn.Linear(d, d)

    def layer(self, u, proj):
        b, T, D = u.shape
        hs, B, C, dt = torch.split(proj(u), [D, self.n, self.n, self.h], -1)
        dt = F.softplus(dt)
        c = self.chunk
        hs = (hs.reshape(b, T, self.h, self.hd) * dt[..., None]).reshape(b, T // c, c, self.h, self.hd)
        A = (-torch.exp(self.A_log) * dt).reshape(b, T // c, c, self.h).permute(0, 3, 1, 2)
        B = B.reshape(b, T // c, c, 1, self.n).expand(-1, -1, -1, self.h, -1)
        C = C.reshape(b, T // c, c, 1, self.n).expand(-1, -1, -1, self.h, -1)
        A_cumsum = torch.cumsum(A, dim=-1)
        L = torch.exp(_segment_sum(A))
        G = torch.einsum("bclhn,bcshn->bclsh", C, B)
        Y_diag = torch.einsum("bclsh,bcshp->bclhp", G * L.permute(0, 2, 3, 4, 1), hs)
        decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)
        B_decay = B * decay_states.permute(0, -2, -1, 1)[..., None]
        states = torch.einsum("bclhn,bclhp->bchpn", B_decay, hs)
        states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)
        decay_chunk = torch.exp(_segment_sum(F.pad(A_cumsum[:, :, :, -1], (1, 0)))).transpose(1, 3)
        new_states = torch.einsum("bzch,bzhpn->bchpn", decay_chunk, states)
        states = new_states[:, :-1]
        C_times_states = torch.einsum("bclhn,bchpn->bclhp", C, states)
        Y_off = C_times_states * torch.exp(A_cumsum).permute(0, 2, 3, 1)[..., None]
        return (Y_diag + Y_off).contiguous().reshape(b, T, D)

    def forward(self, u):
        for proj in self.proj:
            u = u + self.layer(u, proj)
        return self.out(u)


# ---------------------------------------------------------------- HF masking_utils
def _packed_segments(position_ids):
    """masking_utils.find_packed_sequence_indices: a new segment where positions do not
    increase by one."""
    first_dummy_value = position_ids[:, :1] - 1
    position_diff = torch.diff(position_ids, prepend=first_dummy_value, dim=-1)
    return (position_diff != 1).cumsum(-1)


class PackedMaskAttention(nn.Module):
    """HF's SDPA mask under torch.compile: causal AND same packed segment, built by advanced
    indexing at ``arange`` positions (``seg[batch_idx, q_idx] == seg[batch_idx, kv_idx]``),
    expanded to ``[B, 1, T, T]`` with the local sizes. ``given_positions``: ``position_ids`` is
    an input (packed sequences, resets inside a row), so the mask is data."""

    def __init__(self, d: int = 16, heads: int = 2, given_positions: bool = False):
        super().__init__()
        self.qkv, self.o, self.h = nn.Linear(d, 3 * d), nn.Linear(d, d), heads
        self.given = given_positions

    def forward(self, x, position_ids=None):
        B, T, D = x.shape
        if not self.given:
            position_ids = torch.arange(T)[None].expand(B, -1)
        seg = _packed_segments(position_ids)
        b_idx = torch.arange(B)[:, None, None, None]
        q_idx = torch.arange(T)[None, None, :, None]
        kv_idx = torch.arange(T)[None, None, None, :]
        mask = (kv_idx <= q_idx) & (seg[b_idx, q_idx] == seg[b_idx, kv_idx])
        mask = mask.expand(B, -1, T, T)
        q, k, v = self.qkv(x).view(B, T, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(o.transpose(1, 2).reshape(B, T, D))


def packed_positions(B: int, T: int, cuts=(5, 13, 22)):
    """Position ids of packed documents: restart at 0 after every cut (inside row 0)."""
    pos = torch.arange(T)[None].repeat(B, 1)
    start = 0
    for c in cuts:
        if c < T:
            pos[0, c:] = torch.arange(T - c)
            start = c
    return pos


# ---------------------------------------------------------------- vmap and one-token slices
class VmapPerToken(nn.Module):
    """``torch.func.vmap`` of a per-token function over the batch (Dynamo inlines the vmap)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        def per_row(r):  # [T, D] → [T, D]
            return torch.tanh(r) * r.sum(-1, keepdim=True)
        return self.lin(torch.func.vmap(per_row)(x))


class FirstLastSlices(nn.Module):
    """``h[:, :1]`` and ``h[:, -1:]`` (kept 2-D), broadcast back over the sequence."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return h + h[:, :1] * 0.5 - h[:, -1:] * 0.25


# ---------------------------------------------------------------- transformers 5's causal-LM loss
class HF5CausalLMLoss(nn.Module):
    """``ForCausalLMLoss``: ``labels = F.pad(labels, (0, 1), value=-100)``, ``labels[..., 1:]``,
    logits and labels flattened into ``cross_entropy(..., ignore_index=-100)`` (mean, or sum
    divided by a count with ``reduction='sum'``)."""

    def __init__(self, vocab: int = 11, d: int = 16, reduction: str = "mean"):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, d), nn.Linear(d, vocab)
        self.mix = nn.Linear(d, d)
        self.vocab, self.reduction = vocab, reduction

    def forward(self, ids, labels):
        h = self.emb(ids)
        h = h + torch.tanh(self.mix(h)).cumsum(1) * 0.1
        logits = self.head(h).float()
        labels = F.pad(labels, (0, 1), value=-100)
        shift_labels = labels[..., 1:].contiguous()
        loss = F.cross_entropy(logits.view(-1, self.vocab), shift_labels.view(-1),
                               ignore_index=-100, reduction=self.reduction)
        if self.reduction == "sum":
            loss = loss / (shift_labels != -100).sum()
        return loss, logits


# ---------------------------------------------------------------- red-team finds (wrong before)
class RandomFeatures(nn.Module):
    """Performer-style features ``x @ P.type_as(x).T`` with a buffer ``P`` (``type_as`` / ``to``
    lend only a dtype: ``P`` stays replicated), then a cumsum readout and a mean."""

    def __init__(self, d: int = 16, f: int = 12, cast: str = "type_as"):
        super().__init__()
        self.lin, self.cast = nn.Linear(d, d), cast
        self.register_buffer("P", torch.randn(f, d))

    def forward(self, x):
        h = self.lin(x)
        P = self.P.type_as(h) if self.cast == "type_as" else self.P.to(h)
        f = torch.exp(h @ P.T * 0.1)
        return f.cumsum(1) * 0.01, f.mean(1)


class ComplexReal(nn.Module):
    """A complex projection read back with ``.real`` (LRU / S5 style), then a cumsum."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.B = nn.Parameter(torch.randn(d, d, dtype=torch.cfloat) / 4)

    def forward(self, x):
        y = (x.to(torch.cfloat) @ self.B.T).real
        return y + y.cumsum(1) * 0.1


class CosFormerIndex(nn.Module):
    """cosFormer's ``get_index``: positions wrapped in ``nn.Parameter`` inside forward (a graph
    break: Dynamo compiles ``get_index`` on its own, with no tensor input)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.q = nn.Linear(d, d)

    def get_index(self, seq_len):
        index = 3.14159 / 2 * torch.arange(1, seq_len + 1).reshape(1, -1, 1)
        return nn.Parameter(index, requires_grad=False)

    def forward(self, x):
        q = self.q(x)
        return q * torch.sin(self.get_index(x.shape[1]).to(q) / 64)


class _PairScan(torch.autograd.Function):
    """An autograd.Function writing into views in place (mambapy's pscan style), token-local
    here: ``out = x``, ``out[..., 1:] += x[..., :-1] * 0`` on the feature dim."""

    @staticmethod
    def forward(ctx, x):
        out = x.clone()
        out[..., 1:].add_(x[..., :-1])
        return out

    @staticmethod
    def backward(ctx, g):
        gx = g.clone()
        gx[..., :-1].add_(g[..., 1:])
        return gx


class InPlaceFunction(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return _PairScan.apply(self.lin(x))


class WritesAtPositions(nn.Module):
    """``y[:, 0] = bos``, ``y[:, -1] = 0``, ``y[:, 1:3].fill_(0.5)``: global positions."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.lin, self.bos = nn.Linear(d, d), nn.Parameter(torch.randn(d))

    def forward(self, x):
        y = self.lin(x).clone()
        y[:, 0] = self.bos
        y[:, -1] = 0
        y[:, 1:3].fill_(0.5)
        return y.cumsum(1)


class LocalLengthMask(nn.Module):
    """``m = torch.ones(T); m[0] = 0``: written at a position of a local-length buffer."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        m = torch.ones(x.shape[1])
        m[0] = 0
        return self.lin(x) * m[None, :, None]


class ChunkLoop(nn.Module):
    """A Python loop over chunks with a non-affine state (the delta rule's shape)."""

    def __init__(self, d: int = 16, chunk: int = 8):
        super().__init__()
        self.p, self.C = nn.Linear(d, d), chunk

    def forward(self, x):
        B, T, D = x.shape
        xc = self.p(x).view(B, T // self.C, self.C, D)
        S = x.new_zeros(B, D, D)
        o = torch.zeros_like(xc)
        for i in range(T // self.C):
            xi = xc[:, i]
            o[:, i] = xi @ torch.tanh(S)
            S = S + xi.transpose(1, 2) @ xi * 0.01
        return o.reshape(B, T, D)


class InvariantInLoop(nn.Module):
    """A token loop that recomputes a parameter-only value every step (fla's RWKV-6
    ``u[None, ..., None]``, MiniMax's ``block_decay``)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.l, self.u = nn.Linear(d, d), nn.Parameter(torch.randn(d))

    def forward(self, x):
        a = torch.sigmoid(self.l(x))
        h = x.new_zeros(x.shape[0], x.shape[2])
        o = torch.zeros_like(x)
        for t in range(x.shape[1]):
            u = torch.sigmoid(self.u)[None]
            h = a[:, t] * h + x[:, t]
            o[:, t] = h * u
        return o


class ChunkViewLoop(nn.Module):
    """torchscale-style chunks: ``view(B, n, C, D)``, the state handed on by a loop over
    ``kv[:, i]`` with an exclusive readout stacked after the loop (the last step's update is
    dead: Dynamo drops it, so the reads cover all chunks but the last)."""

    def __init__(self, d: int = 16, chunk: int = 4):
        super().__init__()
        self.qkv, self.C = nn.Linear(d, 3 * d), chunk

    def forward(self, x):
        B, T, D = x.shape
        n = T // self.C
        q, k, v = (t.view(B, n, self.C, D) for t in self.qkv(x).chunk(3, -1))
        kv = k.transpose(-1, -2) @ v
        state, rec = torch.zeros(B, D, D), []
        for i in range(n):
            rec.append(state)
            state = state * 0.9 + kv[:, i]
        return (q @ torch.stack(rec, 1)).reshape(B, T, D)


class HedgehogAttention(nn.Module):
    """Hedgehog / lolcats ``quadratic_attention``: softmax feature maps, causal scores
    ``masked_fill(triu(ones, 1), 0)``, rows normalised BEFORE the value product
    ``a / (a.sum(-1, keepdim=True) + eps) @ v``."""

    def __init__(self, d: int = 16, heads: int = 2, clamp: bool = False):
        super().__init__()
        self.h, hd, self.clamp = heads, d // heads, clamp
        self.qkv, self.fq, self.fk = nn.Linear(d, 3 * d), nn.Linear(hd, hd), nn.Linear(hd, hd)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.h, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))

        def fm(f, t):
            return torch.cat([torch.softmax(f(t), -1), torch.softmax(-f(t), -1)], -1)
        a = torch.einsum("bhmd,bhnd->bhmn", fm(self.fq, q), fm(self.fk, k))
        m, n = a.shape[-2:]
        a = a.masked_fill(torch.ones((m, n), dtype=torch.bool).triu(n - m + 1), 0)
        if self.clamp:
            a = a / a.sum(-1, keepdim=True).clamp(min=1e-6)
        else:
            a = a / (a.sum(dim=-1, keepdim=True) + 1e-12)
        return torch.einsum("bhmn,bhnd->bhmd", a, v).transpose(1, 2).reshape(B, T, D)
