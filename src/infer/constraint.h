// A constraint on the tokens a sequence may produce (structured output): before each token is
// sampled, mask() lowers the logits of the tokens it forbids to kMasked (finite, so the
// sampler's checks hold, and far below any real logit); accept() is told the token chosen.
// The batch engine applies it to a sequence whose GenerateOptions carry one; the grammar
// itself lives with its user (serve/json_grammar.h). Uses nothing.
#pragma once
#include <cstdint>

namespace dsv3 {

class TokenConstraint {
 public:
  static constexpr float kMasked = -1e30f;
  virtual ~TokenConstraint() = default;
  virtual void mask(float* logits, int64_t vocab) = 0;
  virtual void accept(int32_t token) = 0;
  // The text could not be completed within the constraint (it ended as the only way out).
  virtual bool failed() const { return false; }
};

}  // namespace dsv3
