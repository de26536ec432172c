"""Worker-side checks for tests/test_zoo2_dist.py: the spellings of tests/models_zoo2.py on gloo
ranks, each asserted in its outcome class:

(a) exact with zero fallbacks — outputs, input grads and summed parameter grads equal the
    full-sequence eager run, and no spcompile warning;
(b) exact with a fallback warning — the same numbers, and a warning naming the op and line;
(c) a clear refusal — a SequenceParallelError whose text says what to do.
"""
from __future__ import annotations

import torch
import torch._dynamo

import models_zoo2 as Z
import _outcomes


_tuple, _floats = _outcomes._tuple, _outcomes.floats


def _tokens(B, T, V=11):
    return lambda: [torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))]


def _padded(B, T, D=16):
    """x and an HF attention_mask with left padding in row 0 and right padding in row 1."""
    def make():
        am = torch.ones(B, T, dtype=torch.long)
        am[0, :5] = 0
        am[1, T - 7:] = 0
        return [torch.randn(B, T, D), am]
    return make


def _unpadded(B, T, D=16):
    return lambda: [torch.randn(B, T, D), torch.ones(B, T, dtype=torch.long)]


exact = _outcomes.exact
refused = _outcomes.refused
compare, _kinds, _fallbacks = _outcomes.compare, _outcomes._kinds, _outcomes._fallbacks


def gathered(*args, **kw):
    return _outcomes.gathered(*args, file="models_zoo2.py", **kw)


# ---------------------------------------------------------------- (a) exact, no fallback
def check_exact(rank, P, rec):
    exact(rank, P, rec, "RWKV ZeroPad2d token shift + time_mix", Z.RWKVChannelMix, kinds={"halo"})
    exact(rank, P, rec, "lightning exp(-s(i-j)) where-mask", Z.LightningDecay,
          kinds={"linear_scan", "positions"})
    exact(rank, P, rec, "simple GLA exp(G_i - G_j) masked_fill", Z.SimpleGLAMasked,
          kinds={"linear_scan"})
    exact(rank, P, rec, "Based Taylor map, masked tril form",
          lambda: Z.BasedLinearAttention(form="masked"), kinds={"linear_scan"})
    exact(rank, P, rec, "Based Taylor map, cumsum form",
          lambda: Z.BasedLinearAttention(form="cumsum"), kinds={"cumsum"})
    exact(rank, P, rec, "meta-llama complex RoPE freqs_cis[:T] + repeat_kv + SDPA",
          Z.MetaLlamaAttention, kinds={"attention", "positions"})
    exact(rank, P, rec, "complex RoPE from torch.polar(arange)", Z.ComplexRoPEInForward,
          kinds={"positions"})
    exact(rank, P, rec, "mean-pool classifier", Z.MeanPoolClassifier,
          kinds={"linear_scan", "reduction"})
    exact(rank, P, rec, "masked mean pooling (h * m).sum(1) / m.sum(1)", Z.MaskedMeanPool,
          _padded(2, 32), kinds={"reduction"})


def check_exact_more(rank, P, rec):
    exact(rank, P, rec, "HF causal-LM shift loss", Z.HFCausalLM, _tokens(2, 32),
          kinds={"reduction", "halo"})
    exact(rank, P, rec, "(logits, h[:, -1]) outputs", Z.LogitsAndHidden,
          kinds={"cumsum", "reduction"})
    exact(rank, P, rec, "ALiBi float attn_mask to SDPA", Z.ALiBiSDPA,
          kinds={"attention", "positions"})
    exact(rank, P, rec, "sliding-window bool mask to SDPA", Z.SlidingWindowSDPA,
          kinds={"attention", "positions"})


def check_padding(rank, P, rec):
    """A padding mask is data: compiled on an all-ones attention_mask, then called with
    padding, the same graph must still be right (a mask is never read by value from one
    example when it depends on an input)."""
    exact(rank, P, rec, "HF padding mask + causal to SDPA", lambda: Z.PaddedAttention(
        form="sdpa"), _padded(2, 32), kinds={"attention", "cumsum"}, warm=_unpadded(2, 32))
    gathered(rank, P, rec, "HF padding mask + causal, eager softmax", lambda: Z.PaddedAttention(
        form="eager"), _padded(2, 32), ops=("matmul",), warm=_unpadded(2, 32))
    gathered(rank, P, rec, "linear attention with a padding mask", Z.PaddedLinearAttention,
             _padded(2, 32), ops=("matmul",), warm=_unpadded(2, 32))


# ---------------------------------------------------------------- (b) exact, with a fallback
def check_gathered(rank, P, rec):
    gathered(rank, P, rec, "RetNet torchscale mask / rowsum.sqrt()", Z.RetNetTorchscale,
             ops=("sum", "matmul"))
    gathered(rank, P, rec, "RetNet torchscale + |qk| row normalisation",
             lambda: Z.RetNetTorchscale(qk_norm=True), ops=("sum", "matmul"))
    gathered(rank, P, rec, "fla naive_parallel_based (1 + s + s²/2, masked_fill_)",
             Z.FlaNaiveBased, ops=("matmul",))
    gathered(rank, P, rec, "ALiBi manual softmax", Z.ALiBiAttention, ops=("matmul",))
    gathered(rank, P, rec, "FFT long conv rfft(n=2T), filter[:, :T]", Z.FFTConvFixedFilter,
             ops=("fft_rfft",))
    gathered(rank, P, rec, "T5 bucketed relative position bias", Z.T5RelativeBias,
             ops=("matmul",))


# ---------------------------------------------------------------- (c) refusals
def check_refused(rank, P, rec):
    const = ("local length", "length_constants")
    refused(rank, P, rec, "Hyena fftconv_ref (/ fft_size)", Z.HyenaFFTConv,
            text=("2·T",) + const)
    refused(rank, P, rec, "cosFormer sin/cos(i / M)", Z.CosFormer, text=("models_zoo2.py",) + const)
    refused(rank, P, rec, "sum(1) / shape[1] pooling", Z.SumOverLengthPool, text=const)
    # a constant that only looks like the length (16 = T_local): refused by default, exact
    # with the opt-out
    refused(rank, P, rec, "look-alike constant, default", Z.FixedTemperature, T=16 * P,
            text=const)
    exact(rank, P, rec, "look-alike constant, length_constants='ignore'", Z.FixedTemperature,
          T=16 * P, length_constants="ignore", kinds={"cumsum"})


# ---------------------------------------------------------------- a few at P = 4
def check_p4(rank, P, rec):
    exact(rank, P, rec, "HF causal-LM shift loss", Z.HFCausalLM, _tokens(2, 32),
          kinds={"reduction", "halo"})
    exact(rank, P, rec, "HF padding mask + causal to SDPA", lambda: Z.PaddedAttention(
        form="sdpa"), _padded(2, 32), kinds={"attention", "cumsum"}, warm=_unpadded(2, 32))
    exact(rank, P, rec, "(logits, h[:, -1]) outputs", Z.LogitsAndHidden,
          kinds={"cumsum", "reduction"})
    gathered(rank, P, rec, "RetNet torchscale + |qk| row normalisation",
             lambda: Z.RetNetTorchscale(qk_norm=True), ops=("sum", "matmul"))
