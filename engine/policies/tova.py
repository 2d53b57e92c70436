"""TOVA (Oren et al. 2024): evict the token the current query attends to least, averaged over every
query head of the layer; one decision per layer, nothing accumulated.

group_reduce (our choice): each KV head's G query heads are reduced first, then the KV heads are
averaged. `mean` is the paper's rule (the mean over all heads), `sum` ranks the same, `max` averages
each group's strongest attention.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import DecodeView, Policy, PrefillView
from .reduce import mean_over_heads, reduce_group


@dataclass
class TOVA(Policy):
    recent: int = 1  # the newest token is kept

    name: ClassVar[str] = "tova"
    needs_probs: ClassVar[bool] = True
    layer_wide: ClassVar[bool] = True
    prefill_rows: ClassVar[int | None] = 1  # the last prompt row only

    def prefill_scores(self, view: PrefillView) -> torch.Tensor:
        """Per KV head (its group reduced); the store averages the KV heads."""
        return view.colsum

    def decode_scores(self, view: DecodeView) -> torch.Tensor:
        """(B, 1, C): the store picks one victim per layer from it. Under adaptive allocation (B, Hkv, C):
        each KV head's own group, since the heads then keep different tokens."""
        if self.allocation == "adaptive":
            return reduce_group(view.probs, view.layer.pos.shape[1], self.group_reduce)
        if self.group_reduce == "mean":
            return mean_over_heads(view.probs, view.tp)  # = the mean of the group means
        return mean_over_heads(reduce_group(view.probs, view.layer.pos.shape[1], self.group_reduce), view.tp)
