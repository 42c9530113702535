// Group Relative Policy Optimization (DeepSeekMath §4.1; DeepSeek-V3 §5.2.2): the objective
// of one group of G outputs sampled for the same prompt, and its gradient with respect to
// each output token's log-probability under the policy being trained. No value model: an
// output's advantage is its reward against the group's,
//   A_i = (r_i - mean(r)) / (std(r) + eps)             (or r_i - mean(r) with no_std: Dr. GRPO)
// applied to every token of output i. Per token, with ratio rho = pi / pi_old (pi_old: the
// policy that sampled, its log-probabilities stored at sampling time):
//   objective = min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A) - beta KL
//   KL = pi_ref / pi - log(pi_ref / pi) - 1            (the unbiased, always >= 0 estimator)
// and the loss is minus the objective averaged over each output's tokens and then over the
// group (DeepSeekMath's, loss_norm seq), or over all the group's tokens (token; DAPO).
// std is the population standard deviation of the group's rewards. Uses nothing else.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dsv3 {

struct GrpoConfig {
  double clip_low = 0.2, clip_high = 0.2;  // epsilon; DAPO raises clip_high (--clip-high)
  double beta = 0.04;                      // KL weight (DeepSeekMath: 0.04)
  bool no_std = false;                     // Dr. GRPO: advantages not divided by the std
  std::string loss_norm = "seq";           // "seq" (DeepSeekMath) or "token"
  double eps = 1e-4;                       // in the advantage's denominator
};

// The advantages of a group's rewards; Error for an empty group.
std::vector<double> group_advantages(const std::vector<double>& rewards, const GrpoConfig& cfg);

// One output of the group: per token, the log-probabilities under the policy being trained
// (logp), the sampling policy (old_logp) and the frozen reference (ref_logp).
struct GrpoOutput {
  std::vector<double> logp, old_logp, ref_logp;
};

struct GrpoLoss {
  double loss = 0;                   // minus the objective, normalised
  double kl = 0;                     // mean KL estimate over all tokens
  double clipped_fraction = 0;       // tokens whose clipped term was the smaller
  std::vector<std::vector<double>> dlogp;  // d loss / d logp, per output and token
};

// The loss of a group and its gradient; Error naming the output whose lengths disagree.
GrpoLoss grpo_loss(const std::vector<GrpoOutput>& outputs, const std::vector<double>& advantages, const GrpoConfig& cfg);

}  // namespace dsv3
