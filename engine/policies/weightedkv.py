"""WeightedKV (Yuan et al. 2025, arXiv 2503.01330; no public code): drop the key of the token with the
least average attention and merge its value into a neighbour's, weighted by average attention.

Per slot: `acc` = attention accumulated over every row that saw it, `cnt` = how many rows, `w` = the
weight of the merged value (0 = never merged into). Keys, `acc` and `cnt` of a receiver never change.

Our choices:
- the receiver is the valid slot with the next larger original position (`receiver="next"`; "prev" and
  the cosine-nearest key "nearest_key" are switches), falling back to the other side, never a sink.
  "nearest_key" compares keys as the cache stores them (after RoPE at their original positions, or
  before RoPE with positions="cache", where ranks shift as tokens leave).
- a receiver's weight starts at its own average attention when it is first merged into, so every
  merged value is one convex combination of all the values it absorbed (if that weight is still 0
  after merges, it starts again from the current average: still convex).
- when a prompt chunk is compressed, the dropped entries are merged one at a time in ascending average
  attention (ties: lower position first), each into its neighbour among the entries still present:
  the decode rule, repeated (a loop of one small step per dropped token, prefill only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from .base import DecodeView, Policy, PolicyError, PrefillView

RECEIVERS = ("next", "prev", "nearest_key")


@dataclass
class AverageAttentionMerge(Policy):
    """The victim is the slot with the least average attention; its value is merged into kept ones by
    `merge_picks` (WeightedKV's, CaM's or KeepKV's op), at decode and, one dropped entry at a time, when a
    prompt is compressed."""

    sinks: int = 4
    recent: int = 32

    state_names: ClassVar[tuple[str, ...]] = ("cnt",)
    needs_acc: ClassVar[bool] = True
    merges_values: ClassVar[bool] = True
    reads_kv: ClassVar[bool] = True

    @staticmethod
    def average(state: dict[str, torch.Tensor]) -> torch.Tensor:
        """abar = acc / cnt (0 where nothing saw the slot)."""
        return state["acc"] / state["cnt"].clamp(min=1.0)

    def merge(self, view: DecodeView | PrefillView, abar: torch.Tensor, pos: torch.Tensor,
              victim: torch.Tensor) -> None:
        """Merge the value of slot victim[b, g] (-1: none) into kept slots of view.layer.v, in place: every
        head's victim as a pick (merge_picks), its position in `pos` emptied too. `pos`: the entries still
        present (a prompt chunk's merges drop them one at a time)."""
        first_entry = torch.arange(pos.shape[1], device=pos.device) * pos.shape[2]
        self.merge_picks(view, abar, pos, torch.where(victim >= 0, first_entry + victim, -1))

    def merge_picks(self, view: DecodeView | PrefillView, abar: torch.Tensor, pos: torch.Tensor,
                    picks: torch.Tensor) -> None:
        """Merge each pick (B, n) entry (KV head C + slot, -1: none) in order, by one op; a pick sees the
        earlier ones' merges and its position in `pos` is emptied. view.layer's k and v may be a pooled
        store's pool (Policy.pooled_values): the merge ops reach them through their slot_index."""
        raise NotImplementedError

    def after_evict_picks(self, view: DecodeView, picks: torch.Tensor) -> None:
        self.merge_picks(view, self.average(view.layer.state), view.layer.pos, picks)  # the picks in one op

    def prefill_scores(self, view: PrefillView) -> torch.Tensor:
        st, pos = view.layer.state, view.layer.pos
        st["acc"] += view.colsum
        st["cnt"] += view.rows_seen
        abar = self.average(st)
        drops = int((pos[0, 0] >= 0).sum()) - view.budget
        if drops <= 0:
            return abar
        if view.budget < 1:
            raise RuntimeError("internal: weightedkv needs PrefillView.budget from the store")
        alive = pos.clone()
        hi = int(pos.max()) + 1 - self.recent
        victim = torch.empty(pos.shape[:2], dtype=torch.long, device=pos.device)
        for _ in range(drops):
            ops.select_victim(abar, alive, self.sinks, hi, victim)
            self.merge(view, abar, alive, victim)
            alive.scatter_(2, victim[..., None], -1)
        return abar.masked_fill((alive < 0) & (pos >= 0), -math.inf)  # exactly the merged ones go

    def decode_update(self, view: DecodeView) -> None:
        view.layer.state["cnt"] += view.layer.pos >= 0

    def decode_scores(self, view: DecodeView) -> torch.Tensor:
        return self.average(view.layer.state)

    def pooled_values(self) -> bool:
        return True  # every merge reaches k and v through its op's slot_index

    def after_evict(self, view: DecodeView, victim: torch.Tensor, heads: torch.Tensor | None = None) -> None:
        self.merge(view, self.average(view.layer.state), view.layer.pos, victim)

    @staticmethod
    def count(view: DecodeView | PrefillView, merged: torch.Tensor) -> None:
        """Add the heads or picks that merged (merged: (B, n) bool) to the store's merge counter."""
        if view.merges is not None:
            view.merges += merged.sum()


@dataclass
class WeightedKV(AverageAttentionMerge):
    receiver: str = "next"

    name: ClassVar[str] = "weightedkv"
    state_names: ClassVar[tuple[str, ...]] = ("cnt", "w")

    def __post_init__(self) -> None:
        if self.receiver not in RECEIVERS:
            raise PolicyError(f"weightedkv: receiver must be one of {', '.join(RECEIVERS)}, got {self.receiver!r}")
        super().__post_init__()

    def after_evict_picks(self, view: DecodeView, picks: torch.Tensor) -> None:
        if self.receiver == "nearest_key":  # one pick at a time, each through merge
            Policy.after_evict_picks(self, view, picks)
        else:
            super().after_evict_picks(view, picks)

    def merge(self, view: DecodeView | PrefillView, abar: torch.Tensor, pos: torch.Tensor,
              victim: torch.Tensor) -> None:
        """Merge v[victim] into its receiver's value with weight abar[victim]; v and w in place (with a
        neighbour receiver, the victims' positions in `pos` are emptied too)."""
        if self.receiver != "nearest_key":
            super().merge(view, abar, pos, victim)
            return
        layer = view.layer
        v, w = layer.v, layer.state["w"]
        pool = v.dim() == 3  # a pooled store's rows themselves (Policy.pooled_values)
        rcv, similarity = torch.empty_like(victim), torch.empty(victim.shape, device=victim.device)
        ops.nearest_key(layer.k, pos, victim, self.sinks, rcv, similarity, slot_index=layer.index if pool else None)
        r = rcv.clamp(min=0)[..., None]
        w_r = w.gather(2, r)
        first = (rcv[..., None] >= 0) & (w_r == 0)
        w.scatter_(2, r, torch.where(first, abar.gather(2, r), w_r))
        weight = abar.gather(2, victim.clamp(min=0)[..., None])[..., 0].contiguous()
        ops.merge_value(v, w, victim, rcv, weight, slot_index=layer.index if pool else None)
        self.count(view, (victim >= 0) & (rcv >= 0))

    def merge_picks(self, view: DecodeView | PrefillView, abar: torch.Tensor, pos: torch.Tensor,
                    picks: torch.Tensor) -> None:
        """The `next` / `prev` receivers (nearest_key merges through `merge`): ops.merge_neighbour."""
        layer = view.layer
        receivers = torch.empty_like(picks)
        ops.merge_neighbour(layer.v, layer.state["w"], pos, abar.contiguous(), picks, self.sinks,
                            self.receiver == "next", receivers, slot_index=layer.index if layer.v.dim() == 3 else None)
        self.count(view, receivers >= 0)

