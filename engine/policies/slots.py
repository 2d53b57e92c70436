"""The slots of chosen KV heads of a layer, as the merging policies read and write them: in either layout a
store passes (dense k/v [B, Hkv, C, D], or a pooled store's pool [P, R, D] with `layer.index`, where slot s
of head g of row b is row index[b, g, s] of pool batch b % P), and for only the heads that evict. Under
adaptive allocation one head per row evicts per pick: the other heads need no work, and a copy of the
pool's rows would be written back whole. (The receiver searches read keys in place: ops.nearest_key.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .views import LayerState


@dataclass(frozen=True)
class HeadSlots:
    layer: LayerState
    heads: torch.Tensor | None  # (B, n) int64: the KV heads worked on in each row; None: all of them, in order

    @property
    def pooled(self) -> bool:
        return self.layer.k.dim() == 3

    def narrow(self, t: torch.Tensor) -> torch.Tensor:
        """t [B, Hkv, ...] -> [B, n, ...]: the chosen heads' entries (t itself for all heads)."""
        if self.heads is None:
            return t
        h = self.heads.view(*self.heads.shape, *(1,) * (t.dim() - 2))
        return t.gather(1, h.expand(-1, -1, *t.shape[2:]))

    def widen(self, t: torch.Tensor, fill: int | float) -> torch.Tensor:
        """t [B, n] -> [B, Hkv]: back at the chosen heads, `fill` at the others."""
        if self.heads is None:
            return t
        return torch.full(self.layer.pos.shape[:2], fill, dtype=t.dtype, device=t.device).scatter_(1, self.heads, t)

    def read(self, buf: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """(B, n, m, D) rows of buf (the layer's k or v) at slots (B, n, m) of the chosen heads."""
        return buf[self._where(slots)]

    def write(self, buf: torch.Tensor, slots: torch.Tensor, new: torch.Tensor, go: torch.Tensor) -> None:
        """Rows of buf (the layer's k or v) at slots (B, n, m) of the chosen heads = new (B, n, m, D) where
        go (B, n, m), else unchanged. The slots of one head must differ where go holds."""
        self._put(buf, self._where(slots), new, go[..., None])

    def write_state(self, t: torch.Tensor, slots: torch.Tensor, new: torch.Tensor, go: torch.Tensor) -> None:
        """A per-slot tensor t (B, Hkv, C) at slots (B, n, m) of the chosen heads = new where go, as `write`."""
        self._put(t, self._where(slots, per_slot=True), new, go)

    @staticmethod
    def _put(t: torch.Tensor, at: tuple[torch.Tensor, ...], new: torch.Tensor, go: torch.Tensor) -> None:
        t.index_put_(at, torch.where(go, new.to(t.dtype), t[at]))

    def _where(self, slots: torch.Tensor, per_slot: bool = False) -> tuple[torch.Tensor, ...]:
        """Advanced index of slots (B, n, m) of the chosen heads: into k/v, or with per_slot into a [B, Hkv, C]
        per-slot tensor (always dense)."""
        B = slots.shape[0]
        row = torch.arange(B, device=slots.device)[:, None, None]
        head = (torch.arange(self.layer.pos.shape[1], device=slots.device)[None, :, None] if self.heads is None
                else self.heads[..., None])
        if per_slot or not self.pooled:
            return row, head, slots
        index = self.layer.index[row, head, slots].long()
        return self._pool_batch(index), index

    def _pool_batch(self, index: torch.Tensor) -> torch.Tensor:
        """The pool batch of each row of index (B, ...): b % P, shaped to broadcast against it."""
        b = torch.arange(index.shape[0], device=index.device) % self.layer.k.shape[0]
        return b.view(-1, *(1,) * (index.dim() - 1))
