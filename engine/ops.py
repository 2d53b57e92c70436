"""The kernel entry points the model, the cache and the policies call.

Each function runs the compiled op (torch.ops.engine.*, built from csrc/ as `engine._C`) or, when
the extension is missing, has no kernel for the tensors' device, or `ENGINE_REFERENCE=1` was set at start-up,
the plain PyTorch version in engine.reference (one warning when that happens by necessity rather
than by request). Both take the same arguments, write the same outputs and reject bad input with
the same exception and message. Tests force either path with `use_reference`.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from engine import reference

try:
    from engine import _C  # loading it registers torch.ops.engine.*

    HAVE_EXTENSION = True
except ImportError:
    HAVE_EXTENSION = False

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}
# Read once: an environment lookup costs ~2 us, and a decode step makes ~300 op calls.
REFERENCE_BY_ENV = os.environ.get("ENGINE_REFERENCE") == "1"
_forced: contextvars.ContextVar[bool | None] = contextvars.ContextVar("engine_force_reference", default=None)


@contextlib.contextmanager
def use_reference(flag: bool = True) -> Iterator[None]:
    """Within the block, run the reference (True) or the compiled ops (False), whatever the env."""
    if not flag and not HAVE_EXTENSION:
        raise RuntimeError("engine._C is not built, so the compiled ops cannot be forced "
                           "(pip install --no-build-isolation -e .)")
    token = _forced.set(flag)
    try:
        yield
    finally:
        _forced.reset(token)


@functools.cache
def has_kernel(op: str, device_type: str) -> bool:
    """Whether engine._C has a kernel for `op` (e.g. "decode_attention") on `device_type` ("cuda")."""
    if not HAVE_EXTENSION:
        return False
    key = _DISPATCH_KEYS.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"engine::{op}", key)


@functools.cache
def _compiled(op: str, device_type: str) -> Callable:
    """The compiled op for tensors on `device_type`. On CPU the kernel's direct binding (engine._C.cpu:
    ~1.5 us less per call than the dispatcher, ~180 calls per decode step), elsewhere the op's one
    overload (calling it skips the packet's overload resolution, ~1 us a call)."""
    if device_type == "cpu":
        return getattr(_C.cpu, op)
    return getattr(torch.ops.engine, op).default


@functools.cache
def _kernel(op: str, device_type: str) -> Callable | None:
    """The compiled op where engine._C has one for the device, else None (one cached lookup per call)."""
    return _compiled(op, device_type) if has_kernel(op, device_type) else None


@functools.cache
def _warn_fallback(reason: str) -> None:
    warnings.warn(f"{reason}; using the slow PyTorch reference kernels (engine.reference)", stacklevel=4)


def compiled_kernel(op: str, device: torch.device) -> Callable | None:
    """The compiled kernel ops.<op> calls now for tensors on `device`, or None where it runs the reference
    (by request, or for want of a kernel): _impl's choice, and a binder's (engine/decode/plan.py)."""
    forced = _forced.get()
    if forced or (forced is None and REFERENCE_BY_ENV) or not HAVE_EXTENSION:
        return None
    return _kernel(op, device.type)


def _impl(op: str, device: torch.device, fallback: Callable) -> Callable:
    """The compiled op or its reference, for tensors on `device`."""
    kernel = compiled_kernel(op, device)
    if kernel is not None:
        return kernel
    forced = _forced.get()
    if forced is False:  # compiled by request where there is no kernel: the op itself says so
        return _compiled(op, device.type)
    if forced is None and not REFERENCE_BY_ENV:  # the reference by necessity, not by request
        _warn_fallback(f"engine._C has no {device.type} kernel for {op}" if HAVE_EXTENSION
                       else "engine._C is not built (pip install --no-build-isolation -e .)")
    return fallback


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF LlamaRMSNorm: weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)."""
    return _impl("rms_norm", x.device, reference.rms_norm)(x, weight, eps)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, length: int, scale: float, out: Tensor,
                     score_acc: Tensor | None = None, probs_out: Tensor | None = None,
                     rope: tuple[Tensor, Tensor, Tensor] | None = None, slot_index: Tensor | None = None,
                     bias: Tensor | None = None) -> None:
    """One query per sequence over cache slots s < length with pos >= 0 (GQA). Writes out [B, H, D];
    adds each valid slot's group-mean probability into score_acc [B, Hkv, C]; writes every slot's
    probability (0 if masked) into probs_out [B, H, C]. rope = (cos [P, D], sin [P, D], rank
    [B, Hkv, C] int32): keys stored before RoPE, each rotated on the fly by its slot's table row.
    slot_index [B, Hkv, C] int32: k and v are a pool [B, R, D] shared by the KV heads, and slot s of
    head g is pool row slot_index[b, g, s] (in [0, R) on every slot < length, empty ones too).
    bias [B, Hkv, C] fp32: added to slot s's logit for every query head of its group (KeepKV's log vote
    counts; indexed by head slot, not pool row); None: no bias, the plain kernel."""
    _impl("decode_attention", k.device, reference.decode_attention)(
        q, k, v, pos, length, scale, out, score_acc, probs_out, *(rope or (None, None, None)), slot_index, bias)


def prefill_attention(q: Tensor, k: Tensor, v: Tensor, qpos: Tensor, kpos: Tensor, scale: float, out: Tensor,
                      lse: Tensor, col_scores: Tensor | None = None, score_rows: int = 0,
                      score_scale: float = 1.0, bias: Tensor | None = None) -> None:
    """L queries over S slots, causal by position (0 <= kpos <= qpos). Writes out [B, H, L, D], lse
    [B, H, L] and, if given, col_scores [B, Hkv, S]: the sum over the last score_rows rows (all if
    <= 0) of the group-mean softmax(score_scale q.k). bias [B, Hkv, S] fp32: added to key s's logits
    (both scales; KeepKV's log vote counts), None: no bias."""
    _impl("prefill_attention", k.device, reference.prefill_attention_chunked)(
        q, k, v, qpos, kpos, scale, out, lse, col_scores, score_rows, score_scale, bias)


def rope_append(qkv: Tensor, cos: Tensor, sin: Tensor, slot: Tensor, rotate_key: bool, q_out: Tensor,
                k_cache: Tensor, v_cache: Tensor) -> None:
    """A decode step's prologue: q_out [B, H, D] = the query heads of qkv [B, (H + 2 H_kv) D] rotated by
    (cos, sin) [D]; key head g (rotated too if rotate_key) and value head g into slot slot[b, g] of
    k_cache / v_cache [B, H_kv, C, D], or into row slot[b, g] of a pool [B, 1, C, D] the KV heads share. Rotation in fp32, each product rounded (Rope.rotate_by's bits)."""
    _impl("rope_append", k_cache.device, reference.rope_append)(qkv, cos, sin, slot, rotate_key, q_out,
                                                                k_cache, v_cache)


def decode_layers(qkv: Sequence[Tensor], cos: Sequence[Tensor], sin: Sequence[Tensor], slot: Sequence[Tensor],
                  rotate_key: Sequence[bool], q_out: Sequence[Tensor], k_cache: Sequence[Tensor],
                  v_cache: Sequence[Tensor], pos: Sequence[Tensor], length: Sequence[int], scale: float,
                  out: Sequence[Tensor], score_acc: Sequence[Tensor | None], probs_out: Sequence[Tensor | None],
                  rope_cos: Sequence[Tensor | None], rope_sin: Sequence[Tensor | None],
                  rope_rank: Sequence[Tensor | None]) -> None:
    """One decode layer of several single-sequence caches in one call: for each request i, rope_append then
    decode_attention with the arguments at index i of every list (None where an optional one is absent).
    The CPU kernel spreads the requests over the threads (each one's attention is too small to split) and
    gives each request the bits of its own two calls: a batched serving step (engine/decode/batch.py)."""
    _impl("decode_layers", k_cache[0].device, reference.decode_layers)(
        list(qkv), list(cos), list(sin), list(slot), list(rotate_key), list(q_out), list(k_cache), list(v_cache),
        list(pos), list(length), scale, list(out), list(score_acc), list(probs_out), list(rope_cos),
        list(rope_sin), list(rope_rank))


def value_norm(v: Tensor, kind: int, out: Tensor) -> None:
    """out [B, Hkv, N] = per-row Linf (kind 0), L1 (1) or squared L2 (2) of v [B, Hkv, N, D]."""
    _impl("value_norm", v.device, reference.value_norm)(v, kind, out)


def select_victim(score: Tensor, pos: Tensor, lo: int, hi: int, out_idx: Tensor) -> None:
    """out_idx [B, Hkv] = the slot with lo <= pos < hi and the lowest score (NaN last, ties to the
    lower pos), or -1."""
    _impl("select_victim", score.device, reference.select_victim)(score, pos, lo, hi, out_idx)


def adaptive_victims(score: Tensor, pos: Tensor, lo: int, hi: Tensor, min_share: int, limit: Tensor,
                     out_entry: Tensor) -> None:
    """out_entry [B, n] = the entries (head C + slot) each row (a layer) of score, pos [B, H_kv, C] evicts
    under adaptive allocation, lowest normalised score first, -1 for none (engine/reference.py has the
    rule); hi [1] int64 and limit [B] int64 are read on the device, so a decode step stays capturable."""
    _impl("adaptive_victims", score.device, reference.adaptive_victims)(score, pos, lo, hi, min_share, limit,
                                                                        out_entry)


def compact(k: Tensor, v: Tensor, pos: Tensor, state: Sequence[Tensor], keep_idx: Tensor) -> None:
    """In place: slot keep_idx[b, g, i] moves to slot i in k, v, pos and every state tensor; the
    slots after the kept ones are emptied (pos -1, everything else 0)."""
    _impl("compact", k.device, reference.compact)(k, v, pos, list(state), keep_idx)


def remove_entries(pos: Tensor, state: Sequence[Tensor], slot_index: Tensor | None, entries: Tensor, scratch: int,
                   freed_out: Tensor) -> None:
    """In place: the entries entries[b, i] (head C + slot, -1: none) of row b leave at once (pos -1, state 0,
    slot_index `scratch`); freed_out [B, n] = the pool rows they held, ordered by KV head, then -1s. A
    pooled store's eviction in one op where it took ~20 small ones. engine/reference.py says it exactly."""
    _impl("remove_entries", pos.device, reference.remove_entries)(pos, list(state), slot_index, entries, scratch,
                                                                  freed_out)


def merge_value(v: Tensor, w: Tensor, victim: Tensor, receiver: Tensor, weight: Tensor,
                slot_index: Tensor | None = None) -> None:
    """In place, per head: v[receiver] = (w v[receiver] + weight v[victim]) / (w + weight) and
    w[receiver] += weight (victim or receiver -1: skip the head). slot_index [B, H_kv, C] int32: v is a
    pool [P, R, D] (B a multiple of P) and slot s of (b, g) is row slot_index[b, g, s] of pool batch b % P
    (a pooled store's rows, read and written in place: no per-head copy)."""
    _impl("merge_value", v.device, reference.merge_value)(v, w, victim, receiver, weight, slot_index)


def merge_neighbour(v: Tensor, w: Tensor, pos: Tensor, abar: Tensor, picks: Tensor, sinks: int, after: bool,
                    receiver_out: Tensor, slot_index: Tensor | None = None) -> None:
    """In place, each row's picks in order: WeightedKV's merge of pick picks[b, i] (the entry head C + slot,
    -1: none) into the slot of its KV head with the nearest larger (`after`; else smaller) position among
    the non-sink tokens (falling back to the other side), its position emptied; receiver_out [B, n] the
    receivers (-1: no merge). One op for a step's picks where a merge_value per pick cost ~30 small ops
    (receiver search, weights). engine/reference.py says it exactly."""
    _impl("merge_neighbour", v.device, reference.merge_neighbour)(v, w, pos, abar, picks, sinks, after, receiver_out,
                                                                  slot_index)


def merge_zip(k: Tensor, v: Tensor, logp: Tensor, pos: Tensor, q: Tensor, picks: Tensor, sinks: int,
              min_similarity: float, scale: float, receiver_out: Tensor, slot_index: Tensor | None = None) -> None:
    """In place, each row's picks in order: KeepKV's ZIP merge of pick picks[b, i] (the entry head C + slot,
    -1: none) into the other non-sink slot of its KV head with the most cosine-similar key (if that
    similarity >= min_similarity), so that for the reference query q [B, H_kv, D] fp32 the merged slot draws
    the attention mass and value the two drew: key, value and log votes `logp` [B, H_kv, C] rewritten, the
    victim's position emptied; receiver_out [B, n] the receivers (-1: no merge). One op for a step's picks
    where the merge per pick cost ~40 small ops. engine/reference.py says it exactly."""
    _impl("merge_zip", k.device, reference.merge_zip)(k, v, logp, pos, q, picks, sinks, min_similarity, scale,
                                                      receiver_out, slot_index)


def merge_spread(v: Tensor, pos: Tensor, abar: Tensor, picks: Tensor, sinks: int, window: int,
                 receivers_out: Tensor, slot_index: Tensor | None = None) -> None:
    """In place, each row's picks in order: CaM's merge of pick picks[b, i] (the entry head C + slot, -1:
    none) into the (at most) `window` slots of its KV head holding the next larger non-sink positions,
    v[r] += p / window * v[victim] with p = clamp(abar[victim] / mean abar[r], 0, 1), the victim's position
    emptied; receivers_out [B, n] = how many slots each pick merged into (0: none). One op for a step's
    picks where CaM's merge per pick cost ~25 small ops. engine/reference.py says it exactly."""
    _impl("merge_spread", v.device, reference.merge_spread)(v, pos, abar, picks, sinks, window, receivers_out,
                                                            slot_index)


def nearest_key(k: Tensor, pos: Tensor, victim: Tensor, sinks: int, receiver_out: Tensor, similarity_out: Tensor,
                slot_index: Tensor | None = None) -> None:
    """For each KV head with a victim slot (victim [B, H_kv], -1: none): receiver_out [B, H_kv] = the other
    slot holding a non-sink token (pos >= sinks) whose key is the most cosine-similar to the victim's,
    similarity_out [B, H_kv] fp32 = that similarity (-1 and -inf: none). The keys are read where they are
    (k [B, H_kv, C, D], or a pool [P, R, D] with slot_index, as merge_value's v), once: the search of KeepKV
    and WeightedKV's nearest_key, which made normalised copies of every key of the head. engine/reference.py
    says it exactly."""
    _impl("nearest_key", k.device, reference.nearest_key)(k, pos, victim, sinks, receiver_out, similarity_out,
                                                          slot_index)


def matvec(x: Tensor, w: Tensor, out: Tensor, accumulate: bool = False, norm: Tensor | None = None,
           eps: float = 0.0, swiglu: bool = False) -> None:
    """out [..., N] = h [..., K] @ w [N, K]^T (F.linear), all in w's dtype, accumulated in fp32; with
    `accumulate`, out += that product (rounded to out's dtype first, as out.add_(F.linear(h, w))).
    h is x [..., K], or rms_norm(x, norm, eps) with `norm` [K], or silu(x[..., :K]) * x[..., K:] of x
    [..., 2K] with `swiglu`: the projection's input made in the same call (one op where two or four were).
    Reads w once per 8 rows of x: the product of a decode step, whose time is the weights' streaming."""
    _impl("matvec", w.device, reference.matvec)(x, w, out, accumulate, norm, eps, swiglu)


def qmatvec(x: Tensor, blocks: Tensor, qtype: int, out: Tensor, accumulate: bool = False, norm: Tensor | None = None,
            eps: float = 0.0, swiglu: bool = False) -> None:
    """matvec by the weights of packed GGUF blocks [N, row_bytes] of type qtype (reference.QUANT_TYPES),
    decoded in registers: out [..., N] (+)= h [..., K] @ dequantize(blocks)^T, h as in `matvec`, fp32
    accumulation (x, norm, out fp32 on the CPU). A row's result does not depend on the rows batched with it."""
    _impl("qmatvec", blocks.device, reference.qmatvec)(x, blocks, qtype, out, accumulate, norm, eps, swiglu)


def qmatvec_q8(x: Tensor, blocks: Tensor, qtype: int, out: Tensor, accumulate: bool = False,
               norm: Tensor | None = None, eps: float = 0.0, swiglu: bool = False) -> None:
    """qmatvec with h quantized to 8 bits per block of 32 values first (one scale each) for Q4_0, Q4_1 and
    Q8_0 weights, llama.cpp's arithmetic (reference.qmatvec_q8): integer dot products, ~4x fewer instructions
    per weight, so the product reads the blocks at the memory's speed; K-quants as qmatvec. CPU only."""
    _impl("qmatvec_q8", blocks.device, reference.qmatvec_q8)(x, blocks, qtype, out, accumulate, norm, eps, swiglu)


def dequantize(blocks: Tensor, qtype: int, out: Tensor) -> None:
    """out [N, K] = the weights of packed GGUF blocks [N, row_bytes], each gguf.quants.dequantize's float32
    value, rounded to out's dtype."""
    _impl("dequantize", blocks.device, reference.dequantize)(blocks, qtype, out)


MATVEC_MAX_ROWS = 8  # rows up to which `linear` uses matvec; beyond, a GEMM reuses each block of w across rows
# fp16 stays with F.linear: torch converts it with F16C, matvec with portable integer ops (2.5x slower).
MATVEC_DTYPES = (torch.float32, torch.bfloat16)


def linear(x: Tensor, w: Tensor, add_to: Tensor | None = None, norm: Tensor | None = None, eps: float = 0.0,
           swiglu: bool = False) -> Tensor:
    """F.linear(h, w [N, K]) without bias, h as in `matvec` (x, rms_norm(x, norm, eps), or the SwiGLU of
    x's two halves); with `add_to` (contiguous, the result's shape) the product is added into it in
    place and add_to returned: the residual stream takes an output projection with no separate add.
    A decode step (at most MATVEC_MAX_ROWS rows) goes through matvec, its input made in the same call;
    a prompt through F.linear's GEMM, and F.linear wherever engine._C has no matvec (CUDA).
    Written for few tensor ops: it runs ~120 times per decode step."""
    if not isinstance(w, Tensor):  # packed quantized blocks (engine.quant.PackedWeight): its own kernels
        return w.linear(x, add_to, norm, eps, swiglu)
    device = x.device
    if (x.numel() > MATVEC_MAX_ROWS * x.shape[-1] or x.dtype not in MATVEC_DTYPES
            or not has_kernel("matvec", device.type)):
        y = F.linear(reference.matvec_input(x, norm, eps, swiglu, rms_norm), w)
        return y if add_to is None else add_to.add_(y)
    out = x.new_empty((*x.shape[:-1], w.shape[0])) if add_to is None else add_to
    _impl("matvec", device, reference.matvec)(x.contiguous(), w, out, add_to is not None, norm, eps, swiglu)
    return out


MatvecFn = Callable[[Tensor, Tensor, bool, "Tensor | None", float, bool], None]


def bound_matvec(w: "Tensor | object") -> MatvecFn | None:
    """`fn(x, out, accumulate, norm, eps, swiglu)`: the compiled product by `w` that `linear` would call
    for a decode step, bound to w once (engine/decode/plan.py calls it ~120 times a step); None where
    `linear` would not call a compiled kernel (no kernel for w's dtype or device, or the reference forced)."""
    if not isinstance(w, Tensor):
        return w.bound_matvec()
    kernel = compiled_kernel("matvec", w.device) if w.dtype in MATVEC_DTYPES else None
    if kernel is None:
        return None
    return lambda x, out, accumulate, norm, eps, swiglu: kernel(x, w, out, accumulate, norm, eps, swiglu)


def embedding(tokens: Tensor, w: "Tensor | object") -> Tensor:
    """F.embedding(tokens, w); a packed table dequantizes only the rows looked up."""
    return F.embedding(tokens, w) if isinstance(w, Tensor) else w.embedding(tokens)


def row_range(w: "Tensor | object", cut: "object | None") -> "Tensor | object":
    """Rows [cut.start, cut.stop) of a weight as a view (no copy; a parameter stays one), all of it when `cut`
    is None: a tensor-parallel rank's vocabulary rows of a tied output head."""
    if cut is None:
        return w
    if not isinstance(w, Tensor):
        return w.row_range(cut.start, cut.stop)
    return torch.nn.Parameter(w[cut.start : cut.stop], requires_grad=False)


def cat_rows(weights: Sequence["Tensor | object"]) -> tuple["Tensor | object", list["Tensor | object"]]:
    """The weights' rows as one matrix, and each weight as a view of it (no second copy): q/k/v and
    gate/up become one projection call. Dense weights stay parameters; packed ones stay packed."""
    if not all(isinstance(w, Tensor) for w in weights):
        from .quant import PackedWeight  # quant builds on these ops

        return PackedWeight.cat_rows(weights)
    fused = torch.cat(list(weights))
    views, start = [], 0
    for w in weights:
        views.append(torch.nn.Parameter(fused[start : start + w.shape[0]], requires_grad=False))
        start += w.shape[0]
    return fused, views


# Fake (meta) implementations: shapes are checked like the real ops, indices cannot be (no data).
if HAVE_EXTENSION:

    @torch.library.register_fake("engine::rms_norm")
    def _rms_norm_fake(x: Tensor, weight: Tensor, eps: float) -> Tensor:
        reference.check_rms_norm(x, weight, eps)
        return torch.empty_like(x)

    @torch.library.register_fake("engine::decode_attention")
    def _decode_attention_fake(q, k, v, pos, length, scale, out, score_acc, probs_out, rope_cos=None,
                               rope_sin=None, rope_rank=None, slot_index=None, bias=None) -> None:
        reference.check_decode_attention(q, k, v, pos, length, out, score_acc, probs_out, rope_cos, rope_sin,
                                         rope_rank, slot_index, bias)

    @torch.library.register_fake("engine::prefill_attention")
    def _prefill_attention_fake(q, k, v, qpos, kpos, scale, out, lse, col_scores, score_rows,
                                score_scale, bias=None) -> None:
        reference.check_prefill_attention(q, k, v, qpos, kpos, out, lse, col_scores, bias)

    @torch.library.register_fake("engine::rope_append")
    def _rope_append_fake(qkv, cos, sin, slot, rotate_key, q_out, k_cache, v_cache) -> None:
        reference.check_rope_append(qkv, cos, sin, slot, q_out, k_cache, v_cache)

    @torch.library.register_fake("engine::decode_layers")
    def _decode_layers_fake(qkv, cos, sin, slot, rotate_key, q_out, k_cache, v_cache, pos, length, scale, out,
                            score_acc, probs_out, rope_cos, rope_sin, rope_rank) -> None:
        for i in range(len(qkv)):
            reference.check_rope_append(qkv[i], cos[i], sin[i], slot[i], q_out[i], k_cache[i], v_cache[i])
            reference.check_decode_attention(q_out[i], k_cache[i], v_cache[i], pos[i], length[i], out[i],
                                             score_acc[i], probs_out[i], rope_cos[i], rope_sin[i], rope_rank[i])

    @torch.library.register_fake("engine::value_norm")
    def _value_norm_fake(v, kind, out) -> None:
        reference.check_value_norm(v, kind, out)

    @torch.library.register_fake("engine::select_victim")
    def _select_victim_fake(score, pos, lo, hi, out_idx) -> None:
        reference.check_select_victim(score, pos, out_idx)

    @torch.library.register_fake("engine::adaptive_victims")
    def _adaptive_victims_fake(score, pos, lo, hi, min_share, limit, out_entry) -> None:
        reference.check_adaptive_victims(score, pos, hi, limit, out_entry)

    @torch.library.register_fake("engine::compact")
    def _compact_fake(k, v, pos, state, keep_idx) -> None:
        reference.check_compact(k, v, pos, state, keep_idx)

    @torch.library.register_fake("engine::remove_entries")
    def _remove_entries_fake(pos, state, slot_index, entries, scratch, freed_out) -> None:
        reference.check_remove_entries(pos, state, slot_index, entries, scratch, freed_out)

    @torch.library.register_fake("engine::merge_value")
    def _merge_value_fake(v, w, victim, receiver, weight, slot_index=None) -> None:
        reference.check_merge_value(v, w, victim, receiver, weight, slot_index)

    @torch.library.register_fake("engine::nearest_key")
    def _nearest_key_fake(k, pos, victim, sinks, receiver_out, similarity_out, slot_index=None) -> None:
        reference.check_nearest_key(k, pos, victim, sinks, receiver_out, similarity_out, slot_index)

    @torch.library.register_fake("engine::merge_neighbour")
    def _merge_neighbour_fake(v, w, pos, abar, picks, sinks, after, receiver_out, slot_index=None) -> None:
        reference.check_merge_neighbour(v, w, pos, abar, picks, sinks, receiver_out, slot_index)

    @torch.library.register_fake("engine::merge_zip")
    def _merge_zip_fake(k, v, logp, pos, q, picks, sinks, min_similarity, scale, receiver_out, slot_index=None) -> None:
        reference.check_merge_zip(k, v, logp, pos, q, picks, sinks, min_similarity, scale, receiver_out, slot_index)

    @torch.library.register_fake("engine::merge_spread")
    def _merge_spread_fake(v, pos, abar, picks, sinks, window, receivers_out, slot_index=None) -> None:
        reference.check_merge_spread(v, pos, abar, picks, sinks, window, receivers_out, slot_index)

    @torch.library.register_fake("engine::matvec")
    def _matvec_fake(x, w, out, accumulate=False, norm=None, eps=0.0, swiglu=False) -> None:
        reference.check_matvec(x, w, out, norm, eps, swiglu)

    @torch.library.register_fake("engine::qmatvec")
    def _qmatvec_fake(x, blocks, qtype, out, accumulate=False, norm=None, eps=0.0, swiglu=False) -> None:
        reference.check_qmatvec(x, blocks, qtype, out, norm, eps, swiglu)

    @torch.library.register_fake("engine::qmatvec_q8")
    def _qmatvec_q8_fake(x, blocks, qtype, out, accumulate=False, norm=None, eps=0.0, swiglu=False) -> None:
        reference.check_qmatvec(x, blocks, qtype, out, norm, eps, swiglu, "qmatvec_q8")

    @torch.library.register_fake("engine::dequantize")
    def _dequantize_fake(blocks, qtype, out) -> None:
        reference.check_dequantize(blocks, qtype, out)
