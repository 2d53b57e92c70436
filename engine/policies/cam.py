"""CaM (Zhang et al. 2024, "CaM: Cache Merging for Memory-efficient LLMs Inference", ICML): instead of
dropping an evicted token's value, add it to the values of the tokens that follow it, in proportion to how
much attention it drew compared with them.

WeightedKV's policy with another merge, so the two merges compare on equal terms: the victim is the slot
with the least average attention `acc / cnt` (sinks and the recent window protected), a prompt chunk's
drops are merged one at a time in that order, and only values change (keys, acc, cnt stay).

The merge, for victim e and the m valid slots r_1..r_m of the same KV head with the next larger original
positions (fewer near the end), each receiver's value gets

    v_r += p * v_e / m,    p = min(1, abar_e / mean_i abar_{r_i})

Our choices: CaM samples the merge from Bernoulli(p) (its code compares with the attention of the local
window); we add its expectation p, deterministic, and compare with the receivers' mean average attention.
m = `merge_window` (CaM's code: 32, the size of its local window).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import DecodeView, PolicyError, PrefillView
from .slots import HeadSlots
from .weightedkv import AverageAttentionMerge


@dataclass
class CaM(AverageAttentionMerge):
    merge_window: int = 32

    name: ClassVar[str] = "cam"

    def check_params(self) -> None:
        if self.merge_window < 1:
            raise PolicyError(f"cam: merge_window must be >= 1, got {self.merge_window}")

    def merge(self, view: DecodeView | PrefillView, abar: torch.Tensor, pos: torch.Tensor, victim: torch.Tensor,
              heads: torch.Tensor | None = None) -> None:
        at = HeadSlots(view.layer, heads)
        pos, victim, abar = at.narrow(pos), at.narrow(victim), at.narrow(abar)  # (B, n, C), (B, n), (B, n, C)
        m = min(self.merge_window, pos.shape[2])
        e = victim.clamp(min=0)[..., None]  # (B, n, 1)
        pe = pos.gather(2, e)
        big = torch.iinfo(pos.dtype).max
        after = torch.where((pos > pe) & (pos >= self.sinks), pos, big)
        nearest = after.topk(m, dim=2, largest=False)  # the next m positions, sorted
        r, ok = nearest.indices, (nearest.values < big) & (victim[..., None] >= 0)  # (B, n, m)
        n = ok.sum(2, keepdim=True).clamp(min=1)
        mean_r = (abar.gather(2, r) * ok).sum(2, keepdim=True) / n
        p = (abar.gather(2, e) / mean_r).nan_to_num(0.0, posinf=1.0).clamp(0.0, 1.0)  # (B, n, 1)
        v = view.layer.v
        ve = at.read(v, e).float()  # (B, n, 1, D)
        add = (p * ok / self.merge_window)[..., None] * ve  # (B, n, m, D)
        at.write(v, r, at.read(v, r).float() + add, ok)
        self.count(view, ok.any(2))
