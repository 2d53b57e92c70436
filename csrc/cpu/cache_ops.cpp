// Per-slot cache maintenance: value norms at insertion, victim choice, compaction, value merge.
// All are per (batch, KV head) rows of the slot cache; threads split rows when there is enough work.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "../checks.h"
#include "kernels.h"
#include "vec.h"

namespace engine {
namespace {

constexpr int64_t kParallelWork = 32768;  // elements below which threads cost more than they save
constexpr float kNormEps = 1e-8f;  // nearest_key: the least norm a key counts with (F.cosine_similarity's eps)

// NaN propagates, as torch.amax does.
inline float abs_max(const float* __restrict__ x, int64_t n) {
  float m = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(x[i]);
    if (std::isnan(a)) return a;
    m = a > m ? a : m;
  }
  return m;
}

// Is (score a, pos pa) a better victim than (b, pb)? Lower score first, NaN above every number,
// ties to the lower position.
inline bool better(float a, int32_t pa, float b, int32_t pb) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na != nb) return nb;
  if (!na && a != b) return a < b;
  return pa < pb;
}

template <typename T>
void value_norm_kernel(const T* v, int64_t kind, float* out, int64_t rows, int64_t D) {
#pragma omp parallel if (rows * D > kParallelWork)
  {
    std::vector<float> buf(D);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* x = as_float(v + r * D, buf.data(), D);
      float s = 0.f;
      if (kind == 0) {
        s = abs_max(x, D);
      } else if (kind == 1) {
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < D; ++i) s += std::fabs(x[i]);
      } else {
        s = dot(x, x, D);
      }
      out[r] = s;
    }
  }
}

}  // namespace

void value_norm_cpu(const at::Tensor& v, int64_t kind, at::Tensor& out) {
  check_value_norm(v, kind, out);
  const int64_t rows = v.size(0) * v.size(1) * v.size(2), D = v.size(3);
  ENGINE_DISPATCH_FLOATS(v.scalar_type(), "value_norm", [&] {
    value_norm_kernel<scalar_t>(v.const_data_ptr<scalar_t>(), kind, out.mutable_data_ptr<float>(), rows, D);
  });
}

void select_victim_cpu(const at::Tensor& score, const at::Tensor& pos, int64_t lo, int64_t hi,
                       at::Tensor& out_idx) {
  check_select_victim(score, pos, out_idx);
  const int64_t rows = score.size(0) * score.size(1), C = score.size(2);
  const float* sc = score.const_data_ptr<float>();
  const int32_t* ps = pos.const_data_ptr<int32_t>();
  int64_t* out = out_idx.mutable_data_ptr<int64_t>();
#pragma omp parallel for schedule(static) if (rows * C > kParallelWork)
  for (int64_t r = 0; r < rows; ++r) {
    int64_t best = -1;
    for (int64_t s = 0; s < C; ++s) {
      const int32_t p = ps[r * C + s];
      if (p < lo || p >= hi) continue;
      if (best < 0 || better(sc[r * C + s], p, sc[r * C + best], ps[r * C + best])) best = s;
    }
    out[r] = best;
  }
}

// Per row: each head's valid count and score total (fp64, rounded to fp32; 1 unless positive), each
// head's k lowest eligible keys score / total in (key, slot) order, then n picks of the lowest head front
// (ties to the lower head), a head giving at most count - min_share.
void adaptive_victims_cpu(const at::Tensor& score, const at::Tensor& pos, int64_t lo, const at::Tensor& hi,
                          int64_t min_share, const at::Tensor& limit, at::Tensor& out_entry) {
  check_adaptive_victims(score, pos, hi, limit, out_entry);
  const int64_t B = score.size(0), Hkv = score.size(1), C = score.size(2), n = out_entry.size(1);
  const int64_t k = std::min(n, C), top = hi.const_data_ptr<int64_t>()[0], first = std::max<int64_t>(lo, 0);
  const float* __restrict__ sc = score.const_data_ptr<float>();
  const int32_t* __restrict__ ps = pos.const_data_ptr<int32_t>();
  const int64_t* lim = limit.const_data_ptr<int64_t>();
  int64_t* out = out_entry.mutable_data_ptr<int64_t>();
#pragma omp parallel if (B * Hkv * C > kParallelWork)
  {
    std::vector<float> key(Hkv * k);
    std::vector<int64_t> slot(Hkv * k), len(Hkv), room(Hkv), next(Hkv);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      int64_t held = 0;
      for (int64_t g = 0; g < Hkv; ++g) {
        const float* __restrict__ sr = sc + (b * Hkv + g) * C;
        const int32_t* __restrict__ pr = ps + (b * Hkv + g) * C;
        // branch-free (valid and empty slots interleave), 8 independent chains of fp64 adds
        double part[8] = {};
        int64_t count = 0, s = 0;
        for (; s + 8 <= C; s += 8) {
#pragma GCC unroll 8
          for (int j = 0; j < 8; ++j) {
            const bool valid = pr[s + j] >= 0;
            count += valid;
            part[j] += valid ? static_cast<double>(sr[s + j]) : 0.0;
          }
        }
        for (int j = 0; s < C; ++s, ++j) {
          const bool valid = pr[s] >= 0;
          count += valid;
          part[j] += valid ? static_cast<double>(sr[s]) : 0.0;
        }
        const double sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
        float total = static_cast<float>(sum);
        total = total > 0.f ? total : 1.f;
        float* kg = key.data() + g * k;
        int64_t* sg = slot.data() + g * k;
        int64_t m = 0;  // kg[0..m) ascending, ties in slot order
        // score / total does not decrease with score (total > 0): a score not below the raw score of the
        // k-th kept one cannot enter, and needs no division
        float raw_last = std::numeric_limits<float>::infinity();
        const int64_t scan = k > 0 ? C : 0;
        for (int64_t s = 0; s < scan; ++s) {
          const bool eligible = (pr[s] >= first) & (pr[s] <= top);
          if (__builtin_expect(!(eligible & ((m < k) | (sr[s] < raw_last))), 1)) continue;
          const float x = sr[s] / total;
          if (!std::isfinite(x) || (m == k && !(x < kg[m - 1]))) continue;
          int64_t i = m < k ? m++ : k - 1;
          for (; i > 0 && x < kg[i - 1]; --i) kg[i] = kg[i - 1], sg[i] = sg[i - 1];
          kg[i] = x;
          sg[i] = s;
          if (m == k) raw_last = sr[sg[k - 1]];
        }
        len[g] = m;
        room[g] = count - min_share;
        next[g] = 0;
        held += count;
      }
      int64_t* ob = out + b * n;
      for (int64_t i = 0; i < n; ++i) {
        int64_t best = -1;
        if (held > lim[b]) {
          for (int64_t g = 0; g < Hkv; ++g) {
            if (next[g] >= len[g] || next[g] >= room[g]) continue;
            if (best < 0 || key[g * k + next[g]] < key[best * k + next[best]]) best = g;
          }
        }
        ob[i] = best < 0 ? -1 : best * C + slot[best * k + next[best]++];
      }
    }
  }
}

void compact_cpu(at::Tensor& k, at::Tensor& v, at::Tensor& pos, at::TensorList state,
                 const at::Tensor& keep_idx) {
  check_compact(k, v, pos, state, keep_idx);
  const int64_t rows = k.size(0) * k.size(1), C = k.size(2), D = k.size(3), K = keep_idx.size(2);
  check_compact_indices(keep_idx, C);
  const int64_t* keep = keep_idx.const_data_ptr<int64_t>();
  int32_t* ps = pos.mutable_data_ptr<int32_t>();
  std::vector<float*> st;
  for (const auto& t : state) st.push_back(t.mutable_data_ptr<float>());
  const int64_t row_bytes = D * static_cast<int64_t>(k.element_size());
  char* kp = static_cast<char*>(k.mutable_data_ptr());
  char* vp = static_cast<char*>(v.mutable_data_ptr());
  // A kept slot may land on a slot whose content is still to be moved: gather each (b, g) row into
  // a scratch copy first, then write it back to the front.
#pragma omp parallel if (rows * C * D > kParallelWork)
  {
    std::vector<char> kbuf(K * row_bytes), vbuf(K * row_bytes);
    std::vector<int32_t> pbuf(K);
    std::vector<float> sbuf(K);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t* kr = keep + r * K;
      char* kb = kp + r * C * row_bytes;
      char* vb = vp + r * C * row_bytes;
      for (int64_t i = 0; i < K; ++i) {
        std::memcpy(kbuf.data() + i * row_bytes, kb + kr[i] * row_bytes, row_bytes);
        std::memcpy(vbuf.data() + i * row_bytes, vb + kr[i] * row_bytes, row_bytes);
      }
      std::memcpy(kb, kbuf.data(), K * row_bytes);
      std::memcpy(vb, vbuf.data(), K * row_bytes);
      std::memset(kb + K * row_bytes, 0, (C - K) * row_bytes);  // all-zero bits = 0 in every dtype
      std::memset(vb + K * row_bytes, 0, (C - K) * row_bytes);
      int32_t* pr = ps + r * C;
      for (int64_t i = 0; i < K; ++i) pbuf[i] = pr[kr[i]];
      std::copy(pbuf.begin(), pbuf.end(), pr);
      std::fill(pr + K, pr + C, -1);
      for (float* s : st) {
        float* sr = s + r * C;
        for (int64_t i = 0; i < K; ++i) sbuf[i] = sr[kr[i]];
        std::copy(sbuf.begin(), sbuf.end(), sr);
        std::fill(sr + K, sr + C, 0.f);
      }
    }
  }
}

namespace {

// The WeightedKV merge of one row: vr = (w_old vr + add vj) / (w_old + add), in fp32, the plain mean when
// that sum is 0 (the formula would divide 0 by 0); returns the sum (the receiver's new weight). buf: 3 D floats.
template <typename T>
float merge_row(T* vr, const T* vj, float w_old, float add, int64_t D, float* buf) {
  const float* a = as_float(vr, buf, D);
  const float* b = as_float(vj, buf + D, D);
  float* res = buf + 2 * D;
  const float total = w_old + add;
  for (int64_t i = 0; i < D; ++i) res[i] = total == 0.f ? (a[i] + b[i]) * 0.5f : (w_old * a[i] + add * b[i]) / total;
  store_float(res, vr, D);
  return total;
}

// The row of v holding slot s of (batch, KV head) row r of C slots: its own (r C + s), or with a slot index
// the pool row it names, in pool batch r / Hkv % P. op names the caller in the error for a bad pool row.
struct SlotRows {
  const char* op;
  const char* slots;  // which slots the error names: "merged", "compared"
  const int32_t* index;  // nullptr: v is [B, H_kv, C, D]
  int64_t Hkv, C, P, R;

  int64_t operator()(int64_t r, int64_t s) const {
    if (!index) return r * C + s;
    const int64_t x = index[r * C + s];
    TORCH_CHECK_INDEX(x >= 0 && x < R, op, ": slot_index must hold pool rows in [0, R) = [0, ", R,
                      ") on the ", slots, " slots, got ", x, " at [", r / Hkv, ", ", r % Hkv, ", ", s, "]");
    return (r / Hkv % P) * R + x;
  }
};

SlotRows slot_rows(const char* op, const char* slots, const at::Tensor& v, const std::optional<at::Tensor>& slot_index,
                   int64_t Hkv, int64_t C) {
  return {op, slots, slot_index ? slot_index->const_data_ptr<int32_t>() : nullptr, Hkv, C, v.size(0),
          slot_index ? v.size(1) : 0};
}

// Each row's picks in order (row b, then pick i): f(o, r, j, pr) for a pick whose entry (head C + slot) is a
// slot holding a token, with o = b n + i its output index, r its (batch, KV head) row, j the victim's slot and
// pr that row's C positions. A pick of -1 or of an empty slot (an earlier pick's) is skipped: its output
// keeps what the caller filled in.
template <typename F>
void for_each_pick(const int64_t* picks, int32_t* pos, int64_t B, int64_t n, int64_t Hkv, int64_t C, F&& f) {
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t e = picks[b * n + i];
      if (e < 0) continue;
      const int64_t r = b * Hkv + e / C, j = e % C;
      int32_t* pr = pos + r * C;
      if (pr[j] >= 0) f(b * n + i, r, j, pr);
    }
  }
}

}  // namespace

// One row at a time: which entries free a row is decided before any is written (a repeat frees nothing).
void remove_entries_cpu(at::Tensor& pos, at::TensorList state, std::optional<at::Tensor> slot_index,
                        const at::Tensor& entries, int64_t scratch, at::Tensor& freed_out) {
  check_remove_entries(pos, state, slot_index, entries, scratch, freed_out);
  const int64_t B = pos.size(0), Hkv = pos.size(1), C = pos.size(2), n = entries.size(1);
  check_index_range("remove_entries", "entries", entries, Hkv * C, "entries (head C + slot)");
  const int64_t* en = entries.const_data_ptr<int64_t>();
  int32_t* ps = pos.mutable_data_ptr<int32_t>();
  int32_t* index = slot_index ? slot_index->mutable_data_ptr<int32_t>() : nullptr;
  int64_t* out = freed_out.mutable_data_ptr<int64_t>();
  std::vector<float*> st;
  for (const at::Tensor& s : state) st.push_back(s.mutable_data_ptr<float>());
  std::unique_ptr<bool[]> frees(new bool[n]);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* e = en + b * n;
    const int64_t base = b * Hkv * C;
    int64_t count = 0;
    for (int64_t i = 0; i < n; ++i) {
      frees[i] = index && e[i] >= 0 && index[base + e[i]] != scratch && std::find(e, e + i, e[i]) == e + i;
      count += frees[i];
    }
    for (int64_t i = 0; i < n; ++i) {
      if (frees[i]) out[b * n + freed_rank(e, frees.get(), n, C, i)] = index[base + e[i]];
    }
    for (int64_t i = count; i < n; ++i) out[b * n + i] = -1;
    for (int64_t i = 0; i < n; ++i) {
      if (e[i] < 0) continue;
      ps[base + e[i]] = -1;
      for (float* s : st) s[base + e[i]] = 0.f;
      if (index) index[base + e[i]] = static_cast<int32_t>(scratch);
    }
  }
}

void merge_value_cpu(at::Tensor& v, at::Tensor& w, const at::Tensor& victim,
                     const at::Tensor& receiver, const at::Tensor& weight,
                     const std::optional<at::Tensor>& slot_index) {
  check_merge_value(v, w, victim, receiver, weight, slot_index);
  const int64_t Hkv = w.size(1), rows = w.size(0) * Hkv, C = w.size(2), D = v.size(-1);
  check_index_range("merge_value", "victim", victim, C, "slot indices");
  check_index_range("merge_value", "receiver", receiver, C, "slot indices");
  const int64_t* vic = victim.const_data_ptr<int64_t>();
  const int64_t* rec = receiver.const_data_ptr<int64_t>();
  const float* wt = weight.const_data_ptr<float>();
  float* wp = w.mutable_data_ptr<float>();
  const SlotRows row_of = slot_rows("merge_value", "merged", v, slot_index, Hkv, C);
  ENGINE_DISPATCH_FLOATS(v.scalar_type(), "merge_value", [&] {
    scalar_t* vp = v.mutable_data_ptr<scalar_t>();
    std::vector<float> buf(3 * D);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t j = vic[r], m = rec[r];
      if (j < 0 || m < 0) continue;
      scalar_t* vr = vp + row_of(r, m) * D;  // the receiver's row is checked first, then the victim's
      wp[r * C + m] = merge_row(vr, vp + row_of(r, j) * D, wp[r * C + m], wt[r], D, buf.data());
    }
  });
}

// Each row's picks in order (one thread: the rows are few, and rows that share a pool batch may not be
// split between threads without proving their pool rows distinct).
void merge_neighbour_cpu(at::Tensor& v, at::Tensor& w, at::Tensor& pos, const at::Tensor& abar,
                         const at::Tensor& picks, int64_t sinks, bool after, at::Tensor& receiver_out,
                         const std::optional<at::Tensor>& slot_index) {
  check_merge_neighbour(v, w, pos, abar, picks, sinks, receiver_out, slot_index);
  const int64_t B = w.size(0), Hkv = w.size(1), C = w.size(2), D = v.size(-1), n = picks.size(1);
  check_index_range("merge_neighbour", "picks", picks, Hkv * C, "entries (head C + slot)");
  const int64_t* pk = picks.const_data_ptr<int64_t>();
  const float* ab = abar.const_data_ptr<float>();
  float* wp = w.mutable_data_ptr<float>();
  int32_t* ps = pos.mutable_data_ptr<int32_t>();
  int64_t* out = receiver_out.mutable_data_ptr<int64_t>();
  const SlotRows row_of = slot_rows("merge_neighbour", "merged", v, slot_index, Hkv, C);
  ENGINE_DISPATCH_FLOATS(v.scalar_type(), "merge_neighbour", [&] {
    scalar_t* vp = v.mutable_data_ptr<scalar_t>();
    std::vector<float> buf(3 * D);
    std::fill(out, out + B * n, -1);
    for_each_pick(pk, ps, B, n, Hkv, C, [&](int64_t o, int64_t r, int64_t j, int32_t* pr) {
      const int32_t pj = pr[j];
      // the nearest kept non-sink positions above and below the victim's (ties: the lower slot)
      int64_t above = -1, below = -1;
      int32_t p_above = std::numeric_limits<int32_t>::max(), p_below = -1;
      for (int64_t s = 0; s < C; ++s) {
        const int32_t p = pr[s];
        if (s == j || p < sinks) continue;  // sinks >= 0: an empty slot (-1) too
        if (p > pj && p < p_above) p_above = p, above = s;
        if (p < pj && p > p_below) p_below = p, below = s;
      }
      const int64_t m = after ? (above >= 0 ? above : below) : (below >= 0 ? below : above);
      pr[j] = -1;
      if (m < 0) return;
      out[o] = m;
      float* wr = wp + r * C + m;
      const float w_old = *wr == 0.f ? ab[r * C + m] : *wr;  // a first merge starts from its own average
      scalar_t* vr = vp + row_of(r, m) * D;  // the receiver's row is checked first, then the victim's
      *wr = merge_row(vr, vp + row_of(r, j) * D, w_old, ab[r * C + j], D, buf.data());
    });
  });
}

// Each row's picks in order, one thread (as merge_neighbour). A pick's receivers: the candidates above the
// victim's position, the `window` lowest by (position, slot) first, in that order.
void merge_spread_cpu(at::Tensor& v, at::Tensor& pos, const at::Tensor& abar, const at::Tensor& picks, int64_t sinks,
                      int64_t window, at::Tensor& receivers_out, const std::optional<at::Tensor>& slot_index) {
  check_merge_spread(v, pos, abar, picks, sinks, window, receivers_out, slot_index);
  const int64_t B = pos.size(0), Hkv = pos.size(1), C = pos.size(2), D = v.size(-1), n = picks.size(1);
  check_index_range("merge_spread", "picks", picks, Hkv * C, "entries (head C + slot)");
  const int64_t* pk = picks.const_data_ptr<int64_t>();
  const float* ab = abar.const_data_ptr<float>();
  int32_t* ps = pos.mutable_data_ptr<int32_t>();
  int64_t* out = receivers_out.mutable_data_ptr<int64_t>();
  const SlotRows row_of = slot_rows("merge_spread", "merged", v, slot_index, Hkv, C);
  ENGINE_DISPATCH_FLOATS(v.scalar_type(), "merge_spread", [&] {
    scalar_t* vp = v.mutable_data_ptr<scalar_t>();
    std::vector<float> buf(3 * D);
    std::vector<std::pair<int32_t, int32_t>> cand;  // (position, slot)
    cand.reserve(C);
    std::fill(out, out + B * n, 0);
    for_each_pick(pk, ps, B, n, Hkv, C, [&](int64_t o, int64_t r, int64_t j, int32_t* pr) {
      const int32_t pj = pr[j];
      cand.clear();
      for (int64_t s = 0; s < C; ++s) {
        if (pr[s] > pj && pr[s] >= sinks) cand.emplace_back(pr[s], static_cast<int32_t>(s));
      }
      const int64_t m = std::min<int64_t>(window, static_cast<int64_t>(cand.size()));
      std::partial_sort(cand.begin(), cand.begin() + m, cand.end());
      pr[j] = -1;
      out[o] = m;
      if (m == 0) return;
      float sum = 0.f;
      for (int64_t t = 0; t < m; ++t) sum += ab[r * C + cand[t].second];
      const float ratio = ab[r * C + j] / (sum / static_cast<float>(m));
      const float p = std::isnan(ratio) ? 0.f : std::min(std::max(ratio, 0.f), 1.f);
      const float share = p / static_cast<float>(window);
      const float* vj = as_float(vp + row_of(r, j) * D, buf.data(), D);  // never a receiver: read once
      float* res = buf.data() + 2 * D;
      for (int64_t t = 0; t < m; ++t) {
        scalar_t* vr = vp + row_of(r, cand[t].second) * D;
        const float* a = as_float(vr, buf.data() + D, D);
        for (int64_t d = 0; d < D; ++d) res[d] = a[d] + share * vj[d];
        store_float(res, vr, D);
      }
    });
  });
}

namespace {

// Slots ahead of the one compared whose key row is requested from memory: the search reads every key of a
// head once, cold (the weights streamed since), and a pooled head's rows may lie anywhere in the layer's
// pool, where the hardware prefetcher cannot follow them.
constexpr int64_t kSearchAhead = 8;

template <typename T>
inline void prefetch_row(const T* row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(p + b);
}

// The other slot of (batch, KV head) row r holding a non-sink token whose key is the most cosine-similar to
// kj (slot j's key, in fp32), -1 if none; its similarity in *sim (-inf if none). Ties: the lower slot; NaN
// never wins. buf: D floats.
template <typename T>
int64_t most_similar(const T* k, const int32_t* pr, int64_t j, const float* kj, int64_t sinks, const SlotRows& row_of,
                     int64_t r, int64_t C, int64_t D, float* buf, float* sim) {
  const float nj = std::max(std::sqrt(dot(kj, kj, D)), kNormEps);
  int64_t best = -1;
  *sim = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < C; ++s) {
    if (s + kSearchAhead < C && pr[s + kSearchAhead] >= sinks) prefetch_row(k + row_of(r, s + kSearchAhead) * D, D);
    if (s == j || pr[s] < sinks) continue;  // sinks >= 0: an empty slot (-1) too
    const auto [ss, sj] = dots(as_float(k + row_of(r, s) * D, buf, D), kj, D);
    const float c = sj / (std::max(std::sqrt(ss), kNormEps) * nj);
    if (c > *sim || (best < 0 && !std::isnan(c))) *sim = c, best = s;
  }
  return best;
}

// The slot of each victim's KV head whose key is the most cosine-similar to the victim's, one (batch, KV
// head) row per thread iteration: a row reads only its own keys. Pool rows were checked beforehand.
template <typename T>
void nearest_key_rows(const T* k, const int32_t* ps, const int64_t* vic, int64_t sinks, int64_t* out, float* sim,
                      const SlotRows& row_of, int64_t rows, int64_t C, int64_t D, bool parallel) {
#pragma omp parallel if (parallel)
  {
    std::vector<float> bj(D), bs(D);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t j = vic[r];
      out[r] = -1;
      sim[r] = -std::numeric_limits<float>::infinity();
      if (j < 0) continue;
      const float* kj = as_float(k + row_of(r, j) * D, bj.data(), D);
      out[r] = most_similar(k, ps + r * C, j, kj, sinks, row_of, r, C, D, bs.data(), sim + r);
    }
  }
}

// KeepKV's ZIP merge of victim row (kj, vj) into receiver row (kc, vc) for reference query q: the merged
// key and value over the receiver's rows, its log votes returned. buf: 4 D floats.
template <typename T>
float zip_rows(const float* kj, const T* vj, T* kc, T* vc, const float* q, float lp_e, float lp_c, float scale,
               int64_t D, float* buf) {
  const float* ke = kj;
  const float* kr = as_float(kc, buf, D);
  const float* ve = as_float(vj, buf + D, D);
  const float* vr = as_float(vc, buf + 2 * D, D);
  float* out = buf + 3 * D;
  const float le = lp_e + scale * dot(q, ke, D), lc = lp_c + scale * dot(q, kr, D);  // log w_e, log w_c
  const float top = std::max(le, lc);
  const float w_e = std::exp(le - top), w_c = std::exp(lc - top), total = w_e + w_c;
  const float lp_r = std::max(lp_e, lp_c) + std::log1p(std::exp(-std::fabs(lp_e - lp_c)));
  const float target = (top + std::log(total) - lp_r) / scale;  // the q.k_r that gives p_r exp(s_r) = w_e + w_c
  for (int64_t d = 0; d < D; ++d) out[d] = (w_e * ve[d] + w_c * vr[d]) / total;
  store_float(out, vc, D);
  for (int64_t d = 0; d < D; ++d) out[d] = (w_e * ke[d] + w_c * kr[d]) / total;  // the weighted mean key
  const float qq = dot(q, q, D);
  const float a = qq > 0.f ? (target - dot(q, out, D)) / std::max(qq, 1e-30f) : 0.f;
  for (int64_t d = 0; d < D; ++d) out[d] += a * q[d];
  store_float(out, kc, D);
  return lp_r;
}

}  // namespace

void nearest_key_cpu(const at::Tensor& k, const at::Tensor& pos, const at::Tensor& victim, int64_t sinks,
                     at::Tensor& receiver_out, at::Tensor& similarity_out,
                     const std::optional<at::Tensor>& slot_index) {
  check_nearest_key(k, pos, victim, sinks, receiver_out, similarity_out, slot_index);
  const int64_t Hkv = pos.size(1), rows = pos.size(0) * Hkv, C = pos.size(2), D = k.size(-1);
  check_index_range("nearest_key", "victim", victim, C, "slot indices");
  const int32_t* ps = pos.const_data_ptr<int32_t>();
  const int64_t* vic = victim.const_data_ptr<int64_t>();
  const SlotRows row_of = slot_rows("nearest_key", "compared", k, slot_index, Hkv, C);
  int64_t work = 0;  // and the pool rows of every compared slot checked before any thread starts
  for (int64_t r = 0; r < rows; ++r) {
    if (vic[r] < 0) continue;
    work += C * D;
    for (int64_t s = 0; s < C; ++s) {
      if (s == vic[r] || ps[r * C + s] >= sinks) row_of(r, s);
    }
  }
  ENGINE_DISPATCH_FLOATS(k.scalar_type(), "nearest_key", [&] {
    nearest_key_rows(k.const_data_ptr<scalar_t>(), ps, vic, sinks, receiver_out.mutable_data_ptr<int64_t>(),
                     similarity_out.mutable_data_ptr<float>(), row_of, rows, C, D, work > kParallelWork);
  });
}

// Each row's picks in order, one thread (as merge_neighbour).
void merge_zip_cpu(at::Tensor& k, at::Tensor& v, at::Tensor& logp, at::Tensor& pos, const at::Tensor& q,
                   const at::Tensor& picks, int64_t sinks, double min_similarity, double scale,
                   at::Tensor& receiver_out, const std::optional<at::Tensor>& slot_index) {
  check_merge_zip(k, v, logp, pos, q, picks, sinks, min_similarity, scale, receiver_out, slot_index);
  const int64_t B = pos.size(0), Hkv = pos.size(1), C = pos.size(2), D = k.size(-1), n = picks.size(1);
  check_index_range("merge_zip", "picks", picks, Hkv * C, "entries (head C + slot)");
  const int64_t* pk = picks.const_data_ptr<int64_t>();
  const float* qp = q.const_data_ptr<float>();
  float* lp = logp.mutable_data_ptr<float>();
  int32_t* ps = pos.mutable_data_ptr<int32_t>();
  int64_t* out = receiver_out.mutable_data_ptr<int64_t>();
  const SlotRows row_of = slot_rows("merge_zip", "compared", k, slot_index, Hkv, C);
  ENGINE_DISPATCH_FLOATS(k.scalar_type(), "merge_zip", [&] {
    scalar_t* kp = k.mutable_data_ptr<scalar_t>();
    scalar_t* vp = v.mutable_data_ptr<scalar_t>();
    std::vector<float> kj_buf(D), buf(4 * D);
    std::fill(out, out + B * n, -1);
    for_each_pick(pk, ps, B, n, Hkv, C, [&](int64_t o, int64_t r, int64_t j, int32_t* pr) {
      const int64_t jrow = row_of(r, j);
      const float* kj = as_float(kp + jrow * D, kj_buf.data(), D);
      float sim;
      const int64_t c = most_similar(kp, pr, j, kj, sinks, row_of, r, C, D, buf.data(), &sim);
      pr[j] = -1;
      if (c < 0 || !(sim >= static_cast<float>(min_similarity))) return;
      out[o] = c;
      const int64_t crow = row_of(r, c);
      lp[r * C + c] = zip_rows(kj, vp + jrow * D, kp + crow * D, vp + crow * D, qp + r * D, lp[r * C + j],
                               lp[r * C + c], static_cast<float>(scale), D, buf.data());
    });
  });
}

}  // namespace engine
