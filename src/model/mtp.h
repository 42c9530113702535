// The Multi-Token Prediction module at depth k (§2.2, eq. 21-22), one forward for training
// and inference:
//   h'_i  = M_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)]      (enorm, hnorm, eh_proj)
//   h^k_i = TRM_k(h'_i)                                          (one decoder block)
// and its prediction of token i+k+1 is the shared output head on h^k (head.h, with the
// module's shared_head.norm). The concatenation order [enorm(emb); hnorm(h)] is that of
// the released weights. In training h^0 is the main model's residual stream after its last
// block, before the final norm; at inference (speculative decoding) the module is run with
// a latent cache of its own, like any layer. T is float or double (gradient checks).
#pragma once
#include <cstdint>
#include <vector>

#include "model/block.h"

namespace dsv3 {

template <typename T>
struct MtpRecord {
  std::vector<T> e;       // Emb(t_{i+k}) [n, hidden] (enorm's input)
  std::vector<T> h_prev;  // h^{k-1} [n, hidden] (hnorm's input)
  BlockRecord<T> block;
  int64_t bytes() const { return int64_t((e.size() + h_prev.size()) * sizeof(T)) + block.bytes(); }
};

// h[n, hidden] = h^k (overwritten) from h_prev = h^{k-1} [n, hidden] and next_tokens[i] =
// t_{i+k}; the block's latents go to cache as in block_forward. Returns the block's
// balance loss (0 without a record).
template <typename T>
double mtp_forward(const BlockContext& ctx, const MtpWeights& w, const int32_t* next_tokens, const T* h_prev,
                   const TokenRows& tokens, LayerCache<T> cache, T* h, Arena& arena, MtpRecord<T>* record = nullptr,
                   MoeState<T>* moe_state = nullptr);

// dh: on entry the gradient of h^k, on return that of h^{k-1} (overwritten). Weight
// gradients, the embedding's included, are accumulated into g; the embedding's into
// embedding_grad instead when given (a pipeline keeps it apart from the first stage's).
template <typename T>
void mtp_backward(const BlockContext& ctx, const MtpWeights& w, const int32_t* next_tokens, const TokenRows& tokens,
                  const MtpRecord<T>& record, T* dh, MtpWeights& g, Arena& arena, const Mat* embedding_grad = nullptr);

}  // namespace dsv3
