// The element loops of an optimiser step, behind the backend like every other loop and
// thread: the AdamW update, the global gradient norm, scaling and zeroing. Each takes a list
// of float32 tensors and runs as one parallel pass over pieces of all of them, so the many
// small tensors (norms, experts) use every thread too. Sums are added in a fixed order, so
// results do not depend on the number of threads (training resumes bit-exactly).
// Implemented in backend/cpu/optimizer.cpp. Depends on core only.
#pragma once
#include <cstddef>
#include <cstdint>

namespace dsv3 {

struct FloatSpan {
  float* data;
  int64_t n;
};

// sum of x^2 over every element of every span, accumulated in double.
double sum_of_squares(const FloatSpan* spans, size_t count);
// x *= k for every element.
void scale_spans(const FloatSpan* spans, size_t count, float k);
// x = 0 for every element.
void zero_spans(const FloatSpan* spans, size_t count);
// y += x element by element over n elements (gradient halves and micro-batch sums).
void add_into(float* y, const float* x, int64_t n);

// One tensor of an AdamW step: weights w, gradient g, n elements, and its two moments, in
// BF16 (m16, v16) or float32 (m32, v32). decay_factor = 1 - lr * weight_decay (1: no decay).
struct AdamWTensor {
  float* w;
  const float* g;
  int64_t n;
  float decay_factor;
  uint16_t *m16 = nullptr, *v16 = nullptr;
  float *m32 = nullptr, *v32 = nullptr;
};
// The step's constants: m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
// w = w * decay_factor - lr * (m * inv_bc1) / (sqrt(v) * inv_sqrt_bc2 + eps).
struct AdamWStep {
  float beta1, beta2, eps, lr, inv_bc1, inv_sqrt_bc2;
};
void adamw_step(const AdamWTensor* tensors, size_t count, const AdamWStep& s);

}  // namespace dsv3
