// The byte-level BPE tokenizer: every golden case of the real DeepSeek-V3 tokenizer (ids,
// decoded text, skip_special, BOS), the regex translation behind the U+180E case, the two
// BPE algorithms against each other, any bytes (invalid UTF-8, NUL, 20 MB) round-tripping,
// chunked encoding, and every malformed tokenizer.json with its message.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <random>
#include <thread>

#include "malformed_util.h"
#include "tokenizer/corpus.h"
#include "tokenizer/pre_tokenizer.h"
#include "tokenizer/tokenizer_config.h"
#include "tokenizer_util.h"

namespace dsv3 {
namespace {

using test::deepseek;
using testing::HasSubstr;

std::string show(const std::string& s) { return nlohmann::json(s).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace); }

TEST(TokenizerGolden, EveryCaseEncodesAndDecodesAsDeepSeekV3) {
  const Tokenizer& tok = deepseek();
  const TokenizerConfig config = load_tokenizer_config(test::tokenizer_dir());
  ASSERT_TRUE(config.bos_token);
  const int32_t bos = tok.token_id(*config.bos_token).value();
  EXPECT_EQ(bos, 0);
  int n = 0, n_skip = 0, n_bos = 0;
  for (const auto& c : test::golden_cases()) {
    const std::string text = c["text"];
    SCOPED_TRACE(c["kind"].get<std::string>() + ": " + show(text).substr(0, 120));
    const auto want = c["ids"].get<std::vector<int32_t>>();
    const std::vector<int32_t> ids = tok.encode(text);
    EXPECT_EQ(ids, want);
    EXPECT_EQ(tok.decode(want), c["decoded"].get<std::string>());
    EXPECT_EQ(tok.decode(want), text);
    const std::string skip = c.contains("decoded_skip_special") ? c["decoded_skip_special"].get<std::string>() : c["decoded"].get<std::string>();
    EXPECT_EQ(tok.decode(want, /*skip_special=*/true), skip);
    n_skip += c.contains("decoded_skip_special");
    if (c.contains("ids_with_special")) {  // transformers' add_special_tokens: BOS first
      std::vector<int32_t> with_bos{bos};
      with_bos.insert(with_bos.end(), ids.begin(), ids.end());
      EXPECT_EQ(with_bos, c["ids_with_special"].get<std::vector<int32_t>>());
      ++n_bos;
    }
    ++n;
  }
  EXPECT_EQ(n, 90);
  EXPECT_GT(n_skip, 0);
  EXPECT_EQ(n_bos, 85);
}

TEST(TokenizerGolden, Vocabulary) {
  const Tokenizer& tok = deepseek();
  EXPECT_EQ(tok.vocab_size(), 128815);
  EXPECT_EQ(tok.added_tokens().size(), 818u);
  EXPECT_EQ(tok.bpe().n_merges(), 127741u);
  EXPECT_EQ(tok.token_id("<｜User｜>"), 128803);
  EXPECT_TRUE(tok.is_special(0));
  EXPECT_TRUE(tok.is_special(128799));  // a placeholder
  EXPECT_FALSE(tok.is_special(128803));  // <｜User｜> is not special: it survives skip_special
  EXPECT_FALSE(tok.token_id("<｜place▁holder▁no▁800｜>"));
}

// The U+180E case of the golden set: Oniguruma (what the reference runs) follows Unicode's
// White_Space, which dropped U+180E MONGOLIAN VOWEL SEPARATOR in 6.3; PCRE2's \s with UCP
// still matches it, and that splits "p \u180e q" differently (other ids). translate_regex
// rewrites \s as the White_Space set, so the golden ids come out of PCRE2 unchanged.
TEST(TokenizerRegex, SpaceMeansUnicodeWhiteSpaceLikeOniguruma) {
  const std::string t = translate_regex(R"(\s+(?!\S)|[^\s\d]+)");
  EXPECT_THAT(t, HasSubstr(R"(\x{3000})"));
  EXPECT_THAT(t, testing::Not(HasSubstr(R"(\s)")));
  EXPECT_THAT(t, testing::Not(HasSubstr(R"(\S)")));
  Regex space(R"(\s)");
  RegexState state;
  size_t b = 0, e = 0;
  for (const char* ws : {" ", "\t", "\n", "\v", "\f", "\r", "\u0085", "\u00A0", "\u1680", "\u2000", "\u200A", "\u2028",
                         "\u2029", "\u202F", "\u205F", "\u3000"})
    EXPECT_TRUE(space.find(ws, 0, state, b, e)) << show(ws);
  for (const char* not_ws : {"\u180E", "\uFEFF", "\u200B", "x", "\x1C"}) EXPECT_FALSE(space.find(not_ws, 0, state, b, e)) << show(not_ws);
  EXPECT_EQ(deepseek().encode("p \u180E q"), (std::vector<int32_t>{82, 223, 115522, 239, 5618}));
  // \h is a hex digit in Oniguruma; a negated class escape inside [...] is refused.
  Regex hex(R"(\h+)");
  ASSERT_TRUE(hex.find("zz09afG", 0, state, b, e));
  EXPECT_EQ(b, 2u);
  EXPECT_EQ(e, 6u);
  EXPECT_THAT(test::error_of([] { translate_regex(R"([\S])"); }), HasSubstr("inside a character class is not supported"));
}

TEST(TokenizerBpe, LinearAndHeapGiveTheSameIds) {
  const Bpe& bpe = deepseek().bpe();
  std::mt19937 rng(7);
  const std::string alphabet = "aaaabbbcdeeeeeeefghiiiijklmnooooopqrstttuvwxyz   .,'\n";
  BpeScratch s;
  for (int trial = 0; trial < 3000; ++trial) {
    const size_t n = 1 + rng() % 160;
    std::string piece;
    for (size_t i = 0; i < n; ++i)
      piece += trial % 3 == 0 ? char(rng() % 256) : alphabet[rng() % alphabet.size()];
    std::vector<int32_t> a, b;
    bpe.encode_linear(piece, s, a);
    bpe.encode_heap(piece, s, b);
    ASSERT_EQ(a, b) << show(piece);
  }
}

TEST(TokenizerBytes, InvalidUtf8RoundTrips) {
  const Tokenizer& tok = deepseek();
  for (const std::string& s : {std::string("\x80"), std::string("\xff\xfe"), std::string("a\xc3"), std::string("\xc0\xaf/"),
                              std::string("\xed\xa0\x80 surrogate"), std::string("\xf4\x90\x80\x80 too big"),
                              std::string("ok \xe2\x82 cut"), std::string("\xf0\x9f\x98"), std::string("caf\xe9 1234\xa0x")}) {
    const auto ids = tok.encode(s);
    EXPECT_FALSE(ids.empty());
    EXPECT_EQ(tok.decode(ids), s) << show(s);
  }
  std::mt19937 rng(3);
  for (int trial = 0; trial < 200; ++trial) {
    std::string s(1 + rng() % 300, '\0');
    for (char& c : s) c = char(rng() % 256);
    ASSERT_EQ(tok.decode(tok.encode(s)), s);
  }
}

TEST(TokenizerBytes, NulBytesRoundTrip) {
  const Tokenizer& tok = deepseek();
  const std::string s("a\0b\0\0 c\0<\xef\xbd\x9cUser\xef\xbd\x9c>\0", 18);
  const auto ids = tok.encode(s);
  EXPECT_EQ(tok.decode(ids), s);
  EXPECT_EQ(tok.encode(std::string(1, '\0')), std::vector<int32_t>{191});
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 191), 4);
}

TEST(TokenizerBytes, TwentyMegabytesEncodeAndRoundTrip) {
  // Words, digits, CJK, a 2 MB run of one letter (one piece: the heap BPE), 1 MB of spaces,
  // 1 MB of newlines, and 1 MB of random bytes.
  std::string big;
  std::mt19937 rng(11);
  const char* words[] = {"the ", "quick ", "brown ", "fox ", "12345 ", "日本語の", "テキスト ", "code();\n", "\t", "über "};
  while (big.size() < 14u << 20) big += words[rng() % std::size(words)];
  big += std::string(2u << 20, 'a');
  big += std::string(1u << 20, ' ');
  big += std::string(1u << 20, '\n');
  for (int i = 0; i < (1 << 20); ++i) big += char(rng() % 256);
  ASSERT_GE(big.size(), 19u << 20);
  const auto ids = deepseek().encode(big);
  EXPECT_GT(ids.size(), big.size() / 40);
  EXPECT_TRUE(deepseek().decode(ids) == big);
}

TEST(TokenizerBytes, ChunksCutAtSafePointsEncodeLikeTheWhole) {
  // The corpus reader cuts documents after '\n' before a printable ASCII character; the ids
  // of the chunks must be the ids of the whole text.
  const std::string& text = test::corpus_text();
  const std::string part = text.substr(0, 600000) + "\n\n  indented\n\t\ttabs\n123 456\n<｜User｜>x\n" + text.substr(600000, 200000);
  const Tokenizer& tok = deepseek();
  const auto whole = tok.encode(part);
  std::vector<int32_t> chunked;
  EncodeState state;
  size_t pos = 0;
  int n_chunks = 0;
  while (pos < part.size()) {
    size_t cut = safe_cut(std::string_view(part).substr(pos), 7000);
    if (cut == 0) cut = part.size() - pos;
    tok.encode(std::string_view(part).substr(pos, cut), {}, state, chunked);
    pos += cut;
    ++n_chunks;
  }
  EXPECT_GT(n_chunks, 100);
  EXPECT_EQ(chunked, whole);
}

TEST(TokenizerSpecial, SplitSpecialLeavesSpecialTokensAsText) {
  const Tokenizer& tok = deepseek();
  const std::string s = "<｜begin▁of▁sentence｜>hi<｜User｜>x<｜end▁of▁sentence｜>";
  const auto normal = tok.encode(s);
  EXPECT_EQ(normal.front(), 0);
  EXPECT_EQ(normal.back(), 1);
  const auto split = tok.encode(s, EncodeOptions{.split_special = true});
  EXPECT_EQ(std::count(split.begin(), split.end(), 0), 0);
  EXPECT_EQ(std::count(split.begin(), split.end(), 1), 0);
  EXPECT_EQ(std::count(split.begin(), split.end(), 128803), 1);  // not special: still one token
  EXPECT_EQ(tok.decode(split), s);
  EXPECT_THAT(test::error_of([&] { tok.decode(std::vector<int32_t>{5, 128815}); }), HasSubstr("token id 128815 is outside the vocabulary"));
  EXPECT_THAT(test::error_of([&] { tok.decode(std::vector<int32_t>{-1}); }), HasSubstr("token id -1 is outside"));
}

TEST(TokenizerSpecial, OneStatePerThread) {
  const Tokenizer& tok = deepseek();
  const std::string text = test::corpus_text().substr(0, 300000);
  const auto want = tok.encode(text);
  std::vector<std::vector<int32_t>> got(2);
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t)
    threads.emplace_back([&, t] {
      EncodeState state;
      tok.encode(text, {}, state, got[size_t(t)]);
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(got[0], want);
  EXPECT_EQ(got[1], want);
}

// ---- malformed tokenizer.json ----

std::string load_error(const nlohmann::ordered_json& j) {
  return test::error_of([&] { Tokenizer::from_json(j.dump(), "tok.json"); });
}

TEST(TokenizerMalformed, TinyTokenizerLoadsAndMerges) {
  const Tokenizer tok = Tokenizer::from_json(test::tiny_tokenizer_json().dump(), "tiny");
  EXPECT_EQ(tok.encode("abc ab<s>x"), (std::vector<int32_t>{259, 2 + ' ', 258, 0, 2 + 'x'}));
  EXPECT_EQ(tok.decode(tok.encode("abc ab<s>x")), "abc ab<s>x");
  EXPECT_EQ(tok.decode(std::vector<int32_t>{0, 259, 1}, true), "abc");
}

TEST(TokenizerMalformed, EachProblemIsNamed) {
  using J = nlohmann::ordered_json;
  EXPECT_THAT(test::error_of([] { Tokenizer::from_json("{\"model\": ", "tok.json"); }), HasSubstr("tok.json: not valid JSON"));
  EXPECT_THAT(test::error_of([] { Tokenizer::from_json("[1, 2]", "tok.json"); }), HasSubstr("tok.json: not a JSON object"));
  EXPECT_THAT(test::error_of([] { Tokenizer("/nonexistent/tokenizer.json"); }), HasSubstr("/nonexistent/tokenizer.json: cannot open"));
  auto edit = [](const std::function<void(J&)>& f) {
    J j = test::tiny_tokenizer_json();
    f(j);
    return load_error(j);
  };
  EXPECT_THAT(edit([](J& j) { j.erase("model"); }), HasSubstr("tok.json: model is missing"));
  EXPECT_THAT(edit([](J& j) { j["model"]["type"] = "WordPiece"; }), HasSubstr("model.type \"WordPiece\" is not supported (only BPE)"));
  EXPECT_THAT(edit([](J& j) { j["model"]["type"] = "Unigram"; }), HasSubstr("not supported"));
  EXPECT_THAT(edit([](J& j) { j["model"].erase("vocab"); }), HasSubstr("model.vocab is missing"));
  EXPECT_THAT(edit([](J& j) { j["model"]["vocab"]["zz"] = -3; }), HasSubstr("model.vocab[\"zz\"] is not an id"));
  EXPECT_THAT(edit([](J& j) { j["model"]["vocab"]["zz"] = 258; }), HasSubstr("id 258 is given to both"));
  EXPECT_THAT(edit([](J& j) { j["model"]["merges"].push_back("x q"); }), HasSubstr("model.merges[2]: the merged token \"xq\" is not in the vocabulary"));
  EXPECT_THAT(edit([](J& j) { j["model"]["merges"].push_back("ab zzz"); }), HasSubstr("model.merges[2] refers to \"zzz\", which is not in the vocabulary"));
  EXPECT_THAT(edit([](J& j) { j["model"]["merges"].push_back("abc"); }), HasSubstr("model.merges[2] \"abc\" is not two tokens"));
  EXPECT_THAT(edit([](J& j) { j["model"]["merges"].push_back(7); }), HasSubstr("model.merges[2] is neither"));
  EXPECT_THAT(edit([](J& j) { j["model"]["vocab"].erase(byte_level::utf8_of('a')); }), HasSubstr("has no token for byte 0x61"));
  EXPECT_THAT(edit([](J& j) { j["model"]["byte_fallback"] = true; }), HasSubstr("byte_fallback true is not supported"));
  EXPECT_THAT(edit([](J& j) { j["model"]["continuing_subword_prefix"] = "##"; }), HasSubstr("continuing_subword_prefix \"##\" is not supported"));
  EXPECT_THAT(edit([](J& j) { j["added_tokens"] = "x"; }), HasSubstr("added_tokens is not an array"));
  EXPECT_THAT(edit([](J& j) { j["added_tokens"][0].erase("id"); }), HasSubstr("added_tokens[0].id is missing"));
  EXPECT_THAT(edit([](J& j) { j["added_tokens"][1]["content"] = 5; }), HasSubstr("added_tokens[1].content is not a string"));
  EXPECT_THAT(edit([](J& j) { j["added_tokens"][1]["content"] = ""; }), HasSubstr("added_tokens[1].content is empty"));
  EXPECT_THAT(edit([](J& j) { j["added_tokens"][1]["id"] = 258; }), HasSubstr("id 258 of \"</s>\" is already the token \"ab\""));
  EXPECT_THAT(edit([](J& j) { j["added_tokens"][1]["lstrip"] = true; }), HasSubstr("\"</s>\" with lstrip true is not supported"));
  EXPECT_THAT(edit([](J& j) { j["added_tokens"][0]["special"] = "yes"; }), HasSubstr("added_tokens[0].special is not true or false"));
  EXPECT_THAT(edit([](J& j) { j["normalizer"] = {{"type", "NFC"}}; }), HasSubstr("normalizer type 'NFC'"));
  EXPECT_THAT(edit([](J& j) { j["decoder"] = {{"type", "WordPiece"}}; }), HasSubstr("decoder type 'WordPiece'"));
  EXPECT_THAT(edit([](J& j) { j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Removed"; }), HasSubstr("Split behavior 'Removed' (only Isolated)"));
  EXPECT_THAT(edit([](J& j) { j["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {{"Regex", "(unclosed"}}; }),
              HasSubstr("pre_tokenizer.pretokenizers[0]: regex '(unclosed'"));
  EXPECT_THAT(edit([](J& j) { j["pre_tokenizer"] = {{"type", "Whitespace"}}; }), HasSubstr("pre-tokenizer type 'Whitespace'"));
  EXPECT_THAT(edit([](J& j) { j["pre_tokenizer"] = nullptr; }), HasSubstr("a tokenizer without a ByteLevel pre-tokenizer"));
  EXPECT_THAT(edit([](J& j) { j["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = true; }), HasSubstr("add_prefix_space true is not supported"));
}

}  // namespace
}  // namespace dsv3
