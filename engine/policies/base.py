"""The policy interface: what a policy keeps per slot, what it needs from attention, how it scores.

A policy never touches the cache buffers' layout; the KVStore (engine/cache.py) owns slots, writes,
attention and the eviction itself. A policy only turns attention statistics into per-slot scores
(lower = evicted first) and may post-process an eviction (WeightedKV's value merge).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar

import torch

from .reduce import REDUCTIONS

if TYPE_CHECKING:
    from ..cache import LayerState
    from ..model import Rope


class PolicyError(ValueError):
    """A policy name or parameter that cannot work."""


@dataclass
class DecodeView:
    """What a policy sees after one decode step's attention: in one layer, or (the default, see
    Policy.layerwise_decode) in every layer at once, stacked along the batch dim (n_layers * B rows)."""

    layer: "LayerState"
    step_pos: int  # original position of the token just inserted
    q: torch.Tensor  # (B, H, D) the query as attention used it (rotated)
    probs: torch.Tensor | None  # (B, H, C) this step's softmax row, when the policy asks for it
    rope: "Rope | None" = None  # positions="cache": the tables attention rotated the stored keys with

    @functools.cached_property
    def k(self) -> torch.Tensor:
        """(B, Hkv, C, D) the keys as attention used them (rotated). With positions="cache" attention
        rotates them on the fly, so they are materialised only for a policy that reads them."""
        st = self.layer
        return st.k if self.rope is None else self.rope.rotate(st.k, st.rank)


@dataclass
class PrefillView:
    """What a policy sees when a prompt chunk is compressed: every entry of cache + chunk (N of them)."""

    layer: "LayerState"  # .k/.v/.pos/.state hold the N concatenated entries (cache first, then chunk)
    q: torch.Tensor  # (B, H, T, D) the chunk's queries as attention used them (rotated)
    k: torch.Tensor  # (B, Hkv, N, D) keys as attention used them (rotated)
    colsum: torch.Tensor | None  # (B, Hkv, N) group-reduced column sums over the rows the policy asked for
    n_rows: int  # how many query rows those column sums cover
    rows_seen: torch.Tensor  # (B, Hkv, N) fp32, number of chunk rows that could see each entry
    budget: int = 0  # entries the store keeps after this chunk (0: the store did not say)


@dataclass
class Policy:
    """Base class: sinks + recent protection, argmin victim over a per-slot score."""

    budget: int | float = 256
    sinks: int = 0
    recent: int = 0
    positions: str = "original"
    group_reduce: str = "mean"  # how the G query heads of a KV head combine: mean | max | sum

    name: ClassVar[str] = ""
    state_names: ClassVar[tuple[str, ...]] = ()  # per-slot fp32 tensors the policy keeps
    needs_acc: ClassVar[bool] = False  # the store adds group-reduced probs into state["acc"] every decode step
    needs_probs: ClassVar[bool] = False  # decode attention writes the raw row (B, H, C)
    value_norm: ClassVar[str | None] = None  # l1 | l2 | linf, stored in state["vnorm"] at insertion
    evicts_on_decode: ClassVar[bool] = True
    per_layer: ClassVar[bool] = False  # one decision for all KV heads of a layer (TOVA)
    merges_values: ClassVar[bool] = False  # every eviction merges the victim's value (WeightedKV)
    observes_prefill: ClassVar[bool] = False  # prefill_scores runs on every chunk, not only when it compresses
    # decode hooks run per layer (a policy with per-layer `extra` state), not once per step for all layers
    layerwise_decode: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)):
            raise PolicyError(f"{self.name}: budget must be an int (tokens) or a float in (0, 1], got {self.budget!r}")
        if isinstance(self.budget, float) and not 0.0 < self.budget <= 1.0:
            raise PolicyError(f"{self.name}: a fractional budget must be in (0, 1], got {self.budget}")
        if isinstance(self.budget, int) and self.budget <= 0:
            raise PolicyError(f"{self.name}: budget must be positive, got {self.budget}")
        if self.sinks < 0 or self.recent < -1:
            raise PolicyError(f"{self.name}: sinks must be >= 0 and recent >= 0 (or -1 for budget // 2)")
        self._half_recent = self.recent == -1
        if self.positions not in ("original", "cache"):
            raise PolicyError(f"{self.name}: positions must be 'original' or 'cache', got {self.positions!r}")
        if self.group_reduce not in REDUCTIONS:
            raise PolicyError(f"{self.name}: group_reduce must be one of {', '.join(REDUCTIONS)}, got {self.group_reduce!r}")
        if isinstance(self.budget, int):
            self.resolve_budget(0)

    # ---- sizing ---------------------------------------------------------------------------------
    def check_budget(self, budget: int) -> None:
        if self._half_recent:
            self.recent = budget // 2
        if budget <= self.sinks + self.recent:
            raise PolicyError(
                f"{self.name}: budget {budget} must exceed sinks + recent = {self.sinks} + {self.recent}"
            )

    def resolve_budget(self, prompt_len: int) -> int:
        """Tokens kept per (layer, KV head); a float budget is a fraction of the prompt."""
        budget = max(1, int(self.budget * prompt_len)) if isinstance(self.budget, float) else self.budget
        self.check_budget(budget)
        return budget

    def capacity(self, budget: int, max_new_tokens: int) -> int:
        """Slots to allocate: the budget plus the spare slot the incoming token lands in."""
        return budget + 1

    # ---- scoring --------------------------------------------------------------------------------
    prefill_rows: ClassVar[int | None] = None  # column sums over the last N prompt rows (None = all, 0 = none)

    def prefill_scores(self, view: PrefillView) -> torch.Tensor:
        """(B, Hkv, N) scores of the cache + chunk entries; also sets the kept entries' state."""
        raise NotImplementedError

    def decode_update(self, view: DecodeView) -> None:
        """Fold this step's attention into the per-slot state (the store already added `acc`)."""

    def decode_scores(self, view: DecodeView) -> torch.Tensor:
        """(B, Hkv, C) per-slot score; the eligible minimum is evicted."""
        raise NotImplementedError

    def after_evict(self, view: DecodeView, victim: torch.Tensor) -> None:
        """Called with the victim slots (B, Hkv) before they are freed."""

    @classmethod
    def options(cls) -> list[tuple[str, type, object]]:
        """(name, type, default) of every parameter: the CLI builds its flags from these."""
        return [(f.name, f.type, f.default) for f in fields(cls)]
