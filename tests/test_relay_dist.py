"""Loops with no parallel form run as a relay (tests/models_relay.py: GRU/LSTM cells, the delta
rule, xLSTM's recurrent mLSTM, an Elman RNN with an exclusive readout, a state over blocks, a
hybrid with SDPA), sharded on 2 and 4 gloo ranks against the full-sequence eager run (outputs,
input and parameter gradients), the rewritten graph, and the loops still refused."""
import pytest

from dist_harness import assert_rows, run_checks

P2 = ["check_cells", "check_delta_rule", "check_reversed", "check_rnn_modules", "check_dropout",
      "check_graph", "check_refusals"]
P4 = ["check_p4"]


@pytest.mark.parametrize("world_size,checks", [(2, P2), (4, P4)], ids=["P2", "P4"])
def test_relay_sharded(world_size, checks):
    assert_rows(run_checks("_checks_relay", checks, world_size))
