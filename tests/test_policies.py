"""Eviction policies: budget >= length equals `full`, drop mode equals mask mode, invariants over random
shapes, each policy against the dense references of tests/dense.py, RoPE position algebra,
resets between prompts, and one clear error per bad parameter."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import ops
from engine.kv import KVStore
from engine.config import ModelArgs
from engine.decode import decode_step
from engine.generate import prefill
from engine.llm import LLM
from engine.model import Transformer
from engine.rope import Rope
from engine.policies import (H2O, VATP, DecodeView, LayerState, Policy, PolicyError, Scissorhands, WeightedKV,
                             list_policies, make_policy)
from engine.policies.ahakv import recent_scores, step_gain
from engine.policies.reduce import column_scores

from .dense import rotate, simulate
from .helpers import on_path, small, tiny_model, token_ids

EVICTING = [n for n in list_policies() if n != "full"]
SCORING = [n for n in EVICTING if n != "streaming"]  # the policies that score from attention


def run(model: Transformer, policy: Policy, prompt: torch.Tensor, n_new: int, mask: bool = False,
        chunk: int | None = None, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, KVStore]:
    """Prefill `prompt`, then n_new decode steps fed from `ids` (teacher forcing) or greedily.
    Returns logits (B, n_new + 1, V), the fed tokens (B, n_new) and the store."""
    store = LLM(model, None, policy, mask=mask).new_store(prompt.shape[1], n_new + 1, batch=prompt.shape[0])
    logits = [prefill(model, store, prompt, chunk)]
    fed = []
    for i in range(n_new):
        fed.append(ids[:, i] if ids is not None else logits[-1].argmax(-1))
        logits.append(decode_step(model, store, fed[-1]))
    return torch.stack(logits, 1), torch.stack(fed, 1) if fed else prompt[:, :0], store


# ---- equivalences ---------------------------------------------------------------------------------

@pytest.mark.parametrize("positions", ["original", "cache"])
@pytest.mark.parametrize("name", EVICTING)
def test_budget_covering_the_sequence_is_full(name, positions):
    model, prompt = tiny_model(), token_ids(20, seed=1)
    want, ids, full = run(model, make_policy("full"), prompt, 24)
    got, _, store = run(model, small(name, 64, positions=positions), prompt, 24, ids=ids)
    assert torch.equal(got, want)
    n = full.used
    for a, b in zip(store.layers, full.layers):
        assert torch.equal(a.pos[:, :, :n], b.pos[:, :, :n]) and torch.equal(a.v[:, :, :n], b.v[:, :, :n])
        if positions == "original":  # "cache" keeps keys before RoPE
            assert torch.equal(a.k[:, :, :n], b.k[:, :, :n])
    assert store.stats().evictions == 0


def assert_drop_equals_mask(name: str, positions: str, n_new: int, chunk: int | None, n_kv_heads: int = 2) -> None:
    model, prompt = tiny_model(n_kv_heads=n_kv_heads), token_ids(40, seed=2)
    drop, ids, store = run(model, small(name, 16, positions=positions), prompt, n_new, chunk=chunk)
    mask, _, _ = run(model, small(name, 16, positions=positions), prompt, n_new, mask=True, chunk=chunk, ids=ids)
    assert store.stats().evictions > 0
    assert (drop - mask).abs().max() <= 1e-4 * drop.abs().max()


@pytest.mark.parametrize("positions", ["original", "cache"])
@pytest.mark.parametrize("name", EVICTING)
def test_drop_equals_mask(name, positions):
    """200 greedy tokens after a prompt longer than the budget (GQA 4:2)."""
    assert_drop_equals_mask(name, positions, 200, None)


@pytest.mark.parametrize("name", EVICTING)
def test_drop_equals_mask_chunked_prefill_mha(name):
    assert_drop_equals_mask(name, "original", 24, 12, n_kv_heads=4)


@pytest.mark.parametrize("name", EVICTING)
def test_drop_equals_mask_second_turn(name):
    """A prompt, replies, then another prompt fed into the same cache (a chat turn), then more replies."""
    model, ids = tiny_model(), token_ids(60, seed=11)
    logits = []
    for mask in (False, True):
        store = LLM(model, None, small(name, 16), mask=mask).new_store(30, 40)
        out = [prefill(model, store, ids[:, :30])]
        out += [decode_step(model, store, ids[:, t]) for t in range(30, 40)]
        out.append(prefill(model, store, ids[:, 40:52], chunk=5))
        out += [decode_step(model, store, ids[:, t]) for t in range(52, 60)]
        logits.append(torch.stack(out, 1))
    assert (logits[0] - logits[1]).abs().max() <= 1e-4 * logits[0].abs().max()


@pytest.mark.parametrize("name", EVICTING)
def test_batch_rows_are_independent(name):
    """Two prompts in one batch get the answers each gets alone (every decision is per sequence)."""
    model, ids = tiny_model(), token_ids(50, seed=13, batch=2)
    both, _, _ = run(model, small(name, 12), ids[:, :30], 20, ids=ids[:, 30:])
    for b in range(2):
        alone, _, _ = run(model, small(name, 12), ids[b:b + 1, :30], 20, ids=ids[b:b + 1, 30:])
        assert (both[b] - alone[0]).abs().max() <= 1e-4 * alone.abs().max()


# ---- invariants over random shapes ----------------------------------------------------------------

def one_layer_store(policy: Policy, heads: tuple[int, int], D: int, prompt_len: int, steps: int, batch: int = 1,
                    mask: bool = False) -> KVStore:
    H, Hkv = heads
    model = tiny_model(n_layers=1, n_kv_heads=Hkv, dim=H * D, n_heads=H)
    return LLM(model, None, policy, mask=mask).new_store(prompt_len, steps + 1, batch=batch)


def random_qkv(heads: tuple[int, int], D: int, T: int, seed: int, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    H, Hkv = heads
    return (torch.randn(batch, H, T, D, generator=g), torch.randn(batch, Hkv, T, D, generator=g),
            torch.randn(batch, Hkv, T, D, generator=g))


def feed(store: KVStore, q, k, v, prompt_len: int, chunk: int | None = None, after_step=None) -> torch.Tensor:
    """Drive one layer of the store with raw q/k/v (before RoPE): prefill, then one token per step."""
    T, outs = q.shape[2], []
    step = chunk or prompt_len
    for a in range(0, prompt_len, step):
        b = min(prompt_len, a + step)
        store.begin_prefill(b - a)
        outs.append(store.prefill(0, *(x[:, :, a:b].contiguous() for x in (q, k, v))).clone())
        store.end_prefill(b - a)
    if after_step:
        after_step(prompt_len - 1)
    for t in range(prompt_len, T):
        store.begin_decode()
        qkv = torch.cat([x[:, :, t].reshape(x.shape[0], -1) for x in (q, k, v)], dim=1)
        outs.append(store.decode(0, qkv)[:, :, None].clone())
        store.end_decode()
        if after_step:
            after_step(t)
    return torch.cat(outs, dim=2)


def cached(store: KVStore) -> list[list[set[int]]]:
    pos = store.layers[0].pos
    return [[{int(p) for p in pos[b, g] if p >= 0} for g in range(pos.shape[1])] for b in range(pos.shape[0])]


@st.composite
def setups(draw):
    name = draw(st.sampled_from(EVICTING))
    sinks = draw(st.integers(0, 2))
    kw: dict = {"sinks": sinks}
    if name == "snapkv":
        kw |= dict(w=draw(st.integers(1, 4)), k=draw(st.sampled_from([1, 3])), pool=draw(st.sampled_from(["max", "avg"])))
        protected = sinks + kw["w"]
    else:
        kw["recent"] = draw(st.integers(0, 3))
        protected = sinks + kw["recent"]
        kw |= {"scissorhands": dict(m=draw(st.integers(2, 10))),
               "vatp": dict(base=draw(st.sampled_from(["h2o", "scissorhands"])), norm=draw(st.sampled_from(["l1", "l2", "linf"]))),
               "ahakv": dict(r=draw(st.integers(1, 6)), pool_kernel=draw(st.sampled_from([1, 3, 5]))),
               "weightedkv": dict(receiver=draw(st.sampled_from(["next", "prev", "nearest_key"])))}.get(name, {})
    budget = protected + 1 + draw(st.integers(0, 8))
    return dict(
        policy=make_policy(name, budget=budget, **kw), heads=draw(st.sampled_from([(2, 1), (2, 2), (4, 2)])),
        prompt_len=draw(st.integers(1, 24)), steps=draw(st.integers(0, 24)),
        chunk=draw(st.one_of(st.none(), st.integers(1, 9))), batch=draw(st.integers(1, 2)),
        mask=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setups())
def test_invariants(s):
    """Occupancy <= budget, sinks and recent kept, nothing evicted comes back, and the victim is the
    lowest-scoring eligible slot (ties: the lower position)."""
    p, D = s["policy"], 4
    store = one_layer_store(p, s["heads"], D, s["prompt_len"], s["steps"], s["batch"], s["mask"])
    q, k, v = random_qkv(s["heads"], D, s["prompt_len"] + s["steps"], s["seed"], s["batch"])
    budget = store.budget
    seen_scores: list[tuple[torch.Tensor, torch.Tensor]] = []
    decode_scores = p.decode_scores

    def recording(view):
        score = decode_scores(view)
        seen_scores.append((score.clone(), view.layer.pos.clone()))
        return score

    p.decode_scores = recording
    before: list = []
    evicted: list[list[set[int]]] = [[set() for _ in range(s["heads"][1])] for _ in range(s["batch"])]

    def check(t: int) -> None:
        now = cached(store)
        decode = t >= s["prompt_len"]
        for b, heads in enumerate(now):
            for g, kept in enumerate(heads):
                limit = budget + (t + 1 - s["prompt_len"] if p.name == "snapkv" else 0)
                assert len(kept) <= min(limit, t + 1)
                assert set(range(min(p.sinks, t + 1))) <= kept
                assert set(range(max(0, t + 1 - p.recent), t + 1)) <= kept
                assert not kept & evicted[b][g]
                if not decode:
                    continue
                gone = (before[b][g] | {t}) - kept
                evicted[b][g] |= gone
                if gone:
                    score, pos = seen_scores[-1]
                    sc, ps = score[b, 0 if p.layer_wide else g], pos[b, g]
                    ok = (ps >= p.sinks) & (ps < t + 1 - p.recent)
                    best = min((float(sc[i]), int(ps[i])) for i in torch.nonzero(ok)[:, 0])
                    assert gone == {best[1]}
        before[:] = now

    feed(store, q, k, v, s["prompt_len"], s["chunk"], after_step=check)


def test_snapkv_compresses_a_one_token_prompt_chunk():
    heads, D, L = (2, 1), 4, 9
    store = one_layer_store(make_policy("snapkv", budget=6, w=2, k=1), heads, D, L, 0)
    feed(store, *random_qkv(heads, D, L, seed=12), L, chunk=4)  # chunks of 4, 4 and 1 tokens
    assert all(len(kept) <= 6 for kept in cached(store)[0])


def explicit_probs(q: torch.Tensor, k: torch.Tensor, rope: Rope) -> torch.Tensor:
    """(H, T, T) fp64 causal softmax rows of every query head over the first T keys, RoPE at original positions."""
    H, T, D = q.shape
    G = H // k.shape[0]
    probs = torch.zeros(H, T, T, dtype=torch.float64)
    for h in range(H):
        qr = torch.stack([rotate(q[h, t].double(), t, rope) for t in range(T)])
        kr = torch.stack([rotate(k[h // G, t].double(), t, rope) for t in range(T)])
        logits = (qr @ kr.T / math.sqrt(D)).masked_fill(torch.ones(T, T).triu(1).bool(), -math.inf)
        probs[h] = logits.softmax(-1)
    return probs


@pytest.mark.parametrize("how", ["mean", "max", "sum"])
@pytest.mark.parametrize("chunk", [None, 4])
def test_gqa_scores_are_the_group_reduction(how, chunk):
    """H2O's accumulated score with nothing evicted (prefill, whole or chunked, then decode) = the sum over
    rows of each row's per-head probabilities reduced over the group: mean, max or sum (G = 2)."""
    heads, D, L, T = (4, 2), 8, 10, 16
    q, k, v = random_qkv(heads, D, T, seed=3)
    store = one_layer_store(H2O(budget=32, group_reduce=how), heads, D, L, T - L)
    feed(store, q, k, v, L, chunk)
    grouped = explicit_probs(q[0], k[0], store.rope).view(2, 2, T, T)
    reduce = {"mean": lambda x: x.mean(1), "max": lambda x: x.amax(1), "sum": lambda x: x.sum(1)}[how]
    want = reduce(grouped).sum(1)  # reduce each row's group, then sum the rows
    got = store.layers[0].state["acc"][0, :, :T].double()
    assert torch.allclose(got, want, atol=1e-5)
    if how == "max":  # not the max of the column sums
        assert not torch.allclose(got, grouped.sum(2).amax(1), atol=1e-3)


@pytest.mark.parametrize("how", ["mean", "max", "sum"])
def test_column_scores_chunked_and_windowed(how, monkeypatch):
    """The PyTorch column sums: a few rows per chunk give the same as one chunk; the window is the last
    rows; and with mean they are the compiled (or reference) op's col_scores."""
    B, H, Hkv, L, D = 2, 6, 2, 9, 8
    g = torch.Generator().manual_seed(14)
    q, k, v = torch.randn(B, H, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
    qpos = torch.arange(L, dtype=torch.int32).expand(B, L).contiguous()
    kpos = torch.arange(L, dtype=torch.int32).expand(B, Hkv, L).contiguous()
    whole = column_scores(q, k, qpos, kpos, 5, 0.3, how)
    monkeypatch.setattr("engine.policies.reduce._CHUNK_ELEMENTS", B * H * L * 2)  # two rows per chunk
    assert torch.allclose(column_scores(q, k, qpos, kpos, 5, 0.3, how), whole, atol=1e-6)
    last = column_scores(q[:, :, -5:], k, qpos[:, -5:], kpos, 0, 0.3, how)
    assert torch.allclose(last, whole, atol=1e-6)
    if how == "mean":
        cols = torch.empty(B, Hkv, L)
        ops.prefill_attention(q, k, v, qpos, kpos, 0.35, torch.empty_like(q), torch.empty(B, H, L), cols, 5, 0.3)
        assert torch.allclose(cols, whole, atol=1e-5)


# ---- the dense references ---------------------------------------------------------------------------

REDUCE_KW = {"vatp": {"recent": 3}}  # budget // 2 recent leaves VATP too few heavy hitters to tell max from mean

DENSE_CASES = [
    ("streaming", {}, "original"), ("streaming", {}, "cache"), ("h2o", {"sinks": 1}, "original"),
    ("h2o", {}, "cache"), ("scissorhands", {}, "original"), ("scissorhands", {"m": 3}, "cache"),
    ("tova", {}, "original"), ("tova", {"sinks": 2, "recent": 3}, "cache"),
    ("snapkv", {"pool": "max"}, "original"), ("snapkv", {"pool": "avg", "k": 5}, "original"),
    ("vatp", {"norm": "l1"}, "original"), ("vatp", {"norm": "l2"}, "cache"), ("vatp", {"norm": "linf"}, "original"),
    ("vatp", {"base": "scissorhands", "m": 5, "recent": 3}, "original"), ("ahakv", {}, "original"), ("ahakv", {"r": 6}, "cache"),
    ("weightedkv", {"receiver": "next"}, "original"), ("weightedkv", {"receiver": "prev"}, "original"),
    ("weightedkv", {"receiver": "nearest_key"}, "cache"), ("cam", {}, "original"), ("cam", {"merge_window": 1}, "cache"),
    ("keepkv", {}, "original"), ("keepkv", {"min_similarity": 0.3}, "cache"), ("keepkv", {"min_similarity": -1.0}, "original"),
    *[(name, {**REDUCE_KW.get(name, {}), "group_reduce": how}, "original") for name in SCORING for how in ("max", "sum")],
    ("vatp", {"base": "scissorhands", "m": 5, "recent": 3, "group_reduce": "max"}, "original"),
    ("ahakv", {"group_reduce": "max"}, "cache"), ("tova", {"group_reduce": "max"}, "cache"),
]


@pytest.mark.parametrize("name,kw,positions", DENSE_CASES)
def test_matches_dense_reference(name, kw, positions):
    heads, D, L, T, budget = (4, 2), 8, 24, 44, 12
    policy = small(name, budget, positions=positions, **kw)
    q, k, v = random_qkv(heads, D, T, seed=4)
    store = one_layer_store(policy, heads, D, L, T - L)
    got = feed(store, q, k, v, L)
    want = simulate(small(name, budget, positions=positions, **kw), q[0], k[0], v[0], L, budget, store.rope)
    assert torch.allclose(got[0].double(), want.out, atol=1e-5)
    st_ = store.layers[0]
    for g in range(heads[1]):
        slots = [i for i in range(st_.pos.shape[2]) if st_.pos[0, g, i] >= 0]
        assert sorted(int(st_.pos[0, g, i]) for i in slots) == want.kept[g]
        for i in slots:
            assert torch.allclose(st_.v[0, g, i].double(), want.values[g][int(st_.pos[0, g, i])], atol=1e-5)


@pytest.mark.parametrize("name", SCORING)
def test_max_reduction_changes_what_is_kept(name):
    """With the dense cases' parameters the reference keeps another set under max than under mean (G = 2),
    so those cases can tell a store that ignores group_reduce."""
    heads, D, L, T, budget = (4, 2), 8, 24, 44, 12
    q, k, v = random_qkv(heads, D, T, seed=4)
    rope = one_layer_store(small(name, budget), heads, D, L, T - L).rope
    kept = [simulate(small(name, budget, group_reduce=how, **REDUCE_KW.get(name, {})), q[0], k[0], v[0], L, budget,
                     rope).kept for how in ("mean", "max")]
    assert kept[0] != kept[1]


@pytest.mark.parametrize("name", SCORING)
def test_sum_ranks_like_mean(name):
    """Every policy here combines the group score only multiplicatively (VATP's value norm, AhaKV's value
    prior), by pooling (SnapKV), linearly (the Scissorhands window) or as a ratio (WeightedKV's average and
    merge weights), so sum = G x mean keeps the same tokens and merges the same values; the attention state
    itself is G times larger."""
    heads, D, L, T, budget = (4, 2), 8, 24, 44, 12
    q, k, v = random_qkv(heads, D, T, seed=15)
    stores = []
    for how in ("mean", "sum"):
        stores.append(one_layer_store(small(name, budget, group_reduce=how), heads, D, L, T - L))
        feed(stores[-1], q, k, v, L, chunk=10)
    a, b = (s.layers[0] for s in stores)
    assert torch.equal(a.pos, b.pos) and torch.allclose(a.v, b.v, atol=1e-6)
    assert stores[0].stats().evictions > 0
    if "acc" in a.state:
        assert torch.allclose(b.state["acc"], 2 * a.state["acc"], atol=1e-5)
        assert not torch.allclose(b.state["acc"], a.state["acc"], atol=1e-3)


def test_vatp_with_equal_value_norms_is_its_base():
    """Every value row a signed permutation of one vector: all L1/L2/Linf norms equal, so VATP ranks as its base."""
    heads, D, L, T, budget = (2, 2), 8, 20, 36, 10
    q, k, _ = random_qkv(heads, D, T, seed=5)
    g = torch.Generator().manual_seed(6)
    base = torch.randn(D, generator=g)
    v = torch.stack([base[torch.randperm(D, generator=g)] * torch.randint(0, 2, (D,), generator=g).mul(2).sub(1)
                     for _ in range(2 * T)]).view(1, 2, T, D)
    for norm in ("l1", "l2", "linf"):
        for base_name, cls, kw in (("h2o", H2O, {}), ("scissorhands", Scissorhands, {"m": 5})):
            kept = []
            for policy in (VATP(budget=budget, base=base_name, sinks=1, recent=3, norm=norm, **kw),
                           cls(budget=budget, sinks=1, recent=3, **kw)):
                store = one_layer_store(policy, heads, D, L, T - L)
                feed(store, q, k, v, L)
                kept.append(cached(store))
            assert kept[0] == kept[1]


def test_ahakv_step_gain():
    d = 64
    assert step_gain(torch.tensor([20.0]), 10, d).item() == pytest.approx(math.sqrt(2 * math.log(2) / d))
    assert step_gain(torch.tensor([10.0, 3.0]), 10, d).tolist() == pytest.approx([d ** -0.5] * 2)  # n <= budget


def test_ahakv_every_old_token_gets_r_summands():
    """With zero queries each row is uniform over what it sees (1 / n_i whatever lambda), so a token
    seen by all r rows scores sum_i 1 / n_i: r summands whatever its age (H2O would give old ones more)."""
    H, Hkv, D, C, r = 2, 1, 4, 12, 3
    pos = torch.arange(C, dtype=torch.int32).view(1, 1, C).clone()
    pos[0, 0, 5] = -1  # an empty slot
    qpos = torch.tensor([[C - 3, C - 2, C - 1]], dtype=torch.int32)
    k = torch.randn(1, Hkv, C, D)
    S = recent_scores(torch.zeros(1, H, r, D), qpos, k, torch.randn(1, Hkv, C, D), pos, 4)[0, 0]
    n = [(pos[0, 0] >= 0) & (pos[0, 0] <= t) for t in qpos[0]]
    full = sum(1 / int(m.sum()) for m in n)
    old = [s for s in range(C - 3) if pos[0, 0, s] >= 0]
    assert torch.allclose(S[old], torch.full((len(old),), full))
    assert S[5] == 0 and S[C - 1] < S[C - 2] < full


def test_weightedkv_merges_are_convex_and_keys_stay():
    """Value rows are basis vectors: each kept value must be a convex combination whose support is
    exactly itself plus every position merged into it (also through chains); keys never change."""
    heads, D, L, T, budget = (2, 2), 64, 30, 60, 10
    q, k, _ = random_qkv(heads, D, T, seed=7)
    v = torch.eye(D)[:T].expand(1, 2, T, D).contiguous()
    policy = WeightedKV(budget=budget, sinks=2, recent=3)
    store = one_layer_store(policy, heads, D, L, T - L)
    feed(store, q, k, v, L)
    want = simulate(WeightedKV(budget=budget, sinks=2, recent=3), q[0], k[0], v[0], L, budget, store.rope)
    st_ = store.layers[0]
    merged_any = False
    for g in range(2):
        for i in range(st_.pos.shape[2]):
            p = int(st_.pos[0, g, i])
            if p < 0:
                continue
            row = st_.v[0, g, i]
            support = {p, *want.merged[g].get(p, [])}
            merged_any |= len(support) > 1
            assert (row >= 0).all() and row.sum().item() == pytest.approx(1.0, abs=1e-5)
            assert {int(j) for j in torch.nonzero(row > 0)[:, 0]} == support
            assert torch.equal(st_.k[0, g, i], store.rope.rotate(k[0, g, p], torch.tensor(p)))
    assert merged_any
    assert store.stats().merges == store.stats().evictions > 0


@pytest.mark.parametrize("path", ["compiled", "reference"])
@pytest.mark.parametrize("positions", ["original", "cache"])
def test_keepkv_merge_is_lossless_for_the_reference_query(path, positions):
    """One ZIP-merge per KV head (slots already carrying votes among them): attention of the reference query
    (the group's mean query) over the cache, log votes as the logit bias, is what it was before the merge,
    while plainly evicting the same slots changes it; the votes of a head add up to the same count."""
    B, H, Hkv, C, D = 2, 6, 2, 13, 16
    G, cache = H // Hkv, positions == "cache"
    g = torch.Generator().manual_seed(21)
    k, v, q = torch.randn(B, Hkv, C, D, generator=g), torch.randn(B, Hkv, C, D, generator=g), torch.randn(B, H, D, generator=g)
    pos = torch.arange(C, dtype=torch.int32).expand(B, Hkv, C).contiguous()
    logp = torch.randint(1, 4, (B, Hkv, C), generator=g).float().log()
    args = ModelArgs(dim=H * D, n_layers=1, n_heads=H, n_kv_heads=Hkv, hidden_dim=8, vocab_size=8, max_seq_len=64)
    rope = Rope(args, torch.device("cpu"))
    rope.ensure(C)
    policy = make_policy("keepkv", budget=C - 1, sinks=1, recent=0, min_similarity=-1.0, positions=positions)
    state = {"acc": torch.rand(B, Hkv, C, generator=g), "cnt": torch.ones(B, Hkv, C), "logp": logp.clone()}
    layer = LayerState(k=k.clone(), v=v.clone(), pos=pos.clone(), state=state, rank=pos.clone() if cache else None)
    view = DecodeView(layer=layer, step_pos=C - 1, q=q, probs=None, rope=rope if cache else None)
    q_ref = q.view(B, Hkv, G, D).mean(2).repeat_interleave(G, dim=1)  # every head of a group asks with it

    def attend(keys: torch.Tensor, values: torch.Tensor, p: torch.Tensor, votes: torch.Tensor) -> torch.Tensor:
        out = torch.full((B, H, D), float("nan"))
        with on_path(path, "decode_attention", "cpu"):
            ops.decode_attention(q_ref, keys, values, p, C, D ** -0.5, out, bias=votes,
                                 rope=(rope.cos, rope.sin, layer.rank) if cache else None)
        return out

    before = attend(k, v, pos, logp)
    victim = torch.tensor([[3, 7], [11, 5]])
    policy.merge(view, policy.average(state), layer.pos, victim)
    gone = torch.zeros(B, Hkv, C, dtype=torch.bool).scatter_(2, victim[..., None], True)
    after_pos, after_logp = layer.pos.masked_fill(gone, -1), state["logp"].masked_fill(gone, 0.0)
    after = attend(layer.k, layer.v, after_pos, after_logp)
    evicted = attend(k, v, after_pos, logp.masked_fill(gone, 0.0))
    assert torch.allclose(after, before, atol=2e-5, rtol=1e-5), (after - before).abs().max()
    assert not torch.allclose(evicted, before, atol=1e-3)
    assert torch.allclose(after_logp.exp().masked_fill(gone, 0).sum(2), logp.exp().sum(2), rtol=1e-6)
    changed = (layer.k != k).any(-1)  # exactly one receiver per head, never a sink
    assert changed.sum(2).eq(1).all() and not changed[:, :, 0].any()


@pytest.mark.parametrize("allocation", ["uniform", "adaptive", "pyramid"])
def test_keepkv_counts_only_the_merges_its_threshold_lets_through(allocation):
    """stats().merges counts merges, not evictions. KV head 0's keys are all zero (cosine 0 with every
    other key: below min_similarity 0.5, so its victims are only evicted); KV head 1's all point along the
    lowest-frequency RoPE pair (cosine ~1 after rotation: every victim merges). Under uniform allocation
    each head evicts once per evicting step, so merges are half the evictions per (layer, KV head); under
    every rule min_similarity -1 merges every eviction, and all-zero keys block every merge."""
    (H, Hkv), D, L, T = (4, 2), 16, 12, 18
    q, k, v = random_qkv((H, Hkv), D, T, seed=5)
    k.zero_()
    zero_keys = k.clone()
    k[:, 1, :, D - 1] = 1.0 + torch.rand(T, generator=torch.Generator().manual_seed(6))

    def merges(keys: torch.Tensor, min_similarity: float) -> int:
        policy = make_policy("keepkv", budget=8, sinks=1, recent=2, min_similarity=min_similarity,
                             allocation=allocation)
        store = one_layer_store(policy, (H, Hkv), D, L, T - L)
        feed(store, q, keys, v, L)
        assert store.stats().evictions == T - 8 == 10
        return store.stats().merges

    assert merges(k, -1.0) == 10 and merges(zero_keys, 0.5) == 0
    if allocation == "uniform":
        assert merges(k, 0.5) == 5
    else:  # the heads share the evictions by score: some of each kind
        assert 0 < merges(k, 0.5) < 10


# ---- positions ------------------------------------------------------------------------------------

def test_rope_rotation_composes():
    """Rotating by -p then by p' equals rotating by p' - p (negative angles straight from the tables)."""
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=8, vocab_size=8, max_seq_len=64)
    rope = Rope(args, torch.device("cpu"))
    rope.ensure(64)
    x = torch.randn(5, 16, dtype=torch.float64)

    def rot(x, p):
        c, s = rope.cos[abs(p)].double(), rope.sin[abs(p)].double() * (1 if p >= 0 else -1)
        return x * c + torch.cat([-x[..., 8:], x[..., :8]], -1) * s

    for p, p2 in [(7, 3), (3, 7), (20, 20), (0, 13), (40, 1)]:
        assert torch.allclose(rot(rot(x, -p), p2), rot(x, p2 - p), atol=1e-6)
        assert torch.allclose(rope.rotate(x.float(), torch.tensor(p2)).double(), rot(x, p2), atol=1e-6)


@pytest.mark.parametrize("name", ["streaming", "tova"])
def test_cache_positions_equal_recomputing_the_kept_tokens(name):
    """One layer: a token's K/V depend only on the token, so with positions="cache" each decode step's
    logits must equal a fresh forward over the kept tokens (at 0..n-1) plus the new one."""
    model, ids = tiny_model(n_layers=1), token_ids(50, seed=8)
    policy = small(name, 12, positions="cache")
    store = LLM(model, None, policy).new_store(20, 31)
    prefill(model, store, ids[:, :20])
    for t in range(20, 50):
        kept = sorted(int(p) for p in store.layers[0].pos[0, 0] if p >= 0)
        logits = decode_step(model, store, ids[:, t])
        with torch.no_grad():
            want = model(ids[:, kept + [t]])[:, -1]
        assert torch.allclose(logits, want, atol=1e-4)
    assert store.stats().evictions > 0


# ---- state between prompts ------------------------------------------------------------------------

@pytest.mark.parametrize("name", EVICTING)
def test_state_resets_between_prompts(name):
    model = tiny_model()
    llm = LLM(model, None, small(name, 12))
    a, b = token_ids(40, seed=9), token_ids(30, seed=10)
    first = llm.nll(a, prefill_len=20)
    llm.nll(b, prefill_len=25)
    assert torch.equal(llm.nll(a, prefill_len=20), first)
    ids = a[:, :30]
    once, _, _ = run(model, llm.policy, ids[:, :20], 10, ids=ids[:, 20:])
    store = LLM(model, None, llm.policy).new_store(20, 11)
    for _ in range(2):  # the same store, reset in between
        store.reset()
        logits = [prefill(model, store, ids[:, :20])] + [decode_step(model, store, ids[:, t]) for t in range(20, 30)]
        assert torch.equal(torch.stack(logits, 1), once)


# ---- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,match", [
    (lambda: make_policy("lru", budget=8), r"unknown policy 'lru'; valid: ahakv, cam, full, h2o, .*weightedkv"),
    (lambda: make_policy("weightedkv", budget=36), r"weightedkv: budget 36 must exceed sinks \+ recent = 4 \+ 32"),
    (lambda: make_policy("tova", budget=0), r"tova: budget must be positive, got 0"),
    (lambda: make_policy("scissorhands", budget=-3), r"budget must be positive, got -3"),
    (lambda: make_policy("h2o", budget=1.5), r"h2o: a fractional budget must be in \(0, 1\], got 1.5"),
    (lambda: make_policy("vatp", budget=0.0), r"vatp: a fractional budget must be in \(0, 1\], got 0.0"),
    (lambda: make_policy("snapkv", budget=32), r"snapkv: window w=32 must be smaller than the budget 32"),
    (lambda: make_policy("snapkv", budget=64, recent=4), r"snapkv: recent is the observation window w"),
    (lambda: make_policy("snapkv", budget=64, k=4), r"snapkv: pooling kernel k must be odd"),
    (lambda: make_policy("vatp", budget=64, norm="l3"), r"vatp: norm must be one of l1, l2, linf"),
    (lambda: make_policy("vatp", budget=64, base="tova"), r"vatp: base must be one of h2o, scissorhands"),
    (lambda: make_policy("weightedkv", budget=64, receiver="far"), r"weightedkv: receiver must be one of"),
    (lambda: make_policy("scissorhands", budget=64, m=1), r"scissorhands: window m must be >= 2"),
    (lambda: make_policy("ahakv", budget=64, pool_kernel=4), r"ahakv: pool_kernel must be odd"),
    (lambda: make_policy("h2o", budget=64, group_reduce="median"),
     r"h2o: group_reduce must be one of mean, max, sum, got 'median'"),
    (lambda: make_policy("vatp", budget=64, group_reduce="MAX"), r"vatp: group_reduce must be one of"),
    (lambda: make_policy("weightedkv", budget=0.3).resolve_budget(100), r"weightedkv: budget 30 must exceed sinks \+ recent"),
])
def test_bad_parameters_raise_one_clear_line(make, match):
    with pytest.raises(PolicyError, match=match) as info:
        make()
    assert "\n" not in str(info.value)
