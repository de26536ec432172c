"""Worker-side checks for tests/test_backend_dist.py (run inside gloo processes)."""
from __future__ import annotations

import copy
import warnings

import torch
import torch._dynamo

import spcompile
from models import Hybrid, NoMix, Unsupported, two_layer


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def compare_sharded(rank, P, rec, name, make_model, *, T=32, B=2, D=16, seed=0, tol=1e-4,
                    **options):
    """Sharded compiled run vs full-sequence eager: every output (sequence-shaped ones as this
    rank's shard, others whole), the input gradient, and parameter gradients summed over ranks."""
    torch.manual_seed(seed)
    model = make_model()
    x = torch.randn(B, T, D)
    xf = x.clone().requires_grad_()
    refs = _as_tuple(model(xf))
    weights = [torch.randn_like(r) for r in refs]
    sum(((r * w).sum() for r, w in zip(refs, weights))).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    sm = copy.deepcopy(model)
    torch._dynamo.reset()
    be = spcompile.backend(**options)
    compiled = torch.compile(sm, backend=be)
    xs = spcompile.shard_sequence(x, dim=1).requires_grad_()
    outs = _as_tuple(compiled(xs))
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
    rec.close(f"{name}: input grad", xs.grad, xf.grad[:, rank * n:(rank + 1) * n], tol)
    worst = max(((p.grad - ref_grads[pn]).abs().max() / ref_grads[pn].abs().max().clamp_min(1e-6)
                 ).item() for pn, p in sm.named_parameters())
    rec.rows.append(dict(name=f"{name}: parameter grads (summed over ranks)", err=worst,
                         tol=tol, info=""))
    return be


def _kinds(be):
    return sorted(m.kind for r in be.reports for m in r.matches)


def _fallbacks(be):
    return sum(len(r.fallbacks) for r in be.reports)


def check_masked_strategies(rank, P, rec):
    for strategy in ("allgather", "allscan", "ring"):
        be = compare_sharded(rank, P, rec, f"masked/{strategy}", lambda: two_layer("mul"),
                             strategy=strategy)
        kinds = [(m.kind, m.strategy) for r in be.reports for m in r.matches]
        rec.true(f"masked/{strategy}: two scans with the strategy",
                 kinds == [("linear_scan", strategy)] * 2, str(kinds))
        rec.true(f"masked/{strategy}: no fallback", _fallbacks(be) == 0)


def check_spellings(rank, P, rec):
    for sp in ("buffer", "where"):
        compare_sharded(rank, P, rec, f"spelling {sp}", lambda: two_layer(sp))


def check_auto_strategy(rank, P, rec):
    be = compare_sharded(rank, P, rec, "masked/auto", lambda: two_layer("mT"))
    rec.true("masked/auto: planned by the cost model",
             all(m.strategy in ("allgather", "allscan", "ring") and m.alternatives
                 for r in be.reports for m in r.matches))


def check_no_mixing(rank, P, rec):
    be = compare_sharded(rank, P, rec, "no mixing", lambda: NoMix())
    rec.true("no mixing: zero matches and fallbacks",
             all(not r.matches and not r.fallbacks for r in be.reports))


def check_hybrid(rank, P, rec):
    for attn in (("kv_allgather",) if P == 2 else ("ring_attention",)):
        be = compare_sharded(rank, P, rec, f"hybrid/{attn}", lambda: Hybrid(),
                             attention_strategy=attn)
        kinds = _kinds(be)
        rec.true(f"hybrid/{attn}: scan, attention, halo, positions, reduction matched",
                 {"linear_scan", "attention", "halo", "positions", "reduction"} <= set(kinds),
                 str(kinds))
        rec.true(f"hybrid/{attn}: zero fallbacks", _fallbacks(be) == 0,
                 str([str(f) for r in be.reports for f in r.fallbacks]))


def check_fallback(rank, P, rec):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        be = compare_sharded(rank, P, rec, "fallback fft", lambda: Unsupported())
    msgs = [str(w.message) for w in caught if "spcompile" in str(w.message)]
    rec.true("fallback fft: warned, naming the op and line",
             any("fft" in m and "models.py" in m for m in msgs), "; ".join(msgs)[:500])
    rec.true("fallback fft: recorded", _fallbacks(be) >= 1)
    from models import CatShift, FNetMix
    from models_loops import CounterLoop
    be = compare_sharded(rank, P, rec, "fallback 2-D fft", lambda: FNetMix())
    rec.true("fallback 2-D fft: gathered, re-sharded", _fallbacks(be) >= 1)
    be = compare_sharded(rank, P, rec, "cat-shift", lambda: CatShift())
    rec.true("cat-shift: a halo, no fallback", _fallbacks(be) == 0 and "halo" in [
        m.kind for r in be.reports for m in r.matches])
    torch._dynamo.reset()
    try:
        torch.compile(CounterLoop(), backend=spcompile.backend())(torch.randn(2, 8, 16))
        rec.true("python loop over tokens refused", False, "no error raised")
    except Exception as e:  # noqa: BLE001
        rec.true("python loop over tokens refused", "loop over" in str(e), str(e)[:300])
    torch._dynamo.reset()
    try:
        compiled = torch.compile(Unsupported(), backend=spcompile.backend(strict=True))
        compiled(torch.randn(2, 8, 16))
        rec.true("strict refuses fft", False, "no error raised")
    except Exception as e:  # noqa: BLE001 - Dynamo wraps the backend's error
        rec.true("strict refuses fft", "fft" in str(e) and "strict" in str(e), str(e)[:300])


def check_allscan(rank, P, rec):
    be = compare_sharded(rank, P, rec, "masked/allscan", lambda: two_layer("mul"),
                         strategy="allscan")
    rec.true("masked/allscan: no fallback", _fallbacks(be) == 0)


def check_decay_families(rank, P, rec):
    from models import RetNetRetention, SSDLayer
    for name, mk, decay in (("retnet", RetNetRetention, "head"), ("ssd", SSDLayer, "scalar")):
        be = compare_sharded(rank, P, rec, name, mk)
        decays = [m.info.get("decay") for r in be.reports for m in r.matches
                  if m.kind == "linear_scan"]
        rec.true(f"{name}: matched as a {decay}-decay scan", decays == [decay], str(decays))
        rec.true(f"{name}: zero fallbacks", _fallbacks(be) == 0,
                 str([str(f) for r in be.reports for f in r.fallbacks]))


def check_more_families(rank, P, rec):
    from models import CumsumLinearTransformer, GPT2Attention, NonCausalLinearAttention
    cases = (("gpt2 manual softmax", GPT2Attention, {"attention"}),
             ("cumsum-form linear transformer", CumsumLinearTransformer, {"linear_scan"}),
             ("non-causal linear attention", NonCausalLinearAttention,
              {"partial_sum", "reduction"}))
    for name, mk, kinds in cases:
        be = compare_sharded(rank, P, rec, name, mk)
        got = set(_kinds(be))
        rec.true(f"{name}: matched {sorted(kinds)}", kinds <= got, str(sorted(got)))
        rec.true(f"{name}: zero fallbacks", _fallbacks(be) == 0,
                 str([str(f) for r in be.reports for f in r.fallbacks]))


def check_zoo_spellings(rank, P, rec):
    from models import ZooMix
    be = compare_sharded(rank, P, rec, "zoo spellings", lambda: ZooMix())
    rec.true("zoo spellings: two attentions + positions, zero fallbacks",
             _kinds(be).count("attention") == 2 and "positions" in _kinds(be)
             and _fallbacks(be) == 0, str(_kinds(be)))
    from models import HeadsEqualLength
    be = compare_sharded(rank, P, rec, "arange(heads) == T_local", lambda: HeadsEqualLength(),
                         T=8 * P)
    rec.true("arange(heads) == T_local: not taken for positions", "positions" not in _kinds(be),
             str(_kinds(be)))


def check_block_loop(rank, P, rec):
    from models import BlockLoop
    torch._dynamo.reset()
    try:
        compare_sharded(rank, P, rec, "block loop", lambda: BlockLoop(), T=8 * P)
    except Exception as e:  # noqa: BLE001 - refusing is fine; a wrong number is not
        rec.true("block loop: refused with a clear error", "spcompile" in str(e), str(e)[:300])


def check_llama_and_mha(rank, P, rec):
    from models import LlamaAttention, TorchMHA
    be = compare_sharded(rank, P, rec, "llama eager attention", lambda: LlamaAttention())
    rec.true("llama: manual softmax attention + positions, no fallback",
             "attention" in _kinds(be) and "positions" in _kinds(be) and _fallbacks(be) == 0,
             str(_kinds(be)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compare_sharded(rank, P, rec, "nn.MultiheadAttention (fallback)", lambda: TorchMHA())


def check_gla_parallel(rank, P, rec):
    from models import GLAParallel
    be = compare_sharded(rank, P, rec, "GLA parallel form", lambda: GLAParallel())
    rec.true("GLA parallel form: scan + prefix sum, no fallback",
             {"linear_scan", "cumsum"} <= set(_kinds(be)) and _fallbacks(be) == 0, str(_kinds(be)))
