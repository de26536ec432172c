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
])
def test_distributed(world, check):
    _assert_check(world, check)


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


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="strategy"):
        C.exclusive_state_scan(torch.zeros(1, 1, 2, 2), strategy="bogus")
    with pytest.raises(ValueError, match=r"\[B, H\]"):
        C.exclusive_state_scan(torch.zeros(1, 1, 2, 2), torch.zeros(3))
