"""engine.ops (compiled and reference path) against the fp64 oracle in engine.reference.

Accuracy rule (flash-attention's): an op may be at most twice as wrong as the same formula run by
plain PyTorch in the input precision, both measured against fp64, plus a tiny absolute floor.
Outputs are poisoned with NaN first, so an element the op forgot to write fails the check.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import ops
from engine import reference as ref

from .helpers import (
    assert_nearest, assert_within, brute_neighbour, brute_remove, brute_spread, brute_victim, brute_zip, gen, keys_with_ties, on_path, opcheck_cases, poisoned,
    positions, prefill_inputs, randn, rope_ranks, rope_tables,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
PATHS = ["compiled", "reference"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (query, cache) dtypes of the attention kernels: one dtype, or fp32 queries over a 16-bit cache (kv_dtype)
QKV_DTYPES = [(d, d) for d in DTYPES] + [(torch.float32, torch.bfloat16), (torch.float32, torch.float16)]


def dtypes_id(dtypes: tuple[torch.dtype, ...]) -> str:
    return "-".join(str(d).removeprefix("torch.") for d in dtypes)


# ---------------------------------------------------------------------------------------------
# rms_norm
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 64), (1, 576), (5, 129), (67, 577)])  # the last split over threads
def test_rms_norm(device, path, dtype, shape):
    g = gen(1)
    x = randn(shape, dtype, device, g, scale=3.0)
    w = randn(shape[-1:], dtype, device, g)
    with on_path(path, "rms_norm", device):
        y = ops.rms_norm(x, w, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    truth = ref.rms_norm_dense(x, w, 1e-5, torch.float64)
    assert_within(y, truth, ref.rms_norm(x, w, 1e-5), "rms_norm")


def test_rms_norm_matches_hf_llama():
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    g = gen(2)
    for dtype in DTYPES:
        x = randn((4, 5, 96), dtype, "cpu", g, scale=2.0)
        norm = modeling.LlamaRMSNorm(96, eps=1e-6).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(randn((96,), dtype, "cpu", g))
            expected = norm(x)
        got = ops.rms_norm(x, norm.weight.detach(), 1e-6)
        # Same formula and roundings; only the fp32 summation order may differ.
        torch.testing.assert_close(got, expected, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# decode_attention
# ---------------------------------------------------------------------------------------------

DECODE_CASES = [  # B, H, Hkv, C, D, length, fill
    (1, 9, 3, 37, 64, 37, "all"),
    (3, 8, 1, 50, 128, 33, "holes"),
    (3, 4, 4, 19, 80, 19, "one"),
    (1, 12, 3, 70, 80, 65, "holes"),
    (3, 6, 2, 41, 64, 40, "empty_head"),
    (2, 3, 1, 23, 37, 23, "holes"),  # a head dim that is no multiple of the vector width
]



@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtypes", QKV_DTYPES, ids=dtypes_id)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("rope", [False, True], ids=["", "rope"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
def test_decode_attention(device, path, dtypes, case, rope, with_bias):
    """Against fp64 within 2x PyTorch's error in the query dtype (fp32 queries read a 16-bit cache exactly);
    with a per-slot logit bias (log votes in [0, 3), NaN on masked slots: never read)."""
    dtype, kv_dtype = dtypes
    B, H, Hkv, C, D, length, fill = case
    if rope and D % 2:
        pytest.skip("rope needs an even head dim")
    g = gen(sum(case[:6]))
    q = randn((B, H, D), dtype, device, g)
    k = randn((B, Hkv, C, D), kv_dtype, device, g)
    v = randn((B, Hkv, C, D), kv_dtype, device, g)
    pos = positions(B, Hkv, C, fill, g).to(device)
    masked = ref._decode_kpos(pos, length) < 0
    k, v = (t.masked_fill(masked[..., None], float("nan")) for t in (k, v))  # must never be read
    scale = 2.0 / math.sqrt(D)  # peakier than usual, so the online max matters
    acc0 = torch.rand((B, Hkv, C), generator=g).to(device)
    tables = None
    if rope:
        P = 3 * C + 5
        tables = (*rope_tables(P, D, device, g), rope_ranks(pos, P, g))
    bias = (3 * torch.rand((B, Hkv, C), generator=g)).to(device).masked_fill(masked, float("nan")) if with_bias else None
    out, acc, probs = poisoned((B, H, D), dtype, device), acc0.clone(), poisoned((B, H, C), torch.float32, device)
    with on_path(path, "decode_attention", device):
        ops.decode_attention(q, k, v, pos, length, scale, out, acc, probs, rope=tables, bias=bias)

    o64, p64 = ref.decode_attention_dense(q, k, v, pos, length, scale, torch.float64, tables, bias)
    o_pt, p_pt = ref.decode_attention_dense(q, k, v, pos, length, scale, dtype, tables, bias)
    valid = (ref._decode_kpos(pos, length) >= 0).cpu()
    assert_within(out, o64, o_pt, "out")
    assert_within(probs, p64, p_pt, "probs_out")
    assert torch.equal(acc.cpu()[~valid], acc0.cpu()[~valid]), "score_acc changed on an invalid slot"
    assert_within(acc, acc0.double() + ref._group_mean(p64, Hkv), acc0.double() + ref._group_mean(p_pt, Hkv),
                  "score_acc")
    if fill == "empty_head":
        assert torch.equal(out[-1, -(H // Hkv):].cpu(), torch.zeros(H // Hkv, D, dtype=dtype))


@pytest.mark.parametrize("threads", [2, 3, 8])
@pytest.mark.parametrize("case", [(2, 8, 2, 1100, 64, 1090, "holes"), (1, 256, 1, 6, 256, 5, "holes")])
@pytest.mark.parametrize("rope", [False, True], ids=["", "rope"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
def test_decode_attention_split_over_threads(threads, case, rope, with_bias):
    """Caches big enough to be split across threads (pieces combined per head), and more threads than slots."""
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        test_decode_attention("cpu", "compiled", (torch.float32, torch.float32), case, rope, with_bias)
    finally:
        torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# rope_append
# ---------------------------------------------------------------------------------------------

ROPE_APPEND_CASES = [  # B, H, Hkv, D, C
    (1, 9, 3, 64, 37),
    (3, 8, 2, 128, 20),
    (2, 4, 4, 80, 5),
    (1, 6, 1, 18, 1),  # half a head dim that is no multiple of the vector width; one slot
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtypes", QKV_DTYPES, ids=dtypes_id)
@pytest.mark.parametrize("case", ROPE_APPEND_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("rotate_key", [True, False], ids=["rotate_key", "raw_key"])
def test_rope_append(device, path, dtypes, case, rotate_key):
    """Bit for bit the model's rotation (Rope.rotate_by) of the query and key; every other slot untouched."""
    from engine.rope import Rope

    q_dtype, kv_dtype = dtypes
    B, H, Hkv, D, C = case
    g = gen(sum(case))
    qkv = randn((B, (H + 2 * Hkv) * D), q_dtype, device, g, scale=3.0)
    cos, sin = (t[7] for t in rope_tables(9, D, device, g))
    slot = torch.randint(0, C, (B, Hkv), generator=g).to(device)
    k_cache, v_cache = (randn((B, Hkv, C, D), kv_dtype, device, g) for _ in range(2))
    k0, v0 = k_cache.clone(), v_cache.clone()
    q_out = poisoned((B, H, D), q_dtype, device)
    with on_path(path, "rope_append", device):
        ops.rope_append(qkv, cos, sin, slot, rotate_key, q_out, k_cache, v_cache)

    q, k, v = qkv.view(B, H + 2 * Hkv, D).split([H, Hkv, Hkv], dim=1)
    assert torch.equal(q_out, Rope.rotate_by(q, cos, sin))
    want_k = (Rope.rotate_by(k, cos, sin) if rotate_key else k).to(kv_dtype)
    written = torch.zeros(B, Hkv, C, dtype=torch.bool, device=device).scatter_(2, slot[..., None], True)
    for got, before, want in ((k_cache, k0, want_k), (v_cache, v0, v.to(kv_dtype))):
        assert torch.equal(got[~written], before[~written]), "a slot other than `slot` changed"
        assert torch.equal(got.gather(2, slot[..., None, None].expand(-1, -1, 1, D))[:, :, 0], want)
    assert_within(q_out, ref.rotate_half_dense(q, cos, sin, torch.float64),
                  ref.rotate_half_dense(q, cos, sin, q_dtype), "q_out")


# ---------------------------------------------------------------------------------------------
# decode_layers: rope_append + decode_attention for several caches in one call
# ---------------------------------------------------------------------------------------------

LAYERS_CASES = [  # B, H, Hkv, C, D, length, fill, extras: one request each, one batched step's mix
    (1, 9, 3, 37, 64, 20, "all", "acc"),
    (1, 9, 3, 61, 64, 61, "holes", "probs"),
    (2, 8, 2, 1100, 64, 1090, "holes", "acc"),  # big enough that decode_attention splits it over threads
    (1, 9, 3, 5, 64, 1, "all", "rope"),  # keys rotated on the fly: stored raw, rotate_key False
    (1, 4, 1, 23, 38, 17, "empty_head", ""),
    (3, 6, 2, 41, 64, 40, "one", "acc+probs+rope"),
]


def layers_request(case, dtype: torch.dtype, g: torch.Generator) -> dict:
    """One request's operands of ops.decode_layers (outputs poisoned, caches random), as a dict of the op's names."""
    B, H, Hkv, C, D, length, fill, extras = case
    pos = positions(B, Hkv, C, fill, g)
    P = 4 * C + 9
    cos, sin = rope_tables(P, D, "cpu", g)
    rope = "rope" in extras
    return dict(
        qkv=randn((B, (H + 2 * Hkv) * D), dtype, "cpu", g), cos=cos[P - 1], sin=sin[P - 1],
        slot=torch.randint(0, C, (B, Hkv), generator=g), rotate_key=not rope, q_out=poisoned((B, H, D), dtype, "cpu"),
        k_cache=randn((B, Hkv, C, D), dtype, "cpu", g), v_cache=randn((B, Hkv, C, D), dtype, "cpu", g), pos=pos,
        length=length, out=poisoned((B, H, D), dtype, "cpu"),
        score_acc=torch.rand((B, Hkv, C), generator=g) if "acc" in extras else None,
        probs_out=poisoned((B, H, C), torch.float32, "cpu") if "probs" in extras else None,
        rope_cos=cos if rope else None, rope_sin=sin if rope else None,
        rope_rank=rope_ranks(pos, P, g) if rope else None)


def one_by_one(requests: list[dict], scale: float) -> None:
    """What ops.decode_layers stands for: each request's two calls, one request after another."""
    for r in requests:
        ops.rope_append(r["qkv"], r["cos"], r["sin"], r["slot"], r["rotate_key"], r["q_out"], r["k_cache"],
                        r["v_cache"])
        rope = None if r["rope_rank"] is None else (r["rope_cos"], r["rope_sin"], r["rope_rank"])
        ops.decode_attention(r["q_out"], r["k_cache"], r["v_cache"], r["pos"], r["length"], scale, r["out"],
                             r["score_acc"], r["probs_out"], rope=rope)


def as_lists(requests: list[dict]) -> dict[str, list]:
    return {name: [r[name] for r in requests] for name in requests[0]}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_decode_layers_equals_each_requests_own_calls(path, dtype, threads):
    """Every output of every request (q_out, both caches, out, score_acc, probs_out) bit for bit what its own
    rope_append and decode_attention calls write, whatever the thread count; outputs poisoned first."""
    g = gen(11 + threads)
    requests = [layers_request(case, dtype, g) for case in LAYERS_CASES]
    copies = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in r.items()} for r in requests]
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with on_path(path, "decode_layers", "cpu"):
            ops.decode_layers(**as_lists(requests), scale=0.3)
            one_by_one(copies, 0.3)
    finally:
        torch.set_num_threads(n)
    for i, (got, want) in enumerate(zip(requests, copies)):
        for name in ("q_out", "k_cache", "v_cache", "out", "score_acc", "probs_out"):
            if want[name] is not None:
                assert torch.equal(got[name], want[name]), f"request {i}: {name} differs from its own calls"
        assert not got["out"].isnan().any(), f"request {i}: out left unwritten"


@pytest.mark.parametrize("path", PATHS)
def test_decode_layers_bad_input_is_the_single_calls_error(path):
    """A request whose slot is out of range fails as its own rope_append would; lists of different lengths
    are one clear error. Both paths say the same."""
    g = gen(5)
    requests = [layers_request(case, torch.float32, g) for case in LAYERS_CASES[:3]]
    requests[1]["slot"][0, 0] = 10_000
    with on_path(path, "decode_layers", "cpu"):
        with pytest.raises(IndexError, match="rope_append: slot"):
            ops.decode_layers(**as_lists(requests), scale=0.3)
        lists = as_lists(requests)
        lists["pos"] = lists["pos"][:2]
        with pytest.raises(ValueError, match=r"decode_layers: every list must hold one entry per request \(3 qkv"):
            ops.decode_layers(**lists, scale=0.3)


# ---------------------------------------------------------------------------------------------
# prefill_attention
# ---------------------------------------------------------------------------------------------

PREFILL_CASES = [  # B, H, Hkv, L, S, D, layout
    (1, 9, 3, 37, 37, 64, "causal"),  # a plain prompt: slot = position
    (3, 8, 2, 20, 45, 128, "chunk"),  # a chunk after a compressed cache with holes, shuffled slots
    (1, 4, 4, 1, 10, 64, "chunk"),  # one query row
    (2, 6, 1, 17, 80, 40, "blind"),  # some rows see no key at all; an empty KV head; odd D
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtypes", QKV_DTYPES, ids=dtypes_id)
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("score", [(0, 1.0), (5, 1.0), (7, 0.5)], ids=["all-rows", "last-5", "own-scale"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
def test_prefill_attention(device, path, dtypes, case, score, with_bias):
    """Against fp64 within 2x PyTorch's error; with a per-slot logit bias (log votes in [0, 3), NaN on empty
    slots: never read)."""
    dtype, kv_dtype = dtypes
    B, H, Hkv, L, S, D, _ = case
    q, k, v, qpos, kpos = prefill_inputs(case, dtype, device, seed=L + S + D)
    bias = None
    if with_bias:
        bias = (3 * torch.rand((B, Hkv, S), generator=gen(S))).to(device).masked_fill(kpos < 0, float("nan"))
    k, v = k.to(kv_dtype), v.to(kv_dtype)  # fp32 queries over a cache rounded to 16 bits
    scale = 1.0 / math.sqrt(D)
    score_rows, score_scale = score[0], score[1] * scale
    out, lse = poisoned((B, H, L, D), dtype, device), poisoned((B, H, L), torch.float32, device)
    cols = poisoned((B, Hkv, S), torch.float32, device)
    with on_path(path, "prefill_attention", device):
        ops.prefill_attention(q, k, v, qpos, kpos, scale, out, lse, cols, score_rows, score_scale, bias)

    o64, lse64 = ref.prefill_attention_dense(q, k, v, qpos, kpos, scale, torch.float64, bias)
    o_pt, lse_pt = ref.prefill_attention_dense(q, k, v, qpos, kpos, scale, dtype, bias)
    assert_within(out, o64, o_pt, "out")
    assert_within(lse, lse64, lse_pt, "lse")
    w = slice(L - score_rows if 0 < score_rows < L else 0, L)
    c64 = ref.column_scores_dense(q[:, :, w], k, qpos[:, w], kpos, score_scale, torch.float64, bias)
    c_pt = ref.column_scores_dense(q[:, :, w], k, qpos[:, w], kpos, score_scale, dtype, bias)
    assert_within(cols, c64, c_pt, "col_scores")


@pytest.mark.parametrize("path", PATHS)
def test_prefill_attention_without_column_scores(path):
    case = (1, 6, 3, 24, 24, 64, "causal")
    q, k, v, qpos, kpos = prefill_inputs(case, torch.float32, "cpu", seed=4)
    out, lse = poisoned((1, 6, 24, 64), torch.float32, "cpu"), poisoned((1, 6, 24), torch.float32, "cpu")
    with on_path(path, "prefill_attention", "cpu"):
        ops.prefill_attention(q, k, v, qpos, kpos, 0.125, out, lse, None, 0, 1.0)
    o64, lse64 = ref.prefill_attention_dense(q, k, v, qpos, kpos, 0.125, torch.float64)
    o_pt, lse_pt = ref.prefill_attention_dense(q, k, v, qpos, kpos, 0.125, torch.float32)
    assert_within(out, o64, o_pt, "out")
    assert_within(lse, lse64, lse_pt, "lse")


def test_prefill_chunked_equals_whole():
    case = (2, 6, 2, 29, 40, 64, "chunk")
    q, k, v, qpos, kpos = prefill_inputs(case, torch.float32, "cpu", seed=5)
    results = []
    for chunk in (29, 4):
        out, lse, cols = torch.empty(2, 6, 29, 64), torch.empty(2, 6, 29), torch.empty(2, 2, 40)
        ref.prefill_attention_chunked(q, k, v, qpos, kpos, 0.1, out, lse, cols, 11, 0.05, chunk=chunk)
        results.append((out, lse, cols))
    for whole, chunked in zip(*results):
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# value_norm
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", [0, 1, 2])
@pytest.mark.parametrize("shape", [(3, 3, 17, 64), (1, 1, 5, 128), (2, 2, 1, 80)])
def test_value_norm(device, path, dtype, kind, shape):
    v = randn(shape, dtype, device, gen(kind), scale=2.0)
    out = poisoned(shape[:3], torch.float32, device)
    with on_path(path, "value_norm", device):
        ops.value_norm(v, kind, out)
    assert_within(out, ref.value_norm_dense(v, kind, torch.float64), ref.value_norm_dense(v, kind, torch.float32),
                  f"value_norm kind={kind}", floor=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_value_norm_propagates_nan(path):
    v = torch.ones(1, 1, 3, 8)
    v[0, 0, 1, 5] = float("nan")
    out = torch.zeros(1, 1, 3)
    for kind in (0, 1, 2):
        with on_path(path, "value_norm", "cpu"):
            ops.value_norm(v, kind, out)
        assert out[0, 0, 1].isnan() and out[0, 0, [0, 2]].isfinite().all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_half_precision_value_converts_exactly(path, dtype):
    """All 65536 bit patterns through the kernels' fp32 conversion (value_norm Linf of one element)."""
    v = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(1, 1, -1, 1)
    out = torch.empty(1, 1, 2**16)
    with on_path(path, "value_norm", "cpu"):
        ops.value_norm(v.contiguous(), 0, out)
    expected = v.float().abs().reshape(1, 1, -1)
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.nan_to_num(), expected.nan_to_num())


# ---------------------------------------------------------------------------------------------
# select_victim, compact, merge_value: exact ops, checked against brute force
# ---------------------------------------------------------------------------------------------

SLOT_SCORES = st.one_of(st.sampled_from([0.0, 1.0, -1.0, float("inf"), float("nan")]),
                        st.floats(-10, 10, width=32))


@st.composite
def victim_inputs(draw):
    B, Hkv, C = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 12))
    n = B * Hkv * C
    score = torch.tensor(draw(st.lists(SLOT_SCORES, min_size=n, max_size=n)), dtype=torch.float32)
    pos = torch.tensor(draw(st.lists(st.integers(-1, 15), min_size=n, max_size=n)), dtype=torch.int32)
    lo, hi = draw(st.integers(-1, 8)), draw(st.integers(0, 17))
    return score.view(B, Hkv, C), pos.view(B, Hkv, C), lo, hi


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=150, deadline=None)
@given(inputs=victim_inputs())
def test_select_victim(path, inputs):
    score, pos, lo, hi = inputs
    out = torch.full(score.shape[:2], 99, dtype=torch.int64)
    with on_path(path, "select_victim", "cpu"):
        ops.select_victim(score, pos, lo, hi, out)
    assert torch.equal(out, brute_victim(score, pos, lo, hi))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
def test_select_victim_large(device, path):
    g = gen(6)
    score = torch.randint(0, 50, (3, 4, 300), generator=g).float()  # many ties
    pos = positions(3, 4, 300, "holes", g)
    out = torch.full((3, 4), 99, dtype=torch.int64, device=device)
    with on_path(path, "select_victim", device):
        ops.select_victim(score.to(device), pos.to(device), 4, 900, out)
    assert torch.equal(out.cpu(), brute_victim(score, pos, 4, 900))


def brute_adaptive(score, pos, lo, hi, min_share, limit, n):
    """ops.adaptive_victims by loops: per row, the lowest (key, entry) taken n times over."""
    B, Hkv, C = score.shape
    out = torch.full((B, n), -1, dtype=torch.int64)
    for b in range(B):
        count = [int((pos[b, g] >= 0).sum()) for g in range(Hkv)]
        if sum(count) <= limit[b]:
            continue
        cands = []
        for g in range(Hkv):
            total = torch.tensor(sum(float(score[b, g, s]) for s in range(C) if pos[b, g, s] >= 0)).float()
            total = total if total > 0 else torch.tensor(1.0)
            for s in range(C):
                key = float(score[b, g, s] / total)
                if max(lo, 0) <= pos[b, g, s] <= hi and math.isfinite(key):
                    cands.append((key, g * C + s))
        room = [c - min_share for c in count]
        for i in range(n):
            left = sorted(c for c in cands if room[c[1] // C] > 0)
            if not left:
                break
            out[b, i] = left[0][1]
            room[left[0][1] // C] -= 1
            cands.remove(left[0])
    return out


@st.composite
def adaptive_inputs(draw):
    score, pos, lo, hi = draw(victim_inputs())
    B, Hkv, C = score.shape
    limit = torch.tensor(draw(st.lists(st.integers(0, Hkv * C), min_size=B, max_size=B)), dtype=torch.int64)
    return score, pos, lo, hi, draw(st.integers(0, 4)), limit, draw(st.integers(0, 5))


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=150, deadline=None)
@given(inputs=adaptive_inputs())
def test_adaptive_victims(path, inputs):
    score, pos, lo, hi, min_share, limit, n = inputs
    out = torch.full((score.shape[0], n), 99, dtype=torch.int64)
    with on_path(path, "adaptive_victims", "cpu"):
        ops.adaptive_victims(score, pos, lo, torch.tensor([hi]), min_share, limit, out)
    assert torch.equal(out, brute_adaptive(score, pos, lo, hi, min_share, limit, n))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
def test_adaptive_victims_large(device, path):
    g = gen(9)
    score = torch.randint(0, 50, (5, 3, 300), generator=g).float()  # many ties, exact totals
    pos = positions(5, 3, 300, "holes", g)
    limit = torch.tensor([0, 400, 500, 540, 10**6])
    out = torch.full((5, 7), 99, dtype=torch.int64, device=device)
    with on_path(path, "adaptive_victims", device):
        ops.adaptive_victims(score.to(device), pos.to(device), 4, torch.tensor([900], device=device), 150,
                             limit.to(device), out)
    assert torch.equal(out.cpu(), brute_adaptive(score, pos, 4, 900, 150, limit, 7))


@st.composite
def compact_inputs(draw):
    B, Hkv, C = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 10))
    K = draw(st.integers(0, C))
    # Permutations overwrite slots still to be read (e.g. keep = [C-1, 0, 1, ...]).
    keep = [draw(st.permutations(range(C)))[:K] for _ in range(B * Hkv)]
    return B, Hkv, C, torch.tensor(keep, dtype=torch.int64).view(B, Hkv, K)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=60, deadline=None)
@given(inputs=compact_inputs())
def test_compact(path, dtype, inputs):
    B, Hkv, C, keep = inputs
    D, K = 5, keep.shape[2]
    g = gen(7)
    k, v = randn((B, Hkv, C, D), dtype, "cpu", g), randn((B, Hkv, C, D), dtype, "cpu", g)
    pos = positions(B, Hkv, C, "holes", g)
    state = [torch.rand(B, Hkv, C, generator=g) for _ in range(2)]
    before = [t.clone() for t in (k, v, pos, *state)]
    with on_path(path, "compact", "cpu"):
        ops.compact(k, v, pos, state, keep)
    for after, old, empty in zip((k, v, pos, *state), before, (0, 0, -1, 0, 0)):
        for b in range(B):
            for h in range(Hkv):
                assert torch.equal(after[b, h, :K], old[b, h][keep[b, h]])
                assert (after[b, h, K:] == empty).all()


@st.composite
def merge_inputs(draw):
    B, Hkv, C = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(2, 9))
    pairs = [draw(st.lists(st.integers(-1, C - 1), min_size=2, max_size=2, unique=True)) for _ in range(B * Hkv)]
    w = [draw(st.sampled_from([0.0, 0.25, 1.0, 3.5])) for _ in range(B * Hkv * C)]
    weight = [draw(st.sampled_from([0.0, 0.1, 1.0, 2.0])) for _ in range(B * Hkv)]
    t = torch.tensor(pairs, dtype=torch.int64).view(B, Hkv, 2)
    return (torch.tensor(w).view(B, Hkv, C), t[..., 0].contiguous(), t[..., 1].contiguous(),
            torch.tensor(weight).view(B, Hkv))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=60, deadline=None)
@given(inputs=merge_inputs())
def test_merge_value(path, dtype, inputs):
    w, victim, receiver, weight = inputs
    B, Hkv, C = w.shape
    v = randn((B, Hkv, C, 16), dtype, "cpu", gen(8))
    v0, w0 = v.clone(), w.clone()
    with on_path(path, "merge_value", "cpu"):
        ops.merge_value(v, w, victim, receiver, weight)
    idx, rows64, total = ref.merged_rows(v0, w0, victim, receiver, weight, torch.float64)
    changed = torch.zeros(B, Hkv, C, dtype=torch.bool)
    changed[idx] = True
    assert torch.equal(v[~changed], v0[~changed]) and torch.equal(w[~changed], w0[~changed])  # victims too
    assert torch.equal(w[idx].double(), total.float().double()), "weights must add up"
    # A convex combination of the two rows, up to one rounding of the dtype.
    b, g, r = idx
    j = victim[b, g]
    lo = torch.minimum(v0[b, g, r], v0[b, g, j]).double()
    hi = torch.maximum(v0[b, g, r], v0[b, g, j]).double()
    slack = torch.finfo(dtype).eps * torch.maximum(lo.abs(), hi.abs())
    got = v[idx].double()
    assert ((got >= lo - slack) & (got <= hi + slack)).all()
    _, rows_pt, _ = ref.merged_rows(v0, w0, victim, receiver, weight, torch.float32)
    assert_within(got, rows64, rows_pt.to(dtype), "merged rows")




@dataclass
class Pooled:
    """Per-head rows [B, H_kv, C, D] moved into pools [P, R, D] (B = layers P rows of slots, row b in pool
    batch b % P, 5 spare rows around them, rows shuffled): a merge over the pools must write exactly what it
    writes over the per-head rows, and no other pool row."""
    pools: list[torch.Tensor]
    slot_index: torch.Tensor  # [B, H_kv, C] int32
    at: tuple[torch.Tensor, torch.Tensor]  # the advanced index of every slot's pool row
    used: torch.Tensor  # [P, R] bool: the rows some slot holds

    @classmethod
    def of(cls, dense: list[torch.Tensor], layers: int, g: torch.Generator) -> Pooled:
        B, Hkv, C, D = dense[0].shape
        P = B // layers if B % layers == 0 else B
        per = B // P * Hkv * C  # the rows each pool batch holds
        R = per + 5  # and spare ones
        index = torch.stack([torch.randperm(R, generator=g)[:per] for _ in range(P)])  # (P, per)
        slot_index = index.view(P, B // P, Hkv, C).transpose(0, 1).reshape(B, Hkv, C).int().contiguous()
        at = ((torch.arange(B) % P)[:, None, None], slot_index.long())
        pools = [randn((P, R, D), t.dtype, "cpu", g) for t in dense]
        for pool, t in zip(pools, dense):
            pool[at] = t
        used = torch.zeros(P, R, dtype=torch.bool)
        used[at] = True
        return cls(pools, slot_index, at, used)

    def holds(self, dense: list[torch.Tensor], before: list[torch.Tensor]) -> bool:
        """Whether the pools hold `dense` at the slots' rows and `before`'s rows everywhere else."""
        return all(torch.equal(pool[self.at], t) and torch.equal(pool[~self.used], b[~self.used])
                   for pool, t, b in zip(self.pools, dense, before))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=40, deadline=None)
@given(inputs=merge_inputs(), layers=st.integers(1, 3))
def test_merge_value_in_a_pool(path, dtype, inputs, layers):
    """With slot_index the slots' rows live in a pool [P, R, D] (B = layers P rows of slots, row b in pool
    batch b % P, spare rows around them): the same bits as the merge over per-head rows, every other pool
    row untouched."""
    w, victim, receiver, weight = inputs
    B, Hkv, C = w.shape
    g = gen(10)
    dense = randn((B, Hkv, C, 16), dtype, "cpu", g)
    pooled = Pooled.of([dense], layers, g)
    before, w_dense = [t.clone() for t in pooled.pools], w.clone()
    ref.merge_value(dense, w_dense, victim, receiver, weight)
    with on_path(path, "merge_value", "cpu"):
        ops.merge_value(*pooled.pools, w, victim, receiver, weight, slot_index=pooled.slot_index)
    assert torch.equal(w, w_dense) and pooled.holds([dense], before)


@st.composite
def neighbour_inputs(draw):
    B, Hkv, C = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 12))
    n = draw(st.integers(0, 5))
    picks = draw(st.lists(st.integers(-1, Hkv * C - 1), min_size=B * n, max_size=B * n))  # repeats, empty slots too
    w = draw(st.lists(st.sampled_from([0.0, 0.25, 1.0, 3.5]), min_size=B * Hkv * C, max_size=B * Hkv * C))
    abar = draw(st.lists(st.sampled_from([0.0, 0.1, 0.5, 2.0]), min_size=B * Hkv * C, max_size=B * Hkv * C))
    return (torch.tensor(w).view(B, Hkv, C), torch.tensor(abar).view(B, Hkv, C),
            torch.tensor(picks, dtype=torch.int64).view(B, n), draw(st.integers(0, 6)), draw(st.booleans()),
            draw(st.integers(0, 10**6)))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=80, deadline=None)
@given(inputs=neighbour_inputs())
def test_merge_neighbour(path, dtype, inputs):
    """Receivers, emptied positions and weights exactly as the loops; values within the rounding of the
    reference's fp32 chain of merges; every row that is no receiver untouched."""
    w, abar, picks, sinks, after, seed = inputs
    B, Hkv, C = w.shape
    g = gen(seed)
    v, pos = randn((B, Hkv, C, 16), dtype, "cpu", g), positions(B, Hkv, C, "holes", g)
    truth_v, truth_w, truth_pos, truth_out = brute_neighbour(v, w, pos, abar, picks, sinks, after)
    base = [t.clone() for t in (v, w, pos)]
    ref.merge_neighbour(*base, abar, picks, sinks, after, torch.empty_like(picks))
    out = torch.full_like(picks, 99)
    v0 = v.clone()
    with on_path(path, "merge_neighbour", "cpu"):
        ops.merge_neighbour(v, w, pos, abar, picks, sinks, after, out)
    assert torch.equal(out, truth_out) and torch.equal(pos, truth_pos) and torch.equal(w, truth_w)
    received = torch.zeros(B, Hkv, C, dtype=torch.bool)
    for b, i in (truth_out >= 0).nonzero().tolist():
        received[b, picks[b, i] // C, truth_out[b, i]] = True
    assert torch.equal(v[~received], v0[~received])
    assert_within(v[received], truth_v[received], base[0][received], "merged rows")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=40, deadline=None)
@given(inputs=neighbour_inputs(), layers=st.integers(1, 3))
def test_merge_neighbour_in_a_pool(path, dtype, inputs, layers):
    """With slot_index: the same bits as over per-head rows, every other pool row untouched."""
    w, abar, picks, sinks, after, seed = inputs
    B, Hkv, C = w.shape
    g = gen(seed)
    dense, pos = randn((B, Hkv, C, 16), dtype, "cpu", g), positions(B, Hkv, C, "holes", g)
    pooled = Pooled.of([dense], layers, g)
    before, w_dense, pos_dense, out_dense = [t.clone() for t in pooled.pools], w.clone(), pos.clone(), torch.empty_like(picks)
    ref.merge_neighbour(dense, w_dense, pos_dense, abar, picks, sinks, after, out_dense)
    out = torch.full_like(picks, 99)
    with on_path(path, "merge_neighbour", "cpu"):
        ops.merge_neighbour(*pooled.pools, w, pos, abar, picks, sinks, after, out, slot_index=pooled.slot_index)
    assert torch.equal(out, out_dense) and torch.equal(w, w_dense) and torch.equal(pos, pos_dense)
    assert pooled.holds([dense], before)


@st.composite
def remove_inputs(draw):
    B, Hkv, C = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 20))
    n = draw(st.integers(0, 6))
    entries = draw(st.lists(st.integers(-1, Hkv * C - 1), min_size=B * n, max_size=B * n))  # repeats too
    return B, Hkv, C, torch.tensor(entries, dtype=torch.int64).view(B, n), draw(st.integers(0, 2)), \
        draw(st.booleans()), draw(st.integers(0, 10**6))


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=80, deadline=None)
@given(inputs=remove_inputs())
def test_remove_entries(path, inputs):
    """Positions, every state tensor and the slot index exactly as the loops, the freed rows in head order
    (repeats and slots already at the scratch row free nothing); without a slot index no row is freed."""
    B, Hkv, C, entries, n_state, pooled, seed = inputs
    g = gen(seed)
    pos = positions(B, Hkv, C, "holes", g)
    state = [torch.rand(B, Hkv, C, generator=g) for _ in range(n_state)]
    scratch = B * Hkv * C + 3
    index = None
    if pooled:
        index = torch.randperm(scratch, generator=g)[: B * Hkv * C].view(B, Hkv, C).int()
        index[torch.rand(B, Hkv, C, generator=g) < 0.2] = scratch  # empty slots point at the scratch row
    want = brute_remove(pos, state, index, entries, scratch)
    freed = torch.full_like(entries, 99)
    with on_path(path, "remove_entries", "cpu"):
        ops.remove_entries(pos, state, index, entries, scratch, freed)
    assert torch.equal(pos, want[0]) and all(torch.equal(s, w) for s, w in zip(state, want[1]))
    assert (index is None) or torch.equal(index, want[2])
    assert torch.equal(freed, want[3])


# A chain of merges in fp32, each rounded to the dtype: the error allowed against fp64 loops, of the largest
# |value| (no PyTorch baseline: the reference is among the paths tested)
ROUNDING_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@st.composite
def spread_inputs(draw):
    B, Hkv, C = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 40))
    n = draw(st.integers(0, 5))
    picks = draw(st.lists(st.integers(-1, Hkv * C - 1), min_size=B * n, max_size=B * n))  # repeats, empty slots too
    abar = draw(st.lists(st.sampled_from([0.0, 0.1, 0.5, 2.0]), min_size=B * Hkv * C, max_size=B * Hkv * C))
    return (torch.tensor(abar).view(B, Hkv, C), torch.tensor(picks, dtype=torch.int64).view(B, n),
            draw(st.integers(0, 6)), draw(st.integers(1, 45)), draw(st.integers(0, 10**6)))


def spread_receivers(shape: tuple[int, int, int], picks: torch.Tensor, receivers: dict) -> torch.Tensor:
    """(B, H_kv, C) bool: the slots some pick merged into (brute_spread's receivers)."""
    received = torch.zeros(shape, dtype=torch.bool)
    for (b, i), slots in receivers.items():
        received[b, int(picks[b, i]) // shape[2], slots] = True
    return received


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=80, deadline=None)
@given(inputs=spread_inputs())
def test_merge_spread(path, dtype, inputs):
    """Receiver counts and emptied positions exactly as the loops; values within the rounding of the
    reference's fp32 chain of merges; every row that is no receiver untouched (a window past the head's
    slots, sinks past every position, 0/0 and x/0 attention ratios among the draws)."""
    abar, picks, sinks, window, seed = inputs
    B, Hkv, C = abar.shape
    g = gen(seed)
    v, pos = randn((B, Hkv, C, 16), dtype, "cpu", g), positions(B, Hkv, C, "holes", g)
    truth_v, truth_pos, truth_out, receivers = brute_spread(v, pos, abar, picks, sinks, window)
    out = torch.full_like(picks, 99)
    v0 = v.clone()
    with on_path(path, "merge_spread", "cpu"):
        ops.merge_spread(v, pos, abar, picks, sinks, window, out)
    assert torch.equal(out, truth_out) and torch.equal(pos, truth_pos)
    received = spread_receivers((B, Hkv, C), picks, receivers)
    assert torch.equal(v[~received], v0[~received])
    assert_within(v[received], truth_v[received], truth_v[received], "merged rows", floor=ROUNDING_FLOOR[dtype])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=40, deadline=None)
@given(inputs=spread_inputs(), layers=st.integers(1, 3))
def test_merge_spread_in_a_pool(path, dtype, inputs, layers):
    """With slot_index: the same bits as over per-head rows, every other pool row untouched."""
    abar, picks, sinks, window, seed = inputs
    B, Hkv, C = abar.shape
    g = gen(seed)
    dense, pos = randn((B, Hkv, C, 16), dtype, "cpu", g), positions(B, Hkv, C, "holes", g)
    pooled = Pooled.of([dense], layers, g)
    before, pos_dense, out_dense = [t.clone() for t in pooled.pools], pos.clone(), torch.empty_like(picks)
    out = torch.full_like(picks, 99)
    with on_path(path, "merge_spread", "cpu"):
        ops.merge_spread(dense, pos_dense, abar, picks, sinks, window, out_dense)
        ops.merge_spread(*pooled.pools, pos, abar, picks, sinks, window, out, slot_index=pooled.slot_index)
    assert torch.equal(out, out_dense) and torch.equal(pos, pos_dense)
    assert pooled.holds([dense], before)


@st.composite
def zip_inputs(draw):
    B, Hkv, C, D = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 30)), draw(st.integers(1, 40))
    n = draw(st.integers(0, 5))
    picks = draw(st.lists(st.integers(-1, Hkv * C - 1), min_size=B * n, max_size=B * n))  # repeats, empty slots too
    return (B, Hkv, C, D, torch.tensor(picks, dtype=torch.int64).view(B, n), draw(st.integers(0, 6)),
            draw(st.sampled_from([-1.0, 0.0, 0.3])), draw(st.booleans()), draw(st.integers(0, 10**6)))


def zip_operands(B, Hkv, C, D, dtype, zero_query, g):
    """k, v, logp (log votes of 1 to ~20), pos and the reference query of merge_zip; zero_query: one head's
    query 0 (q.q = 0: the key is not corrected). Query norms in [0.5, 1.5]: the key correction divides the
    logit's rounding by |q|, so a near-zero query would amplify fp32 rounding past any fixed floor."""
    k, v = randn((B, Hkv, C, D), dtype, "cpu", g), randn((B, Hkv, C, D), dtype, "cpu", g)
    logp = torch.rand(B, Hkv, C, generator=g) * 3
    q = torch.randn(B, Hkv, D, generator=g)
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-6) * (0.5 + torch.rand(B, Hkv, 1, generator=g))
    if zero_query:
        q[0, 0] = 0.0
    return k, v, logp, positions(B, Hkv, C, "holes", g), q




@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=60, deadline=None)
@given(inputs=zip_inputs())
def test_merge_zip(path, dtype, inputs):
    """Receivers as the fp64 loops (the most similar but for rounding), emptied positions exactly; keys, values
    and log votes as the loops' within the dtype's rounding of a chain of merges; every other row untouched;
    and each merge lossless for its query: the merged slot's votes x exp(logit) equal the two slots' sum."""
    B, Hkv, C, D, picks, sinks, min_similarity, zero_query, seed = inputs
    g = gen(seed)
    k, v, logp, pos, q = zip_operands(B, Hkv, C, D, dtype, zero_query, g)
    scale = 1 / math.sqrt(D)
    k0, v0, logp0 = k.clone(), v.clone(), logp.clone()
    out = torch.full_like(picks, 99)
    with on_path(path, "merge_zip", "cpu"):
        ops.merge_zip(k, v, logp, pos.clone(), q, picks, sinks, min_similarity, scale, out)
    truth_k, truth_v, truth_logp, truth_pos = brute_zip(k0, v0, logp0, pos, q, picks, sinks, min_similarity, scale, out,
                                                        ROUNDING_FLOOR[dtype])
    got_pos = pos.clone()
    with on_path(path, "merge_zip", "cpu"):  # again, for the positions (the call above wrote a copy)
        ops.merge_zip(k0.clone(), v0.clone(), logp0.clone(), got_pos, q, picks, sinks, min_similarity, scale,
                      torch.empty_like(picks))
    assert torch.equal(got_pos, truth_pos)
    received = torch.zeros(B, Hkv, C, dtype=torch.bool)
    for b, i in (out >= 0).nonzero().tolist():
        received[b, int(picks[b, i]) // C, out[b, i]] = True
    for got, was, truth in ((k, k0, truth_k), (v, v0, truth_v)):
        assert torch.equal(got[~received], was[~received])
        assert_within(got[received], truth[received], truth[received], "merged rows", floor=ROUNDING_FLOOR[dtype])
    assert torch.equal(logp[~received], logp0[~received])
    assert_within(logp[received], truth_logp[received], truth_logp[received], "log votes", floor=1e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_zip_is_lossless_for_its_query(path, dtype):
    """One merge per head, fresh votes: for the reference query the merged slot's attention mass
    exp(logp + scale q.k) is the two slots' sum, and its value their mass-weighted mean (fp32 keys; bf16
    within its rounding)."""
    g = gen(3)
    B, Hkv, C, D = 2, 3, 17, 64
    k, v, logp, pos, q = zip_operands(B, Hkv, C, D, dtype, False, g)
    pos = torch.arange(C, dtype=torch.int32).expand(B, Hkv, C).contiguous()
    scale = 1 / math.sqrt(D)
    picks = (torch.arange(Hkv) * C + 9).expand(B, Hkv).contiguous()
    mass = lambda kk, lp: (lp + scale * (kk.float() * q[..., None, :]).sum(-1)).exp()  # (B, Hkv, C)
    before_mass, before_v = mass(k, logp), v.float().clone()
    out = torch.empty_like(picks)
    with on_path(path, "merge_zip", "cpu"):
        ops.merge_zip(k, v, logp, pos, q, picks, 0, -1.0, scale, out)
    rows, heads = torch.arange(B)[:, None], torch.arange(Hkv)[None]
    c = out
    want_mass = before_mass[rows, heads, 9] + before_mass[rows, heads, c]
    want_v = (before_mass[rows, heads, 9, None] * before_v[rows, heads, 9]
              + before_mass[rows, heads, c, None] * before_v[rows, heads, c]) / want_mass[..., None]
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(mass(k, logp)[rows, heads, c], want_mass, rtol=tol, atol=0)
    torch.testing.assert_close(v.float()[rows, heads, c], want_v, rtol=tol, atol=tol)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=30, deadline=None)
@given(inputs=zip_inputs(), layers=st.integers(1, 3))
def test_merge_zip_in_a_pool(path, dtype, inputs, layers):
    """With slot_index: the same bits as over per-head rows, every other pool row untouched."""
    B, Hkv, C, D, picks, sinks, min_similarity, zero_query, seed = inputs
    g = gen(seed)
    k, v, logp, pos, q = zip_operands(B, Hkv, C, D, dtype, zero_query, g)
    pooled = Pooled.of([k, v], layers, g)
    before, logp_pool, pos_pool = [t.clone() for t in pooled.pools], logp.clone(), pos.clone()
    out_dense, out = torch.empty_like(picks), torch.full_like(picks, 99)
    with on_path(path, "merge_zip", "cpu"):
        ops.merge_zip(k, v, logp, pos, q, picks, sinks, min_similarity, 1 / math.sqrt(D), out_dense)
        ops.merge_zip(*pooled.pools, logp_pool, pos_pool, q, picks, sinks, min_similarity, 1 / math.sqrt(D), out,
                      slot_index=pooled.slot_index)
    assert torch.equal(out, out_dense) and torch.equal(pos_pool, pos) and torch.equal(logp_pool, logp)
    assert pooled.holds([k, v], before)


@st.composite
def nearest_key_inputs(draw):
    B, Hkv, C, D = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 40)), draw(st.integers(1, 70))
    victim = torch.tensor(draw(st.lists(st.integers(-1, C - 1), min_size=B * Hkv, max_size=B * Hkv))).view(B, Hkv)
    return victim, C, D, draw(st.integers(0, 6)), draw(st.integers(0, 10**6))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=60, deadline=None)
@given(inputs=nearest_key_inputs())
def test_nearest_key(path, dtype, inputs):
    victim, C, D, sinks, seed = inputs
    B, Hkv = victim.shape
    g = gen(seed)
    k, pos = keys_with_ties(B, Hkv, C, D, dtype, g), positions(B, Hkv, C, "holes", g)
    receiver, similarity = torch.full((B, Hkv), 99), torch.full((B, Hkv), float("nan"))
    with on_path(path, "nearest_key", "cpu"):
        ops.nearest_key(k, pos, victim, sinks, receiver, similarity)
    assert_nearest(k, pos, victim, sinks, receiver, similarity)


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=30, deadline=None)
@given(inputs=nearest_key_inputs(), layers=st.integers(1, 3))
def test_nearest_key_in_a_pool(path, inputs, layers):
    """With slot_index: the same bits as over per-head rows."""
    victim, C, D, sinks, seed = inputs
    B, Hkv = victim.shape
    g = gen(seed)
    dense, pos = keys_with_ties(B, Hkv, C, D, torch.float32, g), positions(B, Hkv, C, "holes", g)
    pooled = Pooled.of([dense], layers, g)
    want = torch.empty(B, Hkv, dtype=torch.int64), torch.empty(B, Hkv)
    got = torch.full((B, Hkv), 99), torch.full((B, Hkv), float("nan"))
    with on_path(path, "nearest_key", "cpu"):
        ops.nearest_key(dense, pos, victim, sinks, *want)
        ops.nearest_key(*pooled.pools, pos, victim, sinks, *got, slot_index=pooled.slot_index)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---------------------------------------------------------------------------------------------
# opcheck: schemas, fake impls, autograd registration, AOT dispatch
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not ops.HAVE_EXTENSION, reason="engine._C not built")
@pytest.mark.parametrize("op,args", list(opcheck_cases()), ids=lambda x: x if isinstance(x, str) else "")
def test_opcheck(op, args):
    torch.library.opcheck(getattr(torch.ops.engine, op), args)


def _copied(args: tuple) -> tuple:
    """Args with every tensor cloned: both calls start from the same bits and write their own copies."""

    def copy(a):
        return a.clone() if isinstance(a, torch.Tensor) else [copy(t) for t in a] if isinstance(a, list) else a

    return tuple(copy(a) for a in args)


@pytest.mark.skipif(not ops.HAVE_EXTENSION, reason="engine._C not built")
@pytest.mark.parametrize("op,args", list(opcheck_cases()), ids=lambda x: x if isinstance(x, str) else "")
def test_direct_binding_equals_dispatched_op(op, args):
    """engine.ops calls CPU kernels through engine._C.cpu, not the dispatcher: same outputs, bit for bit,
    every argument (the written ones included), and torch.profiler sees the call under the op's name."""
    from torch.profiler import profile

    from engine import _C

    schema = getattr(torch.ops.engine, op).default._schema  # the binding takes every argument, defaults too
    args = (*args, *(a.default_value for a in schema.arguments[len(args):]))
    direct, dispatched = _copied(args), _copied(args)
    with profile() as prof:
        got = getattr(_C.cpu, op)(*direct)
    want = getattr(torch.ops.engine, op).default(*dispatched)
    assert f"engine::{op}" in {e.key for e in prof.key_averages()}
    for a, b in zip((got, *direct), (want, *dispatched)):
        for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            if isinstance(x, torch.Tensor):  # slots an op leaves alone keep the clone's bits, NaN or not
                torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
            else:
                assert x == y


# ---------------------------------------------------------------------------------------------
# Input validation: both paths raise the same exception with the same message
# ---------------------------------------------------------------------------------------------

def _valid_args():
    """Valid arguments of every op (fresh tensors each call)."""
    B, H, Hkv, C, D, L = 1, 6, 3, 8, 16, 4
    f32, i32, i64 = torch.float32, torch.int32, torch.int64
    cache = lambda: torch.zeros(B, Hkv, C, D)
    pos = lambda: torch.arange(C, dtype=i32).expand(B, Hkv, C).contiguous()
    return {
        "rms_norm": dict(x=torch.ones(2, D), weight=torch.ones(D), eps=1e-6),
        "decode_attention": dict(q=torch.zeros(B, H, D), k=cache(), v=cache(), pos=pos(), length=C, scale=1.0,
                                 out=torch.zeros(B, H, D), score_acc=torch.zeros(B, Hkv, C),
                                 probs_out=torch.zeros(B, H, C), rope=(torch.zeros(20, D), torch.zeros(20, D), pos())),
        "prefill_attention": dict(q=torch.zeros(B, H, L, D), k=cache(), v=cache(),
                                  qpos=torch.arange(L, dtype=i32)[None].contiguous(), kpos=pos(), scale=1.0,
                                  out=torch.zeros(B, H, L, D), lse=torch.zeros(B, H, L),
                                  col_scores=torch.zeros(B, Hkv, C), score_rows=0, score_scale=1.0),
        "value_norm": dict(v=cache(), kind=1, out=torch.zeros(B, Hkv, C)),
        "rope_append": dict(qkv=torch.zeros(B, (H + 2 * Hkv) * D), cos=torch.ones(D), sin=torch.zeros(D),
                            slot=torch.arange(Hkv).expand(B, Hkv).contiguous(), rotate_key=True,
                            q_out=torch.zeros(B, H, D), k_cache=cache(), v_cache=cache()),
        "select_victim": dict(score=torch.zeros(B, Hkv, C), pos=pos(), lo=0, hi=C,
                              out_idx=torch.zeros(B, Hkv, dtype=i64)),
        "compact": dict(k=cache(), v=cache(), pos=pos(), state=[torch.zeros(B, Hkv, C, dtype=f32)],
                        keep_idx=torch.arange(5).expand(B, Hkv, 5).contiguous()),
        "merge_value": dict(v=cache(), w=torch.zeros(B, Hkv, C), victim=torch.zeros(B, Hkv, dtype=i64),
                            receiver=torch.ones(B, Hkv, dtype=i64), weight=torch.ones(B, Hkv)),
        "merge_neighbour": dict(v=cache(), w=torch.zeros(B, Hkv, C), pos=pos(), abar=torch.ones(B, Hkv, C),
                                picks=torch.tensor([[0, C + 1, -1]]), sinks=0, after=True,
                                receiver_out=torch.zeros(B, 3, dtype=i64)),
        "remove_entries": dict(pos=pos(), state=[torch.zeros(B, Hkv, C)], slot_index=pos(),
                               entries=torch.tensor([[0, C + 1, -1]]), scratch=C, freed_out=torch.zeros(B, 3, dtype=i64)),
        "merge_zip": dict(k=cache(), v=cache(), logp=torch.zeros(B, Hkv, C), pos=pos(), q=torch.ones(B, Hkv, D),
                          picks=torch.tensor([[0, C + 1, -1]]), sinks=0, min_similarity=0.0, scale=0.25,
                          receiver_out=torch.zeros(B, 3, dtype=i64)),
        "merge_spread": dict(v=cache(), pos=pos(), abar=torch.ones(B, Hkv, C), picks=torch.tensor([[0, C + 1, -1]]),
                             sinks=0, window=3, receivers_out=torch.zeros(B, 3, dtype=i64)),
        "nearest_key": dict(k=cache(), pos=pos(), victim=torch.tensor([[0, -1, 2]]), sinks=0,
                            receiver_out=torch.zeros(B, Hkv, dtype=i64), similarity_out=torch.zeros(B, Hkv)),
        "adaptive_victims": dict(score=torch.zeros(B, Hkv, C), pos=pos(), lo=0, hi=torch.tensor([30]), min_share=2,
                                 limit=torch.tensor([1]), out_entry=torch.zeros(B, Hkv, dtype=i64)),
    }


def _noncontig(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t.repeat(2)[::2]


BAD_INPUTS = [  # op, argument ("*": all of them), corruption, exception, message fragment
    ("rms_norm", "weight", lambda t: t.double(), TypeError, "rms_norm: weight must be float32, got float64"),
    ("rms_norm", "x", lambda t: t.t(), ValueError, "rms_norm: x must be contiguous [..., dim]"),
    ("rms_norm", "weight", lambda t: t[:-1], ValueError, "rms_norm: weight must have shape [dim] = [16], got [15]"),
    ("rms_norm", "eps", lambda e: -1.0, ValueError, "rms_norm: eps must be >= 0"),
    ("decode_attention", "k", _noncontig, ValueError, "decode_attention: k must be contiguous [B, H_kv, C, D], got"),
    ("decode_attention", "pos", lambda t: t.long(), TypeError, "decode_attention: pos must be int32, got int64"),
    ("decode_attention", "q", lambda t: torch.zeros(1, 7, 16), ValueError, "H_kv=3 must be >= 1 and divide H=7"),
    ("decode_attention", "q", lambda t: t.half(), TypeError, "decode_attention: q must be float32, got float16"),
    ("decode_attention", "v", lambda t: t[:, :, :7].contiguous(), ValueError,
     "decode_attention: v must have shape [B, H_kv, C, D] = [1, 3, 8, 16], got [1, 3, 7, 16]"),
    ("decode_attention", "length", lambda n: 0, ValueError, "decode_attention: length must be in [1, C] = [1, 8], got 0"),
    ("decode_attention", "length", lambda n: 9, ValueError, "length must be in [1, C] = [1, 8], got 9"),
    ("decode_attention", "out", lambda t: t.bfloat16(), TypeError, "decode_attention: out must be float32, got bfloat16"),
    ("decode_attention", "score_acc", lambda t: t.double(), TypeError, "score_acc must be float32, got float64"),
    ("decode_attention", "probs_out", lambda t: t[:, :5].contiguous(), ValueError,
     "probs_out must have shape [B, H, C] = [1, 6, 8], got [1, 5, 8]"),
    ("decode_attention", "*", lambda a: {**a, "q": torch.zeros(1, 6, 300), "k": torch.zeros(1, 3, 8, 300),
                                         "v": torch.zeros(1, 3, 8, 300)},
     ValueError, "decode_attention: head dim D must be in [1, 256], got 300"),
    ("decode_attention", "rope", lambda r: (r[0], r[1], None), ValueError,
     "decode_attention: rope_cos, rope_sin and rope_rank go together, got 2 of the 3"),
    ("decode_attention", "rope", lambda r: (r[0], r[1][:5].contiguous(), r[2]), ValueError,
     "decode_attention: rope_sin must have shape [P, D] = [20, 16], got [5, 16]"),
    ("decode_attention", "rope", lambda r: (r[0].double(), r[1], r[2]), TypeError,
     "decode_attention: rope_cos must be float32, got float64"),
    ("decode_attention", "rope", lambda r: (r[0], r[1], r[2].long()), TypeError,
     "decode_attention: rope_rank must be int32, got int64"),
    ("decode_attention", "rope", lambda r: (r[0], r[1], r[2] + 15), IndexError,
     "decode_attention: rope_rank must hold table rows in [0, P) = [0, 20) on valid slots, got 20 at [0, 0, 5]"),
    ("decode_attention", "*", lambda a: {**a, "q": torch.zeros(1, 6, 15), "k": torch.zeros(1, 3, 8, 15),
                                         "v": torch.zeros(1, 3, 8, 15), "out": torch.zeros(1, 6, 15),
                                         "rope": (torch.zeros(20, 15), torch.zeros(20, 15), a["rope"][2])},
     ValueError, "decode_attention: rope needs an even head dim D, got 15"),
    ("prefill_attention", "qpos", lambda t: t[:, :3].contiguous(), ValueError,
     "prefill_attention: qpos must have shape [B, L] = [1, 4], got [1, 3]"),
    ("prefill_attention", "lse", lambda t: t.half(), TypeError, "prefill_attention: lse must be float32, got float16"),
    ("prefill_attention", "col_scores", _noncontig, ValueError, "col_scores must be contiguous [B, H_kv, S]"),
    ("prefill_attention", "kpos", lambda t: t.float(), TypeError, "kpos must be int32, got float32"),
    ("rope_append", "qkv", lambda t: t[:, :-16].contiguous(), ValueError,
     "rope_append: qkv must have shape [B, (H + 2 H_kv) D] = [1, 192], got [1, 176]"),
    ("rope_append", "sin", lambda t: t.double(), TypeError, "rope_append: sin must be float32, got float64"),
    ("rope_append", "slot", lambda t: t.int(), TypeError, "rope_append: slot must be int64, got int32"),
    ("rope_append", "slot", lambda t: t + 6, IndexError,
     "rope_append: slot must hold slot indices in [0, C) = [0, 8), got 8 at [0, 2]"),
    ("rope_append", "q_out", lambda t: t.half(), TypeError, "rope_append: q_out must be float32, got float16"),
    ("rope_append", "*", lambda a: {**a, "qkv": torch.zeros(1, 180), "cos": torch.ones(15), "sin": torch.zeros(15),
                                    "q_out": torch.zeros(1, 6, 15), "k_cache": torch.zeros(1, 3, 8, 15),
                                    "v_cache": torch.zeros(1, 3, 8, 15)},
     ValueError, "rope_append: rope needs an even head dim D, got 15"),
    ("value_norm", "kind", lambda n: 3, ValueError, "value_norm: kind must be 0 (Linf), 1 (L1) or 2 (squared L2), got 3"),
    ("value_norm", "out", lambda t: t[:, :2].contiguous(), ValueError, "value_norm: out must have shape [B, H_kv, N]"),
    ("value_norm", "v", lambda t: t.int(), TypeError, "value_norm: v must be float32 or bfloat16 or float16, got int32"),
    ("select_victim", "pos", lambda t: t.long(), TypeError, "select_victim: pos must be int32, got int64"),
    ("select_victim", "out_idx", lambda t: t[:, :1].contiguous(), ValueError, "out_idx must have shape [B, H_kv] = [1, 3]"),
    ("compact", "keep_idx", lambda t: t + 4, IndexError,
     "compact: keep_idx must hold distinct slot indices in [0, 8), got 8 at [0, 0, 4]"),
    ("compact", "keep_idx", lambda t: t.clamp(max=3), IndexError,
     "compact: keep_idx must hold distinct slot indices in [0, 8), got 3 at [0, 0, 4]"),
    ("compact", "keep_idx", lambda t: torch.arange(9).expand(1, 3, 9).contiguous(), ValueError,
     "compact: keep_idx must keep at most C=8 slots, got K=9"),
    ("compact", "state", lambda s: [s[0], s[0].double()], TypeError, "compact: state[1] must be float32, got float64"),
    ("merge_value", "receiver", lambda t: t + 7, IndexError,
     "merge_value: receiver must hold slot indices in [-1, 8), got 8 at [0, 0]"),
    ("merge_value", "victim", lambda t: t.int(), TypeError, "merge_value: victim must be int64, got int32"),
    ("merge_value", "w", lambda t: torch.zeros(1, 3, 8, device="meta"), ValueError,
     "merge_value: w must be on cpu like v, got meta"),
    ("merge_value", "*", lambda a: {**a, **_pooled(slot_row=9)}, IndexError,
     "merge_value: slot_index must hold pool rows in [0, R) = [0, 9) on the merged slots, got 9 at [0, 0, 1]"),
    ("merge_value", "*", lambda a: {**a, **_pooled(P=2)}, ValueError,
     "merge_value: slot_index's B=1 must be a multiple of the pool's P=2"),
    ("merge_value", "*", lambda a: {**a, **_pooled(), "slot_index": _pooled()["slot_index"].long()}, TypeError,
     "merge_value: slot_index must be int32, got int64"),
    ("merge_neighbour", "picks", lambda t: t + 24, IndexError,
     "merge_neighbour: picks must hold entries (head C + slot) in [-1, 24), got 24 at [0, 0]"),
    ("merge_neighbour", "picks", lambda t: t.int(), TypeError, "merge_neighbour: picks must be int64, got int32"),
    ("merge_neighbour", "pos", lambda t: t.long(), TypeError, "merge_neighbour: pos must be int32, got int64"),
    ("merge_neighbour", "abar", lambda t: t.half(), TypeError, "merge_neighbour: abar must be float32, got float16"),
    ("merge_neighbour", "receiver_out", lambda t: t[:, :2].contiguous(), ValueError,
     "merge_neighbour: receiver_out must have shape [B, n] = [1, 3], got [1, 2]"),
    ("merge_neighbour", "sinks", lambda n: -1, ValueError, "merge_neighbour: sinks must be >= 0, got -1"),
    ("merge_neighbour", "*", lambda a: {**a, **_pooled(slot_row=9)}, IndexError,
     "merge_neighbour: slot_index must hold pool rows in [0, R) = [0, 9) on the merged slots, got 9 at [0, 0, 1]"),
    ("merge_neighbour", "*", lambda a: {**a, **_pooled(P=2)}, ValueError,
     "merge_neighbour: slot_index's B=1 must be a multiple of the pool's P=2"),
    ("nearest_key", "victim", lambda t: t + 8, IndexError,
     "nearest_key: victim must hold slot indices in [-1, 8), got 8 at [0, 0]"),
    ("nearest_key", "victim", lambda t: t.int(), TypeError, "nearest_key: victim must be int64, got int32"),
    ("nearest_key", "similarity_out", lambda t: t.double(), TypeError,
     "nearest_key: similarity_out must be float32, got float64"),
    ("nearest_key", "receiver_out", lambda t: t[:, :2].contiguous(), ValueError,
     "nearest_key: receiver_out must have shape [B, H_kv] = [1, 3], got [1, 2]"),
    ("remove_entries", "entries", lambda t: t - 1, IndexError,
     "remove_entries: entries must hold entries (head C + slot) in [-1, 24), got -2 at [0, 2]"),
    ("remove_entries", "state", lambda ts: [ts[0].double()], TypeError,
     "remove_entries: state[0] must be float32, got float64"),
    ("remove_entries", "slot_index", lambda t: t[:, :2].contiguous(), ValueError,
     "remove_entries: slot_index must have shape [B, H_kv, C] = [1, 3, 8], got [1, 2, 8]"),
    ("remove_entries", "freed_out", lambda t: t[:, :2].contiguous(), ValueError,
     "remove_entries: freed_out must have shape [B, n] = [1, 3], got [1, 2]"),
    ("remove_entries", "scratch", lambda n: -1, ValueError, "remove_entries: scratch must be a pool row >= 0, got -1"),
    ("merge_zip", "picks", lambda t: t + 30, IndexError,
     "merge_zip: picks must hold entries (head C + slot) in [-1, 24), got 30 at [0, 0]"),
    ("merge_zip", "v", lambda t: t[:, :2].contiguous(), ValueError,
     "merge_zip: v must have shape [B, H_kv, C, D] = [1, 3, 8, 16], got [1, 2, 8, 16]"),
    ("merge_zip", "v", lambda t: t.half(), TypeError, "merge_zip: v must be float32, got float16"),
    ("merge_zip", "logp", lambda t: t.double(), TypeError, "merge_zip: logp must be float32, got float64"),
    ("merge_zip", "q", lambda t: t[..., :8].contiguous(), ValueError,
     "merge_zip: q must have shape [B, H_kv, D] = [1, 3, 16], got [1, 3, 8]"),
    ("merge_zip", "q", lambda t: t.half(), TypeError, "merge_zip: q must be float32, got float16"),
    ("merge_zip", "min_similarity", lambda x: 1.5, ValueError, "merge_zip: min_similarity must be in [-1, 1], got 1.5"),
    ("merge_zip", "scale", lambda x: 0.0, ValueError, "merge_zip: scale must be a finite number > 0, got 0"),
    ("merge_zip", "scale", lambda x: math.inf, ValueError, "merge_zip: scale must be a finite number > 0, got inf"),
    ("merge_zip", "sinks", lambda n: -1, ValueError, "merge_zip: sinks must be >= 0, got -1"),
    ("merge_zip", "*", lambda a: {**a, "k": _pooled()["v"], "v": _pooled()["v"],
                                  "slot_index": _pooled(slot_row=9)["slot_index"]}, IndexError,
     "merge_zip: slot_index must hold pool rows in [0, R) = [0, 9) on the compared slots, got 9 at [0, 0, 1]"),
    ("merge_spread", "picks", lambda t: t - 2, IndexError,
     "merge_spread: picks must hold entries (head C + slot) in [-1, 24), got -2 at [0, 0]"),
    ("merge_spread", "v", lambda t: t.double(), TypeError, "merge_spread: v must be float32 or bfloat16 or float16, got float64"),
    ("merge_spread", "abar", lambda t: t[:, :, :5].contiguous(), ValueError,
     "merge_spread: abar must have shape [B, H_kv, C] = [1, 3, 8], got [1, 3, 5]"),
    ("merge_spread", "receivers_out", lambda t: t.int(), TypeError, "merge_spread: receivers_out must be int64"),
    ("merge_spread", "window", lambda n: 0, ValueError, "merge_spread: window must be >= 1, got 0"),
    ("merge_spread", "sinks", lambda n: -1, ValueError, "merge_spread: sinks must be >= 0, got -1"),
    ("merge_spread", "*", lambda a: {**a, **_pooled(slot_row=9)}, IndexError,
     "merge_spread: slot_index must hold pool rows in [0, R) = [0, 9) on the merged slots, got 9 at [0, 0, 1]"),
    ("nearest_key", "sinks", lambda n: -2, ValueError, "nearest_key: sinks must be >= 0, got -2"),
    ("nearest_key", "*", lambda a: {**a, "k": _pooled()["v"], "slot_index": _pooled(slot_row=9)["slot_index"]},
     IndexError, "nearest_key: slot_index must hold pool rows in [0, R) = [0, 9) on the compared slots, got 9 at "
     "[0, 0, 1]"),
    ("nearest_key", "*", lambda a: {**a, "k": _pooled(P=2)["v"], "slot_index": _pooled()["slot_index"]}, ValueError,
     "nearest_key: slot_index's B=1 must be a multiple of the pool's P=2"),
    ("adaptive_victims", "hi", lambda t: t.int(), TypeError, "adaptive_victims: hi must be int64, got int32"),
    ("adaptive_victims", "limit", lambda t: t.repeat(2), ValueError,
     "adaptive_victims: limit must have shape [B] = [1], got [2]"),
]


def _pooled(P: int = 1, slot_row: int | None = None) -> dict:
    """merge_value's and merge_neighbour's pooled operands over _valid_args' slots (B 1, H_kv 3, C 8, D 16): a
    pool [P, 9, D] and each head's slots at rows 0..7; slot_row replaces the row of head 0's receiver (slot 1)."""
    index = torch.arange(8, dtype=torch.int32).expand(1, 3, 8).contiguous()
    if slot_row is not None:
        index[0, 0, 1] = slot_row
    return dict(v=torch.zeros(P, 9, 16), slot_index=index)



def _raise(path: str, op: str, args: dict) -> BaseException:
    with on_path(path, op, "cpu"), pytest.raises(Exception) as info:
        getattr(ops, op)(**args)
    return info.value


def assert_same_one_line_error(errors: dict, exc: type, message: str) -> None:
    """Every path raised `exc` with `message`, on one line, and all paths said exactly the same."""
    for path, err in errors.items():
        assert type(err) is exc, f"{path}: {type(err).__name__}: {err}"
        assert message in str(err), f"{path}: {err}"
        assert "\n" not in str(err).strip(), f"{path}: not one line: {err}"
    assert len({str(e) for e in errors.values()}) == 1, errors


@pytest.mark.parametrize("op,arg,corrupt,exc,message", BAD_INPUTS, ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_same_error_on_both_paths(op, arg, corrupt, exc, message):
    errors = {}
    for path in PATHS:
        if path == "compiled" and not ops.HAVE_EXTENSION:
            continue
        args = _valid_args()[op]
        if arg == "*":
            args = corrupt(args)
        else:
            args[arg] = corrupt(args[arg])
        errors[path] = _raise(path, op, args)
    assert_same_one_line_error(errors, exc, message)


@pytest.mark.parametrize("path", PATHS)
def test_valid_args_are_accepted(path):
    """The base of BAD_INPUTS is itself valid, so each bad case fails for the corruption alone."""
    for op, args in _valid_args().items():
        with on_path(path, op, "cpu"):
            getattr(ops, op)(**args)


# ---------------------------------------------------------------------------------------------
# Path selection in engine.ops
# ---------------------------------------------------------------------------------------------

def _spy(monkeypatch, name: str) -> list:
    calls: list = []
    real = getattr(ref, name)
    monkeypatch.setattr(ref, name, lambda *a: calls.append(1) or real(*a))
    return calls


def test_env_selects_reference_without_warning():
    """ENGINE_REFERENCE=1 at start-up (read once, at import): a fresh interpreter with it set."""
    code = textwrap.dedent("""
        import warnings, torch
        from engine import ops, reference
        calls = []
        real = reference.rms_norm
        reference.rms_norm = lambda *a: calls.append(1) or real(*a)
        warnings.simplefilter("error")
        ops.rms_norm(torch.ones(2, 8), torch.ones(8), 1e-6)
        assert ops.REFERENCE_BY_ENV and calls == [1], calls
    """)
    env = {**os.environ, "ENGINE_REFERENCE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(not ops.HAVE_EXTENSION or ops.REFERENCE_BY_ENV, reason="needs the compiled default")
def test_env_selection_is_read_at_import(monkeypatch):
    """Setting the variable later changes nothing: the choice is made once, not per op call."""
    calls = _spy(monkeypatch, "rms_norm")
    monkeypatch.setenv("ENGINE_REFERENCE", "1")
    ops.rms_norm(torch.ones(2, 8), torch.ones(8), 1e-6)
    assert calls == []


@pytest.mark.skipif(not ops.HAVE_EXTENSION, reason="engine._C not built")
def test_compiled_is_the_default(monkeypatch):
    calls = _spy(monkeypatch, "rms_norm")
    monkeypatch.delenv("ENGINE_REFERENCE", raising=False)
    ops.rms_norm(torch.ones(2, 8), torch.ones(8), 1e-6)
    assert calls == []
    with ops.use_reference():
        ops.rms_norm(torch.ones(2, 8), torch.ones(8), 1e-6)
    assert calls == [1]


def test_missing_extension_warns_once(monkeypatch):
    calls = _spy(monkeypatch, "rms_norm")
    monkeypatch.delenv("ENGINE_REFERENCE", raising=False)
    monkeypatch.setattr(ops, "HAVE_EXTENSION", False)
    ops._warn_fallback.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            ops.rms_norm(torch.ones(2, 8), torch.ones(8), 1e-6)
    ops._warn_fallback.cache_clear()
    assert calls == [1, 1, 1]
    assert len(caught) == 1 and "engine._C is not built" in str(caught[0].message)
    with pytest.raises(RuntimeError, match="cannot be forced"), ops.use_reference(False):
        pass


# ---------------------------------------------------------------------------------------------
# matvec (its reference is F.linear) and ops.linear, the projection of the model
# ---------------------------------------------------------------------------------------------

MATVEC_SHAPES = [  # x's leading dims (M rows), N, K: K past whole 32-element steps by 16, 8 and a scalar tail
    ((1,), 37, 147),
    ((2,), 31, 64),
    ((3, 1), 129, 77),
    ((5,), 17, 56),
    ((8,), 61, 576),
    ((3,), 2051, 264),  # several 256 KB chunks of w, the last one partial
    ((11,), 700, 200),  # two passes over each chunk: 8 rows of x, then 3
    ((), 5, 7),  # x [K], K below one vector
    ((3,), 4, 0),  # K = 0: out must still be written (zeros)
    ((0, 2), 6, 8),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,N,K", MATVEC_SHAPES)
def test_matvec(device, path, dtype, lead, N, K):
    g = gen(60)
    x, w = randn((*lead, K), dtype, device, g), randn((N, K), dtype, device, g)
    out = poisoned((*lead, N), dtype, device)
    with on_path(path, "matvec", device):
        ops.matvec(x, w, out)
    assert_within(out, F.linear(x.double(), w.double()), F.linear(x, w), "matvec")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,N,K", [((1,), 37, 147), ((3, 1), 129, 77), ((11,), 700, 200), ((1,), 1283, 576)])
def test_matvec_accumulate(device, path, dtype, lead, N, K):
    """accumulate=True adds the product into out: the bits of out.add_(F.linear(x, w)), the product
    rounded to out's dtype before the add (every slot compared, none left unwritten)."""
    g = gen(64)
    x, w, base = randn((*lead, K), dtype, device, g), randn((N, K), dtype, device, g), randn((*lead, N), dtype, device, g)
    out = base.clone()
    with on_path(path, "matvec", device):
        ops.matvec(x, w, out, accumulate=True)
    product = torch.empty_like(base)
    with on_path(path, "matvec", device):
        ops.matvec(x, w, product)
    assert torch.equal(out, base + product)  # the same product, rounded once, then one rounded add
    assert_within(out, base.double() + F.linear(x.double(), w.double()), base + F.linear(x, w), "matvec accumulate")


PROLOGUE_SHAPES = [((1,), 37, 147), ((3, 1), 129, 77), ((11,), 700, 200), ((1,), 1283, 576), ((2,), 9, 5),
                   ((3,), 4, 0), ((0, 2), 6, 8)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,N,K", PROLOGUE_SHAPES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_matvec_norm_prologue(device, path, dtype, lead, N, K, accumulate):
    """With `norm`, the product of rms_norm(x): the bits of ops.rms_norm then ops.matvec on the same path
    (the normalised row is the same either way), within 2x PyTorch's error of the fp64 truth."""
    g = gen(65)
    x, w, norm = randn((*lead, K), dtype, device, g), randn((N, K), dtype, device, g), randn((K,), dtype, device, g)
    base = randn((*lead, N), dtype, device, g)
    out = base.clone() if accumulate else poisoned((*lead, N), dtype, device)
    want = base.clone() if accumulate else torch.empty_like(out)
    with on_path(path, "matvec", device):
        ops.matvec(x, w, out, accumulate, norm=norm, eps=1e-5)
        ops.matvec(ops.rms_norm(x, norm, 1e-5), w, want, accumulate)
    assert torch.equal(out, want)
    xd = x.double()
    h = norm.double() * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)
    offset = base.double() if accumulate else 0
    assert_within(out, offset + F.linear(h, w.double()), want, "matvec norm")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,N,K", PROLOGUE_SHAPES)
def test_matvec_swiglu_prologue(device, path, dtype, lead, N, K):
    """With `swiglu`, the product of silu(x[..., :K]) * x[..., K:]: within 2x PyTorch's error of fp64."""
    g = gen(66)
    x, w = randn((*lead, 2 * K), dtype, device, g, scale=4.0), randn((N, K), dtype, device, g)
    out = poisoned((*lead, N), dtype, device)
    with on_path(path, "matvec", device):
        ops.matvec(x, w, out, swiglu=True)
    gate, up = x.chunk(2, dim=-1)
    truth = F.linear(F.silu(gate.double()) * up.double(), w.double())
    assert_within(out, truth, F.linear(F.silu(gate) * up, w), "matvec swiglu")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matvec_swiglu_prologue_elementwise(path, dtype):
    """The prologue itself, seen through an identity w (each output is one input element): within two
    ulps of F.silu(a) * b; exact at silu's limits (0, huge of either sign, inf, NaN: one element per call,
    as an identity row would multiply a non-finite neighbour by 0)."""
    K = 203
    gate = torch.linspace(-30, 30, K, dtype=torch.float64).to(dtype)
    up = randn((K,), dtype, "cpu", gen(67))
    out = poisoned((K,), dtype, "cpu")
    with on_path(path, "matvec", "cpu"):
        ops.matvec(torch.cat([gate, up]), torch.eye(K, dtype=dtype), out, swiglu=True)
    torch.testing.assert_close(out, F.silu(gate) * up, rtol=2 * torch.finfo(dtype).eps, atol=1e-30)
    for a in (0.0, -0.0, -100.0, 100.0, float("inf"), -float("inf"), float("nan"), -90.0):
        x = torch.tensor([a, 1.5], dtype=dtype)
        one = poisoned((1,), dtype, "cpu")
        with on_path(path, "matvec", "cpu"):
            ops.matvec(x, torch.ones(1, 1, dtype=dtype), one, swiglu=True)
        torch.testing.assert_close(one, F.silu(x[:1]) * x[1:], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("path", PATHS)
def test_matvec_swiglu_propagates_through_residual(path):
    """accumulate with swiglu: the MLP's down projection added into the residual stream in place."""
    g = gen(68)
    x, w, base = randn((1, 1, 64), torch.float32, "cpu", g), randn((24, 32), torch.float32, "cpu", g), randn((1, 1, 24), torch.float32, "cpu", g)
    out = base.clone()
    product = poisoned((1, 1, 24), torch.float32, "cpu")
    with on_path(path, "matvec", "cpu"):
        ops.matvec(x, w, out, True, swiglu=True)
        ops.matvec(x, w, product, swiglu=True)
    assert torch.equal(out, base + product)


MATVEC_PROLOGUE_BAD_INPUTS = [  # extra arguments over _matvec_args, exception, message
    (dict(norm=torch.ones(12), swiglu=True), ValueError, "matvec: norm and swiglu cannot be combined"),
    (dict(swiglu=True), ValueError, "matvec: x must have shape [..., 2K] = [?, 24], got [3, 12]"),
    (dict(norm=torch.ones(11)), ValueError, "matvec: norm must have shape [K] = [12], got [11]"),
    (dict(norm=torch.ones(12).double()), TypeError, "matvec: norm must be float32, got float64"),
    (dict(norm=torch.ones(12, device="meta")), ValueError, "matvec: norm must be on cpu like w, got meta"),
    (dict(norm=torch.ones(12), eps=-1.0), ValueError, "matvec: eps must be >= 0"),
]


@pytest.mark.parametrize("extra,exc,message", MATVEC_PROLOGUE_BAD_INPUTS, ids=lambda x: x if isinstance(x, str) else "")
def test_matvec_prologue_bad_input_same_error_on_both_paths(extra, exc, message):
    errors = {path: _raise(path, "matvec", {**_matvec_args(), **extra}) for path in PATHS
              if path == "reference" or ops.HAVE_EXTENSION}
    assert_same_one_line_error(errors, exc, message)


@pytest.mark.parametrize("path", PATHS)
def test_matvec_out_overlapping_an_input_is_refused(path):
    """out is written while x and w are read: a view into either is a clear error on both paths."""
    x, w = torch.zeros(3, 12), torch.zeros(5, 12)
    for args in (dict(x=x, w=w, out=x.view(-1)[:15].view(3, 5)), dict(x=x, w=w, out=w.view(-1)[45:].view(3, 5))):
        assert_same_one_line_error({path: _raise(path, "matvec", args)}, ValueError,
                                   "matvec: out must not overlap x or w")


@pytest.mark.parametrize("threads", [2, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matvec_split_over_threads(threads, dtype):
    """Matrices past the size where threads share the chunks (a decode step's projections), chunks that
    do not divide evenly among the threads, two passes of x rows, more threads than the matrix has
    shares for (capped)."""
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for lead, N, K in [((1,), 1283, 576), ((10,), 3001, 200)]:
            g = gen(61)
            x, w = randn((*lead, K), dtype, "cpu", g), randn((N, K), dtype, "cpu", g)
            out = poisoned((*lead, N), dtype, "cpu")
            ops.matvec(x, w, out)
            assert_within(out, F.linear(x.double(), w.double()), F.linear(x, w), "matvec")
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("path", PATHS)
def test_matvec_propagates_nan_and_inf(path):
    x, w = torch.ones(2, 19), torch.ones(5, 19)
    w[1, 3], w[2, 17], w[3, 0] = float("nan"), float("inf"), -float("inf")  # in a vector, the tail, a vector
    out = poisoned((2, 5), torch.float32, "cpu")
    with on_path(path, "matvec", "cpu"):
        ops.matvec(x, w, out)
    torch.testing.assert_close(out, F.linear(x, w), equal_nan=True)


def _matvec_args() -> dict:
    return dict(x=torch.zeros(3, 12), w=torch.zeros(5, 12), out=torch.zeros(3, 5))


MATVEC_BAD_INPUTS = [  # argument, corruption, exception, message fragment
    ("w", lambda t: t.double(), TypeError, "matvec: w must be float32 or bfloat16 or float16, got float64"),
    ("w", lambda t: t[None], ValueError, "matvec: w must have shape [N, K] = [?, ?], got [1, 5, 12]"),
    ("w", _noncontig, ValueError, "matvec: w must be contiguous [N, K], got strides [1, 5]"),
    ("x", lambda t: t.bfloat16(), TypeError, "matvec: x must be float32, got bfloat16"),
    ("x", lambda t: t[:, :11], ValueError, "matvec: x must have shape [..., K] = [?, 12], got [3, 11]"),
    ("x", lambda t: t[0, 0], ValueError, "matvec: x must have shape [..., K] = [12], got []"),
    ("x", _noncontig, ValueError, "matvec: x must be contiguous [..., K], got strides [1, 3]"),
    ("out", lambda t: t.half(), TypeError, "matvec: out must be float32, got float16"),
    ("out", lambda t: t[:2], ValueError, "matvec: out must have shape [..., N] = [3, 5], got [2, 5]"),
    ("out", lambda t: t[:, None], ValueError, "matvec: out must have shape [..., N] = [3, 5], got [3, 1, 5]"),
    ("out", _noncontig, ValueError, "matvec: out must be contiguous [..., N], got strides [1, 3]"),
    ("out", lambda t: torch.zeros(3, 5, device="meta"), ValueError, "matvec: out must be on cpu like w, got meta"),
]


@pytest.mark.parametrize("arg,corrupt,exc,message", MATVEC_BAD_INPUTS, ids=lambda x: x if isinstance(x, str) else "")
def test_matvec_bad_input_same_error_on_both_paths(arg, corrupt, exc, message):
    errors = {}
    for path in PATHS:
        if path == "compiled" and not ops.HAVE_EXTENSION:
            continue
        args = _matvec_args()
        args[arg] = corrupt(args[arg])
        errors[path] = _raise(path, "matvec", args)
    assert_same_one_line_error(errors, exc, message)


@pytest.mark.parametrize("path", PATHS)
def test_matvec_valid_args_are_accepted(path):
    """The base of MATVEC_BAD_INPUTS is itself valid, so each bad case fails for the corruption alone."""
    with on_path(path, "matvec", "cpu"):
        ops.matvec(**_matvec_args())


@pytest.mark.skipif(not ops.HAVE_EXTENSION, reason="engine._C not built")
@pytest.mark.parametrize("dtype", DTYPES)
def test_matvec_opcheck(dtype):
    g = gen(62)
    args = (randn((3, 21), dtype, "cpu", g), randn((10, 21), dtype, "cpu", g), torch.empty(3, 10, dtype=dtype))
    torch.library.opcheck(torch.ops.engine.matvec, args)
    torch.library.opcheck(torch.ops.engine.matvec, (*args, True))
    torch.library.opcheck(torch.ops.engine.matvec, (*args, False, randn((21,), dtype, "cpu", g), 1e-6))
    x2 = randn((3, 42), dtype, "cpu", g)
    torch.library.opcheck(torch.ops.engine.matvec, (x2, args[1], args[2], True, None, 0.0, True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 40), (3, 1, 40), (40,), (2, 4, 40), (3, 3, 40)])
@pytest.mark.parametrize("add", [False, True])
def test_linear_sends_decode_rows_to_matvec(monkeypatch, device, dtype, shape, add):
    """At most MATVEC_MAX_ROWS rows in MATVEC_DTYPES go through matvec where engine._C has it (CPU),
    the rest (prompts, fp16, CUDA) through F.linear, and either way the result is F.linear's (added
    into `add_to` in place, when given), with no fallback warning."""
    calls = []
    real = ops._impl
    monkeypatch.setattr(ops, "_impl", lambda op, *a: calls.append(op) or real(op, *a))
    g = gen(63)
    x, w = randn(shape, dtype, device, g), randn((24, 40), dtype, device, g)
    base = randn((*shape[:-1], 24), dtype, device, g) if add else torch.zeros((), dtype=dtype, device=device)
    residual = base.clone() if add else None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = ops.linear(x, w, add_to=residual)
    small = math.prod(shape[:-1]) <= ops.MATVEC_MAX_ROWS and dtype in ops.MATVEC_DTYPES
    assert calls == (["matvec"] if small and ops.has_kernel("matvec", device) else [])
    assert y.shape == (*shape[:-1], 24) and y.dtype == dtype
    assert (y is residual) == add
    assert_within(y, base.double() + F.linear(x.double(), w.double()), base + F.linear(x, w), "linear")


@pytest.mark.skipif(not ops.HAVE_EXTENSION, reason="engine._C not built")
def test_model_through_ops_equals_reference(smollm):
    """The default model's prefill and teacher-forced decode steps (batch 3: matvec with 3 rows)
    give the same logits through the compiled ops as through the PyTorch reference path."""
    from engine.decode import decode_step
    from engine.generate import prefill

    ids = torch.randint(0, smollm.args.vocab_size, (3, 16), generator=gen(64))

    def run() -> torch.Tensor:
        store = smollm.new_store(12, 4, batch=3)
        logits = [prefill(smollm.model, store, ids[:, :12])]
        logits += [decode_step(smollm.model, store, ids[:, t]) for t in range(12, 16)]
        return torch.stack(logits)

    with ops.use_reference(False):
        got = run()
    with ops.use_reference():
        want = run()
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5

