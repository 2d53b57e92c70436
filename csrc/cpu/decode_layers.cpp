// One decode layer for several single-sequence caches in one call: each request's rope_append then
// decode_attention, exactly those two ops' work (their checks, their bits), with the requests spread
// over the threads.
//
// Why: a batched serving step (engine/decode/batch.py) keeps one cache per request, and a request's
// attention at chat lengths is too small for decode_attention to split over threads, so one op call
// per request and layer leaves the other cores idle and pays the call's fixed cost (~20 us from Python)
// R times per layer. Here the small requests run on all threads at once; a request big enough that
// decode_attention would split it runs afterwards alone, split as it would be, so every request gets
// the bits of its own two calls. The inputs of different requests never alias (each has its own cache).
#include <omp.h>

#include <exception>
#include <vector>

#include <ATen/core/List.h>
#include <c10/util/Exception.h>

#include "kernels.h"

namespace engine {

void decode_layers_cpu(at::TensorList qkv, at::TensorList cos, at::TensorList sin, at::TensorList slot,
                       const c10::List<bool>& rotate_key, at::TensorList q_out, at::TensorList k_cache,
                       at::TensorList v_cache, at::TensorList pos, at::IntArrayRef length, double scale,
                       at::TensorList out,
                       const c10::List<std::optional<at::Tensor>>& score_acc,
                       const c10::List<std::optional<at::Tensor>>& probs_out,
                       const c10::List<std::optional<at::Tensor>>& rope_cos,
                       const c10::List<std::optional<at::Tensor>>& rope_sin,
                       const c10::List<std::optional<at::Tensor>>& rope_rank) {
  const size_t n = qkv.size();
  TORCH_CHECK_VALUE(cos.size() == n && sin.size() == n && slot.size() == n && rotate_key.size() == n &&
                        q_out.size() == n && k_cache.size() == n && v_cache.size() == n && pos.size() == n &&
                        length.size() == n && out.size() == n && score_acc.size() == n &&
                        probs_out.size() == n && rope_cos.size() == n && rope_sin.size() == n &&
                        rope_rank.size() == n,
                    "decode_layers: every list must hold one entry per request (", n, " qkv tensors)");
  const int64_t R = static_cast<int64_t>(n);
  auto one = [&](int64_t i) {
    at::Tensor qo = q_out[i], kc = k_cache[i], vc = v_cache[i], o = out[i];
    rope_append_cpu(qkv[i], cos[i], sin[i], slot[i], rotate_key.get(i), qo, kc, vc);
    decode_attention_cpu(qo, kc, vc, pos[i], length[i], scale, o, score_acc.get(i), probs_out.get(i),
                         rope_cos.get(i), rope_sin.get(i), rope_rank.get(i), std::nullopt, std::nullopt);
  };
  // Small requests first, all threads at once (a failed check is rethrown once the team is done) ...
  std::vector<int64_t> small, large;
  for (int64_t i = 0; i < R; ++i) {
    const at::Tensor& q = q_out[i];  // [B, H, D] once checked; any other shape fails its checks below
    const bool splits = q.dim() == 3 && decode_attention_splits(q.size(0) * q.size(1), length[i], q.size(2));
    (splits ? large : small).push_back(i);
  }
  std::exception_ptr failure;
  int64_t failed = R;  // the lowest failed request: its error is the one a loop of single calls would raise
  const int64_t ns = static_cast<int64_t>(small.size());
#pragma omp parallel for schedule(dynamic, 1) if (ns > 1)
  for (int64_t j = 0; j < ns; ++j) {
    try {
      one(small[j]);
    } catch (...) {
#pragma omp critical(engine_decode_layers)
      if (small[j] < failed) {
        failed = small[j];
        failure = std::current_exception();
      }
    }
  }
  if (failure) std::rethrow_exception(failure);
  // ... then each big one with every thread, as its own call would run it.
  for (const int64_t i : large) one(i);
}

}  // namespace engine
