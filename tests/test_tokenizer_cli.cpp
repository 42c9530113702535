// `dsv3 tokenize / detokenize / template / train-tokenizer / data` through the built binary,
// as outside checkers use them: exact output bytes, and errors that name the problem.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>

#include "cli_util.h"
#include "data/shard.h"
#include "malformed_util.h"
#include "tokenizer_util.h"

namespace dsv3 {
namespace {

using test::CliResult;
using test::run;

using testing::HasSubstr;

std::string json_ids(const std::vector<int32_t>& ids) {
  std::string s = "[";
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? ", " : "") + std::to_string(ids[i]);
  return s + "]";
}

TEST(TokenizerCli, TokenizeDetokenizeTemplateMatchTheGoldens) {
  test::ScratchDir dir;
  const std::string model = test::tokenizer_dir();
  int n = 0;
  for (const auto& c : test::golden_cases()) {
    const std::string text = c["text"];
    if (text.find('\0') != std::string::npos || n++ % 10 != 0) continue;  // a sample; NUL cannot go through argv
    SCOPED_TRACE(c["kind"].get<std::string>());
    const auto ids = c["ids"].get<std::vector<int32_t>>();
    test::write_bytes(dir / "in.txt", text);
    CliResult r = run("tokenize --model " + model + " --file " + dir / "in.txt", false);
    ASSERT_EQ(r.status, 0);
    EXPECT_EQ(r.out, json_ids(ids) + "\n");
    if (!ids.empty()) {
      r = run("detokenize --model " + model + " --ids \"" + json_ids(ids) + "\"", false);
      ASSERT_EQ(r.status, 0);
      EXPECT_EQ(r.out, text);  // exactly, no newline added
    }
    if (c["kind"] == "chat_template") {
      test::write_bytes(dir / "m.json", c["messages"].dump());
      r = run("template --model " + model + " --messages " + dir / "m.json" +
                  (c["add_generation_prompt"].get<bool>() ? " --generation-prompt" : ""),
              false);
      ASSERT_EQ(r.status, 0);
      EXPECT_EQ(r.out, text);
    }
  }
  // Every chat case through `template`.
  for (const auto& c : test::golden_cases()) {
    if (c["kind"] != "chat_template") continue;
    test::write_bytes(dir / "m.json", c["messages"].dump());
    CliResult r = run("template --model " + model + " --messages " + dir / "m.json" +
                          (c["add_generation_prompt"].get<bool>() ? " --generation-prompt" : ""),
                      false);
    ASSERT_EQ(r.status, 0);
    EXPECT_EQ(r.out, c["text"].get<std::string>());
  }
}

TEST(TokenizerCli, TextSpecialAndBos) {
  const std::string model = test::tokenizer_dir();
  CliResult r = run("tokenize --model " + model + " --text 'Hello world<｜end▁of▁sentence｜>'", false);
  EXPECT_EQ(r.out, "[19923, 2058, 1]\n");
  r = run("tokenize --model " + model + " --text 'Hello world<｜end▁of▁sentence｜>' --no-special", false);
  EXPECT_THAT(r.out, testing::StartsWith("[19923, 2058, "));
  EXPECT_THAT(r.out, testing::Not(HasSubstr(", 1]")));
  r = run("tokenize --model " + model + " --text 'Hello world' --bos", false);
  EXPECT_EQ(r.out, "[0, 19923, 2058]\n");
  r = run("tokenize --model " + model + " --text ''", false);
  EXPECT_EQ(r.out, "[]\n");
  r = run("detokenize --model " + model + " --ids '0 19923 2058 1' --skip-special", false);
  EXPECT_EQ(r.out, "Hello world");
}

TEST(TokenizerCli, Errors) {
  const std::string model = test::tokenizer_dir();
  CliResult r = run("tokenize --model " + model);
  EXPECT_EQ(r.status, 1);
  EXPECT_THAT(r.out, HasSubstr("give exactly one of --text and --file"));
  r = run("detokenize --model " + model + " --ids '1 999999'");
  EXPECT_EQ(r.status, 1);
  EXPECT_THAT(r.out, HasSubstr("id 999999 at index 1 is outside the vocabulary [0, 128815)"));
  r = run("detokenize --model " + model + " --ids '1 x'");
  EXPECT_EQ(r.status, 1);
  EXPECT_THAT(r.out, HasSubstr("'x' is not a token id"));
  test::ScratchDir dir;
  test::write_bytes(dir / "m.json", "{\"role\": \"user\"}");
  r = run("template --model " + model + " --messages " + dir / "m.json");
  EXPECT_EQ(r.status, 1);
  EXPECT_THAT(r.out, HasSubstr("expected a JSON array"));
  r = run("tokenize --model " + dir.path() + " --text hi");
  EXPECT_EQ(r.status, 1);
  EXPECT_THAT(r.out, HasSubstr("tokenizer.json: cannot open"));
}

TEST(TokenizerCli, TrainTokenizerThenData) {
  test::ScratchDir dir;
  CliResult r = run("train-tokenizer --input " + std::string(DSV3_CORPUS) + " --vocab-size 1024 --out " + dir / "tok");
  ASSERT_EQ(r.status, 0) << r.out;
  EXPECT_THAT(r.out, HasSubstr("vocabulary 1024"));
  r = run("tokenize --model " + dir / "tok" + " --text 'In the beginning' --bos", false);
  EXPECT_THAT(r.out, testing::StartsWith("[0, "));
  r = run("data --tokenizer " + dir / "tok" + " --input " + std::string(DSV3_CORPUS) + " --out " + dir / "shards" + " --quiet");
  ASSERT_EQ(r.status, 0) << r.out;
  EXPECT_THAT(r.out, HasSubstr("train tokens"));
  ShardReader train(dir / "shards/train-00000.bin", true);
  ShardReader val(dir / "shards/val-00000.bin", true);
  EXPECT_EQ(train.header().vocab_size, 1024u);
  EXPECT_GT(train.tokens().size(), 50 * val.tokens().size());
  EXPECT_EQ(val.tokens().back(), 1u);  // EOS ends the corpus
}

}  // namespace
}  // namespace dsv3
