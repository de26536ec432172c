"""Training-loop surfaces on 2 gloo ranks: activation checkpointing (inlined with its recompute
tags), eval under no_grad, autocast bf16, dict outputs, new input shapes after the first
compile, graph breaks — each sharded run against the full-sequence eager run."""
from dist_harness import assert_rows, run_checks

CHECKS = ["check_checkpointing", "check_eval_no_grad", "check_autocast", "check_dict_output",
          "check_new_shapes", "check_graph_breaks"]


def test_surfaces_sharded_equal_eager():
    assert_rows(run_checks("_checks_surfaces", CHECKS, 2))
