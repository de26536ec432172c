"""spcompile.collectives on gloo: every strategy against a single-process reference.

One spawn per world size (P = 2, 4) runs all distributed checks (tests/_dist_collectives.py);
the tests below read its records, so each check still passes or fails on its own and reports the
worst relative error it saw.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import _dist_collectives as D  # noqa: E402

import spcompile.collectives as C  # noqa: E402
from spcompile.kernels.linear_scan import linear_scan  # noqa: E402

WORLDS = (2, 4)


@pytest.fixture(scope="module", params=WORLDS, ids=lambda p: f"P{p}")
def world(request, tmp_path_factory):
    P = request.param
    out = tmp_path_factory.mktemp(f"collectives_P{P}")
    return P, D.run(P, str(out), list(D.CHECKS))


def _assert_check(world, prefix: str) -> None:
    P, results = world
    recs = [rec for d in results for rec in d["records"] if rec["name"].startswith(prefix)]
    assert recs, f"no records for {prefix!r} at P={P}"
    bad = [rec for rec in recs if not rec["ok"]]
    worst = max(recs, key=lambda rec: rec["err"])
    print(f"P={P} {prefix}: {len(recs)} comparisons, worst rel err {worst['err']:.3g} "
          f"({worst['name']})")
    assert not bad, "\n".join(f"rank {b['rank']} {b['name']}: err {b['err']:.3g} > {b['tol']} "
                              f"{b['info']}" for b in bad[:10])


@pytest.mark.parametrize("check", [
    "scan/allgather", "scan/allscan", "scan/ring",
    "sp_scan/allgather", "sp_scan/allscan", "sp_scan/ring",
    "halo/", "attn/kv_allgather", "attn/ring_attention", "attn/ulysses",
    "reduce/", "validate/", "timeout/",
])
def test_distributed(world, check):
    _assert_check(world, check)


def test_opcheck_on_gloo(world):
    P, _ = world
    if P != 2:
        pytest.skip("checked on 2 ranks")
    _assert_check(world, "opcheck/")


def test_compiled_sp_linear_scan_matches_eager(world):
    P, _ = world
    if P != 2:
        pytest.skip("checked on 2 ranks")
    _assert_check(world, "compile/aot_eager")
    if os.environ.get("SPCOMPILE_SLOW_TESTS"):
        _assert_check(world, "compile/inductor")


def test_no_check_raised(world):
    _assert_check(world, "")  # includes '<check>/raised' records from any crashed check
    P, results = world
    assert not any(rec["name"].endswith("/raised") for d in results for rec in d["records"])


# ----------------------------------------------------------------------------- single process, P=1

def test_p1_paths_are_local():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 9, 2, 4, generator=g) for _ in range(3))
    ld = -torch.rand(1, 9, 2, generator=g)
    with C.count_traffic() as t:
        o, s = C.sp_linear_scan(q, k, v, ld, output_final_state=True, chunk_size=4)
        inc = C.exclusive_state_scan(torch.randn(1, 2, 4, 4), None, group="")
    o_ref, s_ref = linear_scan(q, k, v, ld, output_final_state=True, chunk_size=4)
    assert torch.equal(o, o_ref) and torch.equal(s, s_ref)
    assert torch.count_nonzero(inc) == 0
    assert t.sent_bytes == 0 and t.recv_bytes == 0
    assert C.group_size(None) == 1 and C.group_rank("") == 0 and C.group_name(None) == ""


def test_ops_trace_with_fake_process_group():
    """Shape-only smoke test at P = 4: every op traces under torch.compile(aot_eager), fwd+bwd."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=4)
    try:
        name = dist.group.WORLD.group_name
        assert C.group_size(name) == 4 and C.group_rank(name) == 1

        def f(q, k, v, g, x, qa, ka, va):
            outs = [C.sp_linear_scan(q, k, v, g, strategy=s, group=name,
                                     output_final_state=True) for s in C.STRATEGIES]
            outs = [t for pair in outs for t in pair]
            outs.append(C.exclusive_state_scan(outs[1], g.sum(1), strategy="allscan", group=name))
            outs.append(C.halo_exchange(x, 3, dim=1, group=name))
            outs += [C.sp_attention(qa, ka, va, causal=True, strategy=s, group=name,
                                    enable_gqa=True) for s in C.ATTENTION_STRATEGIES]
            outs.append(C.all_reduce_sum(x.sum(1), name))
            outs.append(C.all_reduce_max(x.sum(1), name))
            outs.append(C.shard_sequence(C.gather_sequence(x, 1, name, grad="reduce_scatter"),
                                         1, name))
            return outs

        B, Tl, H, K, V = 1, 8, 2, 4, 3
        args = [torch.randn(B, Tl, H, K), torch.randn(B, Tl, H, K), torch.randn(B, Tl, H, V),
                -torch.rand(B, Tl, H), torch.randn(B, Tl, 5), torch.randn(B, 4, Tl, 8),
                torch.randn(B, 2, Tl, 8), torch.randn(B, 2, Tl, 8)]
        args = [a.requires_grad_() for a in args]
        outs = torch.compile(f, backend="aot_eager", fullgraph=True)(*args)
        want = [(B, Tl, H, V), (B, H, K, V)] * 3 + [(B, H, K, V), (B, 3, 5)] + \
            [(B, 4, Tl, 8)] * 3 + [(B, 5), (B, 5), (B, Tl, 5)]
        assert [tuple(o.shape) for o in outs] == want
        sum(o.sum() for o in outs).backward()
        assert all(a.grad is not None and a.grad.shape == a.shape for a in args)
    finally:
        dist.destroy_process_group()


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="strategy"):
        C.exclusive_state_scan(torch.zeros(1, 1, 2, 2), strategy="bogus")
    with pytest.raises(ValueError, match=r"\[B, H\]"):
        C.exclusive_state_scan(torch.zeros(1, 1, 2, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="exceeds the local length"):
        C.halo_exchange(torch.zeros(1, 3, 2), 4)
    with pytest.raises(ValueError, match="enable_gqa"):
        C.sp_attention(torch.zeros(1, 4, 3, 2), torch.zeros(1, 2, 3, 2), torch.zeros(1, 2, 3, 2),
                       causal=True)
    with pytest.raises(ValueError, match="strategy"):
        C.sp_attention(torch.zeros(1, 4, 3, 2), torch.zeros(1, 4, 3, 2), torch.zeros(1, 4, 3, 2),
                       causal=True, strategy="bogus")
    with pytest.raises(ValueError, match="grad must be"):
        C.gather_sequence(torch.zeros(2, 2), 1, None, grad="sum")
