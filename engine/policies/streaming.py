"""StreamingLLM (Xiao et al. 2023): keep the attention sinks and a window of the newest tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import DecodeView, Policy, PrefillView


@dataclass
class Streaming(Policy):
    sinks: int = 4
    positions: str = "cache"

    name: ClassVar[str] = "streaming"
    prefill_rows: ClassVar[int | None] = 0  # scores come from positions alone: no column sums

    def prefill_scores(self, view: PrefillView) -> torch.Tensor:
        return view.layer.pos.float()  # the oldest non-sink token goes first

    def decode_scores(self, view: DecodeView) -> torch.Tensor:
        return view.layer.pos.float()
