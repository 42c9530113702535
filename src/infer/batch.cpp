// The batch engine (see batch.h).
#include "infer/batch.h"

#include <algorithm>
#include <chrono>

#include "core/error.h"

namespace dsv3 {

namespace {

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

namespace {

// The pages of a batch: cache_tokens positions, or room for every sequence at max_len; both
// sizes checked first.
int64_t cache_pages(const ModelConfig& c, int64_t max_sequences, int64_t max_len, int64_t step_tokens,
                    int64_t cache_tokens) {
  if (max_sequences < 1) fail("batch: room for at least one sequence is needed, not ", max_sequences);
  if (max_len < 1) fail("batch: sequences need at least one position, not ", max_len);
  if (max_len > c.max_position_embeddings)
    fail("batch: ", max_len, " positions per sequence exceed max_position_embeddings (", c.max_position_embeddings, ")");
  if (step_tokens < max_sequences) fail("batch: a step of ", step_tokens, " tokens cannot advance ", max_sequences, " sequences");
  if (cache_tokens < 0) fail("batch: the cache's tokens must be >= 0, not ", cache_tokens);
  const int64_t P = PagedKvCache::kPageTokens;
  const int64_t tokens = cache_tokens > 0 ? cache_tokens : max_sequences * ((max_len + P - 1) / P * P);
  return (tokens + P - 1) / P;
}

int64_t pages_for(int64_t positions) { return (positions + PagedKvCache::kPageTokens - 1) / PagedKvCache::kPageTokens; }

}  // namespace

BatchEngine::BatchEngine(Transformer& model, int64_t max_sequences, int64_t max_len, int64_t step_tokens,
                         int64_t cache_tokens)
    : model_(model),
      max_len_(max_len),
      step_tokens_(step_tokens),
      cache_(model.config(), cache_pages(model.config(), max_sequences, max_len, step_tokens, cache_tokens)) {
  slots_.resize(size_t(max_sequences));
  // Every step's lists at their largest, so that steps allocate nothing.
  keys_.rows.reserve(size_t(max_sequences * max_len + step_tokens));  // forks gather shared pages once each
  want_.reserve(size_t(max_sequences)), owner_.reserve(size_t(max_sequences)), order_.reserve(size_t(max_sequences));
  logits_.reserve(size_t(max_sequences * model.config().vocab_size));
  ids_.reserve(size_t(step_tokens)), tables_.reserve(size_t(step_tokens)), pos_.reserve(size_t(step_tokens));
  rows_.pos.reserve(size_t(step_tokens)), rows_.row.reserve(size_t(step_tokens));
  keys_.keys.pos.reserve(size_t(step_tokens)), keys_.keys.row.reserve(size_t(step_tokens));
}

int64_t BatchEngine::pages_still_needed() const {
  int64_t n = 0;
  std::vector<int32_t> shared;  // partial last pages held by several sequences
  for (const Slot& s : slots_)
    if (s.id >= 0) {
      const PageTable& t = states_[size_t(s.id)].table;
      n += std::max<int64_t>(0, pages_for(states_[size_t(s.id)].end) - int64_t(t.pages.size()));
      if (t.length % PagedKvCache::kPageTokens != 0 && cache_.refs(t.pages.back()) > 1) shared.push_back(t.pages.back());
    }
  // A partial page shared by r sequences is copied by the first r - 1 that write into it.
  std::sort(shared.begin(), shared.end());
  shared.erase(std::unique(shared.begin(), shared.end()), shared.end());
  for (int32_t p : shared) n += cache_.refs(p) - 1;
  return n;
}

void BatchEngine::finish(int64_t id) {
  State& st = states_[size_t(id)];
  slots_[size_t(st.slot)].id = -1;
  release(cache_, st.table);
  st.sampler.reset();  // a finished sequence keeps its tokens, not its sampler's buffers
}

int64_t BatchEngine::running() const {
  int64_t n = 0;
  for (const Slot& s : slots_) n += s.id >= 0;
  return n;
}

int64_t BatchEngine::add(std::vector<int32_t> prompt, const GenerateOptions& opt) { return add_sequence(std::move(prompt), opt, -1); }

int64_t BatchEngine::add_sequence(std::vector<int32_t> prompt, const GenerateOptions& opt, int64_t new_pages) {
  const ModelConfig& c = model_.config();
  if (prompt.empty()) fail("batch: the prompt is empty");
  for (size_t i = 0; i < prompt.size(); ++i)
    if (prompt[i] < 0 || prompt[i] >= c.vocab_size)
      fail("batch: prompt token ", prompt[i], " at index ", i, " is outside the vocabulary [0, ", c.vocab_size, ")");
  if (opt.max_tokens < 1) fail("batch: max-tokens must be >= 1");
  if (opt.speculative_mtp) fail("batch: speculative decoding runs one sequence at a time for now");
  if (opt.max_tokens > max_len_ - int64_t(prompt.size()))  // (no overflow for a huge max_tokens)
    fail("batch: prompt (", prompt.size(), " tokens) + max-tokens (", opt.max_tokens, ") exceeds the ", max_len_,
         " positions a sequence has");
  auto free = std::find_if(slots_.begin(), slots_.end(), [](const Slot& s) { return s.id < 0; });
  if (free == slots_.end()) return -1;
  const int64_t end = int64_t(prompt.size()) + opt.max_tokens - 1;
  if (new_pages < 0) new_pages = pages_for(end);
  if (new_pages + pages_still_needed() > cache_.free_pages()) {
    if (running() == 0)
      fail("batch: a prompt of ", prompt.size(), " tokens + max-tokens ", opt.max_tokens, " needs ", pages_for(end),
           " pages of ", PagedKvCache::kPageTokens, " positions; the cache has ", cache_.pages());
    return -1;  // once running sequences finish
  }
  const int64_t id = int64_t(seqs_.size());
  seqs_.push_back(std::make_unique<Sequence>());
  seqs_.back()->prompt = std::move(prompt);
  seqs_.back()->tokens.reserve(size_t(opt.max_tokens));  // steps append without allocating
  chunk_.push_back(0);
  State st;
  st.opt = opt;
  st.sampler = std::make_unique<Sampler>(opt.sampling);
  st.slot = int64_t(free - slots_.begin());
  st.started = now_seconds();
  st.end = end;
  st.table.pages.reserve(size_t(pages_for(end)));
  states_.push_back(std::move(st));
  free->id = id;
  return id;
}

int64_t BatchEngine::fork(int64_t id, const GenerateOptions& opt) {
  const Sequence& parent = *seqs_.at(size_t(id));
  if (parent.finished) fail("batch: cannot fork sequence ", id, ": it has finished");
  if (parent.read < int64_t(parent.prompt.size()) || parent.tokens.empty())
    fail("batch: cannot fork sequence ", id, " before its prompt is read");
  if (opt.max_tokens <= int64_t(parent.tokens.size()))
    fail("batch: a fork's max-tokens (", opt.max_tokens, ") must exceed the ", parent.tokens.size(), " tokens it inherits");
  // The fork's pages: those past the parent's, and one more copy of a shared partial page.
  const PageTable& shared = states_[size_t(id)].table;
  const bool partial = shared.length % PagedKvCache::kPageTokens != 0;
  const int64_t end = int64_t(parent.prompt.size()) + opt.max_tokens - 1;
  const int64_t pages = std::max<int64_t>(0, pages_for(end) - int64_t(shared.pages.size())) + partial;
  const int64_t child = add_sequence(parent.prompt, opt, pages);
  if (child < 0) return -1;
  Sequence& s = *seqs_[size_t(child)];
  s.read = int64_t(s.prompt.size());
  s.tokens = parent.tokens;  // within the capacity add() reserved (max_tokens > these)
  // The prompt and every generated token but the last (the next step's input): the parent's
  // pages, shared.
  State& st = states_[size_t(child)];
  st.inherited = int64_t(s.tokens.size());
  std::vector<int32_t> reserved = std::move(st.table.pages);
  st.table = dsv3::fork(cache_, states_[size_t(id)].table);
  if (st.table.pages.capacity() < reserved.capacity()) st.table.pages.reserve(reserved.capacity());
  return child;
}

void BatchEngine::cancel(int64_t id) {
  Sequence& s = *seqs_.at(size_t(id));
  State& st = states_[size_t(id)];
  if (s.finished) return;
  s.finished = s.cancelled = true;
  s.seconds = now_seconds() - st.started;
  finish(id);
}

bool BatchEngine::step() {
  ids_.clear(), tables_.clear(), pos_.clear(), want_.clear(), owner_.clear();
  int64_t budget = step_tokens_;
  // Decoding sequences first (one token each), then prompt chunks in the order of arrival.
  std::vector<int64_t>& order = order_;  // kept between steps, as every buffer here
  order.clear();
  for (const Slot& s : slots_)
    if (s.id >= 0) order.push_back(s.id);
  std::sort(order.begin(), order.end());
  // Decoders first (stable, without std::stable_partition's temporary buffer).
  size_t decoders = 0;
  for (size_t i = 0; i < order.size(); ++i) {
    const Sequence& s = *seqs_[size_t(order[i])];
    if (s.read == int64_t(s.prompt.size())) std::rotate(order.begin() + long(decoders), order.begin() + long(i), order.begin() + long(i) + 1), ++decoders;
  }
  for (int64_t id : order) {
    Sequence& s = *seqs_[size_t(id)];
    PageTable& table = states_[size_t(id)].table;
    const int64_t P = int64_t(s.prompt.size());
    if (s.read == P) {  // decoding: the last token in, its logits out
      const int64_t pos = P + int64_t(s.tokens.size()) - 1;
      extend(cache_, table, 1);
      ids_.push_back(s.tokens.back()), tables_.push_back(&table), pos_.push_back(pos);
      want_.push_back(int64_t(ids_.size()) - 1), owner_.push_back(id);
      --budget;
    } else if (budget > 0) {  // a chunk of the prompt; logits once its last token is in
      const int64_t len = std::min(budget, P - s.read);
      chunk_[size_t(id)] = len;
      extend(cache_, table, len);
      for (int64_t i = 0; i < len; ++i)
        ids_.push_back(s.prompt[size_t(s.read + i)]), tables_.push_back(&table), pos_.push_back(s.read + i);
      if (s.read + len == P) want_.push_back(int64_t(ids_.size()) - 1), owner_.push_back(id);
      budget -= len;
    }
  }
  if (ids_.empty()) return false;
  const int64_t vocab = model_.config().vocab_size;
  logits_.resize(want_.size() * size_t(vocab));
  paged_rows(tables_.data(), pos_.data(), int64_t(ids_.size()), rows_, keys_);
  model_.forward_rows(ids_.data(), rows_, cache_, keys_, want_.data(), int64_t(want_.size()), logits_.data());
  const double now = now_seconds();
  for (size_t j = 0; j < want_.size(); ++j) {
    const int64_t id = owner_[j];
    Sequence& s = *seqs_[size_t(id)];
    State& st = states_[size_t(id)];
    const int32_t t = st.sampler->sample(logits_.data() + j * size_t(vocab), vocab);
    s.tokens.push_back(t);
    if (int64_t(s.tokens.size()) == st.inherited + 1) s.first_token_seconds = now - st.started;
    const bool eos = st.opt.stop_at_eos && model_.config().is_eos(t);
    if (eos || int64_t(s.tokens.size()) >= st.opt.max_tokens) {
      s.finished = true, s.stopped_at_eos = eos;
      s.seconds = now - st.started;
      finish(id);
    }
  }
  // Prompt chunks now in the cache.
  for (int64_t id : order) seqs_[size_t(id)]->read += chunk_[size_t(id)], chunk_[size_t(id)] = 0;
  return true;
}

}  // namespace dsv3
