// Helpers shared by the tokenizer and data tests: the bundled DeepSeek-V3 tokenizer (loaded
// once), the golden cases, the bundled corpus, and a tiny hand-written tokenizer.json.
#pragma once
#include <zlib.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/error.h"
#include "tokenizer/byte_level.h"
#include "tokenizer/tokenizer.h"

namespace dsv3::test {

inline std::string tokenizer_dir() { return std::string(DSV3_TEST_DATA) + "/tokenizer"; }

// The DeepSeek-V3 tokenizer, loaded once for the whole test program.
inline const Tokenizer& deepseek() {
  static const Tokenizer t(tokenizer_dir());
  return t;
}

inline std::vector<nlohmann::ordered_json> golden_cases() {
  std::ifstream in(tokenizer_dir() + "/cases.jsonl");
  if (!in) fail(tokenizer_dir(), "/cases.jsonl: cannot open");
  std::vector<nlohmann::ordered_json> cases;
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) cases.push_back(nlohmann::ordered_json::parse(line));
  return cases;
}

// The bundled KJV corpus, decompressed (4.4 MB).
inline const std::string& corpus_text() {
  static const std::string text = [] {
    gzFile f = gzopen(DSV3_CORPUS, "rb");
    if (!f) fail(DSV3_CORPUS, ": cannot open");
    std::string s;
    char buf[1 << 16];
    int n;
    while ((n = gzread(f, buf, sizeof buf)) > 0) s.append(buf, size_t(n));
    gzclose(f);
    return s;
  }();
  return text;
}

// A minimal valid byte-level BPE tokenizer.json: 2 special tokens, 256 bytes, merges
// "a b" -> "ab" and "ab c" -> "abc"; the DeepSeek-V3 pre-tokenizer shape.
inline nlohmann::ordered_json tiny_tokenizer_json() {
  nlohmann::ordered_json vocab = nlohmann::ordered_json::object();
  vocab["<s>"] = 0;
  vocab["</s>"] = 1;
  for (int b = 0; b < 256; ++b) vocab[byte_level::utf8_of(uint8_t(b))] = 2 + b;
  vocab["ab"] = 258;
  vocab["abc"] = 259;
  nlohmann::ordered_json j;
  j["version"] = "1.0";
  j["added_tokens"] = {{{"id", 0}, {"content", "<s>"}, {"special", true}, {"normalized", false}},
                       {{"id", 1}, {"content", "</s>"}, {"special", true}, {"normalized", false}}};
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = {{"type", "Sequence"},
                        {"pretokenizers",
                         {{{"type", "Split"}, {"pattern", {{"Regex", "\\s+|\\S+"}}}, {"behavior", "Isolated"}, {"invert", false}},
                          {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
  j["decoder"] = {{"type", "ByteLevel"}};
  j["model"] = {{"type", "BPE"}, {"vocab", vocab}, {"merges", {"a b", "ab c"}}};
  return j;
}

}  // namespace dsv3::test
