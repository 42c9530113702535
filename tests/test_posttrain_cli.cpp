// dsv3 sft, dsv3 grpo and dsv3 tasks end to end, as a user runs them: on the golden tiny
// checkpoint with a 500-token tokenizer, a few steps each; checkpoints that load in
// dsv3 generate; resume; bad input named by file and line with nothing saved lost.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "cli_util.h"
#include "model_fixture.h"
#include "train/checkpoint.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;
using testing::HasSubstr;

int64_t lines_of(const std::string& path) {
  std::ifstream in(path);
  int64_t n = 0;
  for (std::string line; std::getline(in, line);) n += !line.empty();
  return n;
}

TEST(PosttrainCli, SftTrainsResumesAndNamesBadConversations) {
  test::ScratchDir dir;
  const std::string model = test::servable_model();
  ASSERT_EQ(test::run("tasks --op add --digits 2 --count 40 --format sft --out " + dir / "sft.jsonl").status, 0);
  ASSERT_EQ(test::run("tasks --op add --digits 2 --count 8 --split heldout --format sft --out " + dir / "val.jsonl").status, 0);
  EXPECT_EQ(lines_of(dir / "sft.jsonl"), 40);
  const std::string base = "sft --model " + model + " --data " + dir / "sft.jsonl" + " --val " + dir / "val.jsonl" +
                           " --out " + dir / "run" + " --batch 4 --seq 64 --eval-every 2 --save-every 2 --log-every 1 --lr 1e-3";
  auto r = test::run(base + " --steps 4");
  ASSERT_EQ(r.status, 0) << r.out;
  EXPECT_THAT(r.out, HasSubstr("40 conversations (0 longer than --seq 64, cut)"));
  EXPECT_EQ(lines_of(dir / "run/metrics.csv"), 5);  // header + 4 steps
  EXPECT_TRUE(fs::exists(dir / "run/loss.svg"));
  // The loss is on the assistant's tokens and falls from the checkpoint's.
  std::ifstream csv(dir / "run/metrics.csv");
  std::string header, first, line, last;
  std::getline(csv, header), std::getline(csv, first);
  while (std::getline(csv, line)) last = line;
  auto loss_of = [](const std::string& row) { return std::stod(row.substr(row.find(',', row.find(',', row.find(',') + 1) + 1) + 1)); };
  EXPECT_LT(loss_of(last), loss_of(first)) << first << "\n" << last;
  // A fresh run over it is refused; --resume continues to step 6.
  r = test::run(base + " --steps 6");
  EXPECT_NE(r.status, 0);
  EXPECT_THAT(r.out, HasSubstr("already holds checkpoints"));
  r = test::run(base + " --steps 6 --resume");
  ASSERT_EQ(r.status, 0) << r.out;
  EXPECT_THAT(r.out, HasSubstr("resumed at step 4"));
  EXPECT_EQ(read_trainer_state(dir / "run/checkpoint-0000006").step, 6);
  // The checkpoint is a model folder: generate reads it, chat template and all.
  r = test::run("generate --model " + dir / "run/checkpoint-0000006" + " --prompt 'What is 1 + 2?' --max-tokens 4 --temperature 0");
  EXPECT_EQ(r.status, 0) << r.out;
  // Bad conversations are named by line, and the run folder keeps its checkpoints.
  std::ofstream(dir / "bad.jsonl") << R"({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})"
                                   << "\n" << R"({"messages": [{"role": "oracle", "content": "a"}]})" << "\n";
  r = test::run("sft --model " + model + " --data " + dir / "bad.jsonl" + " --out " + dir / "run --steps 8 --resume");
  EXPECT_NE(r.status, 0);
  EXPECT_THAT(r.out, HasSubstr("bad.jsonl line 2: message 0 has the unknown role 'oracle'"));
  EXPECT_EQ(read_trainer_state(*latest_checkpoint(dir / "run")).step, 6);
  r = test::run("sft --model " + dir.path() + " --data " + dir / "sft.jsonl" + " --out " + dir / "run2");
  EXPECT_NE(r.status, 0);
  EXPECT_THAT(r.out, HasSubstr("has no config.json"));
}

TEST(PosttrainCli, GrpoTrainsEvaluatesResumesAndNamesBadInput) {
  test::ScratchDir dir;
  const std::string model = test::servable_model();
  ASSERT_EQ(test::run("tasks --op add --digits 2 --count 30 --out " + dir / "train.jsonl").status, 0);
  ASSERT_EQ(test::run("tasks --op add --digits 2 --count 4 --split heldout --out " + dir / "heldout.jsonl").status, 0);
  const std::string base = "grpo --model " + model + " --tasks " + dir / "train.jsonl" + " --eval-tasks " + dir / "heldout.jsonl" +
                           " --out " + dir / "run" + " --prompts 2 --group 3 --max-new-tokens 6 --eval-every 2 --save-every 2" +
                           " --log-every 1 --lr 1e-3 --reward format";
  auto r = test::run(base + " --steps 2");
  ASSERT_EQ(r.status, 0) << r.out;
  EXPECT_THAT(r.out, HasSubstr("held-out accuracy at step 0"));
  EXPECT_EQ(lines_of(dir / "run/metrics.csv"), 4);  // header, step 0's held-out accuracy, 2 steps
  for (const char* plot : {"reward.svg", "kl.svg", "length.svg"}) EXPECT_TRUE(fs::exists(dir / "run/" + plot)) << plot;
  r = test::run(base + " --steps 3 --resume");
  ASSERT_EQ(r.status, 0) << r.out;
  EXPECT_THAT(r.out, HasSubstr("resumed at step 2"));
  EXPECT_EQ(lines_of(dir / "run/metrics.csv"), 5);
  // The held-out score is dsv3 eval's on the same tasks (greedy, chat, the reward).
  r = test::run("eval --model " + *latest_checkpoint(dir / "run") + " --task " + dir / "heldout.jsonl" +
                " --chat --reward format --max-tokens 6 --json", false);
  ASSERT_EQ(r.status, 0) << r.out;
  std::ifstream csv(dir / "run/metrics.csv");
  std::string line, last;
  while (std::getline(csv, line)) last = line;
  const auto j = nlohmann::json::parse(r.out);
  std::vector<std::string> cols;
  for (size_t a = 0, b; a <= last.size(); a = b + 1) {
    b = last.find(',', a);
    if (b == std::string::npos) b = last.size();
    cols.push_back(last.substr(a, b - a));
  }
  ASSERT_GE(cols.size(), 12u);
  EXPECT_NEAR(std::stod(cols[10]), j["metrics"]["exact_match"]["value"].get<double>(), 1e-9) << last;
  // Bad input, each named; the run's checkpoints stay.
  std::ofstream(dir / "bad.jsonl") << "{\"prompt\": \"1+1?\", \"answer\": \"2\"}\n{\"prompt\": \"2+2?\"}\n";
  for (const auto& [args, says] : std::vector<std::pair<std::string, std::string>>{
           {"--tasks " + dir / "bad.jsonl", "bad.jsonl line 2: the task has no \"answer\""},
           {"--tasks " + dir / "train.jsonl --reward nope", "unknown reward 'nope'"},
           {"--tasks " + dir / "train.jsonl --group 1", "--group must be >= 2"},
           {"--tasks " + dir / "train.jsonl --group 0", "--group must be >= 2"}}) {
    r = test::run("grpo --model " + model + " --out " + dir / "run --steps 9 --resume --prompts 2 --max-new-tokens 6 " + args);
    EXPECT_NE(r.status, 0) << args;
    EXPECT_THAT(r.out, HasSubstr(says)) << args;
  }
  EXPECT_EQ(read_trainer_state(*latest_checkpoint(dir / "run")).step, 3);
}

}  // namespace
}  // namespace dsv3
