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
  const int64_t vocab = c.vocab_size, dim = c.hidden_size, P = int64_t(prompt.size()), N = opt.draft;
  // A check feeds [t, d_1 .. d_n] only while n + 1 tokens are still to come, so P +
  // max_tokens - 1 rows suffice, as for plain decoding.
  const int64_t capacity = P + opt.max_tokens;
  GenerateResult r;
  Sampler sampler(opt.sampling);
  KvCache cache(c, capacity), mtp_cache(c, capacity, 1);
  std::vector<float> logits(static_cast<size_t>((N + 1) * vocab)), draft_logits(static_cast<size_t>(vocab)), p;
  std::vector<std::vector<float>> q(static_cast<size_t>(N));  // each draft's distribution
  std::vector<float> hidden(static_cast<size_t>((N + 1) * dim)), chained(static_cast<size_t>(dim));
  std::vector<int32_t> next, check, drafts;
  using clock = std::chrono::steady_clock;
  // Emits a token; true when generation ends with it.
  auto emit = [&](int32_t t) {
    r.tokens.push_back(t);
    if (on_token) on_token(t);
    if (opt.stop_at_eos && c.is_eos(t)) return r.stopped_at_eos = true;
    return int64_t(r.tokens.size()) >= opt.max_tokens;
  };
  // The MTP module over newly committed positions (h rows, each with the token after it):
  // its prediction two ahead of the last, and its output state there (for a chained draft).
  auto mtp = [&](const int32_t* tokens_after, const float* h, int64_t n) {
    model.forward_mtp(tokens_after, h, n, mtp_cache, draft_logits.data());
    std::copy(model.last_mtp_hidden() + (n - 1) * dim, model.last_mtp_hidden() + n * dim, chained.begin());
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
  mtp(next.data(), model.last_hidden(), P);
  bool done = emit(t);
  while (!done) {
    const int64_t left = opt.max_tokens - int64_t(r.tokens.size());
    if (left == 1) {  // one token left: a plain step
      model.forward(&t, 1, cache, logits.data(), false);
      ++r.decode_steps;
      sampler.distribution(logits.data(), vocab, p);
      emit(sampler.draw(p));
      break;
    }
    // Drafts: the first from the module's last committed position, each further one from the
    // module applied to its own output and the draft before (speculative positions of the
    // module's cache, dropped after the check).
    const int64_t n = std::min(N, left - 1), committed = mtp_cache.length();
    drafts.clear();
    for (int64_t j = 0; j < n; ++j) {
      if (j > 0) model.forward_mtp(&drafts.back(), chained.data(), 1, mtp_cache, draft_logits.data()),
                 std::copy(model.last_mtp_hidden(), model.last_mtp_hidden() + dim, chained.begin());
      sampler.distribution(draft_logits.data(), vocab, q[size_t(j)]);
      drafts.push_back(sampler.draw(q[size_t(j)]));
    }
    mtp_cache.truncate(committed);
    r.drafts.insert(r.drafts.end(), drafts.begin(), drafts.end());
    // One forward of the model over [t, d_1 .. d_n] checks them in order.
    check.assign(1, t);
    check.insert(check.end(), drafts.begin(), drafts.end());
    model.forward(check.data(), n + 1, cache, logits.data(), true);
    std::copy(model.last_hidden(), model.last_hidden() + (n + 1) * dim, hidden.begin());
    ++r.decode_steps, r.drafted += n;
    int64_t kept = 0;
    int32_t last = -1;
    for (; kept < n; ++kept) {
      sampler.distribution(logits.data() + kept * vocab, vocab, p);  // the model's after position kept
      bool accepted = false;
      last = check_draft(p, q[size_t(kept)], drafts[size_t(kept)], sampler, accepted);
      if (!accepted) break;
      ++r.accepted;
      if ((done = emit(last))) break;
    }
    if (done) break;
    if (kept == n) {  // all kept: the model's token after the last draft too
      sampler.distribution(logits.data() + n * vocab, vocab, p);
      last = sampler.draw(p);
    }
    // Committed: t and the kept drafts; the rejected drafts' positions are dropped.
    cache.truncate(cache.length() - (n - kept));
    done = emit(last);
    if (done) break;
    // The module over the committed positions, with the true states of the model.
    next.assign(drafts.begin(), drafts.begin() + kept);
    next.push_back(last);
    mtp(next.data(), hidden.data(), kept + 1);
    t = last;
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
    if (opt.draft < 1 || opt.draft > 8) fail("--draft must be in 1..8, not ", opt.draft);
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
