"""The linear-scan kernel family: naive oracle, chunked reference, Triton kernels, custom op."""
from .naive import naive_linear_scan
from .op import (Check, check_linear_scan, cumulative_log_decay, kernel_for, linear_scan,
                 total_log_decay)
from .reference import chunked_linear_scan, decay_kind

__all__ = ["Check", "check_linear_scan", "chunked_linear_scan", "cumulative_log_decay",
           "decay_kind", "kernel_for", "linear_scan", "naive_linear_scan", "total_log_decay"]
