// Verifiable rewards and arithmetic tasks (see rewards.h).
#include "eval/rewards.h"

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

namespace {

// An exact rational p / q (q > 0), small enough for countdown's numbers; nullopt on overflow
// or division by zero.
struct Rational {
  int64_t p = 0, q = 1;
};
std::optional<Rational> make(__int128 p, __int128 q) {
  if (q == 0) return std::nullopt;
  if (q < 0) p = -p, q = -q;
  __int128 a = p < 0 ? -p : p, b = q;
  while (b) a %= b, std::swap(a, b);
  if (a > 1) p /= a, q /= a;
  if (p > INT64_MAX || p < -INT64_MAX || q > INT64_MAX) return std::nullopt;
  return Rational{int64_t(p), int64_t(q)};
}

// Recursive descent over + - * / and parentheses; the integers it reads go to `used`.
struct Parser {
  const std::string& s;
  size_t i = 0;
  std::vector<int64_t> used;
  bool ok = true;
  void space() {
    while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
  }
  std::optional<Rational> expr() {
    auto a = term();
    for (space(); a && i < s.size() && (s[i] == '+' || s[i] == '-'); space()) {
      const char op = s[i++];
      const auto b = term();
      if (!b) return std::nullopt;
      a = make(__int128(a->p) * b->q + (op == '+' ? 1 : -1) * __int128(b->p) * a->q, __int128(a->q) * b->q);
    }
    return a;
  }
  std::optional<Rational> term() {
    auto a = factor();
    for (space(); a && i < s.size() && (s[i] == '*' || s[i] == '/' || s[i] == 'x' || s[i] == '\xc3'); space()) {
      char op = s[i++];
      if (op == '\xc3') {  // U+00D7 (x) or U+00F7 (/) in UTF-8
        if (i >= s.size() || (s[i] != '\x97' && s[i] != '\xb7')) return std::nullopt;
        op = s[i++] == '\x97' ? '*' : '/';
      }
      const auto b = factor();
      if (!b) return std::nullopt;
      a = op == '/' ? make(__int128(a->p) * b->q, __int128(a->q) * b->p) : make(__int128(a->p) * b->p, __int128(a->q) * b->q);
    }
    return a;
  }
  std::optional<Rational> factor() {
    space();
    if (i < s.size() && s[i] == '(') {
      ++i;
      const auto a = expr();
      space();
      if (!a || i >= s.size() || s[i] != ')') return std::nullopt;
      ++i;
      return a;
    }
    size_t j = i;
    while (j < s.size() && std::isdigit(static_cast<unsigned char>(s[j]))) ++j;
    if (j == i || j - i > 12) return std::nullopt;
    const int64_t v = std::stoll(s.substr(i, j - i));
    i = j;
    used.push_back(v);
    return Rational{v, 1};
  }
};

}  // namespace

double countdown_reward(const std::string& text, const std::string& reference) {
  // reference: "TARGET: N1 N2 ..."
  const size_t colon = reference.find(':');
  if (colon == std::string::npos) fail("countdown: the reference '", reference, "' is not \"TARGET: N1 N2 ...\"");
  const int64_t target = std::stoll(reference.substr(0, colon));
  std::multiset<int64_t> numbers;
  for (size_t i = colon + 1; i < reference.size();) {
    while (i < reference.size() && reference[i] == ' ') ++i;
    size_t j = i;
    while (j < reference.size() && std::isdigit(static_cast<unsigned char>(reference[j]))) ++j;
    if (j > i) numbers.insert(std::stoll(reference.substr(i, j - i)));
    i = j > i ? j : j + 1;
  }
  const auto answer = extract_answer(text);
  if (!answer) return 0;
  std::string expression = *answer;
  if (const size_t eq = expression.find('='); eq != std::string::npos) expression.resize(eq);  // "a + b = T"
  Parser p{expression, 0, {}, true};
  const auto value = p.expr();
  p.space();
  if (!value || p.i != expression.size() || value->q != 1 || value->p != target) return 0;
  for (int64_t v : p.used) {  // each given number at most once
    const auto it = numbers.find(v);
    if (it == numbers.end()) return 0;
    numbers.erase(it);
  }
  return 1;
}

void check_reward_name(const std::string& name) {
  if (name != "exact" && name != "format" && name != "countdown") fail("unknown reward '", name, "' (exact, format, countdown)");
}

double reward(const std::string& name, const std::string& text, const std::string& reference) {
  check_reward_name(name);
  if (name == "exact") return exact_match_reward(text, reference);
  if (name == "format") return format_reward(text);
  return countdown_reward(text, reference);
}

namespace {

// "7+5=12, 4+8+1=13, 3+2+1=6. " for 347 + 285: each column from the units, with its carry.
std::string addition_steps(int64_t a, int64_t b) {
  std::string steps;
  int64_t carry = 0;
  while (a > 0 || b > 0) {
    const int64_t x = a % 10, y = b % 10, s = x + y + carry;
    steps += (steps.empty() ? "" : ", ") + std::to_string(x) + "+" + std::to_string(y) + (carry ? "+1" : "") + "=" + std::to_string(s);
    carry = s / 10, a /= 10, b /= 10;
  }
  return steps.empty() ? "" : steps + ". ";
}

}  // namespace

std::vector<ArithmeticTask> arithmetic_tasks(const std::string& op, int digits, int64_t count, uint64_t seed,
                                             const std::string& split) {
  if (op != "add" && op != "mul" && op != "countdown") fail("arithmetic tasks: unknown operation '", op, "' (add, mul, countdown)");
  if (digits < 1 || digits > 9) fail("arithmetic tasks: digits must be in 1..9, not ", digits);
  if (split != "train" && split != "heldout") fail("arithmetic tasks: split must be train or heldout, not '", split, "'");
  if (count < 0) fail("arithmetic tasks: count must be >= 0");
  const int64_t lo = digits == 1 ? 0 : int64_t(std::pow(10, digits - 1)), hi = int64_t(std::pow(10, digits)) - 1;
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> draw(lo, hi);
  // A pair's split by a hash of the pair alone, in either order (a + b and b + a have one
  // answer): about 1 in 10 pairs is held out, whatever the seed.
  auto heldout = [](int64_t a, int64_t b) {
    if (a > b) std::swap(a, b);
    uint64_t h = uint64_t(a) * 0x9e3779b97f4a7c15ULL ^ (uint64_t(b) + 0x632be59bd9b4e019ULL);
    h ^= h >> 31, h *= 0xbf58476d1ce4e5b9ULL, h ^= h >> 29;
    return h % 10 == 0;
  };
  std::vector<ArithmeticTask> out;
  if (op == "countdown") {
    // Four numbers; the target is what a random expression over some of them gives (a
    // positive integer, each division exact), so every puzzle has a solution.
    std::uniform_int_distribution<int> pick(0, 3), ops(0, 3);
    std::set<std::vector<int64_t>> puzzles;
    for (int64_t tries = 0; int64_t(out.size()) < count; ++tries) {
      if (tries > 1000 * count + 1000) fail("arithmetic tasks: cannot draw ", count, " distinct ", split, " countdown puzzles");
      std::vector<int64_t> n(4);
      for (int64_t& v : n) v = std::max<int64_t>(1, draw(rng));
      std::vector<int64_t> sorted = n;  // the split by the numbers, in any order
      std::sort(sorted.begin(), sorted.end());
      const uint64_t key = uint64_t(sorted[0]) * 1000003ULL ^ uint64_t(sorted[1]) * 999983ULL ^ uint64_t(sorted[2]) * 1009ULL ^
                           uint64_t(sorted[3]);
      if ((key * 0x9e3779b97f4a7c15ULL >> 60) % 10 == 0) { if (split != "heldout") continue; } else if (split == "heldout") continue;
      int64_t value = n[0];
      std::string expr = std::to_string(n[0]);  // the expression that gives value: a solution
      for (int k = 1; k < 4; ++k) {
        const int64_t x = n[size_t(k)];
        char op = '+';
        switch (ops(rng)) {
          case 0: break;
          case 1: if (value > x) op = '-'; break;
          case 2: if (value * x < 100000) op = '*'; break;
          default: if (value % x == 0) op = '/'; break;
        }
        value = op == '+' ? value + x : op == '-' ? value - x : op == '*' ? value * x : value / x;
        expr = (k == 1 ? expr : "(" + expr + ")") + op + std::to_string(x);
      }
      if (!puzzles.insert(n).second) continue;
      std::shuffle(n.begin(), n.end(), rng);
      std::string list, ref = std::to_string(value) + ":";
      for (int64_t v : n) list += (list.empty() ? "" : ", ") + std::to_string(v), ref += " " + std::to_string(v);
      out.push_back({"Using the numbers " + list + ", each at most once, with + - * / and parentheses, make " + std::to_string(value) + ".",
                     ref, "#### " + expr, expr + " = " + std::to_string(value)});
    }
    return out;
  }
  std::set<std::pair<int64_t, int64_t>> seen;
  const int64_t pairs = (hi - lo + 1) * (hi - lo + 1);
  for (int64_t tries = 0; int64_t(out.size()) < count; ++tries) {
    if (tries > 100 * count + 1000 || int64_t(seen.size()) >= pairs) fail("arithmetic tasks: cannot draw ", count, " distinct ", split, " tasks of ", digits, " digits");
    const int64_t a = draw(rng), b = draw(rng);
    if (heldout(a, b) != (split == "heldout") || !seen.insert({a, b}).second) continue;
    const char* sign = op == "add" ? "+" : "*";
    const std::string answer = std::to_string(op == "add" ? a + b : a * b);
    const std::string question = std::to_string(a) + " " + sign + " " + std::to_string(b);
    out.push_back({"What is " + question + "?", answer, (op == "add" ? addition_steps(a, b) : "") + "#### " + answer,
                   question + " = " + answer});
  }
  return out;
}

}  // namespace dsv3
