"""Worker-side checks for tests/test_examples.py: every example, sharded on the gloo group,
against its full-sequence eager run (outputs, input grads, parameter grads summed over ranks).

One check function runs all examples, so that the whole file costs one spawn."""
from __future__ import annotations

import importlib
import os
import sys
import traceback

import torch
import torch._dynamo

EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "examples")
EXAMPLES = ["linear_transformer", "retnet", "mamba2_ssd", "gla", "lightning", "hybrid",
            "mamba_conv"]
TOL = 1e-4


def check_all_examples(rank, P, rec):
    if EXAMPLES_DIR not in sys.path:
        sys.path.insert(0, EXAMPLES_DIR)
    from _common import sharded_vs_eager
    for name in EXAMPLES:
        try:
            mod = importlib.import_module(name)
            torch.manual_seed(0)
            torch._dynamo.reset()
            model, inputs = mod.factory()
            errs, be = sharded_vs_eager(model, inputs, rank, P,
                                        **getattr(mod, "COMPILE_OPTIONS", {}))
        except Exception:
            rec.rows.append(dict(name=f"{name}: runs", err=float("inf"), tol=0.0,
                                 info=traceback.format_exc()[-2500:]))
            continue
        for what, err in errs.items():
            rec.rows.append(dict(name=f"{name}: {what}", err=err, tol=TOL, info=""))
        matches = sorted({f"{m.kind}/{m.pattern}" for r in be.reports for m in r.matches})
        fallbacks = [str(f) for r in be.reports for f in r.fallbacks]
        rec.rows.append(dict(name=f"{name}: no fallback", err=float("inf") if fallbacks else 0.0,
                             tol=0.0, info="matches: " + ", ".join(matches) +
                             ("; fallbacks: " + " | ".join(fallbacks) if fallbacks else "")))
