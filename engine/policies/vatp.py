"""VATP (Guo et al. 2024, arXiv 2406.12335): the base policy's attention score times the token's value norm.

Composed, not copied: an H2O or Scissorhands instance keeps and updates the attention state; VATP only
multiplies its score by the norm of each slot's value vector, stored once at insertion (`vnorm`).
GQA (left open by the paper, our choice): the base score is group-reduced, the norm is the KV head's own.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from .base import DecodeView, Policy, PolicyError, PrefillView
from .h2o import H2O
from .scissorhands import Scissorhands

BASES: dict[str, type[Policy]] = {"h2o": H2O, "scissorhands": Scissorhands}
NORMS = ("l1", "l2", "linf")


@dataclass
class VATP(Policy):
    base: str = "h2o"
    sinks: int = 20  # the paper's LLaMA-2 setting (40 for Vicuna)
    recent: int | None = None  # None: the base's default (h2o: budget // 2, scissorhands: 10)
    norm: str = "l1"  # ablation switch: l1 | l2 | linf
    m: int = 400  # scissorhands window (base="scissorhands")

    name: ClassVar[str] = "vatp"
    needs_acc: ClassVar[bool] = True  # both bases accumulate attention

    def check_params(self) -> None:
        if self.base not in BASES:
            raise PolicyError(f"vatp: base must be one of {', '.join(BASES)}, got {self.base!r}")
        if self.norm not in NORMS:
            raise PolicyError(f"vatp: norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.recent is None:
            self.recent = next(f.default for f in fields(BASES[self.base]) if f.name == "recent")

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = BASES[self.base]
        extra = {"m": self.m} if cls is Scissorhands else {}
        self._base = cls(budget=self.budget, sinks=self.sinks, recent=self.recent, positions=self.positions,
                         group_reduce=self.group_reduce, **extra)

    @property
    def value_norm(self) -> str:
        """l2 is stored squared (the op's L2^2); `_norm` takes the root."""
        return self.norm

    @property
    def prefill_rows(self) -> int | None:
        return self._base.prefill_rows

    def _norm(self, vnorm: torch.Tensor) -> torch.Tensor:
        return vnorm.sqrt() if self.norm == "l2" else vnorm

    def prefill_scores(self, view: PrefillView) -> torch.Tensor:
        return self._base.prefill_scores(view) * self._norm(view.layer.state["vnorm"])

    def decode_update(self, view: DecodeView) -> None:
        self._base.decode_update(view)

    def decode_scores(self, view: DecodeView) -> torch.Tensor:
        return self._base.decode_scores(view) * self._norm(view.layer.state["vnorm"])
