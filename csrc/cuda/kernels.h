// CUDA implementations of the engine ops (schemas: csrc/ops.cpp; semantics: engine/reference.py).
// Each validates its inputs with the shared checks (csrc/checks.h), launches on the current
// stream of the tensors' device and never synchronises with the host, so a decode step built from
// them can be captured in a CUDA graph. Slot indices (compact, merge_value) are validated on the
// device: a bad one stops the kernel with a device-side assertion naming the op.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace engine {

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps);

void decode_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& pos, int64_t length, double scale, at::Tensor& out,
                           const std::optional<at::Tensor>& score_acc,
                           const std::optional<at::Tensor>& probs_out,
                           const std::optional<at::Tensor>& rope_cos,
                           const std::optional<at::Tensor>& rope_sin,
                           const std::optional<at::Tensor>& rope_rank,
                          const std::optional<at::Tensor>& slot_index,
                          const std::optional<at::Tensor>& bias);

// RoPE on the query (and the key if rotate_key), the key and value rows into cache slot `slot`.
void rope_append_cuda(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                      const at::Tensor& slot, bool rotate_key, at::Tensor& q_out, at::Tensor& k_cache,
                      at::Tensor& v_cache);

void prefill_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& qpos, const at::Tensor& kpos, double scale,
                            at::Tensor& out, at::Tensor& lse,
                            const std::optional<at::Tensor>& col_scores, int64_t score_rows,
                            double score_scale, const std::optional<at::Tensor>& bias);

void value_norm_cuda(const at::Tensor& v, int64_t kind, at::Tensor& out);

void select_victim_cuda(const at::Tensor& score, const at::Tensor& pos, int64_t lo, int64_t hi,
                        at::Tensor& out_idx);

void adaptive_victims_cuda(const at::Tensor& score, const at::Tensor& pos, int64_t lo, const at::Tensor& hi,
                           int64_t min_share, const at::Tensor& limit, at::Tensor& out_entry);

void compact_cuda(at::Tensor& k, at::Tensor& v, at::Tensor& pos, at::TensorList state,
                  const at::Tensor& keep_idx);

void remove_entries_cuda(at::Tensor& pos, at::TensorList state, std::optional<at::Tensor> slot_index,
                         const at::Tensor& entries, int64_t scratch, at::Tensor& freed_out);

void merge_value_cuda(at::Tensor& v, at::Tensor& w, const at::Tensor& victim,
                      const at::Tensor& receiver, const at::Tensor& weight,
                      const std::optional<at::Tensor>& slot_index);

void nearest_key_cuda(const at::Tensor& k, const at::Tensor& pos, const at::Tensor& victim, int64_t sinks,
                      at::Tensor& receiver_out, at::Tensor& similarity_out,
                      const std::optional<at::Tensor>& slot_index);

void merge_neighbour_cuda(at::Tensor& v, at::Tensor& w, at::Tensor& pos, const at::Tensor& abar,
                          const at::Tensor& picks, int64_t sinks, bool after, at::Tensor& receiver_out,
                          const std::optional<at::Tensor>& slot_index);

void merge_zip_cuda(at::Tensor& k, at::Tensor& v, at::Tensor& logp, at::Tensor& pos, const at::Tensor& q,
                    const at::Tensor& picks, int64_t sinks, double min_similarity, double scale,
                    at::Tensor& receiver_out, const std::optional<at::Tensor>& slot_index);

void merge_spread_cuda(at::Tensor& v, at::Tensor& pos, const at::Tensor& abar, const at::Tensor& picks, int64_t sinks,
                       int64_t window, at::Tensor& receivers_out, const std::optional<at::Tensor>& slot_index);

// matvec with w = the weights of packed GGUF blocks [N, row_bytes] of type qtype (csrc/quant_blocks.h),
// decoded in registers; x, norm and out one of fp32, bf16, fp16; sums in fp32.
void qmatvec_cuda(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype, at::Tensor& out, bool accumulate,
                  const std::optional<at::Tensor>& norm, double eps, bool swiglu);

// out [N, K] = the weights of packed blocks [N, row_bytes], each gguf.quants.dequantize's float32 rounded
// to out's dtype.
void dequantize_cuda(const at::Tensor& blocks, int64_t qtype, at::Tensor& out);

}  // namespace engine
