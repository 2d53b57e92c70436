// Registers the CPU kernels under the op names declared in csrc/ops.cpp.
#include <torch/library.h>

#include "kernels.h"

TORCH_LIBRARY_IMPL(engine, CPU, m) {
  m.impl("rms_norm", &engine::rms_norm_cpu);
  m.impl("decode_attention", &engine::decode_attention_cpu);
  m.impl("prefill_attention", &engine::prefill_attention_cpu);
  m.impl("rope_append", &engine::rope_append_cpu);
  m.impl("decode_layers", &engine::decode_layers_cpu);
  m.impl("value_norm", &engine::value_norm_cpu);
  m.impl("select_victim", &engine::select_victim_cpu);
  m.impl("adaptive_victims", &engine::adaptive_victims_cpu);
  m.impl("compact", &engine::compact_cpu);
  m.impl("remove_entries", &engine::remove_entries_cpu);
  m.impl("merge_value", &engine::merge_value_cpu);
  m.impl("merge_neighbour", &engine::merge_neighbour_cpu);
  m.impl("merge_spread", &engine::merge_spread_cpu);
  m.impl("merge_zip", &engine::merge_zip_cpu);
  m.impl("nearest_key", &engine::nearest_key_cpu);
  m.impl("matvec", &engine::matvec_cpu);
  m.impl("qmatvec", &engine::qmatvec_cpu);
  m.impl("qmatvec_q8", &engine::qmatvec_q8_cpu);
  m.impl("dequantize", &engine::dequantize_cpu);
}
