"""Red-team spellings (tests/models_zoo7.py) sharded on 2 and 4 gloo ranks against the
full-sequence eager run, each asserted in its outcome class (tests/_outcomes.py)."""
import pytest

from dist_harness import assert_rows, run_checks

P2 = ["check_recurrent_modules", "check_blocks", "check_spellings", "check_masks_and_pooling"]
P4 = ["check_recurrent_modules", "check_blocks", "check_spellings", "check_masks_and_pooling"]


@pytest.mark.parametrize("world_size,checks", [(2, P2), (4, P4)], ids=["P2", "P4"])
def test_zoo7_sharded(world_size, checks):
    assert_rows(run_checks("_checks_zoo7", checks, world_size))
