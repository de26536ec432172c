"""Spellings found by running HF transformers 5 models (tests/models_zoo5.py, without the
transformers dependency), sharded on 2 and 4 gloo ranks against the full-sequence eager run,
each asserted in its outcome class (tests/_outcomes.py)."""
import pytest

from dist_harness import assert_rows, run_checks

P2 = ["check_associative_scans", "check_spellings", "check_masks", "check_losses",
      "check_redteam"]
P4 = ["check_p4"]


@pytest.mark.parametrize("world_size,checks", [(2, P2), (4, P4)], ids=["P2", "P4"])
def test_zoo5_sharded(world_size, checks):
    assert_rows(run_checks("_checks_zoo5", checks, world_size))
