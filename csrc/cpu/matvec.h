// What matvec (csrc/cpu/matvec.cpp) and qmatvec (csrc/cpu/qmatvec.cpp) share: the rows the product reads
// (x through its prologue) and the split of the weight rows into chunks over threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace engine {

// Bytes of weights per chunk, the unit of work: it fits L2, so a second pass (rows 9.. of x) rereads it there.
constexpr int64_t kChunkBytes = 1 << 18;
// Bytes of weights each thread gets at least. One core does not reach the machine's read bandwidth (on the
// 2-core EPYC VM: 15-17 GB/s alone, 27-30 GB/s with both), so the matrices of a decode step are split,
// but a thread joins only for a share that pays for waking it (measured with 2 threads: 0.3 MB no
// gain, 0.6 MB 1.5x), which also keeps a many-core machine from waking all its cores for a small matrix.
constexpr int64_t kBytesPerThread = int64_t{1} << 18;
// Chunks per thread at least, when split: a thread the OS runs late leaves its share to the others.
constexpr int64_t kChunksPerThread = 4;

// run(n0, n1) for consecutive chunks [n0, n1) of the N weight rows (row_bytes bytes each), on the calling
// thread or, for a product large enough to pay for it, on threads that claim chunks as they come free.
// x_rows: the rows of x each weight row meets. A thread joins per kBytesPerThread of weights times those
// rows: 8 rows of a batched step cost the exact kernels ~3.5x one row's time (they are then bound by
// arithmetic, not by reading the weights), so a matrix too small to split for one row is split for 8.
// Each output element is computed by one thread with the same operations whatever the split: the bits
// do not depend on it.
template <typename F>
void for_row_chunks(int64_t N, int64_t row_bytes, int64_t x_rows, const F& run) {
  row_bytes = std::max<int64_t>(1, row_bytes);
  const int64_t work = N * row_bytes * std::max<int64_t>(1, x_rows);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), work / kBytesPerThread);
  const bool parallel = threads > 1 && !at::in_parallel_region();
  const int64_t chunk_bytes = parallel ? std::min(kChunkBytes, N * row_bytes / (kChunksPerThread * threads))
                                       : kChunkBytes;
  const int64_t chunk = std::max<int64_t>(1, chunk_bytes / row_bytes);  // rows
  if (!parallel) {
    for (int64_t n0 = 0; n0 < N; n0 += chunk) run(n0, std::min(N, n0 + chunk));
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t n0 = 0; n0 < N; n0 += chunk) run(n0, std::min(N, n0 + chunk));
}

// The rows the product reads: x [M, K] itself, or RMSNorm(x) with `norm`, or silu(x[:, :K]) * x[:, K:]
// of x [M, 2K] with `swiglu`, made into h on the calling thread.
template <typename T>
const T* matvec_input(const T* x, int64_t M, int64_t K, const T* norm, float eps, bool swiglu, std::vector<T>& h);

}  // namespace engine
