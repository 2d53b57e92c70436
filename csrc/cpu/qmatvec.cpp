// matvec and dequantize over packed GGUF blocks (csrc/quant_blocks.h): out[..., N] (+)= h[..., K] @ w[N, K]^T
// with w the blocks' weights, decoded in registers as the blocks stream past (no dequantized row is ever
// stored), fp32 activations and accumulation; h = x or its prologue, as in matvec.
//
// A 4-bit row is ~1/6 of its fp32 bytes, so the product must decode ~6x more weights per second than the
// fp32 matvec multiplies for the read to stay the limit: per group of weights that share a scale it sums
// q x in fp32 and applies the scale once (scale * sum(q x) + offset * sum(x), sum(x) per group made once
// per call). That still costs ~20 vector instructions per 32 weights: the product is compute-bound.
//
// qmatvec_q8 makes it as llama.cpp does instead: h quantized to int8 per block of 32 (one fp32 scale), integer
// dot products with the codes, the scales applied once per block; on AVX2 8 weight rows sit in the 8 lanes so
// a block's codes are decoded once for every row of x (a batched decode step's rows share them). Faster, but
// not the dequantized model's numbers any more: an explicit option (--weights packed-q8act).
//
// The kernels (qmatvec_kernels.inc) are compiled three times: for AVX2+FMA+F16C, taken at run time where the
// CPU has them; with AVX-512 VNNI's byte dot products too (256-bit vectors, AVX512-VL), which qmatvec_q8 takes
// where the CPU has them (one instruction per 4 codes for maddubs + add); and portably (plain C++ and GCC
// vectors) for every other CPU. One binary runs on any x86-64.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <string>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../quant_blocks.h"
#include "kernels.h"
#include "matvec.h"
#include "vec.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ENGINE_QUANT_HAVE_AVX2 1
#include <immintrin.h>
#endif

// The 8-lane helpers are all inlined, so the baseline ABI for 32-byte vectors is never used.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace engine {

namespace quant_portable {
#include "qmatvec_kernels.inc"
}  // namespace quant_portable

#if ENGINE_QUANT_HAVE_AVX2
// Every function defined in these regions, lambdas and template instances included, is compiled as if marked
// __attribute__((target(...))): only called after the CPU was seen to have the region's instructions. The
// VNNI copy (AVX-512 VNNI's dot product on 256-bit vectors) is taken only by qmatvec_q8.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#define ENGINE_QUANT_AVX2 1
namespace quant_avx2 {
#include "qmatvec_kernels.inc"
}  // namespace quant_avx2
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512vl,avx512vnni"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512vl,avx512vnni")
#endif
#define ENGINE_QUANT_VNNI 1
namespace quant_vnni {
#include "qmatvec_kernels.inc"
}  // namespace quant_vnni
#undef ENGINE_QUANT_VNNI
#undef ENGINE_QUANT_AVX2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace {

bool cpu_has_avx2() {
#if ENGINE_QUANT_HAVE_AVX2
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

bool cpu_has_vnni() {
#if ENGINE_QUANT_HAVE_AVX2
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return has;
#else
  return false;
#endif
}

// The instruction sets from the most capable down; set_quant_isa caps the choice at one of them.
enum Isa : int { kVnni = 0, kAvx2 = 1, kPortable = 2 };
constexpr const char* kIsaNames[] = {"avx512vnni", "avx2", "portable"};
std::atomic<int> isa_cap{kVnni};

Isa isa_in_use() {
  const int cap = isa_cap.load(std::memory_order_relaxed);
  if (cap <= kVnni && cpu_has_vnni()) return kVnni;
  if (cap <= kAvx2 && cpu_has_avx2()) return kAvx2;
  return kPortable;
}

bool use_avx2() { return isa_in_use() != kPortable; }

}  // namespace

void set_quant_isa(const std::string& isa) {
  TORCH_CHECK_VALUE(isa == "auto" || isa == "avx2" || isa == "portable",
                    "set_quant_isa: isa must be 'auto', 'avx2' or 'portable', got '", isa, "'");
  isa_cap.store(isa == "auto" ? kVnni : isa == "avx2" ? kAvx2 : kPortable);
}

std::string quant_isa() { return kIsaNames[isa_in_use()]; }

namespace {

// qmatvec_cpu's and qmatvec_q8_cpu's body: the checks, the prologue, then the product on this CPU's kernels.
template <bool kQ8Activations>
void packed_product(const char* op, const at::Tensor& x, const at::Tensor& blocks, int64_t qtype, at::Tensor& out,
                    bool accumulate, const std::optional<at::Tensor>& norm, double eps, bool swiglu) {
  check_qmatvec(x, blocks, qtype, out, norm, eps, swiglu, op);
  const int64_t M = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const int64_t N = blocks.size(0), K = blocks.size(1) / quant::block_bytes(qtype) * quant::block_weights(qtype);
  std::vector<float> h;
  const float* rows = matvec_input(x.const_data_ptr<float>(), M, K, norm ? norm->const_data_ptr<float>() : nullptr,
                                   static_cast<float>(eps), swiglu, h);
  const uint8_t* w = blocks.const_data_ptr<uint8_t>();
  float* y = out.mutable_data_ptr<float>();
#if ENGINE_QUANT_HAVE_AVX2
  const Isa isa = isa_in_use();
  if (kQ8Activations && isa == kVnni) return quant_vnni::qmatvec_q8(qtype, rows, w, y, M, N, K, accumulate);
  if (isa != kPortable) {
    return kQ8Activations ? quant_avx2::qmatvec_q8(qtype, rows, w, y, M, N, K, accumulate)
                          : quant_avx2::qmatvec(qtype, rows, w, y, M, N, K, accumulate);
  }
#endif
  kQ8Activations ? quant_portable::qmatvec_q8(qtype, rows, w, y, M, N, K, accumulate)
                 : quant_portable::qmatvec(qtype, rows, w, y, M, N, K, accumulate);
}

}  // namespace

void qmatvec_cpu(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype, at::Tensor& out, bool accumulate,
                 const std::optional<at::Tensor>& norm, double eps, bool swiglu) {
  packed_product<false>("qmatvec", x, blocks, qtype, out, accumulate, norm, eps, swiglu);
}

void qmatvec_q8_cpu(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype, at::Tensor& out, bool accumulate,
                    const std::optional<at::Tensor>& norm, double eps, bool swiglu) {
  packed_product<true>("qmatvec_q8", x, blocks, qtype, out, accumulate, norm, eps, swiglu);
}

void dequantize_cpu(const at::Tensor& blocks, int64_t qtype, at::Tensor& out) {
  check_dequantize(blocks, qtype, out);
  const int64_t N = out.size(0), K = out.size(1);
  ENGINE_DISPATCH_FLOATS(out.scalar_type(), "dequantize", [&] {
    const uint8_t* src = blocks.const_data_ptr<uint8_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
#if ENGINE_QUANT_HAVE_AVX2
    if (use_avx2()) return quant_avx2::dequantize(qtype, src, dst, N, K);
#endif
    quant_portable::dequantize(qtype, src, dst, N, K);
  });
}

}  // namespace engine
