// RMSNorm exactly as HF LlamaRMSNorm: normalise in fp32, cast to x's dtype, then multiply by weight.
// One block per row; the sum of squares is a warp-shuffle block reduction.
#include <ATen/ops/empty_like.h>

#include "../checks.h"
#include "common.cuh"
#include "kernels.h"

namespace engine {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ weight, T* __restrict__ y,
                    int64_t dim, float eps) {
  __shared__ float scratch[32];
  const T* xr = x + blockIdx.x * dim;
  T* yr = y + blockIdx.x * dim;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    const float f = static_cast<float>(xr[i]);
    ss += f * f;
  }
  ss = cuda::block_sum(ss, scratch);
  const float inv = 1.f / sqrtf(ss / static_cast<float>(dim) + eps);
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    // Two roundings, as HF: (x * inv) to x's dtype, then the product with weight.
    const T normed = static_cast<T>(static_cast<float>(xr[i]) * inv);
    yr[i] = static_cast<T>(static_cast<float>(weight[i]) * static_cast<float>(normed));
  }
}

}  // namespace

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm(x, weight, eps);
  const auto guard = cuda::on_device("rms_norm", x);
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  const int64_t dim = x.size(-1), rows = x.numel() / dim;
  ENGINE_CUDA_DISPATCH_FLOATS(x.scalar_type(), "rms_norm", [&] {
    rms_norm_kernel<scalar_t><<<static_cast<unsigned>(rows), kThreads, 0, cuda::current_stream()>>>(
        x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
        y.mutable_data_ptr<scalar_t>(), dim, static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

}  // namespace engine
