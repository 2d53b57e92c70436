// The decode step's prologue in one call: RoPE on the query (and on the key at original positions),
// then the key and value rows into their cache slots. In PyTorch this is ~25 small ops per layer
// (splits, views, two rotations, two scatters), which cost more than the arithmetic.
#include "../checks.h"
#include "kernels.h"
#include "vec.h"

namespace engine {
namespace {

// dst[0..D) = src rotated by (cos, sin) in the rotate_half layout, in fp32 with every product rounded
// before the sum: the bits of Rope.rotate_by (x cos + rotate_half(x) sin) in PyTorch.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
template <typename S, typename T>
void rotate(const S* src, const float* cos, const float* sin, T* dst, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < half; ++d) {
    const float x1 = static_cast<float>(src[d]), x2 = static_cast<float>(src[half + d]);
    const float a = x1 * cos[d], b = x2 * sin[d];
    const float c = x2 * cos[half + d], e = x1 * sin[half + d];
    dst[d] = static_cast<T>(a - b);
    dst[half + d] = static_cast<T>(c + e);
  }
}
#pragma GCC pop_options

template <typename S, typename T>
void copy_row(const S* src, T* dst, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(static_cast<float>(src[d]));
}

template <typename q_t, typename kv_t>
void append(const q_t* qkv, const float* cos, const float* sin, const int64_t* slot, bool rotate_key,
            q_t* q_out, kv_t* k_cache, kv_t* v_cache, int64_t B, int64_t H, int64_t Hkv, int64_t Hc, int64_t C,
            int64_t D) {
  for (int64_t b = 0; b < B; ++b) {
    const q_t* row = qkv + b * (H + 2 * Hkv) * D;
    for (int64_t h = 0; h < H; ++h) rotate(row + h * D, cos, sin, q_out + (b * H + h) * D, D);
    for (int64_t g = 0; g < Hkv; ++g) {
      const int64_t at = ((b * Hc + (Hc == 1 ? 0 : g)) * C + slot[b * Hkv + g]) * D;  // Hc 1: a shared pool
      const q_t* k = row + (H + g) * D;
      if (rotate_key) {
        rotate(k, cos, sin, k_cache + at, D);
      } else {
        copy_row(k, k_cache + at, D);
      }
      copy_row(row + (H + Hkv + g) * D, v_cache + at, D);
    }
  }
}

}  // namespace

void rope_append_cpu(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                     const at::Tensor& slot, bool rotate_key, at::Tensor& q_out, at::Tensor& k_cache,
                     at::Tensor& v_cache) {
  check_rope_append(qkv, cos, sin, slot, q_out, k_cache, v_cache);
  const int64_t B = k_cache.size(0), Hkv = slot.size(1), C = k_cache.size(2), D = k_cache.size(3);
  check_slot_indices("rope_append", slot, C);
  const int64_t H = q_out.size(1);
  ENGINE_DISPATCH_FLOATS(k_cache.scalar_type(), "rope_append", [&] {
    using kv_t = scalar_t;
    ENGINE_DISPATCH_FLOATS(qkv.scalar_type(), "rope_append", [&] {
      append<scalar_t, kv_t>(qkv.const_data_ptr<scalar_t>(), cos.const_data_ptr<float>(),
                             sin.const_data_ptr<float>(), slot.const_data_ptr<int64_t>(), rotate_key,
                             q_out.mutable_data_ptr<scalar_t>(), k_cache.mutable_data_ptr<kv_t>(),
                             v_cache.mutable_data_ptr<kv_t>(), B, H, Hkv, k_cache.size(1), C, D);
    });
  });
}

}  // namespace engine
