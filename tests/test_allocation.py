"""Adaptive (Ada-KV) and pyramid (PyramidKV) allocation over the pooled store, and decode attention over
per-head slot lists into a pool: the pool equals the uniform store where the rules give every head the same
share, drop equals mask, the pool holds the budget and no more, heads keep their floor, the kernels match
the reference, and bad parameters fail in one line."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from engine import ops
from engine import reference as ref
from engine.decode import decode_step
from engine.generate import prefill
from engine.kv import AllocatedKVStore, KVStore, allocated
from engine.llm import LLM
from engine.kv.allocation import adaptive_keep, normalised, pyramid_budgets
from engine.policies import PolicyError, make_policy

from .helpers import assert_within, gen, on_path, poisoned, positions, randn, rope_tables, rope_ranks, small
from .helpers import tiny_model, token_ids
from .test_policies import run

SCORING = ["h2o", "vatp", "snapkv", "tova", "ahakv", "weightedkv", "scissorhands", "cam", "keepkv"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def kept(store: KVStore) -> list[list[list[int]]]:
    """Per layer and KV head (batch row 0), the sorted positions kept."""
    return [[sorted(p for p in layer.pos[0, g].tolist() if p >= 0) for g in range(layer.pos.shape[1])]
            for layer in store.layers]


# ---- the pool against the uniform store, drop against mask ------------------------------------------

@pytest.mark.parametrize("name", SCORING)
def test_pool_with_equal_shares_is_the_uniform_store_bit_for_bit(name):
    """pyramid_beta=1 gives every layer the mean budget: the pooled layout (slot lists, pool rows, the
    kernel's slot_index) must then reproduce today's store exactly, logits and kept tokens."""
    model, prompt = tiny_model(), token_ids(40, seed=2)
    want, ids, uniform = run(model, small(name, 16), prompt, 40)
    got, _, pooled = run(model, small(name, 16, allocation="pyramid", pyramid_beta=1.0), prompt, 40, ids=ids)
    assert type(uniform) is KVStore and type(pooled) is AllocatedKVStore and pooled.pooled
    assert torch.equal(got, want)
    assert kept(pooled) == kept(uniform)


@pytest.mark.parametrize("allocation", ["adaptive", "pyramid"])
@pytest.mark.parametrize("name", SCORING)
def test_drop_equals_mask(name, allocation):
    """The pool keeps exactly what the papers' masked simulation keeps, with the same logits (GQA 4:2)."""
    model, prompt = tiny_model(), token_ids(40, seed=2)
    drop, ids, store = run(model, small(name, 16, allocation=allocation), prompt, 48)
    mask, _, oracle = run(model, small(name, 16, allocation=allocation), prompt, 48, mask=True, ids=ids)
    assert store.pooled and not oracle.pooled
    assert (drop - mask).abs().max() <= 1e-4 * drop.abs().max()
    assert kept(store) == kept(oracle)
    if allocation == "pyramid":
        assert len(set(store.layer_budgets)) > 1


@pytest.mark.parametrize("receiver", ["next", "prev"])
def test_adaptive_merges_see_the_slots_earlier_picks_left(receiver, monkeypatch):
    """Adaptive allocation evicts Hkv tokens a step, the picks in order: a pick's merge must not choose as its
    receiver a slot an earlier pick of the same step emptied (its value would be lost in a freed row)."""
    model, prompt = tiny_model(), token_ids(40, seed=2)
    calls: list[tuple[torch.Tensor, torch.Tensor, int]] = []
    merge = ops.merge_neighbour

    def record(v, w, pos, abar, picks, *args, **kwargs):
        merge(v, w, pos, abar, picks, *args, **kwargs)
        calls.append((picks.clone(), args[2].clone(), pos.shape[2]))  # args: sinks, after, receiver_out

    monkeypatch.setattr(ops, "merge_neighbour", record)
    run(model, small("weightedkv", 16, allocation="adaptive", receiver=receiver), prompt, 96)
    checked = 0
    for picks, receivers, C in calls:
        for b in range(picks.shape[0]):
            for i in range(picks.shape[1]):
                r, head = int(receivers[b, i]), int(picks[b, i]) // C
                earlier = {int(e) % C for e in picks[b, :i] if e >= 0 and e // C == head}
                assert r not in earlier
                checked += bool(earlier) and r >= 0
    assert checked > 0  # some pick merged after an earlier pick of its head in the same step


@pytest.mark.parametrize("allocation", ["adaptive", "pyramid"])
@pytest.mark.parametrize("name", ["h2o", "weightedkv", "keepkv", "cam"])
def test_drop_equals_mask_across_relayouts(name, allocation, monkeypatch):
    """Re-laying the pool every 5 steps (a merge's values, KeepKV's vote counts and bias moved with their
    entries) keeps what the masked simulation keeps, with the same logits."""
    monkeypatch.setattr(allocated, "RELAYOUT_EVERY", 5)
    monkeypatch.setattr(allocated, "RELAYOUT_SCATTERED", -1.0)  # every look re-lays
    model, prompt = tiny_model(), token_ids(40, seed=2)
    drop, ids, store = run(model, small(name, 16, allocation=allocation), prompt, 48)
    mask, _, oracle = run(model, small(name, 16, allocation=allocation), prompt, 48, mask=True, ids=ids)
    assert store.relayout_every == 5 and oracle.relayout_every == 0
    assert (drop - mask).abs().max() <= 1e-4 * drop.abs().max()
    assert kept(store) == kept(oracle)


def pool_entries(store: AllocatedKVStore) -> dict[tuple[int, int, int], tuple]:
    """(layer row, KV head, position) -> the entry's K row, V row and policy state."""
    a, entries = store.all, {}
    for r, g, s in (a.pos >= 0).nonzero().tolist():
        row, b = int(a.index[r, g, s]), r % store.batch
        state = tuple(float(t[r, g, s]) for t in a.state.values())
        entries[(r, g, int(a.pos[r, g, s]))] = (store.pool_k[b, row].clone(), store.pool_v[b, row].clone(), state)
    return entries


@pytest.mark.parametrize("allocation", ["adaptive", "pyramid"])
@pytest.mark.parametrize("name", ["h2o", "keepkv"])
def test_relayout_moves_entries_into_order_and_changes_none(name, allocation):
    """After many steps a head's tokens lie in the rows evictions freed, scattered; relayout puts each head's
    entries in its first slots and in consecutive pool rows, head after head from its layer's
    first row, with every entry's K, V and state bit for bit as before; the next step's rows are unused."""
    model, ids = tiny_model(n_layers=3, n_kv_heads=4, n_heads=8), token_ids(90, seed=7, batch=2)
    store = LLM(model, None, small(name, 16, allocation=allocation)).new_store(20, 70, batch=2)
    store.relayout_every = 0
    prefill(model, store, ids[:, :20])
    for t in range(20, 90):
        decode_step(model, store, ids[:, t])
    a = store.all
    assert store.scattered() > 0
    before = pool_entries(store)
    store.relayout()
    after = pool_entries(store)
    assert store.scattered() == 0
    assert before.keys() == after.keys()
    for key, (k, v, state) in before.items():
        assert torch.equal(after[key][0], k) and torch.equal(after[key][1], v) and after[key][2] == state, key
    counts = (a.pos >= 0).sum(2)
    assert store.used == int(counts.max())
    for r in range(a.pos.shape[0]):
        row = int(store.row0[r])
        layer_rows = range(row, row + store.pool_rows[r // store.batch])
        for g in range(a.pos.shape[1]):
            n = int(counts[r, g])
            assert bool(torch.all(a.pos[r, g, :n] >= 0)) and bool(torch.all(a.pos[r, g, n:] < 0))
            assert a.index[r, g, :n].tolist() == list(range(row, row + n))
            assert bool(torch.all(a.index[r, g, n:] == store.scratch))
            row += n
        free = a.free[r].tolist()
        assert len(set(free)) == len(free) and all(f in layer_rows and f >= row for f in free)


@pytest.mark.parametrize("heads, run", [(1, 1), (2, 3), (3, 64), (4, 5), (8, 2)])
def test_fresh_rows_is_a_bijection_in_runs(heads, run):
    """fresh_rows maps [0, room) onto itself for awkward rooms (not a multiple of heads or of a block),
    and the rows heads take in turn (head g the g-th, (g + heads)-th, ...) lie in runs of `run`
    consecutive rows within every whole block."""
    for room in [0, 1, heads - 1, heads * run - 1, heads * run, 3 * heads * run + heads + 1, 97]:
        f = torch.arange(max(room, 0))
        rows = allocated.fresh_rows(f, torch.tensor(room), heads, run)
        assert sorted(rows.tolist()) == f.tolist(), room
        whole = room // (heads * run) * heads * run
        for g in range(heads):
            taken = rows[g:whole:heads].view(-1, run) if whole else rows[:0].view(0, run)
            assert torch.equal(taken.diff(dim=1), torch.ones_like(taken[:, 1:])), (room, g)


@pytest.mark.parametrize("allocation", ["adaptive", "pyramid"])
@pytest.mark.parametrize("name", ["h2o", "snapkv", "keepkv"])
def test_a_filling_layer_hands_each_head_runs_of_rows(name, allocation, monkeypatch):
    """While a layer fills (no eviction yet), each head's new tokens take consecutive pool rows, FRESH_RUN at
    a time, not rows interleaved with the other heads'; through the switch to evicting, drop still equals
    mask and every row stays the entry's own."""
    monkeypatch.setattr(allocated, "FRESH_RUN", 4)
    model, prompt = tiny_model(n_layers=3, n_kv_heads=3, n_heads=6, dim=96), token_ids(10, seed=4)
    policy = lambda **kw: small(name, 40, allocation=allocation, **kw)
    llm = LLM(model, None, policy())
    store = llm.new_store(10, 40)
    store.relayout_every = 0
    prefill(model, store, prompt)
    prompt_counts = (store.all.pos >= 0).sum(2)
    for t in range(9):
        decode_step(model, store, token_ids(1, seed=t)[:, 0])
    a, checked = store.all, 0
    for r in range(a.pos.shape[0]):
        if store.policy.evicts_on_decode and store.layer_budgets[r] < 10 + 9:  # this layer evicts already
            continue
        checked += 1
        for g in range(a.pos.shape[1]):
            n = int(prompt_counts[r, g])
            new = a.index[r, g, n : n + 9]
            assert bool(torch.all(a.pos[r, g, n : n + 9] >= 0))
            assert torch.equal(new[:8].view(2, 4).diff(dim=1), torch.ones(2, 3, dtype=new.dtype)), (r, g)
    assert checked >= 2
    drop, ids, store = run(model, policy(), prompt, 70)
    mask, _, _ = run(model, policy(), prompt, 70, mask=True, ids=ids)
    assert (drop - mask).abs().max() <= 1e-4 * drop.abs().max()
    if store.policy.evicts_on_decode:  # every layer got to its budget (SnapKV evicts only in the prompt)
        assert all(int((layer.pos >= 0).sum()) == 3 * b for layer, b in zip(store.layers, store.layer_budgets))
    for layer in store.layers:
        rows = layer.index[0][layer.pos[0] >= 0].tolist()
        assert len(set(rows)) == len(rows)


@pytest.mark.parametrize("threshold", [-1.0, 1.0])
def test_a_look_at_the_layout_relays_only_a_scattered_pool(threshold, monkeypatch):
    """look_at_layout re-lays the pool where `scattered` exceeds RELAYOUT_SCATTERED, else touches nothing."""
    monkeypatch.setattr(allocated, "RELAYOUT_SCATTERED", threshold)
    model, ids = tiny_model(n_layers=2, n_kv_heads=4, n_heads=8), token_ids(80, seed=3)
    store = LLM(model, None, small("weightedkv", 12, allocation="adaptive")).new_store(20, 60)
    store.relayout_every = 0
    prefill(model, store, ids[:, :20])
    assert store.scattered() == 0  # a prompt leaves the pool laid out
    for t in range(20, 80):
        decode_step(model, store, ids[:, t])
    index, scattered = store.all.index.clone(), store.scattered()
    assert scattered > 0
    store.look_at_layout()
    if threshold < scattered:
        assert store.scattered() == 0
    else:
        assert torch.equal(store.all.index, index)


def test_adaptive_allocation_moves_slots_between_heads():
    model, prompt = tiny_model(), token_ids(40, seed=2)
    store = run(model, small("h2o", 16, allocation="adaptive"), prompt, 48)[2]
    shares = [len(h) for layer in kept(store) for h in layer]
    assert len(set(shares)) > 1 and sum(shares) == 16 * len(shares)


@pytest.mark.parametrize("allocation", ["adaptive", "pyramid"])
@pytest.mark.parametrize("name", ["h2o", "weightedkv"])
def test_batch_rows_are_independent(name, allocation):
    """Two prompts in one batch get the answers each gets alone (each batch row has its own pool)."""
    model, ids = tiny_model(), token_ids(50, seed=13, batch=2)
    both = run(model, small(name, 12, allocation=allocation), ids[:, :30], 20, ids=ids[:, 30:])[0]
    for b in range(2):
        alone = run(model, small(name, 12, allocation=allocation), ids[b : b + 1, :30], 20, ids=ids[b : b + 1, 30:])[0]
        assert (alone[0] - both[b]).abs().max() <= 1e-4 * alone.abs().max()


def test_drop_equals_mask_chunked_prompt_and_second_turn():
    """Prompt chunks compressed under adaptive allocation (top-k over the layer's heads), replies, then a
    second prompt into the same cache."""
    model, ids = tiny_model(n_kv_heads=4), token_ids(70, seed=5)
    logits, stores = [], []
    for mask in (False, True):
        store = LLM(model, None, small("h2o", 12, allocation="adaptive"), mask=mask).new_store(30, 40)
        out = [prefill(model, store, ids[:, :30], 7)]
        out += [decode_step(model, store, ids[:, t]) for t in range(30, 40)]
        out.append(prefill(model, store, ids[:, 40:55], 5))
        out += [decode_step(model, store, ids[:, t]) for t in range(55, 70)]
        logits.append(torch.stack(out, 1))
        stores.append(store)
    assert (logits[0] - logits[1]).abs().max() <= 1e-4 * logits[0].abs().max()
    assert kept(stores[0]) == kept(stores[1])


@pytest.mark.parametrize("name", ["h2o", "snapkv", "tova", "ahakv", "weightedkv", "keepkv", "cam"])
def test_lists_fitted_to_their_high_water_mark_change_nothing(name, monkeypatch):
    """With no slack the adaptive store re-allocates its slot lists at nearly every prompt chunk, step and look at
    the layout (wider as heads fill, narrower where the high-water mark falls); the same store pinned at its full
    width (as before a CUDA graph) must give the same logits and keep the same tokens, over chunked prompts, a
    second turn and relayouts."""
    monkeypatch.setattr(allocated, "WIDTH_SLACK", 0)
    monkeypatch.setattr(allocated, "RELAYOUT_EVERY", 5)
    widths: list[int] = []
    set_width = AllocatedKVStore._set_width

    def recorded(store: AllocatedKVStore, width: int) -> None:
        widths.append(width)
        set_width(store, width)

    monkeypatch.setattr(AllocatedKVStore, "_set_width", recorded)
    model, ids = tiny_model(n_kv_heads=4, n_heads=8), token_ids(110, seed=5)
    logits, stores = [], []
    for pinned in (False, True):
        store = LLM(model, None, small(name, 12, allocation="adaptive")).new_store(30, 80)
        if pinned:
            store.pin_shapes()
            widths.clear()
        out = [prefill(model, store, ids[:, :30], 7)]
        out += [decode_step(model, store, ids[:, t]) for t in range(30, 60)]
        out.append(prefill(model, store, ids[:, 60:75], 5))
        out += [decode_step(model, store, ids[:, t]) for t in range(75, 110)]
        logits.append(torch.stack(out, 1))
        stores.append(store)
        if not pinned:
            grew = any(b > a for a, b in zip(widths, widths[1:]))
            shrank = any(b < a for a, b in zip(widths, widths[1:]))
            assert grew and shrank and min(widths) < store.capacity
    assert widths == [] and stores[1].width == stores[1].capacity  # pinned: never re-allocated
    assert (logits[0] - logits[1]).abs().max() <= 1e-5 * logits[1].abs().max()
    assert kept(stores[0]) == kept(stores[1])


# ---- the pool's invariants ------------------------------------------------------------------------

@pytest.mark.parametrize("allocation", ["adaptive", "pyramid"])
@pytest.mark.parametrize("name", ["h2o", "tova", "weightedkv"])
def test_pool_holds_the_budget_and_heads_keep_their_floor(name, allocation):
    """After every step: a layer holds at most n_kv_heads x its budget; every head at least its floor once
    the layer evicts; each valid slot has its own pool row inside its layer's range; the pool's K/V bytes
    are the uniform store's at the same total budget (plus one scratch row)."""
    model, ids = tiny_model(n_layers=3, n_kv_heads=4, n_heads=8), token_ids(90, seed=7)
    store = LLM(model, None, small(name, 16, allocation=allocation)).new_store(20, 70)
    uniform = LLM(model, None, small(name, 16)).new_store(20, 70)
    assert store.pool_k.numel() == uniform.all.k.numel() + store.pool_k.shape[2] * store.batch
    assert sum(store.layer_budgets) == 16 * len(store.layer_budgets)
    prefill(model, store, ids[:, :20])
    for t in range(20, 90):
        decode_step(model, store, ids[:, t])
        for l, layer in enumerate(store.layers):
            count = (layer.pos >= 0).sum(2)[0]
            assert int(count.sum()) <= 4 * store.layer_budgets[l]
            if t + 1 > store.layer_budgets[l]:
                assert int(count.min()) >= (store.floor if allocation == "adaptive" else store.layer_budgets[l])
            rows = layer.index[0][layer.pos[0] >= 0].tolist()
            lo = sum(store.pool_rows[:l])
            assert len(set(rows)) == len(rows) and all(lo <= r < lo + store.pool_rows[l] for r in rows)
            assert all(r == store.scratch for r in layer.index[0][layer.pos[0] < 0].tolist())


def test_pyramid_budgets():
    """PyramidKV's linear schedule: decreasing, the total kept exactly, at least one evictable token each."""
    for budget, protected, L, beta in [(256, 128, 30, 20.0), (16, 8, 2, 20.0), (64, 4, 7, 2.0), (10, 9, 5, 20.0)]:
        b = pyramid_budgets(budget, protected, L, beta)
        assert sum(b) == budget * L and all(x > protected for x in b)
        assert all(x >= y for x, y in zip(b, b[1:]))
    assert pyramid_budgets(256, 128, 30, 1.0) == [256] * 30
    b = pyramid_budgets(256, 128, 30, 20.0)
    assert b[0] - 128 == pytest.approx(2 * 128 - 128 / 20, abs=1) and b[-1] - 128 == pytest.approx(128 / 20, abs=1)


def test_adaptive_keep_is_top_k_over_normalised_heads_with_floors():
    """Against a plain loop: protected first, each head's floor best, then the best normalised scores."""
    g = gen(3)
    B, Hkv, N, keep_total, floor = 2, 3, 11, 14, 3
    pos = torch.stack([torch.randperm(N, generator=g) for _ in range(B * Hkv)]).view(B, Hkv, N).int()
    pos[0, 1, 4] = -1
    score = torch.rand(B, Hkv, N, generator=g) * torch.tensor([1.0, 10.0, 0.1])[:, None]
    protected = (pos >= 0) & (pos < 1)
    got = adaptive_keep(score, pos, protected, keep_total, floor)
    norm = normalised(score, pos >= 0)
    for b in range(B):
        want = set()
        for h in range(Hkv):
            ranked = sorted((i for i in range(N) if pos[b, h, i] >= 0),
                            key=lambda i: (-math.inf if protected[b, h, i] else -norm[b, h, i].item(), -pos[b, h, i].item()))
            want |= {(h, i) for i in ranked[:floor]}
        rest = sorted(((h, i) for h in range(Hkv) for i in range(N) if pos[b, h, i] >= 0 and (h, i) not in want),
                      key=lambda x: (-norm[b][x].item(), -pos[b][x].item()))
        want |= set(rest[: keep_total - len(want)])
        assert {(h, i) for h in range(Hkv) for i in range(N) if got[b, h, i]} == want


# ---- decode attention over per-head slot lists ------------------------------------------------------

POOL_CASES = [  # B, H, Hkv, C, D, spare rows, fill
    (1, 9, 3, 37, 20, 5, "holes"),
    (1, 9, 3, 150, 64, 1, "holes"),  # runs of 8 valid slots and more
    (2, 8, 2, 19, 64, 0, "full"),
    (3, 4, 4, 8, 7, 11, "one"),
    (2, 6, 3, 70, 33, 2, "empty_head"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["compiled", "reference"])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float32, torch.bfloat16)], ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("rope", [False, True], ids=["", "rope"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("layout", ["shuffled", "runs"])
def test_decode_attention_over_slot_lists(device, path, dtypes, case, rope, with_bias, layout):
    """Each head reads only the pool rows its slots name: pool rows nobody names, and the scratch row empty
    slots name, hold NaN. Against fp64 over the gathered rows; outputs poisoned; every slot checked. A logit
    bias is indexed by head slot [b, g, s], not pool row (NaN on empty slots: never read). Pool rows in
    random order, or in slot order ("runs": consecutive slots in consecutive rows, as a prompt leaves them)."""
    dtype, kv_dtype = dtypes
    B, H, Hkv, C, D, spare, fill = case
    if rope and D % 2:
        pytest.skip("rope needs an even head dim")
    g = gen(sum(case[:6]))
    pos = positions(B, Hkv, C, fill, g)
    R = Hkv * C + spare + 1  # the last row: the scratch row of empty slots
    if layout == "runs":
        rows = (torch.arange(Hkv * C) + spare).repeat(B, 1).view(B, Hkv, C)
    else:
        rows = torch.stack([torch.randperm(R - 1, generator=g)[: Hkv * C] for _ in range(B)]).view(B, Hkv, C)
    index = torch.where(pos >= 0, rows, R - 1).int().to(device)
    pos = pos.to(device)
    named = torch.zeros(B, R, dtype=torch.bool).scatter_(1, index.cpu().long().view(B, -1), True)
    named[:, R - 1] = False
    pool_k = randn((B, R, D), kv_dtype, device, g).masked_fill(~named[..., None].to(device), float("nan"))
    pool_v = randn((B, R, D), kv_dtype, device, g).masked_fill(~named[..., None].to(device), float("nan"))
    q = randn((B, H, D), dtype, device, g)
    scale = 2.0 / math.sqrt(D)
    acc0 = torch.rand((B, Hkv, C), generator=g).to(device)
    tables = None
    if rope:
        P = 3 * C + 5
        tables = (*rope_tables(P, D, device, g), rope_ranks(pos.cpu(), P, g).to(device))
    bias = (3 * torch.rand((B, Hkv, C), generator=g)).to(device).masked_fill(pos < 0, float("nan")) if with_bias else None
    out, acc, probs = poisoned((B, H, D), dtype, device), acc0.clone(), poisoned((B, H, C), torch.float32, device)
    with on_path(path, "decode_attention", device):
        ops.decode_attention(q, pool_k, pool_v, pos, C, scale, out, acc, probs, rope=tables, slot_index=index, bias=bias)

    k, v = ref.pool_rows(pool_k, index), ref.pool_rows(pool_v, index)
    o64, p64 = ref.decode_attention_dense(q, k, v, pos, C, scale, torch.float64, tables, bias)
    o_pt, p_pt = ref.decode_attention_dense(q, k, v, pos, C, scale, dtype, tables, bias)
    valid = (pos >= 0).cpu()
    assert_within(out, o64, o_pt, "out")
    assert_within(probs, p64, p_pt, "probs_out")
    assert torch.equal(acc.cpu()[~valid], acc0.cpu()[~valid]), "score_acc changed on an empty slot"
    assert_within(acc, acc0.double() + ref._group_mean(p64, Hkv), acc0.double() + ref._group_mean(p_pt, Hkv),
                  "score_acc")


@pytest.mark.parametrize("path", ["compiled", "reference"])
def test_decode_attention_over_slot_lists_split_over_threads(path):
    """A list long enough for the CPU kernel to split heads across threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for with_bias, layout in itertools.product((False, True), ("shuffled", "runs")):
            test_decode_attention_over_slot_lists("cpu", path, (torch.float32, torch.float32),
                                                  (2, 8, 2, 1100, 64, 9, "holes"), False, with_bias, layout)
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("path", ["compiled", "reference"])
def test_decode_attention_rejects_rows_outside_the_pool(path):
    B, H, Hkv, C, D, R = 1, 4, 2, 5, 8, 9
    q, pool, out = torch.randn(B, H, D), torch.randn(B, R, D), torch.empty(B, H, D)
    pos = torch.zeros(B, Hkv, C, dtype=torch.int32)
    index = torch.zeros(B, Hkv, C, dtype=torch.int32)
    index[0, 1, 3] = R
    with on_path(path, "decode_attention", "cpu"), pytest.raises(IndexError, match=r"slot_index must hold pool rows in \[0, R\) = \[0, 9\).*got 9 at \[0, 1, 3\]"):
        ops.decode_attention(q, pool, pool, pos, C, 0.5, out, slot_index=index)
    with on_path(path, "decode_attention", "cpu"), pytest.raises(ValueError, match=r"k must have shape \[B, R, D\]"):
        ops.decode_attention(q, pool[:, None], pool[:, None], pos, C, 0.5, out, slot_index=index.clamp(max=0))


# ---- parameters -----------------------------------------------------------------------------------

@pytest.mark.parametrize("params, match", [
    (dict(allocation="fair"), "h2o: allocation must be one of uniform, adaptive, pyramid, got 'fair'"),
    (dict(allocation="adaptive", positions="cache"), "needs positions='original'"),
    (dict(allocation="adaptive", min_share=-3), "min_share must be >= 0"),
    (dict(allocation="pyramid", pyramid_beta=0.5), "pyramid_beta >= 1"),
    (dict(budget=32, min_share=33), "min_share 33 must not exceed the budget 32"),
])
def test_bad_allocation_parameters_raise_one_clear_line(params, match):
    with pytest.raises(PolicyError, match=match) as e:
        make_policy("h2o", **{"budget": 16, **params})
    assert "\n" not in str(e.value)


def test_cam_merges_into_the_next_tokens_in_proportion_to_attention():
    """A victim with twice its receivers' mean attention adds all of v_e / m to each of the m next values;
    with half, half of it; earlier, sink and empty slots unchanged."""
    from engine.policies.views import DecodeView, LayerState

    cam = make_policy("cam", budget=8, sinks=1, recent=1, merge_window=2)
    pos = torch.tensor([[[0, 5, 3, 9, -1, 7]]], dtype=torch.int32)
    v = torch.arange(6 * 2, dtype=torch.float32).view(1, 1, 6, 2)
    for ratio, p in ((2.0, 1.0), (0.5, 0.5)):
        abar = torch.tensor([[[1.0, 1.0, ratio, 1.0, 0.0, 1.0]]])
        layer = LayerState(k=v.clone(), v=v.clone(), pos=pos.clone(), state={})
        view = DecodeView(layer=layer, step_pos=10, q=torch.zeros(1, 1, 2), probs=None)
        alive = pos.clone()
        cam.merge(view, abar, alive, torch.tensor([[2]]))
        want = v.clone()
        want[0, 0, [1, 5]] += p * v[0, 0, 2] / 2  # positions 5 and 7 follow 3
        assert torch.equal(layer.v, want)
        assert alive.tolist() == [[[0, 5, -1, 9, -1, 7]]]  # the victim is gone for later merges
        cam.merge(view, abar, pos.clone(), torch.tensor([[-1]]))  # no victim: nothing changes
        assert torch.equal(layer.v, want)


MERGES = [("keepkv", {"min_similarity": -1.0}), ("keepkv", {"min_similarity": 0.1}),
          ("weightedkv", {"receiver": "nearest_key"}), ("weightedkv", {"receiver": "next"}), ("cam", {"merge_window": 3})]


@pytest.mark.parametrize("path", ["compiled", "reference"])
@pytest.mark.parametrize("name,kw", MERGES, ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x.values())))
def test_a_merge_in_a_pool_is_the_dense_merge(name, kw, path):
    """Adaptive allocation's picks (one KV head per row evicts): in a pool (slots shuffled over the rows of two
    pool batches, empty slots at a NaN scratch row, unused rows NaN) every buffer ends bit for bit as the
    merge over dense per-head rows leaves it, and no other pool row is written (vote counts 1, 2 and 13)."""
    from engine.policies.views import DecodeView, LayerState

    rows, P, H, Hkv, C, D = 26, 2, 6, 3, 11, 16
    g = gen(31)
    policy = make_policy(name, budget=8, sinks=2, recent=1, **kw)
    heads = torch.randint(0, Hkv, (rows, 1), generator=g)
    slot = torch.randint(2, C, (rows, 1), generator=g)
    slot[[1, 4]] = -1  # rows whose pick is empty
    victim = torch.full((rows, Hkv), -1).scatter_(1, heads, slot)
    pos = torch.arange(C, dtype=torch.int32).repeat(rows, Hkv, 1)
    pos = pos.masked_fill((torch.rand(rows, Hkv, C, generator=g) < 0.3) & (victim[..., None] != pos), -1)
    valid = pos >= 0
    k, v, q = torch.randn(rows, Hkv, C, D, generator=g), torch.randn(rows, Hkv, C, D, generator=g), torch.randn(rows, H, D, generator=g)
    state = {"acc": torch.rand(rows, Hkv, C, generator=g), "cnt": torch.randint(1, 5, (rows, Hkv, C), generator=g).float(),
             "logp": torch.tensor([1.0, 2.0, 13.0])[torch.randint(0, 3, (rows, Hkv, C), generator=g)].log(),
             "w": torch.rand(rows, Hkv, C, generator=g) * (torch.rand(rows, Hkv, C, generator=g) < 0.5)}
    state = {n: s.masked_fill(~valid, 0.0) for n, s in state.items() if n == "acc" or n in policy.state_names}
    abar = policy.average(state)

    def merged(layer: LayerState) -> tuple[LayerState, int]:
        count = torch.zeros(1, dtype=torch.long)
        view = DecodeView(layer=layer, step_pos=C, q=q, probs=None, merges=count)
        with on_path(path, "merge_value", "cpu"):
            policy.merge(view, abar, layer.pos, victim)
        return layer, int(count)

    dense = lambda: LayerState(k=k.clone(), v=v.clone(), pos=pos.clone(), state={n: s.clone() for n, s in state.items()})
    full, n_full = merged(dense())
    scratch = rows // P * Hkv * C  # each pool batch: a row per (layer row, head, slot) of its rows, then scratch
    index = torch.stack([torch.randperm(scratch, generator=g) for _ in range(P)])  # row r = j P + p: batch p's j-th
    index = index.view(P, rows // P, Hkv, C).transpose(0, 1).reshape(rows, Hkv, C)
    index = index.masked_fill(~valid, scratch).int()
    pool_k, pool_v = (torch.full((P, scratch + 1, D), math.nan) for _ in range(2))
    b = (torch.arange(rows) % P)[:, None, None].expand(-1, Hkv, C)
    pool_k[b[valid], index.long()[valid]], pool_v[b[valid], index.long()[valid]] = k[valid], v[valid]
    pooled = LayerState(k=pool_k, v=pool_v, pos=pos.clone(), state={n: s.clone() for n, s in state.items()},
                        index=index)
    pooled, n_pooled = merged(pooled)
    assert n_full == n_pooled > 0
    assert not torch.equal(full.v, v)
    assert all(torch.equal(pooled.state[n], full.state[n]) for n in state) and torch.equal(pooled.pos, full.pos)
    at = b[valid], index.long()[valid]
    assert torch.equal(pooled.k[at], full.k[valid]) and torch.equal(pooled.v[at], full.v[valid])
    unused = torch.ones(P, scratch + 1, dtype=torch.bool)
    unused[at] = False
    assert pooled.k[unused].isnan().all() and pooled.v[unused].isnan().all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["compiled", "reference"])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [(1, 9, 3, 64, 40), (3, 8, 2, 18, 7)], ids=lambda c: "-".join(map(str, c)))
def test_rope_append_into_a_shared_pool(device, path, kv_dtype, case):
    """k_cache [B, 1, R, D]: head g's key and value go to pool row slot[b, g], bit for bit what a per-head
    cache gets; every other row untouched."""
    B, H, Hkv, D, R = case
    g = gen(sum(case))
    qkv = randn((B, (H + 2 * Hkv) * D), torch.float32, device, g, scale=3.0)
    cos, sin = (t[5] for t in rope_tables(7, D, device, g))
    slot = torch.stack([torch.randperm(R, generator=g)[:Hkv] for _ in range(B)]).to(device)
    pool_k, pool_v = (randn((B, 1, R, D), kv_dtype, device, g) for _ in range(2))
    k0, v0 = pool_k.clone(), pool_v.clone()
    q_out = poisoned((B, H, D), torch.float32, device)
    with on_path(path, "rope_append", device):
        ops.rope_append(qkv, cos, sin, slot, True, q_out, pool_k, pool_v)
    want_q = poisoned((B, H, D), torch.float32, device)
    want_k, want_v = (torch.zeros(B, Hkv, 1, D, dtype=kv_dtype, device=device) for _ in range(2))
    with ops.use_reference(True):
        ops.rope_append(qkv, cos, sin, torch.zeros_like(slot), True, want_q, want_k, want_v)
    assert torch.equal(q_out, want_q)
    rows = torch.arange(B, device=device)[:, None], slot
    assert torch.equal(pool_k[:, 0][rows], want_k[:, :, 0]) and torch.equal(pool_v[:, 0][rows], want_v[:, :, 0])
    other = torch.ones(B, R, dtype=torch.bool, device=device)
    other[rows] = False
    assert torch.equal(pool_k[:, 0][other], k0[:, 0][other]) and torch.equal(pool_v[:, 0][other], v0[:, 0][other])
