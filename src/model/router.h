// The DeepSeekMoE router (§2.1.2): affinities s = sigmoid(u W_g^T) (V3) or softmax (V2);
// top-k experts chosen on s + b, where the bias b (e_score_correction_bias, moved by the
// auxiliary-loss-free balancing rule) only selects; optionally limited to the topk_group
// best of n_group expert groups; gate weights are the chosen s, normalised if
// norm_topk_prob, times routed_scaling_factor. Uses core and backend/top_k.h.
#pragma once
#include <cstdint>

#include "core/arena.h"
#include "model/config.h"

namespace dsv3 {

// logits: [n, n_routed_experts] = u W_g^T; bias: n_routed_experts values or nullptr.
// Writes expert ids [n, k] (best first) and their gate weights [n, k]. T: float or double.
// Scratch from arena.
template <typename T>
void route(const ModelConfig& c, const T* logits, int64_t n, const T* bias, int32_t* experts, T* weights,
           Arena& arena);

// The affinities s of one token: sigmoid(logits) or softmax(logits) over the experts.
template <typename T>
void router_scores(const ModelConfig& c, const T* logits, T* s);

}  // namespace dsv3
