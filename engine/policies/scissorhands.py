"""Scissorhands (Liu et al. 2023), fixed-budget reading: importance over a window of the last m query rows.

The score is an exponential window, `score <- score * (1 - 1/m) + a / m` per decode row (our choice: O(1)
state). It lives in the attention accumulator `acc` scaled by m - 1, so the decode kernel's fused add
is the whole update: between steps `acc = (m - 1) * score`; the kernel adds the row `a`, giving
`m * score_new`; `decode_update` multiplies by (m - 1) / m. Ranking by `acc` is ranking by the score.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import DecodeView, Policy, PolicyError, PrefillView


@dataclass
class Scissorhands(Policy):
    m: int = 400  # history window (query rows)
    recent: int = 10

    name: ClassVar[str] = "scissorhands"
    needs_acc: ClassVar[bool] = True

    def check_params(self) -> None:
        if self.m < 2:
            raise PolicyError(f"scissorhands: window m must be >= 2 (the score decays by (m-1)/m), got {self.m}")

    @property
    def prefill_rows(self) -> int:
        return self.m

    def prefill_scores(self, view: PrefillView) -> torch.Tensor:
        """Mean attention over the last min(m, rows seen) rows. A chunk of n < m rows that follows
        earlier rows keeps the old score for the other m - n rows of the window (our choice: the
        chunked form of the decode EMA; one prompt in one chunk gets the plain mean)."""
        acc = view.layer.state["acc"]
        seen = int(view.layer.pos.max()) + 1  # rows so far: every token was a query
        old_rows = min(self.m, seen) - view.n_rows
        score = (acc * (old_rows / (self.m - 1)) + view.colsum) / (old_rows + view.n_rows)
        acc.copy_(score * (self.m - 1))
        return score

    def decode_update(self, view: DecodeView) -> None:
        view.layer.state["acc"].mul_((self.m - 1) / self.m)

    def decode_scores(self, view: DecodeView) -> torch.Tensor:
        return view.layer.state["acc"]
