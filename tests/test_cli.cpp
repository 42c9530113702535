// The dsv3 program end to end, as outside checkers use it: `dsv3 logits` and
// `dsv3 generate --output-ids` on every golden checkpoint, and its errors on bad input.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <filesystem>

#include "cli_util.h"
#include "golden_util.h"

namespace dsv3 {
namespace {

using test::CliResult;
using test::run;

std::string ids_arg(const std::vector<int32_t>& ids) {
  std::string s = "\"";
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? " " : "") + std::to_string(ids[i]);
  return s + "\"";
}

class Cli : public testing::TestWithParam<std::string> {};

TEST_P(Cli, LogitsMatchGolden) {
  const std::string dir = test::golden_dir(GetParam());
  SafetensorsFile golden(dir + "/golden.safetensors");
  const std::string out = testing::TempDir() + "/logits_" + GetParam() + ".safetensors";
  for (const char* attn : {"absorbed", "naive"}) {
    const auto tokens = test::read_i32(golden, "tokens_3");  // longer than original_max_position_embeddings
    CliResult r = run("logits --model " + dir + " --ids " + ids_arg(tokens) + " --out " + out + " --attn " + attn);
    ASSERT_EQ(r.status, 0) << r.out;
    SafetensorsFile got(out);
    const auto want = test::read_f32(golden, "logits_3");
    const auto have = test::read_f32(got, "logits");
    ASSERT_EQ(got.find("logits")->shape, golden.find("logits_3")->shape);
    EXPECT_LE(test::max_abs_diff(have.data(), want.data(), want.size()), 1e-4f * test::max_abs(want)) << attn;
  }
}

TEST_P(Cli, GreedyGenerateMatchesGolden) {
  const std::string dir = test::golden_dir(GetParam());
  SafetensorsFile golden(dir + "/golden.safetensors");
  const auto prompt = test::read_i32(golden, "greedy_prompt");
  const auto want = test::read_i32(golden, "greedy_tokens");
  CliResult r = run("generate --model " + dir + " --prompt-ids " + ids_arg(prompt) + " --max-tokens " +
              std::to_string(want.size()) + " --temperature 0 --output-ids");
  ASSERT_EQ(r.status, 0) << r.out;
  std::string expect = "[";
  for (size_t i = 0; i < want.size(); ++i) expect += (i ? ", " : "") + std::to_string(want[i]);
  expect += "]";
  EXPECT_THAT(r.out, testing::HasSubstr(expect + "\n"));
  EXPECT_THAT(r.out, testing::HasSubstr("decode:"));
}

INSTANTIATE_TEST_SUITE_P(Golden, Cli, testing::Values("tiny-v3-bf16", "tiny-v3-fp8", "tiny-v2lite-bf16"),
                         [](const auto& info) {
                           std::string s = info.param;
                           std::replace(s.begin(), s.end(), '-', '_');
                           return s;
                         });

TEST(CliErrors, BadInputNamesTheProblem) {
  const std::string dir = test::golden_dir("tiny-v3-bf16");
  CliResult r = run("generate --model " + dir + " --prompt-ids \"1 abc\"");
  EXPECT_EQ(r.status, 1);
  EXPECT_THAT(r.out, testing::HasSubstr("'abc' is not a token id"));
  r = run("generate --model " + dir + " --prompt-ids \"1 500\"");
  EXPECT_EQ(r.status, 1);
  EXPECT_THAT(r.out, testing::HasSubstr("id 500 at index 1 is outside the vocabulary"));
  r = run("logits --model " + dir + " --ids \"1 2\" --out /nonexistent-dir/x.safetensors");
  EXPECT_EQ(r.status, 1);
  EXPECT_THAT(r.out, testing::HasSubstr("/nonexistent-dir/x.safetensors.tmp: cannot create"));
  r = run("generate --model " + dir + " --prompt-ids \"1\" --temperature -1");
  EXPECT_EQ(r.status, 1);
  EXPECT_THAT(r.out, testing::HasSubstr("temperature must be >= 0"));
  r = run("generate --model " + dir);
  EXPECT_EQ(r.status, 1);
  EXPECT_THAT(r.out, testing::HasSubstr("exactly one of --prompt and --prompt-ids"));
  r = run("generate --model /nonexistent --prompt-ids 1");
  EXPECT_NE(r.status, 0);
  EXPECT_THAT(r.out, testing::HasSubstr("Directory does not exist"));
}

}  // namespace
}  // namespace dsv3
