// Text generation: prefill the prompt into the latent KV cache, then decode one token per
// forward pass until EOS or max_tokens. Uses model and sampler.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "infer/constraint.h"
#include "infer/sampler.h"
#include "model/transformer.h"

namespace dsv3 {

struct GenerateOptions {
  int64_t max_tokens = 128;
  SamplingParams sampling;
  bool stop_at_eos = true;
  // Speculative decoding with the checkpoint's MTP module (§2.2, §5.4.3): it drafts the
  // token after next, and one forward of the main model over [next, draft] checks it. A
  // draft is accepted with probability min(1, p/q) (p the model's, q the draft's sampling
  // distribution) and otherwise replaced by a draw from max(0, p - q): the output follows
  // the model's own sampling distribution, and under greedy decoding it is the plain greedy
  // output (up to ties within float rounding: the check's two-row forward rounds its sums in
  // another order than a one-row step).
  bool speculative_mtp = false;
  // Drafts per check (1..8): beyond the first, the module is applied again to its own output
  // and the draft before it (the released module was trained for depth 1, so later drafts
  // are accepted less often). The model checks all of them in one forward of draft + 1 tokens.
  int64_t draft = 1;
  // The batch engine records each token's log-probability under the model (the softmax of
  // its logits before temperature or filtering, as OpenAI's API reports them; with a
  // constraint, of the row it masked) and the `logprobs` most likely tokens beside it
  // (0..20); -1: nothing recorded.
  int64_t logprobs = -1;
  // Structured output: the tokens this sequence may produce (one constraint per sequence:
  // it keeps the sequence's state). Not with speculative decoding.
  std::shared_ptr<TokenConstraint> constraint;
};

struct TokenLogprobs {
  float logprob = 0;                             // the chosen token's
  std::vector<std::pair<int32_t, float>> top;    // most likely first
};

struct GenerateResult {
  std::vector<int32_t> tokens;  // generated, EOS included if it was produced
  bool stopped_at_eos = false;
  double prefill_seconds = 0, decode_seconds = 0;
  int64_t decode_steps = 0;  // forward passes of the main model after the prefill
  int64_t drafted = 0, accepted = 0;  // speculative decoding: drafts checked, drafts kept
  std::vector<int32_t> drafts;        // the drafts, in order (tests check the MTP's alignment)
};

// One check of speculative sampling: the draft d was drawn from q; returns d if it is
// accepted (with probability min(1, p[d] / q[d])), else a draw from max(0, p - q)
// renormalised, and says which. Whatever q is, the token returned is distributed as p.
int32_t check_draft(const std::vector<float>& p, const std::vector<float>& q, int32_t d, Sampler& sampler,
                    bool& accepted);

// on_token is called with each generated token as soon as it is chosen.
GenerateResult generate(Transformer& model, const std::vector<int32_t>& prompt, const GenerateOptions& opt,
                        const std::function<void(int32_t)>& on_token = {});

}  // namespace dsv3
