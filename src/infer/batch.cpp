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

// The cache rows of a batch (max_sequences slots of max_len rows), after checking both.
int64_t cache_rows(const ModelConfig& c, int64_t max_sequences, int64_t max_len, int64_t step_tokens) {
  if (max_sequences < 1) fail("batch: room for at least one sequence is needed, not ", max_sequences);
  if (max_len < 1) fail("batch: sequences need at least one position, not ", max_len);
  if (max_len > c.max_position_embeddings)
    fail("batch: ", max_len, " positions per sequence exceed max_position_embeddings (", c.max_position_embeddings, ")");
  if (step_tokens < max_sequences) fail("batch: a step of ", step_tokens, " tokens cannot advance ", max_sequences, " sequences");
  return max_sequences * max_len;
}

}  // namespace

BatchEngine::BatchEngine(Transformer& model, int64_t max_sequences, int64_t max_len, int64_t step_tokens)
    : model_(model),
      max_len_(max_len),
      step_tokens_(step_tokens),
      cache_(model.config(), cache_rows(model.config(), max_sequences, max_len, step_tokens)) {
  slots_.resize(size_t(max_sequences));
}

int64_t BatchEngine::running() const {
  int64_t n = 0;
  for (const Slot& s : slots_) n += s.id >= 0;
  return n;
}

int64_t BatchEngine::add(std::vector<int32_t> prompt, const GenerateOptions& opt) {
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
  const int64_t child = add(parent.prompt, opt);
  if (child < 0) return -1;
  Sequence& s = *seqs_[size_t(child)];
  s.read = int64_t(s.prompt.size());
  s.tokens = parent.tokens;  // within the capacity add() reserved (max_tokens > these)
  // In the cache: the prompt and every generated token but the last (the next step's input).
  const int64_t rows = s.read + int64_t(s.tokens.size()) - 1;
  cache_.copy_rows(states_[size_t(id)].slot * max_len_, states_[size_t(child)].slot * max_len_, rows);
  return child;
}

void BatchEngine::cancel(int64_t id) {
  Sequence& s = *seqs_.at(size_t(id));
  State& st = states_[size_t(id)];
  if (s.finished) return;
  s.finished = s.cancelled = true;
  s.seconds = now_seconds() - st.started;
  slots_[size_t(st.slot)].id = -1;
  st.sampler.reset();
}

bool BatchEngine::step() {
  ids_.clear(), rows_.pos.clear(), rows_.row.clear(), want_.clear(), owner_.clear();
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
    const int64_t base = states_[size_t(id)].slot * max_len_, P = int64_t(s.prompt.size());
    if (s.read == P) {  // decoding: the last token in, its logits out
      const int64_t pos = P + int64_t(s.tokens.size()) - 1;
      ids_.push_back(s.tokens.back());
      rows_.pos.push_back(pos), rows_.row.push_back(base + pos);
      want_.push_back(int64_t(ids_.size()) - 1), owner_.push_back(id);
      --budget;
    } else if (budget > 0) {  // a chunk of the prompt; logits once its last token is in
      const int64_t len = std::min(budget, P - s.read);
      chunk_[size_t(id)] = len;
      for (int64_t i = 0; i < len; ++i) {
        ids_.push_back(s.prompt[size_t(s.read + i)]);
        rows_.pos.push_back(s.read + i), rows_.row.push_back(base + s.read + i);
      }
      if (s.read + len == P) want_.push_back(int64_t(ids_.size()) - 1), owner_.push_back(id);
      budget -= len;
    }
  }
  if (ids_.empty()) return false;
  const int64_t vocab = model_.config().vocab_size;
  logits_.resize(want_.size() * size_t(vocab));
  model_.forward_rows(ids_.data(), rows_, cache_, want_.data(), int64_t(want_.size()), logits_.data());
  const double now = now_seconds();
  for (size_t j = 0; j < want_.size(); ++j) {
    const int64_t id = owner_[j];
    Sequence& s = *seqs_[size_t(id)];
    State& st = states_[size_t(id)];
    const int32_t t = st.sampler->sample(logits_.data() + j * size_t(vocab), vocab);
    s.tokens.push_back(t);
    if (s.tokens.size() == 1) s.first_token_seconds = now - st.started;
    const bool eos = st.opt.stop_at_eos && model_.config().is_eos(t);
    if (eos || int64_t(s.tokens.size()) >= st.opt.max_tokens) {
      s.finished = true, s.stopped_at_eos = eos;
      s.seconds = now - st.started;
      slots_[size_t(st.slot)].id = -1;
      st.sampler.reset();  // a finished sequence keeps its tokens, not its sampler's buffers
    }
  }
  // Prompt chunks now in the cache.
  for (int64_t id : order) seqs_[size_t(id)]->read += chunk_[size_t(id)], chunk_[size_t(id)] = 0;
  return true;
}

}  // namespace dsv3
