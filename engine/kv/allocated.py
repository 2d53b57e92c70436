"""AllocatedKVStore: the KV store under adaptive or pyramid allocation (engine/kv/allocation.py), where
KV heads and layers keep different numbers of tokens, in memory that holds exactly the budget.

The pool. Layer l owns P_l = Hkv (b_l + spare) rows of one K and one V buffer [B, sum_l P_l + 1, D]
(`spare`: the incoming tokens' rows, as the uniform store's spare slot; the last row is a scratch row
that empty slots point at). Each KV head has a list of C slots (`index`, [L B, Hkv, C] int32: the pool
row of each slot); its per-slot metadata (pos, policy state) keeps the uniform store's [L B, Hkv, C]
layout, so every scoring policy runs unchanged. C is the most a head can hold: Hkv b_l - (Hkv - 1)
floor + spare under adaptive allocation (every other head keeps its floor), b_l + spare under pyramid.
The K/V bytes are those of the uniform store at the same total budget; the lists cost 4 bytes a slot.
A policy that evicts only in prompts (SnapKV) grows by every decoded token in every layer: under pyramid
allocation a layer then owns at least the uniform store's Hkv x capacity rows (a layer whose share is
below the budget needs them all after a prompt shorter than the budget), so its pool holds Hkv x the sum
of max(0, b_l - budget) rows more than the uniform store.

A decode step: each head's token goes into its first empty slot and a free pool row (`free`, [L B, Hkv]:
the rows the last step's evictions freed, or unused rows while a layer fills, handed out in runs of FRESH_RUN
consecutive rows per head: `fresh_rows`); decode attention
reads each head's slots through `index` (ops.decode_attention's slot_index); the eviction runs on the
device for every layer, applied where the layer is over its budget (no host value decides it), and its
freed rows become the next step's `free`. Static shapes throughout: a step can be captured in a CUDA graph.
Since each new token takes whatever row the evictions freed, a head's rows can drift apart over the pool, and
attention then reads them scattered; every RELAYOUT_EVERY steps, between two steps, the store looks at its
layout and re-lays a scattered pool (`relayout`: each head's entries back in consecutive rows).
Outside a graph, the search for the first empty slot and attention stop at `used`, the lists' high-water
mark, kept on the host as the uniform store keeps its own: a prompt leaves its heads' entries in their first
slots, and a head's token takes its first empty slot, at most `used`, so `used` grows by at most 1 a step.

The lists' width. Under adaptive allocation C is the most one head could hold (SmolLM2 at 512 tokens a head:
1275 slots), while the fullest head after a long prompt holds ~770, and every per-slot op of a step (the
policy's scoring, adaptive_victims, the first-empty-slot search, the merges' receiver search) scans the
whole width. Outside a CUDA graph the store therefore allocates its lists (and the probability rows) only as
wide as the high-water mark needs, plus WIDTH_SLACK slots (`fit_width`): wider before a prompt chunk or a
step that could pass it, narrower when a look at the layout finds the mark fell by more than the slack. Slots
from `used` on are empty, so a width of at least `used` loses nothing. A graph records fixed shapes and
addresses: `pin_shapes` (called before a capture) fixes the width at C for good.

`mask=True` keeps the uniform store's dense layout with a slot for every token and only masks evicted
ones (the papers' protocol): the same selection over the same metadata, the test oracle of the pool.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch

from .. import ops
from ..config import ModelArgs
from ..policies.base import Policy, PolicyError
from ..policies.views import DecodeView, LayerState
from ..rope import Rope
from . import allocation
from .prefill import compact, keep_indices, score_chunk
from .store import NO_LIMIT, CacheStats, KVStore

if TYPE_CHECKING:
    from ..dist import TensorParallel


RELAYOUT_EVERY = 64  # decode steps between two looks at the pool's layout (AllocatedKVStore.relayout)
RELAYOUT_SCATTERED = 0.1  # the share of neighbouring entries in rows apart (AllocatedKVStore.scattered) that re-lays
WIDTH_SLACK = RELAYOUT_EVERY  # slots the lists keep past the high-water mark: a width lasts from one look to the next
FRESH_RUN = RELAYOUT_EVERY  # consecutive unused rows a head of a filling layer takes one by one (fresh_rows)


def fresh_rows(f: torch.Tensor, room: torch.Tensor, heads: int, run: int) -> torch.Tensor:
    """Where the f-th unused row handed out since a layout goes among the `room` rows above the laid-out
    ones. While a layer fills, its heads take unused rows in turn (head g the f = g, g + heads, g + 2 heads,
    ... th); handed out in that order, each head's rows would lie `heads` rows apart, which decode attention
    reads ~1.5x slower than consecutive rows (SmolLM2, 800 rows a head: as slow as rows in random order).
    So blocks of heads x run rows are laid out head by head: head g's f-th rows form runs of `run`
    consecutive rows. A block cut short by the end of the room has shorter runs; the room % heads rows
    after the last full set map to themselves. A bijection of [0, room) (room: a tensor that broadcasts)."""
    block = heads * run
    start = f // block * block
    within = f - start
    length = ((room - start) // heads).clamp(max=run)  # this block's run length
    return torch.where(within < heads * length, start + within % heads * length + within // heads, f)


class AllocatedKVStore(KVStore):
    def __init__(self, args: ModelArgs, policy: Policy, budget: int, capacity: int, batch: int, dtype: torch.dtype,
                 device: torch.device, rope: Rope, mask: bool = False, kv_dtype: torch.dtype | None = None,
                 tp: TensorParallel | None = None):
        """As KVStore; `budget` is the mean tokens per (layer, KV head), `capacity` the uniform store's
        slots per (layer, KV head) (the whole sequence with `mask`)."""
        L, Hkv = args.n_layers, args.n_kv_heads
        self.adaptive = policy.allocation == "adaptive"
        protected = policy.sinks + policy.recent
        self.layer_budgets = (allocation.pyramid_budgets(budget, protected, L, policy.pyramid_beta)
                              if policy.allocation == "pyramid" else [budget] * L)
        self.floor = min(allocation.min_share(policy, budget), budget) if self.adaptive else 0
        spare = max(1, capacity - budget)
        # the most a head of layer l holds with its layer's share: its budget and the incoming tokens; under a
        # policy that evicts only in prompts (SnapKV), its prompt's share and every token decoded since, which
        # after a prompt shorter than the budget (capacity: that prompt and the new tokens) can be all of
        # capacity in a layer whose share is below the budget
        grows = not policy.evicts_on_decode
        head_rows = [max(b + spare, capacity) if grows else b + spare for b in self.layer_budgets]
        self.pool_rows = [Hkv * n for n in head_rows]  # P_l
        if mask:
            slots = capacity
        elif self.adaptive:
            slots = min(Hkv * budget - (Hkv - 1) * self.floor + spare, Hkv * (budget + spare))
        else:
            slots = max(head_rows)
        # the slots a head of layer l can hold: each head fills its first empty slot, so it uses no other
        self.layer_slots = [slots if self.adaptive or mask else n for n in head_rows]
        self.pooled = not mask
        if policy.merges_values and not policy.pooled_values():
            raise RuntimeError(f"internal: {policy.name} merges but not in the pool (Policy.pooled_values)")
        self.scratch = sum(self.pool_rows)  # the pool row every empty slot points at
        super().__init__(args, policy, budget, slots, batch, dtype, device, rope, mask, kv_dtype, tp)
        B, a = batch, self.all
        layer_of_row = torch.arange(L, device=device).repeat_interleave(B)
        a.quota = torch.tensor(self.layer_budgets, device=device)[layer_of_row].view(L * B, 1, 1)
        self.limit = Hkv * a.quota.view(L * B)  # the valid entries a layer row holds at most after a step
        self.victims = torch.empty(L * B, Hkv, dtype=torch.long, device=device)  # adaptive_victims' picks
        self.row0 = torch.tensor([0, *self.pool_rows], device=device).cumsum(0)[layer_of_row][:, None]
        if self.pooled:
            a.index = torch.full((L * B, Hkv, slots), self.scratch, dtype=torch.int32, device=device)
            self.pool_heads = (self.pool_k[:, None], self.pool_v[:, None])  # as rope_append's one-head cache
        self.freed = torch.full((L * B, Hkv), -1, dtype=torch.long, device=device)  # rows this step freed
        self.held = torch.zeros(L * B, 1, dtype=torch.long, device=device)  # valid entries (= rows used) per layer row
        self.head_offsets = torch.arange(Hkv, device=device)
        self.pool_size = torch.tensor(self.pool_rows, device=device)[layer_of_row][:, None]  # (L B, 1): P_l
        self.laid_out = torch.zeros_like(self.held)  # the entries the last layout left in rows row0 + [0, laid_out)
        # a policy that never evicts in a decode step (SnapKV) leaves each head's entries in its first slots, so
        # its next token's slot is its count: kept here, instead of searched for every step
        self.appends = self.pooled and grows
        self.next_slot = torch.zeros(L * B, Hkv, dtype=torch.long, device=device)
        self.layers = [a.rows(l * B, (l + 1) * B) for l in range(L)]
        self._next_rows()
        self.relayout_every = RELAYOUT_EVERY if self.pooled else 0  # steps between look_at_layout()s, 0: never
        self.steps_since_relayout = 0
        self.width = slots  # the lists' current width (fit_width); C = self.capacity is the most it can be
        self.narrows = self.pooled and self.adaptive  # pyramid's fullest layer fills all of C anyway
        self.fit_width(0, shrink=True)

    def _kv_buffers(self, rows: int, Hkv: int, C: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.pooled:
            return super()._kv_buffers(rows, Hkv, C, D)
        shape = (self.batch, self.scratch + 1, D)
        self.pool_k = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        self.pool_v = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        return None, None

    # ---- bookkeeping ---------------------------------------------------------------------------
    def counts(self) -> torch.Tensor:
        """(L B, Hkv) valid tokens per (layer row, KV head)."""
        return (self.all.pos >= 0).sum(2)

    def _next_rows(self, stepped: bool = False) -> None:
        """`free` for the next step: the rows evictions freed (heads 0..r-1 take the r freed), else unused rows
        of the layer: the rows in use or just freed are the laid-out ones and the first `held` + r - laid_out
        handed out since (a layer that evicts once evicts every step after, and every row it frees is taken
        again), so head g >= r takes the (held - laid_out + g)-th unused one, placed by fresh_rows.
        `stepped`: after a decode step, whose rows `held` moves by (Hkv came, those freed went) instead of
        counting every slot again; otherwise (after a layout: a prompt, a relayout, a reset) they are counted
        and the rows above them start afresh."""
        if not self.pooled:
            return
        reused = self.freed >= 0
        if stepped:
            self.held += self.freed.shape[1] - reused.sum(1, keepdim=True)
        else:
            counts = self.counts()
            self.held.copy_(counts.sum(1, keepdim=True))
            self.laid_out.copy_(self.held)
            self.next_slot.copy_(counts)
        f = self.held - self.laid_out + self.head_offsets
        unused = self.row0 + self.laid_out + fresh_rows(f, self.pool_size - self.laid_out, len(self.head_offsets),
                                                         FRESH_RUN)
        torch.where(reused, self.freed, unused, out=self.all.free)
        self.freed.fill_(-1)

    def reset(self) -> None:
        super().reset()
        if self.pooled:
            self.all.index.fill_(self.scratch)
            self._next_rows()
            self.steps_since_relayout = 0
        self.fit_width(0, shrink=True)

    def pin_shapes(self) -> None:
        self.fit_width(self.capacity)
        self.narrows = False

    def fit_width(self, need: int, shrink: bool = False) -> None:
        """Make the lists at least `need` slots wide (the high-water mark a prompt chunk or step may reach), with
        WIDTH_SLACK to spare; with `shrink`, also narrower where that frees more than the slack. A host-side
        re-allocation, between steps: never in a CUDA graph (pin_shapes)."""
        if not self.narrows:
            return
        want = min(self.capacity, need + WIDTH_SLACK)
        if need > self.width or (shrink and self.width > min(self.capacity, want + WIDTH_SLACK)):
            self._set_width(want)

    def _set_width(self, width: int) -> None:
        """Re-allocate pos, the per-slot state, the slot index and the probability rows `width` slots wide,
        slots [0, min(width, old width)) kept (the rest of a wider list empty); the per-layer views follow,
        each with its policy-private `extra`."""
        if width < self.used:
            raise RuntimeError(f"internal: lists of {width} slots under the high-water mark {self.used}")
        a, keep = self.all, min(width, self.width)

        def resized(t: torch.Tensor, empty: float) -> torch.Tensor:
            out = t.new_full((*t.shape[:2], width), empty)
            out[:, :, :keep] = t[:, :, :keep]
            return out

        with torch.inference_mode(False):  # buffers as at allocation: a relayout outside a step writes them
            self.all = dataclasses.replace(a, pos=resized(a.pos, -1), index=resized(a.index, self.scratch),
                                           state={n: resized(s, 0.0) for n, s in a.state.items()})
            if self.probs is not None:
                self.probs = self.probs.new_empty((*self.probs.shape[:2], width))
        B = self.batch
        self.layers = [dataclasses.replace(self.all.rows(l * B, (l + 1) * B), extra=old.extra)
                       for l, old in enumerate(self.layers)]
        for l, rows in enumerate(self.step_rows):
            rows.probs = None if self.probs is None else self.probs[l * B : (l + 1) * B]
        self.width = width

    def fill(self, positions: torch.Tensor, t: int, state: dict[str, torch.Tensor] | None = None) -> None:
        raise NotImplementedError("fill: a store with adaptive or pyramid allocation is filled by prefill")

    def stats(self) -> CacheStats:
        """Occupancy: the mean valid tokens per (layer, KV head); capacity: pool rows per (layer, KV head)."""
        per_token = self.args.kv_bytes_per_token(self.kv_dtype) * self.batch
        L, Hkv = self.args.n_layers, self.args.n_kv_heads
        slots = sum(self.pool_rows) if self.pooled else L * Hkv * self.capacity
        occupancy = round(int(self.counts().sum()) / (L * Hkv * self.batch))
        return CacheStats(occupancy=occupancy, capacity=slots // (L * Hkv), budget=self.budget,
                          kv_bytes=per_token * slots // (L * Hkv), full_kv_bytes=per_token * self.t,
                          tokens_seen=self.t, evictions=self.t - occupancy, merges=self.merges())

    @property
    def qpos(self) -> int:
        return self.t  # positions="original" only

    @property
    def evicts_now(self) -> bool:
        """Whether some layer may be over its budget after the coming step (the device decides which)."""
        return self.policy.evicts_on_decode and self.t + 1 > min(self.layer_budgets)

    # ---- prefill -------------------------------------------------------------------------------
    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        st, T, B = self.layers[layer], q.shape[2], q.shape[0]
        b_l, Hkv = self.layer_budgets[layer], st.pos.shape[1]
        total = int((st.pos >= 0).sum()) // B
        view = self._gathered(st) if self.pooled else st
        out, e, score = score_chunk(self, view, q, k, v, b_l, total + Hkv * T > Hkv * b_l)
        keep = None
        if score is not None:
            pos = e.layer.pos
            if self.adaptive:
                end, p = self.t + T, self.policy
                protected = (pos >= 0) & ((pos < p.sinks) | (pos >= end - p.recent))
                keep = allocation.adaptive_keep(score, pos, protected, Hkv * b_l, self.floor)
            else:
                keep = allocation.uniform_keep(keep_indices(self.policy, score, pos, self.t + T, b_l, self.tp), pos.shape[2])
        if not self.pooled:
            if keep is not None:  # mask what goes, keep every entry
                e.layer.pos = e.layer.pos.masked_fill(~keep, -1)
                e.layer.state = {n: s.masked_fill(~keep, 0.0) for n, s in e.layer.state.items()}
            self._pending = compact(st, e.layer, None, True, self.capacity)
        else:
            B = st.pos.shape[0]
            self._compact_pool(st, e.layer, (e.layer.pos >= 0) if keep is None else keep,
                               self.row0[layer * B : (layer + 1) * B])
        return out

    def _compact_pool(self, st: LayerState, merged: LayerState, keep: torch.Tensor, row0: torch.Tensor,
                      pooled_rows: bool = False) -> None:
        """Each head's kept entries of `merged`, in position order, into its first slots of st and into
        consecutive pool rows from its layer's first, row0 (rows, 1) (head after head); the rest of the lists
        emptied. st: one layer's rows or every layer's. The entries' K/V: merged.k and merged.v per head, or
        with pooled_rows the pool rows merged.index names, and then in the order of those rows instead of
        positions: a row already where it goes is not copied (most of them, since a head mostly gets back the
        rows it frees)."""
        C = st.pos.shape[2]  # the lists' width (fit_width made room for the chunk)
        n = keep.sum(2)  # (rows, Hkv)
        most = int(n.max())
        if most > C:
            raise RuntimeError(f"internal: a head keeps {most} entries in {C} slots")
        self._pending = max(self._pending, most)  # the chunk's high-water mark: the largest head, all layers
        big = torch.iinfo(torch.int32).max
        key = merged.index if pooled_rows else merged.pos
        order = key.masked_fill(~keep, big).argsort(dim=2, stable=True)[:, :, :C]
        width = order.shape[2]
        slot = torch.arange(width, device=self.device)
        used = slot < n[..., None]  # (rows, Hkv, width)
        first_row = row0 + n.cumsum(1) - n  # (rows, Hkv)
        rows = (first_row[..., None] + slot).masked_fill(~used, self.scratch)
        st.pos.fill_(-1)
        st.pos[:, :, :width] = merged.pos.gather(2, order).masked_fill(~used, -1)
        for name, s in st.state.items():
            s.zero_()
            s[:, :, :width] = merged.state[name].gather(2, order).masked_fill(~used, 0.0)
        st.index.fill_(self.scratch)
        st.index[:, :, :width] = rows.int()
        # the rows as flat indices into (B R, D) views: index_select / index_copy_ over one dim take a fraction
        # of the time of multi-dim advanced indexing
        R, D = self.pool_k.shape[1:]
        b, g, _ = used.nonzero(as_tuple=True)  # the kept entries, in the order a boolean mask lists them
        entry = (b * used.shape[1] + g) * merged.pos.shape[2] + order[used]  # into merged's (rows Hkv slots)
        dst = (b % self.batch) * R + rows[used]
        pool_k, pool_v = self.pool_k.view(-1, D), self.pool_v.view(-1, D)
        if pooled_rows:  # the rows that move, every one read (a copy) before any is written
            src = (b % self.batch) * R + merged.index.reshape(-1)[entry]
            moved = src != dst
            src, dst = src[moved], dst[moved]
            k, v = pool_k.index_select(0, src), pool_v.index_select(0, src)
        else:
            k, v = (t.reshape(-1, D).index_select(0, entry) for t in (merged.k, merged.v))
        pool_k.index_copy_(0, dst, k)
        pool_v.index_copy_(0, dst, v)

    def begin_prefill(self, n: int) -> None:
        super().begin_prefill(n)
        self.fit_width(self.used + n)  # a head keeps at most what it held and the chunk
        self._pending = 0  # each layer's prefill raises it to its kept entries' high-water mark

    def end_prefill(self, n: int) -> None:
        self.steps_since_relayout = 0  # the prompt left every layer laid out
        self.used = self._pending
        self.fit_width(self.used + 1, shrink=True)
        self.t += n
        self.occupancy = min(self.t, self.budget)
        self._next_rows()
        self.sync_clock()

    # ---- decode --------------------------------------------------------------------------------
    def prepare_decode(self) -> tuple[bool, bool]:
        self.rope.ensure(max(self.qpos, self.capacity) + 1)
        return (not self.pooled and self.used < self.capacity), self.evicts_now

    @property
    def batchable(self) -> bool:
        return not self.pooled and super().batchable  # a pool's kernels take its slot index

    def begin_decode(self) -> None:
        if not self.pooled:  # the dense layout of mask mode: the next slot, as the uniform store does
            super().begin_decode()
            return
        self.prepare_decode()
        self.fit_width(self.used + 1)  # the step's token takes a slot below `used`, or `used` itself
        a, slot = self.all, self.slot
        if self.appends:
            slot.copy_(self.next_slot)
            self.next_slot += 1
        else:  # each head's first empty slot (-1: the least position, first one wins); slots from `used` on are empty
            slot.copy_(a.pos[:, :, : self.decode_length()].argmin(2))
        a.pos.scatter_(2, slot[..., None], self.clock[0].int().expand_as(slot)[..., None])
        a.index.scatter_(2, slot[..., None], a.free.int()[..., None])
        self.query_cos, self.query_sin = self.rope.at(self.clock[2:])

    def _append_token(self, layer: int, qkv: torch.Tensor) -> None:
        if not self.pooled:
            super()._append_token(layer, qkv)
            return
        ops.rope_append(qkv, self.query_cos, self.query_sin, self.layers[layer].free, True, self.step_rows[layer].q,
                        *self.pool_heads)  # each head's token into its free row

    def _attend(self, layer: int, q: torch.Tensor, length: int, probs: torch.Tensor | None, rope: Rope | None
                ) -> None:
        if not self.pooled:
            super()._attend(layer, q, length, probs, rope)
            return
        st = self.layers[layer]
        ops.decode_attention(q, self.pool_k, self.pool_v, st.pos, min(length, self.layer_slots[layer]), self.scale,
                             self.attn_out, st.state["acc"] if self.fused_acc else None, probs, slot_index=st.index,
                             bias=self.bias(st))

    def finish_decode(self) -> None:
        super().finish_decode()
        self._next_rows(stepped=True)

    def advance_decode(self) -> None:
        self.t += 1
        self.occupancy = min(self.t, self.budget)
        self.used = min(self.used + 1, self.capacity)  # a head's token took a slot below `used`, or `used` itself
        self.steps_since_relayout += 1
        if self.relayout_every and self.steps_since_relayout >= self.relayout_every:  # 0 without a pool
            self.look_at_layout()

    def look_at_layout(self) -> None:
        """Every `relayout_every` steps: relayout() if the pool is `scattered` past RELAYOUT_SCATTERED; then the
        lists' width fitted to the high-water mark (`used` grows by one a step on the host; here it is counted)."""
        self.steps_since_relayout = 0
        if self.scattered() > RELAYOUT_SCATTERED:
            self.relayout()
        elif self.narrows:
            written = (self.all.pos >= 0).flatten(0, 1).any(0).nonzero()
            self.used = int(written[-1]) + 1 if len(written) else 0
            self.sync_clock()
        self.fit_width(self.used + 1, shrink=True)

    def scattered(self) -> float:
        """Of the pairs of neighbouring slots of a head that both hold an entry, the share whose pool rows are not
        neighbours. After 256 steps at ctx 1024 (SmolLM2, 256 tokens a head): WeightedKV adaptive 0.74 (0.30 64
        steps after a relayout), H2O adaptive 0.15 (0.02), either under pyramid 0.01: a head mostly gets back
        the rows it frees, except where adaptive allocation moves them between heads."""
        if not self.pooled:
            return 0.0
        a, n = self.all, self.decode_length()
        pos, index = a.pos[:, :, :n], a.index[:, :, :n]
        pairs = (pos[..., 1:] >= 0) & (pos[..., :-1] >= 0)
        apart = pairs & (index[..., 1:] != index[..., :-1] + 1)
        return float(apart.sum()) / max(int(pairs.sum()), 1)

    def relayout(self) -> None:
        """Every layer's entries back into their heads' first slots and consecutive pool rows (head after head,
        each head's in the order of the rows they had, as a prompt leaves them). Decode steps put each new
        token into whatever row the last eviction freed, so a head's rows drift apart: attention then reads them
        scattered over the layer's pool, where the hardware prefetcher loses the stream. With a cold cache that
        cost 1.31-1.41x the uniform store's attention (SmolLM2, 256 tokens a head, after 300 steps), the same
        rows re-laid 1.02-1.13x. Run between steps (advance_decode, every `relayout_every` steps where the layout
        is `scattered` past RELAYOUT_SCATTERED; so also outside a CUDA graph); it copies only the rows not
        already in place and moves no entry from one head to another: the kept tokens and their state are the
        same, only their slots and rows change."""
        if not self.pooled:
            return
        self._pending = 0
        a = self.all
        entries = dataclasses.replace(a, pos=a.pos.clone(), state={n: s.clone() for n, s in a.state.items()},
                                      index=a.index.clone())  # copies: the compaction rewrites them
        self._compact_pool(a, entries, a.pos >= 0, self.row0, pooled_rows=True)
        self.used = self._pending
        self._next_rows()
        self.steps_since_relayout = 0

    # ---- eviction ------------------------------------------------------------------------------
    def _policy_layer(self, st: LayerState) -> LayerState:
        """What a policy sees of pooled rows: the slots' K and V gathered per head where it reads them, or
        the pool itself for one that reaches them through the slots' index (Policy.pooled_values: no copies;
        every merging policy, whose merges write the pool)."""
        if not (self.pooled and self.policy.reads_kv):
            return st
        if self.policy.pooled_values():
            return dataclasses.replace(st, k=self.pool_k, v=self.pool_v)
        return self._gathered(st)

    def _gathered(self, st: LayerState) -> LayerState:
        """st with k and v (rows, Hkv, C, D): copies of its slots' pool rows (rows stack layers, B each)."""
        where = self._pool_index(st, st.index.long())
        return dataclasses.replace(st, k=self.pool_k[where], v=self.pool_v[where])

    def _pool_index(self, st: LayerState, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Advanced index into the [B, R, D] pool of pool rows `rows` (n, Hkv, C), n rows of st."""
        batch_row = torch.arange(st.pos.shape[0], device=self.device) % self.batch
        return batch_row[:, None, None], rows

    def _evict(self, view: DecodeView) -> None:
        st, p = view.layer, self.policy
        view = DecodeView(layer=self._policy_layer(st), step_pos=view.step_pos, q=view.q, probs=view.probs,
                          rope=view.rope, tp=view.tp, merges=view.merges)
        score = p.decode_scores(view)
        pos, Hkv = st.pos, st.pos.shape[1]
        rows = self._rows_of(st)
        freed = self.freed[rows]
        if self.adaptive:  # one token leaves per token that came (Hkv), each from any head
            entry = self.victims[rows]
            ops.adaptive_victims(score.float().contiguous(), pos, p.sinks, self.clock[:1] - p.recent, self.floor,
                                 self.limit[rows], entry)
            if p.merges_values:  # each pick's merge sees the slots the earlier ones left
                p.after_evict_picks(view, entry)  # the picks first, then -1s
            # the freed rows in the order of the heads that gave them (head g's token takes the g-th): a head
            # mostly gets its own row back, so its rows stay where they were, not scattered over the layer's pool
            self._remove(st, entry, freed)
            return
        # the layer's valid entries: those after the last step (a pool counts them in `held`) and this step's Hkv
        held = self.held[rows, 0] + Hkv if self.pooled else (pos >= 0).sum((1, 2))
        over = held > Hkv * st.quota[:, 0, 0]
        victim = torch.empty_like(st.free)
        masked = pos.masked_fill(pos > self.clock[0] - p.recent, -1) if p.recent else pos  # the recent ones stay
        if p.layer_wide:
            one = torch.empty_like(victim[:, :1])
            ops.select_victim(score.contiguous(), masked[:, :1].contiguous(), p.sinks, NO_LIMIT, one)
            victim.copy_(one.expand_as(victim))
        else:
            ops.select_victim(score.contiguous(), masked, p.sinks, NO_LIMIT, victim)
        taken = (victim >= 0) & over[:, None]  # slot victim of every head, in each layer over its budget
        if p.merges_values:  # before the slots empty: a merge reads its victim (a pool's rows it writes itself)
            self.policy.after_evict(view, torch.where(taken, victim, -1))
        self._remove(st, torch.where(taken, self.head_offsets[:Hkv] * pos.shape[2] + victim, -1), freed)

    def _remove(self, st: LayerState, entries: torch.Tensor, freed: torch.Tensor) -> None:
        """Evict the (head, slot) entries (head C + slot, -1: none) of each row at once (no policy
        post-processing); `freed` (B, n) = the pool rows they held, by head, then -1s (all -1 without a pool)."""
        ops.remove_entries(st.pos, list(st.state.values()), st.index if self.pooled else None, entries,
                           self.scratch, freed)

    def _rows_of(self, st: LayerState) -> slice:
        """Which rows of the all-layer state st holds (all of them, or one layer's)."""
        size = st.pos.shape[0]
        first = (st.pos.data_ptr() - self.all.pos.data_ptr()) // (st.pos.stride(0) * st.pos.element_size())
        return slice(first, first + size)


def make_store(args: ModelArgs, policy: Policy, budget: int, capacity: int, batch: int, dtype: torch.dtype,
               device: torch.device, rope: Rope, mask: bool = False, kv_dtype: torch.dtype | None = None,
               tp: TensorParallel | None = None) -> KVStore:
    """The store for `policy`: today's KVStore under uniform allocation, else AllocatedKVStore. Adaptive
    allocation ranks the scores of every head of a layer against each other, which under tensor parallelism
    would need the other ranks' heads in every step: refused there (uniform and pyramid shares are per head)."""
    if tp is not None and policy.allocation == "adaptive":
        raise PolicyError(f"{policy.name}: allocation 'adaptive' compares all KV heads of a layer and is not "
                          "supported under tensor parallelism; use 'uniform' or 'pyramid'")
    cls = KVStore if policy.allocation == "uniform" or policy.name == "full" else AllocatedKVStore
    return cls(args, policy, budget, capacity, batch, dtype, device, rope, mask=mask, kv_dtype=kv_dtype, tp=tp)
