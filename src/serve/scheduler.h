// Continuous batching for the server: one engine thread owns the model and a BatchEngine;
// requests from HTTP threads wait in a bounded queue, join the running batch at any step as
// soon as it has room for all their choices (n > 1: siblings sharing one prompt read), and
// leave when they finish or their client cancels them. A request's prompt first looks up the
// context cache (prefix_cache.h) and shares the pages of its cached prefix; every sequence's
// pages go to the cache as it leaves. The engine thread publishes each step's tokens into
// the request, whose HTTP thread waits on it. Uses infer (batch engine) and serve's cache.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "infer/batch.h"
#include "serve/metrics.h"
#include "serve/prefix_cache.h"

namespace dsv3::serve {

// One choice's output so far.
struct Choice {
  std::vector<int32_t> tokens;
  std::vector<TokenLogprobs> logprobs;  // with GenerateOptions::logprobs >= 0
  bool finished = false, stopped_at_eos = false;
  bool cancel = false;  // asked by the HTTP thread (a stop string matched, or the client left)
};

// A request shared by its HTTP thread and the engine thread; the fields below `mutex` only
// under it. `changed` is notified whenever the engine publishes.
struct Request {
  std::vector<int32_t> prompt;
  std::vector<GenerateOptions> options;  // one per choice; speculative alike
  double arrived = 0;                    // steady seconds

  std::mutex mutex;
  std::condition_variable changed;
  std::vector<Choice> choices;
  bool done = false;
  int64_t cache_hit = 0;  // prompt tokens whose keys came from the context cache
  std::string error;      // set if the engine failed it
  bool cancel_all = false;
};

struct SchedulerOptions {
  int64_t max_sequences = 32;  // running at once
  int64_t max_len = 0;         // positions per sequence (0: the model's max_position_embeddings)
  int64_t step_tokens = 512;   // tokens per step (chunked prefill)
  int64_t cache_tokens = 0;    // the page pool (0: max_sequences * max_len)
  int64_t max_queue = 256;     // requests waiting beyond the running ones
  bool prefix_cache = true;
  uint64_t model_id = 0;       // keys the context cache (checkpoint_identity with a cache dir)
  std::string cache_dir;       // the context cache on disk too ("": memory only)
  int64_t cache_dir_bytes = int64_t(16) << 30;
};

class Scheduler {
 public:
  Scheduler(Transformer& model, const SchedulerOptions& opt, Metrics& metrics);
  ~Scheduler();  // stops the engine thread; unfinished requests end with an error
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Error naming the problem if the request could never run here (too long for a sequence
  // or for the whole pool, more choices than sequences, a speculative request without an
  // MTP module).
  void check(const Request& r) const;
  // Queues a request for the engine; false (and nothing queued) when the queue is full.
  bool submit(const std::shared_ptr<Request>& r);
  // Wakes the engine thread to act on a request's cancel flags.
  void wake();
  Gauges gauges() const;
  void flush_disk_cache();  // returns once queued cache files are written (tests, shutdown)

 private:
  struct Active {
    std::shared_ptr<Request> request;
    std::vector<int64_t> ids;         // one sequence per choice
    std::vector<size_t> published;    // tokens already in the request, per choice
    std::vector<double> last_token;   // when each choice's last token was published
  };
  void run();
  void admit();
  bool try_admit(const std::shared_ptr<Request>& r);
  void publish();
  void cancel_requested();
  void fail_all(const std::string& why);

  Transformer& model_;
  Metrics& metrics_;
  int64_t max_len_, max_queue_;
  bool use_prefix_cache_;
  BatchEngine engine_;
  std::unique_ptr<DiskCache> disk_;
  PrefixCache cache_;
  std::deque<std::shared_ptr<Request>> pending_;  // engine thread only
  std::vector<Active> active_;                    // engine thread only

  mutable std::mutex mutex_;  // guards incoming_, stop_ and the gauges' copies
  std::condition_variable wake_;
  std::deque<std::shared_ptr<Request>> incoming_;
  bool stop_ = false, woken_ = false;
  std::atomic<int64_t> waiting_{0};  // requests submitted and not yet admitted (or dropped)
  Gauges gauges_;
  std::thread thread_;
};

}  // namespace dsv3::serve
