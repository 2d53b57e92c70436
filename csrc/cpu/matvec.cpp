// Matrix-vector product of the decode step: out[..., N] = x[..., K] @ w[N, K]^T (F.linear without
// bias) for the few rows M of x that a decode step has, one per sequence. With `accumulate`, out +=
// the product (rounded to out's dtype first, as out.add_(F.linear(x, w)) would): the residual
// stream takes an output projection in place, with no separate add. A prologue may replace x by
// RMSNorm(x) (`norm`: the projection of a normalised row, q/k/v or gate/up) or by silu(a) * b of its
// two halves (`swiglu`: the down projection of the MLP), computed once per call on the calling thread:
// one op call where a decode step made two or four.
//
// Its time is the time to read w once, so w streams from memory in contiguous chunks of rows, each
// row against up to kMaxRows rows of x (which stay in cache), into independent 8-lane fp32
// accumulators. bf16 weights are widened as they load, at half the bytes of fp32. fp16 is exact
// too, but its portable conversion costs more than the bytes save (engine.ops.linear leaves it to
// F.linear, whose kernel has F16C).
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <type_traits>

#include "../checks.h"
#include "kernels.h"
#include "matvec.h"
#include "rms_norm.h"
#include "vec.h"

// The 8-lane helpers are all inlined, so the baseline ABI for 32-byte vectors is never used.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace engine {
namespace {

constexpr int64_t kMaxRows = 8;   // rows of x per pass over w (more rows: another pass)
// Independent accumulators per row of x: enough chains of FMAs in flight for a single row. Every row
// uses the same four, however many rows a pass has, so a row's sum order (hence its bits) does not
// depend on what else is in the batch: a request decoded with others gets the logits it gets alone.
constexpr int kAccs = 4;
// Rows of x that share each load of w in registers: 2 rows x 4 accumulators + the loaded vectors fit
// the 16 ymm registers. A pass's other rows reread the row of w from L1, where the first group left it.
constexpr int kGroupRows = 2;

// 16 consecutive elements as two fp32 vectors. bf16 splits into the even and the odd elements: a
// shift and a mask for 16 values. x and w split alike, so a dot product just sums in another order.
template <typename T>
ENGINE_INLINE void load16(const T* p, Vec8& a, Vec8& b) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    UInt8 u;
    __builtin_memcpy(&u, p, sizeof u);
    a = (Vec8)(u << 16);
    b = (Vec8)(u & 0xFFFF0000u);
  } else {
    a = load8(p);
    b = load8(p + 8);
  }
}

// acc[m][*] += the products of 16 elements of x[m] and of the weight row, from element k.
template <int MR, int A, typename T>
ENGINE_INLINE void step16(Vec8 (&acc)[MR][A], const T* x, const T* w, int64_t K, int64_t k, int a0) {
  Vec8 wa, wb;
  load16(w + k, wa, wb);
  for (int m = 0; m < MR; ++m) {
    Vec8 xa, xb;
    load16(x + m * K + k, xa, xb);
    acc[m][a0 % A] += xa * wa;
    acc[m][(a0 + 1) % A] += xb * wb;
  }
}

// out[m] = dot(x[m], w) for MR rows of x (stride K) and one row of w (out has stride N). One row
// at a time keeps the read of w one forward stream, which the hardware prefetcher follows best
// (4 rows interleaved streamed 10-15% slower).
template <int MR, bool ACC, typename T>
ENGINE_INLINE void row_dot(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ out,
                           int64_t K, int64_t N) {
  constexpr int A = kAccs;
  Vec8 acc[MR][A] = {};
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    step16<MR, A>(acc, x, w, K, k, 0);
    step16<MR, A>(acc, x, w, K, k + 16, 2);
  }
  if (k + 16 <= K) {
    step16<MR, A>(acc, x, w, K, k, 0);
    k += 16;
  }
  if (k + 8 <= K) {
    const Vec8 wv = load8(w + k);
    for (int m = 0; m < MR; ++m) acc[m][0] += load8(x + m * K + k) * wv;
    k += 8;
  }
  for (int m = 0; m < MR; ++m) {
    float tail = 0.f;
    for (int64_t j = k; j < K; ++j) tail += static_cast<float>(x[m * K + j]) * static_cast<float>(w[j]);
    Vec8 sum = acc[m][0];
    for (int i = 1; i < A; ++i) sum += acc[m][i];
    const T dot = static_cast<T>(hsum8(sum) + tail);
    out[m * N] = ACC ? static_cast<T>(static_cast<float>(out[m * N]) + static_cast<float>(dot)) : dot;
  }
}

// Rows [n0, n1) of w against MR rows of x, kGroupRows rows of x at a time per row of w.
template <int MR, bool ACC, typename T>
ENGINE_INLINE void rows_pass(const T* x, const T* w, T* out, int64_t N, int64_t K, int64_t n0,
                             int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    int m = 0;
    for (; m + kGroupRows <= MR; m += kGroupRows) {
      row_dot<kGroupRows, ACC>(x + m * K, w + n * K, out + m * N + n, K, N);
    }
    if constexpr (MR % kGroupRows != 0) row_dot<1, ACC>(x + m * K, w + n * K, out + m * N + n, K, N);
  }
}

// Columns [n0, n1) of out[M, N], every row: one pass over w's rows n0..n1 per kMaxRows rows of x.
template <bool ACC, typename T>
ENGINE_MULTIVERSION void matvec_slab(const T* x, const T* w, T* out, int64_t M, int64_t N,
                                     int64_t K, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    const T* xm = x + m0 * K;
    T* om = out + m0 * N;
    switch (std::min(kMaxRows, M - m0)) {
      case 1: rows_pass<1, ACC>(xm, w, om, N, K, n0, n1); break;
      case 2: rows_pass<2, ACC>(xm, w, om, N, K, n0, n1); break;
      case 3: rows_pass<3, ACC>(xm, w, om, N, K, n0, n1); break;
      case 4: rows_pass<4, ACC>(xm, w, om, N, K, n0, n1); break;
      case 5: rows_pass<5, ACC>(xm, w, om, N, K, n0, n1); break;
      case 6: rows_pass<6, ACC>(xm, w, om, N, K, n0, n1); break;
      case 7: rows_pass<7, ACC>(xm, w, om, N, K, n0, n1); break;
      default: rows_pass<8, ACC>(xm, w, om, N, K, n0, n1); break;
    }
  }
}

template <bool ACC, typename T>
void matvec_kernel(const T* x, const T* w, T* out, int64_t M, int64_t N, int64_t K) {
  for_row_chunks(N, K * static_cast<int64_t>(sizeof(T)), M,
                 [&](int64_t n0, int64_t n1) { matvec_slab<ACC>(x, w, out, M, N, K, n0, n1); });
}

// h[m] = silu(x[m, :K]) * x[m, K:], the silu and the product each rounded to T, as F.silu(a) * b.
// silu(a) = a / (1 + exp(-a)), written with e = exp(-|a|) so that exp only sees arguments <= 0.
template <typename T>
ENGINE_MULTIVERSION void swiglu_rows(const T* x, T* h, int64_t M, int64_t K, float* buf) {
  for (int64_t m = 0; m < M; ++m) {
    const float* a = as_float(x + m * 2 * K, buf, K);
    const float* b = as_float(x + m * 2 * K + K, buf + K, K);
    for (int64_t k = 0; k < K; k += 8) {
      const int64_t n = std::min<int64_t>(8, K - k);
      const Vec8 av = load_partial(a + k, n, 0.f);
      const Vec8 e = exp8_nonpositive(av < 0.f ? av : -av);
      float silu[8];
      store8(silu, (av < 0.f ? av * e : av) / (e + 1.f));
      for (int64_t j = 0; j < n; ++j) {
        h[m * K + k + j] = static_cast<T>(static_cast<float>(static_cast<T>(silu[j])) * b[k + j]);
      }
    }
  }
}

}  // namespace

template <typename T>
const T* matvec_input(const T* x, int64_t M, int64_t K, const T* norm, float eps, bool swiglu, std::vector<T>& h) {
  if (!norm && !swiglu) return x;
  h.resize(M * K);
  std::vector<float> buf(2 * K);
  if (norm) {
    rms_norm_rows(x, norm, h.data(), 0, M, K, eps, buf.data());
  } else {
    swiglu_rows(x, h.data(), M, K, buf.data());
  }
  return h.data();
}
template const float* matvec_input(const float*, int64_t, int64_t, const float*, float, bool, std::vector<float>&);

void matvec_cpu(const at::Tensor& x, const at::Tensor& w, at::Tensor& out, bool accumulate,
                const std::optional<at::Tensor>& norm, double eps, bool swiglu) {
  check_matvec(x, w, out, norm, eps, swiglu);
  const int64_t M = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const int64_t N = w.size(0), K = w.size(1);
  ENGINE_DISPATCH_FLOATS(w.scalar_type(), "matvec", [&] {
    std::vector<scalar_t> h;
    const scalar_t* rows = matvec_input(x.const_data_ptr<scalar_t>(), M, K,
                                        norm ? norm->const_data_ptr<scalar_t>() : nullptr,
                                        static_cast<float>(eps), swiglu, h);
    const auto kernel = accumulate ? matvec_kernel<true, scalar_t> : matvec_kernel<false, scalar_t>;
    kernel(rows, w.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), M, N, K);
  });
}

}  // namespace engine
