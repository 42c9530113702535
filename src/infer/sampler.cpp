// Sampling (see sampler.h).
#include "infer/sampler.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace dsv3 {

Sampler::Sampler(const SamplingParams& p) : p_(p), rng_(p.seed) {
  if (!(p.temperature >= 0) || !std::isfinite(p.temperature)) fail("temperature must be >= 0, got ", p.temperature);
  if (!(p.top_p > 0 && p.top_p <= 1)) fail("top-p must be in (0, 1], got ", p.top_p);
  if (p.top_k < 0) fail("top-k must be >= 0, got ", p.top_k);
}

void Sampler::check_finite(const float* logits, int64_t vocab) const {
  for (int64_t i = 0; i < vocab; ++i)
    if (!std::isfinite(logits[i])) fail("logit ", i, " is ", logits[i], ": the model produced non-finite values");
}

size_t Sampler::filter(const float* logits, int64_t vocab, double& total) {
  candidates_.resize(size_t(vocab));
  for (int64_t i = 0; i < vocab; ++i) candidates_[size_t(i)] = {logits[i] / p_.temperature, int32_t(i)};
  auto by_logit = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  size_t keep = candidates_.size();
  if (p_.top_k > 0 && size_t(p_.top_k) < keep) {
    keep = size_t(p_.top_k);
    std::partial_sort(candidates_.begin(), candidates_.begin() + long(keep), candidates_.end(), by_logit);
  } else {
    std::sort(candidates_.begin(), candidates_.end(), by_logit);
  }
  const float mx = candidates_[0].first;
  total = 0;
  for (size_t i = 0; i < keep; ++i) total += (candidates_[i].first = std::exp(candidates_[i].first - mx));
  if (p_.top_p < 1) {  // smallest prefix whose probability reaches top_p
    double cum = 0;
    for (size_t i = 0; i < keep; ++i) {
      cum += candidates_[i].first / total;
      if (cum >= p_.top_p) {
        keep = i + 1;
        break;
      }
    }
    total = 0;
    for (size_t i = 0; i < keep; ++i) total += candidates_[i].first;
  }
  return keep;
}

int32_t Sampler::sample(const float* logits, int64_t vocab) {
  check_finite(logits, vocab);
  if (p_.temperature == 0) return int32_t(std::max_element(logits, logits + vocab) - logits);
  double total = 0;
  const size_t keep = filter(logits, vocab, total);
  double u = std::uniform_real_distribution<double>(0.0, total)(rng_);
  for (size_t i = 0; i < keep; ++i) {
    u -= candidates_[i].first;
    if (u < 0) return candidates_[i].second;
  }
  return candidates_[keep - 1].second;
}

void Sampler::distribution(const float* logits, int64_t vocab, std::vector<float>& probs) {
  check_finite(logits, vocab);
  probs.assign(size_t(vocab), 0.0f);
  if (p_.temperature == 0) {
    probs[size_t(std::max_element(logits, logits + vocab) - logits)] = 1.0f;
    return;
  }
  double total = 0;
  const size_t keep = filter(logits, vocab, total);  // the same candidates and cut-offs as sample()
  for (size_t i = 0; i < keep; ++i) probs[size_t(candidates_[i].second)] = float(candidates_[i].first / total);
}

int32_t Sampler::draw(const std::vector<float>& weights) {
  double total = 0;
  for (float w : weights) total += w;
  if (!(total > 0)) fail("sampling from a distribution with no mass");
  double u = std::uniform_real_distribution<double>(0.0, total)(rng_);
  int32_t last = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    if (weights[i] <= 0) continue;
    last = int32_t(i);
    u -= weights[i];
    if (u < 0) return int32_t(i);
  }
  return last;
}

double Sampler::uniform() { return std::uniform_real_distribution<double>(0.0, 1.0)(rng_); }

}  // namespace dsv3
