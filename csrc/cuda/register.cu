// Registers the CUDA kernels under the op names declared in csrc/ops.cpp.
#include <torch/library.h>

#include "kernels.h"

TORCH_LIBRARY_IMPL(engine, CUDA, m) {
  m.impl("rms_norm", &engine::rms_norm_cuda);
  m.impl("decode_attention", &engine::decode_attention_cuda);
  m.impl("prefill_attention", &engine::prefill_attention_cuda);
  m.impl("rope_append", &engine::rope_append_cuda);
  m.impl("value_norm", &engine::value_norm_cuda);
  m.impl("select_victim", &engine::select_victim_cuda);
  m.impl("adaptive_victims", &engine::adaptive_victims_cuda);
  m.impl("compact", &engine::compact_cuda);
  m.impl("merge_value", &engine::merge_value_cuda);
  m.impl("remove_entries", &engine::remove_entries_cuda);
  m.impl("merge_neighbour", &engine::merge_neighbour_cuda);
  m.impl("merge_spread", &engine::merge_spread_cuda);
  m.impl("merge_zip", &engine::merge_zip_cuda);
  m.impl("nearest_key", &engine::nearest_key_cuda);
  m.impl("qmatvec", &engine::qmatvec_cuda);
  m.impl("dequantize", &engine::dequantize_cuda);
}
