"""Worker-side checks for tests/test_zoo2_dist.py: the spellings of tests/models_zoo2.py on gloo
ranks, each asserted in its outcome class:

(a) exact with zero fallbacks — outputs, input grads and summed parameter grads equal the
    full-sequence eager run, and no spcompile warning;
(b) exact with a fallback warning — the same numbers, and a warning naming the op and line;
(c) a clear refusal — a SequenceParallelError whose text says what to do.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch._dynamo

import spcompile
import models_zoo2 as Z


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _floats(B, T, D=16):
    return lambda: [torch.randn(B, T, D)]


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


def compare(rank, P, rec, name, make_model, make_inputs=None, *, T=32, B=2, tol=1e-4,
            warm=None, **options):
    """Sharded compiled run vs full-sequence eager run for models with one or more inputs
    (every input of length T on dim 1 is sharded). ``warm``: inputs the model is compiled on
    first (the checked call then reuses that graph). Returns (backend, spcompile warnings)."""
    torch.manual_seed(0)
    model = make_model()
    inputs = (make_inputs or _floats(B, T))()
    full = [x.clone().requires_grad_() if x.is_floating_point() else x for x in inputs]
    refs = _tuple(model(*full))
    weights = [torch.randn_like(r) for r in refs]
    sum(((r * w).sum() for r, w in zip(refs, weights))).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    sm = copy.deepcopy(model)
    torch._dynamo.reset()
    be = spcompile.backend(**options)
    compiled = torch.compile(sm, backend=be)
    shards = [spcompile.shard_sequence(x, dim=1) for x in inputs]
    shards = [x.requires_grad_() if x.is_floating_point() else x for x in shards]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if warm is not None:
            compiled(*[spcompile.shard_sequence(x, dim=1) for x in warm()])
        outs = _tuple(compiled(*shards))
    msgs = [str(w.message) for w in caught if str(w.message).startswith("spcompile")]
    n = T // P
    loss = 0
    for i, (o, r, w) in enumerate(zip(outs, refs, weights)):
        seq = r.dim() >= 2 and r.shape[1] == T
        want = r[:, rank * n:(rank + 1) * n] if seq else r
        wi = w[:, rank * n:(rank + 1) * n] if seq else w
        rec.close(f"{name}: output {i}", o, want, tol)
        loss = loss + (o * wi).sum()
    loss.backward()
    spcompile.sync_gradients(sm)
    for i, (s, f) in enumerate(zip(shards, full)):
        if f.grad is not None:
            rec.close(f"{name}: input {i} grad", s.grad, f.grad[:, rank * n:(rank + 1) * n], tol)
    worst = max([((p.grad - ref_grads[pn]).abs().max() /
                  ref_grads[pn].abs().max().clamp_min(1e-6)).item()
                 for pn, p in sm.named_parameters() if pn in ref_grads] or [0.0])
    rec.rows.append(dict(name=f"{name}: parameter grads (summed over ranks)", err=worst,
                         tol=tol, info=""))
    return be, msgs


def _kinds(be):
    return sorted(m.kind for r in be.reports for m in r.matches)


def _fallbacks(be):
    return [str(f) for r in be.reports for f in r.fallbacks]


def exact(rank, P, rec, name, make_model, make_inputs=None, kinds=(), **kw):
    """Outcome (a): the numbers, zero fallbacks, no warning, the expected families matched."""
    be, msgs = compare(rank, P, rec, name, make_model, make_inputs, **kw)
    rec.true(f"{name}: (a) zero fallbacks, no warning", not _fallbacks(be) and not msgs,
             str(_fallbacks(be))[:400] + str(msgs)[:400])
    rec.true(f"{name}: matched {sorted(kinds)}", set(kinds) <= set(_kinds(be)), str(_kinds(be)))


def gathered(rank, P, rec, name, make_model, make_inputs=None, ops=(), **kw):
    """Outcome (b): the numbers, and a fallback warning naming each op in ``ops`` and the
    user's file."""
    be, msgs = compare(rank, P, rec, name, make_model, make_inputs, **kw)
    fbs = _fallbacks(be)
    ok = bool(fbs) and len(msgs) == len(fbs) and all("models_zoo2.py" in m for m in msgs) and \
        all(any(op in f for f in fbs) for op in ops)
    rec.true(f"{name}: (b) fallback warned {list(ops)}", ok, str(fbs)[:600])


def refused(rank, P, rec, name, make_model, make_inputs=None, text=(), T=32, B=2, **options):
    """Outcome (c): compiling the sharded model raises spcompile's error with ``text``."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    shards = [spcompile.shard_sequence(x, dim=1) for x in (make_inputs or _floats(B, T))()]
    try:
        torch.compile(make_model(), backend=spcompile.backend(**options))(*shards)
        rec.true(f"{name}: (c) refused", False, "no error raised")
    except Exception as e:  # noqa: BLE001 - Dynamo wraps the backend's error
        msg = str(e)
        rec.true(f"{name}: (c) refused with {list(text)}",
                 "SequenceParallelError" in msg and all(t in msg for t in text), msg[:600])


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
