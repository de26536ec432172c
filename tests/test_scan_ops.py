"""Single-process tests of the associative-scan family (the sharded numbers are checked on gloo
ranks in test_zoo3_dist.py):

* ``torch.library.opcheck`` on ``spcompile::sequence_logcumsumexp`` and its backward op;
* the backward op's formula against torch's own logcumsumexp gradient, -inf and NaN included;
* what a 2-rank plan matches (fake group): every scan spelling, the minGRU paper form's leading
  h_0 row, and the near miss when the longer value is read elsewhere.
"""
import math

import pytest
import torch
import torch.nn as nn

import spcompile
import spcompile.ops as spops
import models_zoo3 as Z


def _lcse_input():
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    x[0, :3, 0] = -math.inf  # a leading -inf run: torch's gradient is NaN there
    x[1, 4, 1] = -math.inf
    return x


@pytest.mark.parametrize("head", [0, 1])
def test_opcheck_sequence_logcumsumexp(head):
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.spcompile.sequence_logcumsumexp.default, (x, 1, "", head))
    y = x.detach().logcumsumexp(1)
    torch.library.opcheck(torch.ops.spcompile.sequence_logcumsumexp_backward.default,
                          (torch.randn_like(y), x.detach(), y, 1, "", head))


def test_logcumsumexp_backward_is_torchs():
    """At P = 1 the custom backward is torch's formula: the same numbers, NaNs and zeros."""
    x = _lcse_input().requires_grad_()
    g = torch.randn(2, 7, 3, dtype=torch.float64)
    g[0, 5, 2] = 0.0
    torch.logcumsumexp(x, 1).backward(g)
    want = x.grad.clone()
    x.grad = None
    spops.sequence_scan(x, 1, "logcumsumexp", "").backward(g)  # P = 1: torch's own op
    xr = x.detach().clone().requires_grad_()
    torch.ops.spcompile.sequence_logcumsumexp(xr, 1, "", 0).backward(g)
    torch.testing.assert_close(xr.grad, want, equal_nan=True)
    assert xr.grad.isnan().any()  # the convention is really exercised


@pytest.mark.parametrize("op", sorted(spops.SCANS))
def test_sequence_scan_is_the_torch_op_at_p1(op):
    x = torch.randn(2, 5, 3)
    got, want = spops.sequence_scan(x, -2, op, ""), getattr(torch, op)(x, 1)
    for a, b in zip(got if isinstance(got, tuple) else (got,),
                    want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(a, b)


class _AllSpellings(nn.Module):
    def forward(self, x):
        a = torch.cumsum(x, dim=1, dtype=torch.float64).float()
        b = x.sigmoid().cumprod(-2)
        c = x.logcumsumexp(1)
        d, i = x.cummax(dim=-2)
        e = torch.cummin(x, 1).values
        return a + b + c + d + e + i


class _ReadsTheLongerValue(nn.Module):
    """The paper's scan, and also the last row of the value that still has the h_0 row."""
    def forward(self, x, h_0):
        log_coeffs, log_values = -nn.functional.softplus(x), Z.log_g(x)
        a_star = nn.functional.pad(torch.cumsum(log_coeffs, dim=1), (0, 0, 1, 0))
        log_h = a_star + torch.logcumsumexp(torch.cat([Z.log_g(h_0), log_values], 1) - a_star, 1)
        return torch.exp(log_h)[:, 1:], log_h[:, -1]


def _patterns(rep):
    return sorted(m.pattern for m in rep.matches)


def test_plan_every_spelling_two_ranks():
    rep = spcompile.explain(_AllSpellings(), torch.randn(2, 8, 4), world_size=2)
    assert _patterns(rep) == ["cummax", "cummin", "cumprod", "cumsum", "logcumsumexp"], str(rep)
    assert not rep.fallbacks, str(rep)


def test_plan_min_gru_paper_form_two_ranks():
    rep = spcompile.explain(Z.MinGRU(form="paper"), torch.randn(2, 8, 16),
                            torch.randn(2, 1, 16), world_size=2)
    assert _patterns(rep) == ["cumsum", "leading_row_scan"], str(rep)
    lead = next(m for m in rep.matches if m.pattern == "leading_row_scan")
    assert lead.info["rows"] == 1 and lead.info["scans"] == ["logcumsumexp"], lead.info
    assert not rep.fallbacks, str(rep)


def test_plan_leading_row_read_elsewhere_is_a_near_miss():
    rep = spcompile.explain(_ReadsTheLongerValue(), torch.randn(2, 8, 4), torch.randn(2, 1, 4),
                            world_size=2)
    assert "leading_row_scan" not in _patterns(rep), str(rep)
    assert any("reads the value with its leading row" in str(nm) for nm in rep.near_misses), \
        str(rep)
    assert rep.fallbacks, str(rep)  # gathered, not silently wrong
