// dsv3 eval (the post-training issue, item 4): pass@k and standard errors against hand
// values; multiple-choice accuracies, exact match and perplexity on a tiny checkpoint equal
// what the model's logits give when computed by hand here; malformed task lines named.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>

#include "core/error.h"
#include "eval/eval.h"
#include "eval/rewards.h"
#include "tokenizer/chat_template.h"
#include "infer/generate.h"
#include "model_fixture.h"

namespace dsv3 {
namespace {

using testing::HasSubstr;

TEST(Eval, PassAtKAndStandardErrorsByHand) {
  EXPECT_DOUBLE_EQ(pass_at_k(5, 2, 1), 0.4);
  EXPECT_NEAR(pass_at_k(5, 2, 2), 1.0 - 3.0 / 10.0, 1e-12);  // 1 - C(3,2)/C(5,2)
  EXPECT_NEAR(pass_at_k(10, 3, 5), 1.0 - 21.0 / 252.0, 1e-12);  // 1 - C(7,5)/C(10,5)
  EXPECT_DOUBLE_EQ(pass_at_k(10, 0, 3), 0.0);
  EXPECT_DOUBLE_EQ(pass_at_k(4, 3, 2), 1.0);  // fewer wrong samples than k
  EXPECT_THROW(pass_at_k(3, 1, 4), Error);
  const EvalMetric m = mean_with_stderr("acc", {1, 0, 1, 1});
  EXPECT_DOUBLE_EQ(m.value, 0.75);
  EXPECT_DOUBLE_EQ(m.stderr_, 0.25);  // sample sd 0.5 / sqrt(4)
  EXPECT_TRUE(std::isnan(mean_with_stderr("x", {0.3}).stderr_));  // undefined for one value
}

std::string strip(const std::string& s) {
  const size_t a = s.find_first_not_of(" \t\r\n"), b = s.find_last_not_of(" \t\r\n");
  return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}

// log-softmax sums from one forward over the whole text, written here.
double by_hand(Transformer& model, const std::vector<int32_t>& ctx, const std::vector<int32_t>& cont) {
  std::vector<int32_t> ids = ctx;
  ids.insert(ids.end(), cont.begin(), cont.end());
  const int64_t V = model.config().vocab_size;
  KvCache cache(model.config(), int64_t(ids.size()));
  std::vector<float> logits(ids.size() * size_t(V));
  model.forward(ids.data(), int64_t(ids.size()), cache, logits.data(), true);
  double total = 0;
  for (size_t i = ctx.size(); i < ids.size(); ++i) {
    const float* row = logits.data() + (i - 1) * size_t(V);
    double z = 0;
    for (int64_t v = 0; v < V; ++v) z += std::exp(double(row[v]));
    total += double(row[ids[i]]) - std::log(z);
  }
  return total;
}

class EvalTask : public testing::Test {
 protected:
  EvalTask() : model_(test::servable_model()), tok_(test::servable_model() + "/tokenizer.json"),
               config_(load_tokenizer_config(test::servable_model())) {}
  std::string write(const std::string& text) {
    const std::string path = dir_ / "task.jsonl";
    std::ofstream(path) << text;
    return path;
  }
  std::vector<int32_t> encode(const std::string& s, bool bos) {
    std::vector<int32_t> ids;
    if (bos && config_.add_bos_token) ids.push_back(*tok_.token_id(*config_.bos_token));
    for (int32_t id : tok_.encode(s)) ids.push_back(id);
    return ids;
  }
  test::ScratchDir dir_;
  Transformer model_;
  Tokenizer tok_;
  TokenizerConfig config_;
};

TEST_F(EvalTask, MultipleChoiceAccuraciesEqualTheLogitsByHand) {
  const std::vector<std::pair<std::string, std::vector<std::string>>> items = {
      {"In the beginning God created", {" the heaven", " a cat", " nothing at all"}},
      {"And God said, Let there be", {" light", " dark", " é"}},
      {"The LORD is my", {" shepherd", " banana split"}},
      {"Jesus", {" wept.", " laughed loudly"}},
      {"The LORD is my ", {"shepherd", "cat"}}};  // a trailing space, moved to the choices as the harness does
  std::string lines;
  std::vector<double> acc, acc_norm, acc_bytes;
  for (size_t q = 0; q < items.size(); ++q) {
    const auto& [ctx, choices] = items[q];
    const int answer = int(q % 2);
    lines += nlohmann::json{{"context", ctx}, {"choices", choices}, {"answer", answer}}.dump() + "\n";
    double best[3] = {-1e300, -1e300, -1e300};
    int pick[3] = {-1, -1, -1};
    // The harness's pairing, written again here: trailing spaces to the choice, the choice's
    // tokens those of context + choice after the context's.
    const size_t keep = ctx.find_last_not_of(' ') + 1;
    const auto ctx_ids = encode(ctx.substr(0, keep), true);
    for (size_t i = 0; i < choices.size(); ++i) {
      const auto whole = encode(ctx + choices[i], true);
      const std::vector<int32_t> cont(whole.begin() + long(ctx_ids.size()), whole.end());
      const double ll = by_hand(model_, ctx_ids, cont);
      int64_t chars = 0;
      for (unsigned char ch : choices[i]) chars += (ch & 0xC0) != 0x80;
      const double s[3] = {ll, ll / double(chars), ll / double(choices[i].size())};
      for (int k = 0; k < 3; ++k)
        if (s[k] > best[k]) best[k] = s[k], pick[k] = int(i);
    }
    acc.push_back(pick[0] == answer), acc_norm.push_back(pick[1] == answer), acc_bytes.push_back(pick[2] == answer);
  }
  const EvalReport r = evaluate(model_, tok_, &config_, write(lines), {});
  EXPECT_EQ(r.kind, "multiple_choice");
  EXPECT_EQ(r.items, 5);
  ASSERT_EQ(r.metrics.size(), 3u);
  EXPECT_DOUBLE_EQ(r.metrics[0].value, mean_with_stderr("", acc).value);
  EXPECT_DOUBLE_EQ(r.metrics[0].stderr_, mean_with_stderr("", acc).stderr_);
  EXPECT_DOUBLE_EQ(r.metrics[1].value, mean_with_stderr("", acc_norm).value);
  EXPECT_DOUBLE_EQ(r.metrics[2].value, mean_with_stderr("", acc_bytes).value);
  EXPECT_NEAR(continuation_loglik(model_, encode("The LORD is my", true), encode(" shepherd", false)),
              by_hand(model_, encode("The LORD is my", true), encode(" shepherd", false)), 1e-4);
}

TEST_F(EvalTask, GenerationExactMatchAndPerplexity) {
  // The greedy answer itself is an exact match; another text is not.
  // (A prompt whose greedy answer is valid UTF-8: a random model's bytes may not be.)
  std::string prompt, said;
  int64_t answer_tokens = 0;
  for (int64_t n = 4; n >= 1 && prompt.empty(); --n)
    for (const char* p : {"In the beginning", "And God said", "The LORD", "Jesus wept.", "Amen", "Blessed are"}) {
      GenerateOptions g;
      g.max_tokens = n;
      const std::string text = tok_.decode(generate(model_, encode(p, true), g).tokens, true);
      if (strip(text).empty()) continue;
      try {
        (void)nlohmann::json(text).dump();
      } catch (const nlohmann::json::exception&) {
        continue;
      }
      prompt = p, said = text, answer_tokens = n;
      break;
    }
  ASSERT_FALSE(prompt.empty());
  const std::string lines = nlohmann::json{{"prompt", prompt}, {"answer", said}}.dump() + "\n" +
                            nlohmann::json{{"prompt", prompt}, {"answer", "something else"}}.dump() + "\n";
  EvalOptions opt;
  opt.max_tokens = answer_tokens, opt.samples = 3, opt.k = {1, 3};
  const EvalReport r = evaluate(model_, tok_, &config_, write(lines), opt);
  EXPECT_EQ(r.kind, "generation");
  ASSERT_EQ(r.metrics.size(), 3u);
  EXPECT_DOUBLE_EQ(r.metrics[0].value, 0.5);  // exact_match
  EXPECT_DOUBLE_EQ(r.metrics[1].value, 0.5);  // pass@1 (greedy: every sample alike)
  EXPECT_DOUBLE_EQ(r.metrics[2].value, 0.5);  // pass@3
  // A stop string: the answer is the text before it.
  const size_t stop_at = said.find_last_not_of(' ');
  if (stop_at != std::string::npos && stop_at > 0 && static_cast<unsigned char>(said[stop_at]) < 0x80) {
    const std::string stop(1, said[stop_at]), before = said.substr(0, said.find(stop));
    const std::string stopped = nlohmann::json{{"prompt", prompt}, {"answer", before}, {"stop", {"never", stop}}}.dump() + "\n";
    EXPECT_DOUBLE_EQ(evaluate(model_, tok_, &config_, write(stopped), opt).metrics[0].value, 1.0) << said << " | " << stop;
  }
  // Perplexity: every text's next-token losses pooled.
  const std::vector<std::string> texts = {"And God saw the light, that it was good.", "Jesus wept."};
  double nll = 0, tokens = 0;
  std::string pl;
  for (const auto& t : texts) {
    const auto ids = encode(t, true);
    nll -= by_hand(model_, {ids[0]}, std::vector<int32_t>(ids.begin() + 1, ids.end()));
    tokens += double(ids.size() - 1);
    pl += nlohmann::json{{"text", t}}.dump() + "\n";
  }
  const EvalReport p = evaluate(model_, tok_, &config_, write(pl), {});
  EXPECT_EQ(p.kind, "perplexity");
  EXPECT_NEAR(p.metrics[0].value, nll / tokens, 1e-5);
  EXPECT_NEAR(p.metrics[1].value, std::exp(nll / tokens), 1e-3);
  EXPECT_GT(p.metrics[0].stderr_, 0.0);  // bootstrap over the two texts
}

// --chat renders each prompt as a user message in the chat template (the greedy answer to
// that rendering, computed here, is an exact match); --reward scores by the verifier, so the
// same text without a final answer scores 0.
TEST_F(EvalTask, ChatPromptsAndVerifierScoring) {
  const std::string prompt = "What is 12 + 30?";
  nlohmann::ordered_json messages = nlohmann::ordered_json::array();
  messages.push_back({{"role", "user"}, {"content", prompt}});
  std::string said;
  int64_t n = 0;
  for (n = 4; n >= 1; --n) {
    GenerateOptions g;
    g.max_tokens = n;
    said = tok_.decode(generate(model_, tok_.encode(apply_chat_template(config_, messages, true)), g).tokens, true);
    try {
      (void)nlohmann::json(said).dump();
      if (!strip(said).empty()) break;
    } catch (const nlohmann::json::exception&) {
    }
  }
  ASSERT_GE(n, 1);
  EvalOptions opt;
  opt.max_tokens = n, opt.chat = true;
  const std::string task = write(nlohmann::json{{"prompt", prompt}, {"answer", said}}.dump() + "\n");
  EXPECT_DOUBLE_EQ(evaluate(model_, tok_, &config_, task, opt).metrics[0].value, 1.0) << said;
  if (!extract_answer(said)) {
    opt.reward = "exact";
    EXPECT_DOUBLE_EQ(evaluate(model_, tok_, &config_, task, opt).metrics[0].value, 0.0) << said;
  }
  opt.reward = "vibes";
  EXPECT_THAT([&] { evaluate(model_, tok_, &config_, task, opt); }, testing::ThrowsMessage<Error>(HasSubstr("unknown reward 'vibes'")));
  TokenizerConfig plain = config_;
  plain.chat_template.reset();
  opt.reward = "";
  EXPECT_THAT([&] { evaluate(model_, tok_, &plain, task, opt); }, testing::ThrowsMessage<Error>(HasSubstr("--chat needs")));
}

TEST_F(EvalTask, MalformedLinesAreNamed) {
  const std::pair<const char*, const char*> cases[] = {
      {"{\"context\": \"a\", \"choices\": [\"b\", \"c\"]}\n", "line 1: the item has no integer \"answer\""},
      {"{\"context\": \"a\", \"choices\": [\"b\", \"c\"], \"answer\": 2}\n", "line 1: \"answer\" 2 is not the index"},
      {"\n{\"text\": \"In the beginning\"}\n{\"prompt\": \"a\", \"answer\": \"b\"}\n", "line 3: a generation item in a perplexity task"},
      {"{\"question\": \"a\"}\n", "line 1: an item has \"choices\""},
      {"not json\n", "line 1: not JSON"},
      {"{\"prompt\": \"a\"}\n", "line 1: \"answer\" must be a string"},
      {"{\"prompt\": \"a\", \"choices\": [\"b\", \"c\"], \"answer\": 0}\n", "line 1: an item has one of"},
      {"", "no items"}};
  for (const auto& [text, says] : cases) {
    try {
      evaluate(model_, tok_, &config_, write(text), {});
      ADD_FAILURE() << "no error for " << text;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr(says)) << text;
    }
  }
  EvalOptions bad;
  bad.k = {4};
  EXPECT_THROW(evaluate(model_, tok_, &config_, write("{\"prompt\": \"a\", \"answer\": \"b\"}\n"), bad), Error);
}

}  // namespace
}  // namespace dsv3
