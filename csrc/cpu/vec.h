// Inner loops of the CPU kernels, written so gcc vectorises them at plain -O3 (no -march=native,
// no -ffast-math): contiguous restrict pointers, and `omp simd reduction` where a sum must be
// reassociated across vector lanes.
#pragma once

#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

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

// Row `src[0..n)` as fp32: the row itself for fp32 data, else converted into `buf`.
template <typename T>
inline const float* as_float(const T* __restrict__ src, float* __restrict__ buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
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
constexpr int64_t kLanes = 16;

inline float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  float part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t u = 0; u < kLanes; ++u) part[u] += a[i + u] * b[i + u];
  }
  for (int64_t u = 0; i < n; ++i, ++u) part[u] += a[i] * b[i];
  float s = 0.f;
  for (int64_t u = 0; u < kLanes; ++u) s += part[u];
  return s;
}

// y += a * x
inline void axpy(float* __restrict__ y, float a, const float* __restrict__ x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
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
