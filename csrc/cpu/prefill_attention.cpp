// Prefill attention: a chunk of L queries against S cache slots, causal by original position, GQA.
//
// Flash-style: threads split (batch, KV head, tile of query rows); the tile's rows of all G heads
// sweep the keys in tiles with an online softmax, so extra memory is O(tile) and never L x S. Key
// s is visible to query t iff 0 <= kpos[s] <= qpos[t], whatever the slot order.
//
// Column scores (H2O-style sums over the last `score_rows` rows, at their own scale) take a second
// sweep split by key tiles, so each thread owns its columns: p = exp(score_scale q.k - lse_t), with
// lse_t at score_scale computed during the first sweep (it is the output lse when the scales match).
#include <ATen/ops/empty.h>

#include <algorithm>
#include <climits>
#include <vector>

#include "checks.h"
#include "kernels.h"
#include "vec.h"

namespace engine {
namespace {

constexpr int64_t kQTile = 16;  // query rows per tile (per head)
constexpr int64_t kKTile = 64;  // key slots per tile

struct PrefillParams {
  int64_t B, H, Hkv, G, L, S, D;
  float scale, score_scale;
  int64_t row0;         // first query row of the column-score window
  const int32_t* qpos;  // [B, L]
  const int32_t* kpos;  // [B, Hkv, S]
  float* lse;           // [B, H, L]
  float* col;           // [B, Hkv, S] or null
  float* score_lse;     // [B, H, L - row0] at score_scale; null when col is null or scales match
};

// Smallest valid key position of slots [s0, s0 + n); INT32_MAX when none is valid.
inline int32_t min_valid_pos(const int32_t* kp, int64_t n) {
  int32_t lo = INT32_MAX;
  for (int64_t j = 0; j < n; ++j) {
    if (kp[j] >= 0) lo = std::min(lo, kp[j]);
  }
  return lo;
}

// A key tile in the layouts the sweeps want: kt transposed [D, n], v rows as fp32.
struct KeyTile {
  std::vector<float> kf, kt, vf;
  std::vector<const float*> kt_rows, v_rows;
  int64_t n = 0;

  explicit KeyTile(int64_t D) : kf(kKTile * D), kt(kKTile * D), vf(kKTile * D), kt_rows(D), v_rows(kKTile) {}

  template <typename kv_t>
  void load(const kv_t* k, const kv_t* v, int64_t rows, int64_t D) {
    n = rows;
    transpose_tile(as_float(k, kf.data(), n * D), kt.data(), n, D);
    for (int64_t d = 0; d < D; ++d) kt_rows[d] = kt.data() + d * n;
    if (v == nullptr) return;
    const float* vt = as_float(v, vf.data(), n * D);
    for (int64_t j = 0; j < n; ++j) v_rows[j] = vt + j * D;
  }

  // dots[0..n) = q . k_j
  void dots(const float* q, float* out, int64_t D) const {
    std::fill(out, out + n, 0.f);
    accumulate_rows(out, q, kt_rows.data(), D, n);
  }
};

template <typename kv_t, typename q_t>
void attention_sweep(const PrefillParams& p, const q_t* q, const kv_t* k, const kv_t* v, q_t* out) {
  const int64_t G = p.G, L = p.L, S = p.S, D = p.D;
  const int64_t n_qtiles = (L + kQTile - 1) / kQTile;
  const int64_t R = G * kQTile;  // rows of a query tile, all heads of the group
#pragma omp parallel
  {
    std::vector<float> qf(R * D), acc(R * D), dots(kKTile), x(kKTile), x2(kKTile);
    std::vector<const float*> v_vis(kKTile);
    std::vector<SoftmaxRow> sm(R), sm2(R);
    KeyTile tile(D);
#pragma omp for schedule(dynamic)
    for (int64_t w = 0; w < p.B * p.Hkv * n_qtiles; ++w) {
      const int64_t bg = w / n_qtiles, b = bg / p.Hkv, h0 = (bg % p.Hkv) * G;
      const int64_t t0 = (w % n_qtiles) * kQTile, nt = std::min(kQTile, L - t0);
      const int32_t* qp = p.qpos + b * L + t0;
      const int32_t* kp = p.kpos + bg * S;
      const int32_t q_max = *std::max_element(qp, qp + nt);
      for (int64_t h = 0; h < G; ++h) {
        const q_t* src = q + ((b * p.H + h0 + h) * L + t0) * D;
        for (int64_t i = 0; i < nt * D; ++i) qf[h * kQTile * D + i] = static_cast<float>(src[i]);
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(sm.begin(), sm.end(), SoftmaxRow{});
      std::fill(sm2.begin(), sm2.end(), SoftmaxRow{});

      for (int64_t s0 = 0; s0 < S; s0 += kKTile) {
        const int64_t n = std::min(kKTile, S - s0);
        if (min_valid_pos(kp + s0, n) > q_max) continue;  // nothing here is visible to this tile
        tile.load(k + (bg * S + s0) * D, v + (bg * S + s0) * D, n, D);
        for (int64_t h = 0; h < G; ++h) {
          for (int64_t t = 0; t < nt; ++t) {
            const int64_t r = h * kQTile + t;
            tile.dots(qf.data() + r * D, dots.data(), D);
            int64_t nv = 0;  // visible keys, so masked slots (garbage, even NaN) never enter the sums
            for (int64_t j = 0; j < n; ++j) {
              const int32_t kj = kp[s0 + j];
              if (kj < 0 || kj > qp[t]) continue;
              x[nv] = dots[j] * p.scale;
              x2[nv] = dots[j] * p.score_scale;
              v_vis[nv++] = tile.v_rows[j];
            }
            if (nv == 0) continue;
            if (p.score_lse && t0 + t >= p.row0) sm2[r].update(x2.data(), nv);
            const float corr = sm[r].update(x.data(), nv);
            float* ar = acc.data() + r * D;
            if (corr != 1.f) scale_row(ar, corr, D);
            accumulate_rows(ar, x.data(), v_vis.data(), nv, D);
          }
        }
      }

      for (int64_t h = 0; h < G; ++h) {
        for (int64_t t = 0; t < nt; ++t) {
          const int64_t r = h * kQTile + t, row = (b * p.H + h0 + h) * L + t0 + t;
          const float inv = sm[r].l > 0.f ? 1.f / sm[r].l : 0.f;  // sees nothing: out = 0
          scale_row(acc.data() + r * D, inv, D);
          store_float(acc.data() + r * D, out + row * D, D);
          p.lse[row] = sm[r].lse();
          if (p.score_lse && t0 + t >= p.row0) {
            p.score_lse[(b * p.H + h0 + h) * (L - p.row0) + t0 + t - p.row0] = sm2[r].lse();
          }
        }
      }
    }
  }
}

template <typename kv_t, typename q_t>
void column_sweep(const PrefillParams& p, const q_t* q, const kv_t* k) {
  const int64_t G = p.G, L = p.L, S = p.S, D = p.D, W = L - p.row0;
  const int64_t n_ktiles = (S + kKTile - 1) / kKTile;
#pragma omp parallel
  {
    std::vector<float> qf(D), dots(kKTile), sums(kKTile);
    KeyTile tile(D);
#pragma omp for schedule(dynamic)
    for (int64_t w = 0; w < p.B * p.Hkv * n_ktiles; ++w) {
      const int64_t bg = w / n_ktiles, b = bg / p.Hkv, h0 = (bg % p.Hkv) * G;
      const int64_t s0 = (w % n_ktiles) * kKTile, n = std::min(kKTile, S - s0);
      const int32_t* kp = p.kpos + bg * S + s0;
      const int32_t k_min = min_valid_pos(kp, n);
      std::fill(sums.begin(), sums.end(), 0.f);
      if (k_min != INT32_MAX) tile.load(k + (bg * S + s0) * D, static_cast<const kv_t*>(nullptr), n, D);
      for (int64_t t = p.row0; t < L && k_min != INT32_MAX; ++t) {
        const int32_t qt = p.qpos[b * L + t];
        if (qt < k_min) continue;
        for (int64_t h = 0; h < G; ++h) {
          const int64_t head_row = b * p.H + h0 + h;
          const float lse = p.score_lse ? p.score_lse[head_row * W + t - p.row0] : p.lse[head_row * L + t];
          tile.dots(as_float(q + (head_row * L + t) * D, qf.data(), D), dots.data(), D);
          for (int64_t j = 0; j < n; ++j) {
            if (kp[j] >= 0 && kp[j] <= qt) sums[j] += std::exp(dots[j] * p.score_scale - lse);
          }
        }
      }
      for (int64_t j = 0; j < n; ++j) p.col[bg * S + s0 + j] = sums[j] / static_cast<float>(G);
    }
  }
}

}  // namespace

void prefill_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& qpos, const at::Tensor& kpos, double scale,
                           at::Tensor& out, at::Tensor& lse,
                           const std::optional<at::Tensor>& col_scores, int64_t score_rows,
                           double score_scale) {
  check_prefill_attention(q, k, v, qpos, kpos, out, lse, col_scores);
  const int64_t B = k.size(0), H = q.size(1), Hkv = k.size(1), L = q.size(2);
  const int64_t rows = score_rows <= 0 || score_rows >= L ? L : score_rows;
  const bool own_lse = col_scores && static_cast<float>(score_scale) != static_cast<float>(scale);
  at::Tensor score_lse = own_lse ? at::empty({B, H, rows}, lse.options()) : at::Tensor();
  const PrefillParams p{B,
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
                        kpos.const_data_ptr<int32_t>(),
                        lse.mutable_data_ptr<float>(),
                        col_scores ? col_scores->mutable_data_ptr<float>() : nullptr,
                        own_lse ? score_lse.mutable_data_ptr<float>() : nullptr};
  ENGINE_DISPATCH_FLOATS(k.scalar_type(), "prefill_attention", [&] {
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    if (q.scalar_type() == at::kFloat) {
      attention_sweep<scalar_t, float>(p, q.const_data_ptr<float>(), kp, vp, out.mutable_data_ptr<float>());
      if (p.col) column_sweep<scalar_t, float>(p, q.const_data_ptr<float>(), kp);
    } else {
      attention_sweep<scalar_t, scalar_t>(p, q.const_data_ptr<scalar_t>(), kp, vp,
                                          out.mutable_data_ptr<scalar_t>());
      if (p.col) column_sweep<scalar_t, scalar_t>(p, q.const_data_ptr<scalar_t>(), kp);
    }
  });
}

}  // namespace engine
