// The data pipeline: token shards (round trip, every corrupt header named), the corpus
// reader (.txt / .jsonl / .gz, folders, documents per file or per line), and `prepare_data`
// end to end: EOS after every document, the tail held out for validation, shards rolled
// over, and the shards decode back to the corpus.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <zlib.h>

#include "data/pipeline.h"
#include "data/shard.h"
#include "malformed_util.h"
#include "tokenizer/bpe_trainer.h"
#include "tokenizer/corpus.h"
#include "tokenizer_util.h"

namespace dsv3 {
namespace {

using testing::HasSubstr;

void write_gz(const std::string& path, const std::string& text) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_TRUE(f);
  ASSERT_EQ(gzwrite(f, text.data(), unsigned(text.size())), int(text.size()));
  gzclose(f);
}

TEST(Shard, WriteThenReadBack) {
  test::ScratchDir dir;
  const std::string path = dir / "s.bin";
  std::vector<int32_t> ids;
  for (int i = 0; i < 200000; ++i) ids.push_back((i * 7919) % 4096);
  {
    ShardWriter w(path, 4096);
    w.write(std::span(ids).first(1000));
    w.write(std::span(ids).subspan(1000));
    EXPECT_FALSE(std::filesystem::exists(path));  // only the temp file until finish()
    w.finish();
  }
  ShardReader r(path, /*check_ids=*/true);
  EXPECT_EQ(r.header().version, 1u);
  EXPECT_EQ(r.header().vocab_size, 4096u);
  ASSERT_EQ(r.tokens().size(), ids.size());
  EXPECT_TRUE(std::equal(ids.begin(), ids.end(), r.tokens().begin()));
  EXPECT_EQ(std::filesystem::file_size(path), 32 + 4 * ids.size());
  const std::string bytes = test::read_bytes(path);
  EXPECT_EQ(bytes.substr(0, 8), "DSV3TOKS");
  // An unfinished writer leaves nothing behind.
  { ShardWriter w(dir / "never.bin", 10); }
  EXPECT_FALSE(std::filesystem::exists(dir / "never.bin.tmp"));
  EXPECT_FALSE(std::filesystem::exists(dir / "never.bin"));
}

TEST(Shard, CorruptShardsAreNamed) {
  test::ScratchDir dir;
  const std::string path = dir / "s.bin";
  {
    ShardWriter w(path, 100);
    const std::vector<int32_t> ids = {1, 2, 3, 99};
    w.write(ids);
    w.finish();
  }
  const std::string good = test::read_bytes(path);
  auto damaged = [&](const std::function<void(std::string&)>& f, bool check_ids = false) {
    std::string b = good;
    f(b);
    test::write_bytes(path, b);
    return test::error_of([&] { ShardReader r(path, check_ids); });
  };
  EXPECT_THAT(damaged([](std::string& b) { b.resize(20); }), HasSubstr("s.bin: 20 bytes is too short"));
  EXPECT_THAT(damaged([](std::string& b) { b[0] = 'X'; }), HasSubstr("not a dsv3 token shard (bad magic)"));
  EXPECT_THAT(damaged([](std::string& b) { b[8] = 2; }), HasSubstr("shard version 2 is not supported"));
  EXPECT_THAT(damaged([](std::string& b) { b[12] = 64; }), HasSubstr("header size 64"));
  EXPECT_THAT(damaged([](std::string& b) { std::memset(b.data() + 16, 0, 4); }), HasSubstr("vocab size is 0"));
  EXPECT_THAT(damaged([](std::string& b) { b.resize(b.size() - 2); }), HasSubstr("header says 4 tokens (48 bytes) but the file has 46 bytes"));
  EXPECT_THAT(damaged([](std::string& b) { b[24] = 9; }), HasSubstr("header says 9 tokens"));
  EXPECT_THAT(damaged([](std::string& b) { b[32 + 4 * 3] = 100; }, true), HasSubstr("token 3 is id 100, outside the vocabulary [0, 100)"));
  EXPECT_THAT(test::error_of([&] { ShardReader r(dir / "missing.bin"); }), HasSubstr("missing.bin: cannot open"));
  ShardWriter w(dir / "w.bin", 10);
  EXPECT_THAT(test::error_of([&] { w.write(std::vector<int32_t>{3, 10}); }), HasSubstr("token id 10 is outside the vocabulary [0, 10)"));
}

TEST(Corpus, ReadsTxtJsonlGzAndFolders) {
  test::ScratchDir dir;
  std::filesystem::create_directories(dir / "sub/deeper");
  test::write_bytes(dir / "sub/a.txt", "first line\nsecond line\n\nthird\n");
  test::write_bytes(dir / "sub/b.jsonl", "{\"text\": \"doc one\"}\n\n{\"text\": \"doc\\ntwo\", \"id\": 3}\n{\"text\": \"\"}\n");
  write_gz(dir / "sub/deeper/c.txt.gz", "gz text");
  test::write_bytes(dir / "sub/ignored.md", "not a corpus file");
  EXPECT_EQ(corpus_files({dir / "sub"}),
            (std::vector<std::string>{dir / "sub/a.txt", dir / "sub/b.jsonl", dir / "sub/deeper/c.txt.gz"}));
  auto read_all = [&](TxtDocs mode) {
    CorpusReader r({dir / "sub"}, CorpusOptions{.txt_docs = mode});
    std::vector<std::string> docs;
    std::string text, cur;
    bool end = false;
    while (r.next(text, end)) {
      cur += text;
      if (end) docs.push_back(std::exchange(cur, ""));
    }
    EXPECT_TRUE(cur.empty());
    return docs;
  };
  EXPECT_EQ(read_all(TxtDocs::file),
            (std::vector<std::string>{"first line\nsecond line\n\nthird\n", "doc one", "doc\ntwo", "gz text"}));
  EXPECT_EQ(read_all(TxtDocs::line), (std::vector<std::string>{"first line", "second line", "third", "doc one", "doc\ntwo", "gz text"}));

  EXPECT_THAT(test::error_of([&] { corpus_files({dir / "nothing-here"}); }), HasSubstr("nothing-here: no such file or folder"));
  EXPECT_THAT(test::error_of([&] { corpus_files({dir / "sub/ignored.md"}); }), HasSubstr("ignored.md: not a corpus file"));
  std::filesystem::create_directories(dir / "empty");
  EXPECT_THAT(test::error_of([&] { corpus_files({dir / "empty"}); }), HasSubstr("empty: folder holds no .txt"));
  test::write_bytes(dir / "bad.jsonl", "{\"text\": \"ok\"}\n{\"body\": 1}\n");
  EXPECT_THAT(test::error_of([&] { CorpusReader r({dir / "bad.jsonl"}); std::string t; bool e; while (r.next(t, e)) {} }),
              HasSubstr("bad.jsonl: line 2: not an object with a \"text\" string"));
  test::write_bytes(dir / "bad2.jsonl", "{\"text\": \"ok\"\n");
  EXPECT_THAT(test::error_of([&] { CorpusReader r({dir / "bad2.jsonl"}); std::string t; bool e; while (r.next(t, e)) {} }),
              HasSubstr("bad2.jsonl: line 1: not valid JSON"));
}

TEST(Corpus, LongDocumentsComeInChunksThatJoinBack) {
  const std::string& text = test::corpus_text();
  CorpusReader r({DSV3_CORPUS});
  EXPECT_EQ(r.total_size(), text.size());  // from the gzip trailer
  std::string joined, chunk;
  bool end = false;
  int n = 0, ends = 0;
  while (r.next(chunk, end)) {
    EXPECT_LE(chunk.size(), 70000u);
    joined += chunk;
    ++n;
    ends += end;
  }
  EXPECT_GT(n, 60);
  EXPECT_EQ(ends, 1);
  EXPECT_TRUE(joined == text);
  EXPECT_EQ(r.text_bytes(), text.size());
  EXPECT_EQ(r.position(), text.size());
}

class Pipeline : public testing::Test {
 protected:
  // A 1K-vocabulary tokenizer learnt once for the suite.
  static void SetUpTestSuite() {
    tok_dir_ = testing::TempDir() + "/dsv3_pipeline_tokenizer_" + std::to_string(::getpid());
    BpeTrainer trainer(BpeTrainerOptions{.vocab_size = 1024});
    trainer.add_text(test::corpus_text().substr(0, 1 << 20));
    write_trained_tokenizer(tok_dir_, trainer.train(), default_special_tokens());
  }
  static void TearDownTestSuite() { std::filesystem::remove_all(tok_dir_); }
  static std::string tok_dir() { return tok_dir_; }
  static inline std::string tok_dir_;
};

std::vector<uint32_t> all_tokens(const std::string& dir, const std::vector<ShardInfo>& shards) {
  std::vector<uint32_t> out;
  for (const ShardInfo& s : shards) {
    ShardReader r(dir + "/" + s.file, true);
    EXPECT_EQ(r.tokens().size(), s.tokens);
    out.insert(out.end(), r.tokens().begin(), r.tokens().end());
  }
  return out;
}

// Splits a token stream at EOS into the decoded documents.
std::vector<std::string> documents(const Tokenizer& tok, const std::vector<uint32_t>& ids, int32_t eos) {
  std::vector<std::string> docs;
  std::vector<int32_t> cur;
  for (uint32_t id : ids) {
    if (int32_t(id) == eos) {
      docs.push_back(tok.decode(cur));
      cur.clear();
    } else {
      cur.push_back(int32_t(id));
    }
  }
  EXPECT_TRUE(cur.empty()) << "the stream must end with EOS";
  return docs;
}

TEST_F(Pipeline, DocumentsEosValidationTailAndShards) {
  test::ScratchDir dir;
  std::vector<std::string> want;
  std::string jsonl;
  for (int i = 0; i < 300; ++i) {
    std::string doc = "Document " + std::to_string(i) + ": And God said, Let there be light <｜end▁of▁sentence｜> in text.";
    jsonl += nlohmann::json({{"text", doc}}).dump() + "\n";
    want.push_back(doc);
  }
  std::filesystem::create_directories(dir / "in");
  test::write_bytes(dir / "in/a.jsonl", jsonl);
  write_gz(dir / "in/b.txt.gz", "A whole file\nis one document.\n");
  want.push_back("A whole file\nis one document.\n");

  const DataSummary s = prepare_data({.tokenizer = tok_dir(), .inputs = {dir / "in"}, .out = dir / "out",
                                      .val_fraction = 0.1, .shard_tokens = 1000, .progress = false});
  const Tokenizer tok(tok_dir());
  EXPECT_EQ(s.eos_id, 1);
  EXPECT_EQ(s.vocab_size, 1024);
  EXPECT_EQ(s.documents, 301u);
  EXPECT_GT(s.train.size(), 3u);  // rolled over every 1000 tokens
  const auto train = all_tokens(dir / "out", s.train);
  const auto val = all_tokens(dir / "out", s.val);
  EXPECT_EQ(train.size(), s.train_tokens);
  EXPECT_EQ(val.size(), s.val_tokens);
  // The text "<｜end▁of▁sentence｜>" inside a document is text, not a document end.
  std::vector<std::string> got = documents(tok, train, s.eos_id);
  const size_t n_train = got.size();
  for (const std::string& d : documents(tok, val, s.eos_id)) got.push_back(d);
  EXPECT_EQ(got, want);
  // About the last 10% of the text is validation, as whole documents at the end.
  EXPECT_GT(got.size() - n_train, 20u);
  EXPECT_LT(got.size() - n_train, 40u);
  const auto meta = test::read_json(dir / "out/data.json");
  EXPECT_EQ(meta["train_tokens"], s.train_tokens);
  EXPECT_EQ(meta["val"][0]["file"], "val-00000.bin");
  EXPECT_EQ(meta["eos_id"], 1);
}

TEST_F(Pipeline, OneLongDocumentIsCutForValidation) {
  test::ScratchDir dir;
  const std::string text = test::corpus_text().substr(0, 400000);
  test::write_bytes(dir / "kjv.txt", text);
  const DataSummary s = prepare_data({.tokenizer = tok_dir(), .inputs = {dir / "kjv.txt"}, .out = dir / "out",
                                      .val_fraction = 0.05, .progress = false});
  const Tokenizer tok(tok_dir());
  const auto train = documents(tok, all_tokens(dir / "out", s.train), s.eos_id);
  const auto val = documents(tok, all_tokens(dir / "out", s.val), s.eos_id);
  ASSERT_EQ(train.size(), 1u);
  ASSERT_EQ(val.size(), 1u);
  EXPECT_TRUE(train[0] + val[0] == text);
  EXPECT_NEAR(double(val[0].size()) / double(text.size()), 0.05, 0.01);
  // Cut at a line start, and the ids are those of encoding each part whole.
  EXPECT_EQ(train[0].back(), '\n');
  std::vector<int32_t> whole = tok.encode(train[0]);
  whole.push_back(s.eos_id);
  const auto tr_ids = all_tokens(dir / "out", s.train);
  EXPECT_TRUE(std::equal(whole.begin(), whole.end(), tr_ids.begin(), tr_ids.end(), [](int32_t a, uint32_t b) { return uint32_t(a) == b; }));
}

TEST_F(Pipeline, Errors) {
  test::ScratchDir dir;
  test::write_bytes(dir / "a.txt", "text");
  EXPECT_THAT(test::error_of([&] { prepare_data({.tokenizer = tok_dir(), .inputs = {dir / "a.txt"}, .out = dir / "o", .val_fraction = 1.5, .progress = false}); }),
              HasSubstr("--val-fraction must be in [0, 1)"));
  EXPECT_THAT(test::error_of([&] { prepare_data({.tokenizer = dir.path(), .inputs = {dir / "a.txt"}, .out = dir / "o", .progress = false}); }),
              HasSubstr("tokenizer.json: cannot open"));
  EXPECT_THAT(test::error_of([&] { prepare_data({.tokenizer = tok_dir(), .inputs = {dir / "nope.txt"}, .out = dir / "o", .progress = false}); }),
              HasSubstr("nope.txt: no such file or folder"));
}

}  // namespace
}  // namespace dsv3
