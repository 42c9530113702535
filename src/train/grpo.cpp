// GRPO's objective and gradient (see grpo.h).
#include "train/grpo.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace dsv3 {

std::vector<double> group_advantages(const std::vector<double>& rewards, const GrpoConfig& cfg) {
  if (rewards.empty()) fail("GRPO: a group needs at least one output, it has none");
  // Equal rewards carry no signal: exactly zero (a float mean of equal values may miss them).
  if (std::all_of(rewards.begin(), rewards.end(), [&](double r) { return r == rewards[0]; }))
    return std::vector<double>(rewards.size(), 0.0);
  double mean = 0;
  for (double r : rewards) mean += r;
  mean /= double(rewards.size());
  double var = 0;
  for (double r : rewards) var += (r - mean) * (r - mean);
  const double sd = std::sqrt(var / double(rewards.size()));
  std::vector<double> a;
  for (double r : rewards) a.push_back(cfg.no_std ? r - mean : (r - mean) / (sd + cfg.eps));
  return a;
}

GrpoLoss grpo_loss(const std::vector<GrpoOutput>& outputs, const std::vector<double>& advantages, const GrpoConfig& cfg) {
  if (outputs.empty()) fail("GRPO: a group needs at least one output, it has none");
  if (advantages.size() != outputs.size()) fail("GRPO: ", advantages.size(), " advantages for ", outputs.size(), " outputs");
  if (cfg.loss_norm != "seq" && cfg.loss_norm != "token") fail("GRPO: loss normalisation '", cfg.loss_norm, "' is not seq or token");
  int64_t all_tokens = 0;
  for (size_t i = 0; i < outputs.size(); ++i) {
    const GrpoOutput& o = outputs[i];
    if (o.logp.empty()) fail("GRPO: output ", i, " has no tokens");
    if (o.old_logp.size() != o.logp.size() || o.ref_logp.size() != o.logp.size())
      fail("GRPO: output ", i, " has ", o.logp.size(), " log-probabilities but ", o.old_logp.size(), " old and ", o.ref_logp.size(),
           " reference ones");
    all_tokens += int64_t(o.logp.size());
  }
  GrpoLoss out;
  out.dlogp.resize(outputs.size());
  int64_t clipped = 0;
  for (size_t i = 0; i < outputs.size(); ++i) {
    const GrpoOutput& o = outputs[i];
    const double A = advantages[i];
    // Each token's weight in the loss: 1/|o_i| / G (seq) or 1 / all tokens (token).
    const double w = cfg.loss_norm == "seq" ? 1.0 / double(o.logp.size()) / double(outputs.size()) : 1.0 / double(all_tokens);
    out.dlogp[i].resize(o.logp.size());
    for (size_t t = 0; t < o.logp.size(); ++t) {
      const double rho = std::exp(o.logp[t] - o.old_logp[t]);
      const double clipped_rho = std::clamp(rho, 1 - cfg.clip_low, 1 + cfg.clip_high);
      const double plain = rho * A, clip = clipped_rho * A;
      // min(plain, clip): the clipped branch has no gradient (rho outside the clip range).
      const bool use_clip = clip < plain;
      double obj = use_clip ? clip : plain;
      double dobj = use_clip ? 0.0 : rho * A;  // d(rho A)/d logp = rho A
      clipped += use_clip;
      // KL = e^(ref - logp) - (ref - logp) - 1; d/d logp = -e^(ref - logp) + 1.
      const double d = o.ref_logp[t] - o.logp[t];
      const double kl = std::exp(d) - d - 1;
      obj -= cfg.beta * kl;
      dobj -= cfg.beta * (1 - std::exp(d));
      out.kl += kl / double(all_tokens);
      out.loss -= w * obj;
      out.dlogp[i][t] = -w * dobj;
    }
  }
  out.clipped_fraction = double(clipped) / double(all_tokens);
  return out;
}

}  // namespace dsv3
