"""Round-8 spellings (tests/models_zoo8.py: fla's naive references, einops, loops over a chunk
axis, statistics over the sequence, replicated queries,
centred convolutions, batch norm in training), sharded on 2 and 4 gloo ranks against
the full-sequence eager run, each asserted in its outcome class (tests/_outcomes.py)."""
import pytest

from dist_harness import assert_rows, run_checks

P2 = ["check_fla_references", "check_chunk_loops", "check_spellings", "check_statistics",
      "check_replicated_queries", "check_latents", "check_convolutions"]
P4 = ["check_p4", "check_p4_convolutions"]


@pytest.mark.parametrize("world_size,checks", [(2, P2), (4, P4)], ids=["P2", "P4"])
def test_zoo8_sharded(world_size, checks):
    assert_rows(run_checks("_checks_zoo8", checks, world_size))
