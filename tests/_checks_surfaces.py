"""Worker-side checks for tests/test_surfaces_dist.py: how training code around the model is
written — activation checkpointing, eval under no_grad, autocast, dict outputs, new input
shapes after the first compile — on gloo ranks, against the full-sequence eager run."""
from __future__ import annotations

import copy

import torch
import torch._dynamo
import torch.nn as nn
import torch.utils.checkpoint as cp

import spcompile
from _checks_backend import compare_sharded
from models import Block, Hybrid, LinearAttention, ShortConv, SoftmaxAttention, two_layer


class CheckpointWhole(nn.Module):
    """HF-style gradient checkpointing of a whole hybrid stack (non-reentrant)."""

    def __init__(self):
        super().__init__()
        self.inner = Hybrid()

    def forward(self, x):
        return cp.checkpoint(self.inner, x, use_reentrant=False)


class CheckpointPerBlock(nn.Module):
    """Per-block checkpointing in a loop, the old reentrant flavour."""

    def __init__(self):
        super().__init__()
        self.blocks = two_layer("mul")

    def forward(self, x):
        for b in self.blocks:
            x = cp.checkpoint(b, x, use_reentrant=True)
        return x


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = two_layer("masked_fill")
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = self.inner(x)
        return {"logits": self.head(h), "pooled": h.mean(1)}


class GraphBreaks(nn.Module):
    """A data-dependent branch and a print split the model into several Dynamo graphs; sharded
    values cross the graph boundaries as plain tensors."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.b1 = Block(LinearAttention(d, spelling="mul"), d)
        self.conv = ShortConv(d)
        self.b2 = Block(SoftmaxAttention(d, heads=2, kv_heads=1), d)

    def forward(self, x):
        h = self.b1(x)
        if h.abs().max() > 1e6:  # reads a global max: the same branch on every rank
            h = h * 0.5
        h = self.conv(h)
        print("", end="")
        return self.b2(h), h.mean()


def _shard(t, rank, P):
    n = t.shape[1] // P
    return t[:, rank * n:(rank + 1) * n]


def check_checkpointing(rank, P, rec):
    be = compare_sharded(rank, P, rec, "checkpoint(whole)", lambda: CheckpointWhole())
    kinds = {m.kind for r in be.reports for m in r.matches}
    rec.true("checkpoint(whole): body inlined, scan and attention matched",
             {"linear_scan", "attention"} <= kinds, str(sorted(kinds)))
    compare_sharded(rank, P, rec, "checkpoint(per block, reentrant)", lambda: CheckpointPerBlock())


def check_eval_no_grad(rank, P, rec):
    torch.manual_seed(0)
    m = Hybrid().eval()
    x = torch.randn(2, 32, 16)
    with torch.no_grad():
        ref = m(x)
        torch._dynamo.reset()
        got = torch.compile(copy.deepcopy(m), backend=spcompile.backend())(
            spcompile.shard_sequence(x, dim=1))
    rec.close("eval/no_grad: output", got[0], _shard(ref[0], rank, P))
    rec.close("eval/no_grad: mean loss", got[1], ref[1])


def check_autocast(rank, P, rec):
    torch.manual_seed(0)
    m = two_layer("mul")
    x = torch.randn(2, 32, 16)
    xf = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = m(xf)
    ref.float().square().sum().backward()
    torch._dynamo.reset()
    sm = copy.deepcopy(m)
    sm.zero_grad()
    c = torch.compile(sm, backend=spcompile.backend())
    xs = spcompile.shard_sequence(x, dim=1).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = c(xs)
    got.float().square().sum().backward()
    rec.close("autocast bf16: output", got.float(), _shard(ref, rank, P).float(), 3e-2)
    rec.close("autocast bf16: input grad", xs.grad, _shard(xf.grad, rank, P), 5e-2)


def check_dict_output(rank, P, rec):
    torch.manual_seed(0)
    m = DictOut()
    x = torch.randn(2, 32, 16)
    ref = m(x)
    torch._dynamo.reset()
    got = torch.compile(copy.deepcopy(m), backend=spcompile.backend())(
        spcompile.shard_sequence(x, dim=1))
    rec.close("dict output: logits", got["logits"], _shard(ref["logits"], rank, P))
    rec.close("dict output: pooled over the sequence", got["pooled"], ref["pooled"])


def check_new_shapes(rank, P, rec):
    """A smaller last batch and a longer sequence after the first compile: recompiled statically
    (Dynamo would otherwise make the dimension symbolic)."""
    torch.manual_seed(0)
    m = two_layer("mul")
    torch._dynamo.reset()
    c = torch.compile(copy.deepcopy(m), backend=spcompile.backend())
    for B, T in ((2, 32), (3, 32), (2, 64), (1, 16)):
        x = torch.randn(B, T, 16)
        got = c(spcompile.shard_sequence(x, dim=1))
        rec.close(f"new shapes: B={B} T={T}", got, _shard(m(x), rank, P))


def check_graph_breaks(rank, P, rec):
    be = compare_sharded(rank, P, rec, "graph breaks", lambda: GraphBreaks())
    rec.true("graph breaks: several graphs, each rewritten", len(be.reports) >= 2,
             str(len(be.reports)))
