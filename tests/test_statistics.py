"""The statistics helpers the reduction families call, on one process (no group: every
all-reduce is the identity) against torch: dtypes, overloads, edge values. The sharded runs
are in tests/test_zoo8_dist.py."""
import pytest
import torch
import torch.nn.functional as F

from spcompile.passes.patterns import sequence_ops as so


def test_batch_norm_keeps_the_input_dtype_and_statistics():
    x = torch.randn(3, 5, 16).to(torch.bfloat16)
    w, b = torch.randn(5), torch.randn(5)
    rm, rv = torch.zeros(5), torch.ones(5)
    rm2, rv2 = rm.clone(), rv.clone()
    want = F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    got = so._global_batch_norm(x, rm2, rv2, w, b, 0.1, 1e-5, 1, "")
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(rm2, rm)
    torch.testing.assert_close(rv2, rv)


@pytest.mark.parametrize("p", [1, 2, 3, 0.5, float("inf"), float("-inf"), "fro", None])
def test_norm(p):
    x = torch.randn(2, 7, 4, dtype=torch.float64)
    want = torch.norm(x, p=p if p is not None else "fro", dim=1)
    torch.testing.assert_close(so._global_norm(x, p, 1, False, ""), want)


def test_norm_of_zeros_has_zero_gradient():
    x = torch.zeros(2, 7, 4, requires_grad=True)
    so._global_norm(x, 2, 1, False, "").sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad == 0).all()


@pytest.mark.parametrize("corr,dims", [(0, 1), (1, (1, 2)), (2.5, None)])
def test_var_std(corr, dims):
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    for std in (False, True):
        want = (torch.std if std else torch.var)(x, dim=dims, correction=corr)
        torch.testing.assert_close(so._global_var(x, dims, corr, False, std, 1, ""), want)


def test_logsumexp_with_infinities():
    x = torch.randn(2, 8, 3)
    x[0] = float("-inf")
    torch.testing.assert_close(so._global_logsumexp(x, 1, True, ""),
                               torch.logsumexp(x, 1, keepdim=True))


def test_replicated_queries_all_masked_row_is_zero():
    q, k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[1] = False
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = so._sdpa_replicated_queries(q, k, v, mask, None, False, "")
    torch.testing.assert_close(got, want)
