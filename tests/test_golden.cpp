// Parity with DeepSeek's official inference code (float32) on the golden checkpoints:
// logits at every position, intermediate states, routing, and greedy decoding with the
// latent KV cache - for the absorbed and the naive form of MLA; and the perplexity these
// logits imply.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "golden_util.h"
#include "infer/perplexity.h"
#include "model/transformer.h"

namespace dsv3 {
namespace {

using test::golden_dir;

struct Case {
  std::string checkpoint;
  AttnForm form;
};

std::string case_name(const testing::TestParamInfo<Case>& info) {
  std::string s = info.param.checkpoint + (info.param.form == AttnForm::absorbed ? "_absorbed"
                                           : info.param.form == AttnForm::naive  ? "_naive"
                                                                                 : "_auto");
  std::replace(s.begin(), s.end(), '-', '_');
  return s;
}

class Golden : public testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    model_ = std::make_unique<Transformer>(golden_dir(GetParam().checkpoint));
    model_->attn_form = GetParam().form;
    golden_ = std::make_unique<SafetensorsFile>(golden_dir(GetParam().checkpoint) + "/golden.safetensors");
  }
  // The criterion: max |diff| <= 1e-4 * max |golden|.
  void expect_close(const std::vector<float>& got, const std::vector<float>& want, const std::string& what) {
    ASSERT_EQ(got.size(), want.size()) << what;
    const float tol = 1e-4f * test::max_abs(want);
    EXPECT_LE(test::max_abs_diff(got.data(), want.data(), got.size()), tol) << what;
  }
  std::unique_ptr<Transformer> model_;
  std::unique_ptr<SafetensorsFile> golden_;
};

TEST_P(Golden, LogitsAtEveryPosition) {
  const int64_t vocab = model_->config().vocab_size;
  for (int k = 0; k < 4; ++k) {
    const auto tokens = test::read_i32(*golden_, "tokens_" + std::to_string(k));
    const int64_t n = int64_t(tokens.size());
    KvCache cache(model_->config(), n);
    std::vector<float> logits(static_cast<size_t>(n * vocab));
    model_->forward(tokens.data(), n, cache, logits.data(), true);
    expect_close(logits, test::read_f32(*golden_, "logits_" + std::to_string(k)), "logits_" + std::to_string(k));
  }
}

TEST_P(Golden, IntermediateStatesAndRouting) {
  const ModelConfig& c = model_->config();
  const auto tokens2 = test::read_i32(*golden_, "tokens_2");
  KvCache cache(c, int64_t(tokens2.size()));
  std::vector<float> logits(static_cast<size_t>(c.vocab_size));
  ForwardTrace trace;
  model_->forward(tokens2.data(), int64_t(tokens2.size()), cache, logits.data(), false, &trace);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)
    expect_close(trace.layer_out[size_t(l)], test::read_f32(*golden_, "layer_" + std::to_string(l) + "_out_2"),
                 "layer " + std::to_string(l));
  for (auto& [layer, routing] : trace.routing) {
    const auto want_idx = test::read_i32(*golden_, "route_indices_layer_" + std::to_string(layer) + "_2");
    const auto want_w = test::read_f32(*golden_, "route_weights_layer_" + std::to_string(layer) + "_2");
    const int64_t k = c.num_experts_per_tok;
    ASSERT_EQ(routing.experts.size(), want_idx.size());
    for (size_t t = 0; t < tokens2.size(); ++t) {  // goldens list each token's experts ascending
      std::vector<int64_t> order(static_cast<size_t>(k));
      std::iota(order.begin(), order.end(), 0);
      std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
        return routing.experts[t * size_t(k) + size_t(a)] < routing.experts[t * size_t(k) + size_t(b)];
      });
      for (int64_t j = 0; j < k; ++j) {
        EXPECT_EQ(routing.experts[t * size_t(k) + size_t(order[size_t(j)])], want_idx[t * size_t(k) + size_t(j)])
            << "layer " << layer << " token " << t;
        EXPECT_NEAR(routing.weights[t * size_t(k) + size_t(order[size_t(j)])], want_w[t * size_t(k) + size_t(j)], 1e-5)
            << "layer " << layer << " token " << t;
      }
    }
  }
  const auto tokens3 = test::read_i32(*golden_, "tokens_3");
  KvCache cache3(c, int64_t(tokens3.size()));
  model_->forward(tokens3.data(), int64_t(tokens3.size()), cache3, logits.data(), false, &trace);
  expect_close(trace.prenorm_hidden, test::read_f32(*golden_, "prenorm_hidden_3"), "prenorm_hidden_3");
  expect_close(trace.hidden, test::read_f32(*golden_, "hidden_3"), "hidden_3");
}

// Prefill of the prompt, then one token per call with the cache, as generate.py does.
TEST_P(Golden, GreedyDecodingWithLatentCache) {
  const int64_t vocab = model_->config().vocab_size;
  const auto prompt = test::read_i32(*golden_, "greedy_prompt");
  const auto want_tokens = test::read_i32(*golden_, "greedy_tokens");
  const auto want_logits = test::read_f32(*golden_, "greedy_logits");
  KvCache cache(model_->config(), int64_t(prompt.size() + want_tokens.size()));
  std::vector<float> logits(static_cast<size_t>(vocab));
  model_->forward(prompt.data(), int64_t(prompt.size()), cache, logits.data(), false);
  const float tol = 1e-4f * test::max_abs(want_logits);
  for (size_t i = 0; i < want_tokens.size(); ++i) {
    EXPECT_LE(test::max_abs_diff(logits.data(), want_logits.data() + i * size_t(vocab), size_t(vocab)), tol)
        << "step " << i;
    const int32_t next = int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
    ASSERT_EQ(next, want_tokens[i]) << "step " << i;
    if (i + 1 < want_tokens.size()) model_->forward(&next, 1, cache, logits.data(), false);
  }
}

// Feeding the 150-token case one token at a time gives the all-at-once logits.
TEST_P(Golden, IncrementalEqualsPrefill) {
  const int64_t vocab = model_->config().vocab_size;
  const auto tokens = test::read_i32(*golden_, "tokens_3");
  const auto want = test::read_f32(*golden_, "logits_3");
  KvCache cache(model_->config(), int64_t(tokens.size()));
  std::vector<float> logits(static_cast<size_t>(vocab));
  const float tol = 1e-4f * test::max_abs(want);
  for (size_t i = 0; i < tokens.size(); ++i) {
    model_->forward(&tokens[i], 1, cache, logits.data(), false);
    ASSERT_LE(test::max_abs_diff(logits.data(), want.data() + i * size_t(vocab), size_t(vocab)), tol) << "position " << i;
  }
}

// Truncating the cache drops the later positions: running them again gives their logits again.
TEST_P(Golden, TruncatedCacheContinuesAtItsLength) {
  const int64_t vocab = model_->config().vocab_size;
  const auto tokens = test::read_i32(*golden_, "tokens_3");
  const auto want = test::read_f32(*golden_, "logits_3");
  const int64_t n = 20, keep = 7;
  KvCache cache(model_->config(), n);
  std::vector<float> logits(static_cast<size_t>(n * vocab));
  model_->forward(tokens.data(), n, cache, logits.data(), true);
  cache.truncate(keep);
  EXPECT_EQ(cache.length(), keep);
  model_->forward(tokens.data() + keep, n - keep, cache, logits.data(), true);
  const float tol = 1e-4f * test::max_abs(want);
  EXPECT_LE(test::max_abs_diff(logits.data(), want.data() + keep * vocab, size_t((n - keep) * vocab)), tol);
  EXPECT_THROW(cache.truncate(n + 1), Error);
  EXPECT_THROW(cache.truncate(-1), Error);
}

// dsv3 perplexity scores a window with the mean next-token loss under the model's logits: the
// loss computed here from the official code's logits of the 150-token case.
TEST_P(Golden, WindowLossIsTheMeanLossUnderTheGoldenLogits) {
  const int64_t vocab = model_->config().vocab_size;
  const auto tokens = test::read_i32(*golden_, "tokens_3");
  const auto logits = test::read_f32(*golden_, "logits_3");
  double want = 0;
  for (size_t i = 0; i + 1 < tokens.size(); ++i) {  // row i predicts token i + 1
    const float* row = logits.data() + i * size_t(vocab);
    const double max = *std::max_element(row, row + vocab);
    double sum = 0;
    for (int64_t v = 0; v < vocab; ++v) sum += std::exp(double(row[v]) - max);
    want += max + std::log(sum) - double(row[tokens[i + 1]]);
  }
  want /= double(tokens.size() - 1);
  WindowScorer scorer(*model_, int64_t(tokens.size()) - 1);
  EXPECT_NEAR(scorer.loss(tokens), want, 1e-4 * std::max(1.0, want));
  EXPECT_EQ(scorer.loss(tokens), scorer.loss(tokens));  // the cache is cleared between windows
}

INSTANTIATE_TEST_SUITE_P(Checkpoints, Golden,
                         testing::Values(Case{"tiny-v3-bf16", AttnForm::absorbed}, Case{"tiny-v3-bf16", AttnForm::naive},
                                         Case{"tiny-v3-fp8", AttnForm::absorbed}, Case{"tiny-v3-fp8", AttnForm::naive},
                                         Case{"tiny-v2lite-bf16", AttnForm::absorbed},
                                         Case{"tiny-v2lite-bf16", AttnForm::naive},
                                         Case{"tiny-v3-bf16", AttnForm::automatic}, Case{"tiny-v3-fp8", AttnForm::automatic},
                                         Case{"tiny-v2lite-bf16", AttnForm::automatic}),
                         case_name);

TEST(GoldenErrors, OutOfRangeTokenIsRejected) {
  Transformer m(golden_dir("tiny-v3-bf16"));
  KvCache cache(m.config(), 4);
  std::vector<float> logits(static_cast<size_t>(m.config().vocab_size));
  const int32_t bad[2] = {3, int32_t(m.config().vocab_size)};
  try {
    m.forward(bad, 2, cache, logits.data(), false);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("token id 500 at index 1 is out of range"), std::string::npos) << e.what();
  }
  EXPECT_EQ(cache.length(), 0);  // nothing was appended
}

TEST(Perplexity, SummaryOfWindowLosses) {
  const PerplexityResult r = summarize_windows({1.0, 2.0, 3.0}, 16);
  EXPECT_EQ(r.windows, 3);
  EXPECT_EQ(r.tokens, 48);
  EXPECT_DOUBLE_EQ(r.loss, 2.0);
  EXPECT_DOUBLE_EQ(r.loss_se, 1.0 / std::sqrt(3.0));  // sd 1 over 3 windows
  EXPECT_DOUBLE_EQ(r.perplexity, std::exp(2.0));
  EXPECT_EQ(summarize_windows({2.5}, 16).loss_se, 0.0);
}

TEST(Perplexity, BadWindowsAreRejected) {
  Transformer m(golden_dir("tiny-v3-bf16"));
  EXPECT_THROW(WindowScorer(m, 0), Error);
  EXPECT_THROW(WindowScorer(m, m.config().max_position_embeddings + 1), Error);
  WindowScorer scorer(m, 1);
  const std::vector<int32_t> short_window = {3}, bad = {3, int32_t(m.config().vocab_size)};
  EXPECT_THROW(scorer.loss(short_window), Error);
  try {
    scorer.loss(bad);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("is outside the vocabulary"), std::string::npos) << e.what();
  }
}

TEST(GoldenErrors, ContextOverflowIsRejected) {
  Transformer m(golden_dir("tiny-v3-bf16"));
  KvCache cache(m.config(), 2);
  std::vector<float> logits(static_cast<size_t>(m.config().vocab_size));
  const int32_t ids[3] = {1, 2, 3};
  EXPECT_THROW(m.forward(ids, 3, cache, logits.data(), false), Error);
}

}  // namespace
// AttnForm::automatic on DeepSeek-V3's attention shape: the naive form for a prefill, the
// absorbed one for decoding, and absorbed when the expanded keys and values would be large.
TEST(AttnFormChoice, NaiveForPrefillAbsorbedForDecoding) {
  ModelConfig c;
  c.hidden_size = 7168, c.num_attention_heads = 128, c.q_lora_rank = 1536, c.kv_lora_rank = 512;
  c.qk_nope_head_dim = 128, c.qk_rope_head_dim = 64, c.v_head_dim = 128;
  EXPECT_EQ(cheaper_attn_form(c, 512, 512, 512.0 * 513 / 2), AttnForm::naive);
  EXPECT_EQ(cheaper_attn_form(c, 1, 4096, 4096), AttnForm::absorbed);
  EXPECT_EQ(cheaper_attn_form(c, 2, 4096, 8191), AttnForm::absorbed);  // an MTP verification step
  EXPECT_EQ(cheaper_attn_form(c, 4096, 4096, 4096.0 * 4097 / 2), AttnForm::absorbed);  // 512 MiB expanded
}

}  // namespace dsv3
