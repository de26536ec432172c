"""Worker-side checks for tests/test_hf_dist.py: real HF transformers models (tests/models_hf.py)
sharded on gloo ranks against their full-sequence eager run, each in its outcome class
(tests/_outcomes.py): logits, summed parameter gradients and — with ``labels`` — transformers'
own causal-LM loss (``F.pad(labels, (0, 1), value=-100)[..., 1:]`` into a mean cross entropy).
"""
from __future__ import annotations

import torch

import models_hf as H
from _outcomes import exact, gathered

# the SSM mixers' softplus trips torch 2.13's aot_eager on its backward (an upstream meta-stride
# bug, also without spcompile): the "eager" delegate for those
EAGER = {"compiler": "eager"}


def _ids(B, T, labels=False):
    def make():
        ids = torch.randint(0, H.V, (B, T))
        return [ids, torch.randint(0, H.V, (B, T))] if labels else [ids]
    return make


def check_attention_lms(rank, P, rec):
    """transformers 5 builds the causal mask in masking_utils (packed-sequence detection by
    diff/cumsum of the positions, advanced indexing at arange positions, expand to the local
    sizes): the attention family must still see a causal SDPA, with nothing gathered."""
    exact(rank, P, rec, "HF Llama (SDPA) + its loss", lambda: H.LM("llama"),
          _ids(2, 32, labels=True), kinds={"attention", "positions", "halo", "reduction"})
    exact(rank, P, rec, "HF Llama (eager attention)", lambda: H.LM("llama_eager"), _ids(2, 32),
          kinds={"attention", "positions"})
    exact(rank, P, rec, "HF GPT-2 (Conv1D addmm, learned positions)", lambda: H.LM("gpt2"),
          _ids(2, 32), kinds={"attention", "positions"})
    exact(rank, P, rec, "HF Mistral, sliding window 8", lambda: H.LM("mistral_swa"),
          _ids(2, 32), kinds={"attention", "positions"})
    exact(rank, P, rec, "HF GPT-NeoX (partial rotary)", lambda: H.LM("gpt_neox"), _ids(2, 32),
          kinds={"attention", "positions"})
    gathered(rank, P, rec, "HF Bloom (ALiBi in eager attention; GeLU autograd.Function)",
             lambda: H.LM("bloom"), _ids(2, 32), ops=("matmul",), file="modeling_bloom.py")


def check_ssm_lms(rank, P, rec):
    exact(rank, P, rec, "HF Mamba (associative_scan) + its loss", lambda: H.LM("mamba"),
          _ids(2, 32, labels=True), kinds={"cumsum", "halo", "reduction"}, **EAGER)
    exact(rank, P, rec, "HF FalconMamba", lambda: H.LM("falcon_mamba"), _ids(2, 32),
          kinds={"cumsum", "halo"}, **EAGER)
    exact(rank, P, rec, "HF Mamba2 (chunk scan)", lambda: H.LM("mamba2"), _ids(2, 32),
          kinds={"linear_scan", "halo"}, **EAGER)
    exact(rank, P, rec, "HF Bamba (mamba2 + attention)", lambda: H.LM("bamba"), _ids(2, 32),
          kinds={"linear_scan", "halo", "attention"}, **EAGER)
    exact(rank, P, rec, "HF LFM2 (short conv + attention)", lambda: H.LM("lfm2"), _ids(2, 32),
          kinds={"halo", "attention"})
    exact(rank, P, rec, "HF Jamba (mamba + attention + MoE)", lambda: H.LM("jamba"),
          _ids(2, 32), kinds={"cumsum", "halo", "attention", "dispatch"}, **EAGER)


def check_p4(rank, P, rec):
    exact(rank, P, rec, "HF Llama (SDPA) + its loss", lambda: H.LM("llama"),
          _ids(2, 32, labels=True), kinds={"attention", "positions", "halo", "reduction"})
    exact(rank, P, rec, "HF Mamba (associative_scan)", lambda: H.LM("mamba"), _ids(2, 32),
          kinds={"cumsum", "halo"}, **EAGER)
