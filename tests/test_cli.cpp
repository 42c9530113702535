// The dsv3 program end to end, as outside checkers use it: `dsv3 logits` and
// `dsv3 generate --output-ids` on every golden checkpoint, `dsv3 plot`, and errors on bad input.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>

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
  // Speculative decoding with the MTP module: the same greedy tokens, and its statistics.
  CliResult s = run("generate --model " + dir + " --prompt-ids " + ids_arg(prompt) + " --max-tokens " +
                    std::to_string(want.size()) + " --temperature 0 --output-ids --speculative mtp");
  ASSERT_EQ(s.status, 0) << s.out;
  EXPECT_THAT(s.out, testing::HasSubstr(expect + "\n"));
  EXPECT_THAT(s.out, testing::HasSubstr("MTP drafts accepted"));
  CliResult chained = run("generate --model " + dir + " --prompt-ids " + ids_arg(prompt) + " --max-tokens " +
                          std::to_string(want.size()) + " --temperature 0 --output-ids --speculative mtp --draft 3");
  ASSERT_EQ(chained.status, 0) << chained.out;
  EXPECT_THAT(chained.out, testing::HasSubstr(expect + "\n"));
  CliResult bad = run("generate --model " + dir + " --prompt-ids " + ids_arg(prompt) + " --speculative mtp --draft 9");
  EXPECT_EQ(bad.status, 1);
  EXPECT_THAT(bad.out, testing::HasSubstr("--draft must be in 1..8, not 9"));
}

INSTANTIATE_TEST_SUITE_P(Golden, Cli, testing::Values("tiny-v3-bf16", "tiny-v3-fp8", "tiny-v2lite-bf16"),
                         [](const auto& info) {
                           std::string s = info.param;
                           std::replace(s.begin(), s.end(), '-', '_');
                           return s;
                         });

// --prompts: several prompts in one batch, each result the greedy tokens of the prompt alone.
TEST(CliBatch, PromptsFileGivesEachPromptsTokens) {
  const std::string dir = test::golden_dir("tiny-v3-bf16");
  SafetensorsFile golden(dir + "/golden.safetensors");
  const auto all = test::read_i32(golden, "tokens_3");
  const std::string file = testing::TempDir() + "/prompts.jsonl";
  std::vector<std::vector<int32_t>> prompts = {{all.begin(), all.begin() + 5}, {all.begin() + 7, all.begin() + 19},
                                               {all.begin() + 2, all.begin() + 4}};
  {
    std::ofstream out(file);
    for (const auto& p : prompts) {
      out << "{\"prompt_ids\": [";
      for (size_t i = 0; i < p.size(); ++i) out << (i ? ", " : "") << p[i];
      out << "]}\n";
    }
  }
  CliResult r = run("generate --model " + dir + " --prompts " + file + " --max-tokens 9 --temperature 0 --max-batch 2");
  ASSERT_EQ(r.status, 0) << r.out;
  // A page pool of one page: the sequences wait for it one after another, same tokens.
  CliResult paged = run("generate --model " + dir + " --prompts " + file +
                        " --max-tokens 9 --temperature 0 --max-batch 2 --kv-cache-tokens 64");
  ASSERT_EQ(paged.status, 0) << paged.out;
  for (size_t i = 0; i < prompts.size(); ++i) {
    CliResult one = run("generate --model " + dir + " --prompt-ids " + ids_arg(prompts[i]) +
                        " --max-tokens 9 --temperature 0 --output-ids");
    ASSERT_EQ(one.status, 0) << one.out;
    const std::string ids = one.out.substr(one.out.find('['), one.out.find(']') - one.out.find('[') + 1);
    std::string compact;  // the batch's JSON has no spaces
    for (char ch : ids) if (ch != ' ') compact += ch;
    EXPECT_THAT(r.out, testing::HasSubstr("\"ids\":" + compact + ",\"index\":" + std::to_string(i))) << i;
    EXPECT_THAT(paged.out, testing::HasSubstr("\"ids\":" + compact + ",\"index\":" + std::to_string(i))) << i;
  }
  r = run("generate --model " + dir + " --prompts " + file + " --max-tokens 60 --kv-cache-tokens 64");
  EXPECT_EQ(r.status, 1);
  EXPECT_THAT(r.out, testing::HasSubstr("pages of 64 positions; the cache has 1"));
  std::ofstream(file) << "{\"prompt_ids\": [1, 2]}\nnot json\n";
  r = run("generate --model " + dir + " --prompts " + file);
  EXPECT_EQ(r.status, 1);
  EXPECT_THAT(r.out, testing::HasSubstr("line 2: not JSON"));
  std::ofstream(file) << "{\"prompt_ids\": [1, 9999]}\n";
  r = run("generate --model " + dir + " --prompts " + file);
  EXPECT_EQ(r.status, 1);
  EXPECT_THAT(r.out, testing::HasSubstr("line 1: token id 9999 is outside the vocabulary"));
}

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
  r = run("train -c " + dir + "/config.json -d /nonexistent -o /nonexistent --precision bf16 --fp8-caches full");
  EXPECT_EQ(r.status, 1);
  EXPECT_THAT(r.out, testing::HasSubstr("--fp8-accumulator and --fp8-caches apply to --precision fp8 or fp8-tensor, not bf16"));
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

// dsv3 plot: the table of final values relative to a baseline, the merged CSV (a step
// repeated after a resume counts once, with its last value), the SVG, and its errors.
TEST(CliPlot, ComparesRunsAndNamesBadInput) {
  const std::filesystem::path dir = std::filesystem::path(testing::TempDir()) / "dsv3_plot";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir / "a");
  std::filesystem::create_directories(dir / "b");
  auto write = [](const std::filesystem::path& p, const std::string& text) { std::ofstream(p) << text; };
  write(dir / "a/metrics.csv", "step,tokens,loss,val_loss\n1,10,5,\n2,20,4,4.5\n3,30,3,\n4,40,2,4.0\n");
  write(dir / "b/metrics.csv", "step,tokens,loss,val_loss\n2,20,4,4.4\n4,40,2,4.2\n4,40,2,4.1\n");
  const std::string a = (dir / "a").string(), b = (dir / "b").string();
  CliResult r = run("plot base=" + a + " " + b + " --baseline base --out " + (dir / "v.svg").string() + " --csv " +
                    (dir / "v.csv").string());
  ASSERT_EQ(r.status, 0) << r.out;
  EXPECT_THAT(r.out, testing::HasSubstr("| base | 4 | 40 | 4.0000 | +0.000% |"));
  EXPECT_THAT(r.out, testing::HasSubstr("| b | 4 | 40 | 4.1000 | +2.500% |"));
  std::ifstream csv(dir / "v.csv");
  const std::string text((std::istreambuf_iterator<char>(csv)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text, "step,base,b\n2,4.5,4.4\n4,4,4.1\n");
  EXPECT_TRUE(std::filesystem::file_size(dir / "v.svg") > 500);

  // A folder whose name has '=' is a path, not LABEL=PATH.
  std::filesystem::create_directories(dir / "lr=2");
  std::filesystem::copy_file(dir / "b/metrics.csv", dir / "lr=2/metrics.csv");
  r = run("plot " + (dir / "lr=2").string());
  EXPECT_THAT(r.out, testing::HasSubstr("| lr=2 | 4 | 40 | 4.1000 |"));

  r = run("plot " + a + " --column nope");
  EXPECT_EQ(r.status, 1);
  EXPECT_THAT(r.out, testing::HasSubstr("no column 'nope' (it has: step, tokens, loss, val_loss)"));
  r = run("plot " + a + " " + a);
  EXPECT_THAT(r.out, testing::HasSubstr("two runs are labelled 'a'"));
  r = run("plot " + a + " --baseline zzz");
  EXPECT_THAT(r.out, testing::HasSubstr("--baseline zzz: no run has that label"));
  r = run("plot " + (dir / "missing").string());
  EXPECT_THAT(r.out, testing::HasSubstr("dsv3_plot/missing: cannot open"));
  write(dir / "a/metrics.csv", "step,tokens,loss,val_loss\n1,10,x5,\n");
  r = run("plot " + a + " --column loss");
  EXPECT_EQ(r.status, 1);
  EXPECT_THAT(r.out, testing::HasSubstr("metrics.csv:2: loss 'x5' is not a number"));
}

// dsv3 plot over seeds: LABEL=P1,P2,.. groups runs; the table gives mean ± sd, the gap to the
// baseline paired seed by seed (mean +- standard error, 95 % t interval), or unpaired when the
// counts differ; the CSV has the mean and the sd at the steps all runs share.
TEST(CliPlot, GroupsSeedsAndPairsThemWithTheBaseline) {
  const std::filesystem::path dir = std::filesystem::path(testing::TempDir()) / "dsv3_plot_seeds";
  std::filesystem::remove_all(dir);
  auto write_run = [&](const std::string& name, double mid, double last) {
    std::filesystem::create_directories(dir / name);
    std::ofstream(dir / name / "metrics.csv") << "step,tokens,val_loss\n1,10,\n2,20," << mid << "\n4,40," << last << "\n";
  };
  // Final gaps of x to base, seed by seed: +1 %, 0 %, +1 %.
  write_run("base1", 5.0, 4.0), write_run("base2", 5.2, 4.2), write_run("base3", 5.4, 4.1);
  write_run("x1", 5.0, 4.04), write_run("x2", 5.0, 4.2), write_run("x3", 5.0, 4.141);
  write_run("y1", 5.0, 4.3), write_run("y2", 5.0, 4.1);
  auto p = [&](const std::string& name) { return (dir / name).string(); };
  CliResult r = run("plot base=" + p("base1") + "," + p("base2") + "," + p("base3") + " x=" + p("x1") + "," + p("x2") +
                    "," + p("x3") + " y=" + p("y1") + "," + p("y2") + " --baseline base --csv " + p("v.csv") +
                    " --out " + p("v.svg"));
  ASSERT_EQ(r.status, 0) << r.out;
  EXPECT_THAT(r.out, testing::HasSubstr("| base | 3 | 4 | 40 | 4.1000 ± 0.1000 | (baseline) | |"));
  // Gaps 1, 0, 1: mean 0.667, sd sqrt(1/3), s.e. 1/3; t(2) = 4.303.
  EXPECT_THAT(r.out, testing::HasSubstr("| x | 3 | 4 | 40 | 4.1270 ± 0.0809 | +0.667% ± 0.333% | [-0.768%, +2.101%] |"));
  // Unpaired: (4.2 - 4.1) / 4.1; s.e. sqrt(0.02/2 + 0.01/3) / 4.1; t(1) = 12.706.
  EXPECT_THAT(r.out, testing::HasSubstr("| y | 2 | 4 | 40 | 4.2000 ± 0.1414 | +2.439% ± 2.816% (unpaired) |"));
  EXPECT_THAT(r.out, testing::HasSubstr("| seed # | base | x | y | x vs base |"));
  EXPECT_THAT(r.out, testing::HasSubstr("| 3 | 4.1000 | 4.1410 | | +1.000% |"));
  std::ifstream csv(p("v.csv"));
  const std::string text((std::istreambuf_iterator<char>(csv)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text, "step,base,base_sd,x,x_sd,y,y_sd\n2,5.2,0.2,5,0,5,0\n4,4.1,0.1,4.127,0.080913534,4.2,0.14142136\n");
  std::ifstream svg(p("v.svg"));
  const std::string picture((std::istreambuf_iterator<char>(svg)), std::istreambuf_iterator<char>());
  EXPECT_THAT(picture, testing::HasSubstr("x (3 seeds, mean ± sd)"));
  EXPECT_THAT(picture, testing::HasSubstr("<polygon"));

  // The gap picture: x's paired gaps at step 2 are 0, -3.846 and -7.407 %; at step 4, 1, 0, 1 %.
  r = run("plot base=" + p("base1") + "," + p("base2") + "," + p("base3") + " x=" + p("x1") + "," + p("x2") + "," +
          p("x3") + " y=" + p("y1") + "," + p("y2") + " --baseline base --gap-out " + p("gap.svg"));
  ASSERT_EQ(r.status, 0) << r.out;
  std::ifstream gap_svg(p("gap.svg"));
  const std::string gaps((std::istreambuf_iterator<char>(gap_svg)), std::istreambuf_iterator<char>());
  EXPECT_THAT(gaps, testing::HasSubstr("val_loss relative to base, %"));
  EXPECT_THAT(gaps, testing::HasSubstr("x (3 seed pairs, mean ± s.e.)"));
  EXPECT_THAT(gaps, testing::HasSubstr("y (gap of the means)"));
  // The axis spans x's lowest band edge at step 2 (-3.751 - 2.139 %) to y's gap at step 4 (+2.439 %).
  EXPECT_THAT(gaps, testing::HasSubstr(">-5.89</text>"));
  EXPECT_THAT(gaps, testing::HasSubstr(">2.44</text>"));
  r = run("plot " + p("x1") + " --gap-out " + p("gap.svg"));
  EXPECT_THAT(r.out, testing::HasSubstr("--gap-out needs --baseline"));

  r = run("plot base= x=" + p("x1"));
  EXPECT_EQ(r.status, 1);
  EXPECT_THAT(r.out, testing::HasSubstr("'base=': no path after '='"));
  r = run("plot x=" + p("x1") + ",," + p("x2"));
  EXPECT_THAT(r.out, testing::HasSubstr("an empty path in the list"));
}

}  // namespace
}  // namespace dsv3
