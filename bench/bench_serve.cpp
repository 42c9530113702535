// Load generator for `dsv3 serve` (the server issue's benchmark): streamed completions from
// C concurrent clients at each of several concurrency levels, prompts of random token ids
// either all different or sharing a long prefix; per level the aggregate generated tokens
// per second (wall clock, prefill included), the decode throughput (streams / mean gap
// between tokens), time to first token and inter-token latency (p50, p99), and the ratios
// to concurrency 1. Then the context cache: time to first token of a prompt whose long prefix
// is cached against the same prompt cold, one request at a time. Tokens are counted from
// the streamed log-probabilities (one entry per token), and `ignore_eos` keeps every answer
// at its full length.
//   bench_serve --port P --model NAME --vocab V [--concurrency 1,4,16,32] [--requests 2]
//               [--prompt-tokens 128] [--max-tokens 32] [--prefix-tokens 1024] [--cache-rounds 5]
#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

using nlohmann::json;

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

struct Options {
  int port = 0, requests = 2, prompt_tokens = 128, max_tokens = 32, prefix_tokens = 1024, cache_rounds = 5;
  int vocab = 0;
  std::string model;
  std::vector<int> concurrency = {1, 4, 16, 32};
};

struct Result {
  double ttft = 0;
  std::vector<double> gaps;  // per token after the first: the time since the chunk before, shared by its tokens
  int tokens = 0;
  bool ok = false;
  std::string error;
};

// One streamed completion; the times of its chunks.
Result stream(const Options& o, const std::vector<int>& prompt) {
  httplib::Client c("127.0.0.1", o.port);
  c.set_read_timeout(600, 0);
  const json body = {{"model", o.model}, {"prompt", prompt}, {"max_tokens", o.max_tokens}, {"temperature", 0},
                     {"stream", true}, {"logprobs", 0}, {"ignore_eos", true}};
  Result r;
  const double start = now();
  double last = start;
  std::string buffer;
  httplib::Request req;
  req.method = "POST", req.path = "/v1/completions", req.body = body.dump();
  req.set_header("Content-Type", "application/json");
  req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
                      buffer.append(data, n);
                      for (size_t at; (at = buffer.find("\n\n")) != std::string::npos; buffer.erase(0, at + 2)) {
                        const std::string event = buffer.substr(0, at);
                        if (event.rfind("data: ", 0) != 0 || event == "data: [DONE]") continue;
                        const json chunk = json::parse(event.substr(6), nullptr, false);
                        if (chunk.contains("error")) {
                          r.error = chunk["error"].dump();
                          continue;
                        }
                        if (!chunk.contains("choices") || chunk["choices"].empty()) continue;
                        const json& lp = chunk["choices"][0]["logprobs"];
                        const int k = lp.is_object() ? int(lp["tokens"].size()) : 0;
                        if (k == 0) continue;
                        const double t = now();
                        if (r.tokens == 0) {
                          r.ttft = t - start;
                          for (int i = 1; i < k; ++i) r.gaps.push_back(0);
                        } else {
                          for (int i = 0; i < k; ++i) r.gaps.push_back((t - last) / k);
                        }
                        r.tokens += k, last = t;
                      }
                      return true;
                    };
  auto res = c.send(req);
  if (!res) r.error = "no answer: " + httplib::to_string(res.error());
  else if (res->status != 200) r.error = "status " + std::to_string(res->status);
  r.ok = r.error.empty() && r.tokens > 0;
  return r;
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, size_t(p * double(v.size() - 1) + 0.5))];
}

std::vector<int> random_ids(std::mt19937& rng, int n, int vocab) {
  std::uniform_int_distribution<int> d(2, vocab - 1);  // not BOS/EOS
  std::vector<int> ids(static_cast<size_t>(n));
  for (int& t : ids) t = d(rng);
  return ids;
}

struct Level {
  double tok_s = 0, decode_tok_s = 0, ttft50 = 0, ttft99 = 0, itl50 = 0, itl99 = 0;
};

Level run_level(const Options& o, int clients, bool shared, std::mt19937& rng) {
  const std::vector<int> prefix = random_ids(rng, o.prefix_tokens, o.vocab);
  std::vector<std::vector<int>> prompts;
  for (int i = 0; i < clients * o.requests; ++i) {
    std::vector<int> p = shared ? prefix : std::vector<int>{};
    const auto tail = random_ids(rng, shared ? o.prompt_tokens : o.prompt_tokens, o.vocab);
    p.insert(p.end(), tail.begin(), tail.end());
    prompts.push_back(p);
  }
  if (shared) stream(o, prompts[0]);  // the prefix cached once first (a warm-up not timed)
  std::vector<Result> results(prompts.size());
  std::vector<std::thread> threads;
  const double start = now();
  for (int c = 0; c < clients; ++c)
    threads.emplace_back([&, c] {
      for (int k = 0; k < o.requests; ++k) results[size_t(c * o.requests + k)] = stream(o, prompts[size_t(c * o.requests + k)]);
    });
  for (auto& t : threads) t.join();
  const double seconds = now() - start;
  Level l;
  std::vector<double> ttft, gaps;
  int tokens = 0;
  for (const Result& r : results) {
    if (!r.ok) std::fprintf(stderr, "bench_serve: a request failed: %s\n", r.error.c_str());
    tokens += r.tokens, ttft.push_back(r.ttft);
    gaps.insert(gaps.end(), r.gaps.begin(), r.gaps.end());
  }
  l.tok_s = tokens / seconds;
  l.ttft50 = percentile(ttft, 0.5), l.ttft99 = percentile(ttft, 0.99);
  l.itl50 = percentile(gaps, 0.5), l.itl99 = percentile(gaps, 0.99);
  // Decode throughput: `clients` streams decoding side by side, each a token per mean gap.
  double mean_gap = 0;
  for (double g : gaps) mean_gap += g;
  mean_gap /= double(std::max<size_t>(1, gaps.size()));
  l.decode_tok_s = mean_gap > 0 ? clients / mean_gap : 0;
  return l;
}

std::vector<int> parse_list(const std::string& s) {
  std::vector<int> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');) out.push_back(std::stoi(item));
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--port") o.port = std::stoi(v);
    else if (a == "--model") o.model = v;
    else if (a == "--vocab") o.vocab = std::stoi(v);
    else if (a == "--concurrency") o.concurrency = parse_list(v);
    else if (a == "--requests") o.requests = std::stoi(v);
    else if (a == "--prompt-tokens") o.prompt_tokens = std::stoi(v);
    else if (a == "--max-tokens") o.max_tokens = std::stoi(v);
    else if (a == "--prefix-tokens") o.prefix_tokens = std::stoi(v);
    else if (a == "--cache-rounds") o.cache_rounds = std::stoi(v);
    else return std::fprintf(stderr, "bench_serve: unknown flag %s\n", a.c_str()), 1;
  }
  if (o.port <= 0 || o.model.empty() || o.vocab < 3 || o.concurrency.empty() || o.concurrency[0] != 1) {
    std::fprintf(stderr, "usage: bench_serve --port P --model NAME --vocab V [--concurrency 1,4,16,32] [--requests 2] "
                         "[--prompt-tokens 128] [--max-tokens 32] [--prefix-tokens 1024] [--cache-rounds 5]\n");
    return 1;
  }
  std::mt19937 rng(12345);
  stream(o, random_ids(rng, 8, o.vocab));  // warm-up: the first request pays for page faults
  for (bool shared : {false, true}) {
    std::printf("\nprompts %s: %d tokens%s, %d generated each, %d requests per client\n",
                shared ? "sharing a prefix" : "all different", o.prompt_tokens, shared ? (" after a shared " + std::to_string(o.prefix_tokens) + "-token prefix").c_str() : "",
                o.max_tokens, o.requests);
    std::printf("%11s %10s %8s %12s %8s %10s %10s %10s %10s\n", "concurrency", "tok/s", "vs c=1", "decode tok/s", "vs c=1",
                "TTFT p50", "TTFT p99", "ITL p50", "ITL p99");
    double base = 0, decode_base = 0;
    for (int c : o.concurrency) {
      const Level l = run_level(o, c, shared, rng);
      if (c == 1) base = l.tok_s, decode_base = l.decode_tok_s;
      std::printf("%11d %10.1f %7.2fx %12.1f %7.2fx %9.3fs %9.3fs %8.1fms %8.1fms\n", c, l.tok_s, l.tok_s / base, l.decode_tok_s,
                  l.decode_tok_s / decode_base, l.ttft50, l.ttft99, l.itl50 * 1e3, l.itl99 * 1e3);
      std::fflush(stdout);
      if (c == 16)
        std::printf("%11s concurrency 16 vs 1: %.2fx generated tok/s, %.2fx decode tok/s (target >= 6x)\n", "", l.tok_s / base,
                    l.decode_tok_s / decode_base);
    }
  }
  // The context cache: a prompt of a cached prefix and a new end, against an all-new one.
  std::vector<double> cold, warm;
  const std::vector<int> prefix = random_ids(rng, o.prefix_tokens, o.vocab);
  std::vector<int> seed = prefix;
  seed.push_back(7);
  o.max_tokens = 1;
  stream(o, seed);  // caches the prefix
  for (int r = 0; r < o.cache_rounds; ++r) {
    std::vector<int> p = random_ids(rng, o.prefix_tokens, o.vocab);
    const auto tail = random_ids(rng, 16, o.vocab);
    p.insert(p.end(), tail.begin(), tail.end());
    cold.push_back(stream(o, p).ttft);
    std::vector<int> q = prefix;
    q.insert(q.end(), tail.begin(), tail.end());
    warm.push_back(stream(o, q).ttft);
  }
  const double c50 = percentile(cold, 0.5), w50 = percentile(warm, 0.5);
  std::printf("\ncontext cache, a %d-token prefix + 16 new tokens, %d rounds: TTFT cold %.3fs, cached %.3fs: %.1fx shorter "
              "(target >= 10x)\n", o.prefix_tokens, o.cache_rounds, c50, w50, c50 / w50);
  return 0;
}
