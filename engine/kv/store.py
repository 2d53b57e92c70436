"""KVStore: fixed-capacity per-layer KV buffers, per-slot positions and policy state, decode attention
over them and the decode step's eviction. A prompt chunk's attention and compaction are engine/kv/prefill.py.

Every buffer is allocated once. A decode step writes the incoming token into the free slot, attends
over the valid slots, lets the policy score them and frees the lowest-scoring eligible slot: one slot
overwrite, no data movement, static shapes, and no host value in the step's tensor ops: what changes
from step to step (the token's position, its slot while the cache fills, its RoPE row) is read from a
small device counter (`clock`) that the step itself advances, so a step can be captured in a CUDA graph
and replayed (engine/decode/graphs.py). Each buffer holds all layers ([n_layers * B, ...], a
layer's rows are a view), so once every layer has attended, the policy scores and evicts for all of
them in one set of tensor ops (a layer's eviction only matters from the next step on). A prompt chunk
is attended exactly, then the kept entries of cache + chunk are gathered into the first slots
(compaction). `mask=True` keeps every token in a full-size buffer and only masks the evicted ones: the
papers' protocol, used as a test oracle.

The step protocol, in the order callers (generate.prefill, engine/decode/) use it:

    prompt chunk of T tokens:  begin_prefill(T); prefill(layer, q, k, v) for every layer; end_prefill(T)
    decode step:               begin_decode();   decode(layer, qkv) for every layer;      end_decode()

end_decode is finish_decode (device: the policy's update and eviction, the clock moved on) then
advance_decode (host counters). A CUDA graph records begin_decode .. finish_decode once and its replayer
calls advance_decode after each replay. Each call names its phase, so the caller, not a flag in the
store, says whether tokens are a prompt or a decode step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .. import ops
from ..config import ModelArgs
from ..policies.base import Policy
from ..policies.reduce import reduce_group
from ..policies.views import DecodeView, LayerState
from ..rope import Rope
from .prefill import NORM_KIND, prefill_layer

if TYPE_CHECKING:
    from ..dist import TensorParallel

NO_LIMIT = torch.iinfo(torch.int32).max  # select_victim's upper position bound when the store masks `recent` itself
KV_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # names of kv_dtype


def parse_kv_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A K/V cache dtype by name (None: the model's dtype), or ValueError naming the allowed names."""
    if name is None or name in KV_DTYPES.values():
        return name
    dtype = KV_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ValueError(f"unknown kv_dtype {name!r}; use one of {', '.join(KV_DTYPES)} (or None: the model's dtype)")
    return dtype


@dataclass
class StepRows:
    """One layer's rows of the decode-step buffers (views sliced once, at allocation)."""

    q: torch.Tensor  # (B, H, D) the rotated query
    slot: torch.Tensor  # (B, Hkv) int64 the slot the incoming token lands in
    probs: torch.Tensor | None  # (B, H, C) the softmax row, when the policy needs it


@dataclass
class CacheStats:
    occupancy: int  # valid tokens per (layer, KV head)
    capacity: int  # slots allocated per (layer, KV head)
    budget: int
    kv_bytes: int  # bytes of the K and V buffers
    full_kv_bytes: int  # bytes a full cache would need for the tokens seen so far
    tokens_seen: int
    evictions: int  # per (layer, KV head)
    merges: int


class KVStore:
    def __init__(
        self,
        args: ModelArgs,
        policy: Policy,
        budget: int,
        capacity: int,
        batch: int,
        dtype: torch.dtype,
        device: torch.device,
        rope: Rope,
        mask: bool = False,
        kv_dtype: torch.dtype | None = None,
        tp: TensorParallel | None = None,
    ):
        """`dtype` is the model's: what prefill and decode take in and give back. K and V are held in
        `kv_dtype` (default: the same). Attention reads them with queries in `query_dtype`: the model's
        where the two agree (today's kernels, bit for bit), else fp32, so a 16-bit cache costs the
        queries nothing and a cache wider than the model is read at its precision. `tp`: the tensor-parallel
        group holding the other heads (engine.dist; args are then this rank's shard), for layer-wide policies."""
        self.tp = tp
        self.args, self.policy, self.budget, self.capacity, self.mask = args, policy, budget, capacity, mask
        self.rope, self.dtype, self.device, self.batch = rope, dtype, device, batch
        self.kv_dtype = kv_dtype or dtype
        self.query_dtype = dtype if self.kv_dtype == dtype else torch.float32
        self.cache_positions = policy.positions == "cache"
        B, Hkv, C, D, L, H = batch, args.n_kv_heads, capacity, args.head_dim, args.n_layers, args.n_heads
        names = set(policy.state_names) | ({"acc"} if policy.needs_acc else set())
        names |= {"vnorm"} if policy.value_norm else set()
        k, v = self._kv_buffers(L * B, Hkv, C, D)
        self.all = LayerState(  # every layer at once: layer l is batch rows [l B, (l + 1) B)
            k=k, v=v,
            pos=torch.full((L * B, Hkv, C), -1, dtype=torch.int32, device=device),
            state={n: torch.zeros(L * B, Hkv, C, device=device) for n in sorted(names)},
            rank=torch.zeros(L * B, Hkv, C, dtype=torch.int32, device=device) if self.cache_positions else None,
            free=torch.zeros(L * B, Hkv, dtype=torch.long, device=device),
        )
        self.layers = [self.all.rows(l * B, (l + 1) * B) for l in range(L)]
        self.out = torch.empty(B, H, D, dtype=dtype, device=device)  # wo's input: the model's dtype
        # what decode attention writes (in the query dtype), copied into `out` where the two differ
        self.attn_out = self.out if self.query_dtype == dtype else torch.empty_like(self.out, dtype=self.query_dtype)
        # the kernels fuse the group mean into `acc`; another reduction needs the raw row (B, H, C)
        self.fused_acc = policy.needs_acc and policy.group_reduce == "mean"
        raw = policy.needs_probs or (policy.needs_acc and not self.fused_acc)
        self.probs = torch.empty(L * B, H, C, device=device) if raw else None  # this step's rows, every layer
        # this step's rotated queries, every layer
        self.queries = torch.empty(L * B, H, D, dtype=self.query_dtype, device=device)
        self.slot = torch.zeros(L * B, Hkv, dtype=torch.long, device=device)  # where this step's token lands
        self.step_rows = [StepRows(q=self.queries[l * B : (l + 1) * B], slot=self.slot[l * B : (l + 1) * B],
                                   probs=None if self.probs is None else self.probs[l * B : (l + 1) * B])
                          for l in range(L)]
        self.scale = 1.0 / math.sqrt(D)
        # device copy of (t, used, qpos) for the step's tensor ops; rows of `_advance` are its per-step moves
        self.clock = torch.zeros(3, dtype=torch.long, device=device)
        # merges a merging policy made, over every (layer row, KV head): a victim it found no kept slot for
        # (or, in KeepKV, none similar enough) is evicted without a merge; counted on the device
        self.merge_count = torch.zeros(1, dtype=torch.long, device=device)
        self._advance = torch.tensor([[1, du, dq] for du in (0, 1) for dq in (0, 1)], device=device)
        self.static_length = False  # attend over every slot (masked), not the used ones: a graph's fixed shape
        self.t = 0  # tokens seen (the next token's original position)
        self.used = 0  # slots ever written (high-water mark); slots >= used are empty
        self.occupancy = 0  # valid tokens per (layer, KV head): the same everywhere
        self.evictions = 0
        self._pending = 0  # slots in use after the chunk being prefilled
        # the RoPE row of this decode step's query, looked up on the device by begin_decode
        self.query_cos = self.query_sin = torch.empty(0, device=device)

    def _kv_buffers(self, rows: int, Hkv: int, C: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The K and V buffers, a [C, D] block of slots per (row, KV head)."""
        return (torch.zeros(rows, Hkv, C, D, dtype=self.kv_dtype, device=self.device),
                torch.zeros(rows, Hkv, C, D, dtype=self.kv_dtype, device=self.device))

    # ---- host-side bookkeeping ----------------------------------------------------------------
    def reset(self) -> None:
        for st in self.layers:
            st.pos.fill_(-1)
            for s in st.state.values():
                s.zero_()
            st.extra.clear()
        self.t = self.used = self.occupancy = self.evictions = 0
        self.clock.zero_()
        self.merge_count.zero_()

    def fill(self, positions: torch.Tensor, t: int, state: dict[str, torch.Tensor] | None = None) -> None:
        """Stand as after `t` tokens with the entries of `positions` (n,), ascending, kept in slots [0, n) of
        every layer, batch row and KV head: keys and values drawn from N(0, 1), each policy state from `state`
        (a name -> (n,) tensor) or U(0, 1). For benchmarks that time decode at a given occupancy, no prefill."""
        n, a = positions.shape[0], self.all
        self.reset()
        a.k[:, :, :n].normal_()
        a.v[:, :, :n].normal_()
        a.pos[:, :, :n] = positions.to(device=self.device, dtype=torch.int32)
        for name, s in a.state.items():
            given = (state or {}).get(name)
            s[:, :, :n] = torch.rand_like(s[:, :, :n]) if given is None else given.to(s.device, s.dtype)
        if a.rank is not None:
            a.rank[:, :, :n] = torch.arange(n, device=self.device, dtype=torch.int32)
        self.t, self.used, self.occupancy = t, n, n
        self.sync_clock()

    def stats(self) -> CacheStats:
        per_token = self.args.kv_bytes_per_token(self.kv_dtype) * self.batch
        return CacheStats(
            occupancy=self.occupancy, capacity=self.capacity, budget=self.budget,
            kv_bytes=per_token * self.capacity, full_kv_bytes=per_token * self.t, tokens_seen=self.t,
            evictions=self.evictions, merges=self.merges(),
        )

    def merges(self) -> int:
        """Merges per (layer, KV head), as `evictions` counts evictions (reads the device counter)."""
        per = self.args.n_layers * self.args.n_kv_heads * self.batch
        return round(int(self.merge_count) / per) if self.policy.merges_values else 0

    @property
    def qpos(self) -> int:
        """The RoPE position of the next token's query (its rank with positions="cache")."""
        return self.occupancy if self.cache_positions else self.t

    @property
    def evicts_now(self) -> bool:
        """Whether the coming decode step ends with an eviction."""
        return self.policy.evicts_on_decode and self.occupancy + 1 > self.budget

    @property
    def batchable(self) -> bool:
        """Whether decode(layer, qkv) is exactly ops.rope_append then ops.decode_attention on this store's
        step rows and layer buffers, with nothing between or after (no value norms, no layer-by-layer policy
        step, no second accumulation, no logit bias, no dtype copy): a batched step may then run the two for
        several stores in one ops.decode_layers call (engine/decode/batch.py)."""
        p = self.policy
        return not (p.value_norm or p.decode_layer_by_layer or (p.needs_acc and not self.fused_acc)
                    or p.logit_bias is not None or self.attn_out is not self.out)

    def pin_shapes(self) -> None:
        """From now on every buffer keeps its shape and address: a CUDA graph is about to record a step on
        them (engine/decode/graphs.py). This store never re-allocates; AllocatedKVStore stops fitting its lists'
        width to their high-water mark."""

    def decode_length(self) -> int:
        """Slots a decode step's attention reads: every one in a graph (a fixed shape), else those written."""
        return self.capacity if self.static_length else min(self.used + 1, self.capacity)

    def sync_clock(self) -> None:
        """The device clock from the host counters: after a prompt chunk, or counters set directly."""
        self.clock.copy_(torch.tensor([self.t, self.used, self.qpos]))

    # ---- prefill: a prompt chunk ---------------------------------------------------------------
    def begin_prefill(self, n: int) -> None:
        """Host work before a prompt chunk of n tokens: the RoPE tables cover its queries."""
        self.rope.ensure(self.qpos + n)

    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, H, T, D), k/v (B, Hkv, T, D) before RoPE, continuing the stored sequence -> (B, H, T, D);
        the kept entries of cache + chunk are compacted into the first slots (engine/kv/prefill.py)."""
        out, self._pending = prefill_layer(self, self.layers[layer], q, k, v)
        return out

    def end_prefill(self, n: int) -> None:
        """Once every layer has taken the chunk: the host counters, and the device clock from them."""
        self.used = self._pending
        kept = min(self.occupancy + n, self.budget)
        self.evictions += self.occupancy + n - kept
        self.occupancy = kept
        self.t += n
        self.sync_clock()

    # ---- decode: one token per sequence --------------------------------------------------------
    def prepare_decode(self) -> tuple[bool, bool]:
        """Host work before a decode step, kept out of it: the RoPE tables cover the step's query.
        Returns the cache's phase (filling, evicting): the host choices that shape the step's ops."""
        self.rope.ensure(max(self.qpos, self.capacity) + 1)
        return self.used < self.capacity, self.evicts_now

    def begin_decode(self) -> None:
        """Once per decode step, for every layer at once: the slot the token lands in, its position (and
        rank) there, and the RoPE row of its query. Device ops only, once prepare_decode has run."""
        self.prepare_decode()  # a no-op inside a CUDA graph: the replayer ran it before capturing
        a, clock, slot = self.all, self.clock, self.slot
        if self.used < self.capacity:
            slot.copy_(clock[1].expand_as(slot))
        elif self.mask:
            raise RuntimeError("mask mode ran out of slots")  # capacity is the whole sequence
        else:
            slot.copy_(a.free)  # a copy: a layer-by-layer policy overwrites `free` while the step runs
        a.pos.scatter_(2, slot[..., None], clock[0].int().expand_as(slot)[..., None])
        if self.cache_positions:
            a.rank.scatter_(2, slot[..., None], clock[2].int().expand_as(slot)[..., None])
        self.query_cos, self.query_sin = self.rope.at(clock[2:])

    def decode(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        """One decode step of one layer: qkv (B, (H + 2 Hkv) D), the token's fused projection before RoPE
        -> its attention output (B, H, D). The model passes its fused buffer as is: no per-head views."""
        st, rows, B = self.layers[layer], self.step_rows[layer], qkv.shape[0]
        qr = rows.q
        qkv = qkv.to(self.query_dtype)  # a no-op unless a 16-bit model reads a cache of another dtype
        self._append_token(layer, qkv)
        if self.policy.value_norm:
            Hkv, D = st.pos.shape[1], self.args.head_dim
            # the value as stored (rounded to the cache dtype), as a prompt chunk's norms are taken
            v = qkv[:, qkv.shape[1] - Hkv * D :].reshape(B, Hkv, 1, D).to(self.kv_dtype).contiguous()
            nv = torch.empty(B, Hkv, 1, device=qkv.device)
            ops.value_norm(v, NORM_KIND[self.policy.value_norm], nv)
            st.state["vnorm"].scatter_(2, rows.slot[..., None], nv)
        rope = self.rope if self.cache_positions else None
        probs = rows.probs
        self._attend(layer, qr, self.decode_length(), probs, rope)
        if self.policy.needs_acc and not self.fused_acc:  # masked slots have probability 0
            st.state["acc"] += reduce_group(probs, st.pos.shape[1], self.policy.group_reduce)
        if self.policy.decode_layer_by_layer:
            self._policy_step(DecodeView(layer=st, step_pos=self.t, q=qr, probs=probs, rope=rope, tp=self.tp,
                                         merges=self.merge_count))
        if self.attn_out is not self.out:
            self.out.copy_(self.attn_out)
        return self.out

    def _append_token(self, layer: int, qkv: torch.Tensor) -> None:
        """The step's query rotated into its row of `queries`, its key and value into its slots."""
        st, rows = self.layers[layer], self.step_rows[layer]
        # at original positions the new key sits at t == the query's position: rotated like the query
        ops.rope_append(qkv, self.query_cos, self.query_sin, rows.slot, not self.cache_positions, rows.q, st.k, st.v)

    def _attend(self, layer: int, q: torch.Tensor, length: int, probs: torch.Tensor | None,
                rope: Rope | None) -> None:
        """Decode attention of one layer over its slots into attn_out (and acc, probs)."""
        st = self.layers[layer]
        ops.decode_attention(
            q, st.k, st.v, st.pos, length, self.scale, self.attn_out,
            st.state["acc"] if self.fused_acc else None, probs,
            rope=(rope.cos, rope.sin, st.rank) if rope else None, bias=self.bias(st),
        )

    def bias(self, st: LayerState) -> torch.Tensor | None:
        """The per-slot logit bias attention adds over st's slots (the policy's `logit_bias` state), or None."""
        name = self.policy.logit_bias
        return None if name is None else st.state[name]

    def end_decode(self) -> None:
        """Once every layer has decoded: the device side, then the host counters."""
        self.finish_decode()
        self.advance_decode()

    def finish_decode(self) -> None:
        """The device side of a decode step's end: the policy's update and eviction for every layer, and
        the clock moved on. Host values only pick which ops run (fixed while the cache is in one phase)."""
        if not self.policy.decode_layer_by_layer:
            rope = self.rope if self.cache_positions else None
            self._policy_step(DecodeView(layer=self.all, step_pos=self.t, q=self.queries, probs=self.probs,
                                         rope=rope, tp=self.tp, merges=self.merge_count))
        grows_used = self.used < self.capacity
        moves_qpos = not (self.cache_positions and self.evicts_now)
        self.clock.add_(self._advance[2 * grows_used + moves_qpos])

    def advance_decode(self) -> None:
        """The host side of a decode step's end: the counters (the step moved the device clock itself)."""
        evicted = self.evicts_now
        self.occupancy += 0 if evicted else 1
        self.evictions += int(evicted)
        self.used = min(self.used + 1, self.capacity)
        self.t += 1

    def _policy_step(self, view: DecodeView) -> None:
        """Fold the step's attention into the policy state, then evict if the cache is over budget."""
        self.policy.decode_update(view)
        if self.evicts_now:
            self._evict(view)

    def _evict(self, view: DecodeView) -> None:
        st, p = view.layer, self.policy
        score = p.decode_scores(view)
        pos = st.pos[:, :1] if p.layer_wide else st.pos
        if p.recent:  # the newest `recent` tokens stay: pos >= t + 1 - recent, t read from the clock
            pos = pos.masked_fill(pos > self.clock[0] - p.recent, -1)
        victim = torch.empty_like(st.free)
        if p.layer_wide:
            one = torch.empty_like(victim[:, :1])
            ops.select_victim(score.contiguous(), pos.contiguous(), p.sinks, NO_LIMIT, one)
            victim.copy_(one.expand_as(victim))
        else:
            ops.select_victim(score.contiguous(), pos, p.sinks, NO_LIMIT, victim)
        idx = victim[..., None]
        gone = st.pos.gather(2, idx) if self.cache_positions else None  # before after_evict may empty it
        p.after_evict(view, victim)
        if gone is not None:
            st.rank.sub_(((st.pos > gone) & (st.pos >= 0)).int())
        st.pos.scatter_(2, idx, -1)
        for s in st.state.values():
            s.scatter_(2, idx, 0.0)
        st.free.copy_(victim)

