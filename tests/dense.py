"""Slow, dense, independently written references of the eviction policies (used by tests/test_policies.py).

One layer, one sequence, drop mode, fp64. `simulate` feeds a prompt (one exact causal prefill,
compressed to the budget if longer) and then one token per decode step. Per KV head it keeps a plain
list of positions and a dict of values, and recomputes every score from its written definition over
the full history of attention rows and queries; nothing here shares code with the policy classes or
the KVStore. Only the RoPE tables (engine.rope.Rope) are shared.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from engine.rope import Rope
from engine.policies import Policy


@dataclass
class Trace:
    out: torch.Tensor  # (H, T, D) every token's attention output
    kept: list[list[int]]  # per KV head: the cached positions at the end, ascending
    values: list[dict[int, torch.Tensor]]  # per KV head: position -> value vector (merged for weightedkv)
    merged: list[dict[int, list[int]]] = field(default_factory=list)  # per KV head: receiver -> absorbed positions


def reduce_heads(rows: list[dict[int, float]], how: str) -> dict[int, float]:
    """One query row of a KV head's G query heads (slot -> probability each) as one row: mean, max or sum."""
    out = {}
    for s in rows[0]:
        ps = [row[s] for row in rows]
        out[s] = max(ps) if how == "max" else sum(ps) if how == "sum" else sum(ps) / len(ps)
    return out


def rotate(x: torch.Tensor, p: int, rope: Rope) -> torch.Tensor:
    """RoPE of one vector at position p (rotate_half layout)."""
    c, s = rope.cos[p].double(), rope.sin[p].double()
    half = x.shape[-1] // 2
    return x * c + torch.cat([-x[half:], x[:half]]) * s


def unrotate(x: torch.Tensor, p: int, rope: Rope) -> torch.Tensor:
    """The inverse of rotate: RoPE by -p."""
    c, s = rope.cos[p].double(), rope.sin[p].double()
    half = x.shape[-1] // 2
    return x * c - torch.cat([-x[half:], x[:half]]) * s


class _Sim:
    def __init__(self, policy: Policy, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, budget: int, rope: Rope):
        self.p, self.budget, self.rope = policy, budget, rope
        self.q, self.k = q.double(), k.double()
        self.H, self.T, self.D = q.shape
        self.Hkv = k.shape[0]
        self.G = self.H // self.Hkv
        self.kept: list[list[int]] = [[] for _ in range(self.Hkv)]
        self.val = [{s: v[g, s].double() for s in range(self.T)} for g in range(self.Hkv)]
        self.w: list[dict[int, float]] = [{} for _ in range(self.Hkv)]
        self.logp: list[dict[int, float]] = [{} for _ in range(self.Hkv)]  # keepkv: log votes (absent: 0)
        self.merged_key: list[dict[int, torch.Tensor]] = [{} for _ in range(self.Hkv)]  # keepkv: pre-RoPE
        self.merged: list[dict[int, list[int]]] = [{} for _ in range(self.Hkv)]
        self.rows: list[list[tuple[int, dict[int, float]]]] = [[] for _ in range(self.Hkv)]  # (t, group-reduced row)
        self.queries: dict[int, torch.Tensor] = {}  # t -> (H, D) query as attention used it
        self.ema: list[dict[int, float]] = [{} for _ in range(self.Hkv)]  # scissorhands
        self.out = torch.zeros(self.H, self.T, self.D, dtype=torch.float64)

    # ---- attention ----------------------------------------------------------------------------
    def _place(self, g: int, s: int, t: int) -> int:
        """Where key s sits for RoPE when token t attends: its position, or its rank among the cached."""
        if self.p.positions == "original":
            return s
        return sorted(x for x in self.kept[g] if x <= t).index(s)

    def key(self, g: int, s: int, t: int) -> torch.Tensor:
        return rotate(self.merged_key[g].get(s, self.k[g, s]), self._place(g, s, t), self.rope)

    def attend(self, t: int, visible: list[list[int]]) -> None:
        """Token t's query over `visible` per KV head: output, history rows, stored query."""
        qt = torch.zeros(self.H, self.D, dtype=torch.float64)
        for g in range(self.Hkv):
            heads = []
            for h in range(g * self.G, (g + 1) * self.G):
                qpos = t if self.p.positions == "original" else len([x for x in self.kept[g] if x < t])
                qt[h] = rotate(self.q[h, t], qpos, self.rope)
                logits = torch.stack([qt[h] @ self.key(g, s, t) / math.sqrt(self.D) + self.logp[g].get(s, 0.0)
                                      for s in visible[g]])
                probs = torch.softmax(logits, 0)
                self.out[h, t] = sum(pr * self.val[g][s] for pr, s in zip(probs, visible[g]))
                heads.append(dict(zip(visible[g], probs.tolist())))
            self.rows[g].append((t, reduce_heads(heads, self.p.group_reduce)))
        self.queries[t] = qt

    # ---- scores -------------------------------------------------------------------------------
    def streaming(self, g: int) -> dict[int, float]:
        return {s: float(s) for s in self.kept[g]}

    def h2o(self, g: int) -> dict[int, float]:
        return {s: sum(row.get(s, 0.0) for _, row in self.rows[g]) for s in self.kept[g]}

    def scissorhands(self, g: int) -> dict[int, float]:
        return {s: self.ema[g].get(s, 0.0) for s in self.kept[g]}

    def tova(self, g: int) -> dict[int, float]:
        """The current row, group-reduced per KV head, averaged over the KV heads."""
        return {s: sum(self.rows[x][-1][1].get(s, 0.0) for x in range(self.Hkv)) / self.Hkv for s in self.kept[g]}

    def vatp(self, g: int) -> dict[int, float]:
        base = self.h2o(g) if self.p.base == "h2o" else self.scissorhands(g)
        order = {"l1": 1, "l2": 2, "linf": math.inf}[self.p.norm]
        return {s: base[s] * float(torch.linalg.vector_norm(self.val[g][s], ord=order)) for s in self.kept[g]}

    def ahakv(self, g: int) -> dict[int, float]:
        t_now = max(self.queries)
        S = {s: 0.0 for s in self.kept[g]}
        for t in range(max(0, t_now - self.p.r + 1), t_now + 1):
            seen = [s for s in self.kept[g] if s <= t]
            n = len(seen)
            lam = math.sqrt(2 * math.log(n / self.budget) / self.D) if n > self.budget else 1 / math.sqrt(self.D)
            heads = []
            for h in range(g * self.G, (g + 1) * self.G):
                logits = torch.stack([self.queries[t][h] @ self.key(g, s, t_now) for s in seen]) * lam
                heads.append(dict(zip(seen, torch.softmax(logits, 0).tolist())))
            for s, pr in reduce_heads(heads, self.p.group_reduce).items():
                S[s] += pr
        order = sorted(self.kept[g])
        nu = [float(self.val[g][s].square().sum()) for s in order]
        half = self.p.pool_kernel // 2
        gamma = [sum(nu[max(0, i - half) : i + half + 1]) / self.p.pool_kernel for i in range(len(nu))]
        top = max(gamma)
        return {s: gamma[i] / top * S[s] for i, s in enumerate(order)}

    def abar(self, g: int) -> dict[int, float]:
        seen = {s: [row[s] for _, row in self.rows[g] if s in row] for s in self.kept[g]}
        return {s: sum(a) / len(a) for s, a in seen.items()}

    def score(self, g: int) -> dict[int, float]:
        name = "abar" if self.p.name in ("weightedkv", "cam", "keepkv") else self.p.name
        return getattr(self, name)(g)

    # ---- eviction -----------------------------------------------------------------------------
    def eligible(self, g: int, end: int) -> list[int]:
        return [s for s in self.kept[g] if s >= self.p.sinks and s < end - self.p.recent]

    def merge(self, g: int, j: int, abar: dict[int, float]) -> None:
        """WeightedKV: v_j goes into its neighbour's value with weight abar[j]."""
        others = [s for s in self.kept[g] if s != j and s >= self.p.sinks]
        if not others:
            return
        if self.p.receiver == "nearest_key":
            def stored(s: int) -> torch.Tensor:  # as the cache keeps it
                return self.k[g, s] if self.p.positions == "cache" else rotate(self.k[g, s], s, self.rope)

            m = max(others, key=lambda s: float(torch.cosine_similarity(stored(s), stored(j), 0)))
        else:
            after, before = [s for s in others if s > j], [s for s in others if s < j]
            nxt, prv = min(after, default=None), max(before, default=None)
            m = (nxt if nxt is not None else prv) if self.p.receiver == "next" else (prv if prv is not None else nxt)
        wm = self.w[g].get(m) or abar[m]
        total = wm + abar[j]
        self.val[g][m] = (wm * self.val[g][m] + abar[j] * self.val[g][j]) / total if total else (self.val[g][m] + self.val[g][j]) / 2
        self.w[g][m] = total
        self.merged[g].setdefault(m, []).extend([j, *self.merged[g].pop(j, [])])

    def cam_merge(self, g: int, j: int, abar: dict[int, float]) -> None:
        """CaM: v_j / m, times min(1, abar_j / the receivers' mean abar), onto each of the m next values."""
        receivers = sorted(s for s in self.kept[g] if s > j and s >= self.p.sinks)[: self.p.merge_window]
        if not receivers:
            return
        mean = sum(abar[r] for r in receivers) / len(receivers)
        p = (1.0 if abar[j] > 0 else 0.0) if mean == 0 else min(1.0, abar[j] / mean)
        for r in receivers:
            self.val[g][r] = self.val[g][r] + p * self.val[g][j] / self.p.merge_window

    def keepkv_merge(self, g: int, j: int, t: int, place: dict[int, int]) -> None:
        """KeepKV: j into the kept non-sink key most like it (cosine, as attention saw the keys at step t, from
        RoPE places `place`), votes added, value and key chosen so that the mean query of step t sees the same."""
        others = [s for s in self.kept[g] if s != j and s >= self.p.sinks]
        keys = {s: rotate(self.merged_key[g].get(s, self.k[g, s]), place[s], self.rope) for s in [*others, j]}
        if not others:
            return
        c = max(others, key=lambda s: float(torch.cosine_similarity(keys[s], keys[j], 0)))
        if float(torch.cosine_similarity(keys[c], keys[j], 0)) < self.p.min_similarity:
            return
        q = self.queries[t][g * self.G : (g + 1) * self.G].mean(0)
        lp = {s: self.logp[g].get(s, 0.0) for s in (j, c)}
        w = {s: math.exp(lp[s] + float(q @ keys[s]) / math.sqrt(self.D)) for s in (j, c)}
        total = w[j] + w[c]
        self.val[g][c] = (w[j] * self.val[g][j] + w[c] * self.val[g][c]) / total
        votes = math.log(math.exp(lp[j]) + math.exp(lp[c]))
        kbar = (w[j] * keys[j] + w[c] * keys[c]) / total
        want = (math.log(total) - votes) * math.sqrt(self.D)  # q . k_r
        k_r = kbar + (want - float(q @ kbar)) / float(q @ q) * q
        self.merged_key[g][c] = unrotate(k_r, place[c], self.rope)
        self.logp[g][c] = votes

    def evict_one(self, g: int, score: dict[int, float], end: int, t: int, place: dict[int, int]) -> None:
        """Evict the eligible minimum of `score` after step t (attention saw key s at RoPE place[s])."""
        j = min(self.eligible(g, end), key=lambda s: (score[s], s))
        if self.p.name == "weightedkv":
            self.merge(g, j, score)
        elif self.p.name == "cam":
            self.cam_merge(g, j, score)
        elif self.p.name == "keepkv":
            self.keepkv_merge(g, j, t, place)
        self.kept[g].remove(j)

    # ---- the protocol -------------------------------------------------------------------------
    def prefill(self, L: int) -> None:
        for g in range(self.Hkv):
            self.kept[g] = list(range(L))
        for t in range(L):
            self.attend(t, [list(range(t + 1))] * self.Hkv)
        m = getattr(self.p, "m", 1)
        for g in range(self.Hkv):  # scissorhands: mean over the last min(m, L) rows
            last = [row for _, row in self.rows[g][-min(m, L):]]
            self.ema[g] = {s: sum(row.get(s, 0.0) for row in last) / len(last) for s in range(L)}
        if L <= self.budget or self.p.name == "full":
            return
        if self.p.name == "tova":  # one decision per layer: the last row averaged over all heads
            score = self.tova(0)
            self.keep_top([score] * self.Hkv, L)
        elif self.p.name == "snapkv":
            self.keep_top([self.snapkv(g, L) for g in range(self.Hkv)], L)
        elif self.p.name in ("weightedkv", "cam", "keepkv"):
            for g in range(self.Hkv):
                abar = self.abar(g)
                while len(self.kept[g]) > self.budget:  # every key at the place the prompt's attention used
                    self.evict_one(g, abar, L, L - 1, {s: s for s in range(L)})
        else:
            self.keep_top([self.score(g) for g in range(self.Hkv)], L)

    def snapkv(self, g: int, L: int) -> dict[int, float]:
        w, k = self.p.w, self.p.k
        window = [row for t, row in self.rows[g] if t >= L - w]
        before = list(range(max(0, L - w)))
        raw = [sum(row[s] for row in window) for s in before]
        half = k // 2
        pooled = {}
        for i, s in enumerate(before):
            near = raw[max(0, i - half) : i + half + 1]
            pooled[s] = max(near) if self.p.pool == "max" else sum(near) / k
        return pooled

    def keep_top(self, scores: list[dict[int, float]], L: int) -> None:
        """Protected tokens, then the highest scores (ties: the later position stays)."""
        for g in range(self.Hkv):
            protected = [s for s in self.kept[g] if s < self.p.sinks or s >= L - self.p.recent]
            rest = sorted((s for s in self.kept[g] if s not in protected), key=lambda s: (-scores[g][s], -s))
            self.kept[g] = sorted(protected + rest[: self.budget - len(protected)])

    def decode(self, t: int) -> None:
        for g in range(self.Hkv):
            self.kept[g].append(t)
        self.attend(t, self.kept)
        m = getattr(self.p, "m", 1)
        for g in range(self.Hkv):
            row = self.rows[g][-1][1]
            self.ema[g] = {s: self.ema[g].get(s, 0.0) * (1 - 1 / m) + row[s] / m for s in self.kept[g]}
        if len(self.kept[0]) <= self.budget or not self.p.evicts_on_decode:
            return
        if self.p.name == "tova":
            score = self.tova(0)
            j = min(self.eligible(0, t + 1), key=lambda s: (score[s], s))
            for g in range(self.Hkv):
                self.kept[g].remove(j)
            return
        for g in range(self.Hkv):
            self.evict_one(g, self.score(g), t + 1, t, {s: self._place(g, s, t) for s in self.kept[g]})


def simulate(policy: Policy, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prompt_len: int, budget: int,
             rope: Rope) -> Trace:
    """q (H, T, D), k/v (Hkv, T, D) before RoPE: prefill the first prompt_len tokens, decode the rest."""
    sim = _Sim(policy, q, k, v, budget, rope)
    rope.ensure(q.shape[1] + 1)
    sim.prefill(prompt_len)
    for t in range(prompt_len, q.shape[1]):
        sim.decode(t)
    return Trace(out=sim.out, kept=[sorted(x) for x in sim.kept],
                 values=[{s: sim.val[g][s] for s in sim.kept[g]} for g in range(sim.Hkv)], merged=sim.merged)
