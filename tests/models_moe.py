"""MoE expert dispatch that permutes tokens (tests/test_moe_dist.py, tests/test_moe_plan.py).

Hand-written spellings of the family *sort the (token, choice) rows by expert → run the experts
row by row (grouped matmuls over contiguous groups, or per-row weights) → put the rows back in
token order*, as transformers 5 (``grouped_mm_experts_forward``, ``batched_mm_experts_forward``),
torchtitan and Megablocks write it; the spellings that really combine tokens and must be refused
(capacity limits, expert choice, slicing or splitting the sorted rows, ...); and tiny configs of
real HF MoE models (``hf_causal_lm``; skipped where transformers is not importable).

Every hand-written model takes ``x: [B, T, D]`` and returns ``x + moe(x)`` (and, for some, a
global auxiliary loss).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def hf_grouped_mm_fallback():
    """transformers' CPU grouped matmul (``torch.ops.transformers.grouped_mm_fallback``), or None
    when transformers is not importable."""
    try:
        import transformers.integrations.moe  # noqa: F401  (registers the custom op)
    except Exception:  # noqa: BLE001 - no transformers: those spellings are skipped
        return None
    return torch.ops.transformers.grouped_mm_fallback


def _inverse(perm):
    """HF's inverse permutation: ``inv[perm] = arange(n)``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.size(0), device=perm.device)
    return inv


class SortedMoE(nn.Module):
    """Top-k routed SwiGLU experts over the flattened ``[B*T, D]`` tokens, dispatched by sorting
    the ``[B*T*k]`` (token, choice) rows by expert. ``spelling`` picks how (see ``forward``)."""

    def __init__(self, d: int = 32, f: int = 48, n_experts: int = 4, top_k: int = 2,
                 spelling: str = "hf", capacity: int = 8):
        super().__init__()
        self.E, self.k, self.f, self.spelling, self.capacity = n_experts, top_k, f, spelling, \
            capacity
        self.mix = nn.Linear(d, d)
        self.router = nn.Linear(d, n_experts, bias=False)
        g = torch.Generator().manual_seed(1)
        self.gate_up = nn.Parameter(torch.randn(n_experts, 2 * f, d, generator=g) * d ** -0.5)
        self.down = nn.Parameter(torch.randn(n_experts, d, f, generator=g) * f ** -0.5)
        self.up_bias = nn.Parameter(0.1 * torch.randn(n_experts, 2 * f, generator=g))

    # -------------------------------------------------------------- shared pieces
    def route(self, h):
        logits = F.linear(h, self.router.weight)
        probs = F.softmax(logits.float(), dim=-1)
        w, ids = torch.topk(probs, self.k, dim=-1)
        return probs, w / w.sum(dim=-1, keepdim=True), ids

    def swiglu(self, gu):
        gate, up = gu.chunk(2, dim=-1)
        return F.silu(gate) * up

    def grouped(self, xs, offs, op=None):
        """Both expert matmuls over sorted rows ``xs`` with group ends ``offs``."""
        op = op or hf_grouped_mm_fallback()
        gu = op(xs, self.gate_up.transpose(-2, -1), offs=offs)
        return op(self.swiglu(gu), self.down.transpose(-2, -1), offs=offs)

    def per_row(self, xs, ids):
        """Both expert matmuls with each row's own weights (``weight[ids]`` + bmm)."""
        gu = torch.bmm(self.gate_up[ids], xs.unsqueeze(-1)).squeeze(-1)
        return torch.bmm(self.down[ids], self.swiglu(gu).unsqueeze(-1)).squeeze(-1)

    def forward(self, x):
        B, T, D = x.shape
        h = self.mix(x).reshape(-1, D)
        probs, w, ids = self.route(h)
        y = getattr(self, "_" + self.spelling)(h, w, ids)
        out = x + y.reshape(B, T, D)
        if self.spelling in ("hf", "centered"):
            return out, self.aux(probs, ids)
        return out

    def aux(self, probs, ids):
        """Switch-style load balancing from histc counts of the token-order ids (a global value:
        the counts are summed over ranks where used as values)."""
        counts = torch.histc(ids.reshape(-1).float(), bins=self.E, min=0, max=self.E - 1)
        return self.E * (counts / counts.sum() * probs.mean(dim=0)).sum()

    # -------------------------------------------------------------- exact spellings
    def _hf(self, h, w, ids):
        """transformers 5's grouped_mm_experts_forward, line by line (CPU fallback op)."""
        k, N, D = self.k, h.shape[0], h.shape[1]
        expert_ids_g, perm = torch.sort(ids.reshape(-1))
        xs = h[perm // k]
        ws = w.reshape(-1)[perm]
        counts = torch.histc(expert_ids_g.float(), bins=self.E, min=0, max=self.E - 1)
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        op = hf_grouped_mm_fallback()
        gu = op(xs, self.gate_up.transpose(-2, -1), offs=offsets)
        gu.add_(self.up_bias[expert_ids_g])  # HF's per-row bias: bias[sorted ids]
        y = op(self.swiglu(gu), self.down.transpose(-2, -1), offs=offsets)
        y = (y * ws.unsqueeze(-1))[_inverse(perm)]
        return y.view(N, k, D).sum(dim=1)

    def _grouped_bf16(self, h, w, ids):
        """F.grouped_mm in bf16 (the kernel HF calls for bf16 weights), torch.sort(stable=True),
        the choice rows combined by index_add_ into zeros by perm // k."""
        k, N, D = self.k, h.shape[0], h.shape[1]
        sid, perm = torch.sort(ids.view(-1), stable=True)
        xs = h[perm // k].to(torch.bfloat16)
        offs = torch.cumsum(torch.histc(sid.float(), bins=self.E, min=0, max=self.E - 1),
                            dim=0).to(torch.int32)
        gu = F.grouped_mm(xs, self.gate_up.to(torch.bfloat16).transpose(-2, -1), offs=offs)
        y = torch._grouped_mm(self.swiglu(gu), self.down.to(torch.bfloat16).transpose(-2, -1),
                              offs=offs).float()
        out = torch.zeros(N, D, dtype=y.dtype, device=y.device)
        out.index_add_(0, perm // k, y * w.view(-1)[perm, None])
        return out

    def _argsort_bmm(self, h, w, ids):
        """argsort(stable=True), index_select, per-row expert weights of the sorted ids + bmm,
        out[perm] = y into empty_like, then the weighted sum over the k choices."""
        k, N, D = self.k, h.shape[0], h.shape[1]
        flat = ids.view(-1)
        perm = flat.argsort(stable=True)
        xs = torch.index_select(h, 0, perm // k)
        y = self.per_row(xs, flat[perm])
        out = torch.empty_like(y)
        out[perm] = y
        return (out.view(N, k, D) * w.unsqueeze(-1)).sum(dim=1)

    def _gather_scatter(self, h, w, ids):
        """gather by an expanded index, the grouped op, scatter back by the expanded index."""
        k, N, D = self.k, h.shape[0], h.shape[1]
        perm = torch.argsort(ids.reshape(-1))
        xs = h.gather(0, (perm // k).unsqueeze(-1).expand(-1, D))
        offs = torch.histc(ids.reshape(-1).float(), bins=self.E, min=0,
                           max=self.E - 1).cumsum(0).int()  # counts of the unsorted ids
        y = self.grouped(xs, offs)
        back = torch.zeros_like(y).scatter(0, perm.unsqueeze(-1).expand(-1, D), y)
        return (back.view(N, k, D) * w[..., None]).sum(dim=1)

    def _index_copy(self, h, w, ids):
        """x[perm // k] then index_copy back, weights of the sorted rows by w.view(-1)[perm]."""
        k, N, D = self.k, h.shape[0], h.shape[1]
        sid, perm = ids.view(-1).sort()
        offs = torch.cumsum(torch.histc(sid.float(), bins=self.E, min=0, max=self.E - 1), 0,
                            dtype=torch.int32)
        y = self.grouped(h[perm // k], offs) * w.view(-1)[perm].unsqueeze(1)
        return torch.zeros_like(y).index_copy(0, perm, y).view(N, k, D).sum(1)

    def _argsort_inverse(self, h, w, ids):
        """y[argsort(perm)]: the inverse permutation as an argsort."""
        k, N, D = self.k, h.shape[0], h.shape[1]
        sid, perm = torch.sort(ids.reshape(-1))
        offs = torch.cumsum(torch.histc(sid.float(), bins=self.E, min=0, max=self.E - 1), 0,
                            dtype=torch.int32)
        y = self.grouped(h[perm // k], offs)
        y = y[torch.argsort(perm)]
        return (y.view(N, k, D) * w.unsqueeze(-1)).sum(dim=1)

    def _scatter_add(self, h, w, ids):
        """scatter_add_ of the weighted sorted rows into zeros by (perm // k) expanded; a
        per-row RMS norm on the sorted rows (HF's post-expert norm)."""
        k, N, D = self.k, h.shape[0], h.shape[1]
        sid, perm = torch.sort(ids.reshape(-1))
        offs = torch.cumsum(torch.histc(sid.float(), bins=self.E, min=0, max=self.E - 1), 0,
                            dtype=torch.int32)
        y = F.rms_norm(self.grouped(h[perm // k], offs), (D,))
        y = y * w.reshape(-1)[perm].unsqueeze(-1)
        out = torch.zeros(N, D, dtype=y.dtype, device=y.device)
        return out.scatter_add_(0, (perm // k).unsqueeze(-1).expand(-1, D), y)

    def _namedtuple(self, h, w, ids):
        """``.sort(stable=True).indices / .values``, ``torch.div(perm, k, rounding_mode=
        "floor")``, the inverse by ``scatter_(0, perm, arange)``, back by index_select."""
        k, N, D = self.k, h.shape[0], h.shape[1]
        r = ids.reshape(-1).sort(stable=True)
        perm = r.indices
        xs = h[torch.div(perm, k, rounding_mode="floor")]
        y = self.per_row(xs, r.values) * w.reshape(-1)[perm][:, None]
        inv = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel()))
        return y.index_select(0, inv).view(N, k, D).sum(1)

    def _scatter_add_as(self, h, w, ids):
        """``argsort(dim=0)``, back by ``zeros_like(sorted rows).scatter_add`` with
        ``perm[:, None].expand_as(y)``."""
        k, N, D = self.k, h.shape[0], h.shape[1]
        perm = torch.argsort(ids.view(-1), dim=0)
        y = self.per_row(h[perm // k], ids.view(-1)[perm])
        out = torch.zeros_like(y).scatter_add(0, perm[:, None].expand_as(y), y)
        return (out.view(N, k, D) * w[..., None]).sum(1)

    def _index_put(self, h, w, ids):
        """The weight of each sorted row by ``w[perm // k, perm % k]``, the choices summed by
        ``index_put_((perm // k,), y, accumulate=True)`` into ``new_zeros``."""
        k, N, D = self.k, h.shape[0], h.shape[1]
        sid, perm = torch.sort(ids.reshape(-1))
        y = self.per_row(h[perm // k], sid) * w[perm // k, perm % k].unsqueeze(-1)
        out = h.new_zeros(N, D)
        out.index_put_((perm // k,), y, accumulate=True)
        return out

    def _batched(self, h, w, ids):
        """transformers 5's batched_mm_experts_forward: repeat_interleave, weight[expert_ids],
        bmm, view(N, k, D).sum(1) (no sort at all)."""
        k, N, D = self.k, h.shape[0], h.shape[1]
        xs = h.repeat_interleave(k, dim=0)
        y = self.per_row(xs, ids.reshape(-1)) * w.reshape(-1).unsqueeze(-1)
        return y.view(N, k, D).sum(dim=1)

    def _centered(self, h, w, ids):
        """The sorted rows minus their mean over all rows: a global value (the mean over every
        rank's rows is all-reduced), the same in any order."""
        k, N, D = self.k, h.shape[0], h.shape[1]
        sid, perm = torch.sort(ids.reshape(-1))
        offs = torch.cumsum(torch.histc(sid.float(), bins=self.E, min=0, max=self.E - 1), 0,
                            dtype=torch.int32)
        y = self.grouped(h[perm // k], offs)
        y = y - y.mean(dim=0, keepdim=True)
        return (y[_inverse(perm)].view(N, k, D) * w.unsqueeze(-1)).sum(dim=1)

    # -------------------------------------------------------------- refused spellings
    def _capacity(self, h, w, ids):
        """A capacity limit by rank among the sorted rows of each expert (GShard-style token
        dropping): which rows survive depends on every rank's rows."""
        k, N, D = self.k, h.shape[0], h.shape[1]
        sid, perm = torch.sort(ids.reshape(-1))
        counts = torch.histc(sid.float(), bins=self.E, min=0, max=self.E - 1)
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        start = (offs - counts.int())[sid]
        rank = torch.arange(sid.shape[0], device=h.device) - start
        y = self.grouped(h[perm // k], offs) * (rank < self.capacity).unsqueeze(-1)
        return y[_inverse(perm)].view(N, k, D).sum(1)

    def _switch_capacity(self, h, w, ids):
        """Switch Transformer's capacity in token order: position of each token in its expert's
        queue is a cumsum over all tokens."""
        mask = F.one_hot(ids[:, 0], self.E)
        pos = torch.cumsum(mask, dim=0) * mask
        keep = ((pos > 0) & (pos <= self.capacity)).any(dim=-1)
        return self._batched(h, w, ids) * keep.unsqueeze(-1)

    def _expert_choice(self, h, w, ids):
        """Expert-choice routing: each expert picks its top tokens over the token axis."""
        probs = F.softmax(F.linear(h, self.router.weight), dim=-1)
        g, tok = torch.topk(probs.t(), self.capacity, dim=-1)  # [E, C] over all tokens
        out = torch.zeros_like(h)
        for e in range(self.E):
            ye = self.swiglu(h[tok[e]] @ self.gate_up[e].t()) @ self.down[e].t()
            out = out.index_add(0, tok[e], ye * g[e].unsqueeze(-1))
        return out

    def _slice_sorted(self, h, w, ids):
        """Only the first ``capacity`` sorted rows are computed (a global cut of the order)."""
        k, N, D = self.k, h.shape[0], h.shape[1]
        sid, perm = torch.sort(ids.reshape(-1))
        y = self.per_row(h[perm // k], sid)
        y = torch.cat([y[:self.capacity], torch.zeros_like(y[self.capacity:])], dim=0)
        return y[_inverse(perm)].view(N, k, D).sum(1)

    def _perm_arith(self, h, w, ids):
        """Arithmetic on the row numbers (the neighbour of each sorted row)."""
        k, N, D = self.k, h.shape[0], h.shape[1]
        sid, perm = torch.sort(ids.reshape(-1))
        xs = h[((perm + 1) % perm.shape[0]) // k]
        y = self.per_row(xs, sid)
        return y[_inverse(perm)].view(N, k, D).sum(1)

    def _descending(self, h, w, ids):
        """A grouped matmul over rows sorted in descending order (its groups are ascending)."""
        k, N, D = self.k, h.shape[0], h.shape[1]
        sid, perm = torch.sort(ids.reshape(-1), descending=True)
        offs = torch.cumsum(torch.histc(sid.float(), bins=self.E, min=0, max=self.E - 1), 0,
                            dtype=torch.int32)
        y = self.grouped(h[perm // k], offs)
        return y[_inverse(perm)].view(N, k, D).sum(1)

    def _reshape_sorted(self, h, w, ids):
        """The sorted rows regrouped k at a time (as if they were in token order)."""
        k, N, D = self.k, h.shape[0], h.shape[1]
        sid, perm = torch.sort(ids.reshape(-1))
        y = self.per_row(h[perm // k], sid)
        return y.view(N, k, D).sum(1)

    def _megablocks(self, h, w, ids):
        """torchtitan / Megablocks without a grouped kernel: counts through .tolist() (a graph
        break), torch.split of the sorted rows, one matmul per expert, cat, unsort."""
        k, N, D = self.k, h.shape[0], h.shape[1]
        flat = ids.reshape(-1)
        perm = torch.argsort(flat, stable=True)
        xs = h[perm // k]
        counts = torch.histc(flat.float(), bins=self.E, min=0, max=self.E - 1).int().tolist()
        outs = []
        for e, xe in enumerate(torch.split(xs, counts, dim=0)):
            outs.append(self.swiglu(xe @ self.gate_up[e].t()) @ self.down[e].t())
        y = torch.cat(outs, dim=0) * w.reshape(-1)[perm].unsqueeze(-1)
        out = torch.empty_like(y)
        out[perm] = y
        return out.view(N, k, D).sum(1)

    def _bincount(self, h, w, ids):
        """Group offsets from torch.bincount (Dynamo breaks the graph there: its length is
        data-dependent)."""
        k, N, D = self.k, h.shape[0], h.shape[1]
        flat = ids.reshape(-1)
        perm = flat.argsort(stable=True)
        offs = torch.cumsum(torch.bincount(flat, minlength=self.E), 0, dtype=torch.int32)
        y = self.grouped(h[perm // k], offs)
        return y[torch.argsort(perm)].view(N, k, D).sum(1)


class ReturnsSorted(SortedMoE):
    """Returns the sorted rows themselves (never put back in token order)."""

    def forward(self, x):
        h = self.mix(x).reshape(-1, x.shape[-1])
        _, _, ids = self.route(h)
        sid, perm = torch.sort(ids.reshape(-1))
        return self.per_row(h[perm // self.k], sid)


class CustomGroupedOp(SortedMoE):
    """A grouped matmul spcompile does not know (a user's custom op): refused, not guessed."""

    def grouped(self, xs, offs, op=None):
        return super().grouped(xs, offs, op=_user_grouped_mm)


@torch.library.custom_op("spcompile_tests::user_grouped_mm", mutates_args=())
def _user_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    out, start = [], 0
    for i, end in enumerate(offs.tolist()):
        out.append(x[start:end] @ w[i])
        start = end
    return torch.cat(out, dim=0)


@_user_grouped_mm.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[2])


# ---------------------------------------------------------------- real HF models
HF_ARCHS = ("mixtral", "qwen2_moe", "olmoe", "jamba")


def hf_config(arch: str, **over):
    """A tiny config (hidden 32, 2 layers, 4 experts, top-2), dropouts 0, no KV cache, the
    router's aux loss on."""
    import transformers as tf
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  use_cache=False, attention_dropout=0.0, output_router_logits=True,
                  router_aux_loss_coef=0.02, num_experts_per_tok=2)
    if arch == "mixtral":
        cfg = tf.MixtralConfig(num_local_experts=4, **common)
    elif arch == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(num_experts=4, moe_intermediate_size=24,
                                shared_expert_intermediate_size=48, decoder_sparse_step=1,
                                norm_topk_prob=True, mlp_only_layers=[], **common)
    elif arch == "olmoe":
        cfg = tf.OlmoeConfig(num_experts=4, **common)
    elif arch == "jamba":
        # attention-only layers with MoE FFNs in both: the MoE part is what is tested (Jamba's
        # mamba mixer, use_mamba_kernels=False, is a Python loop over tokens; see test_moe_dist)
        cfg = tf.JambaConfig(num_experts=4, use_mamba_kernels=False, attn_layer_period=1,
                             attn_layer_offset=0, expert_layer_period=1, expert_layer_offset=0,
                             **common)
    else:
        raise ValueError(arch)
    for key, v in over.items():
        setattr(cfg, key, v)
    return cfg


def hf_causal_lm(arch: str, impl: str, **over):
    import transformers as tf
    cls = {"mixtral": tf.MixtralForCausalLM, "qwen2_moe": tf.Qwen2MoeForCausalLM,
           "olmoe": tf.OlmoeForCausalLM, "jamba": tf.JambaForCausalLM}[arch]
    torch.manual_seed(0)
    model = cls(hf_config(arch, **over))
    model.set_experts_implementation(impl)
    return model.train()


class HFLM(nn.Module):
    """``(loss, logits)`` of an HF causal LM from ``inputs_embeds`` (a float input, so input
    gradients are checked) with ``labels=`` and an optional ``attention_mask``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, embeds, labels, attention_mask=None):
        out = self.model(inputs_embeds=embeds, labels=labels, attention_mask=attention_mask)
        return out.loss, out.logits


class HFMoEBlock(nn.Module):
    """An HF sparse-MoE block (``MixtralSparseMoeBlock``, ``Qwen2MoeSparseMoeBlock``...) after a
    token-local projection, without HF's attention masks: the experts' code is what runs."""

    def __init__(self, arch: str, impl: str):
        super().__init__()
        lm = hf_causal_lm(arch, impl)
        self.proj = nn.Linear(32, 32)
        self.moe = lm.model.layers[0].mlp if arch != "jamba" else lm.model.layers[0].feed_forward

    def forward(self, x):
        return x + self.moe(self.proj(x))
