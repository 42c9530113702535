// Expert selection (see router.h). Follows DeepSeek's inference/model.py Gate: groups
// scored by the sum of their top-2 biased scores under noaux_tc, by their best score
// under group_limited_greedy; experts outside the chosen groups are excluded (-inf).
#include "model/router.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

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
void route(const ModelConfig& c, const T* logits, int64_t n, const T* bias, int32_t* experts, T* weights) {
  const int64_t E = c.n_routed_experts, k = c.num_experts_per_tok;
  const int64_t per_group = E / c.n_group;
  const bool grouped = c.topk_method != TopkMethod::greedy && c.n_group > 1;
  std::vector<T> s(static_cast<size_t>(E)), choice(static_cast<size_t>(E)), group_score(static_cast<size_t>(c.n_group));
  std::vector<int32_t> order(static_cast<size_t>(std::max(E, c.n_group)));
  for (int64_t t = 0; t < n; ++t) {
    router_scores(c, logits + t * E, s.data());
    for (int64_t e = 0; e < E; ++e) choice[size_t(e)] = s[size_t(e)] + (bias ? bias[e] : T(0));

    if (grouped) {
      for (int64_t g = 0; g < c.n_group; ++g) {
        T* first = choice.data() + g * per_group;
        if (c.topk_method == TopkMethod::noaux_tc) {
          std::vector<T> tmp(first, first + per_group);
          std::partial_sort(tmp.begin(), tmp.begin() + 2, tmp.end(), std::greater<T>());
          group_score[size_t(g)] = tmp[0] + tmp[1];
        } else {
          group_score[size_t(g)] = *std::max_element(first, first + per_group);
        }
      }
      std::iota(order.begin(), order.begin() + c.n_group, 0);
      std::stable_sort(order.begin(), order.begin() + c.n_group,
                       [&](int32_t a, int32_t b) { return group_score[size_t(a)] > group_score[size_t(b)]; });
      for (int64_t gi = c.topk_group; gi < c.n_group; ++gi) {
        const int64_t g = order[size_t(gi)];
        std::fill(choice.begin() + g * per_group, choice.begin() + (g + 1) * per_group,
                  -std::numeric_limits<T>::infinity());
      }
    }
    std::iota(order.begin(), order.begin() + E, 0);
    std::partial_sort(order.begin(), order.begin() + k, order.begin() + E, [&](int32_t a, int32_t b) {
      return choice[size_t(a)] > choice[size_t(b)] || (choice[size_t(a)] == choice[size_t(b)] && a < b);
    });
    T sum = 0;
    for (int64_t j = 0; j < k; ++j) sum += s[size_t(order[size_t(j)])];
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = order[size_t(j)];
      experts[t * k + j] = e;
      T wgt = s[size_t(e)];
      if (c.norm_topk_prob && k > 1) wgt /= sum;
      weights[t * k + j] = wgt * T(c.routed_scaling_factor);
    }
  }
}

template void route<float>(const ModelConfig&, const float*, int64_t, const float*, int32_t*, float*);
template void route<double>(const ModelConfig&, const double*, int64_t, const double*, int32_t*, double*);
template void router_scores<float>(const ModelConfig&, const float*, float*);
template void router_scores<double>(const ModelConfig&, const double*, double*);

}  // namespace dsv3
