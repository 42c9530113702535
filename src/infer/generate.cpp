// The generation loop (see generate.h).
#include "infer/generate.h"

#include <algorithm>
#include <chrono>

#include "core/error.h"

namespace dsv3 {

int32_t check_draft(const std::vector<float>& p, const std::vector<float>& q, int32_t d, Sampler& sampler,
                    bool& accepted) {
  const double ratio = q[size_t(d)] > 0 ? double(p[size_t(d)]) / q[size_t(d)] : 0.0;
  accepted = ratio >= 1 || sampler.uniform() < ratio;
  if (accepted) return d;
  thread_local std::vector<float> residual;
  residual.resize(p.size());
  double mass = 0;
  for (size_t i = 0; i < p.size(); ++i) mass += (residual[i] = std::max(0.0f, p[i] - q[i]));
  return sampler.draw(mass > 0 ? residual : p);
}

namespace {

// The speculative loop of generate() (GenerateOptions::speculative_mtp), after the checks.
GenerateResult generate_speculative(Transformer& model, const std::vector<int32_t>& prompt, const GenerateOptions& opt,
                                    const std::function<void(int32_t)>& on_token) {
  const ModelConfig& c = model.config();
  const int64_t vocab = c.vocab_size, dim = c.hidden_size, P = int64_t(prompt.size());
  // A check feeds [t, d] only while two tokens are still to come, so P + max_tokens - 1
  // rows suffice, as for plain decoding.
  const int64_t capacity = P + opt.max_tokens;
  GenerateResult r;
  Sampler sampler(opt.sampling);
  KvCache cache(c, capacity), mtp_cache(c, capacity, 1);
  std::vector<float> logits(static_cast<size_t>(2 * vocab)), draft_logits(static_cast<size_t>(vocab)), p, q;
  std::vector<float> hidden(static_cast<size_t>(2 * dim));
  std::vector<int32_t> next;
  using clock = std::chrono::steady_clock;
  // Emits a token; true when generation ends with it.
  auto emit = [&](int32_t t) {
    r.tokens.push_back(t);
    if (on_token) on_token(t);
    if (opt.stop_at_eos && c.is_eos(t)) return r.stopped_at_eos = true;
    return int64_t(r.tokens.size()) >= opt.max_tokens;
  };

  auto t0 = clock::now();
  model.forward(prompt.data(), P, cache, logits.data(), false);
  r.prefill_seconds = std::chrono::duration<double>(clock::now() - t0).count();
  t0 = clock::now();
  sampler.distribution(logits.data(), vocab, p);
  int32_t t = sampler.draw(p);
  // The MTP module over the prompt: position i combines h_i with token i+1 (the last with t).
  next.assign(prompt.begin() + 1, prompt.end());
  next.push_back(t);
  model.forward_mtp(next.data(), model.last_hidden(), P, mtp_cache, draft_logits.data());
  bool done = emit(t);
  while (!done) {
    if (int64_t(r.tokens.size()) + 1 == opt.max_tokens) {  // one token left: a plain step
      model.forward(&t, 1, cache, logits.data(), false);
      ++r.decode_steps;
      sampler.distribution(logits.data(), vocab, p);
      emit(sampler.draw(p));
      break;
    }
    sampler.distribution(draft_logits.data(), vocab, q);
    const int32_t d = sampler.draw(q);
    r.drafts.push_back(d);
    const int32_t pair[2] = {t, d};
    model.forward(pair, 2, cache, logits.data(), true);
    ++r.decode_steps, ++r.drafted;
    std::copy(model.last_hidden(), model.last_hidden() + 2 * dim, hidden.begin());
    sampler.distribution(logits.data(), vocab, p);  // the model's distribution after t
    bool accepted = false;
    const int32_t a = check_draft(p, q, d, sampler, accepted);
    if (accepted) {  // d, then the model's token after it
      ++r.accepted;
      if ((done = emit(d))) break;
      sampler.distribution(logits.data() + vocab, vocab, p);
      const int32_t after = sampler.draw(p);
      done = emit(after);
      const int32_t pair_next[2] = {d, after};
      if (!done) model.forward_mtp(pair_next, hidden.data(), 2, mtp_cache, draft_logits.data());
      t = after;
    } else {  // rejected: a, drawn from what the draft under-covers; d's position dropped
      cache.truncate(cache.length() - 1);
      done = emit(a);
      if (!done) model.forward_mtp(&a, hidden.data(), 1, mtp_cache, draft_logits.data());
      t = a;
    }
  }
  r.decode_seconds = std::chrono::duration<double>(clock::now() - t0).count();
  return r;
}

}  // namespace

GenerateResult generate(Transformer& model, const std::vector<int32_t>& prompt, const GenerateOptions& opt,
                        const std::function<void(int32_t)>& on_token) {
  const ModelConfig& c = model.config();
  if (prompt.empty()) fail("the prompt is empty");
  if (opt.max_tokens < 0) fail("max-tokens must be >= 0");
  if (opt.max_tokens > c.max_position_embeddings)  // (and no overflow below)
    fail("max-tokens (", opt.max_tokens, ") exceeds max_position_embeddings (", c.max_position_embeddings, ")");
  const int64_t needed = int64_t(prompt.size()) + opt.max_tokens;
  if (needed > c.max_position_embeddings)
    fail("prompt (", prompt.size(), " tokens) + max-tokens (", opt.max_tokens, ") exceeds max_position_embeddings (",
         c.max_position_embeddings, ")");
  GenerateResult r;
  if (opt.max_tokens == 0) return r;
  if (opt.speculative_mtp) {
    if (c.num_nextn_predict_layers < 1 || model.weights().mtp.empty())
      fail("--speculative mtp: this checkpoint has no MTP module (num_nextn_predict_layers = 0)");
    return generate_speculative(model, prompt, opt, on_token);
  }
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
