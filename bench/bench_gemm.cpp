// The machine's float32 GEMM peak as the project reaches it: dsv3::matmul<float> (OpenBLAS
// sgemm, with the core type the backend chooses for this CPU) on square matrices, all
// threads unless --threads says otherwise, best of several runs. bench/bench_train.sh divides
// the training throughput by this figure to get MFU. Then the emulated FP8 GEMM of the
// training recipe (backend/fp8.h: E4M3 codes, 14-bit truncating accumulator promoted every
// 128) on the first size, inputs quantised beforehand, as a fraction of that peak: what
// `dsv3 train --precision fp8` pays for fidelity on the CPU. Uses the backend only.
//   bench_gemm [--threads T] [--runs R] [--sizes 2048,4096]
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "backend/fp8.h"
#include "backend/ops.h"

namespace {

struct Flags {
  int threads = 0;  // 0: OpenMP's default (all cores)
  int runs = 5;
  std::vector<int64_t> sizes = {2048, 4096};
};

Flags parse(int argc, char** argv) {
  Flags f;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : nullptr;
    if (a == "--threads" && v) f.threads = std::atoi(v), ++i;
    else if (a == "--runs" && v) f.runs = std::max(1, std::atoi(v)), ++i;
    else if (a == "--sizes" && v) {
      f.sizes.clear();
      for (const char* p = v; *p;) {
        f.sizes.push_back(std::strtoll(p, const_cast<char**>(&p), 10));
        if (*p == ',') ++p;
      }
      ++i;
    } else {
      std::fprintf(stderr, "usage: bench_gemm [--threads T] [--runs R] [--sizes 2048,4096]\n");
      std::exit(1);
    }
  }
  return f;
}

// Best GFLOP/s of `runs` calls of product (2 n^3 flops each), after one untimed warm-up.
template <typename Product>
double best_gflops(int64_t n, int runs, Product product) {
  product();
  double best = 0;
  for (int r = 0; r < runs; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    product();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 2.0 * double(n) * double(n) * double(n) / s / 1e9);
  }
  return best;
}

// n x n random inputs in [-1, 1] (sgemm) or N(0, 1) (fp8).
std::vector<float> random_matrix(int64_t n, bool normal, uint32_t seed) {
  std::vector<float> v(size_t(n * n));
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::normal_distribution<float> g(0.0f, 1.0f);
  for (float& x : v) x = normal ? g(rng) : u(rng);
  return v;
}

// y[n, n] = x[n, n] w[n, n]^T through dsv3::matmul<float>.
double sgemm_gflops(int64_t n, int runs) {
  const std::vector<float> x = random_matrix(n, false, 7), w = random_matrix(n, false, 8);
  std::vector<float> y(size_t(n * n));
  return best_gflops(n, runs, [&] { dsv3::matmul<float>(x.data(), w.data(), y.data(), n, n, n); });
}

// The emulated FP8 GEMM on n x n E4M3 inputs (1x128 tiles, 128x128 blocks), quantised beforehand.
double fp8_gflops(int64_t n, int runs) {
  const std::vector<float> x = random_matrix(n, true, 7), w = random_matrix(n, true, 8);
  const dsv3::Fp8Tensor xq = dsv3::quantize(x.data(), n, n, dsv3::Fp8Tiling::row_tiles_1x128);
  const dsv3::Fp8Tensor wq = dsv3::quantize(w.data(), n, n, dsv3::Fp8Tiling::blocks_128x128);
  std::vector<float> y(size_t(n * n));
  return best_gflops(n, runs, [&] { dsv3::fp8_gemm(xq, wq, y.data()); });
}

}  // namespace

int main(int argc, char** argv) {
  const Flags f = parse(argc, argv);
  if (f.threads > 0) omp_set_num_threads(f.threads);
  double peak = 0;
  for (int64_t n : f.sizes) {
    const double g = sgemm_gflops(n, f.runs);
    std::printf("sgemm %ld x %ld x %ld: %.1f GFLOP/s (best of %d)\n", long(n), long(n), long(n), g, f.runs);
    peak = std::max(peak, g);
  }
  // backend_info() after the first product: the BLAS core is known once it is loaded.
  std::printf("backend: %s\n", dsv3::backend_info().c_str());
  std::printf("peak: %.1f GFLOP/s fp32 (%d threads)\n", peak, omp_get_max_threads());
  const int64_t n = f.sizes.front();
  const double fp8 = fp8_gflops(n, f.runs);
  std::printf("fp8 emulated (E4M3, 14-bit truncating accumulator, N_C 128) %ld x %ld x %ld: %.1f GFLOP/s = %.3f of the "
              "fp32 peak\n",
              long(n), long(n), long(n), fp8, fp8 / peak);
  return 0;
}
