// One training pass of the main model over B sequences of S tokens: the forward saves the
// activations, the backward turns the mean next-token cross-entropy into gradients of every
// parameter, block by block in mirror order of the forward (llm.c style). T is float
// (training) or double (gradient checks); weights and gradients come from
// allocate_weights with T's dtype. The MTP modules are not run here yet.
#pragma once
#include <cstdint>
#include <vector>

#include "model/mla_train.h"
#include "model/moe_train.h"

namespace dsv3 {

template <typename T>
struct LayerActivations {
  std::vector<T> h_in, inv1, xn1;   // residual in, input_layernorm
  MlaActivations<T> mla;
  std::vector<T> h_mid, inv2, xn2;  // residual after attention, post_attention_layernorm
  MlpActivations<T> mlp;            // dense layers
  MoeActivations<T> moe;            // MoE layers
};

template <typename T>
class TrainingPass {
 public:
  explicit TrainingPass(const ModelConfig& c);

  // Mean cross-entropy over the positions whose target is >= 0. tokens, targets: [B*S].
  double forward(const ModelWeights& w, const int32_t* tokens, const int32_t* targets, int64_t B, int64_t S);
  // Gradients of the last forward's loss, accumulated into g.
  void backward(const ModelWeights& w, ModelWeights& g);

  const std::vector<T>& logits() const { return logits_; }  // [B*S, vocab]
  const std::vector<LayerActivations<T>>& layers() const { return layers_; }

 private:
  const ModelConfig& c_;
  Rope rope_;
  int64_t B_ = 0, S_ = 0;
  std::vector<int32_t> tokens_;
  std::vector<LayerActivations<T>> layers_;
  std::vector<T> h_last_, inv_final_, xn_final_, logits_, dlogits_;
};

}  // namespace dsv3
