// Decode attention: one query per sequence against the slot cache, GQA, exact softmax.
//
// Split-KV ("flash decoding" on CPU): the B * Hkv * length (KV head, slot) pairs are cut into one
// contiguous range per thread, so every thread gets the same number of slots whatever Hkv is; a
// range may hold pieces of several KV heads and a head may be shared by several threads. Per piece
// the G query heads of the group go together, so each key and value row is read once: the logits
// of all its slots (into probs_out, or scratch), their max, then by blocks of kRows slots exp, sum
// and exp @ V. The thread that completes a KV head's last piece (an atomic count of its slots, so
// no barrier: a descheduled thread delays only its own heads) combines the pieces, rescaling each
// piece's max and sum to the head's, normalises the probabilities in place, adds them to
// score_acc and writes the output rows.
//
// With slot_index (a per-layer pool shared by the KV heads: k, v [B, R, D]), slot s of KV head bg is
// pool row slot_index[bg, s]: the same passes, each row read through its index.
//
// With bias (per-slot additive logits [B, Hkv, C]: KeepKV's log vote counts), slot s's logit is
// scale q.k_s + bias[bg, s] for every query head of the group.
//
// With rope tables (positions="cache": keys stored before RoPE), each block of 8 key rows is rotated
// by its slots' ranks into fp32 scratch before the dot products, so K is still read once.
//
// The kernels are written once with 8-lane vectors (vec.h) and compiled twice (ENGINE_MULTIVERSION):
// AVX2 + FMA where the CPU has it, SSE2 elsewhere. 16-bit K/V rows are widened to fp32 scratch a block at
// a time (widen_rows), fp16 by F16C's vcvtph2ps where the CPU has it: the clones cannot name F16C, and
// their portable conversion takes ~12 vector instructions per 8 values.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <vector>

#include "../checks.h"
#include "kernels.h"
#include "vec.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ENGINE_HAVE_F16C_PATH 1
#include <immintrin.h>
#endif

// The 8-lane helpers are all inlined, so the baseline ABI for 32-byte vectors is never used.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace engine {
namespace {

constexpr int64_t kRows = 32;  // value rows per block: they stay in L1 while the G heads use them
// Multiply-adds per pass (B Hkv length G D) below which one thread runs it, about 5 us of work with the
// cache hot: a wake-up costs a few us on idle cores, but a whole scheduler slice (ms) when they are busy.
// In a decode step the cache is not hot (the weights streamed since the layer last ran evict it), so its
// reads pay for a second thread well below the hot kernel's break-even: SmolLM2 at 128 and 300 tokens
// (9 heads, D 64: 74K and 173K, one thread under the old 1 << 18) took 0.1-0.4 ms less per step split.
constexpr int64_t kParallelWork = 1 << 15;

struct DecodeParams {
  int64_t B, Hkv, G, C, D, length;
  float scale;
  const int32_t* pos;  // [B, Hkv, C]
  float* score_acc;    // [B, Hkv, C] or null
  float* probs;        // [B, H, C] or null
  const float* cos;    // [P, D] or null (no rotation)
  const float* sin;    // [P, D]
  const int32_t* rank;  // [B, Hkv, C]: the table row of each slot's key
  const int32_t* index;  // [B, Hkv, C]: the pool row of each slot, or null (k, v [B, Hkv, C, D])
  int64_t R;             // pool rows per batch row (with index)
  const float* bias;     // [B, Hkv, C]: added to each slot's logit, or null
};

// The flat range [0, total) of (KV head, slot) pairs, head-major, cut into nt near-equal ranges.
// Thread t's piece of KV head bg is stored at index t + bg: unique, since along the flat order each
// new piece starts a new thread range, a new head, or both.
struct Split {
  int64_t total, nt, length;

  int64_t begin(int64_t t) const { return t * total / nt; }

  int64_t owner(int64_t x) const {  // the thread whose range holds x
    int64_t t = x * nt / total;
    while (begin(t + 1) <= x) ++t;
    while (begin(t) > x) --t;
    return t;
  }

  // Slots [s0, s1) of KV head bg in thread t's range (s0 >= s1: none).
  std::pair<int64_t, int64_t> piece(int64_t t, int64_t bg) const {
    return {std::max<int64_t>(begin(t) - bg * length, 0), std::min(begin(t + 1) - bg * length, length)};
  }

  // f(bg, s0, s1) for each piece of thread t's range, in order.
  template <typename F>
  void for_pieces(int64_t t, F&& f) const {
    for (int64_t bg = begin(t) / length; bg * length < begin(t + 1); ++bg) {
      const auto [s0, s1] = piece(t, bg);
      if (s0 < s1) f(bg, s0, s1);
    }
  }
};

// A piece's partial result: max logit m [G], sum of exp(logit - m) l [G], unnormalised out [G, D].
struct Partial {
  float* m;
  float* l;
  float* acc;
};

template <typename kv_t, typename q_t>
struct Decode {
  const DecodeParams& p;
  const q_t* q;      // [B * Hkv, G, D]
  const kv_t* k;     // [B * Hkv, C, D]
  const kv_t* v;     // [B * Hkv, C, D]
  q_t* out;          // [B * Hkv, G, D]
  float* rows;       // [B * Hkv, G, stride]: logits, then exp, then probabilities
  int64_t stride;    // C when rows is probs_out, else length
  float* partials;   // [pieces, G * (D + 2)]

  float* head_rows(int64_t bg) const { return rows + bg * p.G * stride; }

  Partial partial(int64_t piece) const {
    float* base = partials + piece * p.G * (p.D + 2);
    return {base, base + p.G, base + 2 * p.G};
  }
};

// The key or value rows of KV head bg: its own [C, D] block, or the pool rows its slots name.
template <typename T>
struct HeadRows {
  const T* base;         // the head's block, or the batch row's pool
  const int32_t* index;  // the head's [C] pool rows, or null
  int64_t D;

  HeadRows(const DecodeParams& p, const T* data, int64_t bg)
      : base(p.index ? data + bg / p.Hkv * p.R * p.D : data + bg * p.C * p.D),
        index(p.index ? p.index + bg * p.C : nullptr),
        D(p.D) {}

  const T* operator()(int64_t s) const { return base + (index ? index[s] : s) * D; }
};

// Rows ahead of the one being read that are requested from memory. The hardware prefetcher alone
// left both passes waiting on memory (a block's rows are read interleaved, 8 streams D elements
// apart); asking 64 rows ahead took the 2-thread pass at 2048 slots from ~14 to ~21 GB/s.
constexpr int64_t kPrefetchRows = 64;

// Requests the cache lines of slots [r, min(r + 8, end)) of a head's rows.
template <typename T>
ENGINE_INLINE void prefetch_rows(const HeadRows<T>& rows, int64_t r, int64_t end) {
  if (!rows.index) {  // contiguous: one sweep
    const char* lo = reinterpret_cast<const char*>(rows(r));
    const char* hi = reinterpret_cast<const char*>(rows(0) + std::min(r + 8, end) * rows.D);
    for (const char* a = lo; a < hi; a += 64) __builtin_prefetch(a);
    return;
  }
  for (int64_t s = r; s < std::min(r + 8, end); ++s) {
    const char* lo = reinterpret_cast<const char*>(rows(s));
    const char* hi = reinterpret_cast<const char*>(rows(s) + rows.D);
    for (const char* a = lo; a < hi; a += 64) __builtin_prefetch(a);
  }
}

// One past the last valid slot of pos[0..n) (0: none): a pooled head's empty tail starts there.
ENGINE_INLINE int64_t valid_end(const int32_t* pos, int64_t n) {
  for (; n >= 8; n -= 8) {  // 8 slots a test (a pooled head's empty tail can be half its list): all negative
    int32_t all = -1;       // iff the AND of the 8 keeps the sign bit
#pragma GCC unroll 8
    for (int j = 1; j <= 8; ++j) all &= pos[n - j];
    if (all >= 0) break;
  }
  while (n > 0 && pos[n - 1] < 0) --n;
  return n;
}

// Lanes j < n: pos[j] >= 0; lanes from n on: false.
ENGINE_INLINE Int8 valid8(const int32_t* pos, int64_t n) {
  Int8 x = Int8{} - 1;
  if (n == 8) {
    __builtin_memcpy(&x, pos, sizeof x);
  } else {
    for (int64_t j = 0; j < n; ++j) x[j] = pos[j];
  }
  return x >= 0;
}

// Whether any lane of a valid8 mask is set.
ENGINE_INLINE bool any8(Int8 x) {
  int32_t a = 0;
  for (int j = 0; j < 8; ++j) a |= x[j];
  return a != 0;
}

// dst[j * D, (j + 1) * D) = rows[j] in fp32 for j < n, by F16C (exact, as every fp16 -> fp32 conversion).
// Only called where f16c_rows() is true; its own function, compiled for F16C alone.
#if ENGINE_HAVE_F16C_PATH
__attribute__((target("avx,f16c"))) void widen_half_rows(const c10::Half* const* rows, int64_t n, int64_t D,
                                                         float* __restrict__ dst) {
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(rows[j]);
    float* o = dst + j * D;
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
      _mm256_storeu_ps(o + d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d))));
    }
    if (d < D) half_to_float(src + d, o + d, D - d);
  }
}

bool f16c_rows() {
  static const bool has = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return has;
}
#else
void widen_half_rows(const c10::Half* const*, int64_t, int64_t, float*) {}
bool f16c_rows() { return false; }
#endif

// Whether kv_t's rows are widened to fp32 scratch a block at a time before use: bf16, and fp16 on an F16C
// CPU. The G query heads of a group then read each row as fp32, where the dot products and value sums
// would otherwise convert it once per head (2x the time of fp32 K/V for bf16, 7x for fp16 before).
template <typename kv_t>
bool widens() {
  if constexpr (std::is_same_v<kv_t, c10::Half>) {
    return f16c_rows();
  } else {
    return std::is_same_v<kv_t, c10::BFloat16>;
  }
}

// dst[j * D, (j + 1) * D) = rows[j] in fp32 for j < n (the values exactly: every 16-bit float is an fp32).
template <typename kv_t>
ENGINE_INLINE void widen_rows(const kv_t* const* rows, int64_t n, int64_t D, float* __restrict__ dst) {
  if constexpr (std::is_same_v<kv_t, c10::Half>) {
    widen_half_rows(rows, n, D, dst);
  } else if constexpr (std::is_same_v<kv_t, c10::BFloat16>) {
    for (int64_t j = 0; j < n; ++j) {
      int64_t d = 0;
      for (; d + 8 <= D; d += 8) store8(dst + j * D + d, load8(rows[j] + d));
      for (; d < D; ++d) dst[j * D + d] = static_cast<float>(rows[j][d]);
    }
  }
}

// Lane j = q[0..D) . rows[j][0..D): a vector of partial sums per row, reduced together at the end.
template <typename T>
ENGINE_INLINE Vec8 dot8(const float* __restrict__ q, const T* const rows[8], int64_t D) {
  Vec8 a[8] = {};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const Vec8 qv = load8(q + d);
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) a[j] += qv * load8(rows[j] + d);
  }
  Vec8 r = transpose_sum8(a);
  for (; d < D; ++d) {
    for (int j = 0; j < 8; ++j) r[j] += q[d] * static_cast<float>(rows[j][d]);
  }
  return r;
}

// acc[d, d + 8 NV) += sum_j w[j] * rows[j][d, d + 8 NV): NV vectors of acc stay in registers
// while the rows stream past.
template <int NV, typename T>
ENGINE_INLINE void axpy_rows(float* __restrict__ acc, const float* __restrict__ w, const T* const* rows,
                             int64_t n, int64_t d) {
  Vec8 a[NV];
#pragma GCC unroll 8
  for (int u = 0; u < NV; ++u) a[u] = load8(acc + d + 8 * u);
  for (int64_t j = 0; j < n; ++j) {
    const Vec8 wj = splat8(w[j]);
    const T* r = rows[j] + d;
#pragma GCC unroll 8
    for (int u = 0; u < NV; ++u) a[u] += wj * load8(r + 8 * u);
  }
#pragma GCC unroll 8
  for (int u = 0; u < NV; ++u) store8(acc + d + 8 * u, a[u]);
}

// acc[0..D) += sum_j w[j] * rows[j][0..D)
template <typename T>
ENGINE_INLINE void accumulate_values(float* __restrict__ acc, const float* __restrict__ w,
                                     const T* const* rows, int64_t n, int64_t D) {
  int64_t d = 0;
  for (; d + 64 <= D; d += 64) axpy_rows<8>(acc, w, rows, n, d);
  if (d + 32 <= D) axpy_rows<4>(acc, w, rows, n, d), d += 32;
  if (d + 16 <= D) axpy_rows<2>(acc, w, rows, n, d), d += 16;
  if (d + 8 <= D) axpy_rows<1>(acc, w, rows, n, d), d += 8;
  for (; d < D; ++d) {
    float s = acc[d];
    for (int64_t j = 0; j < n; ++j) s += w[j] * static_cast<float>(rows[j][d]);
    acc[d] = s;
  }
}

ENGINE_INLINE float row_max(const float* x, int64_t n) {
  Vec8 m = splat8(kNegInf);
  for (int64_t i = 0; i < n; i += 8) {
    const Vec8 y = load_partial(x + i, std::min<int64_t>(8, n - i), kNegInf);
    m = y > m ? y : m;
  }
  return hmax8(m);
}

// x[0..n) = exp(x - m) in place (m > -inf, the max of x); returns their sum.
ENGINE_INLINE float exp_row(float* x, int64_t n, float m) {
  Vec8 s = {};
  for (int64_t i = 0; i < n; i += 8) {
    const int64_t k = std::min<int64_t>(8, n - i);
    const Vec8 e = exp8_nonpositive(load_partial(x + i, k, kNegInf) - splat8(m));
    store_partial(x + i, e, k);
    s += e;
  }
  return hsum8(s);
}

// Row j of dst [8, D] = key row kr[j] rotated by table row rows[j] (rotate_half layout: pairs
// (d, d + D/2)), in fp32. Products rounded before the sum, as PyTorch's k cos + rotate_half(k) sin
// does, so keys rotated here equal keys rotated by the model (a full cache is matched bit for bit).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
template <typename T>
ENGINE_MULTIVERSION void rotate_rows(const T* const kr[8], const int64_t rows[8], const float* __restrict__ cos,
                                     const float* __restrict__ sin, float* __restrict__ dst, int64_t D) {
  const int64_t half = D / 2;
  for (int j = 0; j < 8; ++j) {
    const T* src = kr[j];
    const float* c = cos + rows[j] * D;
    const float* s = sin + rows[j] * D;
    float* o = dst + j * D;
    int64_t d = 0;
    for (; d + 8 <= half; d += 8) {
      const Vec8 x1 = load8(src + d), x2 = load8(src + half + d);
      store8(o + d, x1 * load8(c + d) - x2 * load8(s + d));
      store8(o + half + d, x2 * load8(c + half + d) + x1 * load8(s + half + d));
    }
    for (; d < half; ++d) {
      const float x1 = static_cast<float>(src[d]), x2 = static_cast<float>(src[half + d]);
      o[d] = x1 * c[d] - x2 * s[d];
      o[half + d] = x2 * c[half + d] + x1 * s[half + d];
    }
  }
}
#pragma GCC pop_options

// Logits of 8 key rows (n of them real) for the G query heads into rows[h * stride + 0..n), plus
// bias[0..n) when given.
template <typename T>
ENGINE_INLINE void logits8(const float* qf, const T* const kr[8], Int8 valid, int64_t n, int64_t G,
                           int64_t D, float scale, const float* bias, float* rows, int64_t stride) {
  const Vec8 b = bias ? load_partial(bias, n, 0.f) : Vec8{};
  for (int64_t h = 0; h < G; ++h) {
    Vec8 x = dot8(qf + h * D, kr, D) * splat8(scale);
    if (bias) x += b;
    const Vec8 logit = valid ? x : kNegInf;  // an empty slot's row may hold anything, NaN included
    store_partial(rows + h * stride, logit, n);
  }
}

// Phase 1 for slots [s0, s1) of KV head bg: logits into the head's rows, then exp in place, and
// the piece's max, sum and exp @ V into `part`. qbuf: (G + 16 + kRows) * D floats of scratch.
template <typename kv_t, typename q_t>
ENGINE_MULTIVERSION void attend_piece(const Decode<kv_t, q_t>& c, int64_t bg, int64_t s0, int64_t s1,
                                      Partial part, float* qbuf) {
  const int64_t G = c.p.G, C = c.p.C, D = c.p.D;
  const HeadRows<kv_t> kb(c.p, c.k, bg), vb(c.p, c.v, bg);
  const int32_t* pos = c.p.pos + bg * C;
  const int32_t* rank = c.p.rank ? c.p.rank + bg * C : nullptr;
  const float* bias = c.p.bias ? c.p.bias + bg * C : nullptr;
  float* rows = c.head_rows(bg);
  // The empty slots after the piece's last valid one (a pooled head's unused tail, up to half its list
  // under adaptive allocation) get their probability 0 here and no pass below: the same bits, since an
  // empty slot adds nothing to the max, the sum or the output.
  const int64_t piece_end = s1;
  s1 = s0 + valid_end(pos + s0, s1 - s0);
  for (int64_t h = 0; h < G; ++h) std::fill(rows + h * c.stride + s1, rows + h * c.stride + piece_end, 0.f);
  if (kb.index) {  // scattered pool rows, which the hardware prefetcher cannot follow: the first ones too
    for (int64_t r = s0; r < std::min(s0 + kPrefetchRows, s1); r += 8) {
      prefetch_rows(kb, r, s1);
      prefetch_rows(vb, r, s1);
    }
  }
  const float* qf = as_float(c.q + bg * G * D, qbuf, G * D);
  float* rotated = qbuf + G * D;     // [8, D]
  float* widened = rotated + 8 * D;  // [8, D]: a block's key rows in fp32, when `wide`
  float* values = widened + 8 * D;   // [kRows, D]: a block's value rows in fp32, when `wide`
  const bool wide = widens<kv_t>();

  for (int64_t s = s0; s < s1; s += 8) {
    const int64_t n = std::min<int64_t>(8, s1 - s);
    prefetch_rows(kb, s + kPrefetchRows, s1);
    const kv_t* kr[8];
    for (int64_t j = 0; j < 8; ++j) kr[j] = kb(s + std::min(j, n - 1));  // spare lanes repeat a row
    const Int8 valid = valid8(pos + s, n);
    if (!any8(valid)) {  // 8 empty slots (a pool's unused tail): no rows to read
      for (int64_t h = 0; h < G; ++h) store_partial(rows + h * c.stride + s, splat8(kNegInf), n);
      continue;
    }
    const float* wk[8];
    if (wide) {
      widen_rows(kr, 8, D, widened);
      for (int64_t j = 0; j < 8; ++j) wk[j] = widened + j * D;
    }
    if (rank) {
      const float* kf[8];
      int64_t row[8];
      for (int64_t j = 0; j < 8; ++j) {
        const int64_t slot = s + std::min(j, n - 1);
        row[j] = pos[slot] >= 0 ? rank[slot] : 0;  // an empty slot's rank may be anything
        kf[j] = rotated + j * D;
      }
      if (wide) {
        rotate_rows(wk, row, c.p.cos, c.p.sin, rotated, D);
      } else {
        rotate_rows(kr, row, c.p.cos, c.p.sin, rotated, D);
      }
      logits8(qf, kf, valid, n, G, D, c.p.scale, bias ? bias + s : nullptr, rows + s, c.stride);
    } else if (wide) {
      logits8(qf, wk, valid, n, G, D, c.p.scale, bias ? bias + s : nullptr, rows + s, c.stride);
    } else {
      logits8(qf, kr, valid, n, G, D, c.p.scale, bias ? bias + s : nullptr, rows + s, c.stride);
    }
  }

  for (int64_t h = 0; h < G; ++h) {
    part.m[h] = row_max(rows + h * c.stride + s0, s1 - s0);
    part.l[h] = 0.f;
  }
  std::fill(part.acc, part.acc + G * D, 0.f);
  const kv_t* vr[kRows];
  float w[kRows];
  for (int64_t b0 = s0; b0 < s1; b0 += kRows) {
    const int64_t n = std::min(kRows, s1 - b0);
    int64_t idx[kRows], nv = 0;
    for (int64_t j = 0; j < n; ++j) {  // the valid slots, branch-free
      idx[nv] = b0 + j;
      nv += pos[b0 + j] >= 0;
    }
    for (int64_t j = 0; j < nv; ++j) vr[j] = vb(idx[j]);
    const float* vf[kRows];
    if (wide) {
      widen_rows(vr, nv, D, values);
      for (int64_t j = 0; j < nv; ++j) vf[j] = values + j * D;
    }
    for (int64_t r = 0; r < kRows; r += 8) prefetch_rows(vb, b0 + kRows + r, s1);
    for (int64_t h = 0; h < G; ++h) {
      float* row = rows + h * c.stride;
      if (part.m[h] == kNegInf) {  // nothing valid in the piece: all zero
        std::fill(row + b0, row + b0 + n, 0.f);
        continue;
      }
      part.l[h] += exp_row(row + b0, n, part.m[h]);
      const float* wv = row + b0;  // a block with every slot valid (the usual case) needs no gather
      if (nv < n) {
        for (int64_t j = 0; j < nv; ++j) w[j] = row[idx[j]];
        wv = w;
      }
      if (wide) {
        accumulate_values(part.acc + h * D, wv, vf, nv, D);
      } else {
        accumulate_values(part.acc + h * D, wv, vr, nv, D);
      }
    }
  }
}

// Once every piece of KV head bg is done: the head's max and sum over its pieces, then its
// probabilities, score_acc and out. buf: 2 * G + D floats of scratch.
template <typename kv_t, typename q_t>
ENGINE_MULTIVERSION void finish_head(const Decode<kv_t, q_t>& c, const Split& split, int64_t bg, float* buf) {
  const int64_t G = c.p.G, C = c.p.C, D = c.p.D, len = c.p.length;
  // Thread ranges t_lo..t_hi cover the head; those in between may be empty when threads outnumber slots.
  const int64_t t_lo = split.owner(bg * len), t_hi = split.owner(bg * len + len - 1);
  auto has_piece = [&](int64_t t) { return split.begin(t) < split.begin(t + 1); };
  float *M = buf, *L = buf + G, *o = buf + 2 * G;
  for (int64_t h = 0; h < G; ++h) {
    M[h] = kNegInf;
    L[h] = 0.f;
    for (int64_t t = t_lo; t <= t_hi; ++t) {
      if (has_piece(t)) M[h] = std::max(M[h], c.partial(t + bg).m[h]);
    }
    for (int64_t t = t_lo; t <= t_hi; ++t) {
      const Partial part = c.partial(t + bg);
      if (has_piece(t) && part.m[h] != kNegInf) L[h] += part.l[h] * std::exp(part.m[h] - M[h]);
    }
  }
  // A piece's share of head h: exp(m - M) / L, 0 when the piece or the whole head saw nothing.
  auto weight = [&](int64_t t, int64_t h) {
    const float m = c.partial(t + bg).m[h];
    return !has_piece(t) || m == kNegInf || L[h] == 0.f ? 0.f : std::exp(m - M[h]) / L[h];
  };

  float* rows = c.head_rows(bg);
  const int32_t* pos = c.p.pos + bg * C;
  const int64_t end = valid_end(pos, len);  // the empty tail's probabilities are 0 already, its score_acc stays
  if (c.p.probs || c.p.score_acc) {
    for (int64_t t = t_lo; t <= t_hi; ++t) {
      const auto [s0, s_end] = split.piece(t, bg);
      const int64_t s1 = std::min(s_end, end);
      for (int64_t h = 0; h < G && s0 < s1; ++h) scale_row(rows + h * c.stride + s0, weight(t, h), s1 - s0);
    }
  }
  if (c.p.probs) {  // slots from length on are masked
    for (int64_t h = 0; h < G; ++h) std::fill(rows + h * c.stride + len, rows + h * c.stride + C, 0.f);
  }
  if (c.p.score_acc) {
    float* sa = c.p.score_acc + bg * C;
    const Vec8 inv_g = splat8(1.f / static_cast<float>(G));
    for (int64_t s = 0; s < end; s += 8) {
      const int64_t n = std::min<int64_t>(8, end - s);
      Vec8 sum = {};
      for (int64_t h = 0; h < G; ++h) sum += load_partial(rows + h * c.stride + s, n, 0.f);
      const Vec8 old = load_partial(sa + s, n, 0.f);
      store_partial(sa + s, valid8(pos + s, n) ? old + sum * inv_g : old, n);  // empty slots keep theirs
    }
  }
  for (int64_t h = 0; h < G; ++h) {
    std::fill(o, o + D, 0.f);
    for (int64_t t = t_lo; t <= t_hi; ++t) {
      const float a = weight(t, h);
      const float* acc = c.partial(t + bg).acc + h * D;
      if (a != 0.f) {  // also keeps a piece that saw nothing (and its empty accumulator) out
        for (int64_t d = 0; d < D; ++d) o[d] += a * acc[d];
      }
    }
    store_float(o, c.out + (bg * G + h) * D, D);
  }
}

template <typename kv_t, typename q_t>
void decode(const DecodeParams& p, const q_t* q, const kv_t* k, const kv_t* v, q_t* out) {
  const int64_t BG = p.B * p.Hkv, G = p.G, D = p.D;
  const int max_threads = omp_get_max_threads();
  const bool parallel = decode_attention_splits(BG * G, p.length, D);
  std::unique_ptr<float[]> scratch(p.probs ? nullptr : new float[BG * G * p.length]);
  std::unique_ptr<float[]> partials(new float[(max_threads + BG) * G * (D + 2)]);
  std::unique_ptr<std::atomic<int64_t>[]> slots_done(new std::atomic<int64_t>[BG]);
  for (int64_t bg = 0; bg < BG; ++bg) slots_done[bg].store(0, std::memory_order_relaxed);
  const Decode<kv_t, q_t> c{p, q, k, v, out, p.probs ? p.probs : scratch.get(), p.probs ? p.C : p.length,
                            partials.get()};
  auto run = [&](int64_t t, int64_t nt) {
    const Split split{BG * p.length, nt, p.length};
    std::vector<float> buf(std::max((G + 16 + kRows) * D, 2 * G + D));
    split.for_pieces(t, [&](int64_t bg, int64_t s0, int64_t s1) {
      attend_piece(c, bg, s0, s1, c.partial(t + bg), buf.data());
      // The head's last piece to finish (acquiring the others' writes) completes it.
      if (slots_done[bg].fetch_add(s1 - s0, std::memory_order_acq_rel) + (s1 - s0) == p.length) {
        finish_head(c, split, bg, buf.data());
      }
    });
  };
  if (parallel) {
#pragma omp parallel
    run(omp_get_thread_num(), omp_get_num_threads());
  } else {
    run(0, 1);  // not even a one-thread team: its start and end cost a few system calls
  }
}

}  // namespace

bool decode_attention_splits(int64_t query_heads, int64_t length, int64_t head_dim) {
  return omp_get_max_threads() > 1 && query_heads * length * head_dim > kParallelWork;
}

void decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& pos, int64_t length, double scale, at::Tensor& out,
                          const std::optional<at::Tensor>& score_acc,
                          const std::optional<at::Tensor>& probs_out,
                          const std::optional<at::Tensor>& rope_cos,
                          const std::optional<at::Tensor>& rope_sin,
                          const std::optional<at::Tensor>& rope_rank,
                          const std::optional<at::Tensor>& slot_index,
                          const std::optional<at::Tensor>& bias) {
  check_decode_attention(q, k, v, pos, length, out, score_acc, probs_out, rope_cos, rope_sin, rope_rank,
                         slot_index, bias);
  if (rope_rank) check_rope_ranks(*rope_rank, pos, length, rope_cos->size(0));
  if (slot_index) check_pool_rows(*slot_index, length, k.size(1));
  const DecodeParams p{k.size(0),
                       pos.size(1),
                       q.size(1) / pos.size(1),
                       pos.size(2),
                       k.size(-1),
                       length,
                       static_cast<float>(scale),
                       pos.const_data_ptr<int32_t>(),
                       score_acc ? score_acc->mutable_data_ptr<float>() : nullptr,
                       probs_out ? probs_out->mutable_data_ptr<float>() : nullptr,
                       rope_cos ? rope_cos->const_data_ptr<float>() : nullptr,
                       rope_sin ? rope_sin->const_data_ptr<float>() : nullptr,
                       rope_rank ? rope_rank->const_data_ptr<int32_t>() : nullptr,
                       slot_index ? slot_index->const_data_ptr<int32_t>() : nullptr,
                       slot_index ? k.size(1) : 0,
                       bias ? bias->const_data_ptr<float>() : nullptr};
  ENGINE_DISPATCH_FLOATS(k.scalar_type(), "decode_attention", [&] {
    if (q.scalar_type() == at::kFloat) {
      decode<scalar_t, float>(p, q.const_data_ptr<float>(), k.const_data_ptr<scalar_t>(),
                              v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<float>());
    } else {
      decode<scalar_t, scalar_t>(p, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                 v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>());
    }
  });
}

}  // namespace engine
