// Input validation shared by every backend of every op (csrc/cpu and csrc/cuda).
//
// Each check_<op> throws the same exception type with the same one-line message as the Python
// mirror in engine/reference.py, in the same order, so the compiled and the reference path fail
// alike: TypeError for a dtype, ValueError for a device, shape, contiguity or scalar, IndexError
// for a slot index out of range. Index values are read on the host, so the check_*_indices
// functions take CPU tensors only; a CUDA backend validates indices on the device instead.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace engine {

constexpr int64_t kMaxHeadDim = 256;

void check_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

void check_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& pos, int64_t length, const at::Tensor& out,
                            const std::optional<at::Tensor>& score_acc,
                            const std::optional<at::Tensor>& probs_out,
                            const std::optional<at::Tensor>& rope_cos,
                            const std::optional<at::Tensor>& rope_sin,
                            const std::optional<at::Tensor>& rope_rank,
                            const std::optional<at::Tensor>& slot_index,
                            const std::optional<at::Tensor>& bias);
// slot_index must hold rows of the [B, R, D] pool on every slot < length (empty slots included: the
// kernels may read an empty slot's row before masking it).
void check_pool_rows(const at::Tensor& slot_index, int64_t length, int64_t R);
// rope_rank must hold rows of the [P, D] tables on every valid slot (s < length, pos >= 0).
void check_rope_ranks(const at::Tensor& rank, const at::Tensor& pos, int64_t length, int64_t P);

void check_rope_append(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                       const at::Tensor& slot, const at::Tensor& q_out, const at::Tensor& k_cache,
                       const at::Tensor& v_cache);
// slot [B, H_kv] must hold slots in [0, C).
void check_slot_indices(const char* op, const at::Tensor& slot, int64_t C);

void check_prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& qpos, const at::Tensor& kpos, const at::Tensor& out,
                             const at::Tensor& lse, const std::optional<at::Tensor>& col_scores,
                             const std::optional<at::Tensor>& bias);

void check_value_norm(const at::Tensor& v, int64_t kind, const at::Tensor& out);

void check_select_victim(const at::Tensor& score, const at::Tensor& pos, const at::Tensor& out_idx);
void check_adaptive_victims(const at::Tensor& score, const at::Tensor& pos, const at::Tensor& hi,
                            const at::Tensor& limit, const at::Tensor& out_entry);

void check_compact(const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos,
                   at::TensorList state, const at::Tensor& keep_idx);
// keep_idx[b, g, :] must hold distinct slots in [0, C).
void check_compact_indices(const at::Tensor& keep_idx, int64_t C);

void check_remove_entries(const at::Tensor& pos, at::TensorList state, const std::optional<at::Tensor>& slot_index,
                          const at::Tensor& entries, int64_t scratch, const at::Tensor& freed_out);

// The rank of entry i among the entries of row `e` (n of them, -1: none) that free a pool row (`frees`), ordered
// by KV head (e / C) and then as listed: where its freed row goes in freed_out. Host and device.
#ifdef __CUDACC__
__host__ __device__
#endif
inline int64_t freed_rank(const int64_t* e, const bool* frees, int64_t n, int64_t C, int64_t i) {
  int64_t rank = 0;
  for (int64_t k = 0; k < n; ++k) rank += frees[k] && (e[k] / C < e[i] / C || (e[k] / C == e[i] / C && k < i));
  return rank;
}

void check_merge_value(const at::Tensor& v, const at::Tensor& w, const at::Tensor& victim,
                       const at::Tensor& receiver, const at::Tensor& weight,
                       const std::optional<at::Tensor>& slot_index);
// Every entry of index t [B, n] in [-1, hi) (-1: none), else "op: name must hold what in [-1, hi), got x at
// [b, i]" (merge_value's victim and receiver, merge_neighbour's and merge_spread's picks, nearest_key's victim).
void check_index_range(const char* op, const char* name, const at::Tensor& t, int64_t hi, const char* what);

void check_merge_neighbour(const at::Tensor& v, const at::Tensor& w, const at::Tensor& pos, const at::Tensor& abar,
                           const at::Tensor& picks, int64_t sinks, const at::Tensor& receiver_out,
                           const std::optional<at::Tensor>& slot_index);
void check_merge_zip(const at::Tensor& k, const at::Tensor& v, const at::Tensor& logp, const at::Tensor& pos,
                     const at::Tensor& q, const at::Tensor& picks, int64_t sinks, double min_similarity, double scale,
                     const at::Tensor& receiver_out, const std::optional<at::Tensor>& slot_index);
void check_merge_spread(const at::Tensor& v, const at::Tensor& pos, const at::Tensor& abar, const at::Tensor& picks,
                        int64_t sinks, int64_t window, const at::Tensor& receivers_out,
                        const std::optional<at::Tensor>& slot_index);
void check_nearest_key(const at::Tensor& k, const at::Tensor& pos, const at::Tensor& victim, int64_t sinks,
                       const at::Tensor& receiver_out, const at::Tensor& similarity_out,
                       const std::optional<at::Tensor>& slot_index);

void check_matvec(const at::Tensor& x, const at::Tensor& w, const at::Tensor& out,
                  const std::optional<at::Tensor>& norm, double eps, bool swiglu);

// blocks [N, row_bytes] uint8 of a type in csrc/quant_blocks.h, row_bytes a whole number of blocks;
// x and out as in check_matvec with K = row_bytes / block_bytes * block_weights (x, norm, out: one dtype);
// op names the op in messages (qmatvec, qmatvec_q8).
void check_qmatvec(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype, const at::Tensor& out,
                   const std::optional<at::Tensor>& norm, double eps, bool swiglu, const char* op = "qmatvec");
// out [N, K] floating, blocks as in check_qmatvec.
void check_dequantize(const at::Tensor& blocks, int64_t qtype, const at::Tensor& out);

}  // namespace engine
