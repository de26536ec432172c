"""The `sp` backend on 2 and 4 gloo ranks: sharded compiled runs equal the full eager run
(outputs, input gradients, parameter gradients summed over ranks), and the plans are the
expected ones (what matched, with which strategy, zero fallbacks where none are needed)."""
import pytest

from dist_harness import assert_rows, run_checks

P2 = ["check_masked_strategies", "check_spellings", "check_no_mixing", "check_hybrid",
      "check_decay_families", "check_more_families", "check_zoo_spellings", "check_block_loop",
      "check_llama_and_mha", "check_gla_parallel",
      "check_fallback"]
P4 = ["check_allscan", "check_auto_strategy", "check_hybrid", "check_decay_families",
      "check_more_families",
      "check_fallback"]


@pytest.mark.parametrize("world_size,checks", [(2, P2), (4, P4)], ids=["P2", "P4"])
def test_backend_sharded_equals_eager(world_size, checks):
    assert_rows(run_checks("_checks_backend", checks, world_size))
