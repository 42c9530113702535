// The machine's read bandwidth, measured in the same run as a benchmark so that its figures
// can be given as a fraction of it: all threads sum a buffer of at least 512 MiB and twice
// the last-level cache with AVX-512 loads,
// best of `passes`. Header-only, for the benchmarks in bench/.
#pragma once
#include <immintrin.h>
// GCC 12 warns inside its own intrinsics headers (_mm512_undefined_*): false positives.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <omp.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

namespace dsv3::bench {

// At least this many bytes of copies of a matrix, and of the bandwidth probe: twice the
// last-level cache (which this machine reports as hundreds of MiB), so that every product
// reads memory.
inline int64_t working_set_mib(int64_t at_least) {
  const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
  return std::max<int64_t>(at_least, l3 > 0 ? 2 * (int64_t(l3) >> 20) : 0);
}


class Bandwidth {
 public:
  // bytes: the buffer's size (at least twice the last-level cache, so that it reads memory).
  explicit Bandwidth(size_t bytes = size_t(working_set_mib(512)) << 20) : buf_(bytes / sizeof(float)) {
#pragma omp parallel for
    for (size_t i = 0; i < buf_.size(); ++i) buf_[i] = float(i & 7);
  }
  __attribute__((target("avx512f"))) double measure(int passes) {
    double best = 0;
    const size_t n = buf_.size();
    const float* p = buf_.data();
    for (int rep = 0; rep < passes; ++rep) {
      auto t0 = std::chrono::steady_clock::now();
      float total = 0;
#pragma omp parallel reduction(+ : total)
      {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
#pragma omp for schedule(static)
        for (size_t i = 0; i < n; i += 64) {
          a0 = _mm512_add_ps(a0, _mm512_loadu_ps(p + i));
          a1 = _mm512_add_ps(a1, _mm512_loadu_ps(p + i + 16));
          a2 = _mm512_add_ps(a2, _mm512_loadu_ps(p + i + 32));
          a3 = _mm512_add_ps(a3, _mm512_loadu_ps(p + i + 48));
        }
        total += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
      }
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (total == -1) std::puts("");  // keeps the sum alive
      best = std::max(best, double(n) * 4 / s);
    }
    return best;
  }

 private:
  std::vector<float> buf_;
};

}  // namespace dsv3::bench
