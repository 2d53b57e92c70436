"""The KV store: fixed-capacity buffers that eviction policies keep within a budget.

store.py holds the buffers, counters, device clock, decode attention and eviction (what a CUDA graph of
a decode step records together); prefill.py a prompt chunk's attention, scoring and compaction. What a
policy sees of them (LayerState, DecodeView, PrefillView) is the policy API's: engine/policies/views.py.
"""
from .store import KV_DTYPES, CacheStats, KVStore, parse_kv_dtype

__all__ = ["KV_DTYPES", "CacheStats", "KVStore", "parse_kv_dtype"]
