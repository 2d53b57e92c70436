// Prefill attention: L queries against S cache slots, causal by original position, GQA.
//
// A plain tiled kernel, correctness before speed: a block per (batch, query head, tile of kRows
// query rows) sweeps the keys in tiles with an online softmax; 16 lanes share a query row, each
// owning every 16th head dim of its output. Key s is visible to query t iff 0 <= kpos[s] <= qpos[t],
// whatever the slot order; a key tile nobody in the block sees is skipped.
//
// Column scores (the sum over the last `score_rows` rows of the group-mean softmax at score_scale)
// take a second kernel that recomputes p = exp(score_scale q.k - lse') per (row, key) and adds the
// block's column sums into col_scores with atomicAdd. lse' is the output lse when the two scales
// match; otherwise the first kernel tracks a second online softmax at score_scale for it.
//
// With bias (per-slot additive logits [B, Hkv, S]: KeepKV's log vote counts), key s's logit is
// scale q.k_s + bias[bg, s] (score_scale q.k_s + bias[bg, s] for the column scores).
#include <ATen/ops/empty.h>

#include <climits>

#include "../checks.h"
#include "common.cuh"
#include "kernels.h"

namespace engine {
namespace {

using cuda::kNegInf;

constexpr int kRows = 16;                             // query rows per block
constexpr int kLanes = 16;                            // lanes per query row
constexpr int kThreads = kRows * kLanes;              // 256
constexpr int kWarps = kThreads / 32;
constexpr int kDimsPerLane = kMaxHeadDim / kLanes;    // 16
constexpr int kMaxKeyTile = 32;
constexpr int kKeysPerLane = kMaxKeyTile / kLanes;    // 2
constexpr int kScratchRows = kRows > kWarps ? kRows : kWarps;

struct PrefillParams {
  int64_t H, Hkv, G, L, S, D;
  int key_tile;          // keys per tile: 32, or 16 for D > 128 (shared memory)
  float scale, score_scale;
  int64_t row0;          // first query row of the column-score window
  const int32_t* qpos;   // [B, L]
  const int32_t* kpos;   // [B, Hkv, S]
  float* lse;            // [B, H, L]
  float* score_lse;      // [B, H, L - row0] at score_scale, or null when the scales match / no columns
  float* col;            // [B, Hkv, S] or null
  const float* bias;     // [B, Hkv, S] or null
};

int key_tile(int64_t D) { return D <= 128 ? kMaxKeyTile : kMaxKeyTile / 2; }

// Shared memory: the block's queries [kRows, D], one key (or value) tile [key_tile, D + 1], the
// tile's probabilities [kRows, key_tile] (attention) or per-warp column sums [kWarps, key_tile]
// (column scores), and the tile's key positions.
size_t smem_bytes(int64_t D, int kt) {
  return (kRows * D + kt * (D + 1) + kScratchRows * kt) * sizeof(float) + kt * sizeof(int32_t);
}

// Rows of the block: qs <- q rows t0 .. t0 + kRows - 1 of head `head_row` (zeros past L).
template <typename q_t>
__device__ void load_queries(float* qs, const q_t* q, int64_t head_row, int64_t t0, int64_t L, int D) {
  for (int i = static_cast<int>(threadIdx.x); i < kRows * D; i += kThreads) {
    const int64_t t = t0 + i / D;
    qs[i] = t < L ? static_cast<float>(q[(head_row * L + t) * D + i % D]) : 0.f;
  }
}

// tile[j, :] <- rows s0 + j of src (n rows of D), as fp32 with a padded stride of D + 1.
template <typename kv_t>
__device__ void load_tile(float* tile, const kv_t* src, int n, int D) {
  for (int i = static_cast<int>(threadIdx.x); i < n * D; i += kThreads) {
    tile[(i / D) * (D + 1) + i % D] = static_cast<float>(src[i]);
  }
}

// Loads the key positions of the tile (-1 past the end) and returns, for the whole block, whether
// any row of it sees any of them. The barrier inside also orders the load before every use.
__device__ bool load_positions(int32_t* kp, const int32_t* kpos, int n, int kt, int32_t qp) {
  const int tid = static_cast<int>(threadIdx.x);
  if (tid < kt) kp[tid] = tid < n ? kpos[tid] : -1;
  __syncthreads();
  bool mine = false;
  for (int j = tid % kLanes; j < n; j += kLanes) mine = mine || (kp[j] >= 0 && kp[j] <= qp);
  return __syncthreads_or(mine);
}

// Online softmax state of one query row, kept identically by its 16 lanes.
struct RowSoftmax {
  float m = kNegInf, l = 0.f;

  // Folds in this lane's logits x (-inf = masked); overwrites them with exp(x - m_new) and returns
  // the factor that rescales what was accumulated. Every lane of the warp must call it.
  __device__ float update(float (&x)[kKeysPerLane]) {
    float tile_max = kNegInf;
#pragma unroll
    for (int jj = 0; jj < kKeysPerLane; ++jj) tile_max = fmaxf(tile_max, x[jj]);
    tile_max = cuda::group_max(tile_max, kLanes);
    const float m_new = fmaxf(m, tile_max);
    float corr = 1.f, sum = 0.f;
#pragma unroll
    for (int jj = 0; jj < kKeysPerLane; ++jj) {
      x[jj] = m_new == kNegInf ? 0.f : expf(x[jj] - m_new);
      sum += x[jj];
    }
    if (m_new != kNegInf) corr = expf(m - m_new);  // 0 when nothing was seen before
    sum = cuda::group_sum(sum, kLanes);
    l = l * corr + sum;
    m = m_new;
    return corr;
  }

  __device__ float lse() const { return l > 0.f ? m + logf(l) : kNegInf; }
};

template <typename kv_t, typename q_t>
__global__ void __launch_bounds__(kThreads)
    attention_kernel(const PrefillParams p, const q_t* __restrict__ q, const kv_t* __restrict__ k,
                     const kv_t* __restrict__ v, q_t* __restrict__ out) {
  extern __shared__ float smem[];
  const int D = static_cast<int>(p.D), kt = p.key_tile;
  float* qs = smem;
  float* kv = qs + kRows * D;
  float* ps = kv + kt * (D + 1);
  int32_t* kp = reinterpret_cast<int32_t*>(ps + kScratchRows * kt);

  const int64_t n_qtiles = cuda::ceil_div<int64_t>(p.L, kRows);
  const int64_t head_row = blockIdx.x / n_qtiles;  // b * H + h
  const int64_t t0 = (blockIdx.x % n_qtiles) * kRows;
  const int64_t b = head_row / p.H, bg = b * p.Hkv + head_row % p.H / p.G;
  const int r = static_cast<int>(threadIdx.x) / kLanes, c = static_cast<int>(threadIdx.x) % kLanes;
  const int64_t t = t0 + r;
  const bool row_ok = t < p.L;
  const int32_t qp = row_ok ? p.qpos[b * p.L + t] : INT_MIN;  // a row past L sees nothing
  const bool want_score_lse = p.score_lse != nullptr;

  load_queries(qs, q, head_row, t0, p.L, D);
  float acc[kDimsPerLane];
#pragma unroll
  for (int i = 0; i < kDimsPerLane; ++i) acc[i] = 0.f;
  RowSoftmax sm, sm2;

  for (int64_t s0 = 0; s0 < p.S; s0 += kt) {
    const int n = p.S - s0 < kt ? static_cast<int>(p.S - s0) : kt;
    if (!load_positions(kp, p.kpos + bg * p.S + s0, n, kt, qp)) continue;
    load_tile(kv, k + (bg * p.S + s0) * D, n, D);
    __syncthreads();

    float x[kKeysPerLane], x2[kKeysPerLane];
#pragma unroll
    for (int jj = 0; jj < kKeysPerLane; ++jj) {
      const int j = c + jj * kLanes;
      const bool visible = j < n && kp[j] >= 0 && kp[j] <= qp;
      float dot = 0.f;
      if (visible) {
        for (int d = 0; d < D; ++d) dot += qs[r * D + d] * kv[j * (D + 1) + d];
      }
      const float add = visible && p.bias ? p.bias[bg * p.S + s0 + j] : 0.f;
      x[jj] = visible ? (p.bias ? dot * p.scale + add : dot * p.scale) : kNegInf;
      x2[jj] = visible ? (p.bias ? dot * p.score_scale + add : dot * p.score_scale) : kNegInf;
    }
    if (want_score_lse) sm2.update(x2);
    const float corr = sm.update(x);
#pragma unroll
    for (int jj = 0; jj < kKeysPerLane; ++jj) {
      const int j = c + jj * kLanes;
      if (j < kt) ps[r * kt + j] = x[jj];
    }
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) acc[i] *= corr;
    __syncthreads();  // the scores are done with the keys: the tile buffer takes the values

    load_tile(kv, v + (bg * p.S + s0) * D, n, D);
    __syncthreads();
    for (int j = 0; j < n; ++j) {
      const float pj = ps[r * kt + j];
      if (pj == 0.f) continue;  // masked (an empty slot's value row may hold anything) or negligible
#pragma unroll
      for (int i = 0; i < kDimsPerLane; ++i) {
        const int d = c + i * kLanes;
        if (d < D) acc[i] += pj * kv[j * (D + 1) + d];
      }
    }
    __syncthreads();  // before the next tile overwrites positions, values and probabilities
  }

  if (!row_ok) return;
  const int64_t row = head_row * p.L + t;
  const float inv = sm.l > 0.f ? 1.f / sm.l : 0.f;  // a row that sees nothing: out = 0
#pragma unroll
  for (int i = 0; i < kDimsPerLane; ++i) {
    const int d = c + i * kLanes;
    if (d < D) out[row * D + d] = static_cast<q_t>(acc[i] * inv);
  }
  if (c == 0) {
    p.lse[row] = sm.lse();
    if (want_score_lse && t >= p.row0) p.score_lse[head_row * (p.L - p.row0) + t - p.row0] = sm2.lse();
  }
}

// col[b, g, s] += sum over the window rows of this block's head of exp(score_scale q.k - lse') / G.
template <typename kv_t, typename q_t>
__global__ void __launch_bounds__(kThreads)
    column_kernel(const PrefillParams p, const q_t* __restrict__ q, const kv_t* __restrict__ k) {
  extern __shared__ float smem[];
  const int D = static_cast<int>(p.D), kt = p.key_tile;
  float* qs = smem;
  float* ks = qs + kRows * D;
  float* part = ks + kt * (D + 1);  // [kWarps, kt]
  int32_t* kp = reinterpret_cast<int32_t*>(part + kScratchRows * kt);

  const int64_t W = p.L - p.row0;
  const int64_t n_qtiles = cuda::ceil_div<int64_t>(W, kRows);
  const int64_t head_row = blockIdx.x / n_qtiles;  // b * H + h
  const int64_t t0 = p.row0 + (blockIdx.x % n_qtiles) * kRows;
  const int64_t b = head_row / p.H, bg = b * p.Hkv + head_row % p.H / p.G;
  const int tid = static_cast<int>(threadIdx.x);
  const int r = tid / kLanes, c = tid % kLanes, lane = tid % 32, warp = tid / 32;
  const int64_t t = t0 + r;
  const bool row_ok = t < p.L;
  const int32_t qp = row_ok ? p.qpos[b * p.L + t] : INT_MIN;
  const float lse = !row_ok ? 0.f
                    : p.score_lse ? p.score_lse[head_row * W + t - p.row0]
                                  : p.lse[head_row * p.L + t];
  const float inv_g = 1.f / static_cast<float>(p.G);

  load_queries(qs, q, head_row, t0, p.L, D);
  for (int64_t s0 = 0; s0 < p.S; s0 += kt) {
    const int n = p.S - s0 < kt ? static_cast<int>(p.S - s0) : kt;
    if (!load_positions(kp, p.kpos + bg * p.S + s0, n, kt, qp)) continue;
    load_tile(ks, k + (bg * p.S + s0) * D, n, D);
    __syncthreads();
#pragma unroll
    for (int jj = 0; jj < kKeysPerLane; ++jj) {
      const int j = c + jj * kLanes;
      float pr = 0.f;
      if (j < n && kp[j] >= 0 && kp[j] <= qp) {
        float dot = 0.f;
        for (int d = 0; d < D; ++d) dot += qs[r * D + d] * ks[j * (D + 1) + d];
        pr = p.bias ? expf(dot * p.score_scale + p.bias[bg * p.S + s0 + j] - lse) : expf(dot * p.score_scale - lse);
      }
      pr += __shfl_xor_sync(cuda::kFullMask, pr, kLanes);  // the warp's two rows
      if (lane < kLanes && j < kt) part[warp * kt + j] = pr;
    }
    __syncthreads();
    if (tid < n) {
      float sum = 0.f;
      for (int w = 0; w < kWarps; ++w) sum += part[w * kt + tid];
      if (sum != 0.f) atomicAdd(p.col + bg * p.S + s0 + tid, sum * inv_g);
    }
    __syncthreads();  // before the next tile overwrites positions, keys and sums
  }
}

template <typename kv_t, typename q_t>
void launch(const PrefillParams& p, int64_t B, const at::Tensor& q, const at::Tensor& k,
            const at::Tensor& v, at::Tensor& out) {
  const cudaStream_t stream = cuda::current_stream();
  const size_t smem = smem_bytes(p.D, p.key_tile);
  const q_t* qp = q.const_data_ptr<q_t>();
  const kv_t* kp = k.const_data_ptr<kv_t>();
  const int64_t blocks = B * p.H * cuda::ceil_div<int64_t>(p.L, kRows);
  attention_kernel<kv_t, q_t><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
      p, qp, kp, v.const_data_ptr<kv_t>(), out.mutable_data_ptr<q_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.col == nullptr) return;
  const int64_t col_blocks = B * p.H * cuda::ceil_div<int64_t>(p.L - p.row0, kRows);
  column_kernel<kv_t, q_t><<<static_cast<unsigned>(col_blocks), kThreads, smem, stream>>>(p, qp, kp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void prefill_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& qpos, const at::Tensor& kpos, double scale,
                            at::Tensor& out, at::Tensor& lse,
                            const std::optional<at::Tensor>& col_scores, int64_t score_rows,
                            double score_scale, const std::optional<at::Tensor>& bias) {
  check_prefill_attention(q, k, v, qpos, kpos, out, lse, col_scores, bias);
  const auto guard = cuda::on_device("prefill_attention", k);
  const int64_t B = k.size(0), H = q.size(1), Hkv = k.size(1), L = q.size(2);
  const int64_t rows = score_rows <= 0 || score_rows >= L ? L : score_rows;
  if (col_scores && col_scores->numel() > 0) {
    C10_CUDA_CHECK(cudaMemsetAsync(col_scores->mutable_data_ptr(), 0, col_scores->nbytes(),
                                   cuda::current_stream()));
  }
  if (B * L == 0) return;

  const bool own_lse = col_scores && static_cast<float>(score_scale) != static_cast<float>(scale);
  at::Tensor score_lse = own_lse ? at::empty({B, H, rows}, lse.options()) : at::Tensor();
  PrefillParams p{};
  p.H = H;
  p.Hkv = Hkv;
  p.G = H / Hkv;
  p.L = L;
  p.S = k.size(2);
  p.D = k.size(3);
  p.key_tile = key_tile(p.D);
  p.scale = static_cast<float>(scale);
  p.score_scale = static_cast<float>(score_scale);
  p.row0 = L - rows;
  p.qpos = qpos.const_data_ptr<int32_t>();
  p.kpos = kpos.const_data_ptr<int32_t>();
  p.lse = lse.mutable_data_ptr<float>();
  p.score_lse = own_lse ? score_lse.mutable_data_ptr<float>() : nullptr;
  p.col = col_scores ? col_scores->mutable_data_ptr<float>() : nullptr;
  p.bias = bias ? bias->const_data_ptr<float>() : nullptr;

  ENGINE_CUDA_DISPATCH_FLOATS(k.scalar_type(), "prefill_attention", [&] {
    if (q.scalar_type() == at::kFloat) {
      launch<scalar_t, float>(p, B, q, k, v, out);
    } else {
      launch<scalar_t, scalar_t>(p, B, q, k, v, out);
    }
  });
}

}  // namespace engine
