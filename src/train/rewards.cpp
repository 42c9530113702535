// Verifiable rewards and arithmetic tasks (see rewards.h).
#include "train/rewards.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <random>
#include <set>

#include "core/error.h"

namespace dsv3 {

namespace {

std::string trim(const std::string& s) {
  const size_t a = s.find_first_not_of(" \t\r\n"), b = s.find_last_not_of(" \t\r\n");
  return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}

}  // namespace

std::optional<std::string> extract_answer(const std::string& text) {
  // The later of the last "####" answer and the last \boxed{...}.
  std::optional<std::string> found;
  size_t found_at = 0;
  if (const size_t at = text.rfind("####"); at != std::string::npos) {
    const size_t end = text.find('\n', at);
    const std::string a = trim(text.substr(at + 4, end == std::string::npos ? std::string::npos : end - at - 4));
    if (!a.empty()) found = a, found_at = at;
  }
  if (const size_t at = text.rfind("\\boxed{"); at != std::string::npos && (!found || at > found_at)) {
    int depth = 1;
    size_t i = at + 7;
    for (; i < text.size() && depth > 0; ++i) depth += text[i] == '{' ? 1 : text[i] == '}' ? -1 : 0;
    if (depth == 0) {
      const std::string a = trim(text.substr(at + 7, i - 1 - (at + 7)));
      if (!a.empty()) found = a;
    }
  }
  return found;
}

std::string normalize_answer(const std::string& answer) {
  std::string s;
  for (char c : trim(answer))
    if (c != ',' && c != ' ' && c != '$') s += c;  // thousands separators, spaces, currency
  if (!s.empty() && s.front() == '+') s.erase(0, 1);
  while (!s.empty() && s.back() == '.') s.pop_back();
  // A number: its canonical decimal (integral values without a fraction).
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (!s.empty() && end == s.c_str() + s.size() && std::isfinite(v)) {
    char buf[64];
    if (v == std::floor(v) && std::fabs(v) < 1e18) std::snprintf(buf, sizeof buf, "%.0f", v);
    else std::snprintf(buf, sizeof buf, "%.15g", v);
    std::string out = buf;
    return out == "-0" ? "0" : out;
  }
  return s;
}

double exact_match_reward(const std::string& text, const std::string& reference) {
  const auto a = extract_answer(text);
  return a && normalize_answer(*a) == normalize_answer(reference) ? 1.0 : 0.0;
}

double format_reward(const std::string& text) { return extract_answer(text) ? 1.0 : 0.0; }

double reward(const std::string& name, const std::string& text, const std::string& reference) {
  if (name == "exact") return exact_match_reward(text, reference);
  if (name == "format") return format_reward(text);
  fail("unknown reward '", name, "' (exact, format)");
}

std::vector<ArithmeticTask> arithmetic_tasks(const std::string& op, int digits, int64_t count, uint64_t seed,
                                             const std::string& split) {
  if (op != "add" && op != "mul") fail("arithmetic tasks: unknown operation '", op, "' (add, mul)");
  if (digits < 1 || digits > 9) fail("arithmetic tasks: digits must be in 1..9, not ", digits);
  if (split != "train" && split != "heldout") fail("arithmetic tasks: split must be train or heldout, not '", split, "'");
  if (count < 0) fail("arithmetic tasks: count must be >= 0");
  const int64_t lo = digits == 1 ? 0 : int64_t(std::pow(10, digits - 1)), hi = int64_t(std::pow(10, digits)) - 1;
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> draw(lo, hi);
  // A pair's split by a hash of the pair alone: about 1 in 10 pairs is held out, whatever the seed.
  auto heldout = [](int64_t a, int64_t b) {
    uint64_t h = uint64_t(a) * 0x9e3779b97f4a7c15ULL ^ (uint64_t(b) + 0x632be59bd9b4e019ULL);
    h ^= h >> 31, h *= 0xbf58476d1ce4e5b9ULL, h ^= h >> 29;
    return h % 10 == 0;
  };
  std::vector<ArithmeticTask> out;
  std::set<std::pair<int64_t, int64_t>> seen;
  const int64_t pairs = (hi - lo + 1) * (hi - lo + 1);
  for (int64_t tries = 0; int64_t(out.size()) < count; ++tries) {
    if (tries > 100 * count + 1000 || int64_t(seen.size()) >= pairs) fail("arithmetic tasks: cannot draw ", count, " distinct ", split, " tasks of ", digits, " digits");
    const int64_t a = draw(rng), b = draw(rng);
    if (heldout(a, b) != (split == "heldout") || !seen.insert({a, b}).second) continue;
    const char* sign = op == "add" ? "+" : "*";
    out.push_back({"What is " + std::to_string(a) + " " + sign + " " + std::to_string(b) + "?",
                   std::to_string(op == "add" ? a + b : a * b)});
  }
  return out;
}

}  // namespace dsv3
