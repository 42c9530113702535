// The server's counters for GET /metrics, in Prometheus' text format: requests by route and
// status, prompt, generated and cache-hit tokens, and histograms of the time to the first
// token and between tokens. Gauges (queue, running sequences, pages) are read when rendered.
// Thread-safe. Uses nothing but the standard library.
#pragma once
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace dsv3::serve {

// Cumulative buckets as Prometheus counts them: bucket i holds observations <= bounds[i].
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void observe(double x);
  void render(std::string& out, const std::string& name, const std::string& help) const;

 private:
  std::vector<double> bounds_;
  std::vector<int64_t> counts_;  // one per bound, and +Inf last (not cumulative here)
  double sum_ = 0;
  int64_t n_ = 0;
};

// What the server's state is when /metrics is read.
struct Gauges {
  int64_t queued = 0, running = 0, free_pages = 0, total_pages = 0, cached_pages = 0;
  bool ready = false;
};

class Metrics {
 public:
  Metrics();
  void request(const std::string& route, int status);
  void tokens(int64_t prompt, int64_t cache_hit, int64_t generated);
  void first_token(double seconds);
  void between_tokens(double seconds);
  std::string render(const Gauges& g) const;

 private:
  mutable std::mutex mutex_;
  std::map<std::pair<std::string, int>, int64_t> requests_;
  int64_t prompt_ = 0, hit_ = 0, generated_ = 0;
  Histogram ttft_, itl_;
};

}  // namespace dsv3::serve
