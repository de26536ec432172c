"""Pass 4 — plan: one strategy per match.

A forced option (``strategy=`` for scans, ``attention_strategy=`` for softmax layers) wins;
otherwise the cost model ranks the applicable strategies for the match's shapes and the hardware
profile, and the cheapest is taken. The ranking and the reason stay on the match for ``explain``.
At P = 1 there is nothing to hand off: the strategy is 'local'.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch.fx as fx

from .pipeline import Ctx, register_pass

DEFAULTS = {"linear_scan": "allgather", "attention": "kv_allgather", "halo": "halo",
            "reduction": "allreduce", "positions": "offset", "cumsum": "prefix",
            "dispatch": "local", "shape": "local"}


def _problem(match, ctx: Ctx) -> Optional[Dict[str, Any]]:
    info = match.info
    T = ctx.global_seq_len or 1
    if match.kind == "linear_scan":
        return dict(B=1, T=T, H=info.get("heads", 1), d_k=info.get("d_k", 64),
                    d_v=info.get("d_v", 64), decay=info.get("decay", "none"))
    if match.kind == "attention":
        return dict(B=info.get("B", 1), T=T, H=info.get("H", 1), d_k=info.get("D", 64),
                    d_v=info.get("D", 64), H_kv=info.get("H_kv", info.get("H", 1)),
                    causal=info.get("causal", True))
    return None


def choose(match, ctx: Ctx) -> None:
    if ctx.world_size == 1:
        match.strategy, match.reason = "local", "P = 1: no hand-off"
        return
    only = match.info.get("only_strategy")
    if only:  # e.g. SDPA with a general mask: K/V all-gathered, the mask's rows recomputed
        match.strategy = only
        match.reason = match.info.get("_only_reason", "the only strategy for this form")
        return
    forced = None
    if match.kind == "linear_scan" and ctx.options.strategy != "auto":
        forced = ctx.options.strategy
    if match.kind == "attention" and ctx.options.attention_strategy != "auto":
        forced = ctx.options.attention_strategy
    if forced is not None:
        match.strategy, match.reason = forced, "forced by option"
        return
    problem = _problem(match, ctx)
    if problem is None:
        match.strategy = DEFAULTS.get(match.kind, "default")
        match.reason = match.reason or "only strategy"
        return
    try:
        from .. import cost_model
        choices = cost_model.plan(match.kind, P=ctx.world_size,
                                  hardware=ctx.options.hardware, **problem)
    except Exception as e:  # no cost model for this case: the default, said plainly
        match.strategy = DEFAULTS[match.kind]
        match.reason = f"default ({type(e).__name__}: {e})"
        return
    match.alternatives = list(choices)
    best = choices[0]
    match.strategy = best.strategy
    params = getattr(best, "params", None) or {}
    if params.get("blocks"):
        match.info["blocks"] = int(params["blocks"])
    match.reason = f"cheapest predicted ({best.seconds * 1e3:.3g} ms)"


@register_pass("plan")
def plan(gm: fx.GraphModule, ctx: Ctx) -> fx.GraphModule:
    """Choose a hand-off strategy per match (forced option or cost model)."""
    for m in ctx.matches:
        choose(m, ctx)
    return gm
