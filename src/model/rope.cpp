// YaRN RoPE (see rope.h). Frequencies follow DeepSeek's inference/model.py
// (precompute_freqs_cis): dimensions rotating fewer than beta_slow times over the original
// context are interpolated by 1/factor, those rotating more than beta_fast times are kept,
// with a linear ramp between; the angle is float32(pos) * float32(freq).
#include "model/rope.h"

#include <algorithm>
#include <cmath>

namespace dsv3 {

namespace {

double yarn_mscale(double factor, double mscale) { return factor <= 1 ? 1.0 : 0.1 * mscale * std::log(factor) + 1.0; }

double correction_dim(double rotations, double dim, double base, double max_pos) {
  return dim * std::log(max_pos / (rotations * 2 * M_PI)) / (2 * std::log(base));
}

}  // namespace

Rope Rope::from_config(const ModelConfig& c) {
  Rope r;
  const int64_t dim = c.qk_rope_head_dim, half = dim / 2;
  r.inv_freq.resize(size_t(half));
  for (int64_t i = 0; i < half; ++i)
    r.inv_freq[size_t(i)] = float(1.0 / std::pow(c.rope_theta, double(float(2 * i) / float(dim))));
  const YarnScaling& y = c.rope_scaling;
  if (y.enabled) {
    const double orig = double(y.original_max_position_embeddings);
    double low = std::floor(correction_dim(y.beta_fast, double(dim), c.rope_theta, orig));
    double high = std::ceil(correction_dim(y.beta_slow, double(dim), c.rope_theta, orig));
    low = std::max(low, 0.0);
    high = std::min(high, double(dim - 1));
    if (low == high) high += 0.001;
    for (int64_t i = 0; i < half; ++i) {
      const float ramp = float(std::clamp((double(i) - low) / (high - low), 0.0, 1.0));
      const float smooth = 1.0f - ramp;  // 1: keep the original frequency
      const float f = r.inv_freq[size_t(i)];
      r.inv_freq[size_t(i)] = f / float(y.factor) * (1.0f - smooth) + f * smooth;
    }
    r.cos_sin_scale = float(yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim));
  }
  return r;
}

void Rope::angles(const std::vector<int64_t>& pos, RopeAngles& out) const {
  const size_t half = inv_freq.size();
  out.cos.resize(pos.size() * half), out.sin.resize(pos.size() * half);
  for (size_t t = 0; t < pos.size(); ++t)
    for (size_t i = 0; i < half; ++i) {
      const float angle = float(pos[t]) * inv_freq[i];
      out.cos[t * half + i] = double(float(std::cos(double(angle))) * cos_sin_scale);
      out.sin[t * half + i] = double(float(std::sin(double(angle))) * cos_sin_scale);
    }
}

float softmax_scale(const ModelConfig& c) {
  double scale = 1.0 / std::sqrt(double(c.qk_head_dim()));
  const YarnScaling& y = c.rope_scaling;
  if (y.enabled && y.mscale_all_dim != 0) {
    const double m = yarn_mscale(y.factor, y.mscale_all_dim);
    scale *= m * m;
  }
  return float(scale);
}

}  // namespace dsv3
