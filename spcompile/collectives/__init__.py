"""Cross-rank hand-offs for sequence parallelism (DESIGN.md §3-4).

* state scans: ``exclusive_state_scan`` (allgather / allscan / ring) and ``sp_linear_scan``;
* halos for causal token mixing: ``halo_exchange`` (``halo_from_next`` for left shifts,
  ``halo_roll`` on a ring for ``torch.roll``); ``flip_sequence`` (the mirror rank's shard);
* softmax attention across shards: ``sp_attention`` (kv_allgather / ring_attention / ulysses);
* reductions and re-sharding: ``all_reduce_sum``, ``all_reduce_max``, ``gather_sequence``,
  ``shard_sequence``, ``sync_gradients``;
* plumbing: groups by name, ``count_traffic``, ``set_timeout``, ``set_validation``.

Every function accepts ``group`` as a ProcessGroup, its name, or None (P = 1: no
communication). The heavy lifting lives in ``spcompile::`` custom ops that take the group by name,
run eagerly, trace under FakeTensor / torch.compile and have exact backward formulas.
"""
from .runtime import (CollectiveError, Traffic, count_traffic, get_timeout, group_name,
                      group_rank, group_size, resolve_group, set_timeout, set_validation)
from .state_scan import STRATEGIES, exclusive_state_scan
from .sp_scan import local_final_state, sp_linear_scan
from .halo import flip_sequence, halo_exchange, halo_from_next, halo_roll
from .attention import ATTENTION_STRATEGIES, sp_attention
from .reduce import (all_reduce_max, all_reduce_sum, gather_sequence, shard_sequence,
                     sync_gradients)

__all__ = ["CollectiveError", "Traffic", "count_traffic", "get_timeout", "group_name",
           "group_rank", "group_size", "resolve_group", "set_timeout", "set_validation",
           "STRATEGIES", "exclusive_state_scan", "local_final_state", "sp_linear_scan",
           "halo_exchange", "halo_from_next", "halo_roll", "flip_sequence", "ATTENTION_STRATEGIES", "sp_attention",
           "all_reduce_max", "all_reduce_sum", "gather_sequence", "shard_sequence",
           "sync_gradients"]
