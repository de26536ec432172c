"""Associative scans along the sequence (cumsum, cumprod, logcumsumexp, cummax, cummin) sharded
on 2 and 4 gloo ranks against the full-sequence eager run: the runtime op on inputs built for
torch's edge conventions, and the recurrent-model spellings of tests/models_zoo3.py (minGRU /
minLSTM log-space scans with and without the paper's leading h_0 row, a Mamba-1 parallel cumsum
scan, cumprod decays, running max/min features), each exact with zero fallbacks."""
import pytest

from dist_harness import assert_rows, run_checks

P2 = ["check_ops", "check_models"]
P4 = ["check_ops", "check_models_p4"]


@pytest.mark.parametrize("world_size,checks", [(2, P2), (4, P4)], ids=["P2", "P4"])
def test_zoo3_sharded(world_size, checks):
    assert_rows(run_checks("_checks_zoo3", checks, world_size))
