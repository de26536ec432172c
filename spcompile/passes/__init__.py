"""The pass pipeline (see pipeline.py): canonicalize → sequence_axis → detect → plan → rewrite →
fallback → verify."""
from .pipeline import Ctx, Pass, PassRecord, op_counts, pipeline, run_pipeline

__all__ = ["Ctx", "Pass", "PassRecord", "op_counts", "pipeline", "run_pipeline"]
