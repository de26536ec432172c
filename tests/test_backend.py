"""The backend at P = 1 and planned for P ranks with a fake group: graph assertions (what
matched, which pattern ops are gone), numerics against eager, options and errors."""
import pytest
import torch
import torch._dynamo
import torch.nn as nn

import spcompile
from models import Hybrid, LinearAttention, NoMix, Unsupported, two_layer

SPELLINGS = ["mul", "einsum", "mT", "transpose21", "buffer", "masked_fill", "where"]


def _compile(model, **options):
    torch._dynamo.reset()
    be = spcompile.backend(**options)
    return torch.compile(model, backend=be), be


def _ops(be):
    ops = {}
    for r in be.reports:
        for k, v in r.ops_after.items():
            ops[k] = ops.get(k, 0) + v
    return ops


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_each_mask_spelling_is_matched(spelling):
    torch.manual_seed(0)
    m = LinearAttention(16, spelling=spelling)
    c, be = _compile(m)
    x = torch.randn(2, 24, 16)
    torch.testing.assert_close(c(x), m(x), rtol=1e-4, atol=1e-4)
    kinds = [(mm.kind, mm.pattern, mm.info["decay"]) for r in be.reports for mm in r.matches]
    assert kinds == [("linear_scan", "masked_linear_attention", "none")]
    ops = _ops(be)
    assert ops.get("spcompile.ops.scan") == 1
    # the pattern's ops are gone: no tril, no T×T matmuls, no masking op left
    assert not any(k.endswith(("tril", "masked_fill", "where", "einsum")) for k in ops), ops
    assert ops.get("torch.matmul", 0) == 0, ops


def test_two_layer_equals_eager_with_gradients():
    torch.manual_seed(0)
    m = two_layer("mul")
    c, be = _compile(m)
    x = torch.randn(2, 40, 16, requires_grad=True)  # 40: not a multiple of the chunk size
    x2 = x.detach().clone().requires_grad_()
    out, ref = c(x), m(x2)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x] + list(m.parameters()), g)
    refs = torch.autograd.grad(ref, [x2] + list(m.parameters()), g)
    for a, b in zip(grads, refs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert sum(len(r.matches) for r in be.reports) == 2


def test_provenance_on_created_nodes():
    c, be = _compile(two_layer("mul"))
    c(torch.randn(1, 16, 16))
    gm = be.reports[0].graph
    scans = [n for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "scan"]
    assert scans
    for n in scans:
        tag = n.meta["spcompile"]
        assert tag["pass"] == "rewrite" and tag["match"].startswith("masked_linear_attention")
        assert "models.py" in n.meta["stack_trace"]


def test_no_mixing_model_has_no_matches():
    torch.manual_seed(0)
    m = NoMix()
    c, be = _compile(m)
    x = torch.randn(2, 16, 16)
    torch.testing.assert_close(c(x), m(x))
    assert all(not r.matches and not r.fallbacks for r in be.reports)


def test_explain_plans_for_four_ranks_with_a_fake_group():
    torch.manual_seed(0)
    rep = spcompile.explain(Hybrid(), torch.randn(2, 8, 16), world_size=4)
    kinds = {m.kind for m in rep.matches}
    assert {"linear_scan", "attention", "halo", "positions", "reduction"} <= kinds
    assert not rep.fallbacks
    text = str(rep)
    assert "models.py" in text and "P = 4" in text
    scan = next(m for m in rep.matches if m.kind == "linear_scan")
    assert scan.strategy in ("allgather", "allscan", "ring") and scan.alternatives


def test_explain_names_a_near_miss():
    class NotCausal(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 48)

        def forward(self, x):
            q, k, v = self.lin(x).chunk(3, -1)
            T = x.shape[1]
            return ((q @ k.transpose(-1, -2)) * torch.ones(T, T).triu()) @ v

    rep = spcompile.explain(NotCausal(), torch.randn(1, 8, 16))
    assert not rep.matches
    assert any("not causal" in nm.reason for nm in rep.near_misses)
    assert "not causal" in str(rep)
    # sharded, the T×T value is recomputed on the gathered sequence (the mask at the global
    # length): a fallback, with the warning naming the line
    with pytest.warns(UserWarning, match=r"test_backend.py:\d+ .*gathered sequence"):
        rep = spcompile.explain(NotCausal(), torch.randn(1, 8, 16), world_size=2)
    assert rep.fallbacks and "matmul" in str(rep.fallbacks[0])


def test_strict_refuses_unsupported_mixing():
    with pytest.raises(Exception, match="fft"):
        spcompile.explain(Unsupported(), torch.randn(1, 8, 16), world_size=2, strict=True)


def test_options_are_validated():
    with pytest.raises(ValueError, match="strategy"):
        spcompile.backend(strategy="fastest")
    with pytest.raises(TypeError, match="unknown option"):
        spcompile.backend(stratgy="ring")
    with pytest.raises(ValueError, match="unknown pass"):
        c, _ = _compile(NoMix(), disable=("nope",))
        c(torch.randn(1, 4, 16))


def test_string_backend_with_options_reaches_spcompile():
    torch._dynamo.reset()
    m = two_layer("mul")
    c = torch.compile(m, backend="sp", options={"chunk_size": 16, "compiler": "eager"})
    x = torch.randn(1, 20, 16)
    torch.testing.assert_close(c(x), m(x), rtol=1e-4, atol=1e-4)


def test_disabling_detect_leaves_the_model_alone():
    c, be = _compile(two_layer("mul"), disable=("detect",))
    c(torch.randn(1, 8, 16))
    assert not any(r.matches for r in be.reports)
    assert any(rec.skipped and rec.name == "detect" for r in be.reports for rec in r.records)


def test_dump_dir_writes_graphs(tmp_path):
    c, be = _compile(two_layer("mul"), dump_dir=str(tmp_path))
    c(torch.randn(1, 8, 16))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "01_canonicalize_before.txt" in names and "05_rewrite_after.txt" in names
    assert "scan" in (tmp_path / "05_rewrite_after.txt").read_text()


def test_sequence_not_divisible_by_ranks_is_a_clear_error():
    from torch.testing._internal.distributed.fake_pg import FakeStore
    import torch.distributed as dist
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=3)
    try:
        with pytest.raises(ValueError, match="not divisible by the 3 ranks"):
            spcompile.shard_sequence(torch.randn(1, 10, 4), dim=1)
    finally:
        dist.destroy_process_group()


def test_inductor_compiles_the_rewritten_graph():
    torch.manual_seed(0)
    m = two_layer("mul")
    c, be = _compile(m, compiler="inductor")
    x = torch.randn(1, 16, 16)
    torch.testing.assert_close(c(x), m(x), rtol=1e-4, atol=1e-4)


FAMILIES = [  # (model, kinds every plan must contain, kinds it must not contain)
    ("LinearAttention", {"linear_scan"}, set()),
    ("RetNetRetention", {"linear_scan", "positions"}, set()),
    ("SSDLayer", {"linear_scan"}, set()),
    ("GPT2Attention", {"attention"}, {"linear_scan"}),
    ("SoftmaxAttention", {"attention", "positions"}, set()),
    ("ShortConv", {"halo"}, set()),
    ("CumsumLinearTransformer", {"linear_scan"}, {"cumsum"}),
    ("NonCausalLinearAttention", {"partial_sum", "reduction"}, set()),
    ("Hybrid", {"linear_scan", "attention", "halo", "positions", "reduction"}, set()),
]


@pytest.mark.parametrize("name,must,must_not", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_graph_plan_for_two_ranks(name, must, must_not):
    """Each family, planned for 2 ranks (fake group): what matched, no fallback, and the
    rewritten graph holds spcompile ops instead of the pattern."""
    import models
    torch.manual_seed(0)
    rep = spcompile.explain(getattr(models, name)(), torch.randn(2, 12, 16), world_size=2)
    kinds = {m.kind for m in rep.matches}
    assert must <= kinds and not (must_not & kinds), (kinds, str(rep))
    assert not rep.fallbacks, [str(f) for f in rep.fallbacks]
    after = rep.ops_after
    if "linear_scan" in must:
        scans = sum(v for k, v in after.items() if k.startswith("spcompile") and
                    k.endswith("scan"))
        assert scans >= 1 and after.get("torch.matmul", 0) == 0 or name == "Hybrid", after
    if "attention" in must:
        assert not any("scaled_dot_product_attention" in k or k.endswith("softmax")
                       for k in after), after


def test_chunked_ssd_reference_plan():
    """Mamba2's chunked reference SSD: at P = 1 it compiles and equals eager; for P = 2 the
    inter-chunk recurrence (exp(segsum(pad(a))) @ cat([init, states])) is one match and nothing
    falls back (the sharded numbers are checked in test_ssd_dist.py)."""
    from models import ChunkedSSD
    torch.manual_seed(0)
    m, x = ChunkedSSD(), torch.randn(2, 16, 16)
    c, _ = _compile(m)
    torch.testing.assert_close(c(x), m(x), rtol=1e-4, atol=1e-4)
    rep = spcompile.explain(m, x, world_size=2)
    assert [mt.pattern for mt in rep.matches] == ["chunk_state_recurrence"], str(rep)
    assert not rep.fallbacks, str(rep)
