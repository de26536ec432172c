"""spcompile: a torch.compile backend that makes linear-attention, state-space and hybrid models
sequence parallel without rewriting them.

    model = torch.compile(model, backend="sp")          # P = the WORLD group, or 1
    out = model(spcompile.shard_sequence(x, dim=1))     # each rank feeds its contiguous shard

See README.md for the contract, and ``spcompile.explain`` / the ``spcompile`` CLI for what the
backend did to a model.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .backend import Options, SPBackend, backend, sp_backend
from .explain import Report, explain
from .passes.fallback import SequenceParallelError
from .kernels import linear_scan
from .annotations import (DeclarationError, exclude, linear_attention, sequence_input,
                          ssm_scan)
from .sequence import gather_sequence, mark_sequence, shard_sequence, sync_gradients

__all__ = ["DeclarationError", "exclude", "linear_attention", "sequence_input", "ssm_scan",
           "Options", "Report", "SPBackend", "SequenceParallelError", "backend", "explain",
           "gather_sequence", "linear_scan", "mark_sequence", "shard_sequence", "sp_backend",
           "sync_gradients", "__version__"]
