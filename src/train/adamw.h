// AdamW (Loshchilov & Hutter) as DeepSeek-V3 trains with it (§4.2: beta1 0.9, beta2 0.95,
// weight decay 0.1): float32 master weights and gradients, moments in BF16 (the paper's
// choice, to save memory) or float32. Weight decay applies to matrices, not to norm
// weights. The update walks params, grads and moments in lockstep through the one tensor
// list. Uses model/weights.h only.
#pragma once
#include <cstdint>
#include <vector>

#include "model/weights.h"

namespace dsv3 {

struct AdamWConfig {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
  bool bf16_moments = true;
};

class AdamW {
 public:
  AdamW(const ModelConfig& c, const AdamWConfig& cfg);

  // One update with learning rate lr; step counts from 1 (bias correction).
  void update(const ModelConfig& c, ModelWeights& params, const ModelWeights& grads, double lr, int64_t step);

  // The moments as float32 tensors named "exp_avg.<name>" / "exp_avg_sq.<name>", for
  // checkpoints; load_state restores them exactly.
  struct NamedTensor {
    std::string name;
    std::vector<int64_t> shape;
    std::vector<float> values;
  };
  std::vector<NamedTensor> state(const ModelConfig& c) const;
  void load_state(const ModelConfig& c, const std::vector<NamedTensor>& tensors);
  const AdamWConfig& config() const { return cfg_; }

 private:
  AdamWConfig cfg_;
  struct Moments {
    std::string name;             // the parameter's HF name
    std::vector<int64_t> shape;
    std::vector<uint16_t> m16, v16;  // BF16
    std::vector<float> m32, v32;     // float32
  };
  std::vector<Moments> moments_;  // one per trainable tensor of list_tensors, in order
};

// Scales grads so that their global L2 norm is at most max_norm (if max_norm > 0);
// returns the norm before clipping. Tensors shared by several slots count once.
double clip_grad_norm(const ModelConfig& c, ModelWeights& grads, double max_norm);
// Sets every gradient (float32) to zero.
void zero_grads(const ModelConfig& c, ModelWeights& grads);

}  // namespace dsv3
