"""MoE expert dispatch that permutes tokens (tests/models_moe.py: transformers 5's grouped_mm
and batched_mm experts, torchtitan/Megablocks spellings, capacity limits and expert choice;
tiny HF Mixtral / Qwen2-MoE / OLMoE / Jamba models) sharded on 2 and 4 gloo ranks against the
full-sequence eager run: exact with no fallback in the MoE part, or a clear refusal."""
import pytest

from dist_harness import assert_rows, run_checks

P2 = ["check_exact", "check_refused", "check_hf", "check_steps"]
P4 = ["check_p4"]


@pytest.mark.parametrize("world_size,checks", [(2, P2), (4, P4)], ids=["P2", "P4"])
def test_moe_sharded(world_size, checks):
    assert_rows(run_checks("_checks_moe", checks, world_size))
