"""SnapKV (Li et al. 2024): at prefill, keep the prompt tokens the last `w` rows attend to (pooled along
the sequence so neighbours of a hit survive with it) plus the window itself; decode only appends."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import Policy, PolicyError, PrefillView

POOLS = ("max", "avg")


def pool_by_position(x: torch.Tensor, pos: torch.Tensor, include: torch.Tensor, kernel: int, mode: str) -> torch.Tensor:
    """1-D pooling (stride 1, same padding) of x (B, Hkv, N) along the included entries taken in original
    position order, whatever their slot order; excluded entries neither contribute nor get a value
    (0 for avg, -inf for max). Avg pads with zeros and divides by `kernel` (torch's default)."""
    B, Hkv, N = x.shape
    order = pos.masked_fill(~include, torch.iinfo(pos.dtype).max).argsort(dim=2, stable=True)
    fill = -math.inf if mode == "max" else 0.0
    xs = x.float().gather(2, order).masked_fill(~include.gather(2, order), fill).reshape(B * Hkv, 1, N)
    pool = F.max_pool1d if mode == "max" else F.avg_pool1d
    pooled = pool(xs, kernel, 1, kernel // 2).reshape(B, Hkv, N)
    return torch.empty_like(pooled).scatter_(2, order, pooled).masked_fill(~include, fill)


@dataclass
class SnapKV(Policy):
    w: int = 32  # observation window: the last w prompt rows, also kept themselves
    k: int = 7  # pooling kernel (odd)
    pool: str = "max"

    name: ClassVar[str] = "snapkv"
    evicts_on_decode: ClassVar[bool] = False

    def check_params(self) -> None:
        if self.w < 1:
            raise PolicyError(f"snapkv: window w must be >= 1, got {self.w}")
        if self.k < 1 or self.k % 2 == 0:
            raise PolicyError(f"snapkv: pooling kernel k must be odd and >= 1, got {self.k}")
        if self.pool not in POOLS:
            raise PolicyError(f"snapkv: pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.recent not in (0, self.w):
            raise PolicyError(f"snapkv: recent is the observation window w; set w instead (got recent={self.recent})")
        self.recent = self.w

    @property
    def prefill_rows(self) -> int:
        return self.w

    def check_budget(self, budget: int) -> None:
        if self.w >= budget:
            raise PolicyError(f"snapkv: window w={self.w} must be smaller than the budget {budget}")
        super().check_budget(budget)

    def slots(self, budget: int, max_new_tokens: int) -> int:
        """Decode never evicts: every generated token needs a slot."""
        return budget + max_new_tokens

    def prefill_scores(self, view: PrefillView) -> torch.Tensor:
        pos = view.layer.pos
        start = pos.amax(dim=2, keepdim=True) + 1 - self.w  # first position of the window
        before = (pos >= 0) & (pos < start)
        return pool_by_position(view.colsum, pos, before, self.k, self.pool)
