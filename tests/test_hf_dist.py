"""Real HF transformers 5 models (tests/models_hf.py, tiny configs, no download) sharded on 2 and
4 gloo ranks against their full-sequence eager run. Skipped where transformers is missing
(scripts/setup.sh installs the pinned version)."""
import pytest

pytest.importorskip("transformers")

from dist_harness import assert_rows, run_checks  # noqa: E402

P2 = ["check_attention_lms", "check_ssm_lms"]
P4 = ["check_p4"]


@pytest.mark.parametrize("world_size,checks", [(2, P2), (4, P4)], ids=["P2", "P4"])
def test_hf_sharded(world_size, checks):
    assert_rows(run_checks("_checks_hf", checks, world_size))
