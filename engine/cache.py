"""KVStore: fixed-capacity per-layer KV buffers, per-slot positions and policy state, and attention over them.

Every buffer is allocated once. A decode step writes the incoming token into the free slot, attends
over the valid slots, lets the policy score them and frees the lowest-scoring eligible slot: one slot
overwrite, no data movement, static shapes, and no host value in the step's tensor ops: what changes
from step to step (the token's position, its slot while the cache fills, its RoPE row) is read from a
small device counter (`clock`) that the step itself advances, so a step can be captured in a CUDA graph
and replayed (engine/graphs.py). Each buffer holds all layers ([n_layers * B, ...], a
layer's rows are a view), so once every layer has attended, the policy scores and evicts for all of
them in one set of tensor ops (a layer's eviction only matters from the next step on). A prompt chunk
is attended exactly, then the kept entries of cache + chunk are gathered into the first slots
(compaction). `mask=True` keeps every token in a full-size buffer and only masks the evicted ones: the
papers' protocol, used as a test oracle.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import ops
from .config import ModelArgs
from .model import Rope
from .policies.base import DecodeView, Policy, PrefillView
from .policies.reduce import column_scores, reduce_group

NORM_KIND = {"l1": 1, "l2": 2, "linf": 0}
NO_LIMIT = torch.iinfo(torch.int32).max  # select_victim's upper position bound when the store masks `recent` itself


@dataclass
class LayerState:
    k: torch.Tensor  # (B, Hkv, C, D) cache dtype; post-RoPE keys (positions="original") or pre-RoPE ("cache")
    v: torch.Tensor  # (B, Hkv, C, D)
    pos: torch.Tensor  # (B, Hkv, C) int32 original position, -1 = empty
    state: dict[str, torch.Tensor]  # name -> (B, Hkv, C) fp32
    rank: torch.Tensor | None = None  # (B, Hkv, C) int32 rank among valid slots (positions="cache")
    free: torch.Tensor | None = None  # (B, Hkv) int64 slot freed by the last eviction
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # policy-private non-slot tensors

    def rows(self, lo: int, hi: int) -> "LayerState":
        """Views of batch rows [lo, hi) of every per-slot buffer (one layer of the all-layer state)."""
        view = lambda t: None if t is None else t[lo:hi]
        return LayerState(k=self.k[lo:hi], v=self.v[lo:hi], pos=self.pos[lo:hi],
                          state={n: s[lo:hi] for n, s in self.state.items()}, rank=view(self.rank),
                          free=view(self.free))


@dataclass
class StepPlan:
    """What every layer of one decode step shares (KVStore._begin_step)."""

    cos: torch.Tensor  # (D,) RoPE row of the query's position
    sin: torch.Tensor  # (D,)


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
    ):
        self.args, self.policy, self.budget, self.capacity, self.mask = args, policy, budget, capacity, mask
        self.rope, self.dtype, self.device, self.batch = rope, dtype, device, batch
        self.cache_positions = policy.positions == "cache"
        B, Hkv, C, D, L, H = batch, args.n_kv_heads, capacity, args.head_dim, args.n_layers, args.n_heads
        names = set(policy.state_names) | ({"acc"} if policy.needs_acc else set())
        names |= {"vnorm"} if policy.value_norm else set()
        self.all = LayerState(  # every layer at once: layer l is batch rows [l B, (l + 1) B)
            k=torch.zeros(L * B, Hkv, C, D, dtype=dtype, device=device),
            v=torch.zeros(L * B, Hkv, C, D, dtype=dtype, device=device),
            pos=torch.full((L * B, Hkv, C), -1, dtype=torch.int32, device=device),
            state={n: torch.zeros(L * B, Hkv, C, device=device) for n in sorted(names)},
            rank=torch.zeros(L * B, Hkv, C, dtype=torch.int32, device=device) if self.cache_positions else None,
            free=torch.zeros(L * B, Hkv, dtype=torch.long, device=device),
        )
        self.layers = [self.all.rows(l * B, (l + 1) * B) for l in range(L)]
        self.out = torch.empty(B, H, D, dtype=dtype, device=device)
        # the kernels fuse the group mean into `acc`; another reduction needs the raw row (B, H, C)
        self.fused_acc = policy.needs_acc and policy.group_reduce == "mean"
        raw = policy.needs_probs or (policy.needs_acc and not self.fused_acc)
        self.probs = torch.empty(L * B, H, C, device=device) if raw else None  # this step's rows, every layer
        self.queries = torch.empty(L * B, H, D, dtype=dtype, device=device)  # this step's rotated queries, every layer
        self.slot = torch.zeros(L * B, Hkv, dtype=torch.long, device=device)  # where this step's token lands
        self.step_rows = [StepRows(q=self.queries[l * B : (l + 1) * B], slot=self.slot[l * B : (l + 1) * B],
                                   probs=None if self.probs is None else self.probs[l * B : (l + 1) * B])
                          for l in range(L)]
        self.scale = 1.0 / math.sqrt(D)
        # device copy of (t, used, qpos) for the step's tensor ops; rows of `_advance` are its per-step moves
        self.clock = torch.zeros(3, dtype=torch.long, device=device)
        self._advance = torch.tensor([[1, du, dq] for du in (0, 1) for dq in (0, 1)], device=device)
        self.static_length = False  # attend over every slot (masked), not the used ones: a graph's fixed shape
        self.t = 0  # tokens seen (the next token's original position)
        self.used = 0  # slots ever written (high-water mark); slots >= used are empty
        self.occupancy = 0  # valid tokens per (layer, KV head): the same everywhere
        self.evictions = 0
        self._pending = 0  # slots in use after the chunk being prefilled
        self.prefilling = False  # set by generate.prefill around a prompt chunk's forward
        self._step: StepPlan | None = None  # set by the first layer of each decode step

    # ---- host-side bookkeeping ----------------------------------------------------------------
    def reset(self) -> None:
        for st in self.layers:
            st.pos.fill_(-1)
            for s in st.state.values():
                s.zero_()
            st.extra.clear()
        self.t = self.used = self.occupancy = self.evictions = 0
        self.clock.zero_()

    def fill(self, positions: torch.Tensor, t: int, state: dict[str, torch.Tensor] | None = None) -> None:
        """Stand as after `t` tokens with the entries of `positions` (n,), ascending, kept in slots [0, n) of every layer,
        batch row and KV head: keys and values drawn from N(0, 1), each policy state from `state` (a name ->
        (n,) tensor) or U(0, 1). For benchmarks that time decode at a given occupancy without a prefill."""
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
        per_token = self.args.kv_bytes_per_token(self.dtype) * self.batch
        return CacheStats(
            occupancy=self.occupancy, capacity=self.capacity, budget=self.budget,
            kv_bytes=per_token * self.capacity, full_kv_bytes=per_token * self.t, tokens_seen=self.t,
            evictions=self.evictions, merges=self.evictions if self.policy.merges_values else 0,
        )

    @property
    def decoding(self) -> bool:
        """Whether the tokens now fed are a decode step (else a prompt chunk, even of one token)."""
        return not self.prefilling

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, H, T, D), k/v (B, Hkv, T, D) before RoPE, continuing the stored sequence -> (B, H, T, D).
        A prompt chunk goes through prefill, a generated token through `decode`."""
        if self.prefilling:
            return self._prefill(layer, q, k, v)
        B = q.shape[0]
        return self.decode(layer, torch.cat([x.reshape(B, -1) for x in (q, k, v)], dim=1))[:, :, None]

    @property
    def qpos(self) -> int:
        """The RoPE position of the next token's query (its rank with positions="cache")."""
        return self.occupancy if self.cache_positions else self.t

    @property
    def evicts_now(self) -> bool:
        """Whether the coming decode step ends with an eviction."""
        return self.policy.evicts_on_decode and self.occupancy + 1 > self.budget

    def commit(self, n: int) -> None:
        """Once every layer has processed n tokens (a prompt chunk or one decode step)."""
        if not self.prefilling:
            self.finish_decode()
        self.advance(n)

    def finish_decode(self) -> None:
        """The device side of a decode step's end: the policy's update and eviction for every layer, and
        the clock moved on. Host values only pick which ops run (fixed while the cache is in one phase)."""
        if not self.policy.layerwise_decode:
            rope = self.rope if self.cache_positions else None
            self._policy_step(DecodeView(layer=self.all, step_pos=self.t, q=self.queries, probs=self.probs,
                                         rope=rope))
        grows_used = self.used < self.capacity
        moves_qpos = not (self.cache_positions and self.evicts_now)
        self.clock.add_(self._advance[2 * grows_used + moves_qpos])

    def advance(self, n: int) -> None:
        """The host side: counters after n tokens (one decode step, or a prompt chunk)."""
        if not self.prefilling:  # the step moved the clock itself
            evicted = self.evicts_now
            self.occupancy += 0 if evicted else 1
            self.evictions += int(evicted)
            self.used = min(self.used + 1, self.capacity)
            self.t += n
            return
        self.used = self._pending
        kept = min(self.occupancy + n, self.budget)
        self.evictions += self.occupancy + n - kept
        self.occupancy = kept
        self.t += n
        self.sync_clock()

    def sync_clock(self) -> None:
        """The device clock from the host counters: after a prompt chunk, or counters set directly."""
        self.clock.copy_(torch.tensor([self.t, self.used, self.qpos]))

    def prepare_decode(self) -> tuple[bool, bool]:
        """Host work before a decode step, kept out of it: the RoPE tables cover the step's query.
        Returns the cache's phase (filling, evicting): the host choices that shape the step's ops."""
        self.rope.ensure(max(self.qpos, self.capacity) + 1)
        return self.used < self.capacity, self.evicts_now

    # ---- decode --------------------------------------------------------------------------------
    def _begin_step(self) -> StepPlan:
        """Once per decode step, for every layer at once: the slot the token lands in, its position (and
        rank) there, and the RoPE rows of its query."""
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
        self.prepare_decode()
        cos, sin = self.rope.at(clock[2:])
        return StepPlan(cos=cos, sin=sin)

    def decode(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        """One decode step of one layer: qkv (B, (H + 2 Hkv) D), the token's fused projection before RoPE
        -> its attention output (B, H, D). The model passes its fused buffer as is: no per-head views."""
        if layer == 0:
            self._step = self._begin_step()
        step, st, rows, B = self._step, self.layers[layer], self.step_rows[layer], qkv.shape[0]
        qr = rows.q
        # at original positions the new key sits at t == the query's position: rotated like the query
        ops.rope_append(qkv, step.cos, step.sin, rows.slot, not self.cache_positions, qr, st.k, st.v)
        if self.policy.value_norm:
            Hkv, D = st.k.shape[1], st.k.shape[3]
            v = qkv[:, qkv.shape[1] - Hkv * D :].reshape(B, Hkv, 1, D).contiguous()
            nv = torch.empty(B, Hkv, 1, device=qkv.device)
            ops.value_norm(v, NORM_KIND[self.policy.value_norm], nv)
            st.state["vnorm"].scatter_(2, rows.slot[..., None], nv)
        rope = self.rope if self.cache_positions else None
        length = self.capacity if self.static_length else min(self.used + 1, self.capacity)
        probs = rows.probs
        ops.decode_attention(
            qr, st.k, st.v, st.pos, length, self.scale, self.out,
            st.state["acc"] if self.fused_acc else None, probs,
            rope=(rope.cos, rope.sin, st.rank) if rope else None,
        )
        if self.policy.needs_acc and not self.fused_acc:  # masked slots have probability 0
            st.state["acc"] += reduce_group(probs, st.k.shape[1], self.policy.group_reduce)
        if self.policy.layerwise_decode:
            self._policy_step(DecodeView(layer=st, step_pos=self.t, q=qr, probs=probs, rope=rope))
        return self.out

    def _policy_step(self, view: DecodeView) -> None:
        """Fold the step's attention into the policy state, then evict if the cache is over budget."""
        self.policy.decode_update(view)
        if self.evicts_now:
            self._evict(view)

    def _evict(self, view: DecodeView) -> None:
        st, p = view.layer, self.policy
        score = p.decode_scores(view)
        pos = st.pos[:, :1] if p.per_layer else st.pos
        if p.recent:  # the newest `recent` tokens stay: pos >= t + 1 - recent, t read from the clock
            pos = pos.masked_fill(pos > self.clock[0] - p.recent, -1)
        victim = torch.empty_like(st.free)
        if p.per_layer:
            one = torch.empty_like(victim[:, :1])
            ops.select_victim(score.contiguous(), pos.contiguous(), p.sinks, NO_LIMIT, one)
            victim.copy_(one.expand_as(victim))
        else:
            ops.select_victim(score.contiguous(), pos, p.sinks, NO_LIMIT, victim)
        p.after_evict(view, victim)
        idx = victim[..., None]
        if self.cache_positions:
            gone = st.pos.gather(2, idx)
            st.rank.sub_(((st.pos > gone) & (st.pos >= 0)).int())
        st.pos.scatter_(2, idx, -1)
        for s in st.state.values():
            s.scatter_(2, idx, 0.0)
        st.free.copy_(victim)

    # ---- prefill -------------------------------------------------------------------------------
    def _prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        st, p, t = self.layers[layer], self.policy, self.t
        B, H, T, D = q.shape
        n_old = self.used
        old = slice(0, n_old)
        # every entry of cache + chunk, cache first
        pos_new = torch.arange(t, t + T, dtype=torch.int32, device=q.device).expand(B, k.shape[1], T)
        pos = torch.cat([st.pos[:, :, old], pos_new], dim=2)
        qpos = torch.arange(t, t + T, dtype=torch.int32, device=q.device).expand(B, T).contiguous()
        if self.cache_positions:
            rank_old = st.rank[:, :, old]
            rank_new = torch.arange(self.occupancy, self.occupancy + T, device=q.device).expand(B, k.shape[1], T)
            rank = torch.cat([rank_old, rank_new], dim=2)
            self.rope.ensure(self.occupancy + T)
            keys_raw = torch.cat([st.k[:, :, old], k.to(self.dtype)], dim=2)
            keys = self.rope.rotate(keys_raw, rank)
            qr = self.rope.rotate(q, rank_new[:, :1].expand(B, H, T))
        else:
            self.rope.ensure(t + T)
            k = self.rope.rotate(k, pos_new)
            keys_raw = keys = torch.cat([st.k[:, :, old], k.to(self.dtype)], dim=2)
            qr = self.rope.rotate(q, pos_new[:, :1].expand(B, H, T))
            rank = None
        vals = torch.cat([st.v[:, :, old], v.to(self.dtype)], dim=2)
        n = keys.shape[2]
        needs_scores = self.occupancy + T > self.budget and n > 0
        colsum = None
        rows = T if p.prefill_rows is None else min(p.prefill_rows, T)
        fused = False  # the kernel's column sums are group means; other reductions are computed here
        if p.prefill_rows != 0 and (needs_scores or p.needs_acc or p.observes_prefill):
            fused = p.group_reduce == "mean"
            colsum = (torch.empty(B, k.shape[1], n, device=q.device) if fused
                      else column_scores(qr, keys, qpos, pos, rows, self.scale, p.group_reduce))
        out = None
        if n_old == 0:
            # A plain causal prompt: SDPA gives the output fastest, and the same bits whatever the policy
            # (the fused kernel then runs only for the column sums a scoring policy asked for).
            out = F.scaled_dot_product_attention(qr, keys, vals, is_causal=True, enable_gqa=H != k.shape[1])
        if out is None or fused:
            kernel_out = torch.empty(B, H, T, D, dtype=q.dtype, device=q.device)
            lse = torch.empty(B, H, T, device=q.device)
            ops.prefill_attention(
                qr.contiguous(), keys.contiguous(), vals.contiguous(), qpos, pos.contiguous(), self.scale,
                kernel_out, lse, colsum if fused else None, rows, self.scale,
            )
            out = kernel_out if out is None else out
        state = {name: torch.cat([s[:, :, old], torch.zeros(B, k.shape[1], T, device=q.device)], dim=2)
                 for name, s in st.state.items()}
        if "vnorm" in state:
            nv = torch.empty(B, k.shape[1], T, device=q.device)
            ops.value_norm(v.to(self.dtype).contiguous(), NORM_KIND[p.value_norm], nv)
            state["vnorm"][:, :, n_old:] = nv
        rows_seen = (T - torch.searchsorted(qpos[0].contiguous(), pos.clamp(min=0).reshape(-1), right=False)
                     ).reshape(pos.shape).float() * (pos >= 0)
        merged = LayerState(k=keys_raw, v=vals, pos=pos, state=state, rank=rank, extra=st.extra)
        view = PrefillView(layer=merged, q=qr, k=keys, colsum=colsum, n_rows=rows, rows_seen=rows_seen, budget=self.budget)
        if needs_scores:
            score = p.prefill_scores(view)
            keep = self._keep(score, pos, t + T)
        else:
            if colsum is not None or p.observes_prefill:
                p.prefill_scores(view)  # accumulate state even when nothing is evicted yet
            keep = None
        self._store(st, merged, keep, n)
        return out

    def _keep(self, score: torch.Tensor, pos: torch.Tensor, end: int) -> torch.Tensor:
        """(B, Hkv, budget) entries to keep: protected first, then the highest scores, ties to later positions."""
        p = self.policy
        protected = (pos >= 0) & ((pos < p.sinks) | (pos >= end - p.recent))
        key = score.float()
        if p.per_layer:  # one decision for the layer: every KV head ranks by the mean over heads
            key = key.mean(1, keepdim=True).expand_as(pos)
        key = key.masked_fill(pos < 0, -math.inf).masked_fill(protected, math.inf)
        by_pos = torch.argsort(pos, dim=2, descending=True, stable=True)
        order = torch.argsort(key.gather(2, by_pos), dim=2, descending=True, stable=True)
        return by_pos.gather(2, order)[:, :, : self.budget]

    def _store(self, st: LayerState, merged: LayerState, keep: torch.Tensor | None, n: int) -> None:
        """Write the kept entries back into the static buffers (compaction) or mask the rest."""
        if keep is None:
            idx = None
            count = n
        elif self.mask:
            drop = torch.ones_like(merged.pos, dtype=torch.bool).scatter_(2, keep, False)
            merged.pos = merged.pos.masked_fill(drop, -1)
            for name in merged.state:
                merged.state[name] = merged.state[name].masked_fill(drop, 0.0)
            idx, count = None, n
        else:
            keep = keep.sort(dim=2).values  # keep slot order stable (position order after the first prefill)
            idx, count = keep, keep.shape[2]
        if count > self.capacity:
            raise RuntimeError(f"internal: {count} entries do not fit {self.capacity} slots")

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
        if self.cache_positions:
            valid = st.pos[:, :, :count] >= 0
            order = torch.argsort(st.pos[:, :, :count].masked_fill(~valid, torch.iinfo(torch.int32).max), dim=2)
            st.rank[:, :, :count] = torch.argsort(order, dim=2)
        self._pending = count
