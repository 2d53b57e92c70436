"""Group reduction: how the G = H / Hkv query heads of one KV head combine into one score row.

The compiled attention kernels fuse the default, `mean`. For `max` and `sum` the store asks the kernels
for the raw per-head probabilities (decode) or computes the column sums here (prefill), reducing over
the group per query row before anything sums over rows: the column sum of a max is not the max of
column sums.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..reference import attention_probs

if TYPE_CHECKING:
    from ..dist import TensorParallel

REDUCTIONS = ("mean", "max", "sum")
_CHUNK_ELEMENTS = 1 << 22  # probabilities held at once by `column_scores`


def reduce_group(x: torch.Tensor, n_kv_heads: int, how: str) -> torch.Tensor:
    """(B, H, ...) -> (B, Hkv, ...): mean, max or sum over the query heads that share a KV head."""
    g = x.reshape(x.shape[0], n_kv_heads, x.shape[1] // n_kv_heads, *x.shape[2:])
    return g.amax(2) if how == "max" else g.sum(2) if how == "sum" else g.mean(2)


def mean_over_heads(x: torch.Tensor, tp: TensorParallel | None) -> torch.Tensor:
    """(B, h, ...) -> (B, 1, ...): the mean over dim 1, over every rank's heads where a tensor-parallel
    group splits them (a layer-wide decision must be the same on every rank, and the one-process one)."""
    return x.mean(1, keepdim=True) if tp is None else tp.mean_heads(x)


def column_scores(q: torch.Tensor, k: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor, rows: int,
                  scale: float, how: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Hkv, S) fp32: the sum over the last `rows` query rows (all if <= 0) of the group-reduced
    softmax(scale q.k + bias), causal by position like ops.prefill_attention's col_scores. q (B, H, L, D),
    k (B, Hkv, S, D), qpos (B, L), kpos (B, Hkv, S), bias (B, Hkv, S) or None; at most `chunk` x S
    probabilities per head at once."""
    B, H, L, _ = q.shape
    S = k.shape[2]
    row0 = L - rows if 0 < rows < L else 0
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * H * S))
    cols = torch.zeros(B, k.shape[1], S, device=q.device)
    for t0 in range(row0, L, chunk):
        t1 = min(L, t0 + chunk)
        probs, _ = attention_probs(q[:, :, t0:t1], k, qpos[:, t0:t1], kpos, scale, torch.float32, bias)
        cols += reduce_group(probs, k.shape[1], how).sum(2)
    return cols
