"""Worker-side checks for tests/test_relay_dist.py: loops run as a relay (tests/models_relay.py)
on gloo ranks, each in its outcome class (tests/_outcomes.py), and the graph they leave."""
from __future__ import annotations

import torch

import models_relay as M
from _outcomes import exact, refused


def _relays(be):
    """(relay matches, relay_region calls left in the rewritten graphs, loop reads left)."""
    ms = [m for r in be.reports for m in r.matches if m.pattern == "loop_relay"]
    return ms


def check_cells(rank, P, rec):
    be = exact(rank, P, rec, "GRUCell loop", M.TwoGRULayers, M.inp, kinds={"loop_scan"})
    ms = _relays(be)
    rec.true("two GRU layers: two relays, strategy 'relay'",
             len(ms) == 2 and all(m.strategy == "relay" for m in ms),
             str([(m.pattern, m.strategy) for m in ms]))
    rec.true("two GRU layers: one step per local token",
             [m.info.get("steps") for m in ms] == [M.T // P] * 2, str([m.info for m in ms]))
    exact(rank, P, rec, "LSTMCell loop, h = c = zeros (two carried states)", M.LSTMCellLoop,
          M.inp, kinds={"loop_scan"})
    exact(rank, P, rec, "GRU, learned h0, final state used and returned", M.GRULearnedH0Final,
          M.inp, kinds={"loop_scan"})
    exact(rank, P, rec, "Elman RNN, exclusive readout, final state unused",
          M.ElmanExclusive, M.inp, kinds={"loop_scan"})
    exact(rank, P, rec, "nonlinear state over blocks of 4 tokens", M.BlockRNN, M.inp,
          kinds={"loop_scan"})
    exact(rank, P, rec, "GRU loop under autocast(bfloat16) inside forward", M.AutocastGRULoop,
          M.inp, kinds={"loop_scan"}, tol=3e-2)


def check_delta_rule(rank, P, rec):
    be = exact(rank, P, rec, "DeltaNet, fla naive_delta_rule (o[:, :, i] = ..., S returned)",
               M.DeltaNetNaive, M.inp, kinds={"loop_scan"})
    ms = _relays(be)
    rec.true("DeltaNet: one relay carrying S", len(ms) == 1 and ms[0].info["states"] >= 1,
             str([m.info for m in ms]))
    exact(rank, P, rec, "DeltaNet, fla's chunkwise reference (WY within chunks, chunk loop)",
          M.DeltaNetChunkwise, M.inp, kinds={"loop_scan"})
    exact(rank, P, rec, "xLSTM recurrent mLSTM (max stabiliser, state (C, n, m))",
          M.MLSTMRecurrent, M.inp, kinds={"loop_scan"})
    exact(rank, P, rec, "causal SDPA then a GRU loop", M.HybridSDPAGRU, M.inp,
          kinds={"attention", "loop_scan"})
    exact(rank, P, rec, "Qwen3-Next torch_recurrent_gated_delta_rule (transformers)",
          M.Qwen3NextGatedDelta, M.inp, kinds={"loop_scan"})
    exact(rank, P, rec, "Qwen3-Next torch_chunk_gated_delta_rule, chunks of 4 (transformers)",
          lambda: M.Qwen3NextGatedDelta(chunk=4), M.inp, kinds={"loop_scan"})


def check_reversed(rank, P, rec):
    be = exact(rank, P, rec, "GRU over reversed(range(T)), ys[t] = h", M.ReversedGRU, M.inp,
               kinds={"loop_scan"})
    rec.true("reversed GRU: one relay", len(_relays(be)) == 1, str(_relays(be)))
    be = exact(rank, P, rec, "bidirectional GRU loops (forward + range(T-1, -1, -1)), finals",
               M.BiGRULoops, M.inp, kinds={"loop_scan"})
    rec.true("bidirectional loops: two relays", len(_relays(be)) == 2, str(_relays(be)))


def check_rnn_modules(rank, P, rec):
    be = exact(rank, P, rec, "2-layer nn.GRU from a learned h0, final state returned",
               M.GRUModuleH0, M.inp, kinds={"loop_scan"})
    rec.true("nn.GRU: matched by rnn_relay",
             [m.pattern for r in be.reports for m in r.matches] == ["rnn_relay"],
             str([m.pattern for r in be.reports for m in r.matches]))
    exact(rank, P, rec, "bidirectional nn.GRU", M.BiGRU, M.inp, kinds={"loop_scan"})
    exact(rank, P, rec, "2-layer bidirectional nn.LSTM, final (h, c)", M.BiLSTM2, M.inp,
          kinds={"loop_scan"})
    exact(rank, P, rec, "bidirectional nn.LSTM with proj_size", lambda: M.BiLSTM2(4, 1), M.inp,
          kinds={"loop_scan"})
    exact(rank, P, rec, "time-major bidirectional nn.GRU", M.BiGRUTimeMajor, M.inp,
          kinds={"loop_scan"})


def check_dropout(rank, P, rec):
    """The gradient of a relayed loop with dropout is the gradient of the function its forward
    computed (the recompute redraws the forward's masks): checked against central differences
    with the masks fixed by the seed (float64)."""
    import spcompile
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = M.GRUDropoutLoop().double()
    x = spcompile.shard_sequence(M.inp()[0].double(), dim=1).requires_grad_()
    v = torch.randn_like(x)
    w = torch.randn(x.shape[0], x.shape[1], M.D, dtype=torch.float64)
    f = torch.compile(model, backend=spcompile.backend())

    def loss(inp):
        torch.manual_seed(1234)  # the same masks on every call (per rank)
        return (f(inp) * w).sum()

    loss(x).backward()
    eps = 1e-6
    with torch.no_grad():
        num = (loss(x + eps * v) - loss(x - eps * v)) / (2 * eps)
    # (every rank's loss depends on the earlier ranks' tokens: sum the directional derivative)
    world = torch.distributed.group.WORLD
    total_num = spcompile.collectives.all_reduce_sum(num.reshape(1), world)
    total = spcompile.collectives.all_reduce_sum((x.grad * v).sum().reshape(1), world)
    err = (total - total_num).abs().item() / max(1e-12, total_num.abs().item())
    rec.true("relay with dropout: gradient = central difference (masks redrawn)", err < 1e-6,
             f"grad·v {total.item():.8g} vs numeric {total_num.item():.8g}")


def check_graph(rank, P, rec):
    """The loop is gone from the graph: one relay_region call, no per-token read left."""
    import spcompile
    torch.manual_seed(0)
    torch._dynamo.reset()
    be = spcompile.backend()
    model = M.GRULearnedH0Final()
    x = spcompile.shard_sequence(M.inp()[0], dim=1)
    torch.compile(model, backend=be)(x)
    gm = be.reports[0].graph if hasattr(be.reports[0], "graph") else None
    rec.true("relay graph: report has the rewritten graph", gm is not None, str(type(gm)))
    if gm is None:
        return
    calls = [n for n in gm.graph.nodes if "relay_region" in str(n.target)]
    cells = [n for n in gm.graph.nodes if "gru_cell" in str(n.target)]
    rec.true("relay graph: one relay_region call, no gru_cell left in the model graph",
             len(calls) == 1 and not cells, f"{len(calls)} relays, {len(cells)} cells")


def check_refusals(rank, P, rec):
    refused(rank, P, rec, "GRU state from this rank's first token", M.GRUFromFirstToken, M.inp,
            text=("loop over",))
    refused(rank, P, rec, "GRU, a middle step's output used after the loop",
            M.GRUStepValueUsed, M.inp, text=("loop over",))
    refused(rank, P, rec, "Elman exclusive readout, two tokens per rank", M.ElmanExclusive,
            lambda: [torch.randn(M.B, 2 * P, M.D)], T=2 * P, text=("only two steps per rank",))


def check_p4(rank, P, rec):
    exact(rank, P, rec, "P4: two GRU layers", M.TwoGRULayers, M.inp, kinds={"loop_scan"})
    exact(rank, P, rec, "P4: DeltaNet naive", M.DeltaNetNaive, M.inp, kinds={"loop_scan"})
    exact(rank, P, rec, "P4: LSTMCell loop", M.LSTMCellLoop, M.inp, kinds={"loop_scan"})
    exact(rank, P, rec, "P4: Elman exclusive", M.ElmanExclusive, M.inp, kinds={"loop_scan"})
    exact(rank, P, rec, "P4: xLSTM mLSTM recurrent", M.MLSTMRecurrent, M.inp,
          kinds={"loop_scan"})
    exact(rank, P, rec, "P4: 2-layer nn.GRU from a learned h0", M.GRUModuleH0, M.inp,
          kinds={"loop_scan"})
    exact(rank, P, rec, "P4: bidirectional GRU loops, finals", M.BiGRULoops, M.inp,
          kinds={"loop_scan"})
    exact(rank, P, rec, "P4: 2-layer bidirectional nn.LSTM", M.BiLSTM2, M.inp,
          kinds={"loop_scan"})
    exact(rank, P, rec, "P4: Qwen3-Next chunked gated delta rule, final state returned",
          lambda: M.Qwen3NextGatedDelta(chunk=4, final=True), M.inp, kinds={"loop_scan"})
