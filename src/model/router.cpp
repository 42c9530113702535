// Expert selection (see router.h). Follows DeepSeek's inference/model.py Gate: groups
// scored by the sum of their top-2 biased scores under noaux_tc, by their best score
// under group_limited_greedy; experts outside the chosen groups are excluded. The
// selection itself is the backend's top_k_rows.
#include "model/router.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/top_k.h"

namespace dsv3 {

template <typename T>
void router_scores(const ModelConfig& c, const T* u, T* s) {
  const int64_t E = c.n_routed_experts;
  if (c.scoring_func == ScoreFunc::sigmoid) {
    for (int64_t e = 0; e < E; ++e) s[e] = T(1) / (T(1) + std::exp(-u[e]));
  } else {
    const T mx = *std::max_element(u, u + E);
    double sum = 0;
    for (int64_t e = 0; e < E; ++e) sum += double(s[e] = std::exp(u[e] - mx));
    for (int64_t e = 0; e < E; ++e) s[e] = T(double(s[e]) / sum);
  }
}

template <typename T>
void route(const ModelConfig& c, const T* logits, int64_t n, const T* bias, int32_t* experts, T* weights,
           Arena& arena) {
  const int64_t E = c.n_routed_experts, k = c.num_experts_per_tok;
  ArenaScope scope(arena);
  // The affinities s, and what the experts are chosen on: s + b.
  T* s = arena.alloc<T>(size_t(n * E));
  T* choice = arena.alloc<T>(size_t(n * E));
  for (int64_t t = 0; t < n; ++t) {
    router_scores(c, logits + t * E, s + t * E);
    for (int64_t e = 0; e < E; ++e) choice[t * E + e] = s[t * E + e] + (bias ? bias[e] : T(0));
  }
  TopK top{.k = k};
  if (c.topk_method != TopkMethod::greedy && c.n_group > 1)
    top.groups = c.n_group, top.top_groups = c.topk_group,
    top.group_score = c.topk_method == TopkMethod::noaux_tc ? GroupScore::best_two : GroupScore::best;
  if (c.route_nodes > 1)  // node-limited routing: whole nodes out before the groups (§2.1.2)
    top.nodes = c.route_nodes, top.top_nodes = c.route_max_nodes, top.node_best = std::max<int64_t>(1, k / c.route_max_nodes);
  top_k_rows(choice, n, E, top, experts);
  // Gate weights: the chosen affinities (not the biased scores), normalised if asked, scaled.
  for (int64_t t = 0; t < n; ++t) {
    T sum = 0;
    for (int64_t j = 0; j < k; ++j) sum += s[t * E + experts[t * k + j]];
    for (int64_t j = 0; j < k; ++j) {
      T wgt = s[t * E + experts[t * k + j]];
      if (c.norm_topk_prob && k > 1) wgt /= sum;
      weights[t * k + j] = wgt * T(c.routed_scaling_factor);
    }
  }
}

template void route<float>(const ModelConfig&, const float*, int64_t, const float*, int32_t*, float*, Arena&);
template void route<double>(const ModelConfig&, const double*, int64_t, const double*, int32_t*, double*, Arena&);
template void router_scores<float>(const ModelConfig&, const float*, float*);
template void router_scores<double>(const ModelConfig&, const double*, double*);

}  // namespace dsv3
