// Picks the next token from logits: greedy (temperature 0), or temperature with top-k and
// top-p (nucleus) filtering, from a seeded generator so runs repeat. Uses core only.
#pragma once
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

namespace dsv3 {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy (argmax; lowest id on ties)
  int64_t top_k = 0;         // 0: no limit
  float top_p = 1.0f;        // 1: no limit
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& p);  // throws Error on out-of-range parameters
  int32_t sample(const float* logits, int64_t vocab);  // throws Error on non-finite logits

  // What sample() draws from, as a dense distribution over the vocabulary (probs, resized):
  // the temperature, top-k and top-p applied and renormalised; greedy is one-hot on the
  // argmax. Speculative decoding compares the draft's and the model's.
  void distribution(const float* logits, int64_t vocab, std::vector<float>& probs);
  // A token drawn from a dense distribution (weights need not sum to 1; not all zero).
  int32_t draw(const std::vector<float>& weights);
  double uniform();  // in [0, 1)

 private:
  void check_finite(const float* logits, int64_t vocab) const;
  // candidates_ <- the tokens temperature, top-k and top-p keep, first, with their unnormalised
  // weights; returns how many, and their weights' sum in total.
  size_t filter(const float* logits, int64_t vocab, double& total);

  SamplingParams p_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> candidates_;
};

}  // namespace dsv3
