// Perplexity over windows (see perplexity.h).
#include "infer/perplexity.h"

#include <cmath>

#include "backend/ops.h"
#include "core/error.h"

namespace dsv3 {

namespace {

int64_t checked_seq(const ModelConfig& c, int64_t seq) {
  if (seq < 1) fail("perplexity: windows must score at least 1 token, got ", seq);
  if (seq > c.max_position_embeddings)
    fail("perplexity: windows of ", seq, " positions exceed max_position_embeddings (", c.max_position_embeddings, ")");
  return seq;
}

}  // namespace

WindowScorer::WindowScorer(Transformer& model, int64_t seq)
    : model_(model),
      seq_(checked_seq(model.config(), seq)),
      cache_(model.config(), seq),
      logits_(size_t(seq * model.config().vocab_size)) {}

double WindowScorer::loss(std::span<const int32_t> window) {
  const ModelConfig& c = model_.config();
  if (int64_t(window.size()) != seq_ + 1)
    fail("perplexity: a window of ", window.size(), " tokens, expected ", seq_ + 1);
  // forward() checks the inputs window[0..seq); the last target is checked here.
  if (window.back() < 0 || window.back() >= c.vocab_size)
    fail("perplexity: token id ", window.back(), " is outside the vocabulary [0, ", c.vocab_size, ")");
  cache_.clear();
  model_.forward(window.data(), seq_, cache_, logits_.data(), true);
  // The trainer's next-token loss, on the targets window[1..seq].
  const double loss = cross_entropy<float>(logits_.data(), window.data() + 1, seq_, c.vocab_size, nullptr);
  if (!std::isfinite(loss)) fail("perplexity: the model's logits are not finite");
  return loss;
}

PerplexityResult summarize_windows(const std::vector<double>& window_losses, int64_t seq) {
  PerplexityResult r;
  r.windows = int64_t(window_losses.size());
  r.tokens = r.windows * seq;
  if (r.windows == 0) return r;
  for (double l : window_losses) r.loss += l;
  r.loss /= double(r.windows);
  if (r.windows > 1) {
    double ss = 0;
    for (double l : window_losses) ss += (l - r.loss) * (l - r.loss);
    r.loss_se = std::sqrt(ss / double(r.windows - 1) / double(r.windows));
  }
  r.perplexity = std::exp(r.loss);
  return r;
}

}  // namespace dsv3
