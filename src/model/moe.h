// Feed-forward layers: the dense SwiGLU MLP and DeepSeekMoE (§2.1.2):
// h' = u + sum_i shared_i(u) + sum_{i in top-k} g_i expert_i(u). Uses backend ops only.
#pragma once
#include <cstdint>
#include <vector>

#include "core/arena.h"
#include "model/weights.h"

namespace dsv3 {

// out[n, hidden] = down(silu(gate(x)) * up(x))
void mlp_forward(const MlpWeights& w, const float* x, int64_t n, Arena& arena, float* out);

struct Routing {                // what the router decided, for tests and balance statistics
  std::vector<int32_t> experts;  // [n, k]
  std::vector<float> weights;    // [n, k]
};

// out[n, hidden] = MoE(x); if routing is given, the decisions are stored there.
void moe_forward(const ModelConfig& c, const MoeWeights& w, const float* x, int64_t n, Arena& arena, float* out,
                 Routing* routing = nullptr);

}  // namespace dsv3
