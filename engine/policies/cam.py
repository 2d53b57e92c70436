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
m = `merge_window` (CaM's code: 32, the size of its local window). The victim's value is spread by one op,
ops.merge_spread, for a step's victims or a pick's, in order (engine/reference.py defines it exactly).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from .base import DecodeView, PolicyError, PrefillView
from .weightedkv import AverageAttentionMerge


@dataclass
class CaM(AverageAttentionMerge):
    merge_window: int = 32

    name: ClassVar[str] = "cam"

    def check_params(self) -> None:
        if self.merge_window < 1:
            raise PolicyError(f"cam: merge_window must be >= 1, got {self.merge_window}")

    def merge_picks(self, view: DecodeView | PrefillView, abar: torch.Tensor, pos: torch.Tensor,
                    picks: torch.Tensor) -> None:
        """ops.merge_spread."""
        layer = view.layer
        receivers = torch.empty_like(picks)
        ops.merge_spread(layer.v, pos, abar.contiguous(), picks, self.sinks, self.merge_window, receivers,
                         slot_index=layer.index if layer.v.dim() == 3 else None)
        self.count(view, receivers > 0)
