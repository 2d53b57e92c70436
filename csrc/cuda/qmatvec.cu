// Products by packed GGUF weights (csrc/quant_blocks.h): qmatvec, the decode step's matvec with the
// weights decoded in registers, and dequantize, the same decoding written out.
//
// A packed row is a run of blocks whose sizes (18, 20, 34, 144, 210 bytes) do not divide 16, so the
// bytes are read the one way that streams at full width: a warp loads the 16-byte-aligned chunks that
// cover a window of its rows (1024 weights each) with 16-byte loads, lane after lane, into a per-warp
// shared-memory stage, and each lane then decodes one 32-weight unit of the window from there (a block,
// or an eighth of a K-quant super-block), reading it as funnel-shifted words whatever its alignment.
// The next window's chunks are loaded into registers while the current one is decoded.
//
// qmatvec: a block of kWarps warps first writes h (x, RMSNorm(x) or the SwiGLU of x's halves, rounded
// to x's dtype exactly as the reference does) for its up to kMaxRows rows of x into shared memory, in
// an order in which the 8 values a lane needs next sit beside its neighbours' (conflict-free 16-byte
// reads). Each warp then walks tiles of kTileRows weight rows: a lane turns 8 weights of a unit into
// the integers q and a scale d (w = d q + mn exactly), sums h q in fp32 for each row of x, and adds
// d times that (and mn times the sum of h) to its accumulator; a warp-shuffle tree finishes each
// output. Every row of x is summed in the same order however many rows the call has, so a request's
// result does not depend on the batch around it.
//
// No host synchronisation, no allocation, and launch shapes that depend on shapes only: the ops can be
// captured in a CUDA graph.
#include <cuda_fp16.h>

#include "../checks.h"
#include "../quant_blocks.h"
#include "common.cuh"
#include "kernels.h"

namespace engine {
namespace {

using cuda::kFullMask;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxRows = 8;          // rows of x per launch (more: one launch per group of rows)
constexpr int kTileRows = 2;         // weight rows a warp decodes together, each h value read once for both
constexpr int kUnitWeights = 32;     // weights a lane decodes per window and row
constexpr int kWindow = 32 * kUnitWeights;  // weights per window: one unit per lane
constexpr int kBlocksPerSM = 2;      // the register budget of __launch_bounds__ below

// ---------------------------------------------------------------------------------------------
// Reading bytes and turning them into exact floats
// ---------------------------------------------------------------------------------------------

// N 32-bit words starting at any byte address p of shared memory (two aligned reads and a funnel
// shift per word). Reads up to 4 bytes past the last one: every stage has room for that.
template <int N>
__device__ __forceinline__ void load_words(const uint8_t* p, uint32_t (&w)[N]) {
  const auto addr = reinterpret_cast<uintptr_t>(p);
  const auto* base = reinterpret_cast<const uint32_t*>(addr & ~uintptr_t{3});
  const unsigned shift = (addr & 3) * 8;
  uint32_t cur = base[0];
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const uint32_t next = base[i + 1];
    w[i] = __funnelshift_r(cur, next, shift);
    cur = next;
  }
}

__device__ __forceinline__ float half_bits(uint32_t bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits & 0xFFFF)));
}

// Byte i of `word` as a float minus `bias` - 2^23: the byte is placed in the mantissa of 2^23, so the
// subtraction is exact and costs one FADD where an integer conversion is a quarter-rate instruction.
__device__ __forceinline__ float byte_value(uint32_t word, int i, float bias) {
  return __int_as_float(static_cast<int>(__byte_perm(word, 0x4B000000u, 0x7440u | i))) - bias;
}
constexpr float kMagic = 8388608.f;  // 2^23

// ---------------------------------------------------------------------------------------------
// Block formats. Each decodes 32-weight units: unit u of a block holds block weights [32 u, 32 u + 32).
// load() reads the unit's bytes (blk: the block's first byte in shared memory); group(c) gives weights
// 8 c .. 8 c + 7 of the unit as bytes b of two words with q = byte - (kBias - 2^23) and w = d * q (+ mn),
// exactly gguf.quants.dequantize's float32 arithmetic.
// ---------------------------------------------------------------------------------------------

// Group c (8 weights) of a 32-weight Q4_0/Q4_1 block's 16 bytes of nibbles: weights j < 16 are the low
// nibbles of qs[j], j >= 16 the high nibbles of qs[j - 16].
__device__ __forceinline__ void nibble_group(const uint32_t (&qs)[4], int c, uint32_t (&b)[2]) {
  const int shift = 4 * (c >> 1);
  b[0] = (qs[2 * (c & 1)] >> shift) & 0x0F0F0F0Fu;
  b[1] = (qs[2 * (c & 1) + 1] >> shift) & 0x0F0F0F0Fu;
}

template <int64_t Q>
struct Format;

template <>
struct Format<quant::kQ4_0> {  // w = d * (nibble - 8)
  static constexpr int kUnits = 1;
  static constexpr bool kHasMin = false;
  static constexpr float kBias = kMagic + 8.f;
  struct Unit {
    uint32_t qs[4];
    float d;
  };
  __device__ static Unit load(const uint8_t* blk, int) {
    Unit u;
    uint32_t d[1];
    load_words(blk, d);
    u.d = half_bits(d[0]);
    load_words(blk + 2, u.qs);
    return u;
  }
  __device__ static void group(const Unit& u, int c, uint32_t (&b)[2], float& d, float& mn) {
    nibble_group(u.qs, c, b);
    d = u.d;
    mn = 0.f;
  }
};

template <>
struct Format<quant::kQ4_1> {  // w = d * nibble + m
  static constexpr int kUnits = 1;
  static constexpr bool kHasMin = true;
  static constexpr float kBias = kMagic;
  struct Unit {
    uint32_t qs[4];
    float d, m;
  };
  __device__ static Unit load(const uint8_t* blk, int) {
    Unit u;
    uint32_t dm[1];
    load_words(blk, dm);
    u.d = half_bits(dm[0]);
    u.m = half_bits(dm[0] >> 16);
    load_words(blk + 4, u.qs);
    return u;
  }
  __device__ static void group(const Unit& u, int c, uint32_t (&b)[2], float& d, float& mn) {
    nibble_group(u.qs, c, b);
    d = u.d;
    mn = u.m;
  }
};

template <>
struct Format<quant::kQ8_0> {  // w = d * q, q int8 (stored + 128 by the xor, so the byte is unsigned)
  static constexpr int kUnits = 1;
  static constexpr bool kHasMin = false;
  static constexpr float kBias = kMagic + 128.f;
  struct Unit {
    uint32_t qs[8];
    float d;
  };
  __device__ static Unit load(const uint8_t* blk, int) {
    Unit u;
    uint32_t d[1];
    load_words(blk, d);
    u.d = half_bits(d[0]);
    load_words(blk + 2, u.qs);
    return u;
  }
  __device__ static void group(const Unit& u, int c, uint32_t (&b)[2], float& d, float& mn) {
    b[0] = u.qs[2 * c] ^ 0x80808080u;
    b[1] = u.qs[2 * c + 1] ^ 0x80808080u;
    d = u.d;
    mn = 0.f;
  }
};

template <>
struct Format<quant::kQ4_K> {  // sub-block j: w = (d sc_j) * nibble - dmin m_j
  static constexpr int kUnits = 8;
  static constexpr bool kHasMin = true;
  static constexpr float kBias = kMagic;
  struct Unit {
    uint32_t qs[8];  // the 32 bytes whose low (even j) or high (odd j) nibbles are the unit
    int shift;
    float d, mn;
  };
  __device__ static Unit load(const uint8_t* blk, int j) {
    Unit u;
    uint32_t head[1], sc[3];
    load_words(blk, head);
    load_words(blk + 4, sc);
    // ggml's get_scale_min_k4: 6-bit scales and mins, the high 2 bits of sub-blocks 4..7 packed
    // in the top bits of bytes 0..7.
    const auto byte = [&](int i) { return ((i < 4 ? sc[0] : i < 8 ? sc[1] : sc[2]) >> (8 * (i & 3))) & 0xFFu; };
    uint32_t s, m;
    if (j < 4) {
      s = byte(j) & 63;
      m = byte(j + 4) & 63;
    } else {
      s = (byte(j + 4) & 0xF) | ((byte(j - 4) >> 6) << 4);
      m = (byte(j + 4) >> 4) | ((byte(j) >> 6) << 4);
    }
    u.d = half_bits(head[0]) * static_cast<float>(s);
    u.mn = -(half_bits(head[0] >> 16) * static_cast<float>(m));
    load_words(blk + 16 + 32 * (j >> 1), u.qs);
    u.shift = 4 * (j & 1);
    return u;
  }
  __device__ static void group(const Unit& u, int c, uint32_t (&b)[2], float& d, float& mn) {
    b[0] = (u.qs[2 * c] >> u.shift) & 0x0F0F0F0Fu;
    b[1] = (u.qs[2 * c + 1] >> u.shift) & 0x0F0F0F0Fu;
    d = u.d;
    mn = u.mn;
  }
};

template <>
struct Format<quant::kQ6_K> {  // 16-weight sub-block i: w = (d scales[i]) * (q - 32), q 6 bits
  static constexpr int kUnits = 8;
  static constexpr bool kHasMin = false;
  static constexpr float kBias = kMagic + 32.f;
  struct Unit {
    uint32_t ql[8], qh[8];  // the 32 ql bytes holding the unit's low 4 bits, the 32 qh bytes its high 2
    int ql_shift, qh_shift;
    float d[2];  // for weights 0..15 and 16..31 of the unit
  };
  // Unit j = 4 n + t holds weights 128 n + 32 t + l: low bits in nibble t / 2 of ql[64 n + 32 (t % 2) + l],
  // high bits at bit 2 t of qh[32 n + l], scale scales[8 n + 2 t + l / 16] (ggml's dequantize_row_q6_K).
  __device__ static Unit load(const uint8_t* blk, int j) {
    Unit u;
    const int n = j >> 2, t = j & 3;
    load_words(blk + 64 * n + 32 * (t & 1), u.ql);
    load_words(blk + 128 + 32 * n, u.qh);
    u.ql_shift = 4 * (t >> 1);
    u.qh_shift = 2 * t;
    uint32_t sc[1], d[1];
    load_words(blk + 192 + 8 * n + 2 * t, sc);
    load_words(blk + 208, d);
    const float dd = half_bits(d[0]);
    u.d[0] = dd * static_cast<float>(static_cast<int8_t>(sc[0] & 0xFF));
    u.d[1] = dd * static_cast<float>(static_cast<int8_t>((sc[0] >> 8) & 0xFF));
    return u;
  }
  __device__ static void group(const Unit& u, int c, uint32_t (&b)[2], float& d, float& mn) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      b[i] = ((u.ql[2 * c + i] >> u.ql_shift) & 0x0F0F0F0Fu) | (((u.qh[2 * c + i] >> u.qh_shift) & 0x03030303u) << 4);
    }
    d = u.d[c >> 1];
    mn = 0.f;
  }
};

template <int64_t Q>
struct Layout {
  static constexpr int kBlockBytes = static_cast<int>(quant::block_bytes(Q));
  static constexpr int kWindowBlocks = 32 / Format<Q>::kUnits;  // blocks per window (32 units)
  // 16-byte chunks that can cover a window's bytes (at any alignment), and per lane.
  static constexpr int kChunks = (15 + kWindowBlocks * kBlockBytes + 15) / 16;
  static constexpr int kLoads = (kChunks + 31) / 32;
  static constexpr int kStageBytes = 16 * kChunks + 16;  // + the over-read of load_words
  static_assert(kWindowBlocks * quant::block_weights(Q) == kWindow);
};

// The 8 weights of group c as floats q (w = d q + mn).
template <int64_t Q>
__device__ __forceinline__ void group_values(const typename Format<Q>::Unit& u, int c, float (&q)[8], float& d,
                                             float& mn) {
  uint32_t b[2];
  Format<Q>::group(u, c, b, d, mn);
#pragma unroll
  for (int e = 0; e < 8; ++e) q[e] = byte_value(b[e >> 2], e & 3, Format<Q>::kBias);
}

// ---------------------------------------------------------------------------------------------
// Streaming a window of packed rows into a warp's stage
// ---------------------------------------------------------------------------------------------

struct Packed {
  const uint8_t* begin;  // the whole tensor [begin, end): chunks may reach into neighbouring rows, never out
  const uint8_t* end;
  int64_t row_bytes, blocks;  // per row
};

// The chunks covering a window of row n (blocks [w * kWindowBlocks, ...)) into registers: chunk i of the
// window (16-byte aligned, from the one holding the window's first byte) goes to lane i % 32, slot i / 32.
// Chunks that would cross the tensor's ends (only at its first and last bytes) are read byte by byte.
template <int64_t Q>
struct Window {
  using L = Layout<Q>;
  uint4 v[L::kLoads];
  int offset, chunks;  // the window's first byte within the stage; chunks in use

  __device__ void load(const Packed& p, int64_t n, int64_t w, int lane) {
    const int blocks = static_cast<int>(std::min<int64_t>(L::kWindowBlocks, p.blocks - w * L::kWindowBlocks));
    const uint8_t* a = p.begin + n * p.row_bytes + w * L::kWindowBlocks * L::kBlockBytes;
    const auto addr = reinterpret_cast<uintptr_t>(a);
    offset = static_cast<int>(addr & 15);
    chunks = (offset + blocks * L::kBlockBytes + 15) / 16;
    const uint8_t* a0 = a - offset;
#pragma unroll
    for (int i = 0; i < L::kLoads; ++i) {
      const int j = lane + 32 * i;
      if (j >= chunks) continue;
      const uint8_t* c = a0 + 16 * j;
      if (c >= p.begin && c + 16 <= p.end) {
        v[i] = __ldcs(reinterpret_cast<const uint4*>(c));  // streamed once: evict first
      } else {
        uint8_t bytes[16];
        for (int k = 0; k < 16; ++k) bytes[k] = c + k >= p.begin && c + k < p.end ? c[k] : 0;
        memcpy(&v[i], bytes, 16);
      }
    }
  }

  __device__ void store(uint8_t* stage, int lane) const {
#pragma unroll
    for (int i = 0; i < L::kLoads; ++i) {
      const int j = lane + 32 * i;
      if (j < chunks) *reinterpret_cast<uint4*>(stage + 16 * j) = v[i];
    }
  }
};

// Where weight k of a row of h sits in shared memory: window k / 1024, then group (k % 32) / 8, then unit
// (k % 1024) / 32, then k % 8. Lane l reads group c of its unit l as 8 values next to lane l + 1's.
__device__ __forceinline__ int64_t h_index(int64_t k) {
  return (k & ~int64_t{kWindow - 1}) + ((k >> 3) & 3) * 256 + ((k >> 5) & 31) * 8 + (k & 7);
}

// ---------------------------------------------------------------------------------------------
// qmatvec
// ---------------------------------------------------------------------------------------------

template <typename T>
struct QmvParams {
  Packed w;
  int64_t N, K, Kpad;  // Kpad: K rounded up to whole windows (h's row stride in shared memory)
  int rows;            // rows of x in this launch (<= MR)
  const T* x;          // [rows, K] or [rows, 2K] (swiglu)
  const T* norm;       // [K] or null
  T* out;              // [rows, N]
  float eps;
  bool swiglu, accumulate;
};

// h for the MR rows of this launch into hs (rows past p.rows repeat the last: computed, never written).
// Each rounding as the reference: RMSNorm normalises in fp32, rounds, multiplies by norm and rounds;
// SwiGLU rounds silu(a) = a / (1 + exp(-a)) and then its product with b.
template <int MR, typename T>
__device__ void prologue(const QmvParams<T>& p, T* hs, float* scratch) {
  for (int m = 0; m < MR; ++m) {
    const T* xr = p.x + std::min(m, p.rows - 1) * (p.swiglu ? 2 * p.K : p.K);
    T* hr = hs + m * p.Kpad;
    float inv = 1.f;
    if (p.norm) {
      float ss = 0.f;
      for (int64_t k = threadIdx.x; k < p.K; k += kThreads) {
        const float f = static_cast<float>(xr[k]);
        ss += f * f;
      }
      ss = cuda::block_sum(ss, scratch);
      inv = 1.f / sqrtf(ss / static_cast<float>(p.K) + p.eps);
    }
    for (int64_t k = threadIdx.x; k < p.K; k += kThreads) {
      const float a = static_cast<float>(xr[k]);
      T h;
      if (p.norm) {
        h = static_cast<T>(static_cast<float>(p.norm[k]) * static_cast<float>(static_cast<T>(a * inv)));
      } else if (p.swiglu) {
        const T silu = static_cast<T>(a / (1.f + expf(-a)));
        h = static_cast<T>(static_cast<float>(silu) * static_cast<float>(xr[p.K + k]));
      } else {
        h = xr[k];
      }
      hr[h_index(k)] = h;
    }
  }
  __syncthreads();
}

template <int64_t Q, int MR, typename T>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM) qmatvec_kernel(const QmvParams<T> p) {
  using F = Format<Q>;
  using L = Layout<Q>;
  extern __shared__ __align__(32) uint8_t smem[];  // h first: fp32 reads 8 floats (32 bytes) at a time
  __shared__ float scratch[32];
  T* hs = reinterpret_cast<T*>(smem);  // [MR, Kpad]
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  uint8_t* stage = smem + MR * p.Kpad * sizeof(T) + warp * kTileRows * L::kStageBytes;

  const int64_t units = p.w.blocks * F::kUnits;  // 32-weight units per row
  const int64_t windows = cuda::ceil_div<int64_t>(units, 32);
  const int64_t tiles = cuda::ceil_div<int64_t>(p.N, kTileRows);
  const int64_t first = blockIdx.x * int64_t{kWarps} + warp, stride = gridDim.x * int64_t{kWarps};
  const int64_t steps = first < tiles ? cuda::ceil_div(tiles - first, stride) * windows : 0;
  // Step s of this warp: window s % windows of tile first + (s / windows) * stride; rows past N read row N - 1.
  const auto row = [&](int64_t s, int r) { return std::min(p.N - 1, (first + s / windows * stride) * kTileRows + r); };

  Window<Q> next[kTileRows];
  if (steps > 0) {  // the first window is in flight while h is computed
#pragma unroll
    for (int r = 0; r < kTileRows; ++r) next[r].load(p.w, row(0, r), 0, lane);
  }
  prologue<MR>(p, hs, scratch);

  float acc[kTileRows][MR];
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t w = s % windows;
    if (w == 0) {
#pragma unroll
      for (int r = 0; r < kTileRows; ++r) {
#pragma unroll
        for (int m = 0; m < MR; ++m) acc[r][m] = 0.f;
      }
    }
    __syncwarp();  // the previous window's reads of the stage are done
    int offset[kTileRows];
#pragma unroll
    for (int r = 0; r < kTileRows; ++r) {
      next[r].store(stage + r * L::kStageBytes, lane);
      offset[r] = next[r].offset;
    }
    __syncwarp();
    if (s + 1 < steps) {
#pragma unroll
      for (int r = 0; r < kTileRows; ++r) next[r].load(p.w, row(s + 1, r), (s + 1) % windows, lane);
    }

    if (w * 32 + lane < units) {
      const int blk = lane / F::kUnits, u = lane % F::kUnits;
      typename F::Unit unit[kTileRows];
#pragma unroll
      for (int r = 0; r < kTileRows; ++r) unit[r] = F::load(stage + r * L::kStageBytes + offset[r] + blk * L::kBlockBytes, u);
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float q[kTileRows][8], d[kTileRows], mn[kTileRows];
#pragma unroll
        for (int r = 0; r < kTileRows; ++r) group_values<Q>(unit[r], c, q[r], d[r], mn[r]);
#pragma unroll
        for (int m = 0; m < MR; ++m) {
          float h[8];
          cuda::load_floats<T, 8>(hs + m * p.Kpad + w * kWindow + c * 256 + lane * 8, h);
          float hsum = 0.f;  // for the min term, shared by the tile's rows
          if constexpr (F::kHasMin) {
            for (int e = 0; e < 8; ++e) hsum += h[e];
          }
#pragma unroll
          for (int r = 0; r < kTileRows; ++r) {
            float dot = 0.f;
#pragma unroll
            for (int e = 0; e < 8; ++e) dot = fmaf(h[e], q[r][e], dot);
            acc[r][m] = fmaf(d[r], dot, acc[r][m]);
            if constexpr (F::kHasMin) acc[r][m] = fmaf(mn[r], hsum, acc[r][m]);
          }
        }
      }
    }

    if (w == windows - 1) {  // the tile's rows are done: reduce over the warp and write
#pragma unroll
      for (int r = 0; r < kTileRows; ++r) {
        const int64_t n = (first + s / windows * stride) * kTileRows + r;
#pragma unroll
        for (int m = 0; m < MR; ++m) {
          const float sum = cuda::group_sum(acc[r][m]);
          if (lane == (r * MR + m) % 32 && n < p.N && m < p.rows) {
            T* o = p.out + m * p.N + n;
            const T dot = static_cast<T>(sum);  // rounded first, as out.add_(F.linear(h, w))
            *o = p.accumulate ? static_cast<T>(static_cast<float>(*o) + static_cast<float>(dot)) : dot;
          }
        }
      }
    }
  }
}

// Dynamic shared memory a block may opt into on the current device.
int max_shared_bytes() { return cuda::device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(); }

// Lets `kernel` use `bytes` of dynamic shared memory (past the 48 KB default) and launches it.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, unsigned blocks, size_t bytes, Args... args) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
  kernel<<<blocks, kThreads, bytes, cuda::current_stream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int64_t Q, typename T>
void qmatvec_launch(QmvParams<T> p, int64_t M) {
  using L = Layout<Q>;
  const size_t stage = size_t{kWarps} * kTileRows * L::kStageBytes;
  const size_t h_row = static_cast<size_t>(p.Kpad) * sizeof(T);
  // Rows of x per launch: a power of two up to kMaxRows whose h fits in shared memory.
  const size_t budget = static_cast<size_t>(max_shared_bytes()) - sizeof(float) * 32;  // less the static scratch
  int cap = kMaxRows;
  while (cap > 1 && cap * h_row + stage > budget) cap /= 2;
  TORCH_CHECK_VALUE(h_row + stage <= budget, "qmatvec: K=", p.K,
                    " is too long for the CUDA kernel (a row of x must fit in shared memory)");
  const int64_t tiles = cuda::ceil_div<int64_t>(p.N, kTileRows);
  const auto blocks = static_cast<unsigned>(
      std::min<int64_t>(cuda::ceil_div<int64_t>(tiles, kWarps), int64_t{kBlocksPerSM} * cuda::multiprocessor_count()));
  const T* x = p.x;
  T* out = p.out;
  for (int64_t m0 = 0; m0 < M; m0 += cap) {
    p.rows = static_cast<int>(std::min<int64_t>(cap, M - m0));
    p.x = x + m0 * (p.swiglu ? 2 * p.K : p.K);
    p.out = out + m0 * p.N;
    const size_t bytes = stage;
    switch (p.rows <= 1 ? 1 : p.rows <= 2 ? 2 : p.rows <= 4 ? 4 : 8) {  // the same sums whichever runs a row
      case 1: launch(qmatvec_kernel<Q, 1, T>, blocks, bytes + 1 * h_row, p); break;
      case 2: launch(qmatvec_kernel<Q, 2, T>, blocks, bytes + 2 * h_row, p); break;
      case 4: launch(qmatvec_kernel<Q, 4, T>, blocks, bytes + 4 * h_row, p); break;
      default: launch(qmatvec_kernel<Q, 8, T>, blocks, bytes + 8 * h_row, p); break;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// dequantize: a warp per (row, window), each lane writing its unit's 32 weights
// ---------------------------------------------------------------------------------------------

template <int64_t Q, typename T>
__global__ void __launch_bounds__(kThreads) dequantize_kernel(const Packed w, int64_t N, int64_t K, T* __restrict__ out) {
  using F = Format<Q>;
  using L = Layout<Q>;
  __shared__ __align__(16) uint8_t stages[kWarps][L::kStageBytes];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t units = w.blocks * F::kUnits, windows = cuda::ceil_div<int64_t>(units, 32);
  for (int64_t item = blockIdx.x * int64_t{kWarps} + warp; item < N * windows; item += gridDim.x * int64_t{kWarps}) {
    const int64_t n = item / windows, win = item % windows;
    Window<Q> chunk;
    chunk.load(w, n, win, lane);
    __syncwarp();  // the previous item's reads of the stage are done
    chunk.store(stages[warp], lane);
    __syncwarp();
    if (win * 32 + lane >= units) continue;
    const auto unit = F::load(stages[warp] + chunk.offset + lane / F::kUnits * L::kBlockBytes, lane % F::kUnits);
    T* o = out + n * K + win * kWindow + lane * kUnitWeights;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      float q[8], d, mn;
      group_values<Q>(unit, c, q, d, mn);
      cuda::Vec<T, 8> v;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        // Two roundings where gguf has two (d * q, then + m): no fused multiply-add.
        v.v[e] = static_cast<T>(F::kHasMin ? __fadd_rn(__fmul_rn(d, q[e]), mn) : __fmul_rn(d, q[e]));
      }
      if (reinterpret_cast<uintptr_t>(o + 8 * c) % sizeof(v) == 0) {
        *reinterpret_cast<cuda::Vec<T, 8>*>(o + 8 * c) = v;
      } else {
        for (int e = 0; e < 8; ++e) o[8 * c + e] = v.v[e];
      }
    }
  }
}

// Calls fn.template operator()<Q>() for the packed type qtype (the checks have refused the others).
template <typename Fn>
void dispatch_qtype(int64_t qtype, Fn&& fn) {
  switch (qtype) {
    case quant::kQ4_0: fn.template operator()<quant::kQ4_0>(); break;
    case quant::kQ4_1: fn.template operator()<quant::kQ4_1>(); break;
    case quant::kQ8_0: fn.template operator()<quant::kQ8_0>(); break;
    case quant::kQ4_K: fn.template operator()<quant::kQ4_K>(); break;
    case quant::kQ6_K: fn.template operator()<quant::kQ6_K>(); break;
    default: TORCH_CHECK_VALUE(false, "quant type ", qtype, " has no CUDA kernel");
  }
}

Packed packed(const at::Tensor& blocks, int64_t qtype) {
  const auto* begin = blocks.const_data_ptr<uint8_t>();
  return {begin, begin + blocks.numel(), blocks.size(1), blocks.size(1) / quant::block_bytes(qtype)};
}

}  // namespace

void qmatvec_cuda(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype, at::Tensor& out, bool accumulate,
                  const std::optional<at::Tensor>& norm, double eps, bool swiglu) {
  check_qmatvec(x, blocks, qtype, out, norm, eps, swiglu);
  const auto guard = cuda::on_device("qmatvec", blocks);
  const int64_t N = blocks.size(0), M = N ? out.numel() / N : 0;
  const int64_t K = blocks.size(1) / quant::block_bytes(qtype) * quant::block_weights(qtype);
  if (M == 0 || N == 0) return;
  if (K == 0) {  // an empty sum
    if (!accumulate) out.zero_();
    return;
  }
  ENGINE_CUDA_DISPATCH_FLOATS(x.scalar_type(), "qmatvec", [&] {
    QmvParams<scalar_t> p{packed(blocks, qtype), N, K, cuda::ceil_div<int64_t>(K, kWindow) * kWindow, 0,
                          x.const_data_ptr<scalar_t>(), norm ? norm->const_data_ptr<scalar_t>() : nullptr,
                          out.mutable_data_ptr<scalar_t>(), static_cast<float>(eps), swiglu, accumulate};
    dispatch_qtype(qtype, [&]<int64_t Q>() { qmatvec_launch<Q>(p, M); });
  });
}

void dequantize_cuda(const at::Tensor& blocks, int64_t qtype, at::Tensor& out) {
  check_dequantize(blocks, qtype, out);
  const auto guard = cuda::on_device("dequantize", blocks);
  if (out.numel() == 0) return;
  const int64_t N = out.size(0), K = out.size(1);
  ENGINE_CUDA_DISPATCH_FLOATS(out.scalar_type(), "dequantize", [&] {
    dispatch_qtype(qtype, [&]<int64_t Q>() {
      const int64_t items = N * cuda::ceil_div<int64_t>(K, kWindow);
      dequantize_kernel<Q, scalar_t><<<cuda::grid_for(items, kWarps), kThreads, 0, cuda::current_stream()>>>(
          packed(blocks, qtype), N, K, out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace engine
