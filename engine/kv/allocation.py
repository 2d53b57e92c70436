"""Where the budget goes: the allocation rules of Policy.allocation, over any scoring policy.

    uniform   every (layer, KV head) keeps `budget` tokens: the store of engine/kv/store.py, unchanged.
    pyramid   PyramidKV (Cai et al. 2024, arXiv 2406.02069): layer l keeps b_l tokens per KV head, b_l
              decreasing linearly with depth, the total over layers unchanged (pyramid_budgets). Within
              a layer every KV head keeps b_l (PyramidKV's choice); each head evicts its own victim.
    adaptive  Ada-KV (Feng et al. 2024, arXiv 2407.11550): a layer keeps n_kv_heads x budget tokens, and the
              heads share them by score. Prefill keeps the top n_kv_heads x budget entries of the layer
              over the concatenated heads' normalised scores (Ada-KV's top-k); decode evicts, for each
              of the n_kv_heads tokens a step adds, the lowest normalised score among all the layer's
              evictable entries, so a slot moves from one head to another (Ada-KV itself allocates at
              prefill only; the decode rule is ours, the same selection one token at a time).

Adaptive details (ours where Ada-KV's paper is silent or differs):
- normalisation: a head's scores are divided by their sum over the head's valid entries (each head's
  scores then sum to 1, like one attention row), so scores of different scales (accumulated attention
  of heads that saw different numbers of kept tokens, VATP's value-norm products) compare. A head whose
  valid scores sum to 0 keeps its raw (zero) scores.
- floor: a head never keeps fewer than `min_share` tokens (default sinks + recent + a fifth of the
  evictable rest, after Ada-KV's safeguard that keeps a fraction of the uniform budget in every head);
  sinks and the recent window are protected in every head as in the uniform rule.
- ties: the entry of the lower head, then the lower slot, goes first at decode (ops.adaptive_victims, one
  pass over a layer's slots); prefill keeps later positions first, as keep_indices does.
- TOVA's one decision per layer becomes per head: each KV head ranks by its own group's attention.
"""
from __future__ import annotations

import math

import torch

from ..policies.base import Policy
from ..reference import head_totals


def pyramid_budgets(budget: int, protected: int, n_layers: int, beta: float) -> list[int]:
    """Per-layer tokens per KV head. PyramidKV's schedule on the evictable part E = budget - protected
    (sinks + recent, which every layer keeps): the top layer keeps E / beta, the bottom 2 E - E / beta,
    linearly in between, so the mean is E. Ours: rounded by largest remainder so the total is exactly
    n_layers x budget, and every layer keeps at least one evictable token."""
    evictable = budget - protected
    if n_layers == 1 or evictable <= 1:
        return [budget] * n_layers
    low = evictable / beta
    high = 2 * evictable - low
    exact = [high - (high - low) * l / (n_layers - 1) for l in range(n_layers)]
    share = [max(1, math.floor(x)) for x in exact]
    left = evictable * n_layers - sum(share)
    order = sorted(range(n_layers), key=lambda l: (share[l] - exact[l], l))  # most under-served first
    for i in range(abs(left)):
        l = order[i % n_layers] if left > 0 else order[-1 - i % n_layers]
        share[l] += 1 if left > 0 else -1
    return [protected + s for s in share]


def min_share(policy: Policy, budget: int) -> int:
    """The fewest tokens a KV head keeps under adaptive allocation (see the module docstring)."""
    if policy.min_share >= 0:
        return policy.min_share
    protected = policy.sinks + policy.recent
    return protected + (budget - protected) // 5


def normalised(score: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Each head's scores over its sum on the valid entries (B, Hkv, N): shares of the head's total."""
    return score.float().masked_fill(~valid, 0.0) / head_totals(score, valid)


def adaptive_keep(score: torch.Tensor, pos: torch.Tensor, protected: torch.Tensor, keep_total: int,
                  floor: int) -> torch.Tensor:
    """(B, Hkv, N) bool: the entries a layer keeps under adaptive allocation. Protected entries, then each
    head's `floor` best, then the best normalised scores of the layer until keep_total are kept; ties to
    later positions."""
    B, Hkv, N = pos.shape
    valid = pos >= 0
    key = normalised(score, valid).masked_fill(~valid, -math.inf).masked_fill(protected, math.inf)
    by_pos = torch.argsort(pos, dim=2, descending=True, stable=True)  # ties to later positions
    order = by_pos.gather(2, torch.argsort(key.gather(2, by_pos), dim=2, descending=True, stable=True))
    rank = torch.empty_like(order).scatter_(2, order, torch.arange(N, device=pos.device).expand(B, Hkv, N))
    key = key.masked_fill((rank < floor) & valid, math.inf)
    flat_pos = pos.reshape(B, Hkv * N)
    by_pos = torch.argsort(flat_pos, dim=1, descending=True, stable=True)
    flat = by_pos.gather(1, torch.argsort(key.reshape(B, -1).gather(1, by_pos), dim=1, descending=True,
                                          stable=True))[:, :keep_total]
    keep = torch.zeros(B, Hkv * N, dtype=torch.bool, device=pos.device).scatter_(1, flat, True)
    return keep.view(B, Hkv, N) & valid


def uniform_keep(keep_idx: torch.Tensor, n: int) -> torch.Tensor:
    """(B, Hkv, n) bool from keep_indices' (B, Hkv, budget) entries."""
    B, Hkv, _ = keep_idx.shape
    return torch.zeros(B, Hkv, n, dtype=torch.bool, device=keep_idx.device).scatter_(2, keep_idx, True)
