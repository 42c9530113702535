// Dense MLP and MoE forward (see moe.h). Tokens are grouped by expert so that each
// expert's weights are read once per forward pass, whatever the number of tokens.
#include "model/moe.h"

#include <cstring>

#include "backend/ops.h"
#include "model/router.h"

namespace dsv3 {

void mlp_forward(const MlpWeights& w, const float* x, int64_t n, Arena& arena, float* out) {
  const int64_t inter = w.gate_proj.rows;
  float* g = arena.alloc(size_t(n * inter));
  float* u = arena.alloc(size_t(n * inter));
  linear(x, n, w.gate_proj, g);
  linear(x, n, w.up_proj, u);
  silu_mul(g, u, n * inter);
  linear(g, n, w.down_proj, out);
}

void moe_forward(const ModelConfig& c, const MoeWeights& w, const float* x, int64_t n, Arena& arena, float* out,
                 Routing* routing) {
  const int64_t E = c.n_routed_experts, k = c.num_experts_per_tok, dim = c.hidden_size;
  float* logits = arena.alloc(size_t(n * E));
  linear(x, n, w.gate, logits);
  Routing local;
  Routing& r = routing ? *routing : local;
  r.experts.resize(size_t(n * k));
  r.weights.resize(size_t(n * k));
  route(c, logits, n, w.e_score_correction_bias.empty() ? nullptr : w.e_score_correction_bias.data(), r.experts.data(),
        r.weights.data());

  // Shared experts see every token.
  if (c.n_shared_experts > 0) mlp_forward(w.shared_experts, x, n, arena, out);
  else std::fill(out, out + n * dim, 0.0f);

  // Routed experts: gather each expert's tokens, run it once, scatter-add g_i * expert_i(u).
  std::vector<std::vector<int64_t>> slots(static_cast<size_t>(E));  // (token * k + j) routed to each expert
  for (int64_t i = 0; i < n * k; ++i) slots[size_t(r.experts[size_t(i)])].push_back(i);
  float* xe = arena.alloc(size_t(n * dim));
  float* ye = arena.alloc(size_t(n * dim));
  for (int64_t e = 0; e < E; ++e) {
    const auto& s = slots[size_t(e)];
    if (s.empty()) continue;
    const int64_t m = int64_t(s.size());
    for (int64_t i = 0; i < m; ++i) std::memcpy(xe + i * dim, x + (s[size_t(i)] / k) * dim, size_t(dim) * 4);
    mlp_forward(w.experts[size_t(e)], xe, m, arena, ye);
    for (int64_t i = 0; i < m; ++i) {
      const float g = r.weights[size_t(s[size_t(i)])];
      float* o = out + (s[size_t(i)] / k) * dim;
      const float* y = ye + i * dim;
      for (int64_t d = 0; d < dim; ++d) o[d] += g * y[d];
    }
  }
}

}  // namespace dsv3
