// The generation loop (see generate.h).
#include "infer/generate.h"

#include <algorithm>
#include <chrono>

#include "core/error.h"

namespace dsv3 {

GenerateResult generate(Transformer& model, const std::vector<int32_t>& prompt, const GenerateOptions& opt,
                        const std::function<void(int32_t)>& on_token) {
  const ModelConfig& c = model.config();
  if (prompt.empty()) fail("the prompt is empty");
  if (opt.max_tokens < 0) fail("max-tokens must be >= 0");
  const int64_t needed = int64_t(prompt.size()) + opt.max_tokens;
  if (needed > c.max_position_embeddings)
    fail("prompt (", prompt.size(), " tokens) + max-tokens (", opt.max_tokens, ") exceeds max_position_embeddings (",
         c.max_position_embeddings, ")");
  GenerateResult r;
  if (opt.max_tokens == 0) return r;
  Sampler sampler(opt.sampling);
  KvCache cache(c, needed);
  std::vector<float> logits(static_cast<size_t>(c.vocab_size));
  using clock = std::chrono::steady_clock;

  auto t0 = clock::now();
  model.forward(prompt.data(), int64_t(prompt.size()), cache, logits.data(), false);
  r.prefill_seconds = std::chrono::duration<double>(clock::now() - t0).count();

  t0 = clock::now();
  for (;;) {
    const int32_t next = sampler.sample(logits.data(), c.vocab_size);
    r.tokens.push_back(next);
    if (on_token) on_token(next);
    if (opt.stop_at_eos && c.is_eos(next)) {
      r.stopped_at_eos = true;
      break;
    }
    if (int64_t(r.tokens.size()) >= opt.max_tokens) break;
    model.forward(&next, 1, cache, logits.data(), false);
    ++r.decode_steps;
  }
  r.decode_seconds = std::chrono::duration<double>(clock::now() - t0).count();
  return r;
}

}  // namespace dsv3
