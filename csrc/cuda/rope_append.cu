// The decode step's prologue in one launch: RoPE on the query (and on the key at original positions),
// then the key and value rows into their cache slots. A thread per (batch, row, pair of dims), where
// a row is one of the H query, H_kv key and H_kv value heads of the fused qkv projection.
#include "../checks.h"
#include "common.cuh"
#include "kernels.h"

namespace engine {
namespace {

constexpr int kThreads = 256;

// Products rounded before the sum (no fused multiply-add), as PyTorch's x cos + rotate_half(x) sin.
__device__ __forceinline__ void rotate_pair(float x1, float x2, const float* cos, const float* sin, int d,
                                            int half, float& y1, float& y2) {
  y1 = __fsub_rn(__fmul_rn(x1, cos[d]), __fmul_rn(x2, sin[d]));
  y2 = __fadd_rn(__fmul_rn(x2, cos[half + d]), __fmul_rn(x1, sin[half + d]));
}

template <typename q_t, typename kv_t>
__global__ void __launch_bounds__(kThreads)
    rope_append_kernel(const q_t* __restrict__ qkv, const float* __restrict__ cos, const float* __restrict__ sin,
                       const int64_t* __restrict__ slot, bool rotate_key, q_t* __restrict__ q_out,
                       kv_t* __restrict__ k_cache, kv_t* __restrict__ v_cache, int64_t B, int H, int Hkv,
                       int Hc, int64_t C, int D) {
  const int half = D / 2, rows = H + 2 * Hkv;
  const int64_t n = B * rows * half;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int d = static_cast<int>(i % half);
    const int r = static_cast<int>(i / half % rows);
    const int64_t b = i / half / rows;
    const q_t* src = qkv + (b * rows + r) * D;
    const float x1 = static_cast<float>(src[d]), x2 = static_cast<float>(src[half + d]);
    float y1 = x1, y2 = x2;
    if (r < H) {
      rotate_pair(x1, x2, cos, sin, d, half, y1, y2);
      q_t* dst = q_out + (b * H + r) * D;
      dst[d] = static_cast<q_t>(y1);
      dst[half + d] = static_cast<q_t>(y2);
      continue;
    }
    const bool is_key = r < H + Hkv;
    const int g = is_key ? r - H : r - H - Hkv;
    const int64_t s = slot[b * Hkv + g];
    CUDA_KERNEL_ASSERT_MSG(s >= 0 && s < C, "rope_append: slot must hold slot indices in [0, C)");
    kv_t* dst = (is_key ? k_cache : v_cache) + ((b * Hc + (Hc == 1 ? 0 : g)) * C + s) * D;  // Hc 1: a shared pool
    if (is_key && rotate_key) rotate_pair(x1, x2, cos, sin, d, half, y1, y2);
    dst[d] = static_cast<kv_t>(y1);
    dst[half + d] = static_cast<kv_t>(y2);
  }
}

}  // namespace

void rope_append_cuda(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                      const at::Tensor& slot, bool rotate_key, at::Tensor& q_out, at::Tensor& k_cache,
                      at::Tensor& v_cache) {
  check_rope_append(qkv, cos, sin, slot, q_out, k_cache, v_cache);
  const auto guard = cuda::on_device("rope_append", k_cache);
  const int64_t B = k_cache.size(0), C = k_cache.size(2);
  const int Hkv = static_cast<int>(slot.size(1)), Hc = static_cast<int>(k_cache.size(1));
  const int D = static_cast<int>(k_cache.size(3));
  const int H = static_cast<int>(q_out.size(1));
  const int64_t threads = B * (H + 2 * Hkv) * (D / 2);
  if (threads == 0) return;
  ENGINE_CUDA_DISPATCH_FLOATS(k_cache.scalar_type(), "rope_append", [&] {
    using kv_t = scalar_t;
    ENGINE_CUDA_DISPATCH_FLOATS(qkv.scalar_type(), "rope_append", [&] {
      rope_append_kernel<scalar_t, kv_t><<<cuda::grid_for(threads, kThreads), kThreads, 0, cuda::current_stream()>>>(
          qkv.const_data_ptr<scalar_t>(), cos.const_data_ptr<float>(), sin.const_data_ptr<float>(),
          slot.const_data_ptr<int64_t>(), rotate_key, q_out.mutable_data_ptr<scalar_t>(),
          k_cache.mutable_data_ptr<kv_t>(), v_cache.mutable_data_ptr<kv_t>(), B, H, Hkv, Hc, C, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace engine
