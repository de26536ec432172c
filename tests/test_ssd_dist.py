"""Mamba2's chunked SSD reference (ssd_minimal) and HF's torch_forward spelling (broadcast
products summed over axes) on 2 and 4 gloo ranks: the inter-chunk
recurrence over the sharded chunk axis is rewritten (state hand-off between ranks, every
strategy), a learned initial state and the returned final state included; outputs and
gradients equal the full-sequence eager run."""
import pytest

from dist_harness import assert_rows, run_checks


@pytest.mark.parametrize("world_size,checks", [
    (2, ["check_chunked_ssd", "check_ssd_with_state", "check_hf_mamba2"]),
    (4, ["check_chunked_ssd", "check_hf_mamba2"])],
    ids=["P2", "P4"])
def test_chunked_ssd_sharded_equals_eager(world_size, checks):
    assert_rows(run_checks("_checks_ssd", checks, world_size))
