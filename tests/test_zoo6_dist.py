"""Red-team spellings (tests/models_zoo6.py) sharded on 2 and 4 gloo ranks against the
full-sequence eager run, each asserted in its outcome class (tests/_outcomes.py)."""
import pytest

from dist_harness import assert_rows, run_checks

P2 = ["check_reductions", "check_lengths", "check_scans", "check_loops_and_losses",
      "check_training_surfaces", "check_length_indices", "check_convolutions",
      "check_inputs_and_precision"]
P4 = ["check_reductions", "check_scans", "check_loops_and_losses", "check_training_surfaces"]


@pytest.mark.parametrize("world_size,checks", [(2, P2), (4, P4)], ids=["P2", "P4"])
def test_zoo6_sharded(world_size, checks):
    assert_rows(run_checks("_checks_zoo6", checks, world_size))
