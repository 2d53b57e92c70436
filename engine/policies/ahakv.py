"""AhaKV (Gu et al. 2025, arXiv 2506.03762; no public code): recent accumulation of a step-gain softmax,
weighted by a value prior.

    S[s]     = sum over the last r query rows i of softmax(lambda_i * q_i . k)[s]   (group-reduced, default mean)
    lambda_i = sqrt(2 ln(n_i / budget) / d),  n_i = valid tokens row i sees
    gamma    = avg_pool1d(||v||_2^2 in position order, pool_kernel, same padding);  score = gamma / max(gamma) * S

Our choices, where the paper is silent:
- the last r queries (post-RoPE) are kept per layer and S is recomputed exactly over the current slots
  whenever a token must go, with the same visibility as attention (row i sees the tokens at
  positions <= its own). With `recent >= r` every evictable token has exactly r summands.
- a row that sees n_i <= budget tokens uses the model's 1/sqrt(d) (the formula needs n_i > budget).
- prefill scores use the same per-row lambda_i (row i of the prompt sees the tokens up to it), not one
  lambda for the whole chunk; the store's column sums are not used.
- avg pooling pads with zeros and divides by the kernel size (torch's default).
- positions="cache": kept queries stay rotated at the rank they had when they were asked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from .base import DecodeView, Policy, PolicyError, PrefillView
from .reduce import column_scores
from .snapkv import pool_by_position
from .views import LayerState


def step_gain(n: torch.Tensor, budget: int | torch.Tensor, head_dim: int) -> torch.Tensor:
    """lambda for rows that see n tokens; the model scale where n <= budget."""
    ratio = (n / budget).clamp(min=1.0)
    return torch.where(n > budget, (2.0 * ratio.log() / head_dim).sqrt(), torch.full_like(ratio, head_dim ** -0.5))


def recent_scores(q: torch.Tensor, qpos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                  budget: int | torch.Tensor, group_reduce: str = "mean") -> torch.Tensor:
    """S (B, Hkv, C): q (B, H, R, D) rows at original positions qpos (B, R) over keys k (B, Hkv, C, D),
    each row's G heads of a KV head reduced by `group_reduce`."""
    B, H, R, D = q.shape
    Hkv = k.shape[1]
    sees = (pos[:, :, None, :] >= 0) & (pos[:, :, None, :] <= qpos[:, None, :, None])  # (B, Hkv, R, C)
    lam = step_gain(sees.sum(-1).float(), budget, D).repeat_interleave(H // Hkv, dim=1)  # (B, H, R)
    qs = (q * lam[..., None].to(q.dtype)).contiguous()  # the per-row temperature rides on the query
    if group_reduce != "mean":  # the kernel's column sums are group means
        return column_scores(qs, k, qpos, pos, R, 1.0, group_reduce)
    S = torch.empty(B, Hkv, k.shape[2], device=q.device)
    out, lse = torch.empty_like(qs), torch.empty(B, H, R, device=q.device)
    # k may be rotated in the query dtype over a cache of another (positions="cache", kv_dtype): v alike
    ops.prefill_attention(qs, k.contiguous(), v.to(k.dtype).contiguous(), qpos.int().contiguous(), pos.contiguous(),
                          1.0, out, lse, S, R, 1.0)
    return S


@dataclass
class AhaKV(Policy):
    r: int = 32  # query rows per score
    recent: int = 32
    pool_kernel: int = 5

    name: ClassVar[str] = "ahakv"
    value_norm: ClassVar[str | None] = "l2"  # ||v||_2^2, stored at insertion
    observes_prefill: ClassVar[bool] = True  # the prompt's last queries are kept even without compression
    prefill_rows: ClassVar[int | None] = 0  # no column sums from the store: S has a per-row lambda
    decode_layer_by_layer: ClassVar[bool] = True  # the ring of kept queries lives in each layer's `extra`
    reads_kv: ClassVar[bool] = True

    def check_params(self) -> None:
        if self.r < 1:
            raise PolicyError(f"ahakv: r must be >= 1, got {self.r}")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise PolicyError(f"ahakv: pool_kernel must be odd and >= 1, got {self.pool_kernel}")

    def _rows(self, extra: dict[str, torch.Tensor], q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ring of the last r queries (B, H, r, D) and their positions (B, r); row of position p = p % r."""
        if "q" not in extra:
            B, H, _, D = q.shape
            extra["q"] = torch.zeros(B, H, self.r, D, dtype=q.dtype, device=q.device)
            extra["qpos"] = torch.full((B, self.r), -1, dtype=torch.int32, device=q.device)
        return extra["q"], extra["qpos"]

    def _score(self, layer: "LayerState", k: torch.Tensor, seen: int, budget: int | torch.Tensor) -> torch.Tensor:
        """gamma / max(gamma) * S over the layer's entries; k as attention used them, `seen` tokens so far."""
        n = min(self.r, seen)  # ring rows filled so far: 0..n-1
        S = recent_scores(layer.extra["q"][:, :, :n], layer.extra["qpos"][:, :n], k, layer.v, layer.pos, budget,
                          self.group_reduce)
        gamma = pool_by_position(layer.state["vnorm"], layer.pos, layer.pos >= 0, self.pool_kernel, "avg")
        return gamma / gamma.amax(dim=2, keepdim=True).clamp(min=torch.finfo(gamma.dtype).tiny) * S

    def prefill_scores(self, view: PrefillView) -> torch.Tensor:
        st = view.layer
        q, qpos = self._rows(st.extra, view.q)
        n = min(self.r, view.q.shape[2])
        new_pos = st.pos[:, 0, -n:]  # (B, n) the chunk's last positions
        ring = (new_pos % self.r).long()
        q.scatter_(2, ring[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]), view.q[:, :, -n:].to(q.dtype))
        qpos.scatter_(1, ring, new_pos)
        if view.budget < 1:
            raise RuntimeError("internal: ahakv needs PrefillView.budget from the store")
        if int((st.pos[0, 0] >= 0).sum()) <= view.budget:
            return torch.zeros_like(st.state["vnorm"])  # nothing is dropped from this chunk
        return self._score(st, view.k, int(st.pos.max()) + 1, view.budget)

    def decode_update(self, view: DecodeView) -> None:
        q, qpos = self._rows(view.layer.extra, view.q[:, :, None])
        row = view.step_pos % self.r
        q[:, :, row] = view.q
        qpos[:, row] = view.step_pos

    def decode_scores(self, view: DecodeView) -> torch.Tensor:
        """Called only when a token must go, i.e. the cache holds budget + 1 tokens."""
        st = view.layer
        budget = (st.pos >= 0).sum(dim=2, keepdim=True) - 1  # (B, Hkv, 1)
        return self._score(st, view.k, view.step_pos + 1, budget)
