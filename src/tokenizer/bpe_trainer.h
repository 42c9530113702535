// The byte-level BPE trainer: counts the pre-tokenizer's pieces of a corpus (streamed), then
// repeatedly merges the most frequent adjacent pair (ties: the smaller pair of ids) until
// the vocabulary has the chosen size. Writes a tokenizer.json that Tokenizer loads (ids:
// the special tokens first, then the 256 bytes in byte order, then one per merge) and a
// tokenizer_config.json with BOS/EOS and a simple chat template. Depends on core.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "tokenizer/pre_tokenizer.h"

namespace dsv3 {

// DeepSeek-V3's three pre-tokenizer regexes (digits in threes, CJK runs, then the main one).
const std::vector<std::string>& deepseek_v3_split_patterns();

// DeepSeek-V3's spelling of the specials: BOS, EOS, pad, then the User and Assistant markers
// used by the chat template.
const std::vector<std::string>& default_special_tokens();

struct BpeTrainerOptions {
  int32_t vocab_size = 4096;                  // specials + 256 bytes + merges
  std::vector<std::string> special_tokens = default_special_tokens();  // [0] BOS, [1] EOS
  uint64_t min_frequency = 2;                 // stop before merging a rarer pair
  std::vector<std::string> split_patterns = deepseek_v3_split_patterns();
};

class BpeTrainer {
 public:
  explicit BpeTrainer(BpeTrainerOptions options);  // throws Error on impossible options

  // Counts the pieces of text (call once per chunk; chunks must be cut at safe points).
  void add_text(std::string_view text);
  uint64_t n_pieces() const { return n_pieces_; }
  size_t n_unique_pieces() const { return counts_.size(); }

  // Learns the merges; returns tokenizer.json as text. Fewer merges than asked are learnt
  // when no pair is frequent enough (the vocabulary is then smaller than vocab_size).
  std::string train();

  // The learnt merges as (left, right) vocabulary strings, in rank order (after train()).
  const std::vector<std::pair<std::string, std::string>>& merges() const { return merges_; }

 private:
  BpeTrainerOptions options_;
  PreTokenizer pre_;
  RegexState regex_;
  std::unordered_map<std::string, uint64_t> counts_;  // piece bytes -> occurrences
  uint64_t n_pieces_ = 0;
  std::vector<std::pair<std::string, std::string>> merges_;
};

// Writes dir/tokenizer.json and dir/tokenizer_config.json (BOS = special_tokens[0], EOS =
// special_tokens[1], pad = [2] if given; a chat template in DeepSeek-V3's style that uses
// the User/Assistant markers if they are among the specials). Creates dir if needed.
void write_trained_tokenizer(const std::string& dir, const std::string& tokenizer_json,
                             const std::vector<std::string>& special_tokens);

}  // namespace dsv3
