// Decoupled RoPE for MLA (§2.1.1) with YaRN frequency correction (§4.3, arXiv 2309.00071).
// Uses core only.
#pragma once
#include <cstdint>
#include <vector>

#include "model/config.h"

namespace dsv3 {

// cos and sin (cos_sin_scale applied) of the RoPE angles of a list of positions: [n,
// qk_rope_head_dim / 2] each; the rotation itself is the backend's rope_rotate.
struct RopeAngles {
  std::vector<double> cos, sin;
};

struct Rope {
  std::vector<float> inv_freq;  // (qk_rope_head_dim / 2), float32 as in DeepSeek's code
  float cos_sin_scale = 1;      // YaRN mscale(factor, mscale) / mscale(factor, mscale_all_dim)

  static Rope from_config(const ModelConfig& c);
  // The angles of positions pos (float32, as in DeepSeek's code), once per pass: every
  // layer's MLA rotates by them.
  void angles(const std::vector<int64_t>& pos, RopeAngles& out) const;
};

// The attention softmax scale: 1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)^2
// under YaRN.
float softmax_scale(const ModelConfig& c);

}  // namespace dsv3
