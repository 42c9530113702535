// Auxiliary-loss-free load balancing (§2.1.2): after each step, every MoE layer's
// e_score_correction_bias moves by gamma * sign(mean load - load of the expert), the load
// counted over the whole batch. MaxVio = max load / mean load - 1 measures the imbalance.
// Uses model only.
#pragma once
#include <cstdint>
#include <vector>

#include "model/weights.h"

namespace dsv3 {

// loads[l]: tokens routed to each expert of layer l (empty for dense layers), the main
// model's layers first, then the MTP modules' blocks. Updates the biases of params (if
// gamma > 0); writes MaxVio per MoE layer of the main model into max_vio (the MTP blocks
// are balanced too, not reported; the vector keeps its memory from step to step).
void update_balance_bias(const ModelConfig& c, ModelWeights& params, const std::vector<std::vector<int64_t>>& loads,
                         double gamma, std::vector<double>& max_vio);

}  // namespace dsv3
