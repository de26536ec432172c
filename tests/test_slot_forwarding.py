"""canonicalize's slot forwarding (``_forward_slot_reads``): a read of a buffer slot takes the
value last written there — fla's ``S[:, i] = S[:, i - 1].clone() * d + kv`` becomes a chain
of values — and only where that is sound. Each program runs through Dynamo with just this pass
applied and must give the eager numbers; the ones it must not touch are checked untouched."""
import pytest
import torch
import torch._dynamo

from spcompile.passes.canonicalize import _forward_slot_reads


def _run(fn, *args):
    seen = {}

    def backend(gm, example_inputs):
        before = [n.format_node() for n in gm.graph.nodes]
        _forward_slot_reads(gm)
        gm.recompile()
        seen["changed"] = before != [n.format_node() for n in gm.graph.nodes]
        return gm.forward

    torch._dynamo.reset()
    want = fn(*[a.clone() for a in args])
    got = torch.compile(fn, backend=backend, fullgraph=True)(*[a.clone() for a in args])
    torch.testing.assert_close(got, want)
    return seen["changed"]


def chain(x):
    S = torch.zeros(2, 4, 3)
    for i in range(1, 4):
        S[:, i] = S[:, i - 1].clone() * 0.5 + x[:, i - 1]
    return S * 1.0


def value_mutated_later(x):
    S = torch.zeros(2, 4, 3)
    h = torch.zeros(2, 3)
    out = []
    for i in range(4):
        S[:, i] = h
        h += x[:, i]  # the slot holds h's value before this
        out.append(S[:, i] * 2)
    return torch.stack(out, 1)


def buffer_mutated_after(x):
    S = torch.zeros(2, 4, 3)
    for i in range(1, 4):
        S[:, i] = S[:, i - 1] * 0.5 + x[:, i - 1]
    S.mul_(2.0)
    return S[:, 3] + S[:, 2]


def view_used_after_overwrite(x):
    S = torch.zeros(4, 2, 3)
    S[0] = x[:, 0] * 1.0
    r = S[0].view(6)
    S[0] = x[:, 1] * 1.0
    return r * 1.0


def value_is_view_of_mutated(x):
    S = torch.zeros(2, 4, 3)
    xx = x * 1.0
    S[:, 0] = xx[:, 0]
    xx.mul_(3.0)
    return S[:, 0] * 1.0


def view_of_buffer_before_writes(x):
    S = torch.zeros(2, 4, 3)
    tail = S[:, 1:]
    for i in range(1, 4):
        S[:, i] = S[:, i - 1] * 0.5 + x[:, i - 1]
    return tail * 1.0


def test_chain_is_forwarded():
    assert _run(chain, torch.randn(2, 4, 3))


@pytest.mark.parametrize("fn", [value_mutated_later, buffer_mutated_after,
                                view_used_after_overwrite, value_is_view_of_mutated,
                                view_of_buffer_before_writes])
def test_unsound_forwarding_is_left_alone(fn):
    assert not _run(fn, torch.randn(2, 4, 3))
