// The BPE trainer: a 4K-vocabulary tokenizer learnt from the bundled corpus round-trips the
// whole corpus exactly, reloads through the normal loader, is deterministic, and ships a
// chat template; merges on a toy corpus are the expected ones; bad options are errors.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "malformed_util.h"
#include "tokenizer/bpe_trainer.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/corpus.h"
#include "tokenizer/tokenizer_config.h"
#include "tokenizer_util.h"

namespace dsv3 {
namespace {

using testing::HasSubstr;

std::string train_corpus(int32_t vocab_size) {
  BpeTrainer trainer(BpeTrainerOptions{.vocab_size = vocab_size});
  CorpusReader reader({DSV3_CORPUS});
  std::string chunk;
  bool doc_end = false;
  while (reader.next(chunk, doc_end)) trainer.add_text(chunk);
  return trainer.train();
}

TEST(BpeTrainer, FourKVocabularyRoundTripsTheBundledCorpus) {
  test::ScratchDir dir;
  const std::string json = train_corpus(4096);
  write_trained_tokenizer(dir.path(), json, default_special_tokens());
  const Tokenizer tok(dir.path());  // the normal loader
  EXPECT_EQ(tok.vocab_size(), 4096);
  EXPECT_EQ(tok.bpe().n_merges(), 4096u - 5 - 256);
  const std::string& text = test::corpus_text();
  const auto ids = tok.encode(text);
  EXPECT_TRUE(tok.decode(ids) == text);
  // A learnt vocabulary compresses English: well under one token per 3 bytes.
  EXPECT_LT(double(ids.size()), double(text.size()) / 3.5);
  EXPECT_EQ(tok.encode(" the"), std::vector<int32_t>{tok.token_id(byte_level::encode(" the")).value()});
  // The same corpus gives the same tokenizer.
  EXPECT_TRUE(train_corpus(4096) == json);

  // tokenizer_config.json: BOS/EOS and a chat template in DeepSeek-V3's layout.
  const TokenizerConfig config = load_tokenizer_config(dir.path());
  EXPECT_EQ(config.bos_token, "<｜begin▁of▁sentence｜>");
  EXPECT_EQ(config.eos_token, "<｜end▁of▁sentence｜>");
  EXPECT_EQ(tok.token_id(*config.eos_token), 1);
  const auto messages = nlohmann::ordered_json::parse(R"([{"role": "system", "content": "S1"}, {"role": "system", "content": "S2"},
    {"role": "user", "content": "Who begat Enos?"}, {"role": "assistant", "content": "Seth."}, {"role": "user", "content": "And?"}])");
  const std::string prompt = apply_chat_template(config, messages, true);
  EXPECT_EQ(prompt,
            "<｜begin▁of▁sentence｜>S1\n\nS2<｜User｜>Who begat Enos?<｜Assistant｜>Seth.<｜end▁of▁sentence｜><｜User｜>And?<｜Assistant｜>");
  const auto prompt_ids = tok.encode(prompt);
  EXPECT_EQ(prompt_ids.front(), 0);
  EXPECT_EQ(std::count(prompt_ids.begin(), prompt_ids.end(), 3), 2);  // <｜User｜>
  EXPECT_EQ(tok.decode(prompt_ids), prompt);
}

TEST(BpeTrainer, ToyCorpusMergesTheMostFrequentPairs) {
  BpeTrainer trainer(BpeTrainerOptions{.vocab_size = 2 + 256 + 3, .special_tokens = {"<s>", "</s>"}});
  for (int i = 0; i < 10; ++i) trainer.add_text("low low low lower newest newest ");
  trainer.train();
  const auto& m = trainer.merges();
  ASSERT_EQ(m.size(), 3u);
  // Pieces (a space stays with the word after it): "low" x10, " low" x20, " lower" x10,
  // " newest" x20. (l,o) and (o,w) both occur 40 times: the smaller pair goes first; then
  // (Ġ,low) 30 times beats (w,e) 20.
  EXPECT_EQ(m[0], std::make_pair(std::string("l"), std::string("o")));
  EXPECT_EQ(m[1], std::make_pair(std::string("lo"), std::string("w")));
  EXPECT_EQ(m[2], std::make_pair(std::string("Ġ"), std::string("low")));
}

TEST(BpeTrainer, StopsWhenNoPairIsFrequentEnough) {
  BpeTrainer trainer(BpeTrainerOptions{.vocab_size = 5000, .min_frequency = 2});
  trainer.add_text("abc abd");
  const Tokenizer tok = Tokenizer::from_json(trainer.train(), "small");
  EXPECT_LT(tok.vocab_size(), 5000);
  EXPECT_EQ(tok.decode(tok.encode("abc abd xyz")), "abc abd xyz");
}

TEST(BpeTrainer, BadOptionsAreErrors) {
  EXPECT_THAT(test::error_of([] { BpeTrainer(BpeTrainerOptions{.vocab_size = 200}); }), HasSubstr("vocab size 200 is below the 261 ids"));
  EXPECT_THAT(test::error_of([] { BpeTrainer(BpeTrainerOptions{.special_tokens = {"<s>"}}); }), HasSubstr("at least two special tokens"));
  EXPECT_THAT(test::error_of([] { BpeTrainer(BpeTrainerOptions{.special_tokens = {"<s>", "<s>"}}); }), HasSubstr("\"<s>\" is given twice"));
}

}  // namespace
}  // namespace dsv3
