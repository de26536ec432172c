"""Graph-level checks of the MoE token dispatch (tests/models_moe.py) with a fake process group
(``spcompile.explain(..., world_size=P)``, one process): the sort is matched as a token-local
dispatch, the rows between the sort and the inverse permutation carry the sort's order, nothing
falls back, and what combines tokens is refused at compile time."""
import warnings

import pytest
import torch

import spcompile
import models_moe as M

HAVE_HF = M.hf_grouped_mm_fallback() is not None
needs_hf = pytest.mark.skipif(not HAVE_HF, reason="transformers is not importable")


def _explain(model, P=2, x=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = spcompile.explain(model, torch.randn(2, 16, 32) if x is None else x,
                                   world_size=P)
    return report, [str(w.message) for w in caught if str(w.message).startswith("spcompile")]


def _dispatch(report):
    return [m for m in report.matches if m.kind == "dispatch"]


def _placements(report, *ops):
    """Placement strings of the graph's nodes whose target name contains one of ``ops``."""
    return [n.meta.get("spcompile_placement_str") for n in report.graph.graph.nodes
            if any(op in str(n.target) for op in ops)]


@needs_hf
@pytest.mark.parametrize("spelling,back", [("hf", "getitem"), ("index_copy", "index_copy"),
                                           ("scatter_add", "scatter_add"),
                                           ("argsort_inverse", "argsort+getitem"),
                                           ("gather_scatter", "scatter")])
def test_grouped_dispatch_matched(spelling, back):
    report, msgs = _explain(M.SortedMoE(spelling=spelling))
    (m,) = _dispatch(report)
    assert (m.strategy, m.info["grouped_mm"], m.info["back"]) == ("local", 2, back), m
    assert "models_moe.py" in m.source and m.info["rows"] == 2 * 16 * 2  # B·T_local·k
    assert not report.fallbacks and not msgs, (report.fallbacks, msgs)
    # the expert matmuls hold rows in the order of the sort; the block's output is token order
    assert all("order of" in p for p in _placements(report, "grouped_mm_fallback")), \
        _placements(report, "grouped_mm_fallback")


def test_argsort_bmm_and_batched():
    report, msgs = _explain(M.SortedMoE(spelling="argsort_bmm"))
    (m,) = _dispatch(report)
    assert (m.info["sort"], m.info["grouped_mm"], m.info["back"]) == ("argsort", 0, "setitem")
    assert all("order of" in p for p in _placements(report, "bmm", "matmul"))
    assert not report.fallbacks and not msgs
    # HF's batched_mm: no sort, each row with its own weights (weight[expert_ids] + bmm)
    report, msgs = _explain(M.SortedMoE(spelling="batched"))
    assert not _dispatch(report) and not report.fallbacks and not msgs
    assert all(p.startswith("S(0,merged") for p in _placements(report, "matmul"))


@pytest.mark.parametrize("spelling,back", [("namedtuple", "index_select"),
                                           ("scatter_add_as", "scatter_add"),
                                           ("index_put", "index_put_")])
def test_per_row_spellings(spelling, back):
    report, msgs = _explain(M.SortedMoE(spelling=spelling))
    (m,) = _dispatch(report)
    assert m.info["back"] == back and not report.fallbacks and not msgs, (m, report.fallbacks)


def test_grouped_mm_bf16():
    report, msgs = _explain(M.SortedMoE(spelling="grouped_bf16"))
    (m,) = _dispatch(report)
    assert m.info["grouped_mm"] == 2 and m.info["back"] == "index_add_"  # in place, kept
    assert not report.fallbacks and not msgs


@needs_hf
def test_counts_as_values_all_reduced():
    """histc counts used in a loss are all-reduced; the grouped matmuls keep the local ones."""
    report, _ = _explain(M.SortedMoE(spelling="hf"))
    counts = [m for m in report.matches if m.pattern == "expert_counts"]
    assert len(counts) == 1 and counts[0].strategy == "allreduce"
    assert _placements(report, "histc") and all(
        p.startswith("Counts(") for p in _placements(report, "histc"))


@needs_hf
def test_p1_reports_the_dispatch():
    report, _ = _explain(M.SortedMoE(spelling="hf"), P=1)
    (m,) = _dispatch(report)
    assert m.strategy == "local"


@pytest.mark.parametrize("spelling,text", [
    ("capacity", "position among its own rows"),
    ("reshape_sorted", "regroups the rows sorted"),
    ("perm_arith", "row numbers"),
    ("slice_sorted", "slice of the sequence axis"),
    ("switch_capacity", "capacity"),
    ("expert_choice", "expert-choice"),
    ("megablocks", "leaves the compiled graph"),
])
def test_refused(spelling, text):
    if spelling in ("capacity",) and not HAVE_HF:
        pytest.skip("transformers is not importable")
    with pytest.raises(Exception) as err:
        _explain(M.SortedMoE(spelling=spelling))
    assert "SequenceParallelError" in str(err.value) and text in str(err.value), str(err.value)
    assert "models_moe.py" in str(err.value)


def test_refused_outputs_and_unknown_ops():
    with pytest.raises(Exception, match="leaves the compiled graph"):
        _explain(M.ReturnsSorted())
    if HAVE_HF:
        with pytest.raises(Exception, match="user_grouped_mm"):
            _explain(M.CustomGroupedOp(spelling="gather_scatter"))


@needs_hf
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_hf_grouped_mm_block(arch):
    """transformers' grouped_mm_experts_forward itself (moe.py): one dispatch, nothing falls
    back, both grouped matmuls (the CPU fallback op) in the sort's order."""
    report, msgs = _explain(M.HFMoEBlock(arch, "grouped_mm"))
    (m,) = _dispatch(report)
    assert "moe.py" in m.source and m.info["grouped_mm"] == 2 and m.info["back"] == "getitem"
    assert not report.fallbacks and not msgs, (report.fallbacks, msgs)


class _NextTokenLoss(torch.nn.Module):
    """transformers 5's ForCausalLMLoss after a token-local head."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(32, 11)

    def forward(self, x, labels):
        logits = self.head(x).float()
        labels = torch.nn.functional.pad(labels, (0, 1), value=-100)
        shift = labels[..., 1:].contiguous()
        return torch.nn.functional.cross_entropy(logits.view(-1, 11), shift.view(-1),
                                                 ignore_index=-100)


def test_next_token_labels_shift():
    """HF 5's labels shift (pad right, drop the first) takes the next rank's first labels."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = spcompile.explain(_NextTokenLoss(), torch.randn(2, 16, 32),
                                   torch.randint(0, 11, (2, 16)), world_size=2)
    pats = {m.pattern for m in report.matches}
    assert {"next_token_shift", "cross_entropy"} <= pats, pats
    assert not report.fallbacks and not [w for w in caught if "spcompile" in str(w.message)]
