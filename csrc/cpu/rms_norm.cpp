// RMSNorm exactly as HF LlamaRMSNorm: normalise in fp32, cast to x's dtype, then multiply by weight.
#include <ATen/ops/empty_like.h>

#include "../checks.h"
#include "kernels.h"
#include "rms_norm.h"

#include <vector>

namespace engine {
namespace {

// Elements from which the rows are shared among threads (a prompt); a decode step's row stays on
// the calling thread: even a one-thread OpenMP team costs more than normalising it (~2 us).
constexpr int64_t kParallelElements = 32768;

template <typename T>
void rms_norm_kernel(const T* x, const T* weight, T* y, int64_t rows, int64_t dim, float eps) {
  if (rows * dim <= kParallelElements) {
    std::vector<float> buf(std::is_same_v<T, float> ? 0 : dim);  // fp32 rows are read in place
    rms_norm_rows(x, weight, y, 0, rows, dim, eps, buf.data());
    return;
  }
#pragma omp parallel
  {
    std::vector<float> buf(dim);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) rms_norm_rows(x, weight, y, r, r + 1, dim, eps, buf.data());
  }
}

}  // namespace

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm(x, weight, eps);
  at::Tensor y = at::empty_like(x);
  const int64_t dim = x.size(-1), rows = dim ? x.numel() / dim : 0;
  ENGINE_DISPATCH_FLOATS(x.scalar_type(), "rms_norm", [&] {
    rms_norm_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                              y.mutable_data_ptr<scalar_t>(), rows, dim, static_cast<float>(eps));
  });
  return y;
}

}  // namespace engine
