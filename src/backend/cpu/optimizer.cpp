// The optimiser's element loops on the CPU (see backend/optimizer.h): OpenMP over pieces of
// at most kPiece elements of all tensors at once.
#include "backend/optimizer.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/dtype.h"

namespace dsv3 {

namespace {

struct Piece {
  size_t tensor;
  int64_t begin, end;
};

// The pieces of `count` tensors, in the calling thread's list, kept from call to call so an
// optimiser step allocates nothing; the threads share it through the returned reference.
template <typename Size>
const std::vector<Piece>& pieces(size_t count, Size size_of) {
  constexpr int64_t kPiece = 16384;
  thread_local std::vector<Piece> out;
  out.clear();
  for (size_t t = 0; t < count; ++t)
    for (int64_t b = 0; b < size_of(t); b += kPiece) out.push_back({t, b, std::min(size_of(t), b + kPiece)});
  return out;
}

const std::vector<Piece>& span_pieces(const FloatSpan* spans, size_t count) {
  return pieces(count, [&](size_t t) { return spans[t].n; });
}

}  // namespace

double sum_of_squares(const FloatSpan* spans, size_t count) {
  const std::vector<Piece>& work = span_pieces(spans, count);
  thread_local std::vector<double> part_kept;  // per piece, then added in order
  std::vector<double>& part = part_kept;
  part.resize(work.size());
#pragma omp parallel for schedule(dynamic, 8)
  for (size_t q = 0; q < work.size(); ++q) {
    const float* x = spans[work[q].tensor].data;
    double ss = 0;
    for (int64_t i = work[q].begin; i < work[q].end; ++i) ss += double(x[i]) * x[i];
    part[q] = ss;
  }
  double ss = 0;
  for (double v : part) ss += v;
  return ss;
}

void scale_spans(const FloatSpan* spans, size_t count, float k) {
  const std::vector<Piece>& work = span_pieces(spans, count);
#pragma omp parallel for schedule(dynamic, 8)
  for (size_t q = 0; q < work.size(); ++q) {
    float* x = spans[work[q].tensor].data;
    for (int64_t i = work[q].begin; i < work[q].end; ++i) x[i] *= k;
  }
}

void zero_spans(const FloatSpan* spans, size_t count) {
  const std::vector<Piece>& work = span_pieces(spans, count);
#pragma omp parallel for schedule(dynamic, 8)
  for (size_t q = 0; q < work.size(); ++q) {
    float* x = spans[work[q].tensor].data;
    std::fill(x + work[q].begin, x + work[q].end, 0.0f);
  }
}

void add_into(float* y, const float* x, int64_t n) {
  const FloatSpan whole{y, n};
  const std::vector<Piece>& work = span_pieces(&whole, 1);
#pragma omp parallel for schedule(dynamic, 8)
  for (size_t q = 0; q < work.size(); ++q)
    for (int64_t i = work[q].begin; i < work[q].end; ++i) y[i] += x[i];
}

void adamw_step(const AdamWTensor* tensors, size_t count, const AdamWStep& s) {
  const std::vector<Piece>& work = pieces(count, [&](size_t t) { return tensors[t].n; });
#pragma omp parallel for schedule(dynamic, 8)
  for (size_t q = 0; q < work.size(); ++q) {
    const AdamWTensor& t = tensors[work[q].tensor];
    const bool bf16 = t.m16 != nullptr;
    for (int64_t i = work[q].begin; i < work[q].end; ++i) {
      float mi = bf16 ? bf16_to_f32(t.m16[i]) : t.m32[i];
      float vi = bf16 ? bf16_to_f32(t.v16[i]) : t.v32[i];
      mi = s.beta1 * mi + (1 - s.beta1) * t.g[i];
      vi = s.beta2 * vi + (1 - s.beta2) * t.g[i] * t.g[i];
      if (bf16) t.m16[i] = f32_to_bf16(mi), t.v16[i] = f32_to_bf16(vi);
      else t.m32[i] = mi, t.v32[i] = vi;
      t.w[i] = t.w[i] * t.decay_factor - s.lr * (mi * s.inv_bc1) / (std::sqrt(vi) * s.inv_sqrt_bc2 + s.eps);
    }
  }
}

}  // namespace dsv3
