"""The CUDA kernels (csrc/cuda) against the fp64 oracle in engine.reference; GPU only.

tests/test_ops.py runs its cases on cuda too; these add the shapes that reach each CUDA code path
(split-KV decode with many splits, groups of more than 8 query heads, the scalar-load fallback for
head dims or pointers that 16-byte loads do not fit, 16- and 32-key prefill tiles, more slots than
a block has threads), the exact ops on the device against the reference on the CPU, opcheck with
CUDA tensors, device-side index validation, and a decode step captured in a CUDA graph.
Same accuracy rule as test_ops: at most 2x the error of the same formula run by PyTorch in the
input precision, both against fp64; outputs are poisoned with NaN first.
"""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from engine import ops
from engine import reference as ref

from .helpers import (
    assert_nearest,
    assert_within,
    brute_neighbour, brute_remove, brute_spread,
    brute_victim,
    gen,
    keys_with_ties,
    on_path,
    opcheck_cases,
    poisoned,
    positions,
    prefill_inputs,
    randn,
)

pytestmark = pytest.mark.cuda

CUDA = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REPO = Path(__file__).resolve().parents[1]


def compiled(op: str):
    """Force the compiled CUDA kernel of `op` (skip when engine._C has none)."""
    return on_path("compiled", op, CUDA)


# ---------------------------------------------------------------------------------------------
# rms_norm
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4096), (3, 5, 129), (2, 8192), (7, 1), (0, 64)])
def test_rms_norm(dtype, shape):
    g = gen(11)
    x = randn(shape, dtype, CUDA, g, scale=3.0)
    w = randn(shape[-1:], dtype, CUDA, g)
    with compiled("rms_norm"):
        y = ops.rms_norm(x, w, 1e-6)
    assert y.dtype == dtype and y.shape == x.shape and y.device == x.device
    assert_within(y, ref.rms_norm_dense(x, w, 1e-6, torch.float64), ref.rms_norm(x, w, 1e-6), "rms_norm")


# ---------------------------------------------------------------------------------------------
# decode_attention
# ---------------------------------------------------------------------------------------------

DECODE_CASES = [  # B, H, Hkv, C, D, length, fill
    (1, 32, 32, 2048, 128, 2000, "holes"),  # MHA, many splits
    (1, 9, 3, 1500, 64, 1500, "all"),  # the default model's groups, several splits
    (3, 32, 4, 700, 128, 611, "holes"),  # groups of 8
    (2, 32, 8, 500, 128, 480, "holes"),  # groups of 4
    (1, 20, 4, 300, 64, 300, "holes"),  # groups of 5 in a block sized for 8
    (1, 16, 1, 1030, 64, 1030, "one"),  # a group of 16: two head blocks; one valid slot in 1030
    (1, 24, 1, 4096, 128, 4096, "holes"),  # a group of 24: three head blocks
    (3, 12, 4, 37, 80, 37, "empty_head"),  # D=80: 10 or 20 loads of 16 bytes per row; an empty head
    (2, 6, 2, 300, 37, 299, "holes"),  # D=37: scalar loads
    (1, 8, 8, 5, 256, 5, "all"),  # the largest head dim, a handful of slots
    (3, 4, 2, 1, 64, 1, "all"),  # a single slot
    (1, 12, 1, 2100, 8, 2100, "holes"),  # D=8: one or two lanes per slot row, 64- or 128-slot tiles
]


def decode_inputs(case, dtype, seed, q_dtype=None):
    B, H, Hkv, C, D, length, fill = case
    g = gen(seed)
    q = randn((B, H, D), q_dtype or dtype, CUDA, g)
    pos = positions(B, Hkv, C, fill, g).to(CUDA)
    masked = (ref._decode_kpos(pos, length) < 0)[..., None]
    k, v = (randn((B, Hkv, C, D), dtype, CUDA, g).masked_fill(masked, float("nan")) for _ in range(2))  # never read
    return q, k, v, pos


def check_decode(q, k, v, pos, length, scale, dtype, outputs="both"):
    """Runs the CUDA kernel with the requested optional outputs and checks everything it wrote."""
    B, H, D = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    acc0 = torch.rand((B, Hkv, C), generator=gen(length)).to(CUDA)
    out = poisoned((B, H, D), q.dtype, CUDA)
    acc = acc0.clone() if outputs in ("both", "score_acc") else None
    probs = poisoned((B, H, C), torch.float32, CUDA) if outputs in ("both", "probs") else None
    with compiled("decode_attention"):
        ops.decode_attention(q, k, v, pos, length, scale, out, acc, probs)

    o64, p64 = ref.decode_attention_dense(q, k, v, pos, length, scale, torch.float64)
    o_pt, p_pt = ref.decode_attention_dense(q, k, v, pos, length, scale, dtype)
    assert_within(out, o64, o_pt, "out")
    if probs is not None:
        assert_within(probs, p64, p_pt, "probs_out")
    if acc is not None:
        valid = (ref._decode_kpos(pos, length) >= 0).cpu()
        assert torch.equal(acc.cpu()[~valid], acc0.cpu()[~valid]), "score_acc changed on an invalid slot"
        assert_within(acc, acc0.double() + ref._group_mean(p64, Hkv), acc0.double() + ref._group_mean(p_pt, Hkv),
                      "score_acc")
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_decode_attention(dtype, case):
    q, k, v, pos = decode_inputs(case, dtype, seed=sum(case[:6]))
    out = check_decode(q, k, v, pos, case[5], 2.0 / math.sqrt(case[4]), dtype)
    if case[6] == "empty_head":
        G = case[1] // case[2]
        assert torch.equal(out[-1, -G:].cpu(), torch.zeros(G, case[4], dtype=dtype))


@pytest.mark.parametrize("outputs", ["none", "score_acc", "probs"])
@pytest.mark.parametrize("case", [(1, 9, 3, 1500, 64, 1500, "all"), (3, 12, 4, 37, 80, 37, "empty_head")],
                         ids=["splits", "one-split"])
def test_decode_attention_optional_outputs(outputs, case):
    """Without probabilities (one split: phase 1 writes out; several: the combine kernel does) and
    with score_acc alone (the raw logits go to a workspace instead of probs_out)."""
    q, k, v, pos = decode_inputs(case, torch.bfloat16, seed=21)
    check_decode(q, k, v, pos, case[5], 1.0 / math.sqrt(case[4]), torch.bfloat16, outputs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_attention_fp32_query(dtype):
    case = (2, 12, 3, 900, 128, 850, "holes")
    q, k, v, pos = decode_inputs(case, dtype, seed=22, q_dtype=torch.float32)
    out = check_decode(q, k, v, pos, case[5], 0.125, torch.float32)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_unaligned_cache(dtype):
    """A cache that starts one element into its buffer cannot take 16-byte loads: scalar fallback."""
    case = (2, 8, 2, 600, 64, 600, "holes")
    q, k, v, pos = decode_inputs(case, dtype, seed=23)

    def shifted(t: torch.Tensor) -> torch.Tensor:
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=CUDA)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        return view

    k, v = shifted(k), shifted(v)
    assert k.is_contiguous() and k.data_ptr() % 16 != 0
    check_decode(q, k, v, pos, case[5], 0.125, dtype)


# ---------------------------------------------------------------------------------------------
# prefill_attention
# ---------------------------------------------------------------------------------------------

PREFILL_CASES = [  # B, H, Hkv, L, S, D, layout
    (1, 8, 8, 100, 100, 128, "causal"),  # MHA, L not a multiple of the 16-row tile
    (2, 12, 4, 33, 161, 256, "chunk"),  # D=256: 16-key tiles
    (1, 9, 3, 70, 70, 64, "causal"),
    (3, 16, 2, 17, 90, 80, "blind"),  # groups of 8; rows that see nothing; an empty KV head
    (1, 4, 1, 1, 500, 37, "chunk"),  # one query row over many slots, odd head dim
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("score", [None, (0, 1.0), (5, 1.0), (7, 0.5)],
                         ids=["no-columns", "all-rows", "last-5", "own-scale"])
def test_prefill_attention(dtype, case, score):
    B, H, Hkv, L, S, D, _ = case
    q, k, v, qpos, kpos = prefill_inputs(case, dtype, CUDA, seed=L + S + D)
    scale = 1.0 / math.sqrt(D)
    score_rows, score_scale = (0, 1.0) if score is None else (score[0], score[1] * scale)
    out, lse = poisoned((B, H, L, D), dtype, CUDA), poisoned((B, H, L), torch.float32, CUDA)
    cols = None if score is None else poisoned((B, Hkv, S), torch.float32, CUDA)
    with compiled("prefill_attention"):
        ops.prefill_attention(q, k, v, qpos, kpos, scale, out, lse, cols, score_rows, score_scale)

    o64, lse64 = ref.prefill_attention_dense(q, k, v, qpos, kpos, scale, torch.float64)
    o_pt, lse_pt = ref.prefill_attention_dense(q, k, v, qpos, kpos, scale, dtype)
    assert_within(out, o64, o_pt, "out")
    assert_within(lse, lse64, lse_pt, "lse")
    if cols is not None:
        w = slice(L - score_rows if 0 < score_rows < L else 0, L)
        c64 = ref.column_scores_dense(q[:, :, w], k, qpos[:, w], kpos, score_scale, torch.float64)
        c_pt = ref.column_scores_dense(q[:, :, w], k, qpos[:, w], kpos, score_scale, dtype)
        assert_within(cols, c64, c_pt, "col_scores")


def test_prefill_attention_empty_cache():
    """S = 0: every row sees nothing (out 0, lse -inf) and the column scores are empty."""
    q = randn((1, 4, 3, 64), torch.float32, CUDA, gen(24))
    k = v = torch.empty(1, 2, 0, 64, device=CUDA)
    qpos = torch.arange(3, dtype=torch.int32, device=CUDA)[None].contiguous()
    kpos = torch.empty(1, 2, 0, dtype=torch.int32, device=CUDA)
    out, lse = poisoned((1, 4, 3, 64), torch.float32, CUDA), poisoned((1, 4, 3), torch.float32, CUDA)
    with compiled("prefill_attention"):
        ops.prefill_attention(q, k, v, qpos, kpos, 0.125, out, lse, torch.empty(1, 2, 0, device=CUDA), 0, 0.1)
    assert torch.equal(out.cpu(), torch.zeros(1, 4, 3, 64))
    assert torch.equal(lse.cpu(), torch.full((1, 4, 3), float("-inf")))


# ---------------------------------------------------------------------------------------------
# value_norm
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", [0, 1, 2])
@pytest.mark.parametrize("shape", [(2, 3, 50, 128), (1, 1, 7, 37), (3, 2, 1, 256), (1, 2, 0, 64)])
def test_value_norm(dtype, kind, shape):
    v = randn(shape, dtype, CUDA, gen(kind + 30), scale=2.0)
    out = poisoned(shape[:3], torch.float32, CUDA)
    with compiled("value_norm"):
        ops.value_norm(v, kind, out)
    assert_within(out, ref.value_norm_dense(v, kind, torch.float64), ref.value_norm_dense(v, kind, torch.float32),
                  f"value_norm kind={kind}", floor=1e-5)


def test_value_norm_propagates_nan():
    v = torch.ones(1, 1, 3, 40, device=CUDA)
    v[0, 0, 1, 37] = float("nan")  # in the second pass of a lane over the row
    out = torch.zeros(1, 1, 3, device=CUDA)
    for kind in (0, 1, 2):
        with compiled("value_norm"):
            ops.value_norm(v, kind, out)
        assert out[0, 0, 1].isnan() and out[0, 0, [0, 2]].isfinite().all()


# ---------------------------------------------------------------------------------------------
# select_victim, compact, merge_value: exact, against the reference on the CPU
# ---------------------------------------------------------------------------------------------

SPECIAL_SCORES = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan")])


def victim_inputs(B, Hkv, C, seed):
    """Scores with many ties and every special value; positions with holes and repeats."""
    g = gen(seed)
    score = torch.randint(0, 5, (B, Hkv, C), generator=g).float()
    special = torch.rand(B, Hkv, C, generator=g) < 0.3
    score[special] = SPECIAL_SCORES[torch.randint(0, len(SPECIAL_SCORES), (int(special.sum()),), generator=g)]
    pos = torch.randint(-1, max(2, C // 2), (B, Hkv, C), generator=g, dtype=torch.int32)  # repeats: ties by pos
    return score, pos


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 13), (3, 2, 257), (1, 4, 1500)])
@pytest.mark.parametrize("window", [(0, 1 << 30), (3, 40), (-5, 0)], ids=["all", "window", "empty-slots"])
def test_select_victim(shape, window):
    for seed in range(5):
        score, pos = victim_inputs(*shape, seed)
        out = torch.full(shape[:2], 99, dtype=torch.int64, device=CUDA)
        with compiled("select_victim"):
            ops.select_victim(score.to(CUDA), pos.to(CUDA), *window, out)
        if shape[2] < 100:
            want = brute_victim(score, pos, *window)
        else:  # the reference, itself checked against brute force in test_ops
            want = torch.empty(shape[:2], dtype=torch.int64)
            ref.select_victim(score, pos, *window, want)
        assert torch.equal(out.cpu(), want), f"seed {seed}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [5, 8, 64, 37])  # 16-byte, 4-byte and 2-byte units per slot
@pytest.mark.parametrize("keep_frac", [0.0, 0.5, 1.0])
def test_compact(dtype, D, keep_frac):
    B, Hkv, C = 2, 3, 300
    K = int(C * keep_frac)
    g = gen(D + K)
    k, v = randn((B, Hkv, C, D), dtype, "cpu", g), randn((B, Hkv, C, D), dtype, "cpu", g)
    pos = positions(B, Hkv, C, "holes", g)
    state = [torch.rand(B, Hkv, C, generator=g) for _ in range(2)]
    # Permutations move slots onto slots still to be read.
    keep = torch.stack([torch.randperm(C, generator=g)[:K] for _ in range(B * Hkv)]).view(B, Hkv, K)
    tensors = [k, v, pos, *state]
    on_gpu = [t.to(CUDA) for t in tensors]
    with compiled("compact"):
        ops.compact(on_gpu[0], on_gpu[1], on_gpu[2], on_gpu[3:], keep.to(CUDA))
    ref.compact(k, v, pos, state, keep)
    for name, got, want in zip(["k", "v", "pos", "state[0]", "state[1]"], on_gpu, tensors):
        assert torch.equal(got.cpu(), want), name


def test_compact_without_state():
    B, Hkv, C, D = 1, 2, 9, 16
    g = gen(40)
    k, v = randn((B, Hkv, C, D), torch.float16, "cpu", g), randn((B, Hkv, C, D), torch.float16, "cpu", g)
    pos = positions(B, Hkv, C, "all", g)
    keep = torch.tensor([[[8, 0, 7], [1, 2, 3]]])
    on_gpu = [t.to(CUDA) for t in (k, v, pos)]
    with compiled("compact"):
        ops.compact(*on_gpu, [], keep.to(CUDA))
    ref.compact(k, v, pos, [], keep)
    for got, want in zip(on_gpu, (k, v, pos)):
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [16, 37, 128])
def test_merge_value(dtype, D):
    B, Hkv, C = 3, 4, 20
    g = gen(D)
    v = randn((B, Hkv, C, D), dtype, "cpu", g)
    w = torch.tensor([0.0, 0.25, 1.0, 3.5])[torch.randint(0, 4, (B, Hkv, C), generator=g)]
    victim = torch.randint(-1, C, (B, Hkv), generator=g)
    receiver = torch.randint(-1, C, (B, Hkv), generator=g)
    receiver[0, 0], victim[0, 0] = 5, 5  # a slot merged into itself
    receiver[0, 1], victim[0, 1] = 6, -1  # skipped heads
    receiver[0, 2], victim[0, 2] = -1, 6
    weight = torch.tensor([0.0, 0.1, 1.0, 2.0])[torch.randint(0, 4, (B, Hkv), generator=g)]
    w[0, 3, :] = 0.0
    weight[0, 3] = 0.0  # both weights 0: the plain mean
    v_gpu, w_gpu = v.to(CUDA), w.to(CUDA)
    with compiled("merge_value"):
        ops.merge_value(v_gpu, w_gpu, victim.to(CUDA), receiver.to(CUDA), weight.to(CUDA))

    idx, rows64, total = ref.merged_rows(v, w, victim, receiver, weight, torch.float64)
    _, rows_pt, _ = ref.merged_rows(v, w, victim, receiver, weight, torch.float32)
    changed = torch.zeros(B, Hkv, C, dtype=torch.bool)
    changed[idx] = True
    v_got, w_got = v_gpu.cpu(), w_gpu.cpu()
    assert torch.equal(v_got[~changed], v[~changed]) and torch.equal(w_got[~changed], w[~changed])
    assert torch.equal(w_got[idx], total.float()), "weights must add up"
    assert_within(v_got[idx], rows64, rows_pt.to(dtype), "merged rows")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pooled", [False, True])
def test_merge_neighbour(dtype, pooled):
    """Rows of 300 slots (ten per lane), repeated and empty picks, both sides: as the loops, a pool's rows too."""
    B, Hkv, C, D, n = 5, 3, 300, 64, 7
    g = gen(11)
    v, pos = randn((B, Hkv, C, D), dtype, "cpu", g), positions(B, Hkv, C, "holes", g)
    w = torch.tensor([0.0, 0.25, 1.0, 3.5])[torch.randint(0, 4, (B, Hkv, C), generator=g)]
    abar = torch.rand(B, Hkv, C, generator=g)
    picks = torch.randint(-1, Hkv * C, (B, n), generator=g)
    picks[:, 1] = picks[:, 0]  # a repeat: its slot is empty by then
    for sinks, after in ((0, True), (4, False)):
        truth_v, truth_w, truth_pos, truth_out = brute_neighbour(v, w, pos, abar, picks, sinks, after)
        base = [t.clone() for t in (v, w, pos)]
        ref.merge_neighbour(*base, abar, picks, sinks, after, torch.empty_like(picks))
        w_gpu, pos_gpu = w.to(CUDA, copy=True), pos.to(CUDA, copy=True)
        out = torch.full((B, n), 99, dtype=torch.int64, device=CUDA)
        slot_index = torch.arange(B * Hkv * C, dtype=torch.int32).flip(0).view(B, Hkv, C) if pooled else None
        v_gpu = v.view(1, B * Hkv * C, D).flip(1).to(CUDA) if pooled else v.to(CUDA, copy=True)
        with compiled("merge_neighbour"):
            ops.merge_neighbour(v_gpu, w_gpu, pos_gpu, abar.to(CUDA), picks.to(CUDA), sinks, after, out,
                                None if slot_index is None else slot_index.to(CUDA))
        got = v_gpu.cpu().flip(1).view(B, Hkv, C, D) if pooled else v_gpu.cpu()
        assert torch.equal(out.cpu(), truth_out) and torch.equal(pos_gpu.cpu(), truth_pos)
        assert torch.equal(w_gpu.cpu(), truth_w)
        received = torch.zeros(B, Hkv, C, dtype=torch.bool)
        for b, i in (truth_out >= 0).nonzero().tolist():
            received[b, picks[b, i] // C, truth_out[b, i]] = True
        assert received.any() and torch.equal(got[~received], v[~received])
        assert_within(got[received], truth_v[received], base[0][received], "merged rows")


@pytest.mark.parametrize("pooled", [False, True])
def test_remove_entries(pooled):
    """Rows of 200 slots, 7 entries a row with repeats and -1s, two state tensors: as the loops."""
    B, Hkv, C, n = 300, 3, 200, 7
    g = gen(13)
    pos = positions(B, Hkv, C, "holes", g)
    state = [torch.rand(B, Hkv, C, generator=g) for _ in range(2)]
    scratch = B * Hkv * C
    index = torch.randperm(scratch, generator=g).view(B, Hkv, C).int() if pooled else None
    entries = torch.randint(-1, Hkv * C, (B, n), generator=g)
    entries[:, 3] = entries[:, 0]
    want = brute_remove(pos, state, index, entries, scratch)
    got = [pos.to(CUDA), [s.to(CUDA) for s in state], None if index is None else index.to(CUDA)]
    freed = torch.full((B, n), 99, dtype=torch.int64, device=CUDA)
    with compiled("remove_entries"):
        ops.remove_entries(*got, entries.to(CUDA), scratch, freed)
    assert torch.equal(got[0].cpu(), want[0]) and all(torch.equal(s.cpu(), w) for s, w in zip(got[1], want[1]))
    assert index is None or torch.equal(got[2].cpu(), want[2])
    assert torch.equal(freed.cpu(), want[3])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pooled", [False, True])
def test_merge_spread(dtype, pooled):
    """Rows of 300 slots (ten per lane), windows of 1, 32 and 40 (past a warp), repeated and empty picks: as
    the loops, a pool's rows too."""
    B, Hkv, C, D, n = 5, 3, 300, 64, 7
    g = gen(12)
    v, pos = randn((B, Hkv, C, D), dtype, "cpu", g), positions(B, Hkv, C, "holes", g)
    abar = torch.rand(B, Hkv, C, generator=g)
    abar[0, 0, :50] = 0.0  # 0/0 and x/0 ratios
    picks = torch.randint(-1, Hkv * C, (B, n), generator=g)
    picks[:, 1] = picks[:, 0]  # a repeat: its slot is empty by then
    for sinks, window in ((0, 32), (4, 1), (2, 40)):
        truth_v, truth_pos, truth_out, receivers = brute_spread(v, pos, abar, picks, sinks, window)
        base = [v.clone(), pos.clone()]
        ref.merge_spread(*base, abar, picks, sinks, window, torch.empty_like(picks))
        pos_gpu = pos.to(CUDA, copy=True)
        out = torch.full((B, n), 99, dtype=torch.int64, device=CUDA)
        slot_index = torch.arange(B * Hkv * C, dtype=torch.int32).flip(0).view(B, Hkv, C) if pooled else None
        v_gpu = v.view(1, B * Hkv * C, D).flip(1).to(CUDA) if pooled else v.to(CUDA, copy=True)
        with compiled("merge_spread"):
            ops.merge_spread(v_gpu, pos_gpu, abar.to(CUDA), picks.to(CUDA), sinks, window, out,
                             None if slot_index is None else slot_index.to(CUDA))
        got = v_gpu.cpu().flip(1).view(B, Hkv, C, D) if pooled else v_gpu.cpu()
        assert torch.equal(out.cpu(), truth_out) and torch.equal(pos_gpu.cpu(), truth_pos)
        received = torch.zeros(B, Hkv, C, dtype=torch.bool)
        for (b, i), slots in receivers.items():
            received[b, int(picks[b, i]) // C, slots] = True
        assert received.any() and torch.equal(got[~received], v[~received])
        assert_within(got[received], truth_v[received], base[0][received], "merged rows")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [37, 128])
@pytest.mark.parametrize("pooled", [False, True])
def test_nearest_key(dtype, D, pooled):
    """Rows of 300 slots (ten per lane), tied and zero keys, heads with no victim: as the fp64 loops."""
    B, Hkv, C = 4, 3, 300
    g = gen(D)
    k, pos = keys_with_ties(B, Hkv, C, D, dtype, g), positions(B, Hkv, C, "holes", g)
    victim = torch.randint(-1, C, (B, Hkv), generator=g)
    victim[0, 0] = 1  # the tied rows 1 and 3
    receiver = torch.full((B, Hkv), 99, device=CUDA)
    similarity = torch.full((B, Hkv), float("nan"), device=CUDA)
    slot_index = torch.arange(B * Hkv * C, dtype=torch.int32).flip(0).view(B, Hkv, C) if pooled else None
    keys = k.view(1, B * Hkv * C, D).flip(1) if pooled else k
    with compiled("nearest_key"):
        ops.nearest_key(keys.to(CUDA), pos.to(CUDA), victim.to(CUDA), 4, receiver, similarity,
                        None if slot_index is None else slot_index.to(CUDA))
    assert_nearest(k, pos, victim, 4, receiver.cpu(), similarity.cpu())


# ---------------------------------------------------------------------------------------------
# opcheck with CUDA tensors; bad slot indices stop the kernel
# ---------------------------------------------------------------------------------------------

def _to_cuda(args):
    move = lambda a: a.to(CUDA) if isinstance(a, torch.Tensor) else a
    return tuple([move(t) for t in a] if isinstance(a, list) else move(a) for a in args)


@pytest.mark.skipif(not ops.HAVE_EXTENSION, reason="engine._C not built")
@pytest.mark.parametrize("op,args", list(opcheck_cases()), ids=lambda x: x if isinstance(x, str) else "")
def test_opcheck(op, args):
    if not ops.has_kernel(op, CUDA):
        pytest.skip(f"engine._C has no cuda kernel for {op}")
    torch.library.opcheck(getattr(torch.ops.engine, op), _to_cuda(args))


BAD_INDEX_CASES = {  # a device-side assertion is fatal to the CUDA context: each runs in its own process
    "compact-out-of-range": ("ops.compact(k, v, pos, [], torch.tensor([[[0, 8], [1, 2]]], device='cuda'))",
                             "compact: keep_idx must hold distinct slot indices in [0, C)"),
    "compact-repeat": ("ops.compact(k, v, pos, [], torch.tensor([[[0, 1], [3, 3]]], device='cuda'))",
                       "compact: keep_idx must hold distinct slot indices in [0, C)"),
    "merge-receiver": (("ops.merge_value(v, w, torch.tensor([[0, 1]], device='cuda'), "
                        "torch.tensor([[2, 8]], device='cuda'), torch.ones(1, 2, device='cuda'))"),
                       "merge_value: receiver must hold slot indices in [-1, C)"),
    "merge-victim": (("ops.merge_value(v, w, torch.tensor([[-2, 1]], device='cuda'), "
                      "torch.tensor([[2, 3]], device='cuda'), torch.ones(1, 2, device='cuda'))"),
                     "merge_value: victim must hold slot indices in [-1, C)"),
}


@pytest.mark.parametrize("case", list(BAD_INDEX_CASES))
def test_bad_slot_index_stops_the_kernel(case):
    call, message = BAD_INDEX_CASES[case]
    script = textwrap.dedent(f"""
        import torch
        from engine import ops
        k = torch.zeros(1, 2, 8, 16, device="cuda")
        v = torch.zeros(1, 2, 8, 16, device="cuda")
        pos = torch.arange(8, dtype=torch.int32, device="cuda").expand(1, 2, 8).contiguous()
        w = torch.zeros(1, 2, 8, device="cuda")
        with ops.use_reference(False):
            {call}
        torch.cuda.synchronize()
        print("no error")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "no error" not in output, output
    assert message in output, output


# ---------------------------------------------------------------------------------------------
# CUDA graphs: a captured decode step replays with new inputs exactly as it runs eagerly
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_probs", [True, False], ids=["probs", "score-only"])
def test_decode_step_in_cuda_graph(with_probs):
    B, H, Hkv, C, D, dtype = 2, 12, 4, 1000, 64, torch.bfloat16
    scale, lo, hi = 0.125, 100, 3 * C
    g = gen(50)

    def fresh():
        """New q, k, v, pos, score_acc."""
        return (randn((B, H, D), dtype, CUDA, g), randn((B, Hkv, C, D), dtype, CUDA, g),
                randn((B, Hkv, C, D), dtype, CUDA, g), positions(B, Hkv, C, "holes", g).to(CUDA),
                torch.rand((B, Hkv, C), generator=g).to(CUDA))

    def outputs():
        return (torch.empty(B, H, D, dtype=dtype, device=CUDA),
                torch.empty(B, H, C, device=CUDA) if with_probs else None,
                torch.empty(B, Hkv, dtype=torch.int64, device=CUDA))

    def step(q, k, v, pos, acc, out, probs, victim):
        ops.decode_attention(q, k, v, pos, C, scale, out, acc, probs)
        ops.select_victim(acc, pos, lo, hi, victim)

    static, static_out = fresh(), outputs()
    with compiled("decode_attention"), compiled("select_victim"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up outside the graph, as torch.cuda.graphs asks
            step(*static, *static_out)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(*static, *static_out)

        for _ in range(3):
            inputs = fresh()
            for dst, src in zip(static, inputs):
                dst.copy_(src)
            graph.replay()
            eager_out = outputs()
            eager_in = (*inputs[:4], inputs[4].clone())
            step(*eager_in, *eager_out)
            torch.cuda.synchronize()
            for name, got, want in zip(["out", "probs", "victim"], static_out, eager_out):
                assert (got is None) == (want is None) and (got is None or torch.equal(got, want)), name
            assert torch.equal(static[4], eager_in[4]), "score_acc"

    q, k, v, pos, _ = inputs
    o64, _ = ref.decode_attention_dense(q, k, v, pos, C, scale, torch.float64)
    o_pt, _ = ref.decode_attention_dense(q, k, v, pos, C, scale, dtype)
    assert_within(static_out[0], o64, o_pt, "replayed out")
    want_victim = torch.empty(B, Hkv, dtype=torch.int64)
    ref.select_victim(static[4].cpu(), pos.cpu(), lo, hi, want_victim)
    assert torch.equal(static_out[2].cpu(), want_victim)
