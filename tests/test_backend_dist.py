"""The `sp` backend on 2 and 4 gloo ranks: sharded compiled runs equal the full eager run."""
import pytest

from dist_harness import assert_rows, run_checks

CHECKS = ["check_masked_strategies", "check_spellings", "check_auto_strategy", "check_no_mixing"]


@pytest.mark.parametrize("world_size", [2, 4])
def test_backend_sharded_equals_eager(world_size):
    assert_rows(run_checks("_checks_backend", CHECKS, world_size))
