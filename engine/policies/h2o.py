"""H2O (Zhang et al. 2023): evict the token with the least attention accumulated over every query so far."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import DecodeView, Policy, PrefillView


@dataclass
class H2O(Policy):
    recent: int = -1  # -1: budget // 2, H2O's equal heavy-hitter / recent split

    name: ClassVar[str] = "h2o"
    needs_acc: ClassVar[bool] = True

    def prefill_scores(self, view: PrefillView) -> torch.Tensor:
        acc = view.layer.state["acc"]
        acc += view.colsum
        return acc

    def decode_scores(self, view: DecodeView) -> torch.Tensor:
        return view.layer.state["acc"]
