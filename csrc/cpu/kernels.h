// CPU implementations of the engine ops (schemas and semantics: csrc/ops.cpp, engine/reference.py).
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

namespace engine {

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps);

void decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& pos, int64_t length, double scale, at::Tensor& out,
                          const std::optional<at::Tensor>& score_acc,
                          const std::optional<at::Tensor>& probs_out,
                          const std::optional<at::Tensor>& rope_cos,
                          const std::optional<at::Tensor>& rope_sin,
                          const std::optional<at::Tensor>& rope_rank,
                          const std::optional<at::Tensor>& slot_index,
                          const std::optional<at::Tensor>& bias);

// Whether decode_attention_cpu cuts a pass of query_heads (B H) x length slots x head_dim over the
// threads: else one thread runs it, which is cheaper for small passes.
bool decode_attention_splits(int64_t query_heads, int64_t length, int64_t head_dim);

// One decode layer of several single-sequence caches: request i's rope_append then decode_attention
// (arguments at index i of each list; score_acc, probs_out and the rope lists hold None where absent).
void decode_layers_cpu(at::TensorList qkv, at::TensorList cos, at::TensorList sin, at::TensorList slot,
                       const c10::List<bool>& rotate_key, at::TensorList q_out, at::TensorList k_cache,
                       at::TensorList v_cache, at::TensorList pos, at::IntArrayRef length, double scale,
                       at::TensorList out,
                       const c10::List<std::optional<at::Tensor>>& score_acc,
                       const c10::List<std::optional<at::Tensor>>& probs_out,
                       const c10::List<std::optional<at::Tensor>>& rope_cos,
                       const c10::List<std::optional<at::Tensor>>& rope_sin,
                       const c10::List<std::optional<at::Tensor>>& rope_rank);

// RoPE on the query (and the key if rotate_key), the key and value rows into cache slot `slot`.
void rope_append_cpu(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                     const at::Tensor& slot, bool rotate_key, at::Tensor& q_out, at::Tensor& k_cache,
                     at::Tensor& v_cache);

void prefill_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& qpos, const at::Tensor& kpos, double scale,
                           at::Tensor& out, at::Tensor& lse,
                           const std::optional<at::Tensor>& col_scores, int64_t score_rows,
                           double score_scale, const std::optional<at::Tensor>& bias);

void value_norm_cpu(const at::Tensor& v, int64_t kind, at::Tensor& out);

void select_victim_cpu(const at::Tensor& score, const at::Tensor& pos, int64_t lo, int64_t hi,
                       at::Tensor& out_idx);

// The n entries (head C + slot) a layer row evicts under adaptive allocation: engine/reference.py.
void adaptive_victims_cpu(const at::Tensor& score, const at::Tensor& pos, int64_t lo, const at::Tensor& hi,
                          int64_t min_share, const at::Tensor& limit, at::Tensor& out_entry);

void compact_cpu(at::Tensor& k, at::Tensor& v, at::Tensor& pos, at::TensorList state,
                 const at::Tensor& keep_idx);

// Entries (head C + slot) leaving each row at once, their freed pool rows listed by head: engine/reference.py.
void remove_entries_cpu(at::Tensor& pos, at::TensorList state, std::optional<at::Tensor> slot_index,
                        const at::Tensor& entries, int64_t scratch, at::Tensor& freed_out);

void merge_value_cpu(at::Tensor& v, at::Tensor& w, const at::Tensor& victim,
                     const at::Tensor& receiver, const at::Tensor& weight,
                     const std::optional<at::Tensor>& slot_index);

// WeightedKV's merge of each pick (head C + slot) into its neighbour by position, the picks in order:
// engine/reference.py.
// The most cosine-similar other non-sink key of each victim's KV head: engine/reference.py.
void nearest_key_cpu(const at::Tensor& k, const at::Tensor& pos, const at::Tensor& victim, int64_t sinks,
                     at::Tensor& receiver_out, at::Tensor& similarity_out,
                     const std::optional<at::Tensor>& slot_index);

void merge_neighbour_cpu(at::Tensor& v, at::Tensor& w, at::Tensor& pos, const at::Tensor& abar,
                         const at::Tensor& picks, int64_t sinks, bool after, at::Tensor& receiver_out,
                         const std::optional<at::Tensor>& slot_index);

// CaM's merge of each pick's value into the next `window` kept non-sink tokens, by attention, the picks in
// order: engine/reference.py.
// KeepKV's ZIP merge of each pick into the other non-sink slot of its KV head with the most cosine-similar
// key, for the reference query q, the picks in order: engine/reference.py.
void merge_zip_cpu(at::Tensor& k, at::Tensor& v, at::Tensor& logp, at::Tensor& pos, const at::Tensor& q,
                   const at::Tensor& picks, int64_t sinks, double min_similarity, double scale,
                   at::Tensor& receiver_out, const std::optional<at::Tensor>& slot_index);

void merge_spread_cpu(at::Tensor& v, at::Tensor& pos, const at::Tensor& abar, const at::Tensor& picks, int64_t sinks,
                      int64_t window, at::Tensor& receivers_out, const std::optional<at::Tensor>& slot_index);

// out[..., N] (+)= h[..., K] @ w[N, K]^T, all in w's dtype, fp32 accumulation (decode: few rows), where
// h = x, RMSNorm(x) with `norm`, or silu(x[..., :K]) * x[..., K:] with `swiglu`.
void matvec_cpu(const at::Tensor& x, const at::Tensor& w, at::Tensor& out, bool accumulate,
                const std::optional<at::Tensor>& norm, double eps, bool swiglu);

// matvec_cpu with w = the weights of packed GGUF blocks [N, row_bytes] of type qtype (csrc/quant_blocks.h),
// decoded in registers; x, norm and out fp32.
void qmatvec_cpu(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype, at::Tensor& out, bool accumulate,
                 const std::optional<at::Tensor>& norm, double eps, bool swiglu);

// qmatvec_cpu with each block of 32 values of h quantized to int8 first (one fp32 scale per block) and integer
// dot products with the weights' codes, as llama.cpp computes it: Q4_0, Q4_1, Q8_0 (other types: qmatvec_cpu).
void qmatvec_q8_cpu(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype, at::Tensor& out, bool accumulate,
                    const std::optional<at::Tensor>& norm, double eps, bool swiglu);

// out [N, K] = the weights of packed blocks [N, row_bytes], each exactly gguf.quants.dequantize's float32.
void dequantize_cpu(const at::Tensor& blocks, int64_t qtype, at::Tensor& out);

// The instruction set of qmatvec_cpu and dequantize_cpu: "auto" (AVX2+FMA+F16C where the CPU has them)
// or "portable" (the code every CPU runs; tests force it to check it on an AVX2 machine).
void set_quant_isa(const std::string& isa);
// The one in use now: "avx2" or "portable".
std::string quant_isa();

}  // namespace engine
