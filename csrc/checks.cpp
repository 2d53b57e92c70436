// Input validation; mirrored message for message by engine/reference.py (keep the two in step).
#include "checks.h"

#include "quant_blocks.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <array>
#include <string>
#include <utility>
#include <vector>

namespace engine {
namespace {

using at::ScalarType;

const std::vector<ScalarType> kFloats = {ScalarType::Float, ScalarType::BFloat16, ScalarType::Half};

// torch's Python spelling (str(torch.float32) without "torch."), so both paths print the same.
std::string dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::Double: return "float64";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Half: return "float16";
    case ScalarType::Long: return "int64";
    case ScalarType::Int: return "int32";
    case ScalarType::Short: return "int16";
    case ScalarType::Char: return "int8";
    case ScalarType::Byte: return "uint8";
    case ScalarType::Bool: return "bool";
    default: return c10::toString(t);
  }
}

std::string dtypes_name(const std::vector<ScalarType>& dtypes) {
  std::string s;
  for (size_t i = 0; i < dtypes.size(); ++i) s += (i ? " or " : "") + dtype_name(dtypes[i]);
  return s;
}

// "[1, ?, 64]": -1 prints as "?" (any size).
std::string shape_str(c10::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    s += (i ? ", " : "") + (shape[i] < 0 ? std::string("?") : std::to_string(shape[i]));
  }
  return s + "]";
}

struct Like {
  const at::Tensor& t;
  const char* name;
};

// Device (like another argument), dtype, shape (-1 = any size), contiguity: in this order.
void check_tensor(const char* op, const char* name, const at::Tensor& t, const char* layout,
                  const std::vector<int64_t>& shape, const std::vector<ScalarType>& dtypes,
                  const std::optional<Like>& like = std::nullopt) {
  if (like) {
    TORCH_CHECK_VALUE(t.device() == like->t.device(), op, ": ", name, " must be on ",
                      like->t.device().str(), " like ", like->name, ", got ", t.device().str());
  }
  bool dtype_ok = false;
  for (auto d : dtypes) dtype_ok = dtype_ok || t.scalar_type() == d;
  TORCH_CHECK_TYPE(dtype_ok, op, ": ", name, " must be ", dtypes_name(dtypes), ", got ",
                   dtype_name(t.scalar_type()));
  bool shape_ok = t.dim() == static_cast<int64_t>(shape.size());
  for (size_t i = 0; shape_ok && i < shape.size(); ++i) {
    shape_ok = shape[i] < 0 || t.size(i) == shape[i];
  }
  TORCH_CHECK_VALUE(shape_ok, op, ": ", name, " must have shape ", layout, " = ", shape_str(shape),
                    ", got ", shape_str(t.sizes()));
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous ", layout,
                    ", got strides ", shape_str(t.strides()));
}

void check_optional(const char* op, const char* name, const std::optional<at::Tensor>& t,
                    const char* layout, const std::vector<int64_t>& shape,
                    const std::vector<ScalarType>& dtypes, const Like& like) {
  if (t) check_tensor(op, name, *t, layout, shape, dtypes, like);
}

void check_heads(const char* op, int64_t H, int64_t Hkv, int64_t D) {
  TORCH_CHECK_VALUE(Hkv >= 1 && H % Hkv == 0, op, ": H_kv=", Hkv, " must be >= 1 and divide H=", H);
  TORCH_CHECK_VALUE(D >= 1 && D <= kMaxHeadDim, op, ": head dim D must be in [1, ", kMaxHeadDim,
                    "], got ", D);
}

// The query may be fp32 whatever the cache dtype.
std::vector<ScalarType> query_dtypes(const at::Tensor& k) {
  if (k.scalar_type() == ScalarType::Float) return {ScalarType::Float};
  return {ScalarType::Float, k.scalar_type()};
}

// A merge op's picks [B, n] int64, its output out_name [B, n] int64 and sinks >= 0: its last checks, in order.
void check_picks(const char* op, int64_t B, const at::Tensor& picks, const char* out_name, const at::Tensor& out,
                 int64_t sinks, const Like& like) {
  check_tensor(op, "picks", picks, "[B, n]", {B, -1}, {ScalarType::Long}, like);
  check_tensor(op, out_name, out, "[B, n]", {B, picks.size(1)}, {ScalarType::Long}, like);
  TORCH_CHECK_VALUE(sinks >= 0, op, ": sinks must be >= 0, got ", sinks);
}

}  // namespace

void check_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const char* op = "rms_norm";
  TORCH_CHECK_TYPE(x.scalar_type() == ScalarType::Float || x.scalar_type() == ScalarType::BFloat16 ||
                       x.scalar_type() == ScalarType::Half,
                   op, ": x must be ", dtypes_name(kFloats), ", got ", dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have shape [..., dim], got ", shape_str(x.sizes()));
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": x must be contiguous [..., dim], got strides ",
                    shape_str(x.strides()));
  check_tensor(op, "weight", weight, "[dim]", {x.size(-1)}, {x.scalar_type()}, Like{x, "x"});
  TORCH_CHECK_VALUE(eps >= 0, op, ": eps must be >= 0");
}

void check_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& pos, int64_t length, const at::Tensor& out,
                            const std::optional<at::Tensor>& score_acc,
                            const std::optional<at::Tensor>& probs_out,
                            const std::optional<at::Tensor>& rope_cos,
                            const std::optional<at::Tensor>& rope_sin,
                            const std::optional<at::Tensor>& rope_rank,
                            const std::optional<at::Tensor>& slot_index,
                            const std::optional<at::Tensor>& bias) {
  const char* op = "decode_attention";
  const Like like_k{k, "k"};
  int64_t B, Hkv, C, D;
  if (slot_index) {  // a pool of rows shared by the KV heads; each head's slots name their rows
    const char* pool = "[B, R, D]";
    check_tensor(op, "k", k, pool, {-1, -1, -1}, kFloats);
    B = k.size(0), D = k.size(2);
    check_tensor(op, "v", v, pool, {B, k.size(1), D}, {k.scalar_type()}, like_k);
    check_tensor(op, "slot_index", *slot_index, "[B, H_kv, C]", {B, -1, -1}, {ScalarType::Int}, like_k);
    Hkv = slot_index->size(1), C = slot_index->size(2);
  } else {
    const char* cache = "[B, H_kv, C, D]";
    check_tensor(op, "k", k, cache, {-1, -1, -1, -1}, kFloats);
    B = k.size(0), Hkv = k.size(1), C = k.size(2), D = k.size(3);
    check_tensor(op, "v", v, cache, {B, Hkv, C, D}, {k.scalar_type()}, like_k);
  }
  check_tensor(op, "pos", pos, "[B, H_kv, C]", {B, Hkv, C}, {ScalarType::Int}, like_k);
  check_tensor(op, "q", q, "[B, H, D]", {B, -1, D}, query_dtypes(k), like_k);
  const int64_t H = q.size(1);
  check_heads(op, H, Hkv, D);
  check_tensor(op, "out", out, "[B, H, D]", {B, H, D}, {q.scalar_type()}, like_k);
  check_optional(op, "score_acc", score_acc, "[B, H_kv, C]", {B, Hkv, C}, {ScalarType::Float}, like_k);
  check_optional(op, "probs_out", probs_out, "[B, H, C]", {B, H, C}, {ScalarType::Float}, like_k);
  check_optional(op, "bias", bias, "[B, H_kv, C]", {B, Hkv, C}, {ScalarType::Float}, like_k);
  TORCH_CHECK_VALUE(length >= 1 && length <= C, op, ": length must be in [1, C] = [1, ", C,
                    "], got ", length);
  const int given = int(rope_cos.has_value()) + int(rope_sin.has_value()) + int(rope_rank.has_value());
  TORCH_CHECK_VALUE(given == 0 || given == 3, op,
                    ": rope_cos, rope_sin and rope_rank go together, got ", given, " of the 3");
  if (given == 0) return;
  TORCH_CHECK_VALUE(D % 2 == 0, op, ": rope needs an even head dim D, got ", D);
  check_tensor(op, "rope_cos", *rope_cos, "[P, D]", {-1, D}, {ScalarType::Float}, like_k);
  check_tensor(op, "rope_sin", *rope_sin, "[P, D]", {rope_cos->size(0), D}, {ScalarType::Float}, like_k);
  check_tensor(op, "rope_rank", *rope_rank, "[B, H_kv, C]", {B, Hkv, C}, {ScalarType::Int}, like_k);
}

void check_rope_ranks(const at::Tensor& rank, const at::Tensor& pos, int64_t length, int64_t P) {
  const int64_t rows = rank.size(0) * rank.size(1), C = rank.size(2);
  const int32_t* r = rank.const_data_ptr<int32_t>();
  const int32_t* p = pos.const_data_ptr<int32_t>();
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t s = 0; s < length; ++s) {
      const int32_t x = r[i * C + s];
      TORCH_CHECK_INDEX(p[i * C + s] < 0 || (x >= 0 && x < P), "decode_attention: rope_rank must hold ",
                        "table rows in [0, P) = [0, ", P, ") on valid slots, got ", x, " at [",
                        i / rank.size(1), ", ", i % rank.size(1), ", ", s, "]");
    }
  }
}

void check_pool_rows(const at::Tensor& slot_index, int64_t length, int64_t R) {
  const int64_t rows = slot_index.size(0) * slot_index.size(1), C = slot_index.size(2);
  const int32_t* x = slot_index.const_data_ptr<int32_t>();
  bool outside = false;  // a vectorised scan first: it runs every decode step, the message loop only on a bad row
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t s = 0; s < length; ++s) outside |= static_cast<uint32_t>(x[i * C + s]) >= static_cast<uint64_t>(R);
  }
  if (!outside) return;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t s = 0; s < length; ++s) {
      TORCH_CHECK_INDEX(x[i * C + s] >= 0 && x[i * C + s] < R, "decode_attention: slot_index must hold pool rows ",
                        "in [0, R) = [0, ", R, ") on slots < length, got ", x[i * C + s], " at [",
                        i / slot_index.size(1), ", ", i % slot_index.size(1), ", ", s, "]");
    }
  }
}

void check_rope_append(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                       const at::Tensor& slot, const at::Tensor& q_out, const at::Tensor& k_cache,
                       const at::Tensor& v_cache) {
  const char* op = "rope_append";
  const char* cache = "[B, H_kv, C, D]";
  check_tensor(op, "k_cache", k_cache, cache, {-1, -1, -1, -1}, kFloats);
  const int64_t B = k_cache.size(0), C = k_cache.size(2), D = k_cache.size(3);
  // a cache of one head with H_kv slot columns is a pool the KV heads share (slot: each head's row)
  const int64_t Hkv = k_cache.size(1) == 1 && slot.dim() == 2 ? slot.size(1) : k_cache.size(1);
  const Like like_k{k_cache, "k_cache"};
  check_tensor(op, "v_cache", v_cache, cache, {B, k_cache.size(1), C, D}, {k_cache.scalar_type()}, like_k);
  check_tensor(op, "q_out", q_out, "[B, H, D]", {B, -1, D}, query_dtypes(k_cache), like_k);
  const int64_t H = q_out.size(1);
  check_heads(op, H, Hkv, D);
  TORCH_CHECK_VALUE(D % 2 == 0, op, ": rope needs an even head dim D, got ", D);
  check_tensor(op, "qkv", qkv, "[B, (H + 2 H_kv) D]", {B, (H + 2 * Hkv) * D}, {q_out.scalar_type()}, like_k);
  check_tensor(op, "cos", cos, "[D]", {D}, {ScalarType::Float}, like_k);
  check_tensor(op, "sin", sin, "[D]", {D}, {ScalarType::Float}, like_k);
  check_tensor(op, "slot", slot, "[B, H_kv]", {B, Hkv}, {ScalarType::Long}, like_k);
}

void check_slot_indices(const char* op, const at::Tensor& slot, int64_t C) {
  const int64_t* idx = slot.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < slot.numel(); ++i) {
    TORCH_CHECK_INDEX(idx[i] >= 0 && idx[i] < C, op, ": slot must hold slot indices in [0, C) = [0, ", C,
                      "), got ", idx[i], " at [", i / slot.size(1), ", ", i % slot.size(1), "]");
  }
}

void check_prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& qpos, const at::Tensor& kpos, const at::Tensor& out,
                             const at::Tensor& lse, const std::optional<at::Tensor>& col_scores,
                             const std::optional<at::Tensor>& bias) {
  const char* op = "prefill_attention";
  const char* cache = "[B, H_kv, S, D]";
  check_tensor(op, "k", k, cache, {-1, -1, -1, -1}, kFloats);
  const int64_t B = k.size(0), Hkv = k.size(1), S = k.size(2), D = k.size(3);
  const Like like_k{k, "k"};
  check_tensor(op, "v", v, cache, {B, Hkv, S, D}, {k.scalar_type()}, like_k);
  check_tensor(op, "kpos", kpos, "[B, H_kv, S]", {B, Hkv, S}, {ScalarType::Int}, like_k);
  check_tensor(op, "q", q, "[B, H, L, D]", {B, -1, -1, D}, query_dtypes(k), like_k);
  const int64_t H = q.size(1), L = q.size(2);
  check_heads(op, H, Hkv, D);
  check_tensor(op, "qpos", qpos, "[B, L]", {B, L}, {ScalarType::Int}, like_k);
  check_tensor(op, "out", out, "[B, H, L, D]", {B, H, L, D}, {q.scalar_type()}, like_k);
  check_tensor(op, "lse", lse, "[B, H, L]", {B, H, L}, {ScalarType::Float}, like_k);
  check_optional(op, "col_scores", col_scores, "[B, H_kv, S]", {B, Hkv, S}, {ScalarType::Float},
                 like_k);
  check_optional(op, "bias", bias, "[B, H_kv, S]", {B, Hkv, S}, {ScalarType::Float}, like_k);
}

void check_value_norm(const at::Tensor& v, int64_t kind, const at::Tensor& out) {
  const char* op = "value_norm";
  check_tensor(op, "v", v, "[B, H_kv, N, D]", {-1, -1, -1, -1}, kFloats);
  check_tensor(op, "out", out, "[B, H_kv, N]", {v.size(0), v.size(1), v.size(2)},
               {ScalarType::Float}, Like{v, "v"});
  TORCH_CHECK_VALUE(kind >= 0 && kind <= 2, op,
                    ": kind must be 0 (Linf), 1 (L1) or 2 (squared L2), got ", kind);
}

void check_select_victim(const at::Tensor& score, const at::Tensor& pos, const at::Tensor& out_idx) {
  const char* op = "select_victim";
  check_tensor(op, "score", score, "[B, H_kv, C]", {-1, -1, -1}, {ScalarType::Float});
  const int64_t B = score.size(0), Hkv = score.size(1), C = score.size(2);
  const Like like{score, "score"};
  check_tensor(op, "pos", pos, "[B, H_kv, C]", {B, Hkv, C}, {ScalarType::Int}, like);
  check_tensor(op, "out_idx", out_idx, "[B, H_kv]", {B, Hkv}, {ScalarType::Long}, like);
}

void check_adaptive_victims(const at::Tensor& score, const at::Tensor& pos, const at::Tensor& hi,
                            const at::Tensor& limit, const at::Tensor& out_entry) {
  const char* op = "adaptive_victims";
  check_tensor(op, "score", score, "[B, H_kv, C]", {-1, -1, -1}, {ScalarType::Float});
  const int64_t B = score.size(0), Hkv = score.size(1), C = score.size(2);
  const Like like{score, "score"};
  check_tensor(op, "pos", pos, "[B, H_kv, C]", {B, Hkv, C}, {ScalarType::Int}, like);
  check_tensor(op, "hi", hi, "[1]", {1}, {ScalarType::Long}, like);
  check_tensor(op, "limit", limit, "[B]", {B}, {ScalarType::Long}, like);
  check_tensor(op, "out_entry", out_entry, "[B, n]", {B, -1}, {ScalarType::Long}, like);
}

void check_compact(const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos,
                   at::TensorList state, const at::Tensor& keep_idx) {
  const char* op = "compact";
  const char* cache = "[B, H_kv, C, D]";
  check_tensor(op, "k", k, cache, {-1, -1, -1, -1}, kFloats);
  const int64_t B = k.size(0), Hkv = k.size(1), C = k.size(2), D = k.size(3);
  const Like like{k, "k"};
  check_tensor(op, "v", v, cache, {B, Hkv, C, D}, {k.scalar_type()}, like);
  check_tensor(op, "pos", pos, "[B, H_kv, C]", {B, Hkv, C}, {ScalarType::Int}, like);
  for (size_t i = 0; i < state.size(); ++i) {
    const std::string name = "state[" + std::to_string(i) + "]";
    check_tensor(op, name.c_str(), state[i], "[B, H_kv, C]", {B, Hkv, C}, {ScalarType::Float}, like);
  }
  check_tensor(op, "keep_idx", keep_idx, "[B, H_kv, K]", {B, Hkv, -1}, {ScalarType::Long}, like);
  TORCH_CHECK_VALUE(keep_idx.size(2) <= C, op, ": keep_idx must keep at most C=", C,
                    " slots, got K=", keep_idx.size(2));
}

void check_compact_indices(const at::Tensor& keep_idx, int64_t C) {
  const int64_t rows = keep_idx.size(0) * keep_idx.size(1), K = keep_idx.size(2);
  const int64_t* idx = keep_idx.const_data_ptr<int64_t>();
  std::vector<char> seen(C);
  for (int64_t r = 0; r < rows; ++r) {
    std::fill(seen.begin(), seen.end(), 0);
    for (int64_t i = 0; i < K; ++i) {
      const int64_t s = idx[r * K + i];
      const bool ok = s >= 0 && s < C && !seen[s];
      TORCH_CHECK_INDEX(ok, "compact: keep_idx must hold distinct slot indices in [0, ", C,
                        "), got ", s, " at [", r / keep_idx.size(1), ", ", r % keep_idx.size(1),
                        ", ", i, "]");
      seen[s] = 1;
    }
  }
}

// rows [B, H_kv, C, D], or a pool of rows [P, R, D] with slot_index [B, H_kv, C] int32 (row b of the slots
// reads pool batch b % P, so B must be a multiple of P): B, H_kv and C of the slots.
static std::array<int64_t, 3> check_slot_rows(const char* op, const char* name, const at::Tensor& rows,
                                              const std::optional<at::Tensor>& slot_index) {
  if (!slot_index) {
    check_tensor(op, name, rows, "[B, H_kv, C, D]", {-1, -1, -1, -1}, kFloats);
    return {rows.size(0), rows.size(1), rows.size(2)};
  }
  check_tensor(op, name, rows, "[P, R, D]", {-1, -1, -1}, kFloats);
  check_tensor(op, "slot_index", *slot_index, "[B, H_kv, C]", {-1, -1, -1}, {ScalarType::Int}, Like{rows, name});
  const int64_t B = slot_index->size(0);
  TORCH_CHECK_VALUE(rows.size(0) > 0 && B % rows.size(0) == 0, op, ": slot_index's B=", B,
                    " must be a multiple of the pool's P=", rows.size(0));
  return {B, slot_index->size(1), slot_index->size(2)};
}

void check_merge_value(const at::Tensor& v, const at::Tensor& w, const at::Tensor& victim,
                       const at::Tensor& receiver, const at::Tensor& weight,
                       const std::optional<at::Tensor>& slot_index) {
  const char* op = "merge_value";
  const Like like{v, "v"};
  const auto [B, Hkv, C] = check_slot_rows(op, "v", v, slot_index);
  check_tensor(op, "w", w, "[B, H_kv, C]", {B, Hkv, C}, {ScalarType::Float}, like);
  check_tensor(op, "victim", victim, "[B, H_kv]", {B, Hkv}, {ScalarType::Long}, like);
  check_tensor(op, "receiver", receiver, "[B, H_kv]", {B, Hkv}, {ScalarType::Long}, like);
  check_tensor(op, "weight", weight, "[B, H_kv]", {B, Hkv}, {ScalarType::Float}, like);
}

void check_index_range(const char* op, const char* name, const at::Tensor& t, int64_t hi, const char* what) {
  const int64_t n = t.size(1);
  const int64_t* idx = t.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    TORCH_CHECK_INDEX(idx[i] >= -1 && idx[i] < hi, op, ": ", name, " must hold ", what, " in [-1, ", hi, "), got ",
                      idx[i], " at [", i / n, ", ", i % n, "]");
  }
}

void check_merge_neighbour(const at::Tensor& v, const at::Tensor& w, const at::Tensor& pos, const at::Tensor& abar,
                           const at::Tensor& picks, int64_t sinks, const at::Tensor& receiver_out,
                           const std::optional<at::Tensor>& slot_index) {
  const char* op = "merge_neighbour";
  const Like like{v, "v"};
  const auto [B, Hkv, C] = check_slot_rows(op, "v", v, slot_index);
  check_tensor(op, "w", w, "[B, H_kv, C]", {B, Hkv, C}, {ScalarType::Float}, like);
  check_tensor(op, "pos", pos, "[B, H_kv, C]", {B, Hkv, C}, {ScalarType::Int}, like);
  check_tensor(op, "abar", abar, "[B, H_kv, C]", {B, Hkv, C}, {ScalarType::Float}, like);
  check_picks(op, B, picks, "receiver_out", receiver_out, sinks, like);
}

void check_merge_zip(const at::Tensor& k, const at::Tensor& v, const at::Tensor& logp, const at::Tensor& pos,
                     const at::Tensor& q, const at::Tensor& picks, int64_t sinks, double min_similarity, double scale,
                     const at::Tensor& receiver_out, const std::optional<at::Tensor>& slot_index) {
  const char* op = "merge_zip";
  const Like like{k, "k"};
  const auto [B, Hkv, C] = check_slot_rows(op, "k", k, slot_index);
  check_tensor(op, "v", v, slot_index ? "[P, R, D]" : "[B, H_kv, C, D]", k.sizes().vec(), {k.scalar_type()}, like);
  check_tensor(op, "logp", logp, "[B, H_kv, C]", {B, Hkv, C}, {ScalarType::Float}, like);
  check_tensor(op, "pos", pos, "[B, H_kv, C]", {B, Hkv, C}, {ScalarType::Int}, like);
  check_tensor(op, "q", q, "[B, H_kv, D]", {B, Hkv, k.size(-1)}, {ScalarType::Float}, like);
  check_picks(op, B, picks, "receiver_out", receiver_out, sinks, like);
  TORCH_CHECK_VALUE(min_similarity >= -1.0 && min_similarity <= 1.0, op, ": min_similarity must be in [-1, 1], got ",
                    min_similarity);
  TORCH_CHECK_VALUE(scale > 0.0 && std::isfinite(scale), op, ": scale must be a finite number > 0, got ", scale);
}

void check_remove_entries(const at::Tensor& pos, at::TensorList state, const std::optional<at::Tensor>& slot_index,
                          const at::Tensor& entries, int64_t scratch, const at::Tensor& freed_out) {
  const char* op = "remove_entries";
  check_tensor(op, "pos", pos, "[B, H_kv, C]", {-1, -1, -1}, {ScalarType::Int});
  const int64_t B = pos.size(0), Hkv = pos.size(1), C = pos.size(2);
  const Like like{pos, "pos"};
  for (size_t i = 0; i < state.size(); ++i) {
    const std::string name = "state[" + std::to_string(i) + "]";
    check_tensor(op, name.c_str(), state[i], "[B, H_kv, C]", {B, Hkv, C}, {ScalarType::Float}, like);
  }
  if (slot_index) check_tensor(op, "slot_index", *slot_index, "[B, H_kv, C]", {B, Hkv, C}, {ScalarType::Int}, like);
  check_tensor(op, "entries", entries, "[B, n]", {B, -1}, {ScalarType::Long}, like);
  check_tensor(op, "freed_out", freed_out, "[B, n]", {B, entries.size(1)}, {ScalarType::Long}, like);
  TORCH_CHECK_VALUE(scratch >= 0, op, ": scratch must be a pool row >= 0, got ", scratch);
}

void check_merge_spread(const at::Tensor& v, const at::Tensor& pos, const at::Tensor& abar, const at::Tensor& picks,
                        int64_t sinks, int64_t window, const at::Tensor& receivers_out,
                        const std::optional<at::Tensor>& slot_index) {
  const char* op = "merge_spread";
  const Like like{v, "v"};
  const auto [B, Hkv, C] = check_slot_rows(op, "v", v, slot_index);
  check_tensor(op, "pos", pos, "[B, H_kv, C]", {B, Hkv, C}, {ScalarType::Int}, like);
  check_tensor(op, "abar", abar, "[B, H_kv, C]", {B, Hkv, C}, {ScalarType::Float}, like);
  check_picks(op, B, picks, "receivers_out", receivers_out, sinks, like);
  TORCH_CHECK_VALUE(window >= 1, op, ": window must be >= 1, got ", window);
}

void check_nearest_key(const at::Tensor& k, const at::Tensor& pos, const at::Tensor& victim, int64_t sinks,
                       const at::Tensor& receiver_out, const at::Tensor& similarity_out,
                       const std::optional<at::Tensor>& slot_index) {
  const char* op = "nearest_key";
  const Like like{k, "k"};
  const auto [B, Hkv, C] = check_slot_rows(op, "k", k, slot_index);
  check_tensor(op, "pos", pos, "[B, H_kv, C]", {B, Hkv, C}, {ScalarType::Int}, like);
  check_tensor(op, "victim", victim, "[B, H_kv]", {B, Hkv}, {ScalarType::Long}, like);
  check_tensor(op, "receiver_out", receiver_out, "[B, H_kv]", {B, Hkv}, {ScalarType::Long}, like);
  check_tensor(op, "similarity_out", similarity_out, "[B, H_kv]", {B, Hkv}, {ScalarType::Float}, like);
  TORCH_CHECK_VALUE(sinks >= 0, op, ": sinks must be >= 0, got ", sinks);
}

namespace {

// Whether out's bytes overlap t's (both contiguous: [data, data + nbytes)).
bool overlaps(const at::Tensor& out, const at::Tensor& t) {
  const char *a = static_cast<const char*>(out.const_data_ptr()), *b = static_cast<const char*>(t.const_data_ptr());
  return out.numel() && t.numel() && a < b + t.nbytes() && b < a + out.nbytes();
}

// x, norm, eps and out of a product by an [N, K] matrix (matvec, qmatvec): x of one of x_dtypes, norm and
// out of x's dtype.
void check_product_args(const char* op, const at::Tensor& x, const std::vector<ScalarType>& x_dtypes, int64_t N,
                        int64_t K, const at::Tensor& out, const std::optional<at::Tensor>& norm, double eps,
                        bool swiglu, const Like& like) {
  TORCH_CHECK_VALUE(!(norm && swiglu), op, ": norm and swiglu cannot be combined");
  std::vector<int64_t> x_shape(std::max<int64_t>(x.dim(), 1), -1);
  x_shape.back() = swiglu ? 2 * K : K;
  check_tensor(op, "x", x, swiglu ? "[..., 2K]" : "[..., K]", x_shape, x_dtypes, like);
  if (norm) {
    check_tensor(op, "norm", *norm, "[K]", {K}, {x.scalar_type()}, like);
    TORCH_CHECK_VALUE(eps >= 0, op, ": eps must be >= 0");
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  check_tensor(op, "out", out, "[..., N]", out_shape, {x.scalar_type()}, like);
}

// ggml's type names by id (gguf.GGMLQuantizationType), for messages; engine/reference.py has the same table.
std::string ggml_type_name(int64_t type) {
  static const std::vector<std::pair<int64_t, const char*>> names = {
      {0, "F32"},      {1, "F16"},     {2, "Q4_0"},    {3, "Q4_1"},     {6, "Q5_0"},   {7, "Q5_1"},
      {8, "Q8_0"},     {9, "Q8_1"},    {10, "Q2_K"},   {11, "Q3_K"},    {12, "Q4_K"},  {13, "Q5_K"},
      {14, "Q6_K"},    {15, "Q8_K"},   {16, "IQ2_XXS"}, {17, "IQ2_XS"}, {18, "IQ3_XXS"}, {19, "IQ1_S"},
      {20, "IQ4_NL"},  {21, "IQ3_S"},  {22, "IQ2_S"},  {23, "IQ4_XS"},  {24, "I8"},    {25, "I16"},
      {26, "I32"},     {27, "I64"},    {28, "F64"},    {29, "IQ1_M"},   {30, "BF16"},  {34, "TQ1_0"},
      {35, "TQ2_0"},   {39, "MXFP4"},  {40, "NVFP4"},  {41, "Q1_0"}};
  for (const auto& [id, name] : names) {
    if (id == type) return name;
  }
  return "unknown";
}

// blocks [N, row_bytes] uint8 of a type kept packed, row_bytes a whole number of its blocks: returns K.
int64_t check_blocks(const char* op, const at::Tensor& blocks, int64_t qtype) {
  const int64_t bytes = quant::block_bytes(qtype);
  TORCH_CHECK_VALUE(bytes > 0, op, ": quant type ", qtype, " (", ggml_type_name(qtype),
                    ") is not kept packed (supported: Q4_0, Q4_1, Q8_0, Q4_K, Q6_K); load with --weights dequantize");
  check_tensor(op, "blocks", blocks, "[N, row_bytes]", {-1, -1}, {ScalarType::Byte});
  TORCH_CHECK_VALUE(blocks.size(1) % bytes == 0, op, ": a row of ", blocks.size(1), " bytes is not a whole number of ",
                    ggml_type_name(qtype), " blocks (", bytes, " bytes each); load with --weights dequantize");
  return blocks.size(1) / bytes * quant::block_weights(qtype);
}

}  // namespace

void check_matvec(const at::Tensor& x, const at::Tensor& w, const at::Tensor& out,
                  const std::optional<at::Tensor>& norm, double eps, bool swiglu) {
  const char* op = "matvec";
  check_tensor(op, "w", w, "[N, K]", {-1, -1}, kFloats);
  check_product_args(op, x, {w.scalar_type()}, w.size(0), w.size(1), out, norm, eps, swiglu, Like{w, "w"});
  TORCH_CHECK_VALUE(!overlaps(out, x) && !overlaps(out, w), "matvec: out must not overlap x or w");
}

void check_qmatvec(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype, const at::Tensor& out,
                   const std::optional<at::Tensor>& norm, double eps, bool swiglu, const char* op) {
  const int64_t K = check_blocks(op, blocks, qtype);
  // The CPU kernel takes fp32 activations only; a GPU's also fp16 and bf16.
  const std::vector<ScalarType> x_dtypes = blocks.is_cpu() ? std::vector<ScalarType>{ScalarType::Float} : kFloats;
  check_product_args(op, x, x_dtypes, blocks.size(0), K, out, norm, eps, swiglu, Like{blocks, "blocks"});
  TORCH_CHECK_VALUE(!overlaps(out, x) && !overlaps(out, blocks), op, ": out must not overlap x or blocks");
}

void check_dequantize(const at::Tensor& blocks, int64_t qtype, const at::Tensor& out) {
  const char* op = "dequantize";
  const int64_t K = check_blocks(op, blocks, qtype);
  check_tensor(op, "out", out, "[N, K]", {blocks.size(0), K}, kFloats, Like{blocks, "blocks"});
  TORCH_CHECK_VALUE(!overlaps(out, blocks), "dequantize: out must not overlap blocks");
}

}  // namespace engine
