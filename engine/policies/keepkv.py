"""KeepKV (Tian et al. 2025, arXiv 2504.09936, "KeepKV: Eliminating Output Perturbation in KV Cache
Compression"; v2: "Achieving Periodic Lossless KV Cache Compression"; no code used): merge an evicted entry into the kept entry with the most similar key so that, for the
reference query, attention's output is exactly what it was before the merge.

Electoral votes: each slot carries a vote count p (1 for a plain token), kept as log p in the per-slot
state `logp` (0 for a fresh token; the store moves it with the other per-slot state and passes it to the
attention kernels as their logit `bias`), so attention weighs slot i by p_i exp(s_i), s_i = scale q.k_i.

ZIP-merging of victim e into receiver c, with weights w = p exp(s) at the reference query q:

    p_r = p_e + p_c
    v_r = (w_e v_e + w_c v_c) / (w_e + w_c)
    k_r = kbar + a q,  kbar = (w_e k_e + w_c k_c) / (w_e + w_c),  a such that p_r exp(scale q.k_r) = w_e + w_c

so the merged slot draws exactly the attention mass and value the two drew: single-step lossless for q.

WeightedKV's policy with this merge (engine/policies/weightedkv.py), so the merges compare on equal terms:
the victim is the slot with the least average attention `acc / cnt` (sinks and the recent window
protected), a prompt chunk's drops are merged one at a time in that order, and acc and cnt of a receiver
stay (its average then grows with the votes it gathered).

Our choices, where the paper is open or differs:
- the receiver is the valid non-sink slot of the same KV head whose key, as attention sees it (rotated),
  has the largest cosine similarity with the victim's; the merge happens only when that similarity is at
  least `min_similarity` (default 0.0: keys that do not point away from each other), else the victim is
  just evicted (the paper merges above a similarity threshold it does not pin down for us).
- the reference query is the mean of the KV head's G query heads (rotated, as attention used them) of the
  step that just ran: a decode step's query, or a prompt chunk's last row. The merge is lossless for that
  query exactly; for each single query head only approximately (one key cannot match G logits). The
  paper's EMA prediction of future attention for multi-step use is not implemented.
- k_r is corrected along q (not scaled): the smallest change of the weighted mean key that matches the logit.
- with positions="cache" the merged key is formed at the receiver's current rank and stored rotated back
  (keys are kept before RoPE there).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..rope import Rope
from .base import DecodeView, PolicyError, PrefillView
from .slots import HeadSlots
from .weightedkv import AverageAttentionMerge


@dataclass
class KeepKV(AverageAttentionMerge):
    min_similarity: float = 0.0

    name: ClassVar[str] = "keepkv"
    state_names: ClassVar[tuple[str, ...]] = ("cnt", "logp")
    merges_keys: ClassVar[bool] = True
    logit_bias: ClassVar[str | None] = "logp"

    def check_params(self) -> None:
        if not -1.0 <= self.min_similarity <= 1.0:
            raise PolicyError(f"keepkv: min_similarity must be in [-1, 1], got {self.min_similarity}")

    def merge(self, view: DecodeView | PrefillView, abar: torch.Tensor, pos: torch.Tensor,
              victim: torch.Tensor, heads: torch.Tensor | None = None) -> None:
        """ZIP-merge slot victim[b, g] (-1: none) into its receiver: key, value and log votes in place (the
        module docstring's formulas, in fp32; `abar` is not needed: the weights come from the query). The
        receiver search (ops.nearest_key) reads only the keys of the heads that have a victim."""
        layer, at = view.layer, HeadSlots(view.layer, heads)
        D, rope = view.q.shape[-1], view.rope
        keys = layer.k  # as stored: after RoPE (original positions), in the pool or per head
        if rope is not None:  # positions="cache": compared and merged as attention sees them, rotated at their ranks
            rank = layer.rank.clamp(min=0).long()
            keys = Rope.rotate_by(keys.float(), rope.cos[rank], rope.sin[rank])
        receiver = torch.empty_like(victim)
        similarity = torch.empty(victim.shape, device=victim.device)
        ops.nearest_key(keys, pos, victim, self.sinks, receiver, similarity,
                        slot_index=layer.index if keys.dim() == 3 else None)
        victim, receiver, similarity = at.narrow(victim), at.narrow(receiver), at.narrow(similarity)  # (B, n)
        go = (victim >= 0) & (similarity >= self.min_similarity)  # -inf (no candidate) never merges
        e, c = victim.clamp(min=0)[..., None], receiver.clamp(min=0)[..., None]  # (B, n, 1)
        k_e, k_c = (at.read(keys, i)[:, :, 0].float() for i in (e, c))  # (B, n, D)
        q = at.narrow(reference_query(view))
        scale = 1.0 / math.sqrt(D)
        lp = at.narrow(layer.state["logp"])
        lp_e, lp_c = lp.gather(2, e)[..., 0], lp.gather(2, c)[..., 0]
        # exp, log and logaddexp over (B, Hkv), each head where a merge of every head puts it: a vectorised
        # lane and the scalar tail round differently, so the merge of `heads` alone keeps that merge's bits
        wide = lambda t: at.widen(t, 0.0)
        le = wide(lp_e + scale * (q * k_e).sum(-1))  # log w_e
        lc = wide(lp_c + scale * (q * k_c).sum(-1))
        top = torch.maximum(le, lc)
        w_e, w_c = (le - top).exp(), (lc - top).exp()
        total = w_e + w_c
        lp_r = torch.logaddexp(wide(lp_e), wide(lp_c))
        target = (top + total.log() - lp_r) / scale  # the q.k_r that gives p_r exp(s_r) = w_e + w_c
        w_e, w_c, total, lp_r, target = (at.narrow(t) for t in (w_e, w_c, total, lp_r, target))  # (B, n)
        w_e, w_c, total = w_e[..., None], w_c[..., None], total[..., None]
        v_r = (w_e * at.read(layer.v, e)[:, :, 0].float() + w_c * at.read(layer.v, c)[:, :, 0].float()) / total
        k_bar = (w_e * k_e + w_c * k_c) / total
        qq = (q * q).sum(-1)
        a = torch.where(qq > 0, (target - (q * k_bar).sum(-1)) / qq.clamp(min=1e-30), 0.0)
        k_r = k_bar + a[..., None] * q
        if rope is not None:  # back to the stored (pre-RoPE) key: the inverse rotation at the receiver's rank
            r = at.narrow(rank).gather(2, c)[..., 0]
            k_r = Rope.rotate_by(k_r, rope.cos[r], -rope.sin[r])
        go = go[..., None]  # the receiver's row where a merge happens
        at.write(layer.k, c, k_r[:, :, None], go)
        at.write(layer.v, c, v_r[:, :, None], go)
        at.write_state(layer.state["logp"], c, lp_r[..., None], go)
        self.count(view, go[..., 0])


def reference_query(view: DecodeView | PrefillView) -> torch.Tensor:
    """(B, Hkv, D) fp32: the mean over each KV head's query heads of the query attention just used (a
    prompt chunk's last row)."""
    q = view.q if view.q.dim() == 3 else view.q[:, :, -1]
    B, H, D = q.shape
    Hkv = view.layer.pos.shape[1]
    return q.float().view(B, Hkv, H // Hkv, D).mean(2)
