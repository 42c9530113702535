// Element-wise and row-wise operations of the CPU backend (see backend/ops.h).
#include <omp.h>

#include <algorithm>
#include <cmath>

#include "backend/ops.h"
#include "core/error.h"

namespace dsv3 {

void set_num_threads(int threads) { omp_set_num_threads(threads); }

void rmsnorm(const float* x, int64_t n, int64_t dim, const float* weight, float eps, float* out) {
#pragma omp parallel for schedule(static) if (n * dim > 65536)
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = x + i * dim;
    float* oi = out + i * dim;
    double ss = 0;
    for (int64_t k = 0; k < dim; ++k) ss += double(xi[k]) * xi[k];
    const float inv = float(1.0 / std::sqrt(ss / double(dim) + double(eps)));
    for (int64_t k = 0; k < dim; ++k) oi[k] = xi[k] * inv * weight[k];
  }
}

void softmax(float* x, int64_t n) {
  if (n <= 0) return;
  const float mx = *std::max_element(x, x + n);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - mx);
    sum += x[i];
  }
  const float inv = float(1.0 / sum);
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

void silu_mul(float* gate, const float* up, int64_t n) {
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void embedding(const Mat& table, const int32_t* ids, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= table.rows)
      fail("token id ", ids[i], " is out of range [0, ", table.rows, ")");
    dequantize_rows(table, ids[i], 1, out + i * table.cols);
  }
}

}  // namespace dsv3
