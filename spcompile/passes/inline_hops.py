"""Inline wrapper higher-order ops (activation checkpointing, ``wrap``) into the graph.

``torch.utils.checkpoint.checkpoint(block, x)`` inside a compiled model reaches the backend as
one ``tag_activation_checkpoint(body, *operands)`` node whose body is a separate GraphModule;
Dynamo's plain ``wrap`` HOP looks the same. The sequence-parallel passes reason about one flat
graph, so canonicalize copies each body into its caller first. The checkpointing itself is
kept: every inlined node carries the tags that ``tag_activation_checkpoint`` would have put on
it (``recompute = PREFER_RECOMPUTE`` and one ``ac_graph_id`` per call), which AOTAutograd copies
into the joint graph and its partitioner honours, recomputing those nodes in the backward
instead of saving them. (Nodes that spcompile's rewrites create in their place carry no tag,
so their outputs, e.g. a scan's, are saved rather than recomputed with a second collective.)
"""
from __future__ import annotations

import itertools
import operator
from typing import Dict, Optional

import torch
import torch.fx as fx

_WRAPPERS = ("tag_activation_checkpoint", "wrap")
_ids = itertools.count(10_000)  # ac_graph_ids of inlined checkpoint regions


def _hop_name(node: fx.Node) -> Optional[str]:
    if node.op != "call_function":
        return None
    name = getattr(node.target, "_name", None) or getattr(node.target, "__name__", None)
    return name if name in _WRAPPERS else None


def _body(gm: fx.GraphModule, node: fx.Node) -> Optional[fx.GraphModule]:
    b = node.args[0] if node.args else None
    if not (isinstance(b, fx.Node) and b.op == "get_attr"):
        return None
    body = getattr(gm, b.target, None)
    return body if isinstance(body, fx.GraphModule) else None


def _inlinable(gm: fx.GraphModule, node: fx.Node) -> bool:
    body = _body(gm, node)
    if body is None or node.kwargs.get("context_fn") is not None:
        return False
    n_ph = sum(1 for n in body.graph.nodes if n.op == "placeholder")
    if n_ph != len(node.args) - 1:
        return False
    # every use reads one output by a constant index
    return all(u.op == "call_function" and u.target is operator.getitem
               and isinstance(u.args[1], int) for u in node.users)


def _inline_one(gm: fx.GraphModule, node: fx.Node, hop: str) -> None:
    body = _body(gm, node)
    tags: Dict[str, object] = {}
    if hop == "tag_activation_checkpoint":
        from torch.utils.checkpoint import CheckpointPolicy
        tags = {"recompute": CheckpointPolicy.PREFER_RECOMPUTE, "ac_graph_id": next(_ids)}
    env: Dict[fx.Node, object] = {}
    phs = [n for n in body.graph.nodes if n.op == "placeholder"]
    env.update(zip(phs, node.args[1:]))
    outs = None
    prefix = node.args[0].target
    with gm.graph.inserting_before(node):
        for bn in body.graph.nodes:
            if bn.op == "placeholder":
                continue
            if bn.op == "output":
                outs = fx.node.map_arg(bn.args[0], lambda a: env[a])
                break
            if bn.op == "get_attr":
                # a nested body or constant of the body: hoist it into the caller under a new name
                obj = body
                for part in bn.target.split("."):
                    obj = getattr(obj, part)
                name = f"{prefix}_{bn.target.replace('.', '_')}"
                i = 0
                while hasattr(gm, name if i == 0 else f"{name}_{i}"):
                    i += 1
                name = name if i == 0 else f"{name}_{i}"
                if isinstance(obj, torch.nn.Module):
                    gm.add_submodule(name, obj)
                else:
                    setattr(gm, name, obj)
                new = gm.graph.get_attr(name)
            else:
                new = gm.graph.node_copy(bn, lambda a: env[a])
            new.meta = dict(bn.meta)
            new.meta.update(tags)
            env[bn] = new
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    for u in list(node.users):
        u.replace_all_uses_with(outs[u.args[1]])
        gm.graph.erase_node(u)
    body_attr = node.args[0]
    gm.graph.erase_node(node)
    if not body_attr.users:
        gm.graph.erase_node(body_attr)
        if not any(n.op == "get_attr" and n.target == body_attr.target for n in gm.graph.nodes):
            try:
                delattr(gm, body_attr.target)
            except AttributeError:
                pass


def inline_wrappers(gm: fx.GraphModule) -> int:
    """Inline every ``tag_activation_checkpoint`` / ``wrap`` call (nested ones too); returns how
    many were inlined. Calls that cannot be inlined (a selective-checkpointing ``context_fn``,
    a body whose arity does not match) are left alone, and later passes treat them as opaque."""
    count = 0
    while True:
        todo = [(n, h) for n in gm.graph.nodes
                if (h := _hop_name(n)) is not None and _inlinable(gm, n)]
        if not todo:
            break
        for n, h in todo:
            _inline_one(gm, n, h)
            count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
