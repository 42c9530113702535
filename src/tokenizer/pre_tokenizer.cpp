// PCRE2 regexes with Oniguruma semantics, and the Split pre-tokenizer (see pre_tokenizer.h).
#define PCRE2_CODE_UNIT_WIDTH 8
#include "tokenizer/pre_tokenizer.h"

#include <pcre2.h>

#include "core/error.h"

namespace dsv3 {

namespace {

// Unicode White_Space, which is what Oniguruma's \s matches (U+180E left Zs in Unicode 6.3).
constexpr char kSpaceItems[] = R"(\x{09}-\x{0D}\x{20}\x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000})";
constexpr char kHexItems[] = "0-9A-Fa-f";
constexpr char kWordItems[] = R"(\p{L}\p{M}\p{Nd}\p{Pc})";

std::string pcre2_message(int code) {
  PCRE2_UCHAR buf[256];
  pcre2_get_error_message(code, buf, sizeof buf);
  return reinterpret_cast<const char*>(buf);
}

}  // namespace

std::string translate_regex(std::string_view p) {
  std::string out;
  out.reserve(p.size() + 64);
  bool in_class = false;
  for (size_t i = 0; i < p.size(); ++i) {
    const char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      const char e = p[i + 1];
      const char* items = e == 's' || e == 'S' ? kSpaceItems : e == 'h' || e == 'H' ? kHexItems : e == 'w' || e == 'W' ? kWordItems : nullptr;
      if (items) {
        const bool negated = e == 'S' || e == 'H' || e == 'W';
        if (in_class && negated)
          fail("regex '", p, "': \\", e, " inside a character class is not supported");
        out += in_class ? "" : negated ? "[^" : "[";
        out += items;
        out += in_class ? "" : "]";
      } else {
        out += c;
        out += e;
      }
      ++i;
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out += c;
      // A ']' right after '[' or '[^' is a literal.
      if (i + 1 < p.size() && p[i + 1] == '^') out += p[++i];
      if (i + 1 < p.size() && p[i + 1] == ']') out += p[++i];
      continue;
    }
    if (in_class && c == '[' && i + 1 < p.size() && p[i + 1] == ':') {  // POSIX [:alpha:]
      const size_t close = p.find(":]", i + 2);
      if (close != std::string_view::npos) {
        out.append(p.substr(i, close + 2 - i));
        i = close + 1;
        continue;
      }
    }
    if (in_class && c == '[') fail("regex '", p, "': nested character classes are not supported");
    if (in_class && c == ']') in_class = false;
    out += c;
  }
  return out;
}

RegexState::RegexState() {
  match_data_ = pcre2_match_data_create(1, nullptr);
  context_ = pcre2_match_context_create(nullptr);
  jit_stack_ = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr);
  if (!match_data_ || !context_ || !jit_stack_) fail("PCRE2: out of memory creating match state");
  pcre2_jit_stack_assign(static_cast<pcre2_match_context*>(context_), nullptr, jit_stack_);
}

RegexState::~RegexState() {
  pcre2_jit_stack_free(static_cast<pcre2_jit_stack*>(jit_stack_));
  pcre2_match_context_free(static_cast<pcre2_match_context*>(context_));
  pcre2_match_data_free(static_cast<pcre2_match_data*>(match_data_));
}

Regex::Regex(const std::string& oniguruma_pattern) : pattern_(oniguruma_pattern) {
  const std::string translated = translate_regex(oniguruma_pattern);
  int err = 0;
  PCRE2_SIZE at = 0;
  code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated.data()), translated.size(),
                        PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &err, &at, nullptr);
  if (!code_) fail("regex '", pattern_, "': ", pcre2_message(err), " at offset ", at, " (as PCRE2: '", translated, "')");
  jit_ = pcre2_jit_compile(static_cast<pcre2_code*>(code_), PCRE2_JIT_COMPLETE) == 0;
}

Regex::~Regex() { pcre2_code_free(static_cast<pcre2_code*>(code_)); }

bool Regex::find(std::string_view s, size_t from, RegexState& state, size_t& begin, size_t& end) const {
  auto* code = static_cast<pcre2_code*>(code_);
  auto* md = static_cast<pcre2_match_data*>(state.match_data_);
  auto* ctx = static_cast<pcre2_match_context*>(state.context_);
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
  const int rc = jit_ ? pcre2_jit_match(code, subject, s.size(), from, 0, md, ctx)
                      : pcre2_match(code, subject, s.size(), from, 0, md, ctx);
  if (rc == PCRE2_ERROR_NOMATCH) return false;
  if (rc < 0) fail("regex '", pattern_, "': matching failed: ", pcre2_message(rc));
  const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
  begin = ov[0];
  end = ov[1];
  return true;
}

}  // namespace dsv3
