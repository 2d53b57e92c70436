// The GGUF block formats the engine keeps packed (llama.cpp's ggml-common.h layouts, byte for byte),
// shared by the CPU and CUDA kernels. A packed weight is a uint8 tensor [N, row_bytes]: each of its N
// rows holds K / kBlock<T> consecutive blocks of that row's K weights, exactly as the file stores them.
// The type ids are ggml's (gguf.GGMLQuantizationType), the ones engine.quant and the op schema use.
// Scales are IEEE half bit patterns (uint16_t): each backend converts them its own way.
#pragma once

#include <cstdint>

namespace engine::quant {

enum Type : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14 };

constexpr int64_t kSuper = 256;  // weights per K-quant super-block

// Q4_0: w = d * (q - 8), q a nibble; weight j < 16 in the low nibble of qs[j], weight j + 16 in its high one.
struct BlockQ4_0 {
  uint16_t d;
  uint8_t qs[16];
};
// Q4_1: w = d * q + m, nibbles as in Q4_0.
struct BlockQ4_1 {
  uint16_t d, m;
  uint8_t qs[16];
};
// Q8_0: w = d * q, q int8.
struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[32];
};
// Q4_K: 256 weights in 8 sub-blocks of 32; sub-block j has a 6-bit scale sc_j and min m_j packed in
// `scales` (ggml's get_scale_min_k4) and w = d * sc_j * q - dmin * m_j. Weights 64 i + l (l < 32) are the
// low nibbles of qs[32 i + l], weights 64 i + 32 + l their high nibbles.
struct BlockQ4_K {
  uint16_t d, dmin;
  uint8_t scales[12];
  uint8_t qs[128];
};
// Q6_K: 256 weights in 16 sub-blocks of 16, w = d * scales[j] * (q - 32), q 6 bits: 4 low bits in ql,
// 2 high bits in qh (ggml's dequantize_row_q6_K gives the order).
struct BlockQ6_K {
  uint8_t ql[128];
  uint8_t qh[64];
  int8_t scales[16];
  uint16_t d;
};

static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 && sizeof(BlockQ8_0) == 34);
static_assert(sizeof(BlockQ4_K) == 144 && sizeof(BlockQ6_K) == 210);

// Weights per block and bytes per block of a type; 0 for a type the engine does not keep packed.
constexpr int64_t block_weights(int64_t type) {
  return type == kQ4_0 || type == kQ4_1 || type == kQ8_0 ? 32 : type == kQ4_K || type == kQ6_K ? kSuper : 0;
}
constexpr int64_t block_bytes(int64_t type) {
  switch (type) {
    case kQ4_0: return sizeof(BlockQ4_0);
    case kQ4_1: return sizeof(BlockQ4_1);
    case kQ8_0: return sizeof(BlockQ8_0);
    case kQ4_K: return sizeof(BlockQ4_K);
    case kQ6_K: return sizeof(BlockQ6_K);
    default: return 0;
  }
}

}  // namespace engine::quant
