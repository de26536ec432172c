"""Activation-checkpointed bodies are inlined by canonicalize and keep their recompute tags,
so AOTAutograd still recomputes them (fewer tensors saved than without checkpointing)."""
import torch
import torch._dynamo
import torch.nn as nn
import torch.utils.checkpoint as cp
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import spcompile
from spcompile.passes.inline_hops import inline_wrappers
from models import two_layer


class Blocks(nn.Module):
    def __init__(self, ckpt: bool):
        super().__init__()
        self.blocks, self.ckpt = two_layer("mul"), ckpt

    def forward(self, x):
        for b in self.blocks:
            x = cp.checkpoint(b, x, use_reentrant=False) if self.ckpt else b(x)
        return x


def test_inline_keeps_tags():
    seen = {}

    def grab(gm, example_inputs):
        seen["n"] = inline_wrappers(gm)
        seen["tagged"] = sum(1 for n in gm.graph.nodes if "recompute" in n.meta)
        seen["hops"] = [n for n in gm.graph.nodes if "checkpoint" in str(n.target)]
        seen["ids"] = {n.meta["ac_graph_id"] for n in gm.graph.nodes if "ac_graph_id" in n.meta}
        return gm.forward

    torch._dynamo.reset()
    torch.compile(Blocks(True), backend=grab)(torch.randn(2, 16, 16))
    assert seen["n"] == 2 and not seen["hops"]
    assert seen["tagged"] > 20 and len(seen["ids"]) == 2


def test_checkpointing_still_recomputes():
    saved = {}
    for ckpt in (False, True):
        def fw(gm, example_inputs, ckpt=ckpt):
            saved[ckpt] = len(gm.graph.output_node().args[0])
            return make_boxed_func(gm.forward)

        comp = aot_autograd(fw_compiler=fw,
                            bw_compiler=lambda gm, ex: make_boxed_func(gm.forward))
        torch._dynamo.reset()
        torch.manual_seed(0)
        m = Blocks(ckpt)
        x = torch.randn(2, 16, 16, requires_grad=True)
        out = torch.compile(m, backend=spcompile.backend(compiler=comp))(x)
        out.sum().backward()
        ref = x.grad.clone()
        x.grad = None
        m(x).sum().backward()
        assert torch.allclose(ref, x.grad, atol=1e-5)
    assert saved[True] < saved[False], saved
