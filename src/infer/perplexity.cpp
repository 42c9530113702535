// Perplexity over windows (see perplexity.h).
#include "infer/perplexity.h"

#include <algorithm>
#include <cmath>

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
  for (size_t i = 0; i < window.size(); ++i)
    if (window[i] < 0 || window[i] >= c.vocab_size)
      fail("perplexity: token id ", window[i], " is outside the vocabulary [0, ", c.vocab_size, ")");
  cache_.clear();
  model_.forward(window.data(), seq_, cache_, logits_.data(), true);
  // -log softmax(row)[target] = logsumexp(row) - row[target], in double with the row's max
  // taken out so that exp cannot overflow.
  double total = 0;
  for (int64_t i = 0; i < seq_; ++i) {
    const float* row = logits_.data() + i * c.vocab_size;
    float max = row[0];
    for (int64_t v = 1; v < c.vocab_size; ++v) max = std::max(max, row[v]);
    double sum = 0;
    for (int64_t v = 0; v < c.vocab_size; ++v) sum += std::exp(double(row[v]) - double(max));
    const double nll = double(max) + std::log(sum) - double(row[window[size_t(i + 1)]]);
    if (!std::isfinite(nll)) fail("perplexity: the model's logits at position ", i, " are not finite");
    total += nll;
  }
  return total / double(seq_);
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
