// The pre-tokenizer: a sequence of regex Split steps (behaviour Isolated: every match and
// every gap between matches becomes its own piece, and each step splits the pieces of the
// step before). Regexes are written for Oniguruma (what Hugging Face tokenizers runs) and
// are run by PCRE2 (UTF, Unicode properties, JIT) after translate_regex() has rewritten the
// classes whose meaning differs. Invalid UTF-8 never matches, so it ends up in gap pieces.
// Depends on core and PCRE2 only.
#pragma once
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace dsv3 {

// Per-caller match state (PCRE2 match data and JIT stack): one per thread.
class RegexState {
 public:
  RegexState();
  ~RegexState();
  RegexState(const RegexState&) = delete;
  RegexState& operator=(const RegexState&) = delete;

 private:
  friend class Regex;
  void* match_data_ = nullptr;  // pcre2_match_data_8*
  void* context_ = nullptr;     // pcre2_match_context_8*
  void* jit_stack_ = nullptr;   // pcre2_jit_stack_8*
};

// An Oniguruma-syntax regex compiled by PCRE2 (shared, immutable once built).
class Regex {
 public:
  explicit Regex(const std::string& oniguruma_pattern);  // throws Error naming the pattern
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Finds the first match in s at or after byte `from`; sets [begin, end) and returns true.
  bool find(std::string_view s, size_t from, RegexState& state, size_t& begin, size_t& end) const;
  const std::string& pattern() const { return pattern_; }

 private:
  std::string pattern_;
  void* code_ = nullptr;  // pcre2_code_8*
  bool jit_ = false;
};

// Rewrites an Oniguruma pattern so that PCRE2 (UTF + UCP) matches the same strings:
// \s / \S are Unicode White_Space as in Oniguruma (PCRE2 also counts U+180E MONGOLIAN VOWEL
// SEPARATOR as space, which changes how text around it splits); \h / \H are hex digits in
// Oniguruma (horizontal space in PCRE2); \w / \W are letters, marks, decimal digits and
// connector punctuation. A negated class escape inside [...] is rejected (PCRE2 cannot
// subtract it there) with an Error naming the pattern.
std::string translate_regex(std::string_view oniguruma_pattern);

class PreTokenizer {
 public:
  // The steps' patterns, applied in order.
  void add_split(const std::string& oniguruma_pattern) { steps_.push_back(std::make_unique<Regex>(oniguruma_pattern)); }
  size_t n_steps() const { return steps_.size(); }

  // Calls f(piece) for every final piece of text, in order; pieces are never empty and
  // together cover text exactly.
  template <typename F>
  void for_each_piece(std::string_view text, RegexState& state, F&& f) const {
    visit(0, text, state, f);
  }

 private:
  template <typename F>
  void visit(size_t level, std::string_view s, RegexState& state, F& f) const {
    if (s.empty()) return;
    if (level == steps_.size()) {
      f(s);
      return;
    }
    const Regex& re = *steps_[level];
    size_t gap = 0, from = 0, b = 0, e = 0;
    while (from < s.size() && re.find(s, from, state, b, e)) {
      if (e == b) {  // an empty match splits nothing: look again one byte on
        from = b + 1;
        continue;
      }
      if (b > gap) visit(level + 1, s.substr(gap, b - gap), state, f);
      visit(level + 1, s.substr(b, e - b), state, f);
      gap = from = e;
    }
    if (gap < s.size()) visit(level + 1, s.substr(gap), state, f);
  }

  std::vector<std::unique_ptr<Regex>> steps_;
};

}  // namespace dsv3
