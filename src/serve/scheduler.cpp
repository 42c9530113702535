// Continuous batching (see scheduler.h).
#include "serve/scheduler.h"

#include <chrono>

#include "core/error.h"

namespace dsv3::serve {

namespace {

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int64_t pages_for(int64_t positions) { return (positions + PagedKvCache::kPageTokens - 1) / PagedKvCache::kPageTokens; }

}  // namespace

Scheduler::Scheduler(Transformer& model, const SchedulerOptions& opt, Metrics& metrics)
    : model_(model),
      metrics_(metrics),
      max_len_(opt.max_len > 0 ? opt.max_len : model.config().max_position_embeddings),
      max_queue_(opt.max_queue),
      use_prefix_cache_(opt.prefix_cache),
      engine_(model, opt.max_sequences, max_len_, opt.step_tokens, opt.cache_tokens),
      disk_(opt.cache_dir.empty() || !opt.prefix_cache
                ? nullptr
                : std::make_unique<DiskCache>(opt.cache_dir, opt.model_id, model.config(), opt.cache_dir_bytes)),
      cache_(engine_.pages(), opt.model_id) {
  if (max_queue_ < 0) fail("serve: the queue's length must be >= 0, not ", max_queue_);
  cache_.set_disk(disk_.get());
  // Every sequence's whole blocks (prompt and generated tokens) go to the context cache as
  // it leaves: a follow-up turn of a conversation starts with them.
  engine_.on_release = [this](int64_t id, const PageTable& table, int64_t valid) {
    if (!use_prefix_cache_ || valid < PrefixCache::kBlock) return;
    const BatchEngine::Sequence& s = engine_.sequence(id);
    std::vector<int32_t> tokens(s.prompt);
    tokens.insert(tokens.end(), s.tokens.begin(), s.tokens.end());
    cache_.insert(tokens, table, valid);
  };
  gauges_.total_pages = gauges_.free_pages = engine_.pages().pages();
  thread_ = std::thread([this] { run(); });
}

Scheduler::~Scheduler() {
  {
    std::lock_guard lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

void Scheduler::check(const Request& r) const {
  const ModelConfig& c = model_.config();
  if (r.options.empty()) fail("no choices requested");
  if (int64_t(r.options.size()) > engine_.max_sequences())
    fail("n = ", r.options.size(), " exceeds the ", engine_.max_sequences(), " sequences the server runs at once");
  if (r.prompt.empty()) fail("the prompt is empty");
  for (size_t i = 0; i < r.prompt.size(); ++i)
    if (r.prompt[i] < 0 || r.prompt[i] >= c.vocab_size)
      fail("prompt token ", r.prompt[i], " at index ", i, " is outside the vocabulary [0, ", c.vocab_size, ")");
  for (const GenerateOptions& o : r.options) {
    if (int64_t(r.prompt.size()) + o.max_tokens > max_len_)
      fail("this model's context is ", max_len_, " tokens; the prompt has ", r.prompt.size(), " and ", o.max_tokens,
           " more were requested");
    if (o.speculative_mtp && (c.num_nextn_predict_layers < 1 || model_.weights().mtp.empty()))
      fail("speculative decoding needs an MTP module, and this checkpoint has none");
  }
  // All choices together, as if alone in the pool: the prompt's pages once, each choice's own.
  const int64_t P = int64_t(r.prompt.size());
  int64_t pages = pages_for(P + r.options[0].max_tokens - 1);
  for (size_t i = 1; i < r.options.size(); ++i) pages += pages_for(P + r.options[i].max_tokens - 1) - P / PagedKvCache::kPageTokens;
  if (pages > engine_.pages().pages())
    fail("the prompt and completions need ", pages, " pages of ", PagedKvCache::kPageTokens, " positions; the KV cache has ",
         engine_.pages().pages(), " (--kv-cache-tokens)");
}

bool Scheduler::submit(const std::shared_ptr<Request>& r) {
  {
    std::lock_guard lock(mutex_);
    if (stop_ || waiting_ >= max_queue_) return false;
    ++waiting_;
    {
      std::lock_guard request_lock(r->mutex);
      r->choices.resize(r->options.size());
    }
    incoming_.push_back(r);
  }
  wake_.notify_all();
  return true;
}

void Scheduler::flush_disk_cache() {
  if (disk_) disk_->flush();
}

void Scheduler::wake() {
  {
    std::lock_guard lock(mutex_);
    woken_ = true;
  }
  wake_.notify_all();
}

Gauges Scheduler::gauges() const {
  std::lock_guard lock(mutex_);
  Gauges g = gauges_;
  g.queued = waiting_;
  return g;
}

void Scheduler::run() {
  for (;;) {
    {
      std::unique_lock lock(mutex_);
      wake_.wait(lock, [&] { return stop_ || woken_ || !incoming_.empty() || engine_.running() > 0 || !pending_.empty(); });
      if (stop_) break;
      woken_ = false;
      while (!incoming_.empty()) pending_.push_back(std::move(incoming_.front())), incoming_.pop_front();
    }
    try {
      cancel_requested();
      admit();
      engine_.step();
      publish();
    } catch (const std::exception& e) {
      fail_all(e.what());
    }
    std::lock_guard lock(mutex_);
    gauges_.running = engine_.running();
    gauges_.free_pages = engine_.free_pages();
    gauges_.cached_pages = cache_.blocks();
  }
  fail_all("the server is shutting down");
}

void Scheduler::cancel_requested() {
  for (auto it = pending_.begin(); it != pending_.end();) {
    Request& r = **it;
    std::unique_lock lock(r.mutex);
    if (!r.cancel_all) {
      ++it;
      continue;
    }
    r.done = true;
    for (Choice& c : r.choices) c.finished = true;
    lock.unlock();
    r.changed.notify_all();
    it = pending_.erase(it);
    --waiting_;
  }
  for (Active& a : active_) {
    std::lock_guard lock(a.request->mutex);
    for (size_t i = 0; i < a.ids.size(); ++i) {
      Choice& c = a.request->choices[i];
      if ((a.request->cancel_all || c.cancel) && !c.finished) engine_.cancel(a.ids[i]);
    }
  }
}

void Scheduler::admit() {
  // First come, first served: a request that does not fit yet waits, and so do those after
  // it. A request the engine refuses (check() should have caught it) fails alone.
  while (!pending_.empty()) {
    const std::shared_ptr<Request> r = pending_.front();
    try {
      if (!try_admit(r)) break;
    } catch (const std::exception& e) {
      {
        std::lock_guard lock(r->mutex);
        r->error = e.what(), r->done = true;
        for (Choice& c : r->choices) c.finished = true;
      }
      r->changed.notify_all();
    }
    pending_.pop_front(), --waiting_;
  }
}

bool Scheduler::try_admit(const std::shared_ptr<Request>& r) {
  const int64_t n = int64_t(r->options.size()), P = int64_t(r->prompt.size());
  if (engine_.max_sequences() - engine_.running() < n) return false;
  // The pages the request takes to reach its ends: the prompt's (less the blocks it shares)
  // once, and each further choice's own.
  auto need = [&](int64_t shared_blocks) {
    int64_t pages = pages_for(P + r->options[0].max_tokens - 1) - shared_blocks;
    for (int64_t i = 1; i < n; ++i) pages += pages_for(P + r->options[size_t(i)].max_tokens - 1) - P / PagedKvCache::kPageTokens;
    return pages;
  };
  PagedKvCache& pool = engine_.pages();
  PageTable prefix;
  if (use_prefix_cache_ && !r->options[0].speculative_mtp) {
    // A block read from disk takes a free page, so only while the request would fit even
    // without a hit: the pages the running sequences will grow into stay free.
    const bool from_disk = engine_.spare_pages() >= need(0);
    prefix = cache_.lookup(r->prompt, P - 1, from_disk);  // the last prompt token is run for its logits
    for (int32_t p : prefix.pages) pool.retain(p);  // not evicted while this request is admitted
  }
  // Cached blocks give their pages back only when that is enough to admit the request now;
  // otherwise it waits for running sequences to finish, and the cache stays.
  const int64_t short_by = need(int64_t(prefix.pages.size())) - engine_.spare_pages();
  if (short_by > 0 && cache_.evictable() < short_by) {
    release(pool, prefix);
    return false;
  }
  for (int64_t k = 0; k < short_by; ++k) cache_.evict();
  std::vector<int64_t> ids;
  auto undo = [&] {
    release(pool, prefix);
    for (int64_t id : ids)
      if (id >= 0) engine_.cancel(id), engine_.forget(id);
  };
  try {
    ids.push_back(engine_.add(r->prompt, r->options[0], prefix));
    for (int64_t i = 1; ids.back() >= 0 && i < n; ++i) ids.push_back(engine_.add_sibling(ids[0], r->options[size_t(i)]));
  } catch (...) {
    undo();
    throw;
  }
  if (ids.back() < 0) {  // not all of it fits yet: none of it runs
    undo();
    return false;
  }
  release(pool, prefix);
  const double now = now_seconds();
  {
    std::lock_guard lock(r->mutex);
    r->cache_hit = engine_.sequence(ids[0]).cached;
  }
  metrics_.tokens(P, r->cache_hit, 0);
  active_.push_back(Active{r, ids, std::vector<size_t>(size_t(n), 0), std::vector<double>(size_t(n), now)});
  return true;
}

void Scheduler::publish() {
  const double now = now_seconds();
  for (size_t k = 0; k < active_.size();) {
    Active& a = active_[k];
    Request& r = *a.request;
    bool all = true;
    int64_t generated = 0;
    {
      std::lock_guard lock(r.mutex);
      for (size_t i = 0; i < a.ids.size(); ++i) {
        const BatchEngine::Sequence& s = engine_.sequence(a.ids[i]);
        Choice& c = r.choices[i];
        const size_t from = a.published[i], to = s.tokens.size();
        if (to > from) {
          c.tokens.insert(c.tokens.end(), s.tokens.begin() + long(from), s.tokens.end());
          if (s.logprobs.size() == to) c.logprobs.insert(c.logprobs.end(), s.logprobs.begin() + long(from), s.logprobs.end());
          if (from == 0 && i == 0) metrics_.first_token(now - r.arrived);
          if (from > 0)
            for (size_t t = from; t < to; ++t) metrics_.between_tokens((now - a.last_token[i]) / double(to - from));
          a.published[i] = to, a.last_token[i] = now;
          generated += int64_t(to - from);
        }
        if (s.finished) c.finished = true, c.stopped_at_eos = s.stopped_at_eos;
        all = all && c.finished;
      }
      r.done = all;
    }
    r.changed.notify_all();
    if (generated) metrics_.tokens(0, 0, generated);
    if (all) {
      for (int64_t id : a.ids) engine_.forget(id);
      active_.erase(active_.begin() + long(k));
    } else {
      ++k;
    }
  }
}

void Scheduler::fail_all(const std::string& why) {
  auto fail_request = [&](Request& r) {
    {
      std::lock_guard lock(r.mutex);
      r.error = why, r.done = true;
      for (Choice& c : r.choices) c.finished = true;
    }
    r.changed.notify_all();
  };
  for (Active& a : active_) {
    for (int64_t id : a.ids) {
      engine_.cancel(id);
      engine_.forget(id);
    }
    fail_request(*a.request);
  }
  active_.clear();
  for (auto& r : pending_) fail_request(*r);
  pending_.clear();
  std::lock_guard lock(mutex_);
  for (auto& r : incoming_) fail_request(*r);
  incoming_.clear();
  waiting_ = 0;
}

}  // namespace dsv3::serve
