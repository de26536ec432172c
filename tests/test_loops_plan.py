"""Graph-level checks of the loop family (fake process group, no processes): what is matched, what
the rewritten graph contains, and which check a refused loop failed."""
import operator

import pytest
import torch

import spcompile
import models_loops as ML
from models import TokenLoop


def _plan(model, T=8, P=4):
    torch.manual_seed(0)
    return spcompile.explain(model, torch.randn(2, T, 16), world_size=P)


def _targets(gm):
    return [getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes
            if n.op == "call_function"]


def test_token_loop_is_matched_and_fed_the_entering_state():
    rep = _plan(TokenLoop())
    loops = [m for m in rep.matches if m.kind == "loop_scan"]
    assert len(loops) == 1 and not rep.fallbacks
    assert "steps=8" in loops[0].detail and "states=1" in loops[0].detail
    names = _targets(rep.graph)
    assert names.count("_fold_states") == 1  # one all-gather of (D, S_loc), then the fold
    # the unrolled reads stay: each rank runs its own steps
    assert sum(1 for n in rep.graph.graph.nodes
               if n.op == "call_function" and n.target is operator.getitem) >= 8


def test_two_states_and_stacked_layers_are_each_one_match():
    rep = _plan(ML.NormalisedTokenLoop())
    assert [m.detail for m in rep.matches if m.kind == "loop_scan"][0].count("states=2") == 1
    rep = _plan(ML.TwoUnbindLoops(), T=6)
    assert sum(m.kind == "loop_scan" for m in rep.matches) == 2 and not rep.fallbacks


def test_block_loop_with_a_dead_last_update_is_rebuilt():
    rep = _plan(ML.LightningBlockLoop(), T=12)  # 3 blocks of 4 per rank
    loops = [m for m in rep.matches if m.kind == "loop_scan"]
    assert len(loops) == 1 and "step_tokens=4" in loops[0].detail
    assert not rep.fallbacks


@pytest.mark.parametrize("model,words", [
    (ML.CounterLoop, "step number"),
    (ML.PartialBlockLoop, "step number"),
])
def test_refused_loops_say_which_check_failed(model, words):
    with pytest.raises(Exception) as e:
        _plan(model(), T=16, P=2)
    assert "loop over" in str(e.value) and words in str(e.value)


def test_a_nonlinear_cell_loop_becomes_one_relay_region():
    """A GRU cell has no all-gather form: the whole unrolled loop is lifted into one
    relay_region call (its cells leave the model's graph)."""
    rep = _plan(ML.GRULoop(), T=16, P=2)
    loops = [m for m in rep.matches if m.kind == "loop_scan"]
    assert [m.pattern for m in loops] == ["loop_relay"] and loops[0].strategy == "relay"
    assert "steps=16" in loops[0].detail and not rep.fallbacks
    names = _targets(rep.graph)
    assert names.count("relay_region") == 1 and "gru_cell" not in names


def test_p1_leaves_the_loop_alone():
    rep = spcompile.explain(TokenLoop(), torch.randn(2, 8, 16))
    assert "_fold_states" not in _targets(rep.graph)


def test_in_process_values_match_eager_at_p1():
    torch.manual_seed(0)
    m = ML.LightningBlockLoop()
    x = torch.randn(2, 12, 16)
    torch._dynamo.reset()
    got = torch.compile(m, backend=spcompile.backend())(x)
    torch.testing.assert_close(got, m(x))


def _placement_of_buffers(gm):
    return [str(n.meta.get("spcompile_placement")) for n in gm.graph.nodes
            if any(u.op == "call_function" and u.target is operator.setitem
                   and u.args[0] is n for u in n.users)]


@pytest.mark.parametrize("model,dim", [(ML.EmptyWriteLoop, 1), (ML.TimeMajorWriteLoop, 0),
                                       (ML.NewZerosBlockWrite, 1)])
def test_buffer_written_in_place_is_sharded_on_its_sequence_axis(model, dim):
    rep = _plan(model(), T=12)
    assert [m.kind for m in rep.matches] == ["loop_scan"] and not rep.fallbacks
    places = _placement_of_buffers(rep.graph)
    assert places == [f"S({dim})"], places


def test_exclusive_readout_rebuilds_the_dead_update_from_this_ranks_last_token():
    # the last step's update reads tokens nothing else reads: rebuilt as local reads, which no
    # other family may take for a global index (h[:, -1] from the owning rank)
    for model in (ML.ExclusiveStateReadout, ML.ExclusiveMatrixLoop):
        rep = _plan(model(), T=6)
        assert [m.kind for m in rep.matches] == ["loop_scan"] and not rep.fallbacks


@pytest.mark.parametrize("model,words", [
    (ML.WriteIntoCloneLoop, "not a fresh tensor"),
    (ML.ReadBufferInLoop, "before the loop has written all of it"),
])
def test_in_place_writes_that_cannot_be_taken_say_why(model, words):
    with pytest.raises(Exception) as e:
        _plan(model(), T=8, P=2)
    assert "loop over" in str(e.value) and words in str(e.value)


def test_in_place_and_exclusive_loops_match_eager_at_p1():
    for model in (ML.EmptyWriteLoop, ML.ExclusiveWriteLoop, ML.BeforeAfterStateOnly):
        torch.manual_seed(0)
        m = model()
        x = torch.randn(2, 6, 16)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(m, backend=spcompile.backend())(x), m(x))
