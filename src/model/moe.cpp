// Dense MLP and MoE forward (see moe.h). Tokens are grouped by expert so that each
// expert's weights are read once per forward pass, whatever the number of tokens, and the
// active experts run as grouped products (linear_batch).
#include "model/moe.h"

#include <cstring>

#include "backend/ops.h"
#include "model/router.h"

namespace dsv3 {

void mlp_forward(const MlpWeights& w, const float* x, int64_t n, Arena& arena, float* out) {
  const int64_t inter = w.gate_proj.rows;
  float* g = arena.alloc(size_t(n * inter));
  float* u = arena.alloc(size_t(n * inter));
  const LinearJob gate_up[2] = {{x, n, w.gate_proj, g}, {x, n, w.up_proj, u}};
  linear_batch(gate_up, 2);
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
  route(c, logits, n, w.e_score_correction_bias.data ? w.e_score_correction_bias.f32() : nullptr, r.experts.data(),
        r.weights.data());

  // Tokens grouped by expert: slots[e] lists the (token * k + j) routed to expert e.
  std::vector<std::vector<int64_t>> slots(static_cast<size_t>(E));
  for (int64_t i = 0; i < n * k; ++i) slots[size_t(r.experts[size_t(i)])].push_back(i);

  // One grouped product for every active expert's gate and up projections (and the shared
  // experts'), one for their down projections: h' = shared(u) + sum_i g_i expert_i(u).
  struct Active {
    const MlpWeights* w;
    const std::vector<int64_t>* slots;  // nullptr: the shared experts, every token
    int64_t m;
    float *x, *gate, *up, *out;
  };
  std::vector<Active> active;
  if (c.n_shared_experts > 0) active.push_back({&w.shared_experts, nullptr, n, const_cast<float*>(x), nullptr, nullptr, out});
  for (int64_t e = 0; e < E; ++e) {
    const auto& s = slots[size_t(e)];
    if (s.empty()) continue;
    const int64_t m = int64_t(s.size());
    float* xe = arena.alloc(size_t(m * dim));
    for (int64_t i = 0; i < m; ++i) std::memcpy(xe + i * dim, x + (s[size_t(i)] / k) * dim, size_t(dim) * 4);
    active.push_back({&w.experts[size_t(e)], &s, m, xe, nullptr, nullptr, arena.alloc(size_t(m * dim))});
  }
  std::vector<LinearJob> jobs;
  for (Active& a : active) {
    const int64_t inter = a.w->gate_proj.rows;
    a.gate = arena.alloc(size_t(a.m * inter));
    a.up = arena.alloc(size_t(a.m * inter));
    jobs.push_back({a.x, a.m, a.w->gate_proj, a.gate});
    jobs.push_back({a.x, a.m, a.w->up_proj, a.up});
  }
  linear_batch(jobs.data(), jobs.size());
  jobs.clear();
  for (Active& a : active) {
    silu_mul(a.gate, a.up, a.m * a.w->gate_proj.rows);
    jobs.push_back({a.gate, a.m, a.w->down_proj, a.out});
  }
  linear_batch(jobs.data(), jobs.size());
  if (c.n_shared_experts == 0) std::fill(out, out + n * dim, 0.0f);
  for (const Active& a : active) {
    if (!a.slots) continue;
    for (int64_t i = 0; i < a.m; ++i) {
      const int64_t slot = (*a.slots)[size_t(i)];
      const float g = r.weights[size_t(slot)];
      float* o = out + (slot / k) * dim;
      const float* y = a.out + i * dim;
      for (int64_t d = 0; d < dim; ++d) o[d] += g * y[d];
    }
  }
}

}  // namespace dsv3
