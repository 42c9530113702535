// Sampling: greedy, seeded repeatability, top-k / top-p limits, bad parameters and logits.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <vector>

#include "core/error.h"
#include "infer/sampler.h"

namespace dsv3 {
namespace {

const std::vector<float> kLogits = {0.1f, 2.0f, -1.0f, 1.9f, 0.5f, 2.0f};

TEST(Sampler, GreedyTakesTheFirstMaximum) {
  Sampler s({});
  EXPECT_EQ(s.sample(kLogits.data(), 6), 1);
}

TEST(Sampler, SameSeedSameTokens) {
  Sampler a({.temperature = 1.0f, .seed = 42}), b({.temperature = 1.0f, .seed = 42});
  for (int i = 0; i < 50; ++i) EXPECT_EQ(a.sample(kLogits.data(), 6), b.sample(kLogits.data(), 6));
}

TEST(Sampler, TopKLimitsTheCandidates) {
  Sampler s({.temperature = 5.0f, .top_k = 2, .seed = 1});
  for (int i = 0; i < 200; ++i) {
    const int32_t t = s.sample(kLogits.data(), 6);
    EXPECT_TRUE(t == 1 || t == 5) << t;
  }
}

TEST(Sampler, TopPKeepsTheSmallestNucleus) {
  // probabilities ~ {0.7, 0.2, 0.1}: top_p 0.75 keeps the first two only.
  const std::vector<float> logits = {std::log(0.7f), std::log(0.2f), std::log(0.1f)};
  Sampler s({.temperature = 1.0f, .top_p = 0.75f, .seed = 3});
  std::map<int32_t, int> counts;
  for (int i = 0; i < 2000; ++i) ++counts[s.sample(logits.data(), 3)];
  EXPECT_EQ(counts[2], 0);
  EXPECT_NEAR(counts[0] / 2000.0, 0.7 / 0.9, 0.04);
}

TEST(Sampler, FollowsTheDistribution) {
  const std::vector<float> logits = {0.0f, std::log(3.0f)};  // 1 : 3
  Sampler s({.temperature = 1.0f, .seed = 9});
  int ones = 0;
  for (int i = 0; i < 4000; ++i) ones += s.sample(logits.data(), 2);
  EXPECT_NEAR(ones / 4000.0, 0.75, 0.03);
}

TEST(Sampler, RejectsBadParametersAndLogits) {
  EXPECT_THROW(Sampler({.temperature = -0.5f}), Error);
  EXPECT_THROW(Sampler({.top_p = 0.0f}), Error);
  EXPECT_THROW(Sampler({.top_p = 1.5f}), Error);
  EXPECT_THROW(Sampler({.top_k = -1}), Error);
  Sampler s({});
  std::vector<float> bad = kLogits;
  bad[3] = NAN;
  try {
    s.sample(bad.data(), 6);
    FAIL();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), testing::HasSubstr("logit 3 is nan"));
  }
}

}  // namespace
}  // namespace dsv3
