// Prefill attention: a chunk of L queries against S cache slots, causal by original position, GQA.
//
// Exact softmax by blocks of query rows. Per (batch, head, block of kBlock rows): one GEMM gives
// the block's dots with the slots between the first and the last one any of its rows can see (so
// a causal prompt skips most of the upper triangle), vectorised row loops mask by position and
// turn the dots into probabilities in place, and a second GEMM multiplies them into V. Scratch is
// one kBlock x S matrix per thread: memory linear in S, never L x S. Key s is visible to query t
// iff 0 <= kpos[s] <= qpos[t], whatever the slot order.
//
// Column scores (H2O-style sums over the last `score_rows` rows, at their own scale) come from the
// same probabilities when the scales match, else from a second exp pass over the dots. Blocks are
// dealt into a fixed set of lanes that each sum their column scores apart, and the lanes are added
// in order at the end: the sums do not depend on which thread ran what.
//
// With bias (per-slot additive logits [B, Hkv, S]: KeepKV's log vote counts), slot s's logit is
// scale q.k_s + bias[bg, s] (score_scale q.k_s + bias[bg, s] for the column scores).
//
// The GEMMs are ATen's, single-threaded inside the OpenMP region: threads split the blocks, so the
// row loops run in parallel too.
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "../checks.h"
#include "kernels.h"
#include "vec.h"

// The 8-lane vectors never cross an out-of-line call (see vec.h): the ABI note gcc gives is moot.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace engine {
namespace {

constexpr int64_t kBlock = 128;  // query rows per block

struct RowSoftmax {
  float m, l;  // max logit and sum of exp(logit - m) over the visible slots; -inf and 0 if none
};

// Slots [j, j + 8) of a row: which are visible from position qt, and their dots. Lanes past n
// count as invisible.
struct Lanes {
  Int8 visible;
  Vec8 dots;
};

ENGINE_INLINE Lanes lanes(const float* s, const int32_t* kp, int32_t qt, int64_t j, int64_t n) {
  Int8 pos = Int8{} - 1;
  if (j + 8 <= n) {
    __builtin_memcpy(&pos, kp + j, sizeof pos);
    return {(pos >= 0) & (pos <= qt), load8(s + j)};
  }
  for (int64_t i = 0; i < n - j; ++i) pos[i] = kp[j + i];
  return {(pos >= 0) & (pos <= qt), load_partial(s + j, n - j, 0.f)};
}

// The logits of lanes x at slots [j, j + 8): scale dots, + bias[j..] when kBiased.
template <bool kBiased>
ENGINE_INLINE Vec8 logit8(const Lanes& x, float scale, const float* bias, int64_t j, int64_t n) {
  if constexpr (kBiased) {
    return x.dots * scale + load_partial(bias + j, std::min<int64_t>(8, n - j), 0.f);
  } else {
    return x.dots * scale;
  }
}

// p[j] = exp(scale s[j] (+ bias[j] when kBiased) - m) for the slots j visible from position qt, 0 for the
// others (whatever s holds there, NaN included). p may be s: each block of 8 is read before it is written.
// A template, so the unbiased rows compile to the code they had before biases existed (the same bits).
template <bool kBiased>
ENGINE_MULTIVERSION RowSoftmax softmax_row(const float* s, float* p, const int32_t* kp, int32_t qt,
                                           float scale, const float* bias, int64_t n) {
  Vec8 top = splat8(kNegInf);
  for (int64_t j = 0; j < n; j += 8) {
    const Lanes x = lanes(s, kp, qt, j, n);
    const Vec8 logit = x.visible ? logit8<kBiased>(x, scale, bias, j, n) : splat8(kNegInf);
    top = logit > top ? logit : top;
  }
  const float m = hmax8(top);
  if (m == kNegInf) {
    std::fill(p, p + n, 0.f);
    return {kNegInf, 0.f};
  }
  Vec8 sum{};
  for (int64_t j = 0; j < n; j += 8) {
    const Lanes x = lanes(s, kp, qt, j, n);
    const Vec8 e = x.visible ? exp8_nonpositive(logit8<kBiased>(x, scale, bias, j, n) - m) : Vec8{};
    sum += e;
    if (j + 8 <= n) {
      store8(p + j, e);
    } else {
      store_partial(p + j, e, n - j);
    }
  }
  return {m, hsum8(sum)};
}

// y += a x
ENGINE_MULTIVERSION void add_scaled(float* __restrict__ y, const float* __restrict__ x, float a,
                                    int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}

// A [rows, cols] fp32 matrix over memory the kernel owns (from_blob wants a non-const pointer).
at::Tensor matrix(const float* data, int64_t rows, int64_t cols) {
  return at::from_blob(const_cast<float*>(data), {rows, cols}, at::TensorOptions().dtype(at::kFloat));
}

// The cache as fp32 [B, Hkv, S, D] for the GEMMs. Rows of empty slots are zeroed when asked (for
// v: 0 * NaN in P @ V would spread their garbage over every output).
at::Tensor float_cache(const at::Tensor& t, const int32_t* kpos, bool zero_empty) {
  const int64_t slots = t.numel() / t.size(3), D = t.size(3);
  const bool any_empty = zero_empty && std::any_of(kpos, kpos + slots, [](int32_t p) { return p < 0; });
  if (t.scalar_type() == at::kFloat && !any_empty) return t;
  at::Tensor f = t.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
  float* rows = f.mutable_data_ptr<float>();
  for (int64_t s = 0; any_empty && s < slots; ++s) {
    if (kpos[s] < 0) std::fill(rows + s * D, rows + (s + 1) * D, 0.f);
  }
  return f;
}

struct PrefillParams {
  int64_t B, H, Hkv, G, L, S, D;
  float scale, score_scale;
  int64_t row0;         // first query row of the column-score window
  const int32_t* qpos;  // [B, L]
  const int32_t* kpos;  // [B, Hkv, S]
  const float* k;       // [B, Hkv, S, D] fp32
  const float* v;       // [B, Hkv, S, D] fp32, empty rows zeroed
  float* lse;           // [B, H, L]
  float* col;           // [B, Hkv, S] or null
  const float* bias;    // [B, Hkv, S] or null
};

// Slots [lo, hi) hold every slot visible from some position <= q_max; lo == hi when there is none.
std::pair<int64_t, int64_t> visible_range(const int32_t* kp, int64_t S, int32_t q_max) {
  const auto visible = [q_max](int32_t pos) { return pos >= 0 && pos <= q_max; };
  int64_t lo = 0, hi = S;
  while (lo < S && !visible(kp[lo])) ++lo;
  while (hi > lo && !visible(kp[hi - 1])) --hi;
  return {lo, hi};
}

// One thread's working memory: a block's dots against up to S slots, then its probabilities.
struct Scratch {
  std::vector<float> q, out, dots, row;
  std::vector<RowSoftmax> rows;
  explicit Scratch(int64_t S, int64_t D)
      : q(kBlock * D), out(kBlock * D), dots(kBlock * S), row(S), rows(kBlock) {}
};

// Rows [t0, t0 + kBlock) of head h of batch b: out, lse and (if col_part) their column scores
// added into col_part [B, Hkv, S].
template <typename q_t>
void attend_block(const PrefillParams& p, const q_t* q, q_t* out, int64_t b, int64_t h, int64_t t0,
                  Scratch& w, float* col_part) {
  const int64_t L = p.L, S = p.S, D = p.D, nt = std::min(kBlock, L - t0);
  const int64_t bh = b * p.H + h, bg = b * p.Hkv + h / p.G;
  const int32_t* qp = p.qpos + b * L + t0;
  const int32_t* kp = p.kpos + bg * S;
  const float* bias = p.bias ? p.bias + bg * S : nullptr;
  const auto [lo, hi] = visible_range(kp, S, *std::max_element(qp, qp + nt));
  const int64_t n = hi - lo;
  if (n > 0) {
    const float* qf = as_float(q + (bh * L + t0) * D, w.q.data(), nt * D);
    at::Tensor dots = matrix(w.dots.data(), nt, n), out_m = matrix(w.out.data(), nt, D);
    at::mm_out(dots, matrix(qf, nt, D), matrix(p.k + (bg * S + lo) * D, n, D).t());
    const bool own_scale = p.score_scale != p.scale;
    for (int64_t i = 0; i < nt; ++i) {
      float* x = w.dots.data() + i * n;  // dots in, probabilities out
      const bool scored = col_part && t0 + i >= p.row0;
      float score_l = 0.f;  // at score_scale, into w.row, before x is overwritten
      const float* b = bias ? bias + lo : nullptr;
      const auto row = [&](float* dst, float sc) {
        return b ? softmax_row<true>(x, dst, kp + lo, qp[i], sc, b, n) : softmax_row<false>(x, dst, kp + lo, qp[i], sc, b, n);
      };
      if (scored && own_scale) score_l = row(w.row.data(), p.score_scale).l;
      w.rows[i] = row(x, p.scale);
      if (!scored) continue;
      const float l = own_scale ? score_l : w.rows[i].l;
      if (l > 0.f) add_scaled(col_part + bg * S + lo, own_scale ? w.row.data() : x, 1.f / l, n);
    }
    at::mm_out(out_m, dots, matrix(p.v + (bg * S + lo) * D, n, D));
  } else {
    std::fill(w.out.begin(), w.out.end(), 0.f);
    std::fill(w.rows.begin(), w.rows.end(), RowSoftmax{kNegInf, 0.f});
  }
  for (int64_t i = 0; i < nt; ++i) {
    const float l = w.rows[i].l;
    scale_row(w.out.data() + i * D, l > 0.f ? 1.f / l : 0.f, D);  // sees nothing: out = 0
    store_float(w.out.data() + i * D, out + (bh * L + t0 + i) * D, D);
    p.lse[bh * L + t0 + i] = l > 0.f ? w.rows[i].m + std::log(l) : kNegInf;
  }
}

// Blocks are dealt round robin, the late (widest) ones first, into lanes of even work; threads
// take whole lanes as they free up, and each lane sums its column scores apart. The lanes are
// added up in order at the end, so the sums do not depend on which thread ran what.
template <typename q_t>
void prefill(const PrefillParams& p, const q_t* q, q_t* out) {
  const int64_t n_blocks = (p.L + kBlock - 1) / kBlock, n_items = p.B * p.H * n_blocks;
  const int64_t n_lanes = std::clamp<int64_t>(n_items, 1, 4 * omp_get_max_threads());
  const int64_t cols = p.B * p.Hkv * p.S;
  std::vector<float> col_parts(p.col ? n_lanes * cols : 0, 0.f);
#pragma omp parallel
  {
    Scratch w(p.S, p.D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t lane = 0; lane < n_lanes; ++lane) {
      for (int64_t i = lane; i < n_items; i += n_lanes) {
        const int64_t bh = i % (p.B * p.H), t0 = (n_blocks - 1 - i / (p.B * p.H)) * kBlock;
        float* col_part = p.col ? col_parts.data() + lane * cols : nullptr;
        attend_block(p, q, out, bh / p.H, bh % p.H, t0, w, col_part);
      }
    }
  }
  if (!p.col) return;
  for (int64_t lane = 1; lane < n_lanes; ++lane) {
    add_scaled(col_parts.data(), col_parts.data() + lane * cols, 1.f, cols);
  }
  for (int64_t j = 0; j < cols; ++j) p.col[j] = col_parts[j] / static_cast<float>(p.G);
}

}  // namespace

void prefill_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& qpos, const at::Tensor& kpos, double scale,
                           at::Tensor& out, at::Tensor& lse,
                           const std::optional<at::Tensor>& col_scores, int64_t score_rows,
                           double score_scale, const std::optional<at::Tensor>& bias) {
  check_prefill_attention(q, k, v, qpos, kpos, out, lse, col_scores, bias);
  const int64_t H = q.size(1), Hkv = k.size(1), L = q.size(2);
  const int64_t rows = score_rows <= 0 || score_rows >= L ? L : score_rows;
  const int32_t* kp = kpos.const_data_ptr<int32_t>();
  const at::Tensor kf = float_cache(k, kp, /*zero_empty=*/false);
  const at::Tensor vf = float_cache(v, kp, /*zero_empty=*/true);
  const PrefillParams p{k.size(0),
                        H,
                        Hkv,
                        H / Hkv,
                        L,
                        k.size(2),
                        k.size(3),
                        static_cast<float>(scale),
                        static_cast<float>(score_scale),
                        L - rows,
                        qpos.const_data_ptr<int32_t>(),
                        kp,
                        kf.const_data_ptr<float>(),
                        vf.const_data_ptr<float>(),
                        lse.mutable_data_ptr<float>(),
                        col_scores ? col_scores->mutable_data_ptr<float>() : nullptr,
                        bias ? bias->const_data_ptr<float>() : nullptr};
  ENGINE_DISPATCH_FLOATS(q.scalar_type(), "prefill_attention", [&] {
    prefill<scalar_t>(p, q.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>());
  });
}

}  // namespace engine
