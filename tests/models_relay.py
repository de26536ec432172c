"""Python loops whose carried state has no parallel form (run as a relay, rank after rank):
nonlinear cells (GRU / LSTM / a hand-written tanh RNN), the delta rule in fla's naive reference
spelling (``S.clone()``, ``o[:, :, i] = ...``, the final state returned), xLSTM's stabilised
recurrent mLSTM step (``maximum`` of log gates), a nonlinear state over blocks, an exclusive
readout whose last update Dynamo drops, two relayed layers, a hybrid with causal SDPA, and
torch's fused ``nn.GRU`` with a learned ``h0`` (the op's ``hx``), bidirectional ones, and
loops from the last token to the first (relayed from the last rank to the first).

Feature sizes (24) differ from the local lengths (16 at P = 2, 8 at P = 4)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

D, H, T, B = 24, 2, 32, 2


def inp():
    return [torch.randn(B, T, D)]


class LSTMCellLoop(nn.Module):
    """``nn.LSTMCell`` in a loop: a state of two tensors ``(h, c)``."""

    def __init__(self):
        super().__init__()
        self.cell, self.o = nn.LSTMCell(D, D), nn.Linear(D, D)

    def forward(self, x):
        h = c = torch.zeros(x.shape[0], D)
        hs = []
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
            hs.append(h)
        return self.o(torch.stack(hs, 1))


class GRULearnedH0Final(nn.Module):
    """A learned initial state (``h0.expand``) and the final state used after the loop."""

    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(D, D)
        self.h0 = nn.Parameter(torch.randn(D) * 0.1)

    def forward(self, x):
        h = self.h0.expand(x.shape[0], D)
        hs = []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            hs.append(h)
        return torch.stack(hs, 1) + h[:, None], h


class ElmanExclusive(nn.Module):
    """``y_t = tanh(h_{t-1}) ⊙ x_t`` read before ``h_t = tanh(W x_t + U h_{t-1})``; the final
    state is unused, so Dynamo drops the last update (and ``U h`` of the step before)."""

    def __init__(self):
        super().__init__()
        self.w, self.u = nn.Linear(D, D), nn.Linear(D, D, bias=False)

    def forward(self, x):
        h, ys = torch.zeros(x.shape[0], D), []
        for t in range(x.shape[1]):
            ys.append(torch.tanh(h) * x[:, t])
            h = torch.tanh(self.w(x[:, t]) + self.u(h))
        return torch.stack(ys, 1)


class BlockRNN(nn.Module):
    """A nonlinear state carried over blocks of 4 tokens (``x[:, i:i + 4]``), ``cat`` output."""

    def __init__(self):
        super().__init__()
        self.w = nn.Linear(D, D)

    def forward(self, x):
        h, ys = torch.zeros(x.shape[0], D), []
        for i in range(0, x.shape[1], 4):
            y = torch.tanh(x[:, i:i + 4] + h[:, None])
            h = torch.tanh(self.w(y.mean(1)) + h)
            ys.append(y)
        return torch.cat(ys, 1)


def naive_delta_rule(q, k, v, beta):
    """flash-linear-attention's ``delta_rule_recurrence`` reference spelling."""
    b, h, L, d_k = q.shape
    d_v = v.shape[-1]
    o = torch.zeros_like(v)
    S = torch.zeros(b, h, d_k, d_v).to(v)
    q = q * (d_k ** -0.5)
    for i in range(L):
        _k = k[:, :, i]
        _q = q[:, :, i]
        _v = v[:, :, i].clone()
        beta_i = beta[:, :, i]
        _v = _v - (S.clone() * _k[..., None]).sum(-2)
        _v = _v * beta_i[..., None]
        S = S.clone() + _k.unsqueeze(-1) * _v.unsqueeze(-2)
        o[:, :, i] = torch.einsum("bhd,bhdm->bhm", _q, S)
    return o, S


class DeltaNetNaive(nn.Module):
    """DeltaNet with fla's naive recurrence; the final state ``S`` is returned too."""

    def __init__(self):
        super().__init__()
        self.qkv, self.b = nn.Linear(D, 3 * D, bias=False), nn.Linear(D, H)

    def forward(self, x):
        Bb, Tt, _ = x.shape
        q, k, v = (t.view(Bb, Tt, H, D // H).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        o, S = naive_delta_rule(q, F.normalize(k, dim=-1), v,
                                self.b(x).sigmoid().transpose(1, 2))
        return o.transpose(1, 2).reshape(Bb, Tt, D), S


class MLSTMRecurrent(nn.Module):
    """xLSTM's recurrent mLSTM step with the max stabiliser ``m`` (state ``(C, n, m)``)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.g = nn.Linear(D, 3 * D), nn.Linear(D, 2)

    def forward(self, x):
        Bb, Tt, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, -1)
        k = k / D ** 0.5
        ig, fg = self.g(x).unbind(-1)
        C, n, m = torch.zeros(Bb, D, D), torch.zeros(Bb, D), torch.zeros(Bb, 1)
        hs = []
        for t in range(Tt):
            lf = F.logsigmoid(fg[:, t:t + 1])
            m_new = torch.maximum(lf + m, ig[:, t:t + 1])
            i_, f_ = torch.exp(ig[:, t:t + 1] - m_new), torch.exp(lf + m - m_new)
            C = f_[:, :, None] * C + i_[:, :, None] * (v[:, t, :, None] * k[:, t, None, :])
            n = f_ * n + i_ * k[:, t]
            num = (C @ q[:, t, :, None]).squeeze(-1)
            den = torch.maximum((n * q[:, t]).sum(-1, keepdim=True).abs(), torch.exp(-m_new))
            hs.append(num / den)
            m = m_new
        return torch.stack(hs, 1)


class TwoGRULayers(nn.Module):
    """Two relayed layers, the second fed (through a LayerNorm) by the first's output."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.n = nn.GRUCell(D, D), nn.GRUCell(D, D), nn.LayerNorm(D)

    @staticmethod
    def run(cell, x):
        h, hs = torch.zeros(x.shape[0], D), []
        for t in range(x.shape[1]):
            h = cell(x[:, t], h)
            hs.append(h)
        return torch.stack(hs, 1)

    def forward(self, x):
        y = self.run(self.c1, x)
        return self.run(self.c2, self.n(y)) + y


class HybridSDPAGRU(nn.Module):
    """Causal SDPA (K/V all-gathered) then a GRU cell loop (relayed)."""

    def __init__(self):
        super().__init__()
        self.cell, self.qkv = nn.GRUCell(D, D), nn.Linear(D, 3 * D)

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, H, D // H).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + a.transpose(1, 2).reshape(x.shape)
        h, hs = torch.zeros(x.shape[0], D), []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            hs.append(h)
        return torch.stack(hs, 1)


class ReversedGRU(nn.Module):
    """A GRU run from the last token to the first (``ys[t] = h``): relayed from the last rank
    to the first."""

    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(D, D)

    def forward(self, x):
        h, ys = torch.zeros(x.shape[0], D), [None] * x.shape[1]
        for t in reversed(range(x.shape[1])):
            h = self.cell(x[:, t], h)
            ys[t] = h
        return torch.stack(ys, 1)


class GRUFromFirstToken(nn.Module):
    """The state starts from this rank's first token (``h = x[:, 0]``): refused."""

    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(D, D)

    def forward(self, x):
        h, hs = torch.tanh(x[:, 0]), []
        for t in range(1, x.shape[1]):
            h = self.cell(x[:, t], h)
            hs.append(h)
        return torch.stack(hs, 1)


class GRUStepValueUsed(nn.Module):
    """The output of the loop's third step used after the loop (``hs[2]``): refused."""

    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(D, D)

    def forward(self, x):
        h, hs = torch.zeros(x.shape[0], D), []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            hs.append(h)
        return torch.stack(hs, 1) + hs[2][:, None]


class GRUModuleH0(nn.Module):
    """A 2-layer ``nn.GRU`` from a learned initial state, its final state returned."""

    def __init__(self):
        super().__init__()
        self.g = nn.GRU(D, 12, num_layers=2, batch_first=True)
        self.h0 = nn.Parameter(torch.randn(2, 1, 12) * 0.1)

    def forward(self, x):
        return self.g(x, self.h0.expand(2, x.shape[0], 12).contiguous())


class BiGRU(nn.Module):
    """A bidirectional ``nn.GRU``: taken apart into a forward relay and a reverse relay (the
    shard flipped, run, flipped back; from the last rank to the first)."""

    def __init__(self):
        super().__init__()
        self.g = nn.GRU(D, 8, batch_first=True, bidirectional=True)

    def forward(self, x):
        return self.g(x)[0]


class GRUDropoutLoop(nn.Module):
    """Dropout inside the loop body (training): the relay's backward recomputes the loop and
    must draw the forward's masks again."""

    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(D, D)

    def forward(self, x):
        h, hs = torch.zeros(x.shape[0], D, dtype=x.dtype), []
        for t in range(x.shape[1]):
            h = self.cell(F.dropout(x[:, t], 0.5, training=True), h)
            hs.append(h)
        return torch.stack(hs, 1)


class BiGRULoops(nn.Module):
    """A hand-written bidirectional RNN: a forward and a reversed loop over the same tokens, their
    final states used too (the forward's is the last rank's, the reversed one's the first's)."""

    def __init__(self):
        super().__init__()
        self.f, self.b = nn.GRUCell(D, D), nn.GRUCell(D, D)

    def forward(self, x):
        T_ = x.shape[1]
        h, fw = torch.zeros(x.shape[0], D), []
        for t in range(T_):
            h = self.f(x[:, t], h)
            fw.append(h)
        g, bw = torch.zeros(x.shape[0], D), [None] * T_
        for t in range(T_ - 1, -1, -1):
            g = self.b(x[:, t], g)
            bw[t] = g
        return torch.cat([torch.stack(fw, 1), torch.stack(bw, 1)], -1), h - g


class Qwen3NextGatedDelta(nn.Module):
    """Qwen3-Next's gated delta rule from transformers' own code: ``torch_recurrent_gated_delta_rule``
    (a loop over tokens) or ``torch_chunk_gated_delta_rule`` (``solve_triangular`` within chunks of
    ``chunk`` tokens, then a loop over the chunks: per-chunk matrices, batched over the sharded
    chunk axis, then the relay)."""

    def __init__(self, chunk=None, final=False):
        super().__init__()
        self.p, self.gb = nn.Linear(D, 3 * H * 8), nn.Linear(D, 2 * H)
        self.o = nn.Linear(H * 8, D)
        self.chunk, self.final = chunk, final

    def forward(self, x):
        from transformers.models.qwen3_next import modeling_qwen3_next as Q
        Bb, Tt, _ = x.shape
        q, k, v = self.p(x).view(Bb, Tt, 3, H, 8).unbind(2)
        g, beta = self.gb(x).view(Bb, Tt, 2, H).unbind(2)
        g, beta = F.logsigmoid(g), beta.sigmoid()
        if self.chunk:
            o, st = Q.torch_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=self.chunk,
                                                   output_final_state=self.final,
                                                   use_qk_l2norm_in_kernel=True)
        else:
            o, st = Q.torch_recurrent_gated_delta_rule(q, k, v, g, beta,
                                                       output_final_state=self.final,
                                                       use_qk_l2norm_in_kernel=True)
        y = self.o(o.reshape(Bb, Tt, H * 8))
        return (y, st) if self.final else y


def delta_rule_chunkwise(q, k, v, beta, chunk_size=4):
    """flash-linear-attention's chunkwise delta rule reference (WY form within chunks, in-place
    forward substitution on the chunk-internal axis, then a loop over the chunks)."""
    b, h, l, d_k = q.shape
    d_v = v.shape[-1]
    q = q * (d_k ** -0.5)
    v = v * beta[..., None]
    k_beta = k * beta[..., None]
    mask = torch.triu(torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device), diagonal=0)
    q, k, v, k_beta = map(lambda x: rearrange(x, 'b h (n c) d -> b h n c d', c=chunk_size), [q, k, v, k_beta])
    attn = -(k_beta @ k.transpose(-1, -2)).masked_fill(mask, 0)
    for i in range(1, chunk_size):
        attn[..., i, :i] = attn[..., i, :i] + (attn[..., i, :, None].clone() * attn[..., :, :i].clone()).sum(-2)
    attn = attn + torch.eye(chunk_size, dtype=torch.float, device=q.device)
    u = attn @ v
    w = attn @ k_beta
    S = k.new_zeros(b, h, d_k, d_v)
    o = torch.zeros_like(v)
    mask = torch.triu(torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device), diagonal=1)
    for i in range(0, l // chunk_size):
        q_i, k_i = q[:, :, i], k[:, :, i]
        attn = (q_i @ k_i.transpose(-1, -2)).masked_fill_(mask, 0)
        u_i = u[:, :, i] - w[:, :, i] @ S
        o_inter = q_i @ S
        o[:, :, i] = o_inter + attn @ u_i
        S = S + k_i.transpose(-1, -2) @ u_i
    return rearrange(o, 'b h n c d -> b h (n c) d'), S


class DeltaNetChunkwise(nn.Module):
    """DeltaNet with fla's chunkwise reference (chunks of 4), the final state returned."""

    def __init__(self):
        super().__init__()
        self.p, self.b = nn.Linear(D, 3 * D, bias=False), nn.Linear(D, H)

    def forward(self, x):
        Bb, Tt, _ = x.shape
        q, k, v = (t.view(Bb, Tt, H, -1).transpose(1, 2) for t in self.p(x).chunk(3, -1))
        o, S = delta_rule_chunkwise(q, F.normalize(k, dim=-1), v,
                                    self.b(x).sigmoid().transpose(1, 2))
        return o.transpose(1, 2).reshape(Bb, Tt, D), S


class AutocastGRULoop(nn.Module):
    """A GRU loop under ``torch.autocast(bfloat16)`` entered inside ``forward``: the relayed
    region runs outside the compiled graph and re-enters the autocast region it sat in."""

    def __init__(self):
        super().__init__()
        self.cell, self.o = nn.GRUCell(D, D), nn.Linear(D, D)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h, hs = torch.zeros(x.shape[0], D), []
            for t in range(x.shape[1]):
                h = self.cell(x[:, t], h)
                hs.append(h)
            y = self.o(torch.stack(hs, 1))
        return y.float()


class BiLSTM2(nn.Module):
    """A 2-layer bidirectional ``nn.LSTM`` (the second layer reads both directions), final
    ``(h, c)`` returned."""

    def __init__(self, proj_size=0, layers=2):
        super().__init__()
        self.g = nn.LSTM(D, 8, num_layers=layers, batch_first=True, bidirectional=True,
                         proj_size=proj_size)

    def forward(self, x):
        y, (h, c) = self.g(x)
        return y, h, c


class BiGRUTimeMajor(nn.Module):
    """A time-major bidirectional ``nn.GRU`` (``[T, B, D]``)."""

    def __init__(self):
        super().__init__()
        self.g = nn.GRU(D, 8, bidirectional=True)

    def forward(self, x):
        y, h = self.g(x.transpose(0, 1))
        return y.transpose(0, 1), h
