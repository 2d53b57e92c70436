"""Plain PyTorch versions of the engine ops: the oracle of the tests and the fallback of engine.ops.

Each op has the signature of its compiled twin (torch.ops.engine.*) and writes into the same out
arguments. The math sits in `*_dense` functions that take the compute dtype, so tests can run the
same formula in fp64 (the truth) and in the input dtype (what plain PyTorch would get). Dense means
obvious, not frugal: `prefill_attention` materialises L x S; `prefill_attention_chunked` bounds that.

The `check_*` functions mirror csrc/checks.cpp check for check, message for message, so the
compiled and the reference path reject bad input with the same exception and the same line.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_HEAD_DIM = 256
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
NORM_KINDS = {0: "Linf", 1: "L1", 2: "squared L2"}
_NO_POS = 2**31 - 1  # a query position that sees every valid key
_CHUNK_ELEMENTS = 2**22  # attention probabilities held at once by prefill_attention_chunked


# ---------------------------------------------------------------------------------------------
# Validation (keep in step with csrc/checks.cpp)
# ---------------------------------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shape_str(shape: Sequence[int]) -> str:
    return "[" + ", ".join("?" if s < 0 else str(s) for s in shape) + "]"


def _check_tensor(op: str, name: str, t: Tensor, layout: str, shape: Sequence[int],
                  dtypes: Sequence[torch.dtype], like: tuple[Tensor, str] | None = None) -> None:
    """Device (like another argument), dtype, shape (-1 = any size), contiguity: in this order."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if like is not None and t.device != like[0].device:
        raise ValueError(f"{op}: {name} must be on {like[0].device} like {like[1]}, got {t.device}")
    if t.dtype not in dtypes:
        allowed = " or ".join(_dtype_name(d) for d in dtypes)
        raise TypeError(f"{op}: {name} must be {allowed}, got {_dtype_name(t.dtype)}")
    if t.dim() != len(shape) or any(e >= 0 and s != e for s, e in zip(t.shape, shape)):
        raise ValueError(f"{op}: {name} must have shape {layout} = {_shape_str(shape)}, "
                         f"got {_shape_str(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous {layout}, got strides {_shape_str(t.stride())}")


def _check_heads(op: str, H: int, Hkv: int, D: int) -> None:
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"{op}: H_kv={Hkv} must be >= 1 and divide H={H}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim D must be in [1, {MAX_HEAD_DIM}], got {D}")


def _query_dtypes(k: Tensor) -> tuple[torch.dtype, ...]:
    """The query may be fp32 whatever the cache dtype."""
    return (torch.float32,) if k.dtype == torch.float32 else (torch.float32, k.dtype)


def check_rms_norm(x: Tensor, weight: Tensor, eps: float) -> None:
    op = "rms_norm"
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a tensor, got {type(x).__name__}")
    if x.dtype not in FLOATS:
        raise TypeError(f"{op}: x must be float32 or bfloat16 or float16, got {_dtype_name(x.dtype)}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have shape [..., dim], got {_shape_str(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"{op}: x must be contiguous [..., dim], got strides {_shape_str(x.stride())}")
    _check_tensor(op, "weight", weight, "[dim]", [x.shape[-1]], [x.dtype], (x, "x"))
    if not eps >= 0:
        raise ValueError(f"{op}: eps must be >= 0")


def check_decode_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, length: int, out: Tensor,
                           score_acc: Tensor | None, probs_out: Tensor | None, rope_cos: Tensor | None = None,
                           rope_sin: Tensor | None = None, rope_rank: Tensor | None = None,
                           slot_index: Tensor | None = None, bias: Tensor | None = None) -> None:
    op, like = "decode_attention", (k, "k")
    if slot_index is not None:  # a pool of rows shared by the KV heads; each head's slots name their rows
        _check_tensor(op, "k", k, "[B, R, D]", [-1] * 3, FLOATS)
        B, R, D = k.shape
        _check_tensor(op, "v", v, "[B, R, D]", [B, R, D], [k.dtype], like)
        _check_tensor(op, "slot_index", slot_index, "[B, H_kv, C]", [B, -1, -1], [torch.int32], like)
        Hkv, C = slot_index.shape[1:]
    else:
        _check_tensor(op, "k", k, "[B, H_kv, C, D]", [-1] * 4, FLOATS)
        B, Hkv, C, D = k.shape
        _check_tensor(op, "v", v, "[B, H_kv, C, D]", [B, Hkv, C, D], [k.dtype], like)
    _check_tensor(op, "pos", pos, "[B, H_kv, C]", [B, Hkv, C], [torch.int32], like)
    _check_tensor(op, "q", q, "[B, H, D]", [B, -1, D], _query_dtypes(k), like)
    H = q.shape[1]
    _check_heads(op, H, Hkv, D)
    _check_tensor(op, "out", out, "[B, H, D]", [B, H, D], [q.dtype], like)
    if score_acc is not None:
        _check_tensor(op, "score_acc", score_acc, "[B, H_kv, C]", [B, Hkv, C], [torch.float32], like)
    if probs_out is not None:
        _check_tensor(op, "probs_out", probs_out, "[B, H, C]", [B, H, C], [torch.float32], like)
    if bias is not None:
        _check_tensor(op, "bias", bias, "[B, H_kv, C]", [B, Hkv, C], [torch.float32], like)
    if not 1 <= length <= C:
        raise ValueError(f"{op}: length must be in [1, C] = [1, {C}], got {length}")
    given = sum(t is not None for t in (rope_cos, rope_sin, rope_rank))
    if given not in (0, 3):
        raise ValueError(f"{op}: rope_cos, rope_sin and rope_rank go together, got {given} of the 3")
    if given == 0:
        return
    if D % 2:
        raise ValueError(f"{op}: rope needs an even head dim D, got {D}")
    _check_tensor(op, "rope_cos", rope_cos, "[P, D]", [-1, D], [torch.float32], like)
    _check_tensor(op, "rope_sin", rope_sin, "[P, D]", [rope_cos.shape[0], D], [torch.float32], like)
    _check_tensor(op, "rope_rank", rope_rank, "[B, H_kv, C]", [B, Hkv, C], [torch.int32], like)


def check_rope_ranks(rank: Tensor, pos: Tensor, length: int, P: int) -> None:
    """rope_rank must hold rows of the [P, D] tables on every valid slot (s < length, pos >= 0)."""
    where = _first((_decode_kpos(pos, length) >= 0) & ((rank < 0) | (rank >= P)))
    if where is not None:
        raise IndexError(f"decode_attention: rope_rank must hold table rows in [0, P) = [0, {P}) on valid "
                         f"slots, got {int(rank[where])} at {list(where)}")


def check_pool_rows(slot_index: Tensor, length: int, R: int) -> None:
    """slot_index must hold rows of the [B, R, D] pool on every slot < length (empty ones too: the kernels
    may read an empty slot's row before masking it)."""
    head = slot_index[:, :, :length]
    where = _first((head < 0) | (head >= R))
    if where is not None:
        raise IndexError(f"decode_attention: slot_index must hold pool rows in [0, R) = [0, {R}) on slots < "
                         f"length, got {int(head[where])} at {list(where)}")


def pool_rows(pool: Tensor, slot_index: Tensor) -> Tensor:
    """[B, H_kv, C, D]: the rows of pool [B, R, D] that slot_index [B, H_kv, C] names, per KV head."""
    B, Hkv, C = slot_index.shape
    return pool.gather(1, slot_index.reshape(B, Hkv * C, 1).long().expand(-1, -1, pool.shape[2])
                       ).view(B, Hkv, C, -1)


def check_rope_append(qkv: Tensor, cos: Tensor, sin: Tensor, slot: Tensor, q_out: Tensor, k_cache: Tensor,
                      v_cache: Tensor) -> None:
    op, cache = "rope_append", "[B, H_kv, C, D]"
    _check_tensor(op, "k_cache", k_cache, cache, [-1] * 4, FLOATS)
    B, Hc, C, D = k_cache.shape
    # a cache of one head with H_kv slot columns is a pool the KV heads share (slot: each head's row)
    Hkv = slot.shape[1] if Hc == 1 and isinstance(slot, Tensor) and slot.dim() == 2 else Hc
    like = (k_cache, "k_cache")
    _check_tensor(op, "v_cache", v_cache, cache, [B, Hc, C, D], [k_cache.dtype], like)
    _check_tensor(op, "q_out", q_out, "[B, H, D]", [B, -1, D], _query_dtypes(k_cache), like)
    H = q_out.shape[1]
    _check_heads(op, H, Hkv, D)
    if D % 2:
        raise ValueError(f"{op}: rope needs an even head dim D, got {D}")
    _check_tensor(op, "qkv", qkv, "[B, (H + 2 H_kv) D]", [B, (H + 2 * Hkv) * D], [q_out.dtype], like)
    _check_tensor(op, "cos", cos, "[D]", [D], [torch.float32], like)
    _check_tensor(op, "sin", sin, "[D]", [D], [torch.float32], like)
    _check_tensor(op, "slot", slot, "[B, H_kv]", [B, Hkv], [torch.int64], like)


def check_slot_indices(op: str, slot: Tensor, C: int) -> None:
    """slot [B, H_kv] must hold slots in [0, C)."""
    where = _first((slot < 0) | (slot >= C))
    if where is not None:
        raise IndexError(f"{op}: slot must hold slot indices in [0, C) = [0, {C}), got {int(slot[where])} at {list(where)}")


def check_prefill_attention(q: Tensor, k: Tensor, v: Tensor, qpos: Tensor, kpos: Tensor, out: Tensor,
                            lse: Tensor, col_scores: Tensor | None, bias: Tensor | None = None) -> None:
    op, cache = "prefill_attention", "[B, H_kv, S, D]"
    _check_tensor(op, "k", k, cache, [-1] * 4, FLOATS)
    B, Hkv, S, D = k.shape
    like = (k, "k")
    _check_tensor(op, "v", v, cache, [B, Hkv, S, D], [k.dtype], like)
    _check_tensor(op, "kpos", kpos, "[B, H_kv, S]", [B, Hkv, S], [torch.int32], like)
    _check_tensor(op, "q", q, "[B, H, L, D]", [B, -1, -1, D], _query_dtypes(k), like)
    H, L = q.shape[1], q.shape[2]
    _check_heads(op, H, Hkv, D)
    _check_tensor(op, "qpos", qpos, "[B, L]", [B, L], [torch.int32], like)
    _check_tensor(op, "out", out, "[B, H, L, D]", [B, H, L, D], [q.dtype], like)
    _check_tensor(op, "lse", lse, "[B, H, L]", [B, H, L], [torch.float32], like)
    if col_scores is not None:
        _check_tensor(op, "col_scores", col_scores, "[B, H_kv, S]", [B, Hkv, S], [torch.float32], like)
    if bias is not None:
        _check_tensor(op, "bias", bias, "[B, H_kv, S]", [B, Hkv, S], [torch.float32], like)


def check_value_norm(v: Tensor, kind: int, out: Tensor) -> None:
    op = "value_norm"
    _check_tensor(op, "v", v, "[B, H_kv, N, D]", [-1] * 4, FLOATS)
    _check_tensor(op, "out", out, "[B, H_kv, N]", list(v.shape[:3]), [torch.float32], (v, "v"))
    if kind not in NORM_KINDS:
        raise ValueError(f"{op}: kind must be 0 (Linf), 1 (L1) or 2 (squared L2), got {kind}")


def check_select_victim(score: Tensor, pos: Tensor, out_idx: Tensor) -> None:
    op = "select_victim"
    _check_tensor(op, "score", score, "[B, H_kv, C]", [-1] * 3, [torch.float32])
    B, Hkv, C = score.shape
    like = (score, "score")
    _check_tensor(op, "pos", pos, "[B, H_kv, C]", [B, Hkv, C], [torch.int32], like)
    _check_tensor(op, "out_idx", out_idx, "[B, H_kv]", [B, Hkv], [torch.int64], like)


def check_adaptive_victims(score: Tensor, pos: Tensor, hi: Tensor, limit: Tensor, out_entry: Tensor) -> None:
    op = "adaptive_victims"
    _check_tensor(op, "score", score, "[B, H_kv, C]", [-1] * 3, [torch.float32])
    B, Hkv, C = score.shape
    like = (score, "score")
    _check_tensor(op, "pos", pos, "[B, H_kv, C]", [B, Hkv, C], [torch.int32], like)
    _check_tensor(op, "hi", hi, "[1]", [1], [torch.int64], like)
    _check_tensor(op, "limit", limit, "[B]", [B], [torch.int64], like)
    _check_tensor(op, "out_entry", out_entry, "[B, n]", [B, -1], [torch.int64], like)


def check_compact(k: Tensor, v: Tensor, pos: Tensor, state: Sequence[Tensor], keep_idx: Tensor) -> None:
    op, cache = "compact", "[B, H_kv, C, D]"
    _check_tensor(op, "k", k, cache, [-1] * 4, FLOATS)
    B, Hkv, C, D = k.shape
    like = (k, "k")
    _check_tensor(op, "v", v, cache, [B, Hkv, C, D], [k.dtype], like)
    _check_tensor(op, "pos", pos, "[B, H_kv, C]", [B, Hkv, C], [torch.int32], like)
    for i, s in enumerate(state):
        _check_tensor(op, f"state[{i}]", s, "[B, H_kv, C]", [B, Hkv, C], [torch.float32], like)
    _check_tensor(op, "keep_idx", keep_idx, "[B, H_kv, K]", [B, Hkv, -1], [torch.int64], like)
    if keep_idx.shape[2] > C:
        raise ValueError(f"{op}: keep_idx must keep at most C={C} slots, got K={keep_idx.shape[2]}")


def _first(mask: Tensor) -> tuple[int, ...] | None:
    """Index of the first True of `mask` in row-major order, or None."""
    flat = mask.flatten().nonzero()
    return None if flat.numel() == 0 else tuple(int(i) for i in torch.unravel_index(flat[0, 0], mask.shape))


def check_compact_indices(keep_idx: Tensor, C: int) -> None:
    """keep_idx[b, g, :] must hold distinct slots in [0, C); reports the first offender in order."""
    bad = (keep_idx < 0) | (keep_idx >= C)
    ordered, order = keep_idx.sort(dim=-1, stable=True)
    repeat = torch.zeros_like(bad)
    repeat.scatter_(-1, order[..., 1:], ordered[..., 1:] == ordered[..., :-1])  # later copies only
    where = _first(bad | repeat)
    if where is not None:
        raise IndexError(f"compact: keep_idx must hold distinct slot indices in [0, {C}), "
                         f"got {int(keep_idx[where])} at {list(where)}")


def _check_slot_rows(op: str, name: str, rows: Tensor, slot_index: Tensor | None) -> tuple[int, int, int]:
    """rows [B, H_kv, C, D], or a pool of rows [P, R, D] with slot_index [B, H_kv, C] int32 (row b of the
    slots reads pool batch b % P, so B must be a multiple of P): B, H_kv and C of the slots."""
    if slot_index is None:
        _check_tensor(op, name, rows, "[B, H_kv, C, D]", [-1] * 4, FLOATS)
        return rows.shape[0], rows.shape[1], rows.shape[2]
    _check_tensor(op, name, rows, "[P, R, D]", [-1] * 3, FLOATS)
    _check_tensor(op, "slot_index", slot_index, "[B, H_kv, C]", [-1] * 3, [torch.int32], (rows, name))
    B, Hkv, C = slot_index.shape
    if rows.shape[0] == 0 or B % rows.shape[0]:
        raise ValueError(f"{op}: slot_index's B={B} must be a multiple of the pool's P={rows.shape[0]}")
    return B, Hkv, C


def check_merge_value(v: Tensor, w: Tensor, victim: Tensor, receiver: Tensor, weight: Tensor,
                      slot_index: Tensor | None = None) -> None:
    op = "merge_value"
    like = (v, "v")
    B, Hkv, C = _check_slot_rows(op, "v", v, slot_index)
    _check_tensor(op, "w", w, "[B, H_kv, C]", [B, Hkv, C], [torch.float32], like)
    _check_tensor(op, "victim", victim, "[B, H_kv]", [B, Hkv], [torch.int64], like)
    _check_tensor(op, "receiver", receiver, "[B, H_kv]", [B, Hkv], [torch.int64], like)
    _check_tensor(op, "weight", weight, "[B, H_kv]", [B, Hkv], [torch.float32], like)


def check_index_range(op: str, name: str, t: Tensor, hi: int, what: str) -> None:
    """Every entry of index t [B, n] in [-1, hi) (-1: none): merge_value's victim and receiver, merge_neighbour's
    and merge_spread's picks, nearest_key's victim."""
    where = _first((t < -1) | (t >= hi))
    if where is not None:
        raise IndexError(f"{op}: {name} must hold {what} in [-1, {hi}), got {int(t[where])} at {list(where)}")


def _check_picks(op: str, B: int, picks: Tensor, out_name: str, out: Tensor, sinks: int,
                 like: tuple[Tensor, str]) -> None:
    """A merge op's picks [B, n] int64, its output out_name [B, n] int64 and sinks >= 0: its last checks."""
    _check_tensor(op, "picks", picks, "[B, n]", [B, -1], [torch.int64], like)
    _check_tensor(op, out_name, out, "[B, n]", [B, picks.shape[1]], [torch.int64], like)
    if sinks < 0:
        raise ValueError(f"{op}: sinks must be >= 0, got {sinks}")


def check_merge_neighbour(v: Tensor, w: Tensor, pos: Tensor, abar: Tensor, picks: Tensor, sinks: int,
                          receiver_out: Tensor, slot_index: Tensor | None = None) -> None:
    op = "merge_neighbour"
    like = (v, "v")
    B, Hkv, C = _check_slot_rows(op, "v", v, slot_index)
    _check_tensor(op, "w", w, "[B, H_kv, C]", [B, Hkv, C], [torch.float32], like)
    _check_tensor(op, "pos", pos, "[B, H_kv, C]", [B, Hkv, C], [torch.int32], like)
    _check_tensor(op, "abar", abar, "[B, H_kv, C]", [B, Hkv, C], [torch.float32], like)
    _check_picks(op, B, picks, "receiver_out", receiver_out, sinks, like)


def check_merge_zip(k: Tensor, v: Tensor, logp: Tensor, pos: Tensor, q: Tensor, picks: Tensor, sinks: int,
                    min_similarity: float, scale: float, receiver_out: Tensor, slot_index: Tensor | None = None) -> None:
    op = "merge_zip"
    like = (k, "k")
    B, Hkv, C = _check_slot_rows(op, "k", k, slot_index)
    _check_tensor(op, "v", v, "[B, H_kv, C, D]" if slot_index is None else "[P, R, D]", list(k.shape), [k.dtype], like)
    _check_tensor(op, "logp", logp, "[B, H_kv, C]", [B, Hkv, C], [torch.float32], like)
    _check_tensor(op, "pos", pos, "[B, H_kv, C]", [B, Hkv, C], [torch.int32], like)
    _check_tensor(op, "q", q, "[B, H_kv, D]", [B, Hkv, k.shape[-1]], [torch.float32], like)
    _check_picks(op, B, picks, "receiver_out", receiver_out, sinks, like)
    if not -1.0 <= min_similarity <= 1.0:
        raise ValueError(f"{op}: min_similarity must be in [-1, 1], got {min_similarity:g}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"{op}: scale must be a finite number > 0, got {scale:g}")


def check_remove_entries(pos: Tensor, state: Sequence[Tensor], slot_index: Tensor | None, entries: Tensor,
                         scratch: int, freed_out: Tensor) -> None:
    op = "remove_entries"
    _check_tensor(op, "pos", pos, "[B, H_kv, C]", [-1, -1, -1], [torch.int32])
    B, Hkv, C = pos.shape
    like = (pos, "pos")
    for i, s in enumerate(state):
        _check_tensor(op, f"state[{i}]", s, "[B, H_kv, C]", [B, Hkv, C], [torch.float32], like)
    if slot_index is not None:
        _check_tensor(op, "slot_index", slot_index, "[B, H_kv, C]", [B, Hkv, C], [torch.int32], like)
    _check_tensor(op, "entries", entries, "[B, n]", [B, -1], [torch.int64], like)
    _check_tensor(op, "freed_out", freed_out, "[B, n]", [B, entries.shape[1]], [torch.int64], like)
    if scratch < 0:
        raise ValueError(f"{op}: scratch must be a pool row >= 0, got {scratch}")


def check_merge_spread(v: Tensor, pos: Tensor, abar: Tensor, picks: Tensor, sinks: int, window: int,
                       receivers_out: Tensor, slot_index: Tensor | None = None) -> None:
    op = "merge_spread"
    like = (v, "v")
    B, Hkv, C = _check_slot_rows(op, "v", v, slot_index)
    _check_tensor(op, "pos", pos, "[B, H_kv, C]", [B, Hkv, C], [torch.int32], like)
    _check_tensor(op, "abar", abar, "[B, H_kv, C]", [B, Hkv, C], [torch.float32], like)
    _check_picks(op, B, picks, "receivers_out", receivers_out, sinks, like)
    if window < 1:
        raise ValueError(f"{op}: window must be >= 1, got {window}")


def check_nearest_key(k: Tensor, pos: Tensor, victim: Tensor, sinks: int, receiver_out: Tensor,
                      similarity_out: Tensor, slot_index: Tensor | None = None) -> None:
    op = "nearest_key"
    like = (k, "k")
    B, Hkv, C = _check_slot_rows(op, "k", k, slot_index)
    _check_tensor(op, "pos", pos, "[B, H_kv, C]", [B, Hkv, C], [torch.int32], like)
    _check_tensor(op, "victim", victim, "[B, H_kv]", [B, Hkv], [torch.int64], like)
    _check_tensor(op, "receiver_out", receiver_out, "[B, H_kv]", [B, Hkv], [torch.int64], like)
    _check_tensor(op, "similarity_out", similarity_out, "[B, H_kv]", [B, Hkv], [torch.float32], like)
    if sinks < 0:
        raise ValueError(f"{op}: sinks must be >= 0, got {sinks}")


def _check_product_args(op: str, x: Tensor, x_dtypes: Sequence[torch.dtype], N: int, K: int, out: Tensor,
                        norm: Tensor | None, eps: float, swiglu: bool, like: tuple[Tensor, str]) -> None:
    """x, norm, eps and out of a product by an [N, K] matrix (matvec, qmatvec): norm and out of x's dtype."""
    if norm is not None and swiglu:
        raise ValueError(f"{op}: norm and swiglu cannot be combined")
    x_shape = [-1] * (x.dim() - 1) + [2 * K if swiglu else K]
    _check_tensor(op, "x", x, "[..., 2K]" if swiglu else "[..., K]", x_shape, x_dtypes, like)
    if norm is not None:
        _check_tensor(op, "norm", norm, "[K]", [K], [x.dtype], like)
        if not eps >= 0:
            raise ValueError(f"{op}: eps must be >= 0")
    _check_tensor(op, "out", out, "[..., N]", [*x.shape[:-1], N], [x.dtype], like)


def check_matvec(x: Tensor, w: Tensor, out: Tensor, norm: Tensor | None = None, eps: float = 0.0,
                 swiglu: bool = False) -> None:
    op = "matvec"
    _check_tensor(op, "w", w, "[N, K]", [-1, -1], FLOATS)
    _check_product_args(op, x, [w.dtype], w.shape[0], w.shape[1], out, norm, eps, swiglu, (w, "w"))


def _overlaps(out: Tensor, t: Tensor) -> bool:
    """Whether out's bytes overlap t's (both contiguous: [data, data + nbytes))."""
    a, b = out.data_ptr(), t.data_ptr()
    return out.numel() > 0 and t.numel() > 0 and a < b + t.nbytes and b < a + out.nbytes


def check_matvec_overlap(x: Tensor, w: Tensor, out: Tensor) -> None:
    """out is written while x and w are read (apart from check_matvec: the fake op has no memory to compare)."""
    if _overlaps(out, x) or _overlaps(out, w):
        raise ValueError("matvec: out must not overlap x or w")


# The GGUF block types kept packed (csrc/quant_blocks.h): ggml type id -> (name, weights per block, bytes per block).
QUANT_TYPES = {2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34), 12: ("Q4_K", 256, 144),
               14: ("Q6_K", 256, 210)}
# ggml's type names by id (gguf.GGMLQuantizationType) for messages; csrc/checks.cpp has the same table.
GGML_TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
                   11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
                   18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8",
                   25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0",
                   39: "MXFP4", 40: "NVFP4", 41: "Q1_0"}


def _check_blocks(op: str, blocks: Tensor, qtype: int) -> int:
    """blocks [N, row_bytes] uint8 of a type kept packed, row_bytes a whole number of its blocks: returns K."""
    if qtype not in QUANT_TYPES:
        supported = ", ".join(name for name, _, _ in QUANT_TYPES.values())
        raise ValueError(f"{op}: quant type {qtype} ({GGML_TYPE_NAMES.get(qtype, 'unknown')}) is not kept packed "
                         f"(supported: {supported}); load with --weights dequantize")
    name, weights, nbytes = QUANT_TYPES[qtype]
    _check_tensor(op, "blocks", blocks, "[N, row_bytes]", [-1, -1], [torch.uint8])
    if blocks.shape[1] % nbytes:
        raise ValueError(f"{op}: a row of {blocks.shape[1]} bytes is not a whole number of {name} blocks "
                         f"({nbytes} bytes each); load with --weights dequantize")
    return blocks.shape[1] // nbytes * weights


def check_qmatvec(x: Tensor, blocks: Tensor, qtype: int, out: Tensor, norm: Tensor | None = None, eps: float = 0.0,
                  swiglu: bool = False, op: str = "qmatvec") -> None:
    K = _check_blocks(op, blocks, qtype)
    x_dtypes = [torch.float32] if blocks.device.type == "cpu" else FLOATS  # the CPU kernel: fp32 activations only
    _check_product_args(op, x, x_dtypes, blocks.shape[0], K, out, norm, eps, swiglu, (blocks, "blocks"))


def check_qmatvec_overlap(x: Tensor, blocks: Tensor, out: Tensor, op: str = "qmatvec") -> None:
    """out is written while x and blocks are read (apart from check_qmatvec, as for matvec)."""
    if _overlaps(out, x) or _overlaps(out, blocks):
        raise ValueError(f"{op}: out must not overlap x or blocks")


def check_dequantize(blocks: Tensor, qtype: int, out: Tensor) -> None:
    op = "dequantize"
    K = _check_blocks(op, blocks, qtype)
    _check_tensor(op, "out", out, "[N, K]", [blocks.shape[0], K], FLOATS, (blocks, "blocks"))


def check_dequantize_overlap(blocks: Tensor, out: Tensor) -> None:
    if _overlaps(out, blocks):
        raise ValueError("dequantize: out must not overlap blocks")


# ---------------------------------------------------------------------------------------------
# Math in a chosen dtype
# ---------------------------------------------------------------------------------------------

def rms_norm_dense(x: Tensor, weight: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """weight * x / sqrt(mean(x^2) + eps) in `dtype`, with no intermediate rounding."""
    y = x.to(dtype)
    return weight.to(dtype) * (y * torch.rsqrt(y.square().mean(-1, keepdim=True) + eps))


def attention_probs(q: Tensor, k: Tensor, qpos: Tensor, kpos: Tensor, scale: float,
                    dtype: torch.dtype, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """softmax(scale * q.k + bias) over the keys each query sees (0 <= kpos <= qpos), in `dtype`.

    q [B, H, L, D], k [B, Hkv, S, D], qpos [B, L], kpos [B, Hkv, S], bias [B, Hkv, S] (per-key logit
    offsets, KeepKV's log vote counts; None: 0). Returns probs [B, H, L, S] (0 where not visible) and
    lse [B, H, L] (-inf for a row that sees nothing).
    """
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    logits = (q.to(dtype).reshape(B, Hkv, G * L, D) @ k.to(dtype).transpose(-1, -2)) * scale
    logits = logits.view(B, Hkv, G, L, S)
    if bias is not None:
        logits = logits + bias.to(dtype)[:, :, None, None, :]
    kp = kpos[:, :, None, None, :]
    visible = (kp >= 0) & (kp <= qpos[:, None, None, :, None])  # [B, Hkv, 1, L, S]
    logits = logits.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1).masked_fill(~visible, 0.0)  # rows seeing nothing: 0, not NaN
    return probs.reshape(B, H, L, S), lse.reshape(B, H, L)


def _attend(probs: Tensor, v: Tensor, kpos: Tensor) -> Tensor:
    """probs [B, H, L, S] @ v [B, Hkv, S, D] -> [B, H, L, D], GQA, in probs' dtype. Empty slots
    (kpos < 0) count as zero rows, so whatever they hold (even NaN) cannot leak into the output."""
    B, H, L, S = probs.shape
    Hkv = v.shape[1]
    v = v.to(probs.dtype).masked_fill((kpos < 0)[..., None], 0.0)
    return (probs.reshape(B, Hkv, H // Hkv * L, S) @ v).reshape(B, H, L, -1)


def _group_mean(x: Tensor, Hkv: int) -> Tensor:
    """[B, H, ...] -> [B, Hkv, ...]: the mean over the query heads that share a KV head."""
    return x.reshape(x.shape[0], Hkv, x.shape[1] // Hkv, *x.shape[2:]).mean(2)


def _decode_kpos(pos: Tensor, length: int) -> Tensor:
    """pos with slots >= length marked empty."""
    return pos.masked_fill(torch.arange(pos.shape[-1], device=pos.device) >= length, -1)


def rotate_half_dense(x: Tensor, cos: Tensor, sin: Tensor, dtype: torch.dtype) -> Tensor:
    """x cos + rotate_half(x) sin in `dtype` (cos, sin broadcast against x [..., D])."""
    y = x.to(dtype)
    y1, y2 = y.chunk(2, dim=-1)
    return y * cos.to(dtype) + torch.cat([-y2, y1], dim=-1) * sin.to(dtype)


def rope_keys(k: Tensor, cos: Tensor, sin: Tensor, rank: Tensor, dtype: torch.dtype) -> Tensor:
    """k [B, Hkv, C, D] rotated by table rows rank [B, Hkv, C] in `dtype`: k cos + rotate_half(k) sin
    (out-of-range ranks, those of empty slots, read row 0)."""
    row = rank.long().where((rank >= 0) & (rank < cos.shape[0]), 0)
    return rotate_half_dense(k, cos[row], sin[row], dtype)


def decode_attention_dense(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, length: int, scale: float,
                           dtype: torch.dtype, rope: tuple[Tensor, Tensor, Tensor] | None = None,
                           bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Decode attention in `dtype`: out [B, H, D] and probs [B, H, C] (0 for masked slots); with
    rope = (cos, sin, rank), over the keys rotated by rope_keys; bias [B, Hkv, C] added to the logits."""
    if rope is not None:
        k = rope_keys(k, *rope, dtype)
    qpos = torch.full((q.shape[0], 1), _NO_POS, dtype=torch.int32, device=q.device)
    kpos = _decode_kpos(pos, length)
    probs, _ = attention_probs(q[:, :, None], k, qpos, kpos, scale, dtype, bias)
    return _attend(probs, v, kpos)[:, :, 0], probs[:, :, 0]


def prefill_attention_dense(q: Tensor, k: Tensor, v: Tensor, qpos: Tensor, kpos: Tensor, scale: float,
                            dtype: torch.dtype, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Prefill attention in `dtype`: out [B, H, L, D] and lse [B, H, L] (bias: as attention_probs)."""
    probs, lse = attention_probs(q, k, qpos, kpos, scale, dtype, bias)
    return _attend(probs, v, kpos), lse


def column_scores_dense(q: Tensor, k: Tensor, qpos: Tensor, kpos: Tensor, score_scale: float,
                        dtype: torch.dtype, bias: Tensor | None = None) -> Tensor:
    """[B, Hkv, S]: sum over all rows of q of the group-mean softmax(score_scale * q.k + bias)."""
    probs, _ = attention_probs(q, k, qpos, kpos, score_scale, dtype, bias)
    return _group_mean(probs.sum(2), k.shape[1])


def value_norm_dense(v: Tensor, kind: int, dtype: torch.dtype) -> Tensor:
    """[B, Hkv, N]: Linf (kind 0), L1 (1) or squared L2 (2) of each value row, in `dtype`."""
    x = v.to(dtype)
    return {0: lambda: x.abs().amax(-1), 1: lambda: x.abs().sum(-1), 2: lambda: x.square().sum(-1)}[kind]()


def merged_rows(v: Tensor, w: Tensor, victim: Tensor, receiver: Tensor, weight: Tensor,
                dtype: torch.dtype) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor, Tensor]:
    """The WeightedKV merge in `dtype`: index (b, g, receiver) of every active head, the merged value
    rows [n, D] and the receivers' new weights [n]."""
    b, g = torch.nonzero((victim >= 0) & (receiver >= 0), as_tuple=True)
    r, j = receiver[b, g], victim[b, g]
    x, y = v[b, g, r].to(dtype), v[b, g, j].to(dtype)
    return (b, g, r), *_merged(x, y, w[b, g, r], weight[b, g], dtype)


def _merged(x: Tensor, y: Tensor, w_old: Tensor, add: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Receiver rows x and victim rows y [n, D] merged with weights w_old and add [n], in `dtype`."""
    x, y, w_old, add = x.to(dtype), y.to(dtype), w_old.to(dtype), add.to(dtype)
    total = w_old + add
    weighted = (w_old[:, None] * x + add[:, None] * y) / total[:, None]
    return torch.where(total[:, None] == 0, (x + y) / 2, weighted), total


# ---------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------

def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Exactly HF LlamaRMSNorm: normalise in fp32, cast to x's dtype, then multiply by weight."""
    check_rms_norm(x, weight, eps)
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, length: int, scale: float, out: Tensor,
                     score_acc: Tensor | None = None, probs_out: Tensor | None = None,
                     rope_cos: Tensor | None = None, rope_sin: Tensor | None = None,
                     rope_rank: Tensor | None = None, slot_index: Tensor | None = None,
                     bias: Tensor | None = None) -> None:
    """out = softmax(scale q.k + bias) @ v over slots s < length with pos >= 0; score_acc += the group-mean
    probability of each valid slot; probs_out = every slot's probability (0 if masked). With the rope
    tables, key s is first rotated by row rope_rank[s] of (rope_cos, rope_sin). With slot_index, k and v
    are a pool [B, R, D] and slot s of KV head g is row slot_index[b, g, s] of it (bias stays per head
    slot [B, H_kv, C]). bias: per-slot logit offsets (KeepKV's log vote counts), None = 0."""
    check_decode_attention(q, k, v, pos, length, out, score_acc, probs_out, rope_cos, rope_sin, rope_rank,
                           slot_index, bias)
    if slot_index is not None:
        check_pool_rows(slot_index, length, k.shape[1])
        k, v = pool_rows(k, slot_index), pool_rows(v, slot_index)
    rope = None
    if rope_rank is not None:
        check_rope_ranks(rope_rank, pos, length, rope_cos.shape[0])
        rope = (rope_cos, rope_sin, rope_rank)
    o, probs = decode_attention_dense(q, k, v, pos, length, scale, torch.float32, rope, bias)
    out.copy_(o)
    if probs_out is not None:
        probs_out.copy_(probs)
    if score_acc is not None:
        valid = _decode_kpos(pos, length) >= 0
        score_acc.copy_(torch.where(valid, score_acc + _group_mean(probs, pos.shape[1]), score_acc))


def rope_append(qkv: Tensor, cos: Tensor, sin: Tensor, slot: Tensor, rotate_key: bool, q_out: Tensor,
                k_cache: Tensor, v_cache: Tensor) -> None:
    """q_out = the H query heads of qkv rotated by (cos, sin); the key head g (rotated too if rotate_key)
    and the value head g go into slot slot[b, g] of k_cache / v_cache [B, H_kv, C, D], or into row
    slot[b, g] of a pool [B, 1, C, D] that the KV heads share. Rotation in fp32."""
    check_rope_append(qkv, cos, sin, slot, q_out, k_cache, v_cache)
    B, Hkv, (C, D) = slot.shape[0], slot.shape[1], k_cache.shape[2:]
    check_slot_indices("rope_append", slot, C)
    H = q_out.shape[1]
    q, k, v = qkv.view(B, H + 2 * Hkv, D).split([H, Hkv, Hkv], dim=1)
    q_out.copy_(rotate_half_dense(q, cos, sin, torch.float32))
    if rotate_key:
        k = rotate_half_dense(k, cos, sin, torch.float32)
    if k_cache.shape[1] != Hkv:  # a pool: head g's rows anywhere in it
        index = slot[..., None].expand(-1, -1, D)
        k_cache[:, 0].scatter_(1, index, k.to(k_cache.dtype))
        v_cache[:, 0].scatter_(1, index, v.to(v_cache.dtype))
        return
    index = slot[..., None, None].expand(-1, -1, 1, D)
    k_cache.scatter_(2, index, k[:, :, None].to(k_cache.dtype))
    v_cache.scatter_(2, index, v[:, :, None].to(v_cache.dtype))


def decode_layers(qkv: Sequence[Tensor], cos: Sequence[Tensor], sin: Sequence[Tensor], slot: Sequence[Tensor],
                  rotate_key: Sequence[bool], q_out: Sequence[Tensor], k_cache: Sequence[Tensor],
                  v_cache: Sequence[Tensor], pos: Sequence[Tensor], length: Sequence[int], scale: float,
                  out: Sequence[Tensor], score_acc: Sequence[Tensor | None], probs_out: Sequence[Tensor | None],
                  rope_cos: Sequence[Tensor | None], rope_sin: Sequence[Tensor | None],
                  rope_rank: Sequence[Tensor | None]) -> None:
    """For each request i: rope_append of its qkv row into its cache, then decode_attention of the rotated
    query q_out[i] over that cache (the arguments at index i of every list)."""
    n = len(qkv)
    if any(len(x) != n for x in (cos, sin, slot, rotate_key, q_out, k_cache, v_cache, pos, length, out, score_acc,
                                 probs_out, rope_cos, rope_sin, rope_rank)):
        raise ValueError(f"decode_layers: every list must hold one entry per request ({n} qkv tensors)")
    for i in range(n):
        rope_append(qkv[i], cos[i], sin[i], slot[i], rotate_key[i], q_out[i], k_cache[i], v_cache[i])
        decode_attention(q_out[i], k_cache[i], v_cache[i], pos[i], length[i], scale, out[i], score_acc[i],
                         probs_out[i], rope_cos[i], rope_sin[i], rope_rank[i])


def prefill_attention_chunked(q: Tensor, k: Tensor, v: Tensor, qpos: Tensor, kpos: Tensor, scale: float,
                              out: Tensor, lse: Tensor, col_scores: Tensor | None = None,
                              score_rows: int = 0, score_scale: float = 1.0, bias: Tensor | None = None, *,
                              chunk: int | None = None) -> None:
    """prefill_attention over `chunk` query rows at a time (default: about 4M probabilities held)."""
    check_prefill_attention(q, k, v, qpos, kpos, out, lse, col_scores, bias)
    B, H, L, _ = q.shape
    S = k.shape[2]
    chunk = chunk or max(1, _CHUNK_ELEMENTS // max(1, B * H * S))
    row0 = L - score_rows if 0 < score_rows < L else 0  # first row of the column-score window
    cols = torch.zeros(col_scores.shape, dtype=torch.float32, device=q.device) if col_scores is not None else None
    for t0 in range(0, L, chunk):
        t1 = min(L, t0 + chunk)
        o, l = prefill_attention_dense(q[:, :, t0:t1], k, v, qpos[:, t0:t1], kpos, scale, torch.float32, bias)
        out[:, :, t0:t1] = o
        lse[:, :, t0:t1] = l
        if cols is not None and t1 > row0:
            w0 = max(t0, row0)
            cols += column_scores_dense(q[:, :, w0:t1], k, qpos[:, w0:t1], kpos, score_scale, torch.float32, bias)
    if col_scores is not None:
        col_scores.copy_(cols)


def prefill_attention(q: Tensor, k: Tensor, v: Tensor, qpos: Tensor, kpos: Tensor, scale: float,
                      out: Tensor, lse: Tensor, col_scores: Tensor | None = None, score_rows: int = 0,
                      score_scale: float = 1.0, bias: Tensor | None = None) -> None:
    """Attention of L queries over S slots, key s visible to query t iff 0 <= kpos[s] <= qpos[t]:
    out, lse (log-sum-exp of scale q.k + bias per row) and, if given, col_scores = sum over the last
    `score_rows` rows (all if <= 0 or >= L) of the group-mean softmax(score_scale q.k + bias). bias
    [B, H_kv, S]: per-key logit offsets (KeepKV's log vote counts), None = 0. Dense."""
    prefill_attention_chunked(q, k, v, qpos, kpos, scale, out, lse, col_scores, score_rows, score_scale, bias,
                              chunk=max(1, q.shape[2]))


def value_norm(v: Tensor, kind: int, out: Tensor) -> None:
    """out[b, g, n] = Linf (kind 0), L1 (1) or squared L2 (2) of v[b, g, n], in fp32."""
    check_value_norm(v, kind, out)
    out.copy_(value_norm_dense(v, kind, torch.float32))


def select_victim(score: Tensor, pos: Tensor, lo: int, hi: int, out_idx: Tensor) -> None:
    """out_idx[b, g] = the slot with lo <= pos < hi and the lowest score (NaN above every number,
    ties to the lower pos, then the lower slot); -1 if no slot is eligible."""
    check_select_victim(score, pos, out_idx)
    eligible = (pos >= lo) & (pos < hi)
    numeric = eligible & ~score.isnan()
    has_numeric = numeric.any(-1, keepdim=True)
    lowest = score.masked_fill(~numeric, float("inf")).amin(-1, keepdim=True)
    # Candidates: the numeric slots at the lowest score; only when there are none, the NaN slots.
    cand = torch.where(has_numeric, numeric & (score == lowest), eligible)
    first_pos = pos.masked_fill(~cand, _NO_POS).amin(-1, keepdim=True)
    best = cand & (pos == first_pos)
    idx = best.int().argmax(-1)  # the first (lowest) slot among equals
    out_idx.copy_(torch.where(best.any(-1), idx, -1))


def head_totals(score: Tensor, valid: Tensor) -> Tensor:
    """(B, Hkv, 1): what adaptive allocation divides each head's scores by, their sum on the valid entries in
    fp64, rounded to fp32 (1 where that sum is not positive: the head keeps its raw scores). The kernels'
    rule, and prefill's (engine/kv/allocation.py), so a prompt and a decode step normalise alike."""
    total = torch.where(valid, score.double(), 0.0).sum(2, keepdim=True).float()
    return torch.where(total > 0, total, 1.0)


def adaptive_victims(score: Tensor, pos: Tensor, lo: int, hi: Tensor, min_share: int, limit: Tensor,
                     out_entry: Tensor) -> None:
    """out_entry[b, i] = the entry (head C + slot) that row b (a layer) evicts i-th, -1 for none: in rows
    holding more than limit[b] valid entries (pos >= 0), the layer's lowest key taken n times over, where
    an entry is eligible if max(lo, 0) <= pos <= hi[0] and its key score / total (the head's total: the sum
    of its valid scores in fp64, rounded to fp32, 1 unless positive) is finite, and a head gives at most
    its valid count - min_share. Ties to the lower entry. Reads no host value: graph-capturable."""
    check_adaptive_victims(score, pos, hi, limit, out_entry)
    B, Hkv, C = score.shape
    valid = pos >= 0
    counts = valid.sum(2)
    key = score / head_totals(score, valid)
    ok = (pos >= max(lo, 0)) & (pos <= hi) & key.isfinite()
    key = torch.where(ok, key, math.inf).view(B, Hkv * C)
    room = counts - min_share
    over = counts.sum(1) > limit
    head = torch.arange(Hkv * C, device=score.device) // C
    for i in range(out_entry.shape[1]):
        left = torch.where(room[:, head] > 0, key, math.inf)
        entry = left.argmin(1, keepdim=True)  # the first lowest
        taken = (left.gather(1, entry) < math.inf) & over[:, None]
        out_entry[:, i : i + 1] = torch.where(taken, entry, -1)
        key.scatter_(1, entry, math.inf)
        room.scatter_add_(1, entry // C, -taken.long())


def compact(k: Tensor, v: Tensor, pos: Tensor, state: Sequence[Tensor], keep_idx: Tensor) -> None:
    """In place: slot keep_idx[b, g, i] moves to slot i; slots K.. become empty (pos -1, rest 0)."""
    check_compact(k, v, pos, state, keep_idx)
    check_compact_indices(keep_idx, k.shape[2])
    K = keep_idx.shape[2]
    rows = keep_idx[..., None].expand(-1, -1, -1, k.shape[3])
    for t, idx, empty in [(k, rows, 0), (v, rows, 0), (pos, keep_idx, -1), *((s, keep_idx, 0) for s in state)]:
        kept = t.gather(2, idx)  # a copy, so a move onto a slot still to be read cannot corrupt it
        t[:, :, :K] = kept
        t[:, :, K:] = empty


def remove_entries(pos: Tensor, state: Sequence[Tensor], slot_index: Tensor | None, entries: Tensor, scratch: int,
                   freed_out: Tensor) -> None:
    """In place, the entries e = entries[b, i] of row b (head C + slot; -1: none) leave at once: pos -1, every
    state tensor 0, and with slot_index the pool row each held is freed (its slot_index becomes `scratch`).
    freed_out[b] = the rows freed, ordered by KV head and then as listed, then -1s (all -1 without
    slot_index). An entry listed again, or whose slot_index is already `scratch`, frees no row. Reads and
    writes only those entries."""
    check_remove_entries(pos, state, slot_index, entries, scratch, freed_out)
    B, Hkv, C = pos.shape
    n = entries.shape[1]
    check_index_range("remove_entries", "entries", entries, Hkv * C, "entries (head C + slot)")
    taken, flat = entries >= 0, entries.clamp(min=0)
    earlier = torch.ones(n, n, dtype=torch.bool, device=pos.device).tril(-1)  # [i, k]: k listed before i
    first = ~((entries[:, :, None] == entries[:, None, :]) & earlier).any(2)
    frees = torch.zeros_like(taken)
    if slot_index is not None:
        row = slot_index.view(B, -1).gather(1, flat)
        frees = taken & first & (row != scratch)
        head = torch.where(frees, entries // C, Hkv)  # the rows not freed after every head's
        order = head.argsort(dim=1, stable=True)
        freed_out.copy_(torch.where(frees, row, -1).gather(1, order))
    else:
        freed_out.fill_(-1)
    b, i = torch.nonzero(taken, as_tuple=True)
    for t, empty in ((pos, -1), *((s, 0.0) for s in state), *(((slot_index, scratch),) if slot_index is not None else ())):
        t.view(B, -1)[b, flat[b, i]] = empty


def merge_value(v: Tensor, w: Tensor, victim: Tensor, receiver: Tensor, weight: Tensor,
                slot_index: Tensor | None = None) -> None:
    """WeightedKV merge, in place, in fp32: v[r] = (w[r] v[r] + weight v[j]) / (w[r] + weight) (the
    plain mean if that sum is 0) and w[r] += weight, for r = receiver, j = victim (-1 = skip). With
    slot_index, v is a pool [P, R, D] and slot s of (b, g) is row slot_index[b, g, s] of pool batch b % P."""
    check_merge_value(v, w, victim, receiver, weight, slot_index)
    for name, t in (("victim", victim), ("receiver", receiver)):
        check_index_range("merge_value", name, t, w.shape[2], "slot indices")
    b, g = torch.nonzero((victim >= 0) & (receiver >= 0), as_tuple=True)
    _merge_rows("merge_value", v, w, slot_index, b, g, receiver[b, g], victim[b, g], w[b, g, receiver[b, g]],
                weight[b, g])


def merge_neighbour(v: Tensor, w: Tensor, pos: Tensor, abar: Tensor, picks: Tensor, sinks: int, after: bool,
                    receiver_out: Tensor, slot_index: Tensor | None = None) -> None:
    """WeightedKV's merge into a neighbour, in place, each row's picks in order. Pick i of row b is the entry
    e = picks[b, i] (KV head g = e // C, slot j = e % C; -1: none). If slot j holds a token (pos >= 0), its
    receiver m is the slot of head g holding the nearest larger position (`after`), else the nearest smaller
    one, among the other slots holding a non-sink token (pos >= sinks), and if that side has none the nearest
    on the other side (ties: the lower slot). The victim's position is emptied (pos[j] = -1: later picks
    neither see nor merge it), and with a receiver, w[m] starts from abar[m] if it is 0 and then v[m], w[m]
    merge as merge_value's with weight abar[j]. receiver_out[b, i] = m (-1: no merge). slot_index: as
    merge_value's. Vectorised over rows, one pick at a time: a pick sees the earlier picks' merges."""
    check_merge_neighbour(v, w, pos, abar, picks, sinks, receiver_out, slot_index)
    B, Hkv, C = w.shape
    check_index_range("merge_neighbour", "picks", picks, Hkv * C, "entries (head C + slot)")
    rows, slots = torch.arange(B, device=w.device), torch.arange(C, device=w.device)
    big = torch.iinfo(torch.int32).max
    for i in range(picks.shape[1]):
        g, j, p, go = _picked(pos, picks, i)
        pj = p[rows, j][:, None]
        cand = (p >= sinks) & (slots != j[:, None])  # holds a token too: sinks >= 0
        above = torch.where(cand & (p > pj), p, big)
        below = torch.where(cand & (p < pj), p, -1)
        nearest_above = (above == above.min(1, keepdim=True).values).int().argmax(1)  # the first such slot
        nearest_below = (below == below.max(1, keepdim=True).values).int().argmax(1)
        has_above, has_below = (above < big).any(1), (below >= 0).any(1)
        first, second = ((nearest_above, has_above), (nearest_below, has_below))[:: 1 if after else -1]
        m = torch.where(first[1], first[0], torch.where(second[1], second[0], -1))
        m = torch.where(go, m, -1)
        pos[rows[go], g[go], j[go]] = -1
        receiver_out[:, i] = m
        b = torch.nonzero(m >= 0)[:, 0]
        gb, mb, jb = g[b], m[b], j[b]
        w_old = w[b, gb, mb]
        _merge_rows("merge_neighbour", v, w, slot_index, b, gb, mb, jb, torch.where(w_old == 0, abar[b, gb, mb], w_old),
                    abar[b, gb, jb])


def merge_spread(v: Tensor, pos: Tensor, abar: Tensor, picks: Tensor, sinks: int, window: int,
                 receivers_out: Tensor, slot_index: Tensor | None = None) -> None:
    """CaM's merge, in place, each row's picks in order. Pick i of row b is the entry e = picks[b, i] (KV head
    g = e // C, slot j = e % C; -1: none). If slot j holds a token (pos >= 0), its receivers are the (at most)
    `window` slots of head g holding the non-sink tokens (pos >= sinks) with the next larger positions (ties:
    the lower slot), the victim's position is emptied (later picks neither see nor merge it), and with m >= 1
    receivers each receiver's value gets, in fp32,

        v[r] += p / window * v[j],   p = clamp(abar[j] / (sum of the receivers' abar / m), 0, 1)

    (p = 0 where that ratio is 0/0, 1 where it is x/0). receivers_out[b, i] = m (0: no merge). slot_index: as
    merge_value's (the victim's row checked first, then its receivers' by position). Vectorised over rows,
    one pick at a time: a pick sees the earlier picks' merges."""
    check_merge_spread(v, pos, abar, picks, sinks, window, receivers_out, slot_index)
    B, Hkv, C = pos.shape
    check_index_range("merge_spread", "picks", picks, Hkv * C, "entries (head C + slot)")
    rows, slots = torch.arange(B, device=pos.device), torch.arange(C, device=pos.device)
    none = torch.iinfo(torch.int64).max
    for i in range(picks.shape[1]):
        g, j, p, go = _picked(pos, picks, i)
        pj = p[rows, j]
        candidate = (p > pj[:, None]) & (p >= sinks) & go[:, None]
        order = torch.where(candidate, p.long() * C + slots, none)  # (position, slot)
        nearest = order.topk(min(window, C), dim=1, largest=False)  # sorted
        r, ok = nearest.indices, nearest.values < none
        m = ok.sum(1)
        a = abar[rows, g]  # (B, C)
        mean = torch.where(ok, a.gather(1, r), 0.0).sum(1) / m.clamp(min=1)
        share = (a[rows, j] / mean).nan_to_num(0.0, posinf=1.0).clamp(0.0, 1.0) / window
        pos[rows[go], g[go], j[go]] = -1
        receivers_out[:, i] = m
        b, t = torch.nonzero(ok, as_tuple=True)
        _spread_rows(v, slot_index, b, g[b], r[b, t], j[b], share[b])


def _spread_rows(v: Tensor, slot_index: Tensor | None, b: Tensor, g: Tensor, r: Tensor, j: Tensor,
                 share: Tensor) -> None:
    """v[b, g, r] += share v[b, g, j] in fp32 (the slots' rows of a pool with slot_index, each victim's row
    checked before its receivers', as the kernels do)."""
    if slot_index is None:
        v[b, g, r] = (v[b, g, r].float() + share[:, None] * v[b, g, j].float()).to(v.dtype)
        return
    R = v.shape[1]
    for i in range(b.shape[0]):
        first = i == 0 or b[i] != b[i - 1]  # a row's first receiver: its victim's row first
        for s in ((int(j[i]),) if first else ()) + (int(r[i]),):
            x = int(slot_index[b[i], g[i], s])
            if not 0 <= x < R:
                raise IndexError(f"merge_spread: slot_index must hold pool rows in [0, R) = [0, {R}) on the merged "
                                 f"slots, got {x} at [{int(b[i])}, {int(g[i])}, {s}]")
    pb, row_r, row_j = b % v.shape[0], slot_index[b, g, r].long(), slot_index[b, g, j].long()
    v[pb, row_r] = (v[pb, row_r].float() + share[:, None] * v[pb, row_j].float()).to(v.dtype)


def nearest_key(k: Tensor, pos: Tensor, victim: Tensor, sinks: int, receiver_out: Tensor, similarity_out: Tensor,
                slot_index: Tensor | None = None) -> None:
    """For each (b, g) with a victim j = victim[b, g] >= 0: among the other slots holding a non-sink token (pos
    >= sinks), the one whose key is the most cosine-similar to slot j's, dot(k_s, k_j) / (max(|k_s|, 1e-8)
    max(|k_j|, 1e-8)) in fp32: receiver_out = that slot (ties: the lower one; a NaN similarity never wins),
    similarity_out = its similarity; -1 and -inf where there is no victim or no such slot. With slot_index, k
    is a pool [P, R, D] as merge_value's v (the rows of the victim and its candidates must be in [0, R))."""
    check_nearest_key(k, pos, victim, sinks, receiver_out, similarity_out, slot_index)
    check_index_range("nearest_key", "victim", victim, pos.shape[2], "slot indices")
    receiver, similarity = _nearest("nearest_key", k, pos, victim, sinks, slot_index)
    receiver_out.copy_(receiver)
    similarity_out.copy_(similarity)


def _nearest(op: str, k: Tensor, pos: Tensor, victim: Tensor, sinks: int,
             slot_index: Tensor | None) -> tuple[Tensor, Tensor]:
    """nearest_key's receivers and similarities (B, H_kv) for victims (B, H_kv) in range; `op` names the caller
    in the error for a bad pool row."""
    B, Hkv, C = pos.shape
    j = victim.clamp(min=0)[..., None]  # (B, Hkv, 1)
    slots = torch.arange(C, device=pos.device)
    compared = (pos >= sinks) & (slots != j) & (victim >= 0)[..., None]
    if slot_index is not None:
        R = k.shape[1]
        where = _first((compared | ((slots == j) & (victim >= 0)[..., None])) & ((slot_index < 0) | (slot_index >= R)))
        if where is not None:
            raise IndexError(f"{op}: slot_index must hold pool rows in [0, R) = [0, {R}) on the compared "
                             f"slots, got {int(slot_index[where])} at {list(where)}")
        batch = (torch.arange(B, device=k.device) % k.shape[0])[:, None, None]
        k = k[batch, slot_index.long().clamp(0, R - 1)]
    keys = k.float()
    k_j = keys.gather(2, j[..., None].expand(-1, -1, 1, keys.shape[3]))
    norm = lambda x: x.square().sum(-1).sqrt().clamp_min(1e-8)
    similarity = (keys * k_j).sum(-1) / (norm(keys) * norm(k_j))
    compared &= ~similarity.isnan()
    best = similarity.masked_fill(~compared, -math.inf).amax(2, keepdim=True)
    first = (compared & (similarity == best)).int().argmax(2)
    found = compared.any(2)
    return torch.where(found, first, -1), torch.where(found, best[..., 0], -math.inf)


def merge_zip(k: Tensor, v: Tensor, logp: Tensor, pos: Tensor, q: Tensor, picks: Tensor, sinks: int,
              min_similarity: float, scale: float, receiver_out: Tensor, slot_index: Tensor | None = None) -> None:
    """KeepKV's ZIP merge, in place, each row's picks in order. Pick i of row b is the entry e = picks[b, i]
    (KV head g = e // C, slot j = e % C; -1: none). If slot j holds a token (pos >= 0), its receiver c is the
    other slot of head g holding a non-sink token whose key is the most cosine-similar to slot j's
    (nearest_key's rule, over the keys as they are now), and the victim's position is emptied (later picks
    neither see nor merge it). Where c exists and that similarity >= min_similarity, with the weights
    w_x = exp(logp[x] + scale q.k_x) at the reference query q = q[b, g], in fp32:

        logp[c] = log(exp(logp[e]) + exp(logp[c]))
        v[c] = (w_e v_e + w_c v_c) / (w_e + w_c)
        k[c] = k_bar + a q,  k_bar = (w_e k_e + w_c k_c) / (w_e + w_c),  a = (t - q.k_bar) / q.q (0 where q.q = 0),
        t = (log(w_e + w_c) - logp[c]) / scale  (the new logp[c])

    so the merged slot draws exactly the attention mass (votes x exp(logit)) and value at q that the two drew.
    receiver_out[b, i] = c (-1: no merge). slot_index: k and v are pools as merge_value's v (nearest_key's
    rows checked). Vectorised over rows, one pick at a time: a pick sees the earlier picks' merges."""
    check_merge_zip(k, v, logp, pos, q, picks, sinks, min_similarity, scale, receiver_out, slot_index)
    B, Hkv, C = pos.shape
    check_index_range("merge_zip", "picks", picks, Hkv * C, "entries (head C + slot)")
    rows = torch.arange(B, device=pos.device)
    for i in range(picks.shape[1]):
        g, j, _, taken = _picked(pos, picks, i)
        victim = torch.full((B, Hkv), -1, dtype=torch.int64, device=pos.device)
        victim[rows, g] = torch.where(taken, j, -1)
        receiver, similarity = _nearest("merge_zip", k, pos, victim, sinks, slot_index)
        c, sim = receiver[rows, g], similarity[rows, g]
        pos[rows[taken], g[taken], j[taken]] = -1
        go = (c >= 0) & (sim >= min_similarity)
        receiver_out[:, i] = torch.where(go, c, -1)
        b = torch.nonzero(go)[:, 0]
        _zip_rows(k, v, logp, q, slot_index, b, g[b], j[b], c[b], scale)


def _zip_rows(k: Tensor, v: Tensor, logp: Tensor, q: Tensor, slot_index: Tensor | None, b: Tensor, g: Tensor,
              j: Tensor, c: Tensor, scale: float) -> None:
    """merge_zip's merge of slot j into slot c of (b, g), for rows whose pool rows were checked."""
    at = lambda s: (b, g, s) if slot_index is None else (b % k.shape[0], slot_index[b, g, s].long())
    k_e, k_c, v_e, v_c = k[at(j)].float(), k[at(c)].float(), v[at(j)].float(), v[at(c)].float()
    qb = q[b, g]
    lp_e, lp_c = logp[b, g, j], logp[b, g, c]
    le, lc = lp_e + scale * (qb * k_e).sum(-1), lp_c + scale * (qb * k_c).sum(-1)  # log w_e, log w_c
    top = torch.maximum(le, lc)
    w_e, w_c = (le - top).exp(), (lc - top).exp()
    total = w_e + w_c
    lp_r = torch.logaddexp(lp_e, lp_c)
    target = (top + total.log() - lp_r) / scale
    w_e, w_c, total = w_e[:, None], w_c[:, None], total[:, None]
    k_bar = (w_e * k_e + w_c * k_c) / total
    qq = (qb * qb).sum(-1)
    a = torch.where(qq > 0, (target - (qb * k_bar).sum(-1)) / qq.clamp(min=1e-30), 0.0)
    v[at(c)] = ((w_e * v_e + w_c * v_c) / total).to(v.dtype)
    k[at(c)] = (k_bar + a[:, None] * qb).to(k.dtype)
    logp[b, g, c] = lp_r


def _picked(pos: Tensor, picks: Tensor, i: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pick i of every row (entries head C + slot, -1: none; the merge ops' picks): its KV head g and slot j
    (B,), a copy of that head's positions (B, C), and whether it takes a token (a pick of a slot holding one)."""
    rows = torch.arange(pos.shape[0], device=pos.device)
    e = picks[:, i].clamp(min=0)
    g, j = e // pos.shape[2], e % pos.shape[2]
    p = pos[rows, g]
    return g, j, p, (picks[:, i] >= 0) & (p[rows, j] >= 0)


def _merge_rows(op: str, v: Tensor, w: Tensor, slot_index: Tensor | None, b: Tensor, g: Tensor, r: Tensor, j: Tensor,
                w_old: Tensor, add: Tensor) -> None:
    """v[b, g, r] = the merge of it and v[b, g, j] with weights w_old and add (the slots' rows of a pool with
    slot_index: each receiver's row checked, then its victim's, as the kernels do), w[b, g, r] = their sum."""
    if slot_index is None:
        rows, total = _merged(v[b, g, r], v[b, g, j], w_old, add, torch.float32)
        v[b, g, r] = rows.to(v.dtype)
        w[b, g, r] = total
        return
    R = v.shape[1]
    for i in range(b.shape[0]):
        for s in (int(r[i]), int(j[i])):
            x = int(slot_index[b[i], g[i], s])
            if not 0 <= x < R:
                raise IndexError(f"{op}: slot_index must hold pool rows in [0, R) = [0, {R}) on the merged "
                                 f"slots, got {x} at [{int(b[i])}, {int(g[i])}, {s}]")
    pb, row_r, row_j = b % v.shape[0], slot_index[b, g, r].long(), slot_index[b, g, j].long()
    rows, total = _merged(v[pb, row_r], v[pb, row_j], w_old, add, torch.float32)
    v[pb, row_r] = rows.to(v.dtype)
    w[b, g, r] = total


def matvec_input(x: Tensor, norm: Tensor | None, eps: float, swiglu: bool,
                 norm_op: Callable[[Tensor, Tensor, float], Tensor] = rms_norm) -> Tensor:
    """The rows matvec multiplies: x, norm_op(x, norm, eps), or silu of x's first half times its second
    (engine.ops.linear passes its rms_norm, so a prompt is normalised by the compiled kernel)."""
    if norm is not None:
        return norm_op(x, norm, eps)
    if swiglu:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
    return x


def matvec(x: Tensor, w: Tensor, out: Tensor, accumulate: bool = False, norm: Tensor | None = None,
           eps: float = 0.0, swiglu: bool = False) -> None:
    """out = F.linear(matvec_input(x, norm, eps, swiglu), w), or out += it with `accumulate` (the
    product rounded to out's dtype first, as out.add_(F.linear(h, w)))."""
    check_matvec(x, w, out, norm, eps, swiglu)
    check_matvec_overlap(x, w, out)
    y = F.linear(matvec_input(x, norm, eps, swiglu), w)
    if accumulate:
        out.add_(y)
    else:
        out.copy_(y)


def dequantize(blocks: Tensor, qtype: int, out: Tensor) -> None:
    """out [N, K] = the weights of GGUF blocks [N, row_bytes] of type qtype (QUANT_TYPES), each exactly the
    float32 value gguf.quants.dequantize gives it (ggml's operations: Q4_0 d * (q - 8), Q4_1 d * q + m,
    Q8_0 q * d, Q4_K (d * sc) * q - dmin * m, Q6_K (d * sc) * (q - 32), each rounded to float32 in turn),
    then rounded to out's dtype (bf16, fp16) as Tensor.copy_ rounds. The kernels must give the same bits."""
    check_dequantize(blocks, qtype, out)
    check_dequantize_overlap(blocks, out)
    if out.numel():
        from gguf.quants import dequantize as gguf_dequantize  # gguf's numpy code: obviously ggml's numbers

        w = gguf_dequantize(blocks.cpu().numpy(), qtype)
        out.copy_(torch.from_numpy(w).reshape(out.shape))


def qmatvec(x: Tensor, blocks: Tensor, qtype: int, out: Tensor, accumulate: bool = False, norm: Tensor | None = None,
            eps: float = 0.0, swiglu: bool = False) -> None:
    """matvec by w = dequantize(blocks, qtype) in float32: out = F.linear(h, w) with h = matvec_input(x, norm,
    eps, swiglu) in x's dtype, the product in float32 (summed in any order) then rounded to out's dtype; with
    `accumulate`, out += that rounded product. On the CPU x, norm and out are float32 (the same bits in and
    out as matvec by the dequantized fp32 w, up to summation order); a GPU also takes fp16 and bf16 x."""
    check_qmatvec(x, blocks, qtype, out, norm, eps, swiglu)
    check_qmatvec_overlap(x, blocks, out)
    w = torch.empty(blocks.shape[0], x.shape[-1] // 2 if swiglu else x.shape[-1], device=blocks.device)
    dequantize(blocks, qtype, w)
    y = F.linear(matvec_input(x, norm, eps, swiglu).float(), w).to(out.dtype)
    if accumulate:
        out.add_(y)
    else:
        out.copy_(y)


# The weight types whose products qmatvec_q8 makes with activations quantized to 8 bits (the K-quants' keep fp32).
Q8_ACTIVATION_TYPES = (2, 3, 8)


def quantize_q8(h: Tensor) -> Tensor:
    """h [..., K] (K a multiple of 32) as llama.cpp's Q8_0 activations see it, dequantized: each block of 32
    values becomes d * round(h / d) with d = max|h| / 127 (h * (1 / d) in float32, rounded to nearest, ties to
    even; all 0 where d is 0; NaN where the block holds an inf or NaN)."""
    blocks = h.float().reshape(*h.shape[:-1], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    d = torch.where(blocks.isfinite().all(-1, keepdim=True), d, torch.nan)
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    codes = (blocks * inv).round()
    return (d.double() * codes.double()).reshape(h.shape)


def qmatvec_q8(x: Tensor, blocks: Tensor, qtype: int, out: Tensor, accumulate: bool = False,
               norm: Tensor | None = None, eps: float = 0.0, swiglu: bool = False) -> None:
    """qmatvec with the activations as llama.cpp computes them for Q4_0, Q4_1 and Q8_0 weights: out =
    F.linear(quantize_q8(h), dequantize(blocks)) (in float64 here; the kernel sums each block's integer dot
    product exactly and scales it once), rounded to float32; (+)= as in qmatvec. Other types: qmatvec."""
    op = "qmatvec_q8"
    check_qmatvec(x, blocks, qtype, out, norm, eps, swiglu, op)
    check_qmatvec_overlap(x, blocks, out, op)
    if qtype not in Q8_ACTIVATION_TYPES:
        qmatvec(x, blocks, qtype, out, accumulate, norm, eps, swiglu)
        return
    w = torch.empty(blocks.shape[0], x.shape[-1] // 2 if swiglu else x.shape[-1], device=blocks.device)
    dequantize(blocks, qtype, w)
    y = F.linear(quantize_q8(matvec_input(x, norm, eps, swiglu)), w.double()).to(out.dtype)
    if accumulate:
        out.add_(y)
    else:
        out.copy_(y)
