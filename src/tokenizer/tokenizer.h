// A Hugging Face tokenizer.json with a byte-level BPE model (DeepSeek-V3's, or one written by
// the BPE trainer): added tokens are found in the raw text first (leftmost-longest, the
// non-normalized ones before the normalized ones, as the tokenizers library does), the rest
// is split by the pre-tokenizer's regexes, and each piece is BPE-merged over its bytes.
// Any byte string encodes (invalid UTF-8 and NUL included) and decodes back to the same
// bytes. Anything in tokenizer.json this code does not implement is an Error naming it,
// never a silently different encoding. Depends on core, PCRE2 and nlohmann_json.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tokenizer/bpe.h"
#include "tokenizer/pre_tokenizer.h"

namespace dsv3 {

struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool special = false;     // dropped by decode(skip_special); text with split_special
  bool normalized = false;  // matched in the second pass (see the file comment)
};

struct EncodeOptions {
  // Tokens marked special (BOS, EOS, ...) written in the text are encoded as plain text, as
  // transformers' split_special_tokens does; other added tokens are still recognised.
  bool split_special = false;
};

// Everything one encoding thread mutates: regex match state, BPE scratch and cache.
struct EncodeState {
  RegexState regex;
  BpeScratch scratch;
  BpeCache cache;
};

class Tokenizer {
 public:
  // `path`: a tokenizer.json file or a folder holding one.
  explicit Tokenizer(const std::string& path);
  // Parses tokenizer.json text; `what` (usually the path) starts every error message.
  static Tokenizer from_json(std::string_view json_text, const std::string& what);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Encodes text (no BOS/EOS added). This overload uses an internal EncodeState, so it must
  // not be called from two threads at once; give each thread its own EncodeState instead.
  std::vector<int32_t> encode(std::string_view text, const EncodeOptions& options = {}) const;
  // Appends the ids of text to out.
  void encode(std::string_view text, const EncodeOptions& options, EncodeState& state, std::vector<int32_t>& out) const;
  // Encodes text that holds no added tokens (the pre-tokenizer and BPE only).
  void encode_ordinary(std::string_view text, EncodeState& state, std::vector<int32_t>& out) const;

  // The bytes of ids; skip_special drops tokens marked special. Throws on an unknown id.
  // (Hugging Face returns the bytes through from_utf8_lossy; this returns them unchanged,
  // so that invalid UTF-8 round-trips.)
  std::string decode(std::span<const int32_t> ids, bool skip_special = false) const;
  // The bytes one id decodes to.
  std::string_view token_bytes(int32_t id) const;

  int32_t vocab_size() const;  // largest id + 1
  // The id of an added token or vocabulary entry, as written in tokenizer.json.
  std::optional<int32_t> token_id(std::string_view content) const;
  bool is_special(int32_t id) const;
  const std::vector<AddedToken>& added_tokens() const;
  const Bpe& bpe() const;

 private:
  struct Impl;
  Tokenizer();
  std::unique_ptr<Impl> impl_;
};

}  // namespace dsv3
