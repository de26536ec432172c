"""Hybrid long-context spellings (tests/models_zoo4.py: MoE FFNs, xLSTM, HGRN2/RetNet
einsum and bmm forms, DeltaNet, tied-embedding LMs, position_ids, GroupNorm/BatchNorm,
graph breaks) sharded on 2 and 4 gloo ranks against the full-sequence eager run; each
asserted in its outcome class: (a) exact with zero fallbacks, (b) exact with a fallback
warning, (c) a clear refusal."""
import pytest

from dist_harness import assert_rows, run_checks

P2 = ["check_exact", "check_graph_breaks", "check_gathered", "check_refused",
      "check_moe_loops"]
P4 = ["check_p4"]


@pytest.mark.parametrize("world_size,checks", [(2, P2), (4, P4)], ids=["P2", "P4"])
def test_zoo4_sharded(world_size, checks):
    assert_rows(run_checks("_checks_zoo4", checks, world_size))
