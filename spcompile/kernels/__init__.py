"""Kernel families (one folder each): reference PyTorch, Triton, and the custom-op wrapper."""
from .linear_scan import (Check, check_linear_scan, chunked_linear_scan, cumulative_log_decay,
                          decay_kind, kernel_for, linear_scan, naive_linear_scan, total_log_decay)

__all__ = ["Check", "check_linear_scan", "chunked_linear_scan", "cumulative_log_decay",
           "decay_kind", "kernel_for", "linear_scan", "naive_linear_scan", "total_log_decay"]
