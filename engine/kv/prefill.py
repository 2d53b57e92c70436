"""A prompt chunk in one layer of the store: exact attention over cache + chunk, the policy's scores, and
compaction of the kept entries into the first slots.

    entries = gather(...)        every entry of cache + chunk, cache first, rotated as attention sees them
    out, colsum = attend(...)    causal attention, plus the column sums a scoring policy asked for
    keep = keep_indices(...)     protected entries first, then the highest scores (only over budget)
    compact(...)                 the kept entries written back into the static buffers
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from .. import ops
from ..policies.base import Policy
from ..policies.reduce import column_scores, mean_over_heads
from ..policies.views import LayerState, PrefillView
from ..rope import Rope

if TYPE_CHECKING:
    from ..dist import TensorParallel

NORM_KIND = {"l1": 1, "l2": 2, "linf": 0}  # ops.value_norm's code for each Policy.value_norm


class Store(Protocol):
    """What a prompt chunk reads of the store (engine.kv.KVStore), before the chunk changes anything."""

    policy: Policy
    rope: Rope
    dtype: torch.dtype  # the model's: the chunk's q/k/v and the attention output
    kv_dtype: torch.dtype  # of the stored K and V
    query_dtype: torch.dtype  # attention's compute dtype: the model's, or fp32 where the cache differs
    scale: float  # 1 / sqrt(head_dim)
    mask: bool  # keep every entry, mask the evicted ones (the papers' protocol)
    cache_positions: bool  # keys rotated at their rank in the cache, not their original position
    capacity: int  # slots per (layer, KV head)
    budget: int  # entries kept per (layer, KV head)
    t: int  # tokens seen: the chunk's first position
    used: int  # slots written so far
    occupancy: int  # valid entries per (layer, KV head)
    tp: TensorParallel | None  # the tensor-parallel group holding the other heads (None: all are here)


@dataclass
class Entries:
    """Every entry of cache + chunk (N = used + T), cache first, and the chunk's queries."""

    layer: LayerState  # k as stored (pre-RoPE with positions="cache"), v, pos, rank, state (chunk rows zero)
    keys: torch.Tensor  # (B, Hkv, N, D) the keys as attention sees them (rotated), cache or query dtype
    q: torch.Tensor  # (B, H, T, D) the queries, rotated, in the store's query dtype
    qpos: torch.Tensor  # (B, T) int32 original positions of the queries


def prefill_layer(store: Store, st: LayerState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                  ) -> tuple[torch.Tensor, int]:
    """q (B, H, T, D), k/v (B, Hkv, T, D) before RoPE -> the attention output (B, H, T, D) and the number of
    slots in use once the kept entries are compacted into `st`."""
    T = q.shape[2]
    out, e, score = score_chunk(store, st, q, k, v, store.budget, store.occupancy + T > store.budget)
    keep = None if score is None else keep_indices(store.policy, score, e.layer.pos, store.t + T, store.budget,
                                                     store.tp)
    return out, compact(st, e.layer, keep, store.mask, store.capacity)


def score_chunk(store: Store, st: LayerState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, budget: int,
                over: bool) -> tuple[torch.Tensor, Entries, torch.Tensor | None]:
    """Attention of a chunk over cache + chunk -> the output (B, H, T, D), every entry, and when the entries
    exceed the budget (`over`: the caller's count) the policy's scores of them, with `budget` tokens per KV
    head to keep (None: nothing to drop; the policy's state is still updated where it asks)."""
    policy, T = store.policy, q.shape[2]
    e = gather(store, st, q, k, v)
    over_budget = over and e.keys.shape[2] > 0
    rows = T if policy.prefill_rows is None else min(policy.prefill_rows, T)
    wants_colsum = policy.prefill_rows != 0 and (over_budget or policy.needs_acc or policy.observes_prefill)
    bias = None if policy.logit_bias is None else e.layer.state[policy.logit_bias]  # the chunk's entries: 0
    out, colsum = attend(e, rows, store.scale, policy.group_reduce if wants_colsum else None, bias)
    out = out.to(store.dtype)  # wo's input
    pos = e.layer.pos
    rows_seen = (T - torch.searchsorted(e.qpos[0].contiguous(), pos.clamp(min=0).reshape(-1), right=False)
                 ).reshape(pos.shape).float() * (pos >= 0)
    view = PrefillView(layer=e.layer, q=e.q, k=e.keys, colsum=colsum, n_rows=rows, rows_seen=rows_seen,
                       budget=budget, tp=store.tp, rope=store.rope if store.cache_positions else None,
                       merges=store.merge_count)
    if over_budget:
        return out, e, policy.prefill_scores(view)
    if colsum is not None or policy.observes_prefill:
        policy.prefill_scores(view)  # accumulate state even when nothing is evicted yet
    return out, e, None


def gather(store: Store, st: LayerState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Entries:
    """The stored entries of one layer followed by the chunk's, keys rotated at the policy's positions.
    The chunk's keys and values are rounded to the cache dtype as they will be stored, and rotated in the
    query dtype as decode attention rotates them: attention over the chunk sees what later steps will."""
    B, H, T, _ = q.shape
    Hkv, dev, t, old = k.shape[1], q.device, store.t, slice(0, store.used)
    rope, dtype, qdtype = store.rope, store.kv_dtype, store.query_dtype
    q, k = q.to(qdtype), k.to(qdtype)
    pos_new = torch.arange(t, t + T, dtype=torch.int32, device=dev).expand(B, Hkv, T)
    qpos = torch.arange(t, t + T, dtype=torch.int32, device=dev).expand(B, T).contiguous()
    if store.cache_positions:  # rotated at their rank among the kept entries
        rank_new = torch.arange(store.occupancy, store.occupancy + T, device=dev).expand(B, Hkv, T)
        rank = torch.cat([st.rank[:, :, old], rank_new], dim=2)
        stored = torch.cat([st.k[:, :, old], k.to(dtype)], dim=2)
        keys, q_at = rope.rotate(stored.to(qdtype), rank), rank_new
    else:  # rotated once, at their original positions, and stored so
        rank = None
        stored = keys = torch.cat([st.k[:, :, old], rope.rotate(k, pos_new).to(dtype)], dim=2)
        q_at = pos_new
    state = {name: torch.cat([s[:, :, old], torch.zeros(B, Hkv, T, device=dev)], dim=2)
             for name, s in st.state.items()}
    v = v.to(dtype)
    if "vnorm" in state:
        nv = torch.empty(B, Hkv, T, device=dev)
        ops.value_norm(v.contiguous(), NORM_KIND[store.policy.value_norm], nv)
        state["vnorm"][:, :, store.used :] = nv
    layer = LayerState(k=stored, v=torch.cat([st.v[:, :, old], v], dim=2),
                       pos=torch.cat([st.pos[:, :, old], pos_new], dim=2), state=state, rank=rank, extra=st.extra)
    return Entries(layer=layer, keys=keys, q=rope.rotate(q, q_at[:, :1].expand(B, H, T)), qpos=qpos)


def attend(e: Entries, rows: int, scale: float, reduce: str | None, bias: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention of the chunk over every entry -> (B, H, T, D), and with `reduce` the (B, Hkv, N)
    column sums over the last `rows` query rows, group-reduced that way (the kernel fuses "mean"). Keys and
    values are read in the queries' dtype (exact where the cache is narrower: fp32 queries). `bias`
    (B, Hkv, N): per-entry logit offsets (KeepKV's log votes), None: none."""
    q, pos = e.q, e.layer.pos
    keys, vals = e.keys.to(q.dtype), e.layer.v.to(q.dtype)
    B, H, T, D = q.shape
    Hkv, n = keys.shape[1], keys.shape[2]
    fused = reduce == "mean"
    colsum = None
    if reduce is not None:
        colsum = (torch.empty(B, Hkv, n, device=q.device) if fused
                  else column_scores(q, keys, e.qpos, pos, rows, scale, reduce, bias))
    out = None
    if n == T:  # no cache entries: a bias would be all 0
        # A plain causal prompt: SDPA gives the output fastest, and the same bits whatever the policy
        # (the fused kernel then runs only for the column sums a scoring policy asked for).
        out = F.scaled_dot_product_attention(q, keys, vals, is_causal=True, enable_gqa=H != Hkv)
    if out is None or fused:
        kernel_out = torch.empty(B, H, T, D, dtype=q.dtype, device=q.device)
        lse = torch.empty(B, H, T, device=q.device)
        ops.prefill_attention(q.contiguous(), keys.contiguous(), vals.contiguous(), e.qpos, pos.contiguous(),
                              scale, kernel_out, lse, colsum if fused else None, rows, scale,
                              None if bias is None else bias.contiguous())
        out = kernel_out if out is None else out
    return out, colsum


def keep_indices(policy: Policy, score: torch.Tensor, pos: torch.Tensor, end: int, budget: int,
                 tp: TensorParallel | None = None) -> torch.Tensor:
    """(B, Hkv, budget) entries to keep: protected first, then the highest scores, ties to later positions."""
    protected = (pos >= 0) & ((pos < policy.sinks) | (pos >= end - policy.recent))
    key = score.float()
    if policy.layer_wide:  # one decision for the layer: every KV head ranks by the mean over heads (all ranks')
        key = mean_over_heads(key, tp).expand_as(pos)
    key = key.masked_fill(pos < 0, -math.inf).masked_fill(protected, math.inf)
    by_pos = torch.argsort(pos, dim=2, descending=True, stable=True)
    order = torch.argsort(key.gather(2, by_pos), dim=2, descending=True, stable=True)
    return by_pos.gather(2, order)[:, :, :budget]


def compact(st: LayerState, merged: LayerState, keep: torch.Tensor | None, mask: bool, capacity: int) -> int:
    """Write the kept entries back into the static buffers (or, with `mask`, keep all and mask the rest);
    returns the number of slots in use."""
    n = merged.pos.shape[2]
    if keep is None:
        idx, count = None, n
    elif mask:
        drop = torch.ones_like(merged.pos, dtype=torch.bool).scatter_(2, keep, False)
        merged.pos = merged.pos.masked_fill(drop, -1)
        for name in merged.state:
            merged.state[name] = merged.state[name].masked_fill(drop, 0.0)
        idx, count = None, n
    else:
        idx = keep.sort(dim=2).values  # keep slot order stable (position order after the first prefill)
        count = idx.shape[2]
    if count > capacity:
        raise RuntimeError(f"internal: {count} entries do not fit {capacity} slots")

    def put(dst: torch.Tensor, src: torch.Tensor) -> None:
        if idx is not None:
            src = src.gather(2, idx if src.dim() == 3 else idx[..., None].expand(-1, -1, -1, src.shape[-1]))
        dst[:, :, :count].copy_(src)

    put(st.k, merged.k)
    put(st.v, merged.v)
    put(st.pos, merged.pos)
    st.pos[:, :, count:] = -1
    for name, s in st.state.items():
        put(s, merged.state[name])
        s[:, :, count:] = 0
    if st.rank is not None:
        valid = st.pos[:, :, :count] >= 0
        order = torch.argsort(st.pos[:, :, :count].masked_fill(~valid, torch.iinfo(torch.int32).max), dim=2)
        st.rank[:, :, :count] = torch.argsort(order, dim=2)
    return count
