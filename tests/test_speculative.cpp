// Speculative decoding with the MTP module (GenerateOptions::speculative_mtp): under greedy
// decoding it gives the plain greedy output, and sampled it draws each token from the
// model's own sampling distribution (accept with min(1, p/q), else a draw from
// max(0, p - q)). On the golden checkpoints, whose MTP modules are untrained, most drafts
// are rejected under greedy decoding; sampled, both branches run often.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>

#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "golden_util.h"
#include "io/safetensors.h"
#include "infer/batch.h"
#include "infer/generate.h"
#include "model/transformer.h"

namespace dsv3 {
namespace {

class Speculative : public testing::TestWithParam<const char*> {};

TEST_P(Speculative, GreedyOutputIsPlainGreedy) {
  Transformer model(test::golden_dir(GetParam()));
  SafetensorsFile golden(test::golden_dir(GetParam()) + "/golden.safetensors");
  const auto prompt = test::read_i32(golden, "greedy_prompt");
  GenerateOptions opt;
  opt.max_tokens = 48;
  opt.stop_at_eos = false;
  const GenerateResult plain = generate(model, prompt, opt);
  opt.speculative_mtp = true;
  for (int64_t draft = 1; draft <= 4; ++draft) {  // beyond 1: the module chained on its own output
    opt.draft = draft;
    const GenerateResult spec = generate(model, prompt, opt);
    EXPECT_EQ(spec.tokens, plain.tokens) << "draft " << draft;
    EXPECT_GT(spec.drafted, 0);
    EXPECT_EQ(spec.decode_steps + spec.accepted, int64_t(spec.tokens.size()) - 1);  // a check: 1 token + those kept
  }
}

// The MTP module's alignment: each draft is the module's greedy prediction at the position
// before the checked token (its h and the checked token, predicting the token after), as a
// reference run of the module over the whole generated sequence gives it.
TEST_P(Speculative, DraftsAreTheModulesPredictionsAtTheirPositions) {
  Transformer model(test::golden_dir(GetParam()));
  const ModelConfig& c = model.config();
  SafetensorsFile golden(test::golden_dir(GetParam()) + "/golden.safetensors");
  const auto prompt = test::read_i32(golden, "greedy_prompt");
  GenerateOptions opt;
  opt.max_tokens = 32;
  opt.stop_at_eos = false;
  opt.speculative_mtp = true;
  const GenerateResult r = generate(model, prompt, opt);
  std::vector<int32_t> full = prompt;
  full.insert(full.end(), r.tokens.begin(), r.tokens.end());
  const int64_t len = int64_t(full.size()), dim = c.hidden_size, P = int64_t(prompt.size());
  // h_i of every position, then the module's prediction at each position i (h_i, token i+1).
  KvCache cache(c, len);
  std::vector<float> logits(size_t(len * c.vocab_size));
  model.forward(full.data(), len, cache, logits.data(), true);
  const std::vector<float> h(model.last_hidden(), model.last_hidden() + len * dim);
  KvCache mtp_cache(c, len, 1);
  std::vector<int32_t> predicted(size_t(len), -1);
  std::vector<float> row(size_t(c.vocab_size));
  for (int64_t i = 0; i + 1 < len; ++i) {
    model.forward_mtp(&full[size_t(i + 1)], h.data() + i * dim, 1, mtp_cache, row.data());
    predicted[size_t(i)] = int32_t(std::max_element(row.begin(), row.end()) - row.begin());
  }
  // Replay the checks: the first checks token P with the draft for P + 1.
  ASSERT_FALSE(r.drafts.empty());
  int64_t k = P;
  for (size_t j = 0; j < r.drafts.size(); ++j) {
    ASSERT_LT(k + 1, len);
    EXPECT_EQ(r.drafts[j], predicted[size_t(k - 1)]) << "draft " << j << " for position " << k + 1;
    k += r.drafts[j] == full[size_t(k + 1)] ? 2 : 1;
  }
}

INSTANTIATE_TEST_SUITE_P(Checkpoints, Speculative, testing::Values("tiny-v3-bf16", "tiny-v3-fp8", "tiny-v2lite-bf16"),
                         [](const testing::TestParamInfo<const char*>& i) {
                           std::string s = i.param;
                           std::replace(s.begin(), s.end(), '-', '_');
                           return s;
                         });

// The first two generated tokens over many seeds against their exact joint distribution
// (top-k 3 keeps it to 9 outcomes): a chi-square test at p = 0.001. The second token is the
// first one the draft decides; the seeds are fixed, so the test is deterministic.
TEST(SpeculativeSampling, TokensFollowTheModelsDistribution) {
  Transformer model(test::golden_dir("tiny-v3-bf16"));
  const ModelConfig& c = model.config();
  const std::vector<int32_t> prompt = {3, 14, 15, 92, 65};
  SamplingParams sp;
  sp.temperature = 1.5f, sp.top_k = 3;
  // Exact: P(t0) from the prompt, P(t1 | t0) from the prompt and t0.
  Sampler sampler(sp);
  std::vector<float> logits(size_t(c.vocab_size)), p0, p1;
  std::map<std::pair<int32_t, int32_t>, double> exact;
  {
    KvCache cache(c, 16);
    model.forward(prompt.data(), int64_t(prompt.size()), cache, logits.data(), false);
    sampler.distribution(logits.data(), c.vocab_size, p0);
  }
  for (int32_t t0 = 0; t0 < c.vocab_size; ++t0) {
    if (p0[size_t(t0)] == 0) continue;
    KvCache cache(c, 16);
    std::vector<int32_t> ids = prompt;
    ids.push_back(t0);
    model.forward(ids.data(), int64_t(ids.size()), cache, logits.data(), false);
    sampler.distribution(logits.data(), c.vocab_size, p1);
    for (int32_t t1 = 0; t1 < c.vocab_size; ++t1)
      if (p1[size_t(t1)] > 0) exact[{t0, t1}] = double(p0[size_t(t0)]) * p1[size_t(t1)];
  }
  ASSERT_EQ(exact.size(), 9u);
  const int runs = 900;
  std::map<std::pair<int32_t, int32_t>, int> seen;
  int64_t drafted = 0, accepted = 0;
  GenerateOptions opt;
  opt.max_tokens = 4;  // t0 from the prompt, then one check of two drafts decides t1
  opt.stop_at_eos = false;
  opt.speculative_mtp = true;
  opt.draft = 2;
  opt.sampling = sp;
  for (int s = 0; s < runs; ++s) {
    opt.sampling.seed = uint64_t(s);
    const GenerateResult r = generate(model, prompt, opt);
    ASSERT_GE(r.tokens.size(), 2u);
    ++seen[{r.tokens[0], r.tokens[1]}];
    drafted += r.drafted, accepted += r.accepted;
  }
  double chi2 = 0;
  for (const auto& [cell, prob] : exact) {
    const double expected = prob * runs, got = seen.count(cell) ? seen[cell] : 0;
    chi2 += (got - expected) * (got - expected) / expected;
  }
  int outside = 0;
  for (const auto& [cell, n] : seen) outside += exact.count(cell) ? 0 : n;
  EXPECT_EQ(outside, 0) << "a pair the filters exclude was generated";
  EXPECT_LT(chi2, 26.12) << "chi-square, 8 degrees of freedom, p = 0.001";
  EXPECT_GT(drafted, 0);
  // With top-k 3 the untrained MTP module's three tokens rarely meet the model's: the
  // accepting branch is checked on its own below.

  // The same inside the batch engine: 30 sequences at a time, each with its own seed.
  seen.clear();
  for (int s = 0; s < runs; s += 30) {
    BatchEngine engine(model, 30, 16, 512);
    std::vector<int64_t> ids;
    for (int i = s; i < s + 30; ++i) {
      opt.sampling.seed = uint64_t(i);
      ids.push_back(engine.add(prompt, opt));
    }
    while (engine.step()) {
    }
    for (int64_t id : ids) ++seen[{engine.sequence(id).tokens[0], engine.sequence(id).tokens[1]}];
  }
  double chi2_batch = 0;
  for (const auto& [cell, prob] : exact) {
    const double expected = prob * runs, got = seen.count(cell) ? seen[cell] : 0;
    chi2_batch += (got - expected) * (got - expected) / expected;
  }
  EXPECT_LT(chi2_batch, 26.12) << "inside the batch engine";
}

// The check itself: whatever the draft distribution q, the token it returns is distributed
// as p (chi-square over 20,000 checks, 5 tokens, p = 0.001), and both branches run.
TEST(SpeculativeSampling, CheckDraftReturnsTheModelsDistribution) {
  const std::vector<float> p = {0.1f, 0.4f, 0.2f, 0.3f, 0.0f}, q = {0.3f, 0.1f, 0.2f, 0.1f, 0.3f};
  SamplingParams sp;
  sp.temperature = 1, sp.seed = 7;
  Sampler sampler(sp);
  const int n = 20000;
  std::vector<int> count(p.size(), 0);
  int accepted = 0;
  for (int i = 0; i < n; ++i) {
    const int32_t d = sampler.draw(q);
    bool ok = false;
    ++count[size_t(check_draft(p, q, d, sampler, ok))];
    accepted += ok;
  }
  EXPECT_EQ(count[4], 0) << "a token p gives no mass";
  double chi2 = 0;
  for (size_t t = 0; t < 4; ++t) chi2 += (count[t] - p[t] * n) * (count[t] - p[t] * n) / (p[t] * n);
  EXPECT_LT(chi2, 16.27) << "chi-square, 3 degrees of freedom, p = 0.001";
  // Acceptance probability: sum over d of q(d) min(1, p(d)/q(d)) = sum min(p, q) = 0.5.
  EXPECT_NEAR(double(accepted) / n, 0.5, 0.02);

  // The test tells a wrong rule apart: "keep the draft if it is the model's most likely token,
  // else draw from the model" skews the output towards the draft's choices.
  std::vector<int> naive(p.size(), 0);
  for (int i = 0; i < n; ++i) {
    const int32_t d = sampler.draw(q);
    ++naive[size_t(d == 1 ? d : sampler.draw(p))];
  }
  double chi2_naive = 0;
  for (size_t t = 0; t < 4; ++t) chi2_naive += (naive[t] - p[t] * n) * (naive[t] - p[t] * n) / (p[t] * n);
  EXPECT_GT(chi2_naive, 16.27) << "the naive rule should fail the same chi-square test";
}

// A checkpoint without an MTP module (its layer dropped, num_nextn_predict_layers 0): asked
// for speculative decoding, a clear error; plain decoding still runs.
TEST(SpeculativeErrors, ACheckpointWithoutMtpSaysSo) {
  namespace fs = std::filesystem;
  const std::string src = test::golden_dir("tiny-v3-bf16"), dir = testing::TempDir() + "/no-mtp";
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::ifstream in(src + "/config.json");
  std::string config((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t at = config.find("\"num_nextn_predict_layers\"");
  ASSERT_NE(at, std::string::npos);
  const size_t colon = config.find(':', at), end = config.find_first_of(",}", colon);
  config.replace(colon + 1, end - colon - 1, " 0");
  std::ofstream(dir + "/config.json") << config;
  Transformer full(src);
  const std::string mtp_prefix = "model.layers." + std::to_string(full.config().num_hidden_layers) + ".";
  SafetensorsFile weights(src + "/model.safetensors");
  std::vector<TensorToWrite> kept;
  for (const auto& [name, t] : weights.tensors())
    if (name.rfind(mtp_prefix, 0) != 0) kept.push_back({name, t.dtype, t.shape, t.data});
  write_safetensors(dir + "/model.safetensors", kept);
  Transformer model(dir);
  GenerateOptions opt;
  opt.max_tokens = 4;
  opt.speculative_mtp = true;
  try {
    generate(model, {1, 2, 3}, opt);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no MTP module"), std::string::npos) << e.what();
  }
  opt.speculative_mtp = false;
  EXPECT_EQ(generate(model, {1, 2, 3}, opt).tokens.size(), 4u);
}

}  // namespace
}  // namespace dsv3
