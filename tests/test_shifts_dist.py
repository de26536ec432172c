"""Token shifts in their spellings, flips and softmax over the tokens (tests/models_shifts.py), sharded on 2 and 4 gloo ranks
against the full-sequence eager run: outputs, input and parameter gradients, what matched."""
import pytest

from dist_harness import assert_rows, run_checks


@pytest.mark.parametrize("world_size,checks", [
    (2, ["check_shifts", "check_sequence_ops", "check_length_shifts", "check_shared_cut",
         "check_whole_sequence", "check_constant_mix"]),
    (4, ["check_shifts", "check_long_roll", "check_sequence_ops", "check_constant_mix"])],
                         ids=["P2", "P4"])
def test_shifts_sharded(world_size, checks):
    assert_rows(run_checks("_checks_shifts", checks, world_size))
