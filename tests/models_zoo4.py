"""Hybrid long-context spellings the earlier zoos never saw (MoE FFNs, xLSTM's mLSTM, HGRN2 /
RetNet with ellipsis einsums and merged-head bmm, DeltaNet, tied-embedding LMs with smoothed
losses, HF position_ids, ...), written the way the papers' public reference code writes them
(plain PyTorch, nothing from spcompile). tests/models.py and tests/models_zoo2.py hold the
earlier batches.

Every model takes ``x: [B, T, D]`` (float) unless it says otherwise.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _causal_linear_attention(x, qkv, heads):
    """A small causal linear-attention mixer (masked form) for the hybrid blocks below."""
    B, T, D = x.shape
    q, k, v = (t.view(B, T, heads, D // heads).transpose(1, 2)
               for t in qkv(x).chunk(3, dim=-1))
    q, k = F.elu(q) + 1, F.elu(k) + 1
    a = (q @ k.transpose(-1, -2)) * torch.tril(torch.ones(T, T, device=x.device))
    return (a @ v).transpose(1, 2).reshape(B, T, D)


# ---------------------------------------------------------------- 1. MoE FFN (Mixtral / Jamba)
class Expert(nn.Module):
    """Mixtral's SwiGLU expert (w1, w3 in, w2 out)."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.w1 = nn.Linear(d, f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)
        self.w3 = nn.Linear(d, f, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoE(nn.Module):
    """Top-k routed experts over flattened tokens.

    ``spelling="hf"``: HF Mixtral's ``one_hot(selected).permute(2, 1, 0)`` expert mask,
    ``idx, top_x = torch.where(expert_mask[e])`` and ``index_add_``;
    ``"sel"``: ``torch.where(sel == e)`` on the ``[N, k]`` selection;
    ``"dense"``: every expert on every token, weighted by the (sparse) routing weights
    (``scatter`` of the top-k weights into ``[N, E]``; no data-dependent shapes);
    ``"hit"``: newer HF Mixtral / Qwen-MoE, looping only over the experts some token chose
    (``expert_mask.sum(dim=(-1, -2)).nonzero()``), with ``index_add_``;
    ``"sorted"``: DeepSeek-MoE's ``argsort`` of the flattened choices, per-expert counts through
    ``.tolist()`` and slices of the sorted tokens, then ``scatter`` back;
    ``"boolmask"``: boolean indexing ``x[mask]`` per expert and ``out[mask] += ...``.
    Returns ``(y, router_logits)`` with ``router_logits: [B*T, E]`` as Mixtral does."""

    def __init__(self, d: int = 16, f: int = 24, n_experts: int = 4, top_k: int = 2,
                 spelling: str = "hf", expert: type = None):
        super().__init__()
        self.E, self.k, self.spelling = n_experts, top_k, spelling
        expert = expert or Expert
        self.gate = nn.Linear(d, n_experts, bias=False)
        self.experts = nn.ModuleList([expert(d, f) for _ in range(n_experts)])

    def forward(self, hidden_states):
        B, T, D = hidden_states.shape
        hidden_states = hidden_states.view(-1, D)
        router_logits = F.linear(hidden_states, self.gate.weight)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected = torch.topk(routing_weights, self.k, dim=-1)
        routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        if self.spelling == "dense":
            dense = torch.zeros_like(router_logits).scatter(1, selected, routing_weights)
            out = sum(dense[:, e, None] * self.experts[e](hidden_states) for e in range(self.E))
            return out.reshape(B, T, D), router_logits
        final = torch.zeros((B * T, D), dtype=hidden_states.dtype, device=hidden_states.device)
        if self.spelling == "hit":
            expert_mask = F.one_hot(selected, num_classes=self.E).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
            for e in expert_hit:
                idx, top_x = torch.where(expert_mask[e].squeeze(0))
                cur = self.experts[int(e)](hidden_states[top_x]) * routing_weights[top_x, idx, None]
                final.index_add_(0, top_x, cur.to(hidden_states.dtype))
        elif self.spelling == "sorted":
            flat = selected.view(-1)
            order = flat.argsort()
            counts = torch.bincount(flat, minlength=self.E).tolist()
            sorted_tokens = hidden_states[order // self.k]
            outs, start = [], 0
            for e, n in enumerate(counts):
                if n:
                    outs.append(self.experts[e](sorted_tokens[start:start + n]))
                start += n
            out_sorted = torch.cat(outs, dim=0)
            back = torch.empty_like(out_sorted)
            back[order] = out_sorted
            final = (back.view(B * T, self.k, D) * routing_weights[..., None]).sum(dim=1)
        elif self.spelling == "boolmask":
            for e in range(self.E):
                mask = (selected == e).any(dim=-1)
                w = (routing_weights * (selected == e)).sum(dim=-1)
                final[mask] += self.experts[e](hidden_states[mask]) * w[mask, None]
        elif self.spelling == "hf":
            expert_mask = F.one_hot(selected, num_classes=self.E).permute(2, 1, 0)
            for e in range(self.E):
                idx, top_x = torch.where(expert_mask[e])
                current = hidden_states[None, top_x].reshape(-1, D)
                cur = self.experts[e](current) * routing_weights[top_x, idx, None]
                final.index_add_(0, top_x, cur.to(hidden_states.dtype))
        else:
            for e in range(self.E):
                top_x, idx = torch.where(selected == e)
                cur = self.experts[e](hidden_states[top_x]) * routing_weights[top_x, idx, None]
                final.index_add_(0, top_x, cur)
        return final.reshape(B, T, D), router_logits


def load_balancing_loss(router_logits, n_experts: int, top_k: int):
    """Switch / Mixtral auxiliary loss over all (flattened) tokens:
    ``E * sum_e mean_tokens(one_hot(selected)) * mean_tokens(router_prob)``."""
    routing_weights = F.softmax(router_logits, dim=-1)
    _, selected = torch.topk(routing_weights, top_k, dim=-1)
    expert_mask = F.one_hot(selected, n_experts)
    tokens_per_expert = torch.mean(expert_mask.float(), dim=0)
    router_prob_per_expert = torch.mean(routing_weights, dim=0)
    return torch.sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0)) * n_experts


class JambaMoEBlock(nn.Module):
    """A hybrid block: causal linear-attention mixer, then a routed MoE FFN; returns
    ``(h, aux_loss)`` (the aux loss is a mean over all tokens: a global value)."""

    def __init__(self, d: int = 16, heads: int = 2, spelling: str = "hf", expert: type = None):
        super().__init__()
        self.h = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.moe = SparseMoE(d, spelling=spelling, expert=expert)

    def forward(self, x):
        h = x + _causal_linear_attention(self.ln1(x), self.qkv, self.h)
        y, router_logits = self.moe(self.ln2(h))
        aux = load_balancing_loss(router_logits, self.moe.E, self.moe.k)
        return h + y, aux


class CenteringExpert(Expert):
    """An expert that centres its rows over the tokens it got (a reduction across rows): with
    the tokens split over ranks each rank sees only its part of them."""

    def forward(self, x):
        return super().forward(x - x.mean(dim=0, keepdim=True))


class MoELM(nn.Module):
    """Two hybrid blocks with MoE FFNs (an HF-style routed loop) over token ids, a summed
    auxiliary loss and a next-token cross-entropy: what a Jamba-style training step computes."""

    def __init__(self, vocab: int = 11, d: int = 16, spelling: str = "hf"):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([JambaMoEBlock(d, spelling=spelling) for _ in range(2)])
        self.head = nn.Linear(d, vocab)

    def forward(self, ids, labels):
        h, aux = self.emb(ids), 0.0
        for blk in self.blocks:
            h, a = blk(h)
            aux = aux + a
        logits = self.head(h)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return loss + 0.01 * aux, logits


# ---------------------------------------------------------------- 2. xLSTM mLSTM parallel form
def mlstm_parallel_stabilized(q, k, v, igate_preact, fgate_preact, eps: float = 1e-6,
                              form: str = "repeat"):
    """xLSTM's stabilised parallel mLSTM: ``[B, NH, S, DH]`` q/k/v, ``[B, NH, S, 1]`` gates.

    ``form="repeat"``: the reference spelling (cumsum with a leading 0 via ``cat``,
    ``repeat(1, 1, 1, S + 1)`` minus its transpose, ``[1:, 1:]``); ``"outer"``: the
    ``F[:, :, :, None] - F[:, :, None, :]`` spelling with a ``where(tril, ., -inf)`` mask."""
    B, NH, S, DH = q.shape
    log_fgates = F.logsigmoid(fgate_preact)
    ltr = torch.tril(torch.ones((S, S), dtype=torch.bool, device=q.device))
    if form == "repeat":
        cs = torch.cat([torch.zeros((B, NH, 1, 1), dtype=q.dtype, device=q.device),
                        torch.cumsum(log_fgates, dim=-2)], dim=-2)
        rep = cs.repeat(1, 1, 1, S + 1)
        _log_fg = rep - rep.transpose(-2, -1)
        log_fg = torch.where(ltr, _log_fg[:, :, 1:, 1:], -float("inf"))
    else:
        cs = torch.cumsum(log_fgates, dim=-2).squeeze(-1)
        log_fg = torch.where(ltr, cs[:, :, :, None] - cs[:, :, None, :], -float("inf"))
    log_D = log_fg + igate_preact.transpose(-2, -1)
    max_log_D, _ = torch.max(log_D, dim=-1, keepdim=True)
    D_matrix = torch.exp(log_D - max_log_D)
    qk = q @ (k / math.sqrt(DH)).transpose(-2, -1)
    C = qk * D_matrix
    normalizer = torch.maximum(C.sum(dim=-1, keepdim=True).abs(), torch.exp(-max_log_D))
    return (C / (normalizer + eps)) @ v


class MLSTMLayer(nn.Module):
    def __init__(self, d: int = 16, heads: int = 2, form: str = "repeat"):
        super().__init__()
        self.h, self.dh, self.form = heads, d // heads, form
        self.qkv = nn.Linear(d, 3 * d)
        self.igate = nn.Linear(3 * d, heads)
        self.fgate = nn.Linear(3 * d, heads)
        self.outnorm = nn.GroupNorm(heads, d)  # xLSTM's MultiHeadLayerNorm, on [B*T, D]
        self.o = nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        qkv = self.qkv(x)
        q, k, v = (t.view(B, T, self.h, self.dh).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        ig = self.igate(qkv).transpose(-1, -2).unsqueeze(-1)  # [B, NH, S, 1]
        fg = self.fgate(qkv).transpose(-1, -2).unsqueeze(-1) + 3.0
        h = mlstm_parallel_stabilized(q, k, v, ig, fg, form=self.form)
        h = h.transpose(1, 2).reshape(B * T, D)
        return self.o(self.outnorm(h).view(B, T, D))


# ---------------------------------------------------------------- 3. HGRN2 / RetNet spellings
class HGRN2Ellipsis(nn.Module):
    """HGRN2-like: forget gate ``g = logsigmoid``, input ``1 - exp(g)`` as key, decay mask
    ``exp(G_i - G_j)`` over the cumsum, einsums with an ellipsis and capital indices
    (``"...Id,...Jd->...IJ"``)."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.q = nn.Linear(d, d)
        self.f = nn.Linear(d, heads)
        self.i = nn.Linear(d, d)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        q = self.q(x).view(B, T, self.h, self.dh).transpose(1, 2)
        g = F.logsigmoid(self.f(x)).transpose(1, 2) / 8  # [B, H, T]
        k = (1 - torch.exp(g))[..., None] * torch.ones(self.dh)  # [B, H, T, dh]
        v = self.i(x).view(B, T, self.h, self.dh).transpose(1, 2)
        G = torch.cumsum(g, dim=-1)
        decay = torch.exp(G[..., :, None] - G[..., None, :]).tril()
        s = torch.einsum("...Id,...Jd->...IJ", q, k) * decay
        o = torch.einsum("...IJ,...Jd->...Id", s, v)
        return self.o(o.transpose(1, 2).reshape(B, T, D))


class RetNetBmm(nn.Module):
    """RetNet retention over merged batch·heads: ``reshape(B * H, T, d)``, ``torch.bmm`` with a
    ``γ^(i-j)`` decay mask, then ``GroupNorm(H, D)`` over heads on ``[B*T, D]`` (the Jamie
    Stirling RetNet spelling) and a swish gate."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.g = nn.Linear(d, d, bias=False)
        self.gn = nn.GroupNorm(heads, d)
        self.o = nn.Linear(d, d, bias=False)
        self.register_buffer("gammas", 1 - torch.exp(torch.linspace(math.log(1 / 32),
                                                                      math.log(1 / 512), heads)))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.h, self.dh).transpose(1, 2).reshape(B * self.h, T, self.dh)
                   for t in self.qkv(x).chunk(3, dim=-1))
        n = torch.arange(T).unsqueeze(1)
        m = torch.arange(T).unsqueeze(0)
        dmask = (self.gammas[:, None, None] ** (n - m)) * (n >= m).float()  # [H, T, T]
        dmask = dmask.repeat(B, 1, 1)  # [B*H, T, T]
        ret = torch.bmm(q, k.transpose(1, 2)) * dmask
        y = torch.bmm(ret, v).view(B, self.h, T, self.dh).transpose(1, 2).reshape(B * T, D)
        y = self.gn(y).view(B, T, D)
        return self.o(F.silu(self.g(x)) * y)


class GroupNormHeadsOverTime(nn.Module):
    """``F.group_norm`` on ``[B, H, T, d]`` with one group per head: per-head statistics over
    ``T × d`` (mixes tokens)."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        y = _causal_linear_attention(x, self.qkv, self.h)
        y = y.view(B, T, self.h, self.dh).transpose(1, 2)
        y = F.group_norm(y, self.h)
        return y.transpose(1, 2).reshape(B, T, D)


# ---------------------------------------------------------------- 4. DeltaNet
class DeltaNetRecurrent(nn.Module):
    """DeltaNet's reference recurrence ``S = S + β k (v - Sᵀk)ᵀ`` as a Python loop over tokens."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.b = nn.Linear(d, heads)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.h, self.dh).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        k = F.normalize(k, p=2, dim=-1)
        beta = torch.sigmoid(self.b(x)).transpose(1, 2)
        S = torch.zeros(B, self.h, self.dh, self.dh)
        o = torch.zeros_like(v)
        for i in range(T):
            k_i, v_i, q_i, b_i = k[:, :, i], v[:, :, i], q[:, :, i], beta[:, :, i]
            v_new = (v_i - (S * k_i[..., None]).sum(-2)) * b_i[..., None]
            S = S + k_i.unsqueeze(-1) * v_new.unsqueeze(-2)
            o[:, :, i] = torch.einsum("bhd,bhdm->bhm", q_i, S)
        return o.transpose(1, 2).reshape(B, T, D)


class DeltaNetSolve(nn.Module):
    """DeltaNet's whole-sequence parallel form (the UT/WY transform with one chunk):
    ``U = (I + tril(diag(β) K Kᵀ, -1))⁻¹ diag(β) V`` by ``solve_triangular``, then
    ``O = tril(Q Kᵀ) U``."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.b = nn.Linear(d, heads)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.h, self.dh).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        k = F.normalize(k, p=2, dim=-1)
        beta = torch.sigmoid(self.b(x)).transpose(1, 2)[..., None]  # [B, H, T, 1]
        A = torch.tril(beta * (k @ k.transpose(-1, -2)), diagonal=-1)
        eye = torch.eye(T, dtype=x.dtype, device=x.device)
        u = torch.linalg.solve_triangular(eye + A, beta * v, upper=False)
        o = (q @ k.transpose(-1, -2)).tril() @ u
        return o.transpose(1, 2).reshape(B, T, D)


# ---------------------------------------------------------------- 5. tied-embedding causal LM
class TiedCausalLM(nn.Module):
    """``forward(input_ids, labels)`` → ``(loss, logits)``: tied ``lm_head.weight =
    embed.weight``, ``logits.float()``, label-smoothed cross entropy.

    ``loss="sum_over_count"``: ``reduction="sum"`` divided by ``(labels != -100).sum()``
    (labels already shifted by the caller, -100 marks ignored tokens); ``"mean"``: the default
    mean reduction with ``label_smoothing``; ``"shift"``: HF's in-forward shift with
    ``label_smoothing``."""

    def __init__(self, vocab: int = 11, d: int = 16, heads: int = 2, loss: str = "sum_over_count",
                 smoothing: float = 0.1):
        super().__init__()
        self.vocab, self.h, self.loss, self.ls = vocab, heads, loss, smoothing
        self.embed = nn.Embedding(vocab, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, input_ids, labels):
        h = self.embed(input_ids)
        h = h + _causal_linear_attention(h, self.qkv, self.h)
        logits = self.lm_head(self.norm(h)).float()
        if self.loss == "sum_over_count":
            loss = F.cross_entropy(logits.view(-1, self.vocab), labels.view(-1),
                                   ignore_index=-100, reduction="sum",
                                   label_smoothing=self.ls)
            loss = loss / (labels != -100).sum()
        elif self.loss == "mean":
            loss = F.cross_entropy(logits.view(-1, self.vocab), labels.view(-1),
                                   label_smoothing=self.ls)
        else:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, self.vocab),
                                   labels[:, 1:].reshape(-1), label_smoothing=self.ls)
        return loss, logits


# ---------------------------------------------------------------- 6. position_ids
def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class LlamaRotary(nn.Module):
    """HF ``LlamaRotaryEmbedding.forward(x, position_ids)``: ``inv_freq[None, :, None]`` times
    ``position_ids[:, None, :]`` by matmul, ``cat((freqs, freqs))``, cos/sin."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x, position_ids):
        inv = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        pos = position_ids[:, None, :].float()
        freqs = (inv @ pos).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class HFLlamaPositionIds(nn.Module):
    """HF Llama attention with RoPE from ``position_ids``.

    ``where="input"``: ``forward(x, position_ids)`` (the caller builds
    ``arange(T).unsqueeze(0)`` and shards it like the tokens); ``"cache_position"``: built
    inside as ``cache_position = arange(past, past + T)``, ``position_ids =
    cache_position.unsqueeze(0)``, and the causal mask from
    ``arange(T) > cache_position.reshape(-1, 1)`` (HF's ``_update_causal_mask``) to SDPA."""

    def __init__(self, d: int = 16, heads: int = 2, where: str = "input"):
        super().__init__()
        self.h, self.dh, self.where = heads, d // heads, where
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.rotary_emb = LlamaRotary(self.dh)

    def forward(self, x, position_ids=None):
        B, T, D = x.shape
        mask = None
        if position_ids is None:
            past = 0
            cache_position = torch.arange(past, past + T, device=x.device)
            position_ids = cache_position.unsqueeze(0)
            min_dtype = torch.finfo(x.dtype).min
            mask = torch.full((T, T), fill_value=min_dtype, dtype=x.dtype, device=x.device)
            mask = torch.triu(mask, diagonal=1)
            mask = mask * (torch.arange(T, device=x.device) > cache_position.reshape(-1, 1))
            mask = mask[None, None, :, :].expand(B, 1, -1, -1)
        q = self.q_proj(x).view(B, T, self.h, self.dh).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.h, self.dh).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.h, self.dh).transpose(1, 2)
        cos, sin = self.rotary_emb(v, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = (q * cos) + (rotate_half(q) * sin)
        k = (k * cos) + (rotate_half(k) * sin)
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, D))


# ---------------------------------------------------------------- 7. other hybrid pieces
class NormalizeDefaultDim(nn.Module):
    """``F.normalize(x)`` on ``[B, T, D]`` with the DEFAULT ``dim=1``: normalises each channel
    over the sequence (a global reduction)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return F.normalize(self.lin(x))


class UnfoldLocalAttention(nn.Module):
    """Local (sliding-window) attention with ``F.pad`` + ``x.unfold(1, w, 1)`` windows: each
    query attends to itself and the ``w - 1`` previous tokens."""

    def __init__(self, d: int = 16, w: int = 4):
        super().__init__()
        self.w = w
        self.qkv = nn.Linear(d, 3 * d, bias=False)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        kp = F.pad(k, (0, 0, self.w - 1, 0)).unfold(1, self.w, 1)  # [B, T, D, w]
        vp = F.pad(v, (0, 0, self.w - 1, 0)).unfold(1, self.w, 1)
        s = torch.einsum("btd,btdw->btw", q, kp) / math.sqrt(q.shape[-1])
        return torch.einsum("btw,btdw->btd", s.softmax(-1), vp)


class BatchNormConvModule(nn.Module):
    """Conformer's convolution module: pointwise conv + GLU, causal depthwise conv,
    ``BatchNorm1d`` (training mode: statistics over batch AND sequence), swish, pointwise."""

    def __init__(self, d: int = 16, k: int = 3):
        super().__init__()
        self.pw1 = nn.Conv1d(d, 2 * d, 1)
        self.dw = nn.Conv1d(d, d, k, padding=k - 1, groups=d, bias=False)  # BN follows
        self.bn = nn.BatchNorm1d(d)
        self.pw2 = nn.Conv1d(d, d, 1)

    def forward(self, x):
        T = x.shape[1]
        h = F.glu(self.pw1(x.transpose(1, 2)), dim=1)
        h = self.dw(h)[..., :T]
        h = F.silu(self.bn(h))
        return self.pw2(h).transpose(1, 2)


class ChunkMeanPool(nn.Module):
    """Hourglass-style shortening: ``reshape(B, T // 2, 2, D).mean(2)`` then upsampling with
    ``repeat_interleave(2, dim=1)`` (token-local when the shard length is even)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        s = self.lin(x).reshape(B, T // 2, 2, D).mean(2)
        return x + s.repeat_interleave(2, dim=1)


# ---------------------------------------------------------------- 8. graph breaks
class BreakBetweenHeads(nn.Module):
    """A graph break (``print``) between the projections and the attention: the values that
    cross it are ``[B, H, T, d]`` (sequence on dim 2), not ``[B, T, ...]``."""

    def __init__(self, d: int = 16, heads: int = 4):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.h, self.dh).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        q, k = F.elu(q) + 1, F.elu(k) + 1
        print("", end="")
        a = (q @ k.transpose(-1, -2)) * torch.tril(torch.ones(T, T))
        return (a @ v).transpose(1, 2).reshape(B, T, D)


class BreakAfterScores(nn.Module):
    """A graph break between the ``T×T`` scores and their use: the scores themselves cross it."""

    def __init__(self, d: int = 16, heads: int = 2, softmax: bool = False):
        super().__init__()
        self.h, self.dh, self.softmax = heads, d // heads, softmax
        self.qkv = nn.Linear(d, 3 * d, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.h, self.dh).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        s = q @ k.transpose(-1, -2)
        print("", end="")
        if self.softmax:
            s = s / math.sqrt(self.dh) + torch.triu(torch.full((T, T), float("-inf")), 1)
            a = torch.softmax(s, dim=-1)
        else:
            a = s * torch.tril(torch.ones(T, T))
        return (a @ v).transpose(1, 2).reshape(B, T, D)


class BreakBetweenLosses(nn.Module):
    """``(h, loss)``: a global loss from the first graph crosses a graph break and is added to
    a second one (an auxiliary loss after a data-dependent branch)."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.h = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        h = _causal_linear_attention(x, self.qkv, self.h)
        loss = h.square().mean()
        if loss > 1e6:  # a data-dependent branch: a graph break
            loss = loss * 0
        h2 = torch.tanh(self.lin(h))
        return h2, loss + h2.mean()


class BreakThenClassify(nn.Module):
    """Sequence classification whose ``labels: [B]`` (not sequence-shaped, the same on every
    rank) are first used after a graph break: ``forward(x, labels)`` → ``(h, loss)``."""

    def __init__(self, d: int = 16, heads: int = 2, classes: int = 3):
        super().__init__()
        self.h = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.cls = nn.Linear(d, classes)

    def forward(self, x, labels):
        h = _causal_linear_attention(x, self.qkv, self.h)
        if h.abs().max() > 1e6:  # a data-dependent branch: a graph break
            h = h * 0
        return h, F.cross_entropy(self.cls(h.mean(1)), labels)


class UnpadTokens(nn.Module):
    """flash-attn / HF ``unpad_input`` style: keep the tokens of a boolean mask
    (``h.view(-1, D)[mask.flatten()]``, a data-dependent shape: a graph break) and return their
    mean with the hidden states."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        h = torch.tanh(self.lin(x))
        keep = h[..., 0] > 0
        picked = h.reshape(-1, D)[keep.flatten()]
        return h, picked.square().mean()


class TileSequence(nn.Module):
    """``x.repeat(1, 2, 1)`` tiles the sequence (``[x; x]``), then a causal cumsum over it."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        T = x.shape[1]
        y = self.lin(x).repeat(1, 2, 1).cumsum(1)
        return y[:, :T] + y[:, T:]
