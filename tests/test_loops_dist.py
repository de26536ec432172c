"""Recurrences written as Python loops over tokens or blocks (tests/models_loops.py), sharded on
2 and 4 gloo ranks against the full-sequence eager run: exact with zero fallbacks where the loop
carries an affine state (HF Mamba slow path — two stacked layers —, linear transformer recurrent
form, learned h0, lightning / RetNet block loops, unbind/split spellings), a clear refusal where it does not (GRU cell, a body reading the
loop counter, blocks that do not tile the shards alike)."""
import pytest

from dist_harness import assert_rows, run_checks

P2 = ["check_token_loops", "check_block_loops", "check_refusals", "check_inplace_outputs",
      "check_exclusive_outputs"]
P4 = ["check_p4"]


@pytest.mark.parametrize("world_size,checks", [(2, P2), (4, P4)], ids=["P2", "P4"])
def test_loops_sharded(world_size, checks):
    assert_rows(run_checks("_checks_loops", checks, world_size))
