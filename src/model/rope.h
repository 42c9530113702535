// Decoupled RoPE for MLA (§2.1.1) with YaRN frequency correction (§4.3, arXiv 2309.00071).
// Uses core only.
#pragma once
#include <cstdint>
#include <vector>

#include "model/config.h"

namespace dsv3 {

struct Rope {
  std::vector<float> inv_freq;  // (qk_rope_head_dim / 2), float32 as in DeepSeek's code
  float cos_sin_scale = 1;      // YaRN mscale(factor, mscale) / mscale(factor, mscale_all_dim)

  static Rope from_config(const ModelConfig& c);
  // Rotates consecutive pairs (x[2i], x[2i+1]) of x (qk_rope_head_dim values) to position pos.
  void apply(float* x, int64_t pos) const;
  // cos and sin (cos_sin_scale applied) of positions [0, n): [n, qk_rope_head_dim / 2] each,
  // so a training pass computes them once per sequence length, not per token and head.
  void table(int64_t n, std::vector<double>& cos, std::vector<double>& sin) const;
  // apply() with a row of such a table, for float or double; inverse rotates back (the
  // transpose: RoPE's backward).
  template <typename T>
  void rotate(T* x, const double* cos, const double* sin, bool inverse) const {
    for (size_t i = 0; i < inv_freq.size(); ++i) {
      const T c = T(cos[i]), s = T(inverse ? -sin[i] : sin[i]);
      const T a = x[2 * i], b = x[2 * i + 1];
      x[2 * i] = a * c - b * s;
      x[2 * i + 1] = a * s + b * c;
    }
  }
};

// The attention softmax scale: 1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)^2
// under YaRN.
float softmax_scale(const ModelConfig& c);

}  // namespace dsv3
