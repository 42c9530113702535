// `dsv3 eval` (see eval.h).
#include "eval/eval.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>

#include "core/error.h"
#include "eval/rewards.h"
#include "tokenizer/chat_template.h"
#include "infer/generate.h"

namespace dsv3 {

using nlohmann::json;

double continuation_loglik(Transformer& model, const std::vector<int32_t>& context, const std::vector<int32_t>& continuation) {
  if (context.empty()) fail("eval: a continuation needs a non-empty context");
  if (continuation.empty()) fail("eval: an empty continuation has no likelihood");
  std::vector<int32_t> ids = context;
  ids.insert(ids.end(), continuation.begin(), continuation.end());
  const ModelConfig& c = model.config();
  if (int64_t(ids.size()) > c.max_position_embeddings)
    fail("eval: context + continuation are ", ids.size(), " tokens, more than the model's ", c.max_position_embeddings);
  KvCache cache(c, int64_t(ids.size()));
  std::vector<float> logits(ids.size() * size_t(c.vocab_size));
  model.forward(ids.data(), int64_t(ids.size()), cache, logits.data(), true);
  double total = 0;
  for (size_t i = 0; i < continuation.size(); ++i) {
    const float* row = logits.data() + (context.size() - 1 + i) * size_t(c.vocab_size);  // predicts continuation[i]
    for (int64_t v = 0; v < c.vocab_size; ++v)
      if (!std::isfinite(row[v])) fail("eval: logit ", v, " is ", row[v], ": the model produced non-finite values");
    const float m = *std::max_element(row, row + c.vocab_size);
    double z = 0;
    for (int64_t v = 0; v < c.vocab_size; ++v) z += std::exp(double(row[v] - m));
    total += double(row[continuation[i]] - m) - std::log(z);
  }
  return total;
}

double pass_at_k(int64_t n, int64_t c, int64_t k) {
  if (k < 1 || k > n || c < 0 || c > n) fail("pass@k: needs 1 <= k <= n and 0 <= c <= n (n ", n, ", c ", c, ", k ", k, ")");
  if (n - c < k) return 1.0;
  // 1 - C(n-c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i), without large binomials.
  double miss = 1;
  for (int64_t i = n - c + 1; i <= n; ++i) miss *= 1.0 - double(k) / double(i);
  return 1.0 - miss;
}

EvalMetric mean_with_stderr(const std::string& name, const std::vector<double>& values) {
  EvalMetric m{name, 0, NAN};  // one value: no standard error
  if (values.empty()) return m;
  for (double v : values) m.value += v;
  m.value /= double(values.size());
  if (values.size() > 1) {
    double ss = 0;
    for (double v : values) ss += (v - m.value) * (v - m.value);
    m.stderr_ = std::sqrt(ss / double(values.size() - 1)) / std::sqrt(double(values.size()));
  }
  return m;
}

namespace {

std::string strip(const std::string& s) {
  const size_t a = s.find_first_not_of(" \t\r\n"), b = s.find_last_not_of(" \t\r\n");
  return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}

// UTF-8 characters of s (continuation bytes not counted).
int64_t characters(const std::string& s) {
  int64_t n = 0;
  for (unsigned char ch : s) n += (ch & 0xC0) != 0x80;
  return n;
}

}  // namespace

EvalReport evaluate(Transformer& model, const Tokenizer& tok, const TokenizerConfig* config, const std::string& task_path,
                    const EvalOptions& opt) {
  std::ifstream in(task_path);
  if (!in) fail(task_path, ": cannot read");
  if (opt.samples < 1) fail("--samples must be >= 1, not ", opt.samples);
  if (opt.max_tokens < 1) fail("--max-tokens must be >= 1, not ", opt.max_tokens);
  if (opt.bootstrap < 0) fail("--bootstrap must be >= 0, not ", opt.bootstrap);
  for (int64_t k : opt.k)
    if (k < 1 || k > opt.samples) fail("pass@", k, " needs 1 <= k <= --samples (", opt.samples, ")");
  if (opt.chat && (!config || !config->chat_template))
    fail("--chat needs the checkpoint's chat template (tokenizer_config.json's chat_template)");
  if (!opt.reward.empty()) check_reward_name(opt.reward);  // now, not at the first answer
  std::optional<int32_t> bos;
  if (opt.bos && config && config->add_bos_token && config->bos_token) {
    bos = tok.token_id(*config->bos_token);
    if (!bos) fail("tokenizer_config.json asks for BOS ", *config->bos_token, ", which tokenizer.json does not have");
  }
  auto encode = [&](const std::string& text, bool with_bos) {
    std::vector<int32_t> ids;
    if (with_bos && bos) ids.push_back(*bos);
    const auto body = tok.encode(text);
    ids.insert(ids.end(), body.begin(), body.end());
    return ids;
  };
  EvalReport report;
  std::vector<double> acc, acc_norm, acc_bytes, exact;
  std::vector<std::vector<double>> pass(opt.k.size());
  std::vector<double> doc_nll, doc_tokens;  // perplexity: each text's summed loss and token count
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    if (opt.limit > 0 && report.items >= opt.limit) break;
    const std::string at = task_path + " line " + std::to_string(n);
    json j;
    try {
      j = json::parse(line);
    } catch (const json::exception& e) {
      fail(at, ": not JSON (", e.what(), ")");
    }
    if (!j.is_object()) fail(at, ": expected an object");
    const int kinds = int(j.contains("choices")) + int(j.contains("prompt")) + int(j.contains("text"));
    if (kinds > 1) fail(at, ": an item has one of \"choices\", \"prompt\" and \"text\", not several");
    const std::string kind = j.contains("choices") ? "multiple_choice" : j.contains("prompt") ? "generation"
                             : j.contains("text")  ? "perplexity" : "";
    if (kind.empty()) fail(at, ": an item has \"choices\" (multiple choice), \"prompt\" (generation) or \"text\" (perplexity)");
    if (report.kind.empty()) report.kind = kind;
    if (kind != report.kind) fail(at, ": a ", kind, " item in a ", report.kind, " task (one kind per file)");
    auto text_of = [&](const char* key) {
      if (!j.contains(key) || !j[key].is_string()) fail(at, ": \"", key, "\" must be a string");
      return j[key].get<std::string>();
    };
    if (kind == "multiple_choice") {
      const std::string context = text_of("context");
      const json& choices = j["choices"];
      if (!choices.is_array() || choices.size() < 2) fail(at, ": \"choices\" must be an array of at least 2 strings");
      if (!j.contains("answer") || !j["answer"].is_number_integer()) fail(at, ": the item has no integer \"answer\"");
      const int64_t answer = j["answer"].get<int64_t>();
      if (answer < 0 || answer >= int64_t(choices.size())) fail(at, ": \"answer\" ", answer, " is not the index of a choice");
      // As lm-evaluation-harness pairs them: the context's trailing spaces move to the
      // front of each choice, context + choice is encoded whole, and the choice's tokens are
      // those after the context's own (so " Paris" is one token, not a lone space and "Paris").
      const size_t keep = context.find_last_not_of(' ') == std::string::npos ? 0 : context.find_last_not_of(' ') + 1;
      const std::string ctx_text = context.substr(0, keep), moved = context.substr(keep);
      const auto ctx = encode(ctx_text, true);
      if (ctx.empty()) fail(at, ": the context encodes to no tokens");
      double best[3] = {-INFINITY, -INFINITY, -INFINITY};
      int64_t pick[3] = {-1, -1, -1};
      for (size_t i = 0; i < choices.size(); ++i) {
        if (!choices[i].is_string()) fail(at, ": choice ", i, " is not a string");
        const std::string choice = choices[i];
        const auto whole = encode(ctx_text + moved + choice, true);
        const std::vector<int32_t> cont(whole.begin() + long(std::min(ctx.size(), whole.size())), whole.end());
        if (cont.empty()) fail(at, ": choice ", i, " adds no tokens to the context");
        const double ll = continuation_loglik(model, ctx, cont);
        const double scores[3] = {ll, ll / double(std::max<int64_t>(1, characters(choice))), ll / double(std::max<size_t>(1, choice.size()))};
        for (int s = 0; s < 3; ++s)
          if (scores[s] > best[s]) best[s] = scores[s], pick[s] = int64_t(i);
      }
      acc.push_back(pick[0] == answer), acc_norm.push_back(pick[1] == answer), acc_bytes.push_back(pick[2] == answer);
    } else if (kind == "generation") {
      const std::string prompt = text_of("prompt"), answer = text_of("answer");
      std::vector<std::string> stop;
      if (j.contains("stop")) {
        if (!j["stop"].is_array()) fail(at, ": \"stop\" must be an array of strings");
        for (const json& s : j["stop"]) {
          if (!s.is_string() || s.get<std::string>().empty()) fail(at, ": \"stop\" must hold non-empty strings");
          stop.push_back(s);
        }
      }
      const std::vector<int32_t> ids = opt.chat ? tok.encode(user_turn(*config, prompt)) : encode(prompt, true);
      GenerateOptions g;
      g.max_tokens = std::min<int64_t>(opt.max_tokens, model.config().max_position_embeddings - int64_t(ids.size()));
      if (g.max_tokens < 1) fail(at, ": the prompt fills the model's context");
      g.sampling.temperature = opt.temperature;
      int64_t correct = 0;
      bool first_ok = false;
      for (int64_t s = 0; s < opt.samples; ++s) {
        if (s > 0 && opt.temperature == 0) {  // greedy: every sample is the first
          correct += first_ok;
          continue;
        }
        g.sampling.seed = opt.seed + uint64_t(report.items) * 1000003ULL + uint64_t(s);
        const auto out = generate(model, ids, g);
        std::string text = tok.decode(out.tokens, true);
        size_t cut = std::string::npos;  // the earliest stop string ends the answer
        for (const std::string& st : stop) cut = std::min(cut, text.find(st));
        if (cut != std::string::npos) text.resize(cut);
        const bool ok = opt.reward.empty() ? strip(text) == strip(answer) : reward(opt.reward, text, answer) == 1;
        correct += ok;
        if (s == 0) exact.push_back(ok), first_ok = ok;  // exact_match: the first (greedy) answer
      }
      for (size_t q = 0; q < opt.k.size(); ++q) pass[q].push_back(pass_at_k(opt.samples, correct, opt.k[q]));
    } else {
      const auto ids = encode(text_of("text"), true);
      if (ids.size() < 2) fail(at, ": a text needs at least 2 tokens to be scored");
      const std::vector<int32_t> first(ids.begin(), ids.begin() + 1), rest(ids.begin() + 1, ids.end());
      doc_nll.push_back(-continuation_loglik(model, first, rest));
      doc_tokens.push_back(double(rest.size()));
    }
    ++report.items;
    if (opt.on_item) opt.on_item(report.items);
  }
  if (report.items == 0) fail(task_path, ": no items");
  if (report.kind == "multiple_choice") {
    report.metrics = {mean_with_stderr("acc", acc), mean_with_stderr("acc_norm", acc_norm), mean_with_stderr("acc_bytes", acc_bytes)};
  } else if (report.kind == "generation") {
    report.metrics.push_back(mean_with_stderr("exact_match", exact));
    for (size_t q = 0; q < opt.k.size(); ++q) report.metrics.push_back(mean_with_stderr("pass@" + std::to_string(opt.k[q]), pass[q]));
  } else {
    // Pooled over tokens; the standard errors by resampling texts with replacement.
    auto pooled = [&](const std::vector<size_t>& pick) {
      double nll = 0, tokens = 0;
      for (size_t i : pick) nll += doc_nll[i], tokens += doc_tokens[i];
      return nll / tokens;
    };
    std::vector<size_t> all(doc_nll.size());
    for (size_t i = 0; i < all.size(); ++i) all[i] = i;
    const double loss = pooled(all);
    std::mt19937_64 rng(opt.seed);
    std::uniform_int_distribution<size_t> draw(0, all.size() - 1);
    std::vector<double> losses, ppls;
    for (int64_t b = 0; b < opt.bootstrap && all.size() > 1; ++b) {
      std::vector<size_t> pick(all.size());
      for (size_t& i : pick) i = draw(rng);
      losses.push_back(pooled(pick)), ppls.push_back(std::exp(losses.back()));
    }
    auto spread = [](const std::vector<double>& v) {
      if (v.size() < 2) return double(NAN);  // one text, or no resamples: no standard error
      double m = 0, ss = 0;
      for (double x : v) m += x;
      m /= double(v.size());
      for (double x : v) ss += (x - m) * (x - m);
      return std::sqrt(ss / double(v.size() - 1));
    };
    report.metrics = {{"loss", loss, spread(losses)}, {"perplexity", std::exp(loss), spread(ppls)}};
  }
  return report;
}

}  // namespace dsv3
