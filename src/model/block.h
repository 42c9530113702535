// One decoder block (§2.1), the same for inference and training:
//   h += MLA(input_layernorm(h));  h += FFN(post_attention_layernorm(h)),
// the FFN being DeepSeekMoE in MoE layers and a dense SwiGLU MLP in the first
// first_k_dense_replace layers. The forward updates the residual stream h in place for the
// tokens placed by TokenRows (one sequence, a batch of sequences, training windows); with a
// record it keeps what the backward needs, which walks the same steps in mirror order.
// RMSNorm outputs are recomputed in the backward from the residual stream, never kept
// (§3.2.3). T is float (inference, training) or double (gradient checks).
#pragma once
#include <cstdint>
#include <vector>

#include "core/arena.h"
#include "model/mla.h"
#include "model/moe.h"

namespace dsv3 {

// What a block's forward and backward take besides weights and tokens.
struct BlockContext {
  MlaContext mla;            // config, the tokens' RoPE angles, attention form, projection precision
  BalanceLoss balance = {};  // the MoE balance loss of a recorded forward (alpha 0: none)
  ExpertExchange* experts = nullptr;  // expert parallelism (training, float): the routed experts' exchange
};

template <typename T>
struct BlockRecord {
  std::vector<T> h_in;   // residual in (input_layernorm's input)
  MlaRecord<T> mla;
  std::vector<T> h_mid;  // residual after attention (post_attention_layernorm's input)
  MlpRecord<T> mlp;      // dense layers
  MoeRecord<T> moe;      // MoE layers
  int64_t bytes() const;
};

// h[n, hidden] updated in place; the block's latents go to cache (empty: the pass attends
// within itself, as in training). Returns the balance loss (0 without a record). moe_state:
// where an MoE layer keeps its routing and dispatch without a record (inference passes one
// it reuses, so a pass allocates nothing; traces read the routing there; may be null).
template <typename T>
double block_forward(const BlockContext& ctx, const LayerWeights& w, const TokenRows& tokens, LayerCache<T> cache, T* h,
                     Arena& arena, BlockRecord<T>* record = nullptr, MoeState<T>* moe_state = nullptr);

// dh: on entry the gradient of the block's output, on return that of its input. Weight
// gradients are accumulated into g. ctx and tokens as in the recorded forward.
template <typename T>
void block_backward(const BlockContext& ctx, const LayerWeights& w, const TokenRows& tokens, const BlockRecord<T>& record,
                    T* dh, LayerWeights& g, Arena& arena);

}  // namespace dsv3
