// Pieces every CUDA kernel file shares: device and stream setup, dtype dispatch, fp32 conversion of
// the cache dtypes, 16-byte vector loads, warp and block reductions.
#pragma once

// CPU builds of torch ship the c10/cuda headers without their generated cuda_cmake_macros.h, which
// only sets Windows export macros; skipping it lets `nvcc -c` check these files on such machines.
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#endif

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>

// Dispatch over the three cache dtypes (fp32, bf16, fp16) only; scalar_t is float, c10::BFloat16 or
// c10::Half, whose conversions to and from float work in device code.
#define ENGINE_CUDA_DISPATCH_FLOATS(TYPE, NAME, ...)                              \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)        \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace engine::cuda {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

// Makes the device of `t` (every tensor of the call is on it: the checks made them agree) current
// for the guard's lifetime, so kernels run on the current stream of the right device.
inline c10::cuda::CUDAGuard on_device(const char* op, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": tensors must be on a CUDA device, got ", t.device().str());
  return c10::cuda::CUDAGuard(t.device());
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// An attribute of the current device: a plain query (never a synchronisation), cached per device.
template <cudaDeviceAttr Attr>
inline int device_attribute() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};
  const int device = c10::cuda::current_device();
  int n = device < kMaxDevices ? cached[device].load(std::memory_order_relaxed) : 0;
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, Attr, device));
    if (device < kMaxDevices) cached[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// SMs of the current device.
inline int multiprocessor_count() { return device_attribute<cudaDevAttrMultiProcessorCount>(); }

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Blocks for a grid-stride loop over n items, `threads` per block (at least one: a launch needs it).
inline unsigned grid_for(int64_t n, int threads) {
  constexpr int64_t kMaxBlocks = 1 << 20;
  return static_cast<unsigned>(std::clamp<int64_t>(ceil_div<int64_t>(n, threads), 1, kMaxBlocks));
}

// ---------------------------------------------------------------------------------------------
// Device side
// ---------------------------------------------------------------------------------------------

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// N consecutive elements at p (16-byte aligned when N > 1) as fp32.
template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[N]) {
  const Vec<T, N> x = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = static_cast<float>(x.v[i]);
}

// Sum / max over aligned groups of `width` lanes (a power of two <= 32); every lane gets the result.
// Every lane of the warp must call these.
__device__ __forceinline__ float group_sum(float x, int width = 32) {
  for (int o = width / 2; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

__device__ __forceinline__ float group_max(float x, int width = 32) {
  for (int o = width / 2; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}

// Sum over the block (blockDim.x a multiple of 32); every thread gets the result. `scratch` holds
// 32 floats of shared memory; every thread of the block must call this.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  x = group_sum(x);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < warps ? scratch[lane] : 0.f;
  x = group_sum(x);
  __syncthreads();  // scratch may be reused by the caller
  return x;
}

}  // namespace engine::cuda
