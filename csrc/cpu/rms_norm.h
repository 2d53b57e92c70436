// RMSNorm of rows, exactly as HF LlamaRMSNorm: shared by the rms_norm op and matvec's norm prologue,
// so a projection of a normalised row reads the same bits either way.
#pragma once

#include <cmath>

#include "vec.h"

namespace engine {

// Rows [r0, r1) of x [*, dim] into y. buf: dim floats of scratch (unused for fp32, read in place).
template <typename T>
void rms_norm_rows(const T* x, const T* weight, T* y, int64_t r0, int64_t r1, int64_t dim, float eps,
                   float* buf) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = as_float(x + r * dim, buf, dim);
    const float inv = 1.f / std::sqrt(dot(xr, xr, dim) / static_cast<float>(dim) + eps);
    T* yr = y + r * dim;
    for (int64_t i = 0; i < dim; ++i) {
      // Two roundings, as HF: (x * inv) to x's dtype, then the product with weight.
      yr[i] = static_cast<T>(static_cast<float>(weight[i]) * static_cast<float>(static_cast<T>(xr[i] * inv)));
    }
  }
}

}  // namespace engine
