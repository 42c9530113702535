// Router top-k on the CPU (see backend/top_k.h). Rows are independent: threads split them
// when there are many (a training batch), one row (decoding) runs as is.
#include "backend/top_k.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "core/error.h"

namespace dsv3 {

template <typename T>
void top_k_rows(const T* scores, int64_t n, int64_t columns, const TopK& t, int32_t* out) {
  const bool grouped = t.groups > 1, noded = t.nodes > 1 && t.top_nodes < t.nodes;
  if (t.k < 1 || t.k > columns || t.groups < 1 || columns % t.groups != 0 || t.top_groups < 1 ||
      t.top_groups > t.groups || (grouped && t.top_groups * (columns / t.groups) < t.k))
    fail("top-k: cannot choose ", t.k, " of ", columns, " columns in ", t.top_groups, " of ", t.groups, " groups");
  if (t.nodes < 1 || columns % t.nodes != 0 || t.top_nodes < 1 || t.top_nodes > t.nodes ||
      t.top_nodes * (columns / t.nodes) < t.k || t.node_best < 1 || t.node_best > columns / t.nodes ||
      (noded && grouped && (t.groups % t.nodes != 0 || std::min(t.top_groups, t.top_nodes * (t.groups / t.nodes)) * (columns / t.groups) < t.k)))
    fail("top-k: cannot choose ", t.k, " of ", columns, " columns on ", t.top_nodes, " of ", t.nodes, " nodes (", t.groups,
         " groups, ", t.top_groups, " kept)");
  const int64_t per_group = columns / t.groups, per_node = columns / t.nodes;
#pragma omp parallel if (n >= 64)
  {
    // This thread's buffers, kept from call to call (no allocation per routing).
    thread_local std::vector<T> choice, group, best;
    thread_local std::vector<int32_t> order;
    choice.resize(static_cast<size_t>(columns)), group.resize(static_cast<size_t>(std::max(t.groups, t.nodes)));
    best.resize(static_cast<size_t>(std::max(per_group, per_node))), order.resize(static_cast<size_t>(columns));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; ++r) {
      std::copy(scores + r * columns, scores + (r + 1) * columns, choice.begin());
      // Best first, ties to the lower index (the order a stable sort gives; std::sort with
      // the index as tie-break needs no temporary buffer). A NaN score (a diverged run)
      // ranks last, so the comparison stays a strict weak order.
      auto rank_best_first = [&](int64_t count) {
        auto score = [&](int32_t g) { return std::isnan(group[size_t(g)]) ? -std::numeric_limits<T>::infinity() : group[size_t(g)]; };
        std::iota(order.begin(), order.begin() + count, 0);
        std::sort(order.begin(), order.begin() + count, [&](int32_t a, int32_t b) {
          return score(a) > score(b) || (score(a) == score(b) && a < b);
        });
      };
      if (noded) {  // the top_nodes nodes by the sum of their node_best best scores; the others out
        for (int64_t d = 0; d < t.nodes; ++d) {
          const T* first = choice.data() + d * per_node;
          std::copy(first, first + per_node, best.begin());
          std::partial_sort(best.begin(), best.begin() + t.node_best, best.begin() + per_node, std::greater<T>());
          T sum = 0;
          for (int64_t i = 0; i < t.node_best; ++i) sum += best[size_t(i)];
          group[size_t(d)] = sum;
        }
        rank_best_first(t.nodes);
        for (int64_t di = t.top_nodes; di < t.nodes; ++di) {
          const int64_t d = order[size_t(di)];
          std::fill(choice.begin() + d * per_node, choice.begin() + (d + 1) * per_node, -std::numeric_limits<T>::infinity());
        }
      }
      if (grouped) {
        for (int64_t g = 0; g < t.groups; ++g) {
          const T* first = choice.data() + g * per_group;
          if (t.group_score == GroupScore::best_two && per_group >= 2) {
            std::copy(first, first + per_group, best.begin());
            std::partial_sort(best.begin(), best.begin() + 2, best.begin() + per_group, std::greater<T>());
            group[size_t(g)] = best[0] + best[1];
          } else {
            group[size_t(g)] = *std::max_element(first, first + per_group);
          }
        }
        rank_best_first(t.groups);
        for (int64_t gi = t.top_groups; gi < t.groups; ++gi) {
          const int64_t g = order[size_t(gi)];
          std::fill(choice.begin() + g * per_group, choice.begin() + (g + 1) * per_group,
                    -std::numeric_limits<T>::infinity());
        }
      }
      std::iota(order.begin(), order.begin() + columns, 0);
      std::partial_sort(order.begin(), order.begin() + t.k, order.begin() + columns, [&](int32_t a, int32_t b) {
        return choice[size_t(a)] > choice[size_t(b)] || (choice[size_t(a)] == choice[size_t(b)] && a < b);
      });
      std::copy(order.begin(), order.begin() + t.k, out + r * t.k);
    }
  }
}

template void top_k_rows<float>(const float*, int64_t, int64_t, const TopK&, int32_t*);
template void top_k_rows<double>(const double*, int64_t, int64_t, const TopK&, int32_t*);

}  // namespace dsv3
