// Post-training's pieces (the post-training issue): GRPO's advantages, loss and gradient
// against hand-computed values and finite differences in double, the clip engaging only past
// 1 +- epsilon, the KL estimator's value and sign, the loss normalisations; the verifiable
// rewards' answer extraction and normalisation; the arithmetic tasks' split.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <set>
#include <sstream>
#include <filesystem>
#include <fstream>
#include <functional>

#include "backend/ops.h"
#include "core/error.h"
#include "model/training.h"
#include "model_fixture.h"
#include "train/grpo.h"
#include "posttrain/grpo_trainer.h"
#include "eval/rewards.h"
#include "train/sft_data.h"
#include "tokenizer/chat_template.h"

namespace dsv3 {
namespace {

using testing::HasSubstr;

TEST(Grpo, AdvantagesAreGroupRelative) {
  GrpoConfig cfg;
  const auto a = group_advantages({1, 0}, cfg);  // mean 0.5, population std 0.5
  EXPECT_NEAR(a[0], 0.5 / (0.5 + 1e-4), 1e-12);
  EXPECT_NEAR(a[1], -0.5 / (0.5 + 1e-4), 1e-12);
  for (bool no_std : {false, true}) {  // equal rewards: no signal
    cfg.no_std = no_std;
    for (double x : group_advantages({0.7, 0.7, 0.7}, cfg)) EXPECT_EQ(x, 0.0);
  }
  cfg.no_std = true;  // Dr. GRPO: centred only
  EXPECT_EQ(group_advantages({3, 1}, cfg), (std::vector<double>{1, -1}));
  EXPECT_THROW(group_advantages({}, cfg), Error);
}

// Two outputs (2 tokens and 1), worked by hand in the comments.
TEST(Grpo, TwoSampleGroupLossAndGradientByHand) {
  GrpoConfig cfg;
  cfg.beta = 0.1;
  const std::vector<GrpoOutput> group = {
      {{std::log(0.5), std::log(0.4)}, {std::log(0.5), std::log(0.4)}, {std::log(0.5), std::log(0.5)}},
      {{std::log(0.2)}, {std::log(0.25)}, {std::log(0.2)}}};
  const GrpoLoss l = grpo_loss(group, {1, -1}, cfg);
  // Output 1 (A = 1, weight 1/2/2): token 1 rho 1, KL 0 -> objective 1, d 1; token 2 rho 1,
  // pi_ref/pi = 1.25, KL = 0.25 - ln 1.25 -> objective 1 - 0.1 KL, d = 1 + 0.1 * 0.25.
  // Output 2 (A = -1, weight 1/2): rho 0.8 = the clip's edge -> objective -0.8, d -0.8.
  const double kl = 0.25 - std::log(1.25);
  EXPECT_NEAR(l.loss, -0.25 * 1 - 0.25 * (1 - 0.1 * kl) + 0.5 * 0.8, 1e-12);
  EXPECT_NEAR(l.dlogp[0][0], -0.25, 1e-12);
  EXPECT_NEAR(l.dlogp[0][1], -0.25 * 1.025, 1e-12);
  EXPECT_NEAR(l.dlogp[1][0], 0.4, 1e-12);
  EXPECT_NEAR(l.kl, kl / 3, 1e-12);
  // Token normalisation: every token weighs 1/3.
  cfg.loss_norm = "token";
  const GrpoLoss t = grpo_loss(group, {1, -1}, cfg);
  EXPECT_NEAR(t.loss, -(1.0 + (1 - 0.1 * kl) - 0.8) / 3, 1e-12);
  EXPECT_NEAR(t.dlogp[1][0], 0.8 / 3, 1e-12);
}

TEST(Grpo, GradientMatchesFiniteDifferences) {
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> u(-3, -0.1);
  for (const char* norm : {"seq", "token"}) {
    GrpoConfig cfg;
    cfg.loss_norm = norm, cfg.clip_high = 0.28;
    std::vector<GrpoOutput> group(3);
    for (size_t i = 0; i < group.size(); ++i)
      for (size_t t = 0; t < 2 + i; ++t) {
        const double lp = u(rng);
        group[i].logp.push_back(lp);
        group[i].old_logp.push_back(lp + 0.05 * (double(t) - 1));  // ratios near 1, none at a clip edge
        group[i].ref_logp.push_back(u(rng));
      }
    const std::vector<double> adv = {0.8, -1.1, 0.3};
    const GrpoLoss l = grpo_loss(group, adv, cfg);
    const double h = 1e-6;
    for (size_t i = 0; i < group.size(); ++i)
      for (size_t t = 0; t < group[i].logp.size(); ++t) {
        auto plus = group, minus = group;
        plus[i].logp[t] += h, minus[i].logp[t] -= h;
        const double fd = (grpo_loss(plus, adv, cfg).loss - grpo_loss(minus, adv, cfg).loss) / (2 * h);
        EXPECT_NEAR(l.dlogp[i][t], fd, 1e-7) << norm << " output " << i << " token " << t;
      }
  }
}

TEST(Grpo, ClipEngagesOnlyPastItsBounds) {
  GrpoConfig cfg;
  cfg.beta = 0;
  auto one = [&](double rho, double A) {
    const GrpoOutput o{{std::log(rho) + std::log(0.5)}, {std::log(0.5)}, {std::log(0.5)}};
    return grpo_loss({o}, {A}, cfg);
  };
  EXPECT_NEAR(one(1.1, 1).dlogp[0][0], -1.1, 1e-12);  // inside: the plain term's gradient
  EXPECT_EQ(one(1.1, 1).clipped_fraction, 0);
  EXPECT_EQ(one(1.3, 1).dlogp[0][0], 0.0);  // past 1 + eps with A > 0: clipped, no gradient
  EXPECT_NEAR(one(1.3, 1).loss, -1.2, 1e-12);
  EXPECT_EQ(one(1.3, 1).clipped_fraction, 1);
  EXPECT_EQ(one(0.7, -1).dlogp[0][0], 0.0);  // below 1 - eps with A < 0: clipped
  EXPECT_NEAR(one(1.3, -1).dlogp[0][0], 1.3, 1e-12);  // above with A < 0: the pessimistic plain term
  EXPECT_NEAR(one(0.7, 1).dlogp[0][0], -0.7, 1e-12);  // below with A > 0: plain
  cfg.clip_high = 0.28;  // DAPO's higher upper bound
  EXPECT_NEAR(one(1.25, 1).dlogp[0][0], -1.25, 1e-12);
}

TEST(Grpo, KlEstimatorValueAndSign) {
  GrpoConfig cfg;
  cfg.beta = 1;
  auto kl = [&](double pi, double ref) {
    return grpo_loss({{{std::log(pi)}, {std::log(pi)}, {std::log(ref)}}}, {0}, cfg).kl;
  };
  EXPECT_NEAR(kl(0.2, 0.4), 2 - std::log(2.0) - 1, 1e-12);  // pi_ref / pi = 2
  EXPECT_NEAR(kl(0.3, 0.3), 0, 1e-15);
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<double> u(0.01, 1);
  for (int i = 0; i < 100; ++i) EXPECT_GE(kl(u(rng), u(rng)), 0);
}

TEST(Grpo, BadGroupsAreNamed) {
  GrpoConfig cfg;
  EXPECT_THAT([&] { try { grpo_loss({}, {}, cfg); } catch (const Error& e) { return std::string(e.what()); } return std::string(); }(),
              HasSubstr("has none"));
  const GrpoOutput bad{{-1, -2}, {-1}, {-1, -2}};
  try {
    grpo_loss({bad}, {1}, cfg);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("output 0 has 2 log-probabilities but 1 old"));
  }
  cfg.loss_norm = "batch";
  EXPECT_THROW(grpo_loss({{{-1}, {-1}, {-1}}}, {1}, cfg), Error);
}

TEST(Rewards, AnswersAreExtractedAndNormalised) {
  EXPECT_EQ(extract_answer("3 + 4 = 7\n#### 7"), "7");
  EXPECT_EQ(extract_answer("so \\boxed{3\\frac{1}{2}} it is"), "3\\frac{1}{2}");
  EXPECT_EQ(extract_answer("#### 5\nlater: \\boxed{6}"), "6");  // the later one
  EXPECT_EQ(extract_answer("\\boxed{6} then\n#### 8"), "8");
  EXPECT_FALSE(extract_answer("no answer here"));
  EXPECT_FALSE(extract_answer("#### \n"));
  EXPECT_FALSE(extract_answer("\\boxed{unclosed"));
  for (const auto& [in, out] : std::vector<std::pair<const char*, const char*>>{
           {"1,000", "1000"}, {"$5.00", "5"}, {"+7.", "7"}, {"3.50", "3.5"}, {"-0", "0"}, {" abc ", "abc"}, {"1e3", "1000"}})
    EXPECT_EQ(normalize_answer(in), out) << in;
  EXPECT_EQ(exact_match_reward("The total is \\boxed{1,234}.", "1234"), 1.0);
  EXPECT_EQ(exact_match_reward("#### 1235", "1234"), 0.0);
  EXPECT_EQ(exact_match_reward("1234", "1234"), 0.0);  // no answer in the format
  EXPECT_EQ(format_reward("#### x"), 1.0);
  EXPECT_EQ(reward("exact", "#### 12", "12.0"), 1.0);
  try {
    reward("length", "", "");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("unknown reward 'length'"));
  }
}

TEST(Rewards, CountdownChecksTheExpression) {
  const std::string ref = "24: 4 6 1 5";
  for (const char* ok : {"#### (5 - 1) * 6 = 24", "#### 4 * 6", "so \\boxed{6 * 4 * 1}", "#### 4 × 6", "#### ((6))*(4)"})
    EXPECT_EQ(countdown_reward(ok, ref), 1.0) << ok;
  for (const char* bad : {"#### 6 * 4 * 1 * 1", "#### 25 - 1", "#### 4 * 6 + 1", "#### 4 * (6", "4 * 6", "#### 4 * 6 / 0",
                          "#### 46 - 22"})
    EXPECT_EQ(countdown_reward(bad, ref), 0.0) << bad;
  EXPECT_EQ(countdown_reward("#### 6 / 4 * 2", "3: 6 4 2"), 1.0);  // exact rationals: 6/4 is 3/2
  EXPECT_EQ(countdown_reward("#### 7 / 2 * 2", "7: 7 2 2"), 1.0);
  EXPECT_EQ(reward("countdown", "#### 4 * 6", ref), 1.0);
  EXPECT_THROW(countdown_reward("#### 1", "no colon"), Error);
}

// Every generated countdown puzzle has a solution: found here by trying each order of its
// numbers with each choice of operations, left to right, and checked by the reward.
TEST(Rewards, CountdownPuzzlesAreSolvable) {
  const auto tasks = arithmetic_tasks("countdown", 2, 20, 4, "train");
  ASSERT_EQ(tasks.size(), 20u);
  for (const auto& t : tasks) {
    std::vector<int64_t> n;
    std::istringstream numbers(t.answer.substr(t.answer.find(':') + 1));
    for (int64_t v; numbers >> v;) n.push_back(v);
    ASSERT_EQ(n.size(), 4u) << t.answer;
    std::sort(n.begin(), n.end());
    bool solved = false;
    do {
      for (int code = 0; code < 64 && !solved; ++code) {
        std::string e = std::to_string(n[0]);
        for (int k = 1; k < 4; ++k) e = "(" + e + " " + "+-*/"[(code >> (2 * (k - 1))) & 3] + " " + std::to_string(n[size_t(k)]) + ")";
        solved = countdown_reward("#### " + e, t.answer) == 1.0;
      }
    } while (!solved && std::next_permutation(n.begin(), n.end()));
    EXPECT_TRUE(solved) << t.prompt << " | " << t.answer;
  }
  std::set<std::string> train;
  for (const auto& t : tasks) train.insert(t.answer);
  for (const auto& t : arithmetic_tasks("countdown", 2, 10, 5, "heldout")) EXPECT_FALSE(train.count(t.answer));
}

// SFT masks: with DeepSeek-V3's own tokenizer and template, the learnt tokens are exactly
// what the assistant said, each closed by the end-of-sentence token; nothing else counts.
TEST(Sft, OnlyTheAssistantsTokensAreLearnt) {
  const std::string dir = std::string(DSV3_TEST_DATA) + "/tokenizer";
  const Tokenizer tok(dir + "/tokenizer.json");
  const TokenizerConfig config = load_tokenizer_config(dir);
  const auto conversation = nlohmann::json::parse(R"({"messages": [{"role": "system", "content": "Answer from Genesis."},
      {"role": "user", "content": "Who begat Enos?"}, {"role": "assistant", "content": "Seth."},
      {"role": "user", "content": "And Enos begat?"}, {"role": "assistant", "content": "Cainan, at ninety years."}]})");
  const SftExample ex = sft_example(tok, config, conversation, "test");
  ASSERT_EQ(ex.tokens.size(), ex.targets.size());
  EXPECT_EQ(tok.decode(ex.tokens), apply_chat_template(config, nlohmann::ordered_json::parse(conversation["messages"].dump()), false));
  std::vector<int32_t> learnt;
  for (size_t i = 0; i < ex.targets.size(); ++i)
    if (ex.targets[i] >= 0) {
      EXPECT_EQ(ex.targets[i], ex.tokens[i + 1]);  // a target is the next token
      learnt.push_back(ex.targets[i]);
    }
  EXPECT_EQ(tok.decode(learnt), "Seth.<｜end▁of▁sentence｜>Cainan, at ninety years.<｜end▁of▁sentence｜>");
  EXPECT_EQ(ex.learnt(), int64_t(learnt.size()));
  // Bad conversations are named.
  for (const auto& [text, says] : std::vector<std::pair<const char*, const char*>>{
           {R"({"messages": [{"role": "wizard", "content": "x"}]})", "unknown role 'wizard'"},
           {R"({"messages": [{"role": "user", "content": "x"}]})", "no assistant message"},
           {R"({"messages": [{"role": "user"}]})", "must be {\"role\": string, \"content\": string}"},
           {R"({"messages": []})", "at least one message"}}) {
    try {
      sft_example(tok, config, nlohmann::json::parse(text), "conversations.jsonl line 3");
      ADD_FAILURE() << text;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("conversations.jsonl line 3"));
      EXPECT_THAT(e.what(), HasSubstr(says));
    }
  }
}

TEST(Rewards, ArithmeticTasksSplitAndAnswer) {
  const auto train = arithmetic_tasks("add", 3, 200, 1, "train"), held = arithmetic_tasks("add", 3, 50, 2, "heldout");
  EXPECT_EQ(train.size(), 200u);
  EXPECT_EQ(held.size(), 50u);
  std::set<std::string> seen;
  for (const auto& t : train) seen.insert(t.prompt);
  for (const auto& t : held) EXPECT_FALSE(seen.count(t.prompt)) << t.prompt;  // never in training
  for (const auto& t : arithmetic_tasks("mul", 2, 30, 5, "train")) {
    long a = 0, b = 0;
    ASSERT_EQ(std::sscanf(t.prompt.c_str(), "What is %ld * %ld?", &a, &b), 2) << t.prompt;
    EXPECT_GE(a, 10);
    EXPECT_LT(a, 100);
    EXPECT_EQ(t.answer, std::to_string(a * b));
  }
  EXPECT_EQ(arithmetic_tasks("add", 3, 20, 9, "train")[5].prompt, arithmetic_tasks("add", 3, 20, 9, "train")[5].prompt);
  EXPECT_THROW(arithmetic_tasks("div", 3, 1, 1, "train"), Error);
  EXPECT_THROW(arithmetic_tasks("add", 1, 200, 1, "heldout"), Error);  // 1-digit pairs: not 200 held out
}


// A small model for checks through the training pass: sigmoid routing, an MoE layer.
ModelConfig small_config(int mtp = 0) {
  return ModelConfig::parse(R"({"vocab_size": 29, "hidden_size": 16, "intermediate_size": 24, "moe_intermediate_size": 8,
    "num_hidden_layers": 2, "num_attention_heads": 2, "qk_nope_head_dim": 4, "qk_rope_head_dim": 4, "v_head_dim": 4,
    "kv_lora_rank": 6, "q_lora_rank": null, "max_position_embeddings": 32, "rope_theta": 10000, "rope_scaling": null,
    "first_k_dense_replace": 1, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
    "rms_norm_eps": 1e-6, "num_nextn_predict_layers": )" + std::to_string(mtp) + R"(, "scoring_func": "sigmoid",
    "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1, "norm_topk_prob": true, "routed_scaling_factor": 1.5,
    "eos_token_id": 1})",
                            "small config");
}

template <typename T>
ModelWeights random_weights(const ModelConfig& c, DType dtype, uint64_t seed) {
  ModelWeights w = allocate_weights(c, dtype);
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 0.3);
  for (const TensorSlot& s : list_tensors(c, w)) {
    T* p = mutable_data<T>(*s.mat);
    for (int64_t i = 0; i < s.mat->numel(); ++i) p[i] = T(s.shape.size() == 1 ? (s.trainable ? 1 + 0.1 * normal(rng) : 0) : normal(rng));
  }
  return w;
}

// The per-token objective's op: log-probabilities, and the gradient of sum w_i * -logp_i
// (weights of both signs) against central differences in double.
TEST(TargetLogprobs, WeightedGradientMatchesFiniteDifferences) {
  const int64_t n = 4, vocab = 7;
  std::mt19937_64 rng(3);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> z(static_cast<size_t>(n * vocab)), dz(z.size()), logp(static_cast<size_t>(n));
  for (double& v : z) v = normal(rng);
  const std::vector<int32_t> targets = {3, -1, 0, 6};
  const std::vector<double> w = {0.7, 5.0, -1.3, 0.2};  // the ignored row's weight must not count
  auto objective = [&] {
    target_logprobs(z.data(), targets.data(), n, vocab, logp.data());
    double f = 0;
    for (int64_t i = 0; i < n; ++i) f += w[size_t(i)] * -logp[size_t(i)];
    return f;
  };
  objective();
  double by_hand = z[3];  // row 0: z_t - log sum exp z
  double sum = 0;
  for (int64_t v = 0; v < vocab; ++v) sum += std::exp(z[size_t(v)]);
  EXPECT_NEAR(logp[0], by_hand - std::log(sum), 1e-12);
  EXPECT_EQ(logp[1], 0.0);
  target_logprobs(z.data(), targets.data(), n, vocab, logp.data(), w.data(), dz.data());
  for (size_t i = 0; i < z.size(); ++i) {
    const double keep = z[i], h = 1e-6;
    z[i] = keep + h;
    const double up = objective();
    z[i] = keep - h;
    const double down = objective();
    z[i] = keep;
    EXPECT_NEAR(dz[i], (up - down) / (2 * h), 1e-8) << "logit " << i;
  }
}

// GRPO through the model: the loss as a function of the weights, with each token's
// log-probability from the training pass, differentiated by weigh_tokens + backward, equals
// central differences in double, for both normalisations, a KL term and ratios both inside
// and beyond the clip.
TEST(Grpo, GradientThroughTheTrainingPassMatchesFiniteDifferences) {
  const ModelConfig c = small_config();
  ModelWeights w = random_weights<double>(c, DType::f64, 5), ref = random_weights<double>(c, DType::f64, 6);
  // Three answers to one prompt of 3 tokens, of 4, 2 and 3 tokens, padded to S = 6.
  const int64_t B = 3, S = 6;
  const std::vector<std::vector<int32_t>> seqs = {{2, 7, 9, 4, 11, 5, 1}, {2, 7, 9, 13, 1}, {2, 7, 9, 20, 3, 1}};
  const int64_t prompt = 3;
  std::vector<int32_t> inputs(size_t(B * S), 1), targets(size_t(B * S), -1);
  for (int64_t b = 0; b < B; ++b) {
    const auto& s = seqs[size_t(b)];
    for (size_t j = 0; j + 1 < s.size(); ++j) inputs[size_t(b * S) + j] = s[j];
    for (size_t j = size_t(prompt); j < s.size(); ++j) targets[size_t(b * S) + j - 1] = s[j];
  }
  const std::vector<double> rewards = {1, 0, 0.5};
  std::vector<std::vector<double>> old(static_cast<size_t>(B));
  {  // the sampling policy: the current one, nudged so that some ratios leave [0.8, 1.2]
    TrainingPass<double> pass(c);
    pass.forward(w, inputs.data(), targets.data(), B, S);
    const auto& lp = pass.token_logprobs();
    const double nudge[] = {0.02, -0.5, 0.3, 0.0, -0.05, 0.4, 0.01, -0.02, 0.6};
    int k = 0;
    for (int64_t b = 0; b < B; ++b)
      for (size_t j = size_t(prompt); j < seqs[size_t(b)].size(); ++j) old[size_t(b)].push_back(lp[size_t(b * S) + j - 1] + nudge[k++ % 9]);
  }
  for (const char* norm : {"seq", "token"}) {
    GrpoConfig cfg;
    cfg.loss_norm = norm, cfg.beta = 0.1, cfg.clip_high = 0.28;
    const auto adv = group_advantages(rewards, cfg);
    TrainingPass<double> pass(c), ref_pass(c);
    GrpoLoss last;
    auto loss = [&] {
      pass.forward(w, inputs.data(), targets.data(), B, S);
      ref_pass.forward(ref, inputs.data(), targets.data(), B, S);
      const auto& lp = pass.token_logprobs();
      const auto& rp = ref_pass.token_logprobs();
      std::vector<GrpoOutput> out(static_cast<size_t>(B));
      for (int64_t b = 0; b < B; ++b)
        for (size_t j = size_t(prompt); j < seqs[size_t(b)].size(); ++j) {
          out[size_t(b)].logp.push_back(lp[size_t(b * S) + j - 1]);
          out[size_t(b)].ref_logp.push_back(rp[size_t(b * S) + j - 1]);
        }
      for (int64_t b = 0; b < B; ++b) out[size_t(b)].old_logp = old[size_t(b)];
      last = grpo_loss(out, adv, cfg);
      return last.loss;
    };
    loss();
    EXPECT_GT(last.clipped_fraction, 0.0) << "some ratios should be clipped";
    EXPECT_LT(last.clipped_fraction, 1.0);
    std::vector<double> weights(size_t(B * S), 0.0);
    for (int64_t b = 0; b < B; ++b)
      for (size_t j = size_t(prompt); j < seqs[size_t(b)].size(); ++j)
        weights[size_t(b * S) + j - 1] = -last.dlogp[size_t(b)][j - size_t(prompt)];
    ModelWeights g = allocate_weights(c, DType::f64);
    pass.weigh_tokens(weights.data());
    pass.backward(w, g);
    double* p = w.flat.as<double>().data();
    const double* grad = g.flat.as<double>().data();
    const int64_t n = w.flat.numel;
    std::vector<int64_t> entries;
    std::mt19937_64 rng(9);
    int64_t best = 0;
    for (int64_t i = 1; i < n; ++i)
      if (std::abs(grad[i]) > std::abs(grad[best])) best = i;
    entries.push_back(best);
    for (int k = 0; k < 40; ++k) entries.push_back(int64_t(rng() % uint64_t(n)));
    int nonzero = 0;
    for (int64_t i : entries) {
      const double keep = p[i], h = 1e-6 * std::max(1.0, std::abs(keep));
      p[i] = keep + h;
      const double up = loss();
      p[i] = keep - h;
      const double down = loss();
      p[i] = keep;
      const double fd = (up - down) / (2 * h);
      nonzero += std::abs(fd) > 1e-8;
      EXPECT_NEAR(grad[i], fd, 1e-6 * std::max(1.0, std::abs(fd))) << norm << " entry " << i;
    }
    EXPECT_GT(nonzero, 5);
  }
}

// SFT sequences: one conversation each, padded (no target) or cut to S; a conversation's
// log-probabilities do not depend on what it is batched with.
TEST(Sft, BatchesPadAndAConversationIgnoresItsNeighbours) {
  const SftExample a{{2, 5, 7, 9, 4, 1}, {-1, -1, 9, 4, 1, -1}}, b{{2, 6, 6, 8, 1}, {-1, -1, 8, 1, -1}},
      c{{2, 3, 11, 12, 13, 14, 15, 16, 17, 18}, {-1, 11, 12, 13, 14, 15, 16, 17, 18, -1}};
  const int64_t S = 8;
  auto batch_of = [&](const SftExample& x, const SftExample& y, std::vector<int32_t>& in, std::vector<int32_t>& tg) {
    SftBatches batches({x, y}, S, /*pad=*/1, /*seed=*/3);
    in.assign(size_t(2 * S), 0), tg.assign(size_t(2 * S), 0);
    batches.next_batch(2, in.data(), tg.data());
    EXPECT_EQ(batches.position().epoch, 1);
    return batches.truncated();
  };
  std::vector<int32_t> in1, tg1, in2, tg2;
  EXPECT_EQ(batch_of(a, b, in1, tg1), 0);
  EXPECT_EQ(batch_of(a, c, in2, tg2), 1);  // c has 10 tokens: cut to 8
  auto row_of_a = [&](const std::vector<int32_t>& in) { return in[0] == 2 && in[1] == 5 ? 0 : 1; };
  const int r1 = row_of_a(in1), r2 = row_of_a(in2);
  EXPECT_EQ(std::vector<int32_t>(in1.begin() + r1 * S, in1.begin() + (r1 + 1) * S), (std::vector<int32_t>{2, 5, 7, 9, 4, 1, 1, 1}));
  EXPECT_EQ(std::vector<int32_t>(tg1.begin() + r1 * S, tg1.begin() + (r1 + 1) * S), (std::vector<int32_t>{-1, -1, 9, 4, 1, -1, -1, -1}));
  EXPECT_EQ(std::vector<int32_t>(in2.begin() + (1 - r2) * S, in2.begin() + (2 - r2) * S), (std::vector<int32_t>{2, 3, 11, 12, 13, 14, 15, 16}));
  const ModelConfig cfg = small_config();
  const ModelWeights w = random_weights<float>(cfg, DType::f32, 8);
  TrainingPass<float> p1(cfg), p2(cfg);
  p1.forward(w, in1.data(), tg1.data(), 2, S);
  p2.forward(w, in2.data(), tg2.data(), 2, S);
  const auto& l1 = p1.token_logprobs();
  const auto& l2 = p2.token_logprobs();
  for (int64_t j = 0; j < S; ++j) EXPECT_NEAR(l1[size_t(r1 * S + j)], l2[size_t(r2 * S + j)], 1e-5) << "position " << j;
  EXPECT_NE(l1[size_t(r1 * S + 2)], 0.0);
  // Padding counts in no expert's load: the conversations' own positions do (a: 6, b: 5 of
  // 8), k = 2 choices each.
  SftBatches batches({a, b}, S, 1, 3);
  int64_t lengths[2];
  batches.next_batch(2, in1.data(), tg1.data(), lengths);
  EXPECT_EQ(lengths[0] + lengths[1], 6 + 5);
  p1.forward(w, in1.data(), tg1.data(), 2, S, lengths);
  const int64_t real = 6 + 5;
  // With an MTP module, its layer counts each sequence's real positions but the last (whose
  // next token is padding), as the balance loss does.
  const ModelConfig with_mtp = small_config(1);
  const ModelWeights wm = random_weights<float>(with_mtp, DType::f32, 9);
  TrainingPass<float> pm(with_mtp, {0.3, 0.01, {}});
  pm.forward(wm, in1.data(), tg1.data(), 2, S, lengths);
  const auto& mtp_loads = pm.expert_loads().back();
  EXPECT_EQ(std::accumulate(mtp_loads.begin(), mtp_loads.end(), int64_t(0)), 2 * (5 + 4));
  for (const auto& layer : p1.expert_loads()) {
    int64_t total = 0;
    for (int64_t n : layer) total += n;
    if (!layer.empty()) {
      EXPECT_EQ(total, 2 * real);
    }
  }
}

// Fine-tuning starts from a block-FP8 release as from a BF16 one: its weights read with its
// own config.json (the quantization_config) into the float32 layout of the run's config
// (without it) give the logits the inference model gives from the FP8 files.
TEST(Sft, StartsFromAnFp8Checkpoint) {
  const std::string dir = test::golden_dir("tiny-v3-fp8");
  nlohmann::json j = nlohmann::json::parse(read_text(dir + "/config.json"));
  j.erase("quantization_config");
  const ModelConfig c = ModelConfig::parse(j.dump(), "run config");
  ModelWeights w = allocate_weights(c, DType::f32, MtpTying::tied);
  load_float_weights(dir, c, w);
  const std::vector<int32_t> ids = {0, 17, 230, 5, 99, 441, 3, 12};
  const int64_t n = int64_t(ids.size()), V = c.vocab_size;
  std::vector<int32_t> targets(ids.size(), -1);
  TrainingPass<float> pass(c);
  pass.forward(w, ids.data(), targets.data(), 1, n);
  Transformer model(dir);
  KvCache cache(model.config(), n);
  std::vector<float> logits(size_t(n * V));
  model.forward(ids.data(), n, cache, logits.data(), true);
  for (int64_t i = 0; i < n * V; ++i) ASSERT_NEAR(pass.logits()[size_t(i)], logits[size_t(i)], 2e-3 * std::max(1.0f, std::fabs(logits[size_t(i)]))) << i;
  // A checkpoint of another shape is named.
  ModelWeights other = allocate_weights(c, DType::f32, MtpTying::tied);
  EXPECT_THAT([&] { load_float_weights(test::golden_dir("tiny-v3-bf16"), c, other); },
              testing::ThrowsMessage<Error>(HasSubstr("this run's model")));
}

TEST(GrpoTasks, BadTaskFilesNameTheLine) {
  const std::string dir = testing::TempDir();
  auto expect_error = [&](const std::string& text, const std::string& says) {
    const std::string path = dir + "/grpo_tasks_bad.jsonl";
    std::ofstream(path) << text;
    try {
      read_grpo_tasks(path);
      ADD_FAILURE() << text;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr(says)) << text;
    }
  };
  expect_error("{\"prompt\": \"1+1?\", \"answer\": \"2\"}\n\n{\"prompt\": \"2+2?\"}\n", "line 3: the task has no \"answer\"");
  expect_error("{\"prompt\": \"1+1?\", \"answer\": 2}\n", "line 1: the task has no \"answer\" string");
  expect_error("not json\n", "line 1: not JSON");
  expect_error("\n\n", "no tasks");
  expect_error("{\"prompt\": \"\", \"answer\": \"2\"}\n", "line 1: the prompt is empty");
}

// GRPO steps on a real checkpoint (the golden tiny model with a 500-token tokenizer): the
// batch engine's log-probabilities match the training pass's, the first step's KL is zero
// (the policy is the reference), and a run cut by a checkpoint and resumed takes the same
// steps as one that is not.
class GrpoRun : public testing::Test {
 protected:
  struct Result {
    std::vector<GrpoStepStats> stats;
    std::vector<float> params;
  };
  static std::vector<GrpoTask> tasks() {
    std::vector<GrpoTask> t;
    for (const auto& a : arithmetic_tasks("add", 2, 12, 4, "train")) t.push_back({a.prompt, a.answer});
    return t;
  }
  // steps of GRPO on a fresh run folder, or continuing the newest checkpoint of `dir`.
  static Result run(const std::string& dir, int64_t steps, bool resume, int64_t save_every) {
    const std::string model = test::servable_model();
    const Tokenizer tok(model + "/tokenizer.json");
    const TokenizerConfig chat = load_tokenizer_config(model + "/tokenizer_config.json");
    const std::string config_json = read_text(model + "/config.json");
    const ModelConfig c = ModelConfig::parse(config_json, "config");
    ModelWeights reference = allocate_weights(c, DType::f32, MtpTying::tied);
    convert_weights(c, load_weights(c, Checkpoint(model)), reference);
    TrainOptions o;
    o.steps = steps, o.batch = 2, o.seq = 1, o.mtp_weight = 0, o.alpha = 0, o.save_every = save_every, o.eval_every = 0;
    o.schedule.lr = 1e-3, o.schedule.min_lr = 1e-3, o.schedule.warmup_steps = 0, o.seed = 7;
    auto data = std::make_unique<GrpoTasks>(tasks(), o.seed);
    GrpoTasks& order = *data;
    Trainer trainer(config_json, o, std::move(data), nullptr, dir);
    if (!(resume && trainer.resume())) trainer.init_from(model);
    GrpoOptions g;
    g.prompts = 2, g.group = 3, g.max_new_tokens = 6, g.reward = "format", g.seed = o.seed;
    GrpoTrainer grpo(trainer, order, tok, chat, reference, g);
    Result r;
    trainer.run([&](const StepMetrics&) { r.stats.push_back(grpo.stats()); }, [&](StepMetrics& m) { return grpo.objective(m); });
    const auto flat = trainer.params().flat.as<float>();
    r.params.assign(flat.begin(), flat.end());
    return r;
  }
};

TEST_F(GrpoRun, SamplesMatchTheTrainingPassAndResumeIsExact) {
  const std::string root = testing::TempDir() + "/grpo_run_" + std::to_string(::getpid());
  std::filesystem::remove_all(root);
  const Result whole = run(root + "/whole", 3, false, 0);
  ASSERT_EQ(whole.stats.size(), 3u);
  for (const GrpoStepStats& s : whole.stats) {
    EXPECT_EQ(s.samples, 6);
    EXPECT_GT(s.length, 0.0);
    EXPECT_LE(s.length, 6.0);
    EXPECT_LT(s.max_logp_gap, 1e-3);  // the engine and the training pass read the same weights
  }
  EXPECT_EQ(whole.stats[0].kl, 0.0);  // step 1: the policy is the reference
  EXPECT_GT(whole.stats[2].kl, 0.0);
  // Cut after step 2 (the checkpoint), resumed for step 3: the same weights, bit for bit.
  run(root + "/cut", 2, false, 2);
  const Result resumed = run(root + "/cut", 3, true, 2);
  ASSERT_EQ(resumed.stats.size(), 1u);
  EXPECT_EQ(resumed.stats[0].reward, whole.stats[2].reward);
  EXPECT_EQ(resumed.params, whole.params);
  std::filesystem::remove_all(root);
}

TEST_F(GrpoRun, BadSettingsAreNamed) {
  const std::string model = test::servable_model();
  const Tokenizer tok(model + "/tokenizer.json");
  const TokenizerConfig chat = load_tokenizer_config(model + "/tokenizer_config.json");
  const std::string config_json = read_text(model + "/config.json");
  TrainOptions o;
  o.seq = 1, o.mtp_weight = 0, o.alpha = 0;
  auto data = std::make_unique<GrpoTasks>(tasks(), 1);
  GrpoTasks& order = *data;
  Trainer trainer(config_json, o, std::move(data), nullptr, testing::TempDir() + "/grpo_bad");
  for (const auto& [change, says] : std::vector<std::pair<std::function<void(GrpoOptions&)>, std::string>>{
           {[](GrpoOptions& g) { g.group = 1; }, "--group must be >= 2"},
           {[](GrpoOptions& g) { g.reward = "vibes"; }, "unknown reward 'vibes'"},
           {[](GrpoOptions& g) { g.max_new_tokens = 5000; }, "exceed the model's"},
           {[](GrpoOptions& g) { g.updates = 0; }, "--updates must be >= 1"},
           {[](GrpoOptions& g) { g.reward = "countdown"; }, "task 1: its answer"}}) {
    GrpoOptions g;
    change(g);
    try {
      GrpoTrainer grpo(trainer, order, tok, chat, trainer.params(), g);
      ADD_FAILURE() << says;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr(says));
    }
  }
}

}  // namespace
}  // namespace dsv3
