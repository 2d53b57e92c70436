"""The policy interface: what a policy keeps per slot, what it needs from attention, how it scores.

A policy never touches the cache buffers' layout; the KVStore (engine/kv/) owns slots, writes,
attention and the eviction itself. A policy only turns attention statistics into per-slot scores
(lower = evicted first) and may post-process an eviction (WeightedKV's value merge).
"""
from __future__ import annotations

import functools
import math
import types
from dataclasses import dataclass, fields
from typing import ClassVar, Union, get_args, get_origin, get_type_hints

import torch

from .reduce import REDUCTIONS

ALLOCATIONS = ("uniform", "adaptive", "pyramid")
from .views import DecodeView, PrefillView  # what a policy sees: the arguments of the hooks below


class PolicyError(ValueError):
    """A policy name or parameter that cannot work."""


@dataclass
class Policy:
    """Base class: sinks + recent protection, argmin victim over a per-slot score."""

    budget: int | float = 256
    sinks: int = 0
    recent: int = 0
    positions: str = "original"
    group_reduce: str = "mean"  # how the G query heads of a KV head combine: mean | max | sum
    # where the budget goes (engine/kv/allocation.py defines each rule): uniform | adaptive | pyramid
    allocation: str = "uniform"
    min_share: int = -1  # adaptive: fewest tokens a KV head keeps; -1: sinks + recent + a fifth of the rest
    pyramid_beta: float = 20.0  # pyramid: the top layer keeps 1/beta of the mean evictable budget

    name: ClassVar[str] = ""
    state_names: ClassVar[tuple[str, ...]] = ()  # per-slot fp32 tensors the policy keeps
    needs_acc: ClassVar[bool] = False  # the store adds group-reduced probs into state["acc"] every decode step
    needs_probs: ClassVar[bool] = False  # decode attention writes the raw row (B, H, C)
    value_norm: ClassVar[str | None] = None  # l1 | l2 | linf, stored in state["vnorm"] at insertion
    evicts_on_decode: ClassVar[bool] = True
    layer_wide: ClassVar[bool] = False  # one eviction decision for all KV heads of a layer (TOVA), not per head
    merges_values: ClassVar[bool] = False  # every eviction merges the victim's value (WeightedKV)
    merges_keys: ClassVar[bool] = False  # a merge also rewrites the receiver's key (KeepKV)
    # a per-slot state added to every attention logit over the cache (KeepKV's log vote counts; 0 for a
    # plain token): the kernels' `bias`. None: attention without one, the plain kernels
    logit_bias: ClassVar[str | None] = None
    reads_kv: ClassVar[bool] = False  # decode scoring or after_evict reads the slots' keys or values
    observes_prefill: ClassVar[bool] = False  # prefill_scores runs on every chunk, not only when it compresses
    # decode_update/decode_scores are called for each layer in turn (a policy with per-layer `extra` state),
    # not once per step for all layers stacked
    decode_layer_by_layer: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.check_types()  # first: every range check below, and the subclass's, may rely on the types
        self.check_params()
        if isinstance(self.budget, float) and not 0.0 < self.budget <= 1.0:
            raise PolicyError(f"{self.name}: a fractional budget must be in (0, 1], got {self.budget}")
        if isinstance(self.budget, int) and self.budget <= 0:
            raise PolicyError(f"{self.name}: budget must be positive, got {self.budget}")
        if self.sinks < 0 or self.recent < -1:
            raise PolicyError(f"{self.name}: sinks must be >= 0 and recent >= 0 (or -1 for budget // 2)")
        self._half_recent = self.recent == -1
        if self.positions not in ("original", "cache"):
            raise PolicyError(f"{self.name}: positions must be 'original' or 'cache', got {self.positions!r}")
        if self.allocation not in ALLOCATIONS:
            raise PolicyError(f"{self.name}: allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.allocation != "uniform" and self.positions != "original":
            raise PolicyError(f"{self.name}: allocation {self.allocation!r} needs positions='original' (with 'cache' "
                              "the query's rank would differ between layers and heads)")
        if self.min_share < -1 or self.pyramid_beta < 1.0:
            raise PolicyError(f"{self.name}: min_share must be >= 0 (or -1: the default) and pyramid_beta >= 1, "
                              f"got {self.min_share} and {self.pyramid_beta}")
        if self.group_reduce not in REDUCTIONS:
            raise PolicyError(f"{self.name}: group_reduce must be one of {', '.join(REDUCTIONS)}, got {self.group_reduce!r}")
        if isinstance(self.budget, int):
            self.resolve_budget(0)

    def check_types(self) -> None:
        """Every parameter of the type its field declares: no bool for an int, no NaN or inf for a number (a
        NaN compares False with every bound, so the range checks would let it through)."""
        for name, kinds in _field_types(type(self)).items():
            value = getattr(self, name)
            if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
                wanted = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
                raise PolicyError(f"{self.name}: {name} must be {wanted}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise PolicyError(f"{self.name}: {name} must be finite, got {value!r}")

    def check_params(self) -> None:
        """A subclass's own parameter ranges (run after the type checks, before the base's range checks)."""

    # ---- sizing ---------------------------------------------------------------------------------
    def check_budget(self, budget: int) -> None:
        if self._half_recent:
            self.recent = budget // 2
        if budget <= self.sinks + self.recent:
            raise PolicyError(
                f"{self.name}: budget {budget} must exceed sinks + recent = {self.sinks} + {self.recent}"
            )
        if self.min_share > budget:
            raise PolicyError(f"{self.name}: min_share {self.min_share} must not exceed the budget {budget}")

    def resolve_budget(self, prompt_len: int) -> int:
        """Tokens kept per (layer, KV head); a float budget is a fraction of the prompt."""
        budget = max(1, int(self.budget * prompt_len)) if isinstance(self.budget, float) else self.budget
        self.check_budget(budget)
        return budget

    def slots(self, budget: int, max_new_tokens: int) -> int:
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

    def pooled_values(self) -> bool:
        """Whether a pooled store (adaptive or pyramid allocation) passes its pool itself as the decode
        view's layer.k / layer.v ([P, R, D], slot s of row b at row index[b, g, s] of pool batch b % P)
        instead of per-head copies: a policy that reaches keys and values only through layer.index
        (the merge ops' slot_index). A merging policy must: the copies
        are not written back."""
        return False

    def after_evict(self, view: DecodeView, victim: torch.Tensor, heads: torch.Tensor | None = None) -> None:
        """Called with the victim slots (B, Hkv) before they are freed (-1: the head evicts nothing now,
        under adaptive or pyramid allocation); it may empty their positions. heads (B, n) int64, where
        given: the only heads whose victim may be >= 0 (adaptive allocation's one pick per row), so a policy
        may skip the others."""

    def after_evict_picks(self, view: DecodeView, picks: torch.Tensor) -> None:
        """Adaptive allocation's evictions of a step: picks (B, n) int64 entries (KV head C + slot) in order, -1:
        none. Each goes through after_evict with its head alone and sees the slots the earlier ones left: its
        position is emptied before the next (the store empties the rest of each slot afterwards)."""
        pos = view.layer.pos
        flat_pos = pos.view(pos.shape[0], -1)
        taken, some = picks >= 0, picks.clamp(min=0)
        heads, slots = some // pos.shape[2], torch.where(taken, some % pos.shape[2], -1)
        none = torch.full(pos.shape[:2], -1, dtype=torch.long, device=pos.device)
        for i in range(picks.shape[1]):
            head = heads[:, i : i + 1]
            self.after_evict(view, none.scatter(1, head, slots[:, i : i + 1]), head)
            flat = some[:, i : i + 1]
            flat_pos.scatter_(1, flat, torch.where(taken[:, i : i + 1], -1, flat_pos.gather(1, flat)))

    @classmethod
    def options(cls) -> list[tuple[str, type, object]]:
        """(name, type, default) of every parameter: the CLI builds its flags from these."""
        return [(f.name, f.type, f.default) for f in fields(cls)]


@functools.cache
def _field_types(cls: type[Policy]) -> dict[str, tuple[type, ...]]:
    """field name -> the classes its annotation allows (`int | None` -> (int, NoneType)). A field annotated
    otherwise (list[int], a Literal, a name that does not resolve) is left to the policy's own checks."""
    try:
        hints = get_type_hints(cls)
    except NameError:
        return {}
    out = {}
    for f in fields(cls):
        hint = hints[f.name]
        options = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
        if all(isinstance(o, type) for o in options):
            out[f.name] = options
    return out
