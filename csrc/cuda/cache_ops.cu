// Per-slot cache maintenance on the GPU: value norms at insertion, victim choice, compaction, value
// merge. Each works on (batch, KV head) rows of the slot cache. Slot indices are checked on the
// device (the host never reads them, so nothing synchronises): a bad one stops the kernel with a
// device-side assertion, as torch's own indexing kernels do.
#include <ATen/ops/empty.h>

#include <cstring>
#include <vector>

#include "../checks.h"
#include "common.cuh"
#include "kernels.h"

namespace engine {
namespace {

using cuda::kFullMask;

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / 32;  // kernels with a warp per row

// ---------------------------------------------------------------------------------------------
// value_norm: a warp per row
// ---------------------------------------------------------------------------------------------

// max(a, b) that propagates NaN, as torch.amax does.
__device__ __forceinline__ float nan_max(float a, float b) { return (isnan(a) || a > b) ? a : b; }

template <typename T>
__global__ void __launch_bounds__(kThreads)
    value_norm_kernel(const T* __restrict__ v, int kind, float* __restrict__ out, int64_t rows, int64_t D) {
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (r >= rows) return;  // the whole warp
  const T* x = v + r * D;
  float s = 0.f;
  for (int64_t d = lane; d < D; d += 32) {
    const float f = static_cast<float>(x[d]);
    s = kind == 0 ? nan_max(s, fabsf(f)) : kind == 1 ? s + fabsf(f) : s + f * f;
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(kFullMask, s, o);
    s = kind == 0 ? nan_max(s, other) : s + other;
  }
  if (lane == 0) out[r] = s;
}

// ---------------------------------------------------------------------------------------------
// select_victim: a block per row, a reduction under one strict total order
// ---------------------------------------------------------------------------------------------

struct Candidate {
  float score;
  int32_t pos;
  int32_t slot;  // -1: none
};

// Is a a better victim than b? Lower score first, NaN above every number, then the lower position,
// then the lower slot. A total order, so the reduction's result does not depend on its shape.
__device__ __forceinline__ bool better(const Candidate& a, const Candidate& b) {
  if (a.slot < 0 || b.slot < 0) return b.slot < 0 && a.slot >= 0;
  const bool na = isnan(a.score), nb = isnan(b.score);
  if (na != nb) return nb;
  if (!na && a.score != b.score) return a.score < b.score;
  if (a.pos != b.pos) return a.pos < b.pos;
  return a.slot < b.slot;
}

__device__ __forceinline__ Candidate warp_best(Candidate c) {
  for (int o = 16; o > 0; o >>= 1) {
    const Candidate other{__shfl_xor_sync(kFullMask, c.score, o), __shfl_xor_sync(kFullMask, c.pos, o),
                          __shfl_xor_sync(kFullMask, c.slot, o)};
    if (better(other, c)) c = other;
  }
  return c;
}

__global__ void __launch_bounds__(kThreads)
    select_victim_kernel(const float* __restrict__ score, const int32_t* __restrict__ pos, int64_t lo,
                         int64_t hi, int64_t* __restrict__ out_idx, int64_t C) {
  __shared__ Candidate warp_bests[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const float* sr = score + blockIdx.x * C;
  const int32_t* pr = pos + blockIdx.x * C;
  Candidate best{0.f, 0, -1};
  for (int64_t s = threadIdx.x; s < C; s += kThreads) {
    const int32_t p = pr[s];
    if (p < lo || p >= hi) continue;
    const Candidate c{sr[s], p, static_cast<int32_t>(s)};
    if (better(c, best)) best = c;
  }
  best = warp_best(best);
  if (lane == 0) warp_bests[warp] = best;
  __syncthreads();
  if (warp != 0) return;
  best = lane < kThreads / 32 ? warp_bests[lane] : Candidate{0.f, 0, -1};
  best = warp_best(best);
  if (lane == 0) out_idx[blockIdx.x] = best.slot;
}

// ---------------------------------------------------------------------------------------------
// adaptive_victims: a block per layer row; per head a count and a total, then n block-wide picks
// ---------------------------------------------------------------------------------------------

struct Pick {
  float key;
  int64_t entry;  // head C + slot, -1: none
};

// Is a picked before b? The lower key, then the lower entry (the CPU kernel's order).
__device__ __forceinline__ bool before(const Pick& a, const Pick& b) {
  if (a.entry < 0 || b.entry < 0) return b.entry < 0 && a.entry >= 0;
  return a.key != b.key ? a.key < b.key : a.entry < b.entry;
}

__device__ __forceinline__ Pick warp_pick(Pick c) {
  for (int o = 16; o > 0; o >>= 1) {
    const Pick other{__shfl_xor_sync(kFullMask, c.key, o), __shfl_xor_sync(kFullMask, c.entry, o)};
    if (before(other, c)) c = other;
  }
  return c;
}

// total and room: Hkv each, in dynamic shared memory.
__global__ void __launch_bounds__(kThreads)
    adaptive_victims_kernel(const float* __restrict__ score, const int32_t* __restrict__ pos, int64_t lo,
                            const int64_t* __restrict__ hi, int64_t min_share, const int64_t* __restrict__ limit,
                            int64_t* __restrict__ out, int64_t Hkv, int64_t C, int64_t n) {
  extern __shared__ int64_t shared[];
  int64_t* room = shared;
  float* total = reinterpret_cast<float*>(shared + Hkv);
  __shared__ double warp_sum[kThreads / 32];
  __shared__ int64_t warp_count[kThreads / 32];
  __shared__ Pick warp_best[kThreads / 32];
  __shared__ int64_t held;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const float* sr = score + blockIdx.x * Hkv * C;
  const int32_t* pr = pos + blockIdx.x * Hkv * C;
  int64_t* ob = out + blockIdx.x * n;
  if (threadIdx.x == 0) held = 0;
  for (int64_t g = 0; g < Hkv; ++g) {
    double s = 0.0;
    int64_t c = 0;
    for (int64_t i = threadIdx.x; i < C; i += kThreads) {
      if (pr[g * C + i] >= 0) s += sr[g * C + i], ++c;
    }
    for (int o = 16; o > 0; o >>= 1) {
      s += __shfl_xor_sync(kFullMask, s, o);
      c += __shfl_xor_sync(kFullMask, c, o);
    }
    if (lane == 0) warp_sum[warp] = s, warp_count[warp] = c;
    __syncthreads();
    if (threadIdx.x == 0) {
      double sum = 0.0;
      int64_t count = 0;
      for (int w = 0; w < kThreads / 32; ++w) sum += warp_sum[w], count += warp_count[w];
      const float t = static_cast<float>(sum);
      total[g] = t > 0.f ? t : 1.f;
      room[g] = count - min_share;
      held += count;
    }
    __syncthreads();
  }
  const bool over = held > limit[blockIdx.x];
  const int64_t top = hi[0], first = lo > 0 ? lo : 0;
  for (int64_t i = 0; i < n; ++i) {
    Pick best{0.f, -1};
    for (int64_t e = threadIdx.x; over && e < Hkv * C; e += kThreads) {
      const int64_t g = e / C;
      if (pr[e] < first || pr[e] > top || room[g] <= 0) continue;
      const float x = sr[e] / total[g];
      bool taken = !isfinite(x);
      for (int64_t j = 0; j < i; ++j) taken |= ob[j] == e;
      const Pick c{x, e};
      if (!taken && before(c, best)) best = c;
    }
    best = warp_pick(best);
    if (lane == 0) warp_best[warp] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < kThreads / 32; ++w) {
        if (before(warp_best[w], best)) best = warp_best[w];
      }
      ob[i] = best.entry;
      if (best.entry >= 0) --room[best.entry / C];
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// compact: check the kept slots, gather them into a scratch copy, write it back to the front
// ---------------------------------------------------------------------------------------------

// keep[r, :] must hold distinct slots in [0, C); `seen` is a zeroed bitmap of `words` per row.
__global__ void __launch_bounds__(kThreads)
    check_keep_kernel(const int64_t* __restrict__ keep, uint32_t* __restrict__ seen, int64_t rows,
                      int64_t K, int64_t C, int64_t words) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < rows * K;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t s = keep[i];
    CUDA_KERNEL_ASSERT_MSG(s >= 0 && s < C, "compact: keep_idx must hold distinct slot indices in [0, C)");
    const uint32_t bit = 1u << (s % 32);
    const uint32_t before = atomicOr(seen + (i / K) * words + s / 32, bit);
    CUDA_KERNEL_ASSERT_MSG(!(before & bit), "compact: keep_idx must hold distinct slot indices in [0, C)");
  }
}

// dst[r, i, :] = src[r, keep[r, i], :]: K slots of W units per row.
template <typename U>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(const U* __restrict__ src, const int64_t* __restrict__ keep, U* __restrict__ dst,
                  int64_t rows, int64_t C, int64_t K, int64_t W) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < rows * K * W;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t slot = i / W;  // r * K + kept index
    dst[i] = src[((slot / K) * C + keep[slot]) * W + i % W];
  }
}

// dst[r, i, :] = i < K ? kept[r, i, :] : empty: C slots of W units per row.
template <typename U>
__global__ void __launch_bounds__(kThreads)
    put_front_kernel(U* __restrict__ dst, const U* __restrict__ kept, int64_t rows, int64_t C,
                     int64_t K, int64_t W, U empty) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < rows * C * W;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t slot = i / W, r = slot / C, j = slot % C;
    dst[i] = j < K ? kept[(r * K + j) * W + i % W] : empty;
  }
}

template <typename U>
void move_slots(const at::Tensor& tensor, const at::Tensor& keep, int64_t rows, int64_t C, int64_t K,
                int64_t slot_bytes, unsigned char empty_byte) {
  const cudaStream_t stream = cuda::current_stream();
  const int64_t W = slot_bytes / static_cast<int64_t>(sizeof(U));
  U* t = static_cast<U*>(tensor.mutable_data_ptr());
  const at::Tensor kept = at::empty({rows * K * slot_bytes}, tensor.options().dtype(at::kByte));
  U* kp = static_cast<U*>(kept.mutable_data_ptr());
  if (K > 0) {
    gather_kernel<U><<<cuda::grid_for(rows * K * W, kThreads), kThreads, 0, stream>>>(
        t, keep.const_data_ptr<int64_t>(), kp, rows, C, K, W);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  U empty;
  std::memset(&empty, empty_byte, sizeof(U));
  put_front_kernel<U><<<cuda::grid_for(rows * C * W, kThreads), kThreads, 0, stream>>>(
      t, kp, rows, C, K, W, empty);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Moves the kept slots of one [B, H_kv, C, ...] tensor to the front, in the widest unit its rows
// allow; the slots after them become `empty_byte` repeated (0: zeros; 0xff: -1 for int32).
void compact_tensor(const at::Tensor& t, const at::Tensor& keep, int64_t rows, int64_t C, int64_t K,
                    unsigned char empty_byte) {
  const int64_t slot_bytes = t.numel() / (rows * C) * t.element_size();
  if (slot_bytes % 16 == 0 && cuda::aligned16(t.const_data_ptr())) {
    move_slots<uint4>(t, keep, rows, C, K, slot_bytes, empty_byte);
  } else if (slot_bytes % 4 == 0) {
    move_slots<uint32_t>(t, keep, rows, C, K, slot_bytes, empty_byte);
  } else {
    move_slots<uint16_t>(t, keep, rows, C, K, slot_bytes, empty_byte);
  }
}

// ---------------------------------------------------------------------------------------------
// merge_value: a warp per row; merge_neighbour: a warp per row of slots, its picks in order
// ---------------------------------------------------------------------------------------------

// remove_entries: a thread per row (its entries are few), then a kernel per state tensor
__global__ void remove_entries_kernel(int32_t* __restrict__ pos, int32_t* __restrict__ index,
                                      const int64_t* __restrict__ entries, int64_t scratch, int64_t* __restrict__ out,
                                      int64_t B, int64_t n, int64_t Hkv, int64_t C) {
  constexpr int64_t kMaxEntries = 64;  // checked on the host
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int64_t* e = entries + b * n;
  const int64_t base = b * Hkv * C;
  bool frees[kMaxEntries];
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    CUDA_KERNEL_ASSERT_MSG(e[i] >= -1 && e[i] < Hkv * C, "remove_entries: entries must be in [-1, H_kv C)");
    bool first = true;
    for (int64_t k = 0; k < i; ++k) first &= e[k] != e[i];
    frees[i] = index && e[i] >= 0 && index[base + e[i]] != scratch && first;
    count += frees[i];
  }
  for (int64_t i = 0; i < n; ++i) {
    if (frees[i]) out[b * n + freed_rank(e, frees, n, C, i)] = index[base + e[i]];
  }
  for (int64_t i = count; i < n; ++i) out[b * n + i] = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (e[i] < 0) continue;
    pos[base + e[i]] = -1;
    if (index) index[base + e[i]] = static_cast<int32_t>(scratch);
  }
}

__global__ void zero_entries_kernel(float* __restrict__ t, const int64_t* __restrict__ entries, int64_t B, int64_t n,
                                    int64_t Hkv, int64_t C) {
  const int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (x >= B * n) return;
  const int64_t e = entries[x];
  if (e >= 0) t[x / n * Hkv * C + e] = 0.f;
}

// The row of v holding slot s of (batch, KV head) row r of C slots: its own, or the pool row the slot
// index names, in pool batch r / Hkv % P (checked on the device).
__device__ __forceinline__ int64_t slot_row(const int32_t* index, int64_t r, int64_t s, int64_t Hkv, int64_t C,
                                            int64_t P, int64_t R) {
  if (!index) return r * C + s;
  const int64_t x = index[r * C + s];
  CUDA_KERNEL_ASSERT_MSG(x >= 0 && x < R, "slot_index must hold pool rows in [0, R) on the merged slots");
  return (r / Hkv % P) * R + x;
}

// Pick i of batch row b (picks [B, n], entries head C + slot, -1: none): its (batch, KV head) row r, the
// victim's slot j, that row's positions pr, and the victim's position pj (-1: no pick, or an empty slot).
struct VictimSlot {
  int64_t r, j;
  int32_t* pr;
  int32_t pj;
};

__device__ __forceinline__ VictimSlot pick_at(const int64_t* picks, int32_t* pos, int64_t b, int64_t i, int64_t n,
                                              int64_t Hkv, int64_t C) {
  const int64_t e = picks[b * n + i];
  CUDA_KERNEL_ASSERT_MSG(e >= -1 && e < Hkv * C, "picks must hold entries (head C + slot) in [-1, H_kv C)");
  const int64_t r = b * Hkv + (e < 0 ? 0 : e / C), j = e < 0 ? 0 : e % C;
  int32_t* pr = pos + r * C;
  return {r, j, pr, e < 0 ? -1 : pr[j]};
}

// vr = (w_old vr + add vj) / (w_old + add) in fp32 by the warp's lanes, the plain mean when that sum is 0 (the
// formula would divide 0 by 0); returns the sum.
template <typename T>
__device__ __forceinline__ float merge_row(T* vr, const T* vj, float w_old, float add, int64_t D, int lane) {
  const float total = w_old + add;
  for (int64_t d = lane; d < D; d += 32) {
    const float a = static_cast<float>(vr[d]), b = static_cast<float>(vj[d]);
    vr[d] = static_cast<T>(total == 0.f ? (a + b) * 0.5f : (w_old * a + add * b) / total);
  }
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    merge_value_kernel(T* __restrict__ v, float* __restrict__ w, const int64_t* __restrict__ victim,
                       const int64_t* __restrict__ receiver, const float* __restrict__ weight,
                       const int32_t* __restrict__ index, int64_t rows, int64_t Hkv, int64_t C, int64_t D,
                       int64_t P, int64_t R) {
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (r >= rows) return;  // the whole warp
  const int64_t j = victim[r], m = receiver[r];
  CUDA_KERNEL_ASSERT_MSG(j >= -1 && j < C, "merge_value: victim must hold slot indices in [-1, C)");
  CUDA_KERNEL_ASSERT_MSG(m >= -1 && m < C, "merge_value: receiver must hold slot indices in [-1, C)");
  if (j < 0 || m < 0) return;
  T* vr = v + slot_row(index, r, m, Hkv, C, P, R) * D;
  const T* vj = v + slot_row(index, r, j, Hkv, C, P, R) * D;
  const float total = merge_row(vr, vj, w[r * C + m], weight[r], D, lane);
  __syncwarp();  // every lane has read the old weight
  if (lane == 0) w[r * C + m] = total;
}

// The nearest of two (position, slot) candidates: the lower position (above) or the higher (below), ties
// to the lower slot; slot -1 is none.
__device__ __forceinline__ void nearer(int32_t& p, int32_t& s, int32_t p2, int32_t s2, bool above) {
  const bool take = s2 >= 0 && (s < 0 || (above ? p2 < p : p2 > p) || (p2 == p && s2 < s));
  p = take ? p2 : p;
  s = take ? s2 : s;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    merge_neighbour_kernel(T* __restrict__ v, float* __restrict__ w, int32_t* __restrict__ pos,
                           const float* __restrict__ abar, const int64_t* __restrict__ picks, int64_t sinks,
                           bool after, int64_t* __restrict__ out, const int32_t* __restrict__ index, int64_t B,
                           int64_t n, int64_t Hkv, int64_t C, int64_t D, int64_t P, int64_t R) {
  const int lane = threadIdx.x % 32;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (b >= B) return;  // the whole warp
  for (int64_t i = 0; i < n; ++i) {
    const auto [r, j, pr, pj] = pick_at(picks, pos, b, i, n, Hkv, C);
    // the nearest kept non-sink positions above and below the victim's, over the lanes' slots
    int32_t p_above = 0, s_above = -1, p_below = 0, s_below = -1;
    for (int64_t s = lane; pj >= 0 && s < C; s += 32) {
      const int32_t p = pr[s];
      if (s == j || p < sinks) continue;  // sinks >= 0: an empty slot (-1) too
      nearer(p_above, s_above, p, static_cast<int32_t>(p > pj ? s : -1), true);
      nearer(p_below, s_below, p, static_cast<int32_t>(p < pj ? s : -1), false);
    }
    for (int o = 16; o > 0; o >>= 1) {
      const int32_t pa = __shfl_xor_sync(kFullMask, p_above, o), sa = __shfl_xor_sync(kFullMask, s_above, o);
      const int32_t pb = __shfl_xor_sync(kFullMask, p_below, o), sb = __shfl_xor_sync(kFullMask, s_below, o);
      nearer(p_above, s_above, pa, sa, true);
      nearer(p_below, s_below, pb, sb, false);
    }
    const int64_t m = after ? (s_above >= 0 ? s_above : s_below) : (s_below >= 0 ? s_below : s_above);
    __syncwarp();  // every lane has read the victim's position
    if (lane == 0) {
      out[b * n + i] = pj < 0 ? -1 : m;
      if (pj >= 0) pr[j] = -1;
    }
    if (pj >= 0 && m >= 0) {
      float* wr = w + r * C + m;
      const float w_old = *wr == 0.f ? abar[r * C + m] : *wr;  // a first merge starts from its own average
      T* vr = v + slot_row(index, r, m, Hkv, C, P, R) * D;
      const float total = merge_row(vr, v + slot_row(index, r, j, Hkv, C, P, R) * D, w_old, abar[r * C + j], D, lane);
      __syncwarp();  // every lane has read the old weight
      if (lane == 0) *wr = total;
    }
    __syncwarp();  // the next pick sees this one's writes
  }
}

// merge_spread: a warp per row of slots, its picks in order. A pick's receivers are found by `window` rounds
// of a warp minimum over (position, slot) keys above the last one found; the last is the cutoff, and the
// receivers are then every candidate up to it, taken 32 slots at a time by ballot.
__device__ __forceinline__ uint64_t spread_key(int32_t p, int64_t s) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(p)) << 32) | static_cast<uint64_t>(s);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    merge_spread_kernel(T* __restrict__ v, int32_t* __restrict__ pos, const float* __restrict__ abar,
                        const int64_t* __restrict__ picks, int64_t sinks, int64_t window, int64_t* __restrict__ out,
                        const int32_t* __restrict__ index, int64_t B, int64_t n, int64_t Hkv, int64_t C, int64_t D,
                        int64_t P, int64_t R) {
  constexpr uint64_t kNone = ~uint64_t{0};
  const int lane = threadIdx.x % 32;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (b >= B) return;  // the whole warp
  for (int64_t i = 0; i < n; ++i) {
    const auto [r, j, pr, pj] = pick_at(picks, pos, b, i, n, Hkv, C);
    // candidates: positions above the victim's, non-sink (sinks >= 0: never an empty slot); positions >= 0,
    // so the keys order as (position, slot)
    uint64_t cutoff = 0, last = pj < 0 ? kNone : spread_key(pj, C);
    int64_t m = 0;
    for (; m < window && last != kNone; ++m) {
      uint64_t best = kNone;
      for (int64_t s = lane; s < C; s += 32) {
        const int32_t p = pr[s];
        const uint64_t key = spread_key(p, s);
        if (p > pj && p >= sinks && key > last && key < best) best = key;
      }
      for (int o = 16; o > 0; o >>= 1) {
        const uint64_t other = __shfl_xor_sync(kFullMask, best, o);
        best = other < best ? other : best;
      }
      if (best == kNone) break;
      cutoff = last = best;
    }
    const auto receives = [&](int64_t s) {
      if (m == 0 || s >= C) return false;
      const int32_t p = pr[s];
      return p > pj && p >= sinks && spread_key(p, s) <= cutoff;
    };
    float sum = 0.f;
    for (int64_t s = lane; s < C; s += 32) sum += receives(s) ? abar[r * C + s] : 0.f;
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(kFullMask, sum, o);
    const float ratio = m > 0 ? abar[r * C + j] / (sum / static_cast<float>(m)) : 0.f;
    const float share = (isnan(ratio) ? 0.f : fminf(fmaxf(ratio, 0.f), 1.f)) / static_cast<float>(window);
    const T* vj = m > 0 ? v + slot_row(index, r, j, Hkv, C, P, R) * D : nullptr;
    for (int64_t s0 = 0; s0 < C && m > 0; s0 += 32) {
      unsigned mask = __ballot_sync(kFullMask, receives(s0 + lane));
      while (mask) {
        const int64_t s = s0 + __ffs(mask) - 1;
        mask &= mask - 1;
        T* vr = v + slot_row(index, r, s, Hkv, C, P, R) * D;
        for (int64_t d = lane; d < D; d += 32) {
          vr[d] = static_cast<T>(static_cast<float>(vr[d]) + share * static_cast<float>(vj[d]));
        }
      }
    }
    __syncwarp();  // every lane has read the victim's position and the receivers'
    if (lane == 0) {
      out[b * n + i] = pj < 0 ? 0 : m;
      if (pj >= 0) pr[j] = -1;
    }
    __syncwarp();  // the next pick sees this one's writes
  }
}

// nearest_key: a warp per (batch, KV head) row; each lane takes slots in turn, whole rows of D, and the
// warp keeps the most similar (ties: the lower slot; NaN never wins).
__device__ __forceinline__ void more_similar(float& c, int32_t& s, float c2, int32_t s2) {
  const bool take = s2 >= 0 && (s < 0 || c2 > c || (c2 == c && s2 < s));
  c = take ? c2 : c;
  s = take ? s2 : s;
}

// The other slot of (batch, KV head) row r holding a non-sink token (pos pr) whose key is the most
// cosine-similar to slot j's (-1: no victim), over the warp: slot -1 and best -inf if none. Every lane of the
// warp calls this and gets the result.
template <typename T>
__device__ void most_similar(const T* __restrict__ k, const int32_t* __restrict__ pr, int64_t j, int64_t sinks,
                             const int32_t* __restrict__ index, int64_t r, int64_t Hkv, int64_t C, int64_t D,
                             int64_t P, int64_t R, int lane, float& best, int32_t& slot) {
  best = -INFINITY;
  slot = -1;
  if (j >= 0) {
    const T* kj = k + slot_row(index, r, j, Hkv, C, P, R) * D;
    float nj = 0.f;
    for (int64_t d = 0; d < D; ++d) nj += static_cast<float>(kj[d]) * static_cast<float>(kj[d]);
    nj = fmaxf(sqrtf(nj), 1e-8f);
    for (int64_t s = lane; s < C; s += 32) {
      if (s == j || pr[s] < sinks) continue;  // sinks >= 0: an empty slot (-1) too
      const T* ks = k + slot_row(index, r, s, Hkv, C, P, R) * D;
      float dot = 0.f, ns = 0.f;
      for (int64_t d = 0; d < D; ++d) {
        const float a = static_cast<float>(ks[d]);
        dot += a * static_cast<float>(kj[d]);
        ns += a * a;
      }
      const float c = dot / (fmaxf(sqrtf(ns), 1e-8f) * nj);
      if (!isnan(c)) more_similar(best, slot, c, static_cast<int32_t>(s));
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float c2 = __shfl_xor_sync(kFullMask, best, o);
    const int32_t s2 = __shfl_xor_sync(kFullMask, slot, o);
    more_similar(best, slot, c2, s2);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    nearest_key_kernel(const T* __restrict__ k, const int32_t* __restrict__ pos, const int64_t* __restrict__ victim,
                       int64_t sinks, int64_t* __restrict__ out, float* __restrict__ sim,
                       const int32_t* __restrict__ index, int64_t rows, int64_t Hkv, int64_t C, int64_t D, int64_t P,
                       int64_t R) {
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (r >= rows) return;  // the whole warp
  const int64_t j = victim[r];
  CUDA_KERNEL_ASSERT_MSG(j >= -1 && j < C, "nearest_key: victim must hold slot indices in [-1, C)");
  float best;
  int32_t slot;
  most_similar(k, pos + r * C, j, sinks, index, r, Hkv, C, D, P, R, lane, best, slot);
  if (lane == 0) {
    out[r] = slot;
    sim[r] = slot < 0 ? -INFINITY : best;
  }
}

// merge_zip: a warp per row of slots, its picks in order: the receiver as nearest_key's, then KeepKV's ZIP
// merge over the lanes (engine/reference.py).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    merge_zip_kernel(T* __restrict__ k, T* __restrict__ v, float* __restrict__ logp, int32_t* __restrict__ pos,
                     const float* __restrict__ q, const int64_t* __restrict__ picks, int64_t sinks,
                     float min_similarity, float scale, int64_t* __restrict__ out, const int32_t* __restrict__ index,
                     int64_t B, int64_t n, int64_t Hkv, int64_t C, int64_t D, int64_t P, int64_t R) {
  const int lane = threadIdx.x % 32;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (b >= B) return;  // the whole warp
  for (int64_t i = 0; i < n; ++i) {
    const auto [r, j, pr, pj] = pick_at(picks, pos, b, i, n, Hkv, C);
    const bool taken = pj >= 0;
    float sim;
    int32_t c;
    most_similar(k, pr, taken ? j : -1, sinks, index, r, Hkv, C, D, P, R, lane, sim, c);
    const bool go = c >= 0 && sim >= min_similarity;
    __syncwarp();  // every lane has read the victim's position
    if (lane == 0) {
      out[b * n + i] = go ? c : -1;
      if (taken) pr[j] = -1;
    }
    if (go) {
      const T* kj = k + slot_row(index, r, j, Hkv, C, P, R) * D;
      const T* vj = v + slot_row(index, r, j, Hkv, C, P, R) * D;
      T* kc = k + slot_row(index, r, c, Hkv, C, P, R) * D;
      T* vc = v + slot_row(index, r, c, Hkv, C, P, R) * D;
      const float* qr = q + r * D;
      float qe = 0.f, qc = 0.f, qq = 0.f;
      for (int64_t d = lane; d < D; d += 32) {
        qe += qr[d] * static_cast<float>(kj[d]);
        qc += qr[d] * static_cast<float>(kc[d]);
        qq += qr[d] * qr[d];
      }
      qe = cuda::group_sum(qe), qc = cuda::group_sum(qc), qq = cuda::group_sum(qq);
      const float lp_e = logp[r * C + j], lp_c = logp[r * C + c];
      const float le = lp_e + scale * qe, lc = lp_c + scale * qc;  // log w_e, log w_c
      const float top = fmaxf(le, lc);
      const float w_e = expf(le - top), w_c = expf(lc - top), total = w_e + w_c;
      const float lp_r = fmaxf(lp_e, lp_c) + log1pf(expf(-fabsf(lp_e - lp_c)));
      const float target = (top + logf(total) - lp_r) / scale;  // the q.k_r that gives p_r exp(s_r) = w_e + w_c
      float qk = 0.f;  // q . the weighted mean key
      for (int64_t d = lane; d < D; d += 32) {
        qk += qr[d] * ((w_e * static_cast<float>(kj[d]) + w_c * static_cast<float>(kc[d])) / total);
      }
      qk = cuda::group_sum(qk);
      const float a = qq > 0.f ? (target - qk) / fmaxf(qq, 1e-30f) : 0.f;
      for (int64_t d = lane; d < D; d += 32) {  // each lane reads and writes its own elements
        const float k_bar = (w_e * static_cast<float>(kj[d]) + w_c * static_cast<float>(kc[d])) / total;
        kc[d] = static_cast<T>(k_bar + a * qr[d]);
        vc[d] = static_cast<T>((w_e * static_cast<float>(vj[d]) + w_c * static_cast<float>(vc[d])) / total);
      }
      __syncwarp();  // every lane has read the receiver's log votes
      if (lane == 0) logp[r * C + c] = lp_r;
    }
    __syncwarp();  // the next pick sees this one's writes
  }
}

}  // namespace

void value_norm_cuda(const at::Tensor& v, int64_t kind, at::Tensor& out) {
  check_value_norm(v, kind, out);
  const auto guard = cuda::on_device("value_norm", v);
  const int64_t rows = v.size(0) * v.size(1) * v.size(2), D = v.size(3);
  if (rows == 0) return;
  const unsigned blocks = static_cast<unsigned>(cuda::ceil_div<int64_t>(rows, kRowsPerBlock));
  ENGINE_CUDA_DISPATCH_FLOATS(v.scalar_type(), "value_norm", [&] {
    value_norm_kernel<scalar_t><<<blocks, kThreads, 0, cuda::current_stream()>>>(
        v.const_data_ptr<scalar_t>(), static_cast<int>(kind), out.mutable_data_ptr<float>(), rows, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void select_victim_cuda(const at::Tensor& score, const at::Tensor& pos, int64_t lo, int64_t hi,
                        at::Tensor& out_idx) {
  check_select_victim(score, pos, out_idx);
  const auto guard = cuda::on_device("select_victim", score);
  const int64_t rows = score.size(0) * score.size(1), C = score.size(2);
  if (rows == 0) return;
  select_victim_kernel<<<static_cast<unsigned>(rows), kThreads, 0, cuda::current_stream()>>>(
      score.const_data_ptr<float>(), pos.const_data_ptr<int32_t>(), lo, hi,
      out_idx.mutable_data_ptr<int64_t>(), C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void adaptive_victims_cuda(const at::Tensor& score, const at::Tensor& pos, int64_t lo, const at::Tensor& hi,
                           int64_t min_share, const at::Tensor& limit, at::Tensor& out_entry) {
  check_adaptive_victims(score, pos, hi, limit, out_entry);
  const auto guard = cuda::on_device("adaptive_victims", score);
  const int64_t B = score.size(0), Hkv = score.size(1), C = score.size(2), n = out_entry.size(1);
  if (B * n == 0) return;
  const size_t shared = static_cast<size_t>(Hkv) * (sizeof(int64_t) + sizeof(float));
  adaptive_victims_kernel<<<static_cast<unsigned>(B), kThreads, shared, cuda::current_stream()>>>(
      score.const_data_ptr<float>(), pos.const_data_ptr<int32_t>(), lo, hi.const_data_ptr<int64_t>(), min_share,
      limit.const_data_ptr<int64_t>(), out_entry.mutable_data_ptr<int64_t>(), Hkv, C, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void compact_cuda(at::Tensor& k, at::Tensor& v, at::Tensor& pos, at::TensorList state,
                  const at::Tensor& keep_idx) {
  check_compact(k, v, pos, state, keep_idx);
  const auto guard = cuda::on_device("compact", k);
  const int64_t rows = k.size(0) * k.size(1), C = k.size(2), K = keep_idx.size(2);
  if (rows * C == 0) return;
  const cudaStream_t stream = cuda::current_stream();
  if (K > 0) {
    const int64_t words = cuda::ceil_div<int64_t>(C, 32);
    const at::Tensor seen = at::empty({rows * words}, keep_idx.options().dtype(at::kInt));
    C10_CUDA_CHECK(cudaMemsetAsync(seen.mutable_data_ptr(), 0, seen.nbytes(), stream));
    check_keep_kernel<<<cuda::grid_for(rows * K, kThreads), kThreads, 0, stream>>>(
        keep_idx.const_data_ptr<int64_t>(), static_cast<uint32_t*>(seen.mutable_data_ptr()), rows, K,
        C, words);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  compact_tensor(k, keep_idx, rows, C, K, 0);
  compact_tensor(v, keep_idx, rows, C, K, 0);
  compact_tensor(pos, keep_idx, rows, C, K, 0xff);  // empty slots: pos -1
  for (const at::Tensor& s : state) compact_tensor(s, keep_idx, rows, C, K, 0);
}

void remove_entries_cuda(at::Tensor& pos, at::TensorList state, std::optional<at::Tensor> slot_index,
                         const at::Tensor& entries, int64_t scratch, at::Tensor& freed_out) {
  check_remove_entries(pos, state, slot_index, entries, scratch, freed_out);
  const auto guard = cuda::on_device("remove_entries", pos);
  const int64_t B = pos.size(0), Hkv = pos.size(1), C = pos.size(2), n = entries.size(1);
  TORCH_CHECK_VALUE(n <= 64, "remove_entries: at most 64 entries a row on CUDA, got ", n);
  if (B == 0 || n == 0) return;
  const cudaStream_t stream = cuda::current_stream();
  remove_entries_kernel<<<cuda::grid_for(B, kThreads), kThreads, 0, stream>>>(
      pos.mutable_data_ptr<int32_t>(), slot_index ? slot_index->mutable_data_ptr<int32_t>() : nullptr,
      entries.const_data_ptr<int64_t>(), scratch, freed_out.mutable_data_ptr<int64_t>(), B, n, Hkv, C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (const at::Tensor& s : state) {
    zero_entries_kernel<<<cuda::grid_for(B * n, kThreads), kThreads, 0, stream>>>(
        s.mutable_data_ptr<float>(), entries.const_data_ptr<int64_t>(), B, n, Hkv, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void merge_value_cuda(at::Tensor& v, at::Tensor& w, const at::Tensor& victim,
                      const at::Tensor& receiver, const at::Tensor& weight,
                      const std::optional<at::Tensor>& slot_index) {
  check_merge_value(v, w, victim, receiver, weight, slot_index);
  const auto guard = cuda::on_device("merge_value", v);
  const int64_t Hkv = w.size(1), rows = w.size(0) * Hkv, C = w.size(2), D = v.size(-1);
  if (rows == 0) return;
  const unsigned blocks = static_cast<unsigned>(cuda::ceil_div<int64_t>(rows, kRowsPerBlock));
  ENGINE_CUDA_DISPATCH_FLOATS(v.scalar_type(), "merge_value", [&] {
    merge_value_kernel<scalar_t><<<blocks, kThreads, 0, cuda::current_stream()>>>(
        v.mutable_data_ptr<scalar_t>(), w.mutable_data_ptr<float>(), victim.const_data_ptr<int64_t>(),
        receiver.const_data_ptr<int64_t>(), weight.const_data_ptr<float>(),
        slot_index ? slot_index->const_data_ptr<int32_t>() : nullptr, rows, Hkv, C, D, v.size(0),
        slot_index ? v.size(1) : 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void merge_neighbour_cuda(at::Tensor& v, at::Tensor& w, at::Tensor& pos, const at::Tensor& abar,
                          const at::Tensor& picks, int64_t sinks, bool after, at::Tensor& receiver_out,
                          const std::optional<at::Tensor>& slot_index) {
  check_merge_neighbour(v, w, pos, abar, picks, sinks, receiver_out, slot_index);
  const auto guard = cuda::on_device("merge_neighbour", v);
  const int64_t B = w.size(0), Hkv = w.size(1), C = w.size(2), D = v.size(-1), n = picks.size(1);
  if (B == 0 || n == 0) return;
  const unsigned blocks = static_cast<unsigned>(cuda::ceil_div<int64_t>(B, kRowsPerBlock));
  ENGINE_CUDA_DISPATCH_FLOATS(v.scalar_type(), "merge_neighbour", [&] {
    merge_neighbour_kernel<scalar_t><<<blocks, kThreads, 0, cuda::current_stream()>>>(
        v.mutable_data_ptr<scalar_t>(), w.mutable_data_ptr<float>(), pos.mutable_data_ptr<int32_t>(),
        abar.const_data_ptr<float>(), picks.const_data_ptr<int64_t>(), sinks, after,
        receiver_out.mutable_data_ptr<int64_t>(), slot_index ? slot_index->const_data_ptr<int32_t>() : nullptr, B,
        n, Hkv, C, D, v.size(0), slot_index ? v.size(1) : 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void merge_zip_cuda(at::Tensor& k, at::Tensor& v, at::Tensor& logp, at::Tensor& pos, const at::Tensor& q,
                    const at::Tensor& picks, int64_t sinks, double min_similarity, double scale,
                    at::Tensor& receiver_out, const std::optional<at::Tensor>& slot_index) {
  check_merge_zip(k, v, logp, pos, q, picks, sinks, min_similarity, scale, receiver_out, slot_index);
  const auto guard = cuda::on_device("merge_zip", k);
  const int64_t B = pos.size(0), Hkv = pos.size(1), C = pos.size(2), D = k.size(-1), n = picks.size(1);
  if (B == 0 || n == 0) return;
  const unsigned blocks = static_cast<unsigned>(cuda::ceil_div<int64_t>(B, kRowsPerBlock));
  ENGINE_CUDA_DISPATCH_FLOATS(k.scalar_type(), "merge_zip", [&] {
    merge_zip_kernel<scalar_t><<<blocks, kThreads, 0, cuda::current_stream()>>>(
        k.mutable_data_ptr<scalar_t>(), v.mutable_data_ptr<scalar_t>(), logp.mutable_data_ptr<float>(),
        pos.mutable_data_ptr<int32_t>(), q.const_data_ptr<float>(), picks.const_data_ptr<int64_t>(), sinks,
        static_cast<float>(min_similarity), static_cast<float>(scale), receiver_out.mutable_data_ptr<int64_t>(),
        slot_index ? slot_index->const_data_ptr<int32_t>() : nullptr, B, n, Hkv, C, D, k.size(0),
        slot_index ? k.size(1) : 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void merge_spread_cuda(at::Tensor& v, at::Tensor& pos, const at::Tensor& abar, const at::Tensor& picks, int64_t sinks,
                       int64_t window, at::Tensor& receivers_out, const std::optional<at::Tensor>& slot_index) {
  check_merge_spread(v, pos, abar, picks, sinks, window, receivers_out, slot_index);
  const auto guard = cuda::on_device("merge_spread", v);
  const int64_t B = pos.size(0), Hkv = pos.size(1), C = pos.size(2), D = v.size(-1), n = picks.size(1);
  if (B == 0 || n == 0) return;
  const unsigned blocks = static_cast<unsigned>(cuda::ceil_div<int64_t>(B, kRowsPerBlock));
  ENGINE_CUDA_DISPATCH_FLOATS(v.scalar_type(), "merge_spread", [&] {
    merge_spread_kernel<scalar_t><<<blocks, kThreads, 0, cuda::current_stream()>>>(
        v.mutable_data_ptr<scalar_t>(), pos.mutable_data_ptr<int32_t>(), abar.const_data_ptr<float>(),
        picks.const_data_ptr<int64_t>(), sinks, window, receivers_out.mutable_data_ptr<int64_t>(),
        slot_index ? slot_index->const_data_ptr<int32_t>() : nullptr, B, n, Hkv, C, D, v.size(0),
        slot_index ? v.size(1) : 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void nearest_key_cuda(const at::Tensor& k, const at::Tensor& pos, const at::Tensor& victim, int64_t sinks,
                      at::Tensor& receiver_out, at::Tensor& similarity_out,
                      const std::optional<at::Tensor>& slot_index) {
  check_nearest_key(k, pos, victim, sinks, receiver_out, similarity_out, slot_index);
  const auto guard = cuda::on_device("nearest_key", k);
  const int64_t Hkv = pos.size(1), rows = pos.size(0) * Hkv, C = pos.size(2), D = k.size(-1);
  if (rows == 0) return;
  const unsigned blocks = static_cast<unsigned>(cuda::ceil_div<int64_t>(rows, kRowsPerBlock));
  ENGINE_CUDA_DISPATCH_FLOATS(k.scalar_type(), "nearest_key", [&] {
    nearest_key_kernel<scalar_t><<<blocks, kThreads, 0, cuda::current_stream()>>>(
        k.const_data_ptr<scalar_t>(), pos.const_data_ptr<int32_t>(), victim.const_data_ptr<int64_t>(), sinks,
        receiver_out.mutable_data_ptr<int64_t>(), similarity_out.mutable_data_ptr<float>(),
        slot_index ? slot_index->const_data_ptr<int32_t>() : nullptr, rows, Hkv, C, D, k.size(0),
        slot_index ? k.size(1) : 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace engine
