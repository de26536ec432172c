"""Byte accounting hook for the graph ops in ``spcompile.ops``.

Forwards to the traffic counters of ``spcompile.collectives`` (``count_traffic()``), so the bytes
of fallback gathers and all-reduces show up beside those of the state hand-offs.
"""
from __future__ import annotations


def count(kind: str, sent: int, recv: int) -> None:
    try:
        from .collectives import runtime as traffic
    except ImportError:  # collectives not importable: nothing counts
        return
    record = getattr(traffic, "record", None)
    if record is not None:
        record(kind, sent, recv)
