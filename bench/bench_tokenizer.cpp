// Tokenizer encode throughput, single thread, in MB/s: DeepSeek-V3's tokenizer on English
// (the bundled KJV corpus) and on mixed CJK / code text built here, and a 4K-vocabulary
// tokenizer trained in the same run; with the machine's memcpy bandwidth measured in the
// same run as a reference. A benchmark, not a test: it prints figures.
//   bench_tokenizer [--repeat N]
#include <zlib.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "tokenizer/bpe_trainer.h"
#include "tokenizer/byte_level.h"
#include "tokenizer/tokenizer.h"

namespace {

using namespace dsv3;
using clock_type = std::chrono::steady_clock;

double seconds_since(clock_type::time_point t) { return std::chrono::duration<double>(clock_type::now() - t).count(); }

std::string read_gz(const std::string& path) {
  gzFile f = gzopen(path.c_str(), "rb");
  if (!f) fail(path, ": cannot open");
  std::string s;
  char buf[1 << 16];
  int n;
  while ((n = gzread(f, buf, sizeof buf)) > 0) s.append(buf, size_t(n));
  gzclose(f);
  return s;
}

// Mixed text: Chinese and Japanese sentences from random characters, Korean, and C++/Python
// code with random identifiers and numbers, so the BPE cache does not see one text over.
std::string mixed_text(size_t bytes) {
  std::mt19937 rng(42);
  auto pick = [&](size_t n) { return size_t(rng() % n); };
  std::string out;
  auto cp = [&](char32_t c) { byte_level::append_utf8(out, c); };
  const char* keywords[] = {"for", "if", "return", "const", "auto", "def", "class", "while", "int", "std::vector"};
  const char* puncts[] = {"(", ")", "{", "}", ";", " = ", " + ", "->", "::", ", ", "[", "]", " == ", "\n    "};
  while (out.size() < bytes) {
    switch (pick(4)) {
      case 0:  // Chinese: common ideographs with full-width punctuation
        for (size_t i = 0, n = 8 + pick(40); i < n; ++i) cp(0x4E00 + char32_t(pick(0x51A6) % 3500));
        cp(pick(2) ? 0x3002 : 0xFF0C);
        break;
      case 1:  // Japanese: kana runs and some kanji
        for (size_t i = 0, n = 6 + pick(30); i < n; ++i) cp(pick(3) ? 0x3041 + char32_t(pick(0x56)) : 0x4E00 + char32_t(pick(2000)));
        cp(0x3002);
        break;
      case 2:  // Korean
        for (size_t i = 0, n = 3 + pick(8); i < n; ++i) {
          for (size_t j = 0, m = 1 + pick(4); j < m; ++j) cp(0xAC00 + char32_t(pick(11172)));
          out += ' ';
        }
        break;
      default:  // code
        for (size_t i = 0, n = 4 + pick(20); i < n; ++i) {
          if (pick(3) == 0) out += keywords[pick(std::size(keywords))];
          else if (pick(2)) {
            for (size_t j = 0, m = 1 + pick(10); j < m; ++j) out += char((pick(4) ? 'a' : 'A') + pick(26));
            if (pick(3) == 0) out += '_' + std::to_string(pick(1000));
          } else {
            out += std::to_string(rng() % 100000);
          }
          out += puncts[pick(std::size(puncts))];
        }
        out += '\n';
    }
  }
  return out;
}

struct Result {
  double mb_per_s;
  size_t tokens;
};

// Best of `repeat` runs; each run starts with an empty BPE cache (a fresh EncodeState).
Result encode_speed(const Tokenizer& tok, const std::string& text, int repeat) {
  Result best{0, 0};
  for (int r = 0; r < repeat; ++r) {
    EncodeState state;
    std::vector<int32_t> ids;
    ids.reserve(text.size() / 2);
    const auto t = clock_type::now();
    tok.encode(text, {}, state, ids);
    const double s = seconds_since(t);
    best.mb_per_s = std::max(best.mb_per_s, double(text.size()) / 1e6 / s);
    best.tokens = ids.size();
    if (r == 0 && tok.decode(ids) != text) fail("round trip failed");
  }
  return best;
}

double memcpy_gb_per_s() {
  const size_t n = size_t(256) << 20;
  std::vector<char> a(n, 1), b(n, 2);
  double best = 0;
  for (int r = 0; r < 5; ++r) {
    const auto t = clock_type::now();
    std::memcpy(b.data(), a.data(), n);
    const double s = seconds_since(t);
    best = std::max(best, double(n) / 1e9 / s);
    a[size_t(r)] = b[size_t(r) + 1];  // keep the copies observable
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  int repeat = 3;
  for (int i = 1; i < argc; ++i)
    if (std::strcmp(argv[i], "--repeat") == 0 && i + 1 < argc) repeat = std::max(1, std::atoi(argv[++i]));
  try {
    const std::string root = DSV3_SOURCE_DIR;
    const double memcpy_bw = memcpy_gb_per_s();
    const std::string english = read_gz(root + "/data/kjv-verses.txt.gz");
    const std::string mixed = mixed_text(4u << 20);

    auto t = clock_type::now();
    const Tokenizer deepseek(root + "/tests/data/tokenizer");
    const double load_s = seconds_since(t);

    t = clock_type::now();
    BpeTrainer trainer(BpeTrainerOptions{.vocab_size = 4096});
    trainer.add_text(english);
    const Tokenizer small = Tokenizer::from_json(trainer.train(), "trained 4K");
    const double train_s = seconds_since(t);

    std::printf("bench_tokenizer: single thread, best of %d, cold BPE cache each run\n", repeat);
    std::printf("memcpy bandwidth (same run): %.1f GB/s\n", memcpy_bw);
    std::printf("DeepSeek-V3 tokenizer.json load: %.2f s; 4K BPE trained on %.1f MB in %.2f s\n", load_s, english.size() / 1e6, train_s);
    std::printf("%-34s %8s %10s %10s %9s\n", "encode", "MB", "MB/s", "tokens", "bytes/tok");
    auto row = [&](const char* name, const Tokenizer& tok, const std::string& text) {
      const Result r = encode_speed(tok, text, repeat);
      std::printf("%-34s %8.2f %10.1f %10zu %9.2f\n", name, text.size() / 1e6, r.mb_per_s, r.tokens, double(text.size()) / double(r.tokens));
    };
    row("DeepSeek-V3, English (KJV)", deepseek, english);
    row("DeepSeek-V3, mixed CJK/code", deepseek, mixed);
    row("trained 4K, English (KJV)", small, english);
    row("trained 4K, mixed CJK/code", small, mixed);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_tokenizer: %s\n", e.what());
    return 1;
  }
  return 0;
}
