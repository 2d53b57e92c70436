// The engine ops: schemas (mutated arguments marked `(a!)`) and the Python module `engine._C`.
//
// Backends register under these names: csrc/cpu/register.cpp (CPU), csrc/cuda (CUDA). Fake
// (meta) implementations live in engine/ops.py; the exact semantics in engine/reference.py.
#include <ATen/record_function.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu/kernels.h"

TORCH_LIBRARY(engine, m) {
  m.set_python_module("engine.ops");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def(
      "decode_attention(Tensor q, Tensor k, Tensor v, Tensor pos, int length, float scale, "
      "Tensor(a!) out, Tensor(b!)? score_acc, Tensor(c!)? probs_out, Tensor? rope_cos=None, "
      "Tensor? rope_sin=None, Tensor? rope_rank=None, Tensor? slot_index=None, Tensor? bias=None) -> ()");
  m.def(
      "prefill_attention(Tensor q, Tensor k, Tensor v, Tensor qpos, Tensor kpos, float scale, "
      "Tensor(a!) out, Tensor(b!) lse, Tensor(c!)? col_scores, int score_rows, float score_scale, "
      "Tensor? bias=None) -> ()");
  m.def(
      "rope_append(Tensor qkv, Tensor cos, Tensor sin, Tensor slot, bool rotate_key, Tensor(a!) q_out, "
      "Tensor(b!) k_cache, Tensor(c!) v_cache) -> ()");
  // rope_append then decode_attention for each of several single-sequence caches (CPU only)
  m.def(
      "decode_layers(Tensor[] qkv, Tensor[] cos, Tensor[] sin, Tensor[] slot, bool[] rotate_key, Tensor(a!)[] q_out, "
      "Tensor(b!)[] k_cache, Tensor(c!)[] v_cache, Tensor[] pos, int[] length, float scale, Tensor(d!)[] out, "
      "Tensor(e!)?[] score_acc, Tensor(f!)?[] probs_out, Tensor?[] rope_cos, Tensor?[] rope_sin, "
      "Tensor?[] rope_rank) -> ()");
  m.def("value_norm(Tensor v, int kind, Tensor(a!) out) -> ()");
  m.def("select_victim(Tensor score, Tensor pos, int lo, int hi, Tensor(a!) out_idx) -> ()");
  // the n entries a layer row evicts under adaptive allocation (engine/kv/allocation.py)
  m.def(
      "adaptive_victims(Tensor score, Tensor pos, int lo, Tensor hi, int min_share, Tensor limit, "
      "Tensor(a!) out_entry) -> ()");
  m.def(
      "compact(Tensor(a!) k, Tensor(b!) v, Tensor(c!) pos, Tensor(d!)[] state, Tensor keep_idx) "
      "-> ()");
  // entries leaving a (pooled) store at once: positions, per-slot state and pool rows freed, the rows by head
  m.def(
      "remove_entries(Tensor(a!) pos, Tensor(b!)[] state, Tensor(c!)? slot_index, Tensor entries, int scratch, "
      "Tensor(d!) freed_out) -> ()");
  m.def(
      "merge_value(Tensor(a!) v, Tensor(b!) w, Tensor victim, Tensor receiver, Tensor weight, "
      "Tensor? slot_index=None) -> ()");
  // WeightedKV's merge of each pick into its kept neighbour by position, the picks in order
  m.def(
      "merge_neighbour(Tensor(a!) v, Tensor(b!) w, Tensor(c!) pos, Tensor abar, Tensor picks, int sinks, "
      "bool after, Tensor(d!) receiver_out, Tensor? slot_index=None) -> ()");
  // KeepKV's ZIP merge of each pick into its most cosine-similar key's slot, the picks in order
  m.def(
      "merge_zip(Tensor(a!) k, Tensor(b!) v, Tensor(c!) logp, Tensor(d!) pos, Tensor q, Tensor picks, int sinks, "
      "float min_similarity, float scale, Tensor(e!) receiver_out, Tensor? slot_index=None) -> ()");
  // CaM's merge of each pick's value into the kept tokens after it, by attention, the picks in order
  m.def(
      "merge_spread(Tensor(a!) v, Tensor(b!) pos, Tensor abar, Tensor picks, int sinks, int window, "
      "Tensor(c!) receivers_out, Tensor? slot_index=None) -> ()");
  // the most cosine-similar other non-sink key of each victim's KV head (KeepKV's and WeightedKV's receiver)
  m.def(
      "nearest_key(Tensor k, Tensor pos, Tensor victim, int sinks, Tensor(a!) receiver_out, "
      "Tensor(b!) similarity_out, Tensor? slot_index=None) -> ()");
  // F.linear of x, RMSNorm(x) or silu(x[..., :K]) * x[..., K:]; reference in engine/ops.py
  m.def(
      "matvec(Tensor x, Tensor w, Tensor(a!) out, bool accumulate=False, Tensor? norm=None, float eps=0., "
      "bool swiglu=False) -> ()");
  // matvec over packed GGUF blocks [N, row_bytes] of type qtype (csrc/quant_blocks.h), dequantized in registers
  m.def(
      "qmatvec(Tensor x, Tensor blocks, int qtype, Tensor(a!) out, bool accumulate=False, Tensor? norm=None, "
      "float eps=0., bool swiglu=False) -> ()");
  // qmatvec with h quantized to int8 per block of 32 (llama.cpp's arithmetic; CPU only): engine/reference.py
  m.def(
      "qmatvec_q8(Tensor x, Tensor blocks, int qtype, Tensor(a!) out, bool accumulate=False, Tensor? norm=None, "
      "float eps=0., bool swiglu=False) -> ()");
  // out [N, K] = the weights of packed blocks [N, row_bytes], each exactly gguf.quants.dequantize's value
  m.def("dequantize(Tensor blocks, int qtype, Tensor(a!) out) -> ()");
}

namespace {

// A CPU kernel bound for a direct call from engine.ops: a small matvec takes 0.7 us this way and 2.2 us
// through the dispatcher's boxed call (measured), and a decode step makes ~180 op calls. torch.profiler
// still sees it under the op's name ("engine::matvec"), as it sees a dispatched call.
template <typename R, typename... Args>
void bind_cpu(pybind11::module_& m, const char* name, R (*kernel)(Args...)) {
  m.def(name, [label = std::string("engine::") + name, kernel](Args... args) -> R {
    RECORD_FUNCTION(label.c_str(), c10::ArrayRef<const c10::IValue>());
    return kernel(std::forward<Args>(args)...);
  });
}

// compact's state list comes from Python as a list: pybind has no caster for at::TensorList.
void compact_cpu_list(at::Tensor& k, at::Tensor& v, at::Tensor& pos, const std::vector<at::Tensor>& state,
                      const at::Tensor& keep_idx) {
  engine::compact_cpu(k, v, pos, state, keep_idx);
}

// decode_layers' lists as pybind gives them (a Python list, None where absent).
using Tensors = std::vector<at::Tensor>;
using MaybeTensors = std::vector<std::optional<at::Tensor>>;

c10::List<std::optional<at::Tensor>> optional_list(const MaybeTensors& xs) {
  c10::List<std::optional<at::Tensor>> list;
  list.reserve(xs.size());
  for (const auto& x : xs) list.push_back(x);
  return list;
}

void decode_layers_cpu_list(const Tensors& qkv, const Tensors& cos, const Tensors& sin, const Tensors& slot,
                            const std::vector<bool>& rotate_key, const Tensors& q_out, const Tensors& k_cache,
                            const Tensors& v_cache, const Tensors& pos, const std::vector<int64_t>& length,
                            double scale,
                            const Tensors& out, const MaybeTensors& score_acc, const MaybeTensors& probs_out,
                            const MaybeTensors& rope_cos, const MaybeTensors& rope_sin,
                            const MaybeTensors& rope_rank) {
  c10::List<bool> rotate;
  for (const bool r : rotate_key) rotate.push_back(r);
  engine::decode_layers_cpu(qkv, cos, sin, slot, rotate, q_out, k_cache, v_cache, pos, length, scale, out,
                            optional_list(score_acc), optional_list(probs_out), optional_list(rope_cos),
                            optional_list(rope_sin), optional_list(rope_rank));
}

void remove_entries_cpu_list(at::Tensor& pos, const std::vector<at::Tensor>& state,
                             std::optional<at::Tensor> slot_index, const at::Tensor& entries, int64_t scratch,
                             at::Tensor& freed_out) {
  engine::remove_entries_cpu(pos, state, slot_index, entries, scratch, freed_out);
}

}  // namespace

// Importing engine._C loads this library, which registers the ops above as torch.ops.engine.*;
// engine._C.cpu holds the CPU kernels for direct calls (same checks, same results).
PYBIND11_MODULE(_C, m) {
  m.doc() = "Native kernels of engine; call them through engine.ops.";
  auto cpu = m.def_submodule("cpu", "The CPU kernels, called without the dispatcher (CPU tensors only).");
  bind_cpu(cpu, "rms_norm", &engine::rms_norm_cpu);
  bind_cpu(cpu, "decode_attention", &engine::decode_attention_cpu);
  bind_cpu(cpu, "prefill_attention", &engine::prefill_attention_cpu);
  bind_cpu(cpu, "rope_append", &engine::rope_append_cpu);
  bind_cpu(cpu, "decode_layers", &decode_layers_cpu_list);
  bind_cpu(cpu, "value_norm", &engine::value_norm_cpu);
  bind_cpu(cpu, "select_victim", &engine::select_victim_cpu);
  bind_cpu(cpu, "adaptive_victims", &engine::adaptive_victims_cpu);
  bind_cpu(cpu, "compact", &compact_cpu_list);
  bind_cpu(cpu, "remove_entries", &remove_entries_cpu_list);
  bind_cpu(cpu, "merge_value", &engine::merge_value_cpu);
  bind_cpu(cpu, "merge_neighbour", &engine::merge_neighbour_cpu);
  bind_cpu(cpu, "merge_spread", &engine::merge_spread_cpu);
  bind_cpu(cpu, "merge_zip", &engine::merge_zip_cpu);
  bind_cpu(cpu, "nearest_key", &engine::nearest_key_cpu);
  bind_cpu(cpu, "matvec", &engine::matvec_cpu);
  bind_cpu(cpu, "qmatvec", &engine::qmatvec_cpu);
  bind_cpu(cpu, "qmatvec_q8", &engine::qmatvec_q8_cpu);
  bind_cpu(cpu, "dequantize", &engine::dequantize_cpu);
  cpu.def("set_quant_isa", &engine::set_quant_isa,
          "The packed kernels' instruction set: 'auto' (the best this CPU has: AVX-512 VNNI for qmatvec_q8, "
          "AVX2), or a cap: 'avx2' or 'portable'.");
  cpu.def("quant_isa", &engine::quant_isa,
          "The packed kernels' instruction set now: 'avx512vnni' (qmatvec_q8's dot products; qmatvec and "
          "dequantize run their AVX2 kernels under it), 'avx2' or 'portable'.");
}
