"""The KV store: fixed-capacity buffers that eviction policies keep within a budget.

allocated.py holds the store under adaptive or pyramid allocation (a pool shared by a layer's KV heads,
allocation.py the rules); store.py holds the buffers, counters, device clock, decode attention and eviction (what a CUDA graph of
a decode step records together); prefill.py a prompt chunk's attention, scoring and compaction. What a
policy sees of them (LayerState, DecodeView, PrefillView) is the policy API's: engine/policies/views.py.
"""
from .allocated import AllocatedKVStore, make_store
from .store import KV_DTYPES, CacheStats, KVStore, parse_kv_dtype

__all__ = ["KV_DTYPES", "AllocatedKVStore", "CacheStats", "KVStore", "make_store", "parse_kv_dtype"]
