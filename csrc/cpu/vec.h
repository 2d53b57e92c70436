// Inner loops of the CPU kernels, written so gcc vectorises them at plain -O3 (no -march=native,
// no -ffast-math): contiguous restrict pointers, fixed-trip inner loops over kLanes independent
// partial sums (so no reassociation is needed), selects done with masks rather than branches.
#pragma once

#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

// Dispatch over the three cache dtypes (fp32, bf16, fp16) only.
#define ENGINE_DISPATCH_FLOATS(TYPE, NAME, ...)                \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)    \
                             AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace engine {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// fp16 -> fp32 written so the loop vectorises (c10::Half's conversion does not without -mf16c):
// the branch-free method of c10's fp16_ieee_to_fp32_value, the select done with masks. Exact for
// every input, NaN and inf included.
inline void half_to_float(const uint16_t* __restrict__ src, float* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t w = static_cast<uint32_t>(src[i]) << 16;
    const uint32_t sign = w & 0x80000000u, two_w = w + w;
    const uint32_t normal = std::bit_cast<uint32_t>(std::bit_cast<float>((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f);
    const uint32_t subnormal = std::bit_cast<uint32_t>(std::bit_cast<float>((two_w >> 17) | (126u << 23)) - 0.5f);
    const uint32_t is_sub = 0u - static_cast<uint32_t>(two_w < (1u << 27));
    dst[i] = std::bit_cast<float>(sign | (subnormal & is_sub) | (normal & ~is_sub));
  }
}

// Row `src[0..n)` as fp32: the row itself for fp32 data, else converted into `buf`.
template <typename T>
inline const float* as_float(const T* __restrict__ src, float* __restrict__ buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    half_to_float(reinterpret_cast<const uint16_t*>(src), buf, n);
    return buf;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
}

template <typename T>
inline void store_float(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// kLanes independent partial sums: a fixed-trip inner loop gcc turns into several vector
// accumulators, so the sum is not one long chain of dependent adds (and needs no fast-math).
constexpr int64_t kLanes = 16;  // dot() below sums exactly 16 partials

inline float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  float part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t u = 0; u < kLanes; ++u) part[u] += a[i + u] * b[i + u];
  }
  for (int64_t u = 0; i < n; ++i, ++u) part[u] += a[i] * b[i];
  for (int64_t u = 0; u < 8; ++u) part[u] += part[u + 8];  // a tree, not a chain
  for (int64_t u = 0; u < 4; ++u) part[u] += part[u + 4];
  return (part[0] + part[2]) + (part[1] + part[3]);
}

// acc[0..D) += sum_j p[j] * rows[j][0..D): kLanes columns of acc stay in registers while the
// rows stream past, instead of a load and a store of acc per row.
inline void accumulate_rows(float* __restrict__ acc, const float* __restrict__ p,
                            const float* const* rows, int64_t n, int64_t D) {
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    float part[kLanes];
    for (int64_t u = 0; u < kLanes; ++u) part[u] = acc[d + u];
    for (int64_t j = 0; j < n; ++j) {
      const float* __restrict__ r = rows[j] + d;
      const float pj = p[j];
      for (int64_t u = 0; u < kLanes; ++u) part[u] += pj * r[u];
    }
    for (int64_t u = 0; u < kLanes; ++u) acc[d + u] = part[u];
  }
  for (; d < D; ++d) {
    float s = acc[d];
    for (int64_t j = 0; j < n; ++j) s += p[j] * rows[j][d];
    acc[d] = s;
  }
}

// kt[d][j] = k[j][d] for a tile of n rows of width D: the tile's dot products with a query then
// become accumulate_rows over the D rows of kt, vectorised across keys with no reduction.
inline void transpose_tile(const float* __restrict__ k, float* __restrict__ kt, int64_t n, int64_t D) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t d = 0; d < D; ++d) kt[d * n + j] = k[j * D + d];
  }
}

inline void scale_row(float* __restrict__ y, float a, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] *= a;
}

// Online-softmax state of one query row: running max `m`, running sum `l` of exp(x - m).
struct SoftmaxRow {
  float m = kNegInf;
  float l = 0.f;

  // Folds logits x[0..n) (-inf = masked) in: returns the factor that rescales what was accumulated
  // against the old max, and overwrites x with exp(x - m_new).
  float update(float* __restrict__ x, int64_t n) {
    float tile_max = kNegInf;
    for (int64_t j = 0; j < n; ++j) tile_max = x[j] > tile_max ? x[j] : tile_max;
    if (tile_max == kNegInf) {
      for (int64_t j = 0; j < n; ++j) x[j] = 0.f;
      return 1.f;
    }
    const float m_new = m > tile_max ? m : tile_max;
    const float corr = std::exp(m - m_new);  // 0 when nothing was seen yet (m = -inf)
    float sum = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      x[j] = std::exp(x[j] - m_new);
      sum += x[j];
    }
    l = l * corr + sum;
    m = m_new;
    return corr;
  }

  // log-sum-exp of everything folded in; -inf when nothing was visible.
  float lse() const { return l > 0.f ? m + std::log(l) : kNegInf; }
};

}  // namespace engine
