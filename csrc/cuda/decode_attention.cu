// Decode attention: one query per sequence against the slot cache, GQA, split-KV (flash-decoding).
//
// Phase 1: a block per (batch, KV head, head block, split) runs an online softmax over its slice of
// slots for up to kMaxHeads query heads of the group at once, so each key and value row is read
// once per block. Lanes work in groups of `tpr` on one slot row with 16-byte loads where the row
// allows it. A block writes its partial (max, sum, unnormalised output) to a workspace, or, when
// there is a single split and no probabilities are wanted, the final output directly.
// Phase 2: a block per (batch, KV head, chunk of slots) combines the splits of the group's heads;
// the first chunk writes the output rows. When probabilities are wanted, phase 1 also stores each
// valid slot's raw logit (in probs_out, or a workspace when only score_acc is given) and phase 2
// turns it into exp(logit - max) / sum and adds the group mean into score_acc: K is still read once.
//
// With rope tables (positions="cache": keys stored before RoPE), the key is rotated on the fly:
// q . rot(k) = sum_d k[d] (q[d] cos[d] +- q[d'] sin[d']) with d' = d -+ D/2 (rotate_half layout), so
// a lane needs only the key dims it already holds, plus the query at their partners (in registers).
//
// With slot_index (a per-layer pool shared by the KV heads: k, v [B, R, D]), slot s of KV head bg
// reads pool row slot_index[bg, s]; nothing else changes.
//
// With bias (per-slot additive logits [B, Hkv, C]: KeepKV's log vote counts), slot s's logit is
// scale q.k_s + bias[bg, s] for every query head of the group.
//
// Everything launches on the current stream; the workspace comes from the caching allocator; the
// split count depends on shapes only: the op can be captured in a CUDA graph.
#include <ATen/ops/empty.h>

#include <type_traits>

#include "../checks.h"
#include "common.cuh"
#include "kernels.h"

namespace engine {
namespace {

using cuda::kFullMask;
using cuda::kNegInf;

constexpr int kThreads = 128;             // phase 1
constexpr int kWarps = kThreads / 32;
constexpr int kMaxHeads = 8;              // query heads per phase-1 block; larger groups use more blocks
constexpr int kDimsPerLane = 8;           // head dims one lane holds per head
constexpr int kMaxTile = kThreads;        // slots per tile: max(32, slot rows in flight)
constexpr int kMinSplitSlots = 64;        // a split is worth its combine only above this many slots
constexpr int kBlocksPerSM = 16;          // enough 128-thread blocks to keep ~32 KB of loads in flight per SM
constexpr int kCombineThreads = 256;      // phase 2
constexpr int kCombineSlots = 1024;       // slots per phase-2 block when probabilities are wanted
static_assert(kDimsPerLane * 32 == kMaxHeadDim, "a warp must hold a whole head row");

struct DecodeParams {
  int64_t H, Hkv, G, C, D, length;
  int64_t heads_per_block, head_blocks;  // query heads of a group per phase-1 block, blocks per group
  int64_t splits, split_len;             // slot ranges [i * split_len, ...) cut from [0, length)
  int64_t combine_blocks;                // phase-2 blocks per (batch, KV head)
  int tpr, tile;                         // lanes per slot row; slots per tile
  bool direct;                           // one split and no probabilities: phase 1 writes out
  float scale;
  const int32_t* pos;  // [B, Hkv, C]
  float* logits;       // [B, H, C] raw logits of valid slots, or null when no probabilities are wanted
  float* part_ml;      // [B, H, splits, 2]: running max and sum of each split
  float* part_acc;     // [B, H, splits, D]: unnormalised output of each split
  float* score_acc;    // [B, Hkv, C] or null
  float* probs;        // [B, H, C] or null
  const float* cos;    // [P, D] or null (no rotation)
  const float* sin;    // [P, D]
  const int32_t* rank;  // [B, Hkv, C]: the table row of each slot's key
  int64_t rope_rows;   // P
  const int32_t* index;  // [B, Hkv, C]: the pool row of each slot, or null (k, v [B, Hkv, C, D])
  int64_t R;             // pool rows per batch row (with index)
  const float* bias;     // [B, Hkv, C]: added to each slot's logit, or null
};

// The first element of slot s's key or value row of KV head bg = b * Hkv + g.
__device__ __forceinline__ int64_t row_offset(const DecodeParams& p, int64_t bg, int64_t b, int64_t s) {
  if (p.index == nullptr) return (bg * p.C + s) * p.D;
  const int32_t r = p.index[bg * p.C + s];
  CUDA_KERNEL_ASSERT_MSG(r >= 0 && r < p.R, "decode_attention: slot_index must hold pool rows in [0, R)");
  return (b * p.R + r) * p.D;
}

// VEC: elements per load (16 bytes, or 1 when a row is not a whole number of aligned 16-byte
// vectors). A lane holds at most kDimsPerLane dims of a row: NVPT vectors at lr, lr + tpr, ...
// HEADS: the most query heads a block handles (registers scale with it, so small groups use less).
template <typename kv_t, typename q_t, int VEC, int HEADS>
__global__ void __launch_bounds__(kThreads)
    decode_split_kernel(const DecodeParams p, const q_t* __restrict__ q, const kv_t* __restrict__ k,
                        const kv_t* __restrict__ v, q_t* __restrict__ out) {
  constexpr int NVPT = kDimsPerLane / VEC;
  __shared__ float sums[HEADS * kMaxHeadDim];  // the block's unnormalised output rows
  __shared__ float sc[2][HEADS * kMaxTile];  // logits, then exp(logit - max); double-buffered
  __shared__ bool valid[2][kMaxTile];
  __shared__ float m_s[HEADS], l_s[HEADS], corr_s[HEADS];

  const int64_t split = blockIdx.x % p.splits;
  int64_t rest = blockIdx.x / p.splits;
  const int64_t hb = rest % p.head_blocks;
  rest /= p.head_blocks;
  const int64_t bg = rest;  // b * Hkv + g
  const int64_t b = bg / p.Hkv, g = bg % p.Hkv;
  const int64_t h0 = g * p.G + hb * p.heads_per_block;  // first query head of this block
  const int gb = static_cast<int>(min(p.heads_per_block, p.G - hb * p.heads_per_block));
  const int64_t row0 = b * p.H + h0;  // its row in q, out, logits: [B, H, ...]
  const int D = static_cast<int>(p.D), nv = D / VEC;
  const int64_t C = p.C, s_begin = split * p.split_len;
  const int64_t s_end = min(p.length, s_begin + p.split_len);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int tpr = p.tpr, lr = lane % tpr, grp = tid / tpr, ngrp = kThreads / tpr, tile = p.tile;

  // The scaled query dims this lane multiplies (the same dims it accumulates), in registers, and
  // with rope the signed query at each dim's rotation partner.
  const int half = D / 2;
  float qr[HEADS][kDimsPerLane], qp[HEADS][kDimsPerLane];
#pragma unroll
  for (int h = 0; h < HEADS; ++h) {
#pragma unroll
    for (int i = 0; i < NVPT; ++i) {
      const int dv = lr + i * tpr;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const bool mine = h < gb && dv < nv;
        const int d = dv * VEC + e;
        const int pd = d < half ? d + half : d - half;
        const float sign = d < half ? 1.f : -1.f;
        qr[h][i * VEC + e] = mine ? static_cast<float>(q[(row0 + h) * D + d]) * p.scale : 0.f;
        qp[h][i * VEC + e] = mine && p.rank ? sign * static_cast<float>(q[(row0 + h) * D + pd]) * p.scale : 0.f;
      }
    }
  }
  if (tid < gb) {
    m_s[tid] = kNegInf;
    l_s[tid] = 0.f;
  }
  __syncthreads();

  float acc[HEADS][kDimsPerLane];
#pragma unroll
  for (int h = 0; h < HEADS; ++h) {
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) acc[h][i] = 0.f;
  }

  int buf = 0;
  for (int64_t t0 = s_begin; t0 < s_end; t0 += tile, buf ^= 1) {
    // 1. Logits of the tile's valid slots. tile is a multiple of ngrp: every lane runs the same
    //    number of iterations, so the shuffles below see the whole warp.
    for (int j = grp; j < tile; j += ngrp) {
      const int64_t s = t0 + j;
      const bool ok = s < s_end && p.pos[bg * C + s] >= 0;
      float dot[HEADS];
#pragma unroll
      for (int h = 0; h < HEADS; ++h) dot[h] = 0.f;
      if (ok) {
        const kv_t* kr = k + row_offset(p, bg, b, s);
        int64_t trow = 0;  // the slot's row of the rope tables
        if (p.rank) {
          const int32_t r = p.rank[bg * C + s];
          CUDA_KERNEL_ASSERT_MSG(r >= 0 && r < p.rope_rows,
                                 "decode_attention: rope_rank must hold table rows in [0, P) on valid slots");
          trow = static_cast<int64_t>(r) * D;
        }
#pragma unroll
        for (int i = 0; i < NVPT; ++i) {
          const int dv = lr + i * tpr;
          if (dv < nv) {
            float kf[VEC];
            cuda::load_floats<kv_t, VEC>(kr + dv * VEC, kf);
            if (p.rank) {
#pragma unroll
              for (int e = 0; e < VEC; ++e) {
                const int d = dv * VEC + e;
                const float c = p.cos[trow + d], sn = p.sin[trow + (d < half ? d + half : d - half)];
#pragma unroll
                for (int h = 0; h < HEADS; ++h) {
                  if (h < gb) dot[h] += (qr[h][i * VEC + e] * c + qp[h][i * VEC + e] * sn) * kf[e];
                }
              }
            } else {
#pragma unroll
              for (int h = 0; h < HEADS; ++h) {
                if (h < gb) {
#pragma unroll
                  for (int e = 0; e < VEC; ++e) dot[h] += qr[h][i * VEC + e] * kf[e];
                }
              }
            }
          }
        }
      }
      const float add = ok && p.bias ? p.bias[bg * C + s] : 0.f;
#pragma unroll
      for (int h = 0; h < HEADS; ++h) {
        if (h < gb) {
          float x = cuda::group_sum(dot[h], tpr);
          if (p.bias) x += add;
          if (lr == 0) {
            sc[buf][h * tile + j] = ok ? x : kNegInf;
            if (ok && p.logits) p.logits[(row0 + h) * C + s] = x;
          }
        }
      }
      if (lr == 0) valid[buf][j] = ok;
    }
    __syncthreads();

    // 2. Online softmax of the tile, a warp per head.
    for (int h = warp; h < gb; h += kWarps) {
      float* row = sc[buf] + h * tile;
      float tile_max = kNegInf;
      for (int j = lane; j < tile; j += 32) tile_max = fmaxf(tile_max, row[j]);
      tile_max = cuda::group_max(tile_max);
      const float m_old = m_s[h], m_new = fmaxf(m_old, tile_max);
      float corr = 1.f, sum = 0.f;
      if (m_new != kNegInf) {  // nothing valid yet: leave the -inf logits, which step 3 skips
        corr = expf(m_old - m_new);  // 0 when nothing was seen before (m_old = -inf)
        for (int j = lane; j < tile; j += 32) {
          const float e = expf(row[j] - m_new);
          row[j] = e;
          sum += e;
        }
      }
      sum = cuda::group_sum(sum);
      __syncwarp();
      if (lane == 0) {
        m_s[h] = m_new;
        l_s[h] = l_s[h] * corr + sum;
        corr_s[h] = corr;
      }
    }
    __syncthreads();

    // 3. Rescale what was accumulated, then add the tile's value rows. The other buffer is written
    //    by step 1 of the next tile meanwhile; this one only after everyone passed its step 2.
#pragma unroll
    for (int h = 0; h < HEADS; ++h) {
      if (h < gb) {
        const float corr = corr_s[h];
#pragma unroll
        for (int i = 0; i < kDimsPerLane; ++i) acc[h][i] *= corr;
      }
    }
    for (int j = grp; j < tile; j += ngrp) {
      if (!valid[buf][j]) continue;  // an empty slot's value row may hold anything, even NaN
      const kv_t* vr = v + row_offset(p, bg, b, t0 + j);
      float pj[HEADS];
#pragma unroll
      for (int h = 0; h < HEADS; ++h) pj[h] = h < gb ? sc[buf][h * tile + j] : 0.f;
#pragma unroll
      for (int i = 0; i < NVPT; ++i) {
        const int dv = lr + i * tpr;
        if (dv < nv) {
          float vf[VEC];
          cuda::load_floats<kv_t, VEC>(vr + dv * VEC, vf);
#pragma unroll
          for (int h = 0; h < HEADS; ++h) {
            if (h < gb) {
#pragma unroll
              for (int e = 0; e < VEC; ++e) acc[h][i * VEC + e] += pj[h] * vf[e];
            }
          }
        }
      }
    }
  }

  // Sum the slot groups' accumulators, in a fixed order (the result is bitwise reproducible):
  // butterfly over the groups of a warp, then warp after warp into shared memory.
#pragma unroll
  for (int h = 0; h < HEADS; ++h) {
    if (h < gb) {
#pragma unroll
      for (int i = 0; i < kDimsPerLane; ++i) {
        for (int o = tpr; o < 32; o <<= 1) acc[h][i] += __shfl_xor_sync(kFullMask, acc[h][i], o);
      }
    }
  }
  for (int w = 0; w < kWarps; ++w) {
    if (warp == w && lane < tpr) {
#pragma unroll
      for (int h = 0; h < HEADS; ++h) {
        if (h < gb) {
#pragma unroll
          for (int i = 0; i < NVPT; ++i) {
            const int dv = lr + i * tpr;
            if (dv < nv) {
#pragma unroll
              for (int e = 0; e < VEC; ++e) {
                float& dst = sums[h * D + dv * VEC + e];
                dst = (w == 0 ? 0.f : dst) + acc[h][i * VEC + e];
              }
            }
          }
        }
      }
    }
    __syncthreads();
  }

  for (int i = tid; i < gb * D; i += kThreads) {
    const int h = i / D;
    if (p.direct) {
      const float l = l_s[h];
      out[row0 * D + i] = static_cast<q_t>(l > 0.f ? sums[i] / l : 0.f);  // no valid slot: 0
    } else {
      p.part_acc[((row0 + h) * p.splits + split) * D + i % D] = sums[i];
    }
  }
  if (!p.direct && tid < gb) {
    float* ml = p.part_ml + ((row0 + tid) * p.splits + split) * 2;
    ml[0] = m_s[tid];
    ml[1] = l_s[tid];
  }
}

// Phase 2. Dynamic shared memory: 2 G floats.
template <typename q_t>
__global__ void __launch_bounds__(kCombineThreads)
    decode_combine_kernel(const DecodeParams p, q_t* __restrict__ out) {
  extern __shared__ float combine_smem[];
  float* m_all = combine_smem;          // [G] max over all splits
  float* inv_l = combine_smem + p.G;    // [G] 1 / sum over all splits (0 if nothing was valid)
  const int64_t chunk = blockIdx.x % p.combine_blocks, bg = blockIdx.x / p.combine_blocks;
  const int64_t b = bg / p.Hkv, g = bg % p.Hkv, row0 = b * p.H + g * p.G;
  const int64_t G = p.G, C = p.C, D = p.D, splits = p.splits;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  constexpr int kCombineWarps = kCombineThreads / 32;

  for (int64_t h = warp; h < G; h += kCombineWarps) {
    const float* ml = p.part_ml + (row0 + h) * splits * 2;
    float m = kNegInf;
    for (int64_t i = lane; i < splits; i += 32) m = fmaxf(m, ml[2 * i]);
    m = cuda::group_max(m);
    float l = 0.f;
    for (int64_t i = lane; i < splits; i += 32) {
      if (ml[2 * i + 1] > 0.f) l += ml[2 * i + 1] * expf(ml[2 * i] - m);
    }
    l = cuda::group_sum(l);
    if (lane == 0) {
      m_all[h] = m;
      inv_l[h] = l > 0.f ? 1.f / l : 0.f;
    }
  }
  __syncthreads();

  if (chunk == 0) {
    for (int64_t i = tid; i < G * D; i += kCombineThreads) {
      const int64_t h = i / D, d = i % D;
      const float* ml = p.part_ml + (row0 + h) * splits * 2;
      const float* acc = p.part_acc + (row0 + h) * splits * D + d;
      float o = 0.f;
      for (int64_t s = 0; s < splits; ++s) {
        if (ml[2 * s + 1] > 0.f) o += acc[s * D] * expf(ml[2 * s] - m_all[h]);
      }
      out[row0 * D + i] = static_cast<q_t>(o * inv_l[h]);
    }
  }

  if (p.logits == nullptr) return;
  const int64_t s_end = min(C, (chunk + 1) * kCombineSlots);
  for (int64_t s = chunk * kCombineSlots + tid; s < s_end; s += kCombineThreads) {
    const bool ok = s < p.length && p.pos[bg * C + s] >= 0;
    float sum = 0.f;
    for (int64_t h = 0; h < G; ++h) {
      const int64_t at = (row0 + h) * C + s;
      const float pr = ok ? expf(p.logits[at] - m_all[h]) * inv_l[h] : 0.f;
      if (p.probs) p.probs[at] = pr;
      sum += pr;
    }
    if (ok && p.score_acc) p.score_acc[bg * C + s] += sum / static_cast<float>(G);
  }
}

int next_pow2(int n) {
  int p = 1;
  while (p < n) p *= 2;
  return p;
}

template <typename kv_t, typename q_t>
void launch(DecodeParams p, int64_t B, bool vec, const at::Tensor& q, const at::Tensor& k,
            const at::Tensor& v, at::Tensor& out) {
  const cudaStream_t stream = cuda::current_stream();
  const unsigned split_blocks = static_cast<unsigned>(B * p.Hkv * p.head_blocks * p.splits);
  const q_t* qp = q.const_data_ptr<q_t>();
  const kv_t* kp = k.const_data_ptr<kv_t>();
  const kv_t* vp = v.const_data_ptr<kv_t>();
  q_t* op = out.mutable_data_ptr<q_t>();
  const auto split = [&](auto vec_c, auto heads_c) {
    decode_split_kernel<kv_t, q_t, decltype(vec_c)::value, decltype(heads_c)::value>
        <<<split_blocks, kThreads, 0, stream>>>(p, qp, kp, vp, op);
  };
  const auto with_heads = [&](auto vec_c) {
    if (p.heads_per_block == 1) {
      split(vec_c, std::integral_constant<int, 1>{});
    } else if (p.heads_per_block <= 4) {
      split(vec_c, std::integral_constant<int, 4>{});
    } else {
      split(vec_c, std::integral_constant<int, kMaxHeads>{});
    }
  };
  if (vec) {
    with_heads(std::integral_constant<int, 16 / sizeof(kv_t)>{});
  } else {
    with_heads(std::integral_constant<int, 1>{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.direct) return;
  const unsigned combine_blocks = static_cast<unsigned>(B * p.Hkv * p.combine_blocks);
  decode_combine_kernel<q_t><<<combine_blocks, kCombineThreads, 2 * p.G * sizeof(float), stream>>>(p, op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void decode_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
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
  const auto guard = cuda::on_device("decode_attention", k);
  const int64_t B = k.size(0), H = q.size(1), Hkv = pos.size(1), G = H / Hkv, C = pos.size(2), D = k.size(-1);
  if (B == 0) return;

  DecodeParams p{};
  p.H = H;
  p.Hkv = Hkv;
  p.G = G;
  p.C = C;
  p.D = D;
  p.length = length;
  p.scale = static_cast<float>(scale);
  p.pos = pos.const_data_ptr<int32_t>();
  if (rope_rank) {
    p.cos = rope_cos->const_data_ptr<float>();
    p.sin = rope_sin->const_data_ptr<float>();
    p.rank = rope_rank->const_data_ptr<int32_t>();
    p.rope_rows = rope_cos->size(0);
  }
  if (slot_index) {
    p.index = slot_index->const_data_ptr<int32_t>();
    p.R = k.size(1);
  }
  if (bias) p.bias = bias->const_data_ptr<float>();
  // Balanced head blocks of at most kMaxHeads heads each, none empty.
  p.heads_per_block = cuda::ceil_div<int64_t>(G, cuda::ceil_div<int64_t>(G, kMaxHeads));
  p.head_blocks = cuda::ceil_div(G, p.heads_per_block);

  const int64_t elem = k.element_size();
  const bool vec = (D * elem) % 16 == 0 && cuda::aligned16(k.const_data_ptr()) &&
                   cuda::aligned16(v.const_data_ptr());
  const int nv = static_cast<int>(vec ? D * elem / 16 : D);  // loads per row
  p.tpr = std::min(32, next_pow2(nv));
  p.tile = std::max(32, kThreads / p.tpr);

  // Enough splits for kBlocksPerSM blocks per SM, none shorter than kMinSplitSlots, whole tiles each.
  // A block has only a few rows in flight (each lane group walks its rows in turn), so bandwidth
  // comes from many resident blocks: with 2 blocks per SM a 32K-slot cache read at 22% of copy speed.
  const int64_t blocks = B * Hkv * p.head_blocks;
  const int64_t want = cuda::ceil_div<int64_t>(kBlocksPerSM * cuda::multiprocessor_count(), blocks);
  const int64_t splits = std::max<int64_t>(1, std::min(want, length / kMinSplitSlots));
  p.split_len = cuda::ceil_div<int64_t>(cuda::ceil_div(length, splits), p.tile) * p.tile;
  p.splits = cuda::ceil_div(length, p.split_len);

  const bool need_probs = score_acc.has_value() || probs_out.has_value();
  p.direct = p.splits == 1 && !need_probs;
  p.combine_blocks = need_probs ? cuda::ceil_div<int64_t>(C, kCombineSlots) : 1;
  p.score_acc = score_acc ? score_acc->mutable_data_ptr<float>() : nullptr;
  p.probs = probs_out ? probs_out->mutable_data_ptr<float>() : nullptr;

  at::Tensor workspace;
  if (!p.direct) {
    const int64_t parts = B * H * p.splits;
    const int64_t logits = need_probs && !probs_out ? B * H * C : 0;
    workspace = at::empty({parts * (2 + D) + logits}, k.options().dtype(at::kFloat));
    p.part_ml = workspace.mutable_data_ptr<float>();
    p.part_acc = p.part_ml + parts * 2;
    p.logits = probs_out ? p.probs : (need_probs ? p.part_acc + parts * D : nullptr);
  }

  ENGINE_CUDA_DISPATCH_FLOATS(k.scalar_type(), "decode_attention", [&] {
    if (q.scalar_type() == at::kFloat) {
      launch<scalar_t, float>(p, B, vec, q, k, v, out);
    } else {
      launch<scalar_t, scalar_t>(p, B, vec, q, k, v, out);
    }
  });
}

}  // namespace engine
