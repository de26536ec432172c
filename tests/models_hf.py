"""Real HF transformers models from tiny configs (no download): what users compile.

``make(name)`` builds a model in training mode with every dropout at 0 (the checks compare
against an eager run); ``LM`` wraps it as ``(ids[, labels]) -> logits`` or ``(loss, logits)``
with transformers' own loss. Names: decoders whose attention goes through transformers 5's
``masking_utils`` (llama with SDPA and eager attention, gpt2, mistral with a sliding window,
gpt_neox), SSMs (mamba and falcon_mamba with ``use_associative_scan``, mamba2's chunk scan),
hybrids (bamba: mamba2 + attention; lfm2: short convs + attention; jamba: mamba + attention +
MoE), and bloom (ALiBi, a
custom ``autograd.Function`` GeLU in training).
"""
from __future__ import annotations

import torch
import torch.nn as nn

V = 32


def make(name: str) -> nn.Module:
    import transformers as tf
    common = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=256, use_cache=False)
    if name in ("llama", "llama_eager"):
        cfg = tf.LlamaConfig(**common, num_key_value_heads=2)
        cfg._attn_implementation = "sdpa" if name == "llama" else "eager"
        m = tf.LlamaForCausalLM(cfg)
    elif name == "gpt2":
        m = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4,
                                             n_positions=256, use_cache=False))
    elif name == "mistral_swa":
        m = tf.MistralForCausalLM(tf.MistralConfig(**common, num_key_value_heads=2,
                                                   sliding_window=8))
    elif name == "gpt_neox":
        m = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**common))
    elif name in ("mamba", "falcon_mamba"):
        kw = dict(vocab_size=V, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                  conv_kernel=4, use_cache=False)
        m = tf.MambaForCausalLM(tf.MambaConfig(**kw)) if name == "mamba" else \
            tf.FalconMambaForCausalLM(tf.FalconMambaConfig(**kw))
    elif name == "mamba2":
        m = tf.Mamba2ForCausalLM(tf.Mamba2Config(
            vocab_size=V, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
            conv_kernel=4, num_heads=8, head_dim=8, n_groups=1, chunk_size=8, use_cache=False))
    elif name == "bamba":
        m = tf.BambaForCausalLM(tf.BambaConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=48, mamba_n_heads=8, mamba_d_head=8,
            mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
            mamba_chunk_size=8, attn_layer_indices=[1], use_cache=False))
    elif name == "jamba":
        m = tf.JambaForCausalLM(tf.JambaConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=48, num_experts=2, num_experts_per_tok=1,
            expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2,
            attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
            use_mamba_kernels=False, use_cache=False))
    elif name == "lfm2":
        m = tf.Lfm2ForCausalLM(tf.Lfm2Config(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=48, max_position_embeddings=256,
            use_cache=False, layer_types=["conv", "full_attention"]))
    elif name == "bloom":
        m = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2,
                                               n_head=4, use_cache=False))
    else:
        raise KeyError(name)
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    for k, v in list(vars(m.config).items()):
        if "dropout" in k and isinstance(v, float):
            setattr(m.config, k, 0.0)
    return m.train()


class LM(nn.Module):
    """``(ids) -> logits``, or with ``labels`` HF's own causal-LM loss: ``(loss, logits)``."""

    def __init__(self, name: str):
        super().__init__()
        self.m = make(name)

    def forward(self, ids, labels=None):
        out = self.m(input_ids=ids, labels=labels, use_cache=False)
        return out.logits if labels is None else (out.loss, out.logits)
