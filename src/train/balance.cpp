// The bias update rule (see balance.h).
#include "train/balance.h"

#include <algorithm>

namespace dsv3 {

void update_balance_bias(const ModelConfig& c, ModelWeights& params, const std::vector<std::vector<int64_t>>& loads,
                         double gamma, std::vector<double>& max_vio) {
  max_vio.clear();
  const size_t main_layers = params.layers.size();
  for (size_t l = 0; l < loads.size() && l < main_layers + params.mtp.size(); ++l) {
    const auto& load = loads[l];
    if (load.empty()) continue;
    double total = 0;
    for (int64_t x : load) total += double(x);
    const double mean = total / double(load.size());
    if (l < main_layers) max_vio.push_back(mean > 0 ? double(*std::max_element(load.begin(), load.end())) / mean - 1 : 0);
    const LayerWeights& layer = l < main_layers ? params.layers[l] : params.mtp[l - main_layers].block;
    const Mat& bias = layer.moe.e_score_correction_bias;
    if (gamma <= 0 || !bias.data) continue;  // V2-style routing has no bias
    float* b = mutable_data<float>(bias);
    for (size_t e = 0; e < load.size(); ++e) {
      const double d = mean - double(load[e]);
      b[e] += float(gamma * double((d > 0) - (d < 0)));
    }
  }
}

}  // namespace dsv3
