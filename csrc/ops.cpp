// The engine ops: schemas (mutated arguments marked `(a!)`) and the Python module `engine._C`.
//
// Backends register under these names: csrc/cpu/register.cpp (CPU), csrc/cuda (CUDA). Fake
// (meta) implementations live in engine/ops.py; the exact semantics in engine/reference.py.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(engine, m) {
  m.set_python_module("engine.ops");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def(
      "decode_attention(Tensor q, Tensor k, Tensor v, Tensor pos, int length, float scale, "
      "Tensor(a!) out, Tensor(b!)? score_acc, Tensor(c!)? probs_out, Tensor? rope_cos=None, "
      "Tensor? rope_sin=None, Tensor? rope_rank=None) -> ()");
  m.def(
      "prefill_attention(Tensor q, Tensor k, Tensor v, Tensor qpos, Tensor kpos, float scale, "
      "Tensor(a!) out, Tensor(b!) lse, Tensor(c!)? col_scores, int score_rows, float score_scale) "
      "-> ()");
  m.def(
      "rope_append(Tensor qkv, Tensor cos, Tensor sin, Tensor slot, bool rotate_key, Tensor(a!) q_out, "
      "Tensor(b!) k_cache, Tensor(c!) v_cache) -> ()");
  m.def("value_norm(Tensor v, int kind, Tensor(a!) out) -> ()");
  m.def("select_victim(Tensor score, Tensor pos, int lo, int hi, Tensor(a!) out_idx) -> ()");
  m.def(
      "compact(Tensor(a!) k, Tensor(b!) v, Tensor(c!) pos, Tensor(d!)[] state, Tensor keep_idx) "
      "-> ()");
  m.def(
      "merge_value(Tensor(a!) v, Tensor(b!) w, Tensor victim, Tensor receiver, Tensor weight) "
      "-> ()");
  m.def("matvec(Tensor x, Tensor w, Tensor(a!) out, bool accumulate=False) -> ()");  // F.linear; reference in engine/ops.py
}

// Importing engine._C loads this library, which registers the ops above as torch.ops.engine.*.
PYBIND11_MODULE(_C, m) { m.doc() = "Native kernels of engine; call them through engine.ops."; }
