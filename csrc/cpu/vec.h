// Inner loops of the CPU kernels, written so gcc vectorises them at plain -O3 (no -march=native,
// no -ffast-math): contiguous restrict pointers, fixed-trip inner loops over kLanes independent
// partial sums (so no reassociation is needed), selects done with masks rather than branches.
#pragma once

#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

// Dispatch over the three cache dtypes (fp32, bf16, fp16) only.
#define ENGINE_DISPATCH_FLOATS(TYPE, NAME, ...)                \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)    \
                             AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// Hot kernels are compiled twice, for AVX2+FMA (x86-64-v3) and for the baseline, and the loader
// picks one (an ifunc): one build runs on any x86-64 and still uses the wide units where they exist.
// Helpers called from such a function are inlined into each clone.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define ENGINE_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define ENGINE_MULTIVERSION
#endif

namespace engine {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// std::bit_cast for C++17 builds (torch < 2.12 compiles extensions with -std=c++17).
template <typename To, typename From>
inline To bits_as(From x) {
  static_assert(sizeof(To) == sizeof(From));
  To y;
  std::memcpy(&y, &x, sizeof y);
  return y;
}

// fp16 -> fp32 written so the loop vectorises (c10::Half's conversion does not without -mf16c):
// the branch-free method of c10's fp16_ieee_to_fp32_value, the select done with masks. Exact for
// every input, NaN and inf included.
inline void half_to_float(const uint16_t* __restrict__ src, float* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t w = static_cast<uint32_t>(src[i]) << 16;
    const uint32_t sign = w & 0x80000000u, two_w = w + w;
    const uint32_t normal = bits_as<uint32_t>(bits_as<float>((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f);
    const uint32_t subnormal = bits_as<uint32_t>(bits_as<float>((two_w >> 17) | (126u << 23)) - 0.5f);
    const uint32_t is_sub = 0u - static_cast<uint32_t>(two_w < (1u << 27));
    dst[i] = bits_as<float>(sign | (subnormal & is_sub) | (normal & ~is_sub));
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

// {dot(a, a), dot(a, b)} in one pass over a: the same partial sums and tree as dot(), so the same bits.
inline std::pair<float, float> dots(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  float aa[kLanes] = {}, ab[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {  // two loops, not one: gcc vectorised the interleaved pair by shuffles
    for (int64_t u = 0; u < kLanes; ++u) aa[u] += a[i + u] * a[i + u];
    for (int64_t u = 0; u < kLanes; ++u) ab[u] += a[i + u] * b[i + u];
  }
  for (int64_t u = 0; i < n; ++i, ++u) aa[u] += a[i] * a[i], ab[u] += a[i] * b[i];
  for (float* part : {aa, ab}) {
    for (int64_t u = 0; u < 8; ++u) part[u] += part[u + 8];
    for (int64_t u = 0; u < 4; ++u) part[u] += part[u + 4];
  }
  return {(aa[0] + aa[2]) + (aa[1] + aa[3]), (ab[0] + ab[2]) + (ab[1] + ab[3])};
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

// ---------------------------------------------------------------------------------------------
// 8-lane fp32 vectors (vector extensions of GCC >= 12 and Clang): one ymm register in an
// ENGINE_MULTIVERSION AVX2 clone, a pair of xmm in the baseline one, so a kernel is written once
// for both. They are always_inline: an out-of-line call would run the baseline code.
// ---------------------------------------------------------------------------------------------

#define ENGINE_INLINE inline __attribute__((always_inline))

// Inlined everywhere, so the baseline ABI for passing 32-byte vectors (which GCC warns about) is
// never used.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

typedef float Vec8 __attribute__((vector_size(32)));
typedef int32_t Int8 __attribute__((vector_size(32)));
typedef uint32_t UInt8 __attribute__((vector_size(32)));
typedef uint16_t UShort8 __attribute__((vector_size(16)));

// x in every lane. Written as a load of 8 copies, which both clones compile to a broadcast; an
// initialiser list, a shuffle or vector-scalar arithmetic compiles to 8 inserts in one of them.
ENGINE_INLINE Vec8 splat8(float x) {
  const float lanes[8] = {x, x, x, x, x, x, x, x};
  Vec8 v;
  __builtin_memcpy(&v, lanes, sizeof v);
  return v;
}

// 8 consecutive elements of a row (any alignment) as fp32; fp16 as in half_to_float.
template <typename T>
ENGINE_INLINE Vec8 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    Vec8 v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
  } else {
    UShort8 h;
    __builtin_memcpy(&h, p, sizeof h);
    const UInt8 w = __builtin_convertvector(h, UInt8) << 16;
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      return (Vec8)w;
    } else {
      static_assert(std::is_same_v<T, c10::Half>);
      const UInt8 sign = w & 0x80000000u, two_w = w + w;
      const UInt8 nb = (two_w >> 4) + (0xE0u << 23), sb = (two_w >> 17) | (126u << 23);
      const Vec8 normal = (Vec8)nb * 0x1.0p-112f;
      const Vec8 subnormal = (Vec8)sb - 0.5f;
      const UInt8 is_sub = (UInt8)(two_w < (1u << 27));  // all-ones lanes where true
      return (Vec8)(sign | ((UInt8)subnormal & is_sub) | ((UInt8)normal & ~is_sub));
    }
  }
}

ENGINE_INLINE void store8(float* p, const Vec8& v) { __builtin_memcpy(p, &v, sizeof v); }

// The first n (<= 8) lanes from or to memory, so a row's tail needs no loop of its own; the other
// lanes of a load hold `fill`.
ENGINE_INLINE Vec8 load_partial(const float* p, int64_t n, float fill) {
  if (n == 8) return load8(p);
  Vec8 v = splat8(fill);
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  return v;
}

ENGINE_INLINE void store_partial(float* p, const Vec8& v, int64_t n) {
  if (n == 8) return store8(p, v);
  for (int64_t i = 0; i < n; ++i) p[i] = v[i];
}

ENGINE_INLINE float hsum8(const Vec8& v) {
  const Vec8 a = v + __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  const Vec8 b = a + __builtin_shufflevector(a, a, 2, 3, 0, 1, 6, 7, 4, 5);
  return b[0] + b[1];
}

ENGINE_INLINE float hmax8(const Vec8& v) {
  const Vec8 s = __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  const Vec8 a = v > s ? v : s;
  const Vec8 t = __builtin_shufflevector(a, a, 2, 3, 0, 1, 6, 7, 4, 5);
  const Vec8 b = a > t ? a : t;
  return b[0] > b[1] ? b[0] : b[1];
}

// [x0+x2, y0+y2, x1+x3, y1+y3 | the same for lanes 4..7]
ENGINE_INLINE Vec8 pair_sums(const Vec8& x, const Vec8& y) {
  return __builtin_shufflevector(x, y, 0, 8, 1, 9, 4, 12, 5, 13) +
         __builtin_shufflevector(x, y, 2, 10, 3, 11, 6, 14, 7, 15);
}

// Of two pair_sums: the sums of 4 lanes of each of 4 vectors, per 128-bit half.
ENGINE_INLINE Vec8 quad_sums(const Vec8& x, const Vec8& y) {
  return __builtin_shufflevector(x, y, 0, 1, 8, 9, 4, 5, 12, 13) +
         __builtin_shufflevector(x, y, 2, 3, 10, 11, 6, 7, 14, 15);
}

// Lane j of the result = the sum of the 8 lanes of a[j]: 8 dot-product partials reduced at once,
// 14 shuffles and 7 adds where 8 separate horizontal sums would take about 40.
ENGINE_INLINE Vec8 transpose_sum8(const Vec8 a[8]) {
  const Vec8 lo = quad_sums(pair_sums(a[0], a[1]), pair_sums(a[2], a[3]));
  const Vec8 hi = quad_sums(pair_sums(a[4], a[5]), pair_sums(a[6], a[7]));
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(lo, hi, 4, 5, 6, 7, 12, 13, 14, 15);
}

// exp(x) lane-wise for x <= 0 (-inf gives 0; NaN stays NaN): Cody-Waite reduction and Cephes'
// expf polynomial (about 1 ulp). Below -87, the end of the normal range, it flushes to 0 (an
// absolute error under 2e-38).
ENGINE_INLINE Vec8 exp8_nonpositive(const Vec8& x) {
  const Vec8 xc = x < -87.f ? splat8(-87.f) : x;
  const Vec8 t = xc * 1.44269504f + 12582912.f;  // + 1.5 * 2^23 rounds to an integer n
  const Vec8 n = t - 12582912.f;
  const Int8 ni = (Int8)t - 0x4B400000;  // n, from t's low mantissa bits
  const Vec8 r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  Vec8 p = splat8(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const Vec8 e = ((p * (r * r) + r) + 1.f) * (Vec8)((ni + 127) << 23);
  return x < -87.f ? Vec8{} : e;
}

#pragma GCC diagnostic pop

}  // namespace engine
