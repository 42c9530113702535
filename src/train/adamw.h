// AdamW (Loshchilov & Hutter) as DeepSeek-V3 trains with it (§4.2: beta1 0.9, beta2 0.95,
// weight decay 0.1): float32 master weights and gradients, moments in BF16 (the paper's
// choice, to save memory) or float32. Weight decay applies to matrices, not to norm
// weights. Parameters and gradients are flat (allocate_weights(c, F32, MtpTying::tied));
// each moment is one flat buffer laid out as they are, and the segments a step walks (the
// trainable tensors, each once) are listed once from the tensor list. Nothing here loops
// over elements or allocates per step: the backend's optimizer ops do the loops.
// Uses model/weights.h and backend/optimizer.h only.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "backend/optimizer.h"
#include "dist/communicator.h"
#include "model/weights.h"

namespace dsv3 {

struct AdamWConfig {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
  bool bf16_moments = true;
};

class AdamW {
 public:
  // Lays out the moments for allocate_weights(c, F32, MtpTying::tied), from the tensor list
  // alone (no weights are allocated).
  AdamW(const ModelConfig& c, const AdamWConfig& cfg);

  // One update with learning rate lr; step counts from 1 (bias correction). params and grads
  // must come from allocate_weights(c, F32, MtpTying::tied) for the constructor's config.
  void update(ModelWeights& params, const ModelWeights& grads, double lr, int64_t step);

  // The trainable tensors of w (laid out as update's params), each once, in list order:
  // the spans clip_grad_norm sums. List them once; they stay valid as long as w.
  std::vector<FloatSpan> trainable_spans(ModelWeights& w) const;

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

  // ZeRO-1 (the multi-process issue): from now on this optimizer updates only the flat
  // elements [lo, hi) and keeps only their moments (copied from its full ones).
  void shard(int64_t lo, int64_t hi);
  bool sharded() const { return sharded_; }
  // Every rank's shard gathered into an unsharded copy on rank 0 (for a checkpoint; the
  // other ranks get an empty-handed copy they must not use); a collective: every rank of
  // comm calls it, each with its own shard. counts: every rank's shard size, in rank order.
  AdamW gathered(dist::Communicator& comm, const std::vector<int64_t>& counts) const;

 private:
  // One trainable tensor: where it lies in the flat params, grads and moments.
  struct Segment {
    std::string name;  // the parameter's HF name
    std::vector<int64_t> shape;
    int64_t offset, n;
    bool decay;  // matrices decay; norm weights do not
  };
  void check_layout(const ModelWeights& w, const char* what) const;

  AdamWConfig cfg_;
  int64_t flat_numel_ = 0;         // elements of the params' allocation
  std::vector<Segment> segments_;  // trainable, not tied, in list order (within the shard)
  std::vector<Segment> all_segments_;  // every one, whole (the checkpoint's tensors)
  bool sharded_ = false;
  int64_t lo_ = 0, hi_ = 0;        // the shard's flat elements; the moments hold these only
  std::vector<uint16_t> m16_, v16_;  // BF16 moments, flat_numel_ each, or
  std::vector<float> m32_, v32_;     // float32 moments (padding and non-trainable slots stay 0)
  std::vector<AdamWTensor> step_;    // one per segment, refilled by update (no allocation)
};

// Scales grads (the spans of AdamW::trainable_spans) so that their global L2 norm is at
// most max_norm (if max_norm > 0); returns the norm before clipping. The sum runs in the
// spans' order and the backend's fixed pieces, so it is the same on any thread count.
double clip_grad_norm(std::span<const FloatSpan> grads, double max_norm);
// Sets every gradient of a flat float32 allocation to zero (its padding too).
void zero_grads(ModelWeights& grads);

}  // namespace dsv3
