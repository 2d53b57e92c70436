// Decode attention: one query per sequence against the slot cache, GQA, one pass over K and V.
//
// Threads split (batch, KV head); the G query heads of a group are processed together, so each key
// and value row is read once while it is in cache. Slots are visited in tiles of kTile: scores of
// the tile's valid slots, one online-softmax rescale per head and tile, then the value rows.
#include <algorithm>
#include <vector>

#include "checks.h"
#include "kernels.h"
#include "vec.h"

namespace engine {
namespace {

constexpr int64_t kTile = 32;

struct DecodeParams {
  int64_t B, H, Hkv, G, C, D, length;
  float scale;
  const int32_t* pos;  // [B, Hkv, C]
  float* score_acc;    // [B, Hkv, C] or null
  float* probs;        // [B, H, C] or null
};

constexpr int64_t kDecodeParallelWork = 1 << 18;  // multiply-adds below which one thread is faster

template <typename kv_t, typename q_t>
void decode_kernel(const DecodeParams& p, const q_t* q, const kv_t* k, const kv_t* v, q_t* out) {
  const int64_t G = p.G, C = p.C, D = p.D;
  const bool need_probs = p.score_acc || p.probs;
  // Threads only pay off when each gets real work: a short cache is faster on one thread than a wake-up.
#pragma omp parallel if (p.B * p.Hkv > 1 && p.B * p.Hkv * p.length * D * G > kDecodeParallelWork)
  {
    std::vector<float> qf(G * D), acc(G * D), tile(G * kTile), kf(kTile * D), vf(kTile * D);
    std::vector<const float*> krow(kTile), vrow(kTile);  // the tile's valid rows as fp32
    std::vector<float> scratch(need_probs && !p.probs ? G * C : 0);
    std::vector<int64_t> idx(kTile);
    std::vector<SoftmaxRow> sm(G);
#pragma omp for schedule(static)
    for (int64_t bg = 0; bg < p.B * p.Hkv; ++bg) {
      const int64_t b = bg / p.Hkv, h0 = (bg % p.Hkv) * G;  // heads h0 .. h0+G-1 use KV head bg
      const kv_t* kb = k + bg * C * D;
      const kv_t* vb = v + bg * C * D;
      const int32_t* posb = p.pos + bg * C;
      float* logits = p.probs ? p.probs + (b * p.H + h0) * C : scratch.data();  // [G, C]
      for (int64_t i = 0; i < G * D; ++i) qf[i] = static_cast<float>(q[(b * p.H + h0) * D + i]) * p.scale;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(sm.begin(), sm.end(), SoftmaxRow{});

      for (int64_t t0 = 0; t0 < p.length; t0 += kTile) {
        const int64_t n = std::min(kTile, p.length - t0);
        int64_t nv = 0;
        for (int64_t i = 0; i < n; ++i) {
          if (posb[t0 + i] >= 0) idx[nv++] = t0 + i;
        }
        if (nv == 0) continue;
        for (int64_t j = 0; j < nv; ++j) {
          krow[j] = as_float(kb + idx[j] * D, kf.data() + j * D, D);
          vrow[j] = as_float(vb + idx[j] * D, vf.data() + j * D, D);
        }
        for (int64_t h = 0; h < G; ++h) {
          float* th = tile.data() + h * kTile;
          for (int64_t j = 0; j < nv; ++j) th[j] = dot(qf.data() + h * D, krow[j], D);
          if (need_probs) {
            for (int64_t j = 0; j < nv; ++j) logits[h * C + idx[j]] = th[j];
          }
          const float corr = sm[h].update(th, nv);
          if (corr != 1.f) scale_row(acc.data() + h * D, corr, D);
          accumulate_rows(acc.data() + h * D, th, vrow.data(), nv, D);
        }
      }

      for (int64_t h = 0; h < G; ++h) {
        const float inv = sm[h].l > 0.f ? 1.f / sm[h].l : 0.f;  // no valid slot: out = 0
        scale_row(acc.data() + h * D, inv, D);
        store_float(acc.data() + h * D, out + (b * p.H + h0 + h) * D, D);
        if (!need_probs) continue;
        float* row = logits + h * C;
        for (int64_t s = 0; s < C; ++s) {
          const bool valid = s < p.length && posb[s] >= 0;
          row[s] = valid ? std::exp(row[s] - sm[h].m) * inv : 0.f;
        }
      }
      if (p.score_acc) {
        float* sa = p.score_acc + bg * C;
        for (int64_t s = 0; s < p.length; ++s) {
          if (posb[s] < 0) continue;
          float sum = 0.f;
          for (int64_t h = 0; h < G; ++h) sum += logits[h * C + s];
          sa[s] += sum / static_cast<float>(G);
        }
      }
    }
  }
}

}  // namespace

void decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& pos, int64_t length, double scale, at::Tensor& out,
                          const std::optional<at::Tensor>& score_acc,
                          const std::optional<at::Tensor>& probs_out) {
  check_decode_attention(q, k, v, pos, length, out, score_acc, probs_out);
  const DecodeParams p{k.size(0),
                       q.size(1),
                       k.size(1),
                       q.size(1) / k.size(1),
                       k.size(2),
                       k.size(3),
                       length,
                       static_cast<float>(scale),
                       pos.const_data_ptr<int32_t>(),
                       score_acc ? score_acc->mutable_data_ptr<float>() : nullptr,
                       probs_out ? probs_out->mutable_data_ptr<float>() : nullptr};
  ENGINE_DISPATCH_FLOATS(k.scalar_type(), "decode_attention", [&] {
    if (q.scalar_type() == at::kFloat) {
      decode_kernel<scalar_t, float>(p, q.const_data_ptr<float>(), k.const_data_ptr<scalar_t>(),
                                     v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<float>());
    } else {
      decode_kernel<scalar_t, scalar_t>(p, q.const_data_ptr<scalar_t>(),
                                        k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                                        out.mutable_data_ptr<scalar_t>());
    }
  });
}

}  // namespace engine
