// Prometheus metrics (see metrics.h).
#include "serve/metrics.h"

#include <algorithm>
#include <cstdio>

namespace dsv3::serve {

namespace {

std::string number(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6g", x);
  return buf;
}

}  // namespace

Histogram::Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::observe(double x) {
  const size_t i = size_t(std::lower_bound(bounds_.begin(), bounds_.end(), x) - bounds_.begin());
  ++counts_[i], sum_ += x, ++n_;
}

void Histogram::render(std::string& out, const std::string& name, const std::string& help) const {
  out += "# HELP " + name + " " + help + "\n# TYPE " + name + " histogram\n";
  int64_t cumulative = 0;
  for (size_t i = 0; i <= bounds_.size(); ++i) {
    cumulative += counts_[i];
    const std::string le = i < bounds_.size() ? number(bounds_[i]) : "+Inf";
    out += name + "_bucket{le=\"" + le + "\"} " + std::to_string(cumulative) + "\n";
  }
  out += name + "_sum " + number(sum_) + "\n" + name + "_count " + std::to_string(n_) + "\n";
}

Metrics::Metrics()
    : ttft_({0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}),
      itl_({0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}) {}

void Metrics::request(const std::string& route, int status) {
  std::lock_guard lock(mutex_);
  ++requests_[{route, status}];
}

void Metrics::tokens(int64_t prompt, int64_t cache_hit, int64_t generated) {
  std::lock_guard lock(mutex_);
  prompt_ += prompt, hit_ += cache_hit, generated_ += generated;
}

void Metrics::first_token(double seconds) {
  std::lock_guard lock(mutex_);
  ttft_.observe(seconds);
}

void Metrics::between_tokens(double seconds) {
  std::lock_guard lock(mutex_);
  itl_.observe(seconds);
}

std::string Metrics::render(const Gauges& g) const {
  std::lock_guard lock(mutex_);
  std::string out;
  auto counter = [&](const char* name, const char* help, int64_t v) {
    out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " counter\n" + name + " " + std::to_string(v) + "\n";
  };
  auto gauge = [&](const char* name, const char* help, int64_t v) {
    out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " gauge\n" + name + " " + std::to_string(v) + "\n";
  };
  out += "# HELP dsv3_requests_total HTTP requests answered, by route and status.\n# TYPE dsv3_requests_total counter\n";
  for (const auto& [key, n] : requests_)
    out += "dsv3_requests_total{route=\"" + key.first + "\",status=\"" + std::to_string(key.second) + "\"} " + std::to_string(n) + "\n";
  counter("dsv3_prompt_tokens_total", "Prompt tokens of admitted requests.", prompt_);
  counter("dsv3_prompt_cache_hit_tokens_total", "Prompt tokens served from the context cache.", hit_);
  counter("dsv3_generation_tokens_total", "Tokens generated.", generated_);
  gauge("dsv3_ready", "1 once the model is loaded.", g.ready);
  gauge("dsv3_queue_depth", "Requests waiting for a place in the batch.", g.queued);
  gauge("dsv3_running_sequences", "Sequences in the running batch.", g.running);
  gauge("dsv3_kv_cache_pages_total", "Pages of 64 positions in the KV cache pool.", g.total_pages);
  gauge("dsv3_kv_cache_pages_free", "Pages no sequence and no cached prefix holds.", g.free_pages);
  gauge("dsv3_prefix_cache_pages", "Pages the context cache holds (freed on demand).", g.cached_pages);
  ttft_.render(out, "dsv3_time_to_first_token_seconds", "Time from a request's arrival to its first token.");
  itl_.render(out, "dsv3_inter_token_latency_seconds", "Time between consecutive tokens of a sequence.");
  return out;
}

}  // namespace dsv3::serve
