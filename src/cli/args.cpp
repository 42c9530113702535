// Subcommand helpers (see args.h).
#include "cli/args.h"

#include <cctype>
#include <climits>
#include <cstdio>
#include <cstdlib>

#include "backend/ops.h"
#include "core/error.h"

namespace dsv3::cli {

std::vector<int32_t> parse_ids(const std::string& text, const std::string& flag) {
  std::vector<int32_t> ids;
  size_t i = 0;
  auto is_sep = [](char ch) { return std::isspace(static_cast<unsigned char>(ch)) || ch == ',' || ch == '[' || ch == ']'; };
  while (i < text.size()) {
    if (is_sep(text[i])) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < text.size() && !is_sep(text[j])) ++j;
    const std::string tok = text.substr(i, j - i);
    char* end = nullptr;
    errno = 0;
    const long long v = std::strtoll(tok.c_str(), &end, 10);
    if (end != tok.c_str() + tok.size() || errno || v < 0 || v > INT32_MAX)
      fail(flag, ": '", tok, "' is not a token id (a non-negative integer)");
    ids.push_back(int32_t(v));
    i = j;
  }
  if (ids.empty()) fail(flag, ": no token ids given");
  return ids;
}

std::string ids_json(const std::vector<int32_t>& ids) {
  std::string s = "[";
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? ", " : "") + std::to_string(ids[i]);
  return s + "]";
}

void set_threads(int threads) {
  if (threads < 0) fail("--threads must be >= 0");
  if (threads > 0) set_num_threads(threads);
}

std::string format_duration(double seconds) {
  char buf[32];
  const long t = long(seconds);
  if (t >= 3600) std::snprintf(buf, sizeof(buf), "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
  else std::snprintf(buf, sizeof(buf), "%02ld:%02ld", t / 60, t % 60);
  return buf;
}

}  // namespace dsv3::cli
