"""KeepKV (Tian et al. 2025, arXiv 2504.09936, "KeepKV: Eliminating Output Perturbation in KV Cache
Compression"; v2: "Achieving Periodic Lossless KV Cache Compression"; no code used): merge an evicted entry into the kept entry with the most similar key so that, for the
reference query, attention's output is exactly what it was before the merge.

Electoral votes: each slot carries a vote count p (1 for a plain token), kept as log p in the per-slot
state `logp` (0 for a fresh token; the store moves it with the other per-slot state and passes it to the
attention kernels as their logit `bias`), so attention weighs slot i by p_i exp(s_i), s_i = scale q.k_i.

ZIP-merging of victim e into receiver c, with weights w = p exp(s) at the reference query q:

    p_r = p_e + p_c
    v_r = (w_e v_e + w_c v_c) / (w_e + w_c)
    k_r = kbar + a q,  kbar = (w_e k_e + w_c k_c) / (w_e + w_c),  a such that p_r exp(scale q.k_r) = w_e + w_c

so the merged slot draws exactly the attention mass and value the two drew: single-step lossless for q.

WeightedKV's policy with this merge (engine/policies/weightedkv.py), so the merges compare on equal terms:
the victim is the slot with the least average attention `acc / cnt` (sinks and the recent window
protected), a prompt chunk's drops are merged one at a time in that order, and acc and cnt of a receiver
stay (its average then grows with the votes it gathered).

Our choices, where the paper is open or differs:
- the receiver is the valid non-sink slot of the same KV head whose key, as attention sees it (rotated),
  has the largest cosine similarity with the victim's; the merge happens only when that similarity is at
  least `min_similarity` (default 0.0: keys that do not point away from each other), else the victim is
  just evicted (the paper merges above a similarity threshold it does not pin down for us).
- the reference query is the mean of the KV head's G query heads (rotated, as attention used them) of the
  step that just ran: a decode step's query, or a prompt chunk's last row. The merge is lossless for that
  query exactly; for each single query head only approximately (one key cannot match G logits). The
  paper's EMA prediction of future attention for multi-step use is not implemented.
- k_r is corrected along q (not scaled): the smallest change of the weighted mean key that matches the logit.
- with positions="cache" the merged key is formed at the receiver's current rank and stored rotated back
  (keys are kept before RoPE there); the rotated keys it is formed from are rounded to the cache's dtype
  first (one more rounding than the unrotated merge with a bf16/fp16 cache).

The receiver search and the merge are one op, ops.merge_zip, for a step's victims or a pick's, in order
(engine/reference.py defines it exactly).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..rope import Rope
from .base import DecodeView, PolicyError, PrefillView
from .weightedkv import AverageAttentionMerge


@dataclass
class KeepKV(AverageAttentionMerge):
    min_similarity: float = 0.0

    name: ClassVar[str] = "keepkv"
    state_names: ClassVar[tuple[str, ...]] = ("cnt", "logp")
    merges_keys: ClassVar[bool] = True
    logit_bias: ClassVar[str | None] = "logp"

    def check_params(self) -> None:
        if not -1.0 <= self.min_similarity <= 1.0:
            raise PolicyError(f"keepkv: min_similarity must be in [-1, 1], got {self.min_similarity}")

    def merge_picks(self, view: DecodeView | PrefillView, abar: torch.Tensor, pos: torch.Tensor,
                    picks: torch.Tensor) -> None:
        """ops.merge_zip (the module docstring's formulas; `abar` is not needed: the weights come from the
        query). With positions="cache" the keys are merged as attention sees them, rotated at their ranks (a
        copy), and each receiver's key is rotated back at its rank."""
        layer, rope = view.layer, view.rope
        keys = layer.k  # as stored: after RoPE (original positions), in the pool or per head
        if rope is not None:  # a copy in the cache's dtype (the op takes k and v of one dtype)
            rank = layer.rank.clamp(min=0).long()
            keys = Rope.rotate_by(keys, rope.cos[rank], rope.sin[rank])
        receiver = torch.empty_like(picks)
        ops.merge_zip(keys, layer.v, layer.state["logp"], pos, reference_query(view), picks, self.sinks,
                      self.min_similarity, 1.0 / math.sqrt(view.q.shape[-1]), receiver,
                      slot_index=layer.index if keys.dim() == 3 else None)
        if rope is not None:  # back to the stored (pre-RoPE) key: the inverse rotation at the receiver's rank
            # (positions="cache" is uniform allocation only: pick g is head g's victim, one per head)
            b = torch.arange(picks.shape[0], device=picks.device)[:, None].expand_as(picks)
            head = torch.arange(picks.shape[1], device=picks.device).expand_as(picks)
            slot = receiver.clamp(min=0)
            r = rank[b, head, slot]
            merged = Rope.rotate_by(keys[b, head, slot], rope.cos[r], -rope.sin[r])
            layer.k[b, head, slot] = torch.where((receiver >= 0)[..., None], merged.to(layer.k.dtype),
                                                 layer.k[b, head, slot])
        self.count(view, receiver >= 0)


def reference_query(view: DecodeView | PrefillView) -> torch.Tensor:
    """(B, Hkv, D) fp32: the mean over each KV head's query heads of the query attention just used (a
    prompt chunk's last row)."""
    q = view.q if view.q.dim() == 3 else view.q[:, :, -1]
    B, H, D = q.shape
    Hkv = view.layer.pos.shape[1]
    return q.float().view(B, Hkv, H // Hkv, D).mean(2)
