// Perplexity: how well a model predicts held-out text. A window of S+1 tokens is run through
// the model at positions 0..S-1 and scored on every next token (S targets), as the trainer's
// validation loss scores its windows; the loss is the mean negative log-likelihood in nats
// over all scored tokens and the perplexity is its exponential. Uses model, and the
// backend's cross_entropy (the trainer's loss).
#pragma once
#include <cstdint>
#include <span>
#include <vector>

#include "model/transformer.h"

namespace dsv3 {

// Scores windows of seq + 1 tokens with one model; the latent KV cache and the logits are
// sized once, for every window.
class WindowScorer {
 public:
  // Throws Error when seq is not in [1, max_position_embeddings].
  WindowScorer(Transformer& model, int64_t seq);

  // Mean next-token loss of window[1..seq] given its prefix. Throws Error when the window
  // is not seq + 1 tokens or holds an id outside the vocabulary.
  double loss(std::span<const int32_t> window);

 private:
  Transformer& model_;
  int64_t seq_;
  KvCache cache_;
  std::vector<float> logits_;  // [seq, vocab]
};

// The losses of equally long windows, summarised.
struct PerplexityResult {
  int64_t windows = 0, tokens = 0;  // tokens scored
  double loss = 0;                  // mean over tokens (= over windows: all have S targets)
  double loss_se = 0;               // standard error of `loss` over windows (0 for one window)
  double perplexity = 0;            // exp(loss)
};
PerplexityResult summarize_windows(const std::vector<double>& window_losses, int64_t seq);

}  // namespace dsv3
