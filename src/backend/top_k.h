// The selection step of DeepSeekMoE's router (§2.1.2), behind the backend like every other
// element loop: for each of n rows of `columns` scores, the k best columns, best first,
// ties to the lower index, optionally among the `top_groups` best of `groups` equal groups
// of columns only (DeepSeek's code scores a group by the sum of its two best scores under
// noaux_tc and by its best under group_limited_greedy, ties to the lower group), and before
// that among the `top_nodes` best of `nodes` equal ranges (node-limited routing). Which scores are selected on (the affinities plus the balancing bias) and
// what the gate weights are stay in the model (model/router.cpp). Implemented in
// backend/cpu/top_k.cpp. Depends on std only.
#pragma once
#include <cstdint>

namespace dsv3 {

enum class GroupScore { best, best_two };

struct TopK {
  int64_t k = 1;
  int64_t groups = 1;      // 1: no group limit
  int64_t top_groups = 1;  // groups kept when groups > 1
  GroupScore group_score = GroupScore::best;
  // Node-limited routing, before the groups: columns in `nodes` equal ranges, the
  // top_nodes of them kept, a node scored by the sum of its node_best best scores (the
  // report's "highest K/M affinity scores of the experts on each node"). nodes = 1: off.
  int64_t nodes = 1, top_nodes = 1, node_best = 1;
};

// out[n, k] = the chosen columns of each row of scores [n, columns].
template <typename T>
void top_k_rows(const T* scores, int64_t n, int64_t columns, const TopK& t, int32_t* out);

}  // namespace dsv3
