// Post-training's pieces (the post-training issue): GRPO's advantages, loss and gradient
// against hand-computed values and finite differences in double, the clip engaging only past
// 1 +- epsilon, the KL estimator's value and sign, the loss normalisations; the verifiable
// rewards' answer extraction and normalisation; the arithmetic tasks' split.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <set>
#include <sstream>

#include "core/error.h"
#include "train/grpo.h"
#include "train/rewards.h"
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

}  // namespace
}  // namespace dsv3
