"""What an eviction policy sees of the cache: one layer's slots (LayerState) and the attention of the step
that just ran over them (DecodeView for a decode step, PrefillView for a prompt chunk). The store fills
them; a policy reads them and writes only its own per-slot state."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..rope import Rope

if TYPE_CHECKING:
    from ..dist import TensorParallel


@dataclass
class LayerState:
    k: torch.Tensor  # (B, Hkv, C, D) cache dtype; post-RoPE keys (positions="original") or pre-RoPE ("cache")
    v: torch.Tensor  # (B, Hkv, C, D)
    pos: torch.Tensor  # (B, Hkv, C) int32 original position, -1 = empty
    state: dict[str, torch.Tensor]  # name -> (B, Hkv, C) fp32
    rank: torch.Tensor | None = None  # (B, Hkv, C) int32 rank among valid slots (positions="cache")
    free: torch.Tensor | None = None  # (B, Hkv) int64 slot freed by the last eviction
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # policy-private non-slot tensors
    # adaptive / pyramid allocation (engine/kv/allocated.py): the tokens a KV head of this row's layer keeps
    # on average (B, 1, 1) int64, and with a pooled layout each slot's pool row (B, Hkv, C) int32 (k and v
    # then hold the slots' rows gathered per head, a copy made for a policy that reads them)
    quota: torch.Tensor | None = None
    # (for a policy whose pooled_values() holds, k and v are the pool [P, R, D] itself, row b at pool batch b % P)
    index: torch.Tensor | None = None

    def rows(self, lo: int, hi: int) -> "LayerState":
        """Views of batch rows [lo, hi) of every per-slot buffer (one layer of the all-layer state)."""
        view = lambda t: None if t is None else t[lo:hi]
        return LayerState(k=view(self.k), v=view(self.v), pos=self.pos[lo:hi],
                          state={n: s[lo:hi] for n, s in self.state.items()}, rank=view(self.rank),
                          free=view(self.free), quota=view(self.quota), index=view(self.index))


@dataclass
class DecodeView:
    """What a policy sees after one decode step's attention: in one layer, or (the default, see
    Policy.decode_layer_by_layer) in every layer at once, stacked along the batch dim (n_layers * B rows)."""

    layer: LayerState
    step_pos: int  # original position of the token just inserted
    q: torch.Tensor  # (B, H, D) the query as attention used it (rotated)
    probs: torch.Tensor | None  # (B, H, C) this step's softmax row, when the policy asks for it
    rope: Rope | None = None  # positions="cache": the tables attention rotated the stored keys with
    tp: TensorParallel | None = None  # the tensor-parallel group holding the other heads (reduce.mean_over_heads)
    merges: torch.Tensor | None = None  # (1,) int64: a merging policy adds the merges it made (None: not counted)

    @functools.cached_property
    def k(self) -> torch.Tensor:
        """(B, Hkv, C, D) the keys as attention used them (rotated). With positions="cache" attention
        rotates them on the fly (in the query's dtype), so they are materialised only for a policy that reads them."""
        st = self.layer
        return st.k if self.rope is None else self.rope.rotate(st.k.to(self.q.dtype), st.rank)


@dataclass
class PrefillView:
    """What a policy sees when a prompt chunk is compressed: every entry of cache + chunk (N of them)."""

    layer: LayerState  # .k/.v/.pos/.state hold the N concatenated entries (cache first, then chunk)
    q: torch.Tensor  # (B, H, T, D) the chunk's queries as attention used them (rotated)
    k: torch.Tensor  # (B, Hkv, N, D) keys as attention used them (rotated)
    colsum: torch.Tensor | None  # (B, Hkv, N) group-reduced column sums over the rows the policy asked for
    n_rows: int  # how many query rows those column sums cover
    rows_seen: torch.Tensor  # (B, Hkv, N) fp32, number of chunk rows that could see each entry
    budget: int = 0  # entries the store keeps after this chunk (0: the store did not say)
    tp: TensorParallel | None = None  # the tensor-parallel group holding the other heads (reduce.mean_over_heads)
    rope: Rope | None = None  # positions="cache": the tables `k` was rotated with (layer.rank: each entry's row)
    merges: torch.Tensor | None = None  # (1,) int64: a merging policy adds the merges it made (None: not counted)
