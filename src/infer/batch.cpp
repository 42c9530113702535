// The batch engine (see batch.h).
#include "infer/batch.h"

#include <algorithm>
#include <chrono>
#include <cmath>

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

// The chosen token's log-probability under softmax(row) and the k most likely tokens'.
TokenLogprobs token_logprobs(const float* row, int64_t vocab, int32_t chosen, int64_t k) {
  float m = row[0];
  for (int64_t i = 1; i < vocab; ++i) m = std::max(m, row[i]);
  double sum = 0;
  for (int64_t i = 0; i < vocab; ++i) sum += std::exp(double(row[i] - m));
  const float log_z = m + float(std::log(sum));
  TokenLogprobs out;
  out.logprob = row[chosen] - log_z;
  k = std::min(k, vocab);
  std::vector<int32_t> ids(static_cast<size_t>(vocab));
  for (int64_t i = 0; i < vocab; ++i) ids[size_t(i)] = int32_t(i);
  std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [&](int32_t a, int32_t b) {
    return row[a] > row[b] || (row[a] == row[b] && a < b);
  });
  for (int64_t i = 0; i < k; ++i) out.top.emplace_back(ids[size_t(i)], row[ids[size_t(i)]] - log_z);
  return out;
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
  // A step's logits rows: a decoder's 1 + drafts (at most 8), never more than its tokens.
  const int64_t logit_rows = std::min<int64_t>(step_tokens, max_sequences * 9);
  want_.reserve(size_t(logit_rows)), owner_.reserve(size_t(logit_rows)), order_.reserve(size_t(max_sequences));
  work_.reserve(size_t(max_sequences));
  logits_.reserve(size_t(logit_rows * model.config().vocab_size));
  ids_.reserve(size_t(step_tokens)), tables_.reserve(size_t(step_tokens)), pos_.reserve(size_t(step_tokens));
  rows_.pos.reserve(size_t(step_tokens)), rows_.row.reserve(size_t(step_tokens));
  keys_.keys.pos.reserve(size_t(step_tokens)), keys_.keys.row.reserve(size_t(step_tokens));
}

int64_t BatchEngine::pages_still_needed() const {
  int64_t n = 0;
  std::vector<int32_t> shared;  // partial last pages held by several sequences
  for (const Slot& s : slots_)
    if (s.id >= 0) {
      const State& st = (*states_[size_t(s.id)]);
      const PageTable& t = st.table;
      // A waiting sibling will share its prompt's whole pages.
      const int64_t shared_prompt = st.waits_for >= 0 ? int64_t(seqs_[size_t(s.id)]->prompt.size()) / PagedKvCache::kPageTokens : 0;
      n += std::max<int64_t>(0, pages_for(st.end) - shared_prompt - int64_t(t.pages.size()));
      if (t.length % PagedKvCache::kPageTokens != 0 && cache_.refs(t.pages.back()) > 1) shared.push_back(t.pages.back());
    }
  // A partial page shared by r sequences is copied by the first r - 1 that write into it.
  std::sort(shared.begin(), shared.end());
  shared.erase(std::unique(shared.begin(), shared.end()), shared.end());
  for (int32_t p : shared) n += cache_.refs(p) - 1;
  return n;
}

void BatchEngine::finish(int64_t id) {
  State& st = (*states_[size_t(id)]);
  slots_[size_t(st.slot)].id = -1;
  if (on_release) {
    // Positions whose keys are of the sequence's own tokens: not those of drafts checked
    // after the token it ended with, nor of its last token (never fed back).
    const Sequence& s = *seqs_[size_t(id)];
    const int64_t own = s.tokens.empty() ? s.read : int64_t(s.prompt.size() + s.tokens.size()) - 1;
    on_release(id, st.table, std::min(st.table.length, own));
  }
  release(cache_, st.table);
  st.sampler.reset();  // a finished sequence keeps its tokens, not its sampler's buffers
}

int64_t BatchEngine::running() const {
  int64_t n = 0;
  for (const Slot& s : slots_) n += s.id >= 0;
  return n;
}

int64_t BatchEngine::add(std::vector<int32_t> prompt, const GenerateOptions& opt) { return add_sequence(std::move(prompt), opt, -1); }

int64_t BatchEngine::add(std::vector<int32_t> prompt, const GenerateOptions& opt, const PageTable& prefix) {
  if (prefix.length == 0) return add(std::move(prompt), opt);
  if (prefix.length < 0 || prefix.length >= int64_t(prompt.size()))
    fail("batch: a shared prefix of ", prefix.length, " positions must be shorter than the prompt (", prompt.size(), " tokens)");
  if (int64_t(prefix.pages.size()) != pages_for(prefix.length))
    fail("batch: a shared prefix of ", prefix.length, " positions needs ", pages_for(prefix.length), " pages, not ", prefix.pages.size());
  if (opt.speculative_mtp) fail("batch: a speculative sequence cannot start from a shared prefix (its MTP cache would lack it)");
  const int64_t end = int64_t(prompt.size()) + opt.max_tokens - 1;
  const int64_t id = add_sequence(std::move(prompt), opt, std::max<int64_t>(0, pages_for(end) - prefix.length / PagedKvCache::kPageTokens));
  if (id < 0) return -1;
  State& st = (*states_[size_t(id)]);
  std::vector<int32_t> reserved = std::move(st.table.pages);
  st.table = dsv3::fork(cache_, prefix);
  if (st.table.pages.capacity() < reserved.capacity()) st.table.pages.reserve(reserved.capacity());
  seqs_[size_t(id)]->read = seqs_[size_t(id)]->cached = prefix.length;
  return id;
}

int64_t BatchEngine::add_sibling(int64_t id, const GenerateOptions& opt) {
  const Sequence& parent = *seqs_.at(size_t(id));
  if (parent.finished) fail("batch: cannot add a sibling to sequence ", id, ": it has finished");
  if (parent.read == int64_t(parent.prompt.size())) fail("batch: cannot add a sibling to sequence ", id, ": its prompt is read");
  if (opt.speculative_mtp != (*states_[size_t(id)]).opt.speculative_mtp)
    fail("batch: a sibling decodes speculatively exactly when the sequence it shares a prompt with does");
  const int64_t P = int64_t(parent.prompt.size()), end = P + opt.max_tokens - 1;
  const int64_t child = add_sequence(parent.prompt, opt, std::max<int64_t>(0, pages_for(end) - P / PagedKvCache::kPageTokens));
  if (child >= 0) (*states_[size_t(child)]).waits_for = id;
  return child;
}

void BatchEngine::start_siblings(int64_t id, float* row, const float* hidden_row, double now) {
  const Sequence& parent = *seqs_[size_t(id)];
  const State& from = (*states_[size_t(id)]);
  for (const Slot& slot : slots_) {
    if (slot.id < 0 || (*states_[size_t(slot.id)]).waits_for != id) continue;
    Sequence& s = *seqs_[size_t(slot.id)];
    State& st = (*states_[size_t(slot.id)]);
    st.waits_for = -1;
    std::vector<int32_t> reserved = std::move(st.table.pages);
    st.table = dsv3::fork(cache_, from.table);
    if (st.table.pages.capacity() < reserved.capacity()) st.table.pages.reserve(reserved.capacity());
    s.read = parent.read;
    const int32_t first = sample(st, row);
    if (st.mtp) {  // the parent's module cache but its last position, which takes this first token
      const ModelConfig& c = model_.config();
      const int64_t len = from.mtp->length() - 1;
      const LayerCache<float> src = from.mtp->layer(0), dst = st.mtp->layer(0);
      std::copy_n(src.latent, size_t(len * c.kv_lora_rank), dst.latent);
      std::copy_n(src.k_pe, size_t(len * c.qk_rope_head_dim), dst.k_pe);
      st.mtp->advance(len);
      run_mtp(st, &first, hidden_row, 1);
    }
    emit(slot.id, first, now, row);
  }
}

int64_t BatchEngine::add_sequence(std::vector<int32_t> prompt, const GenerateOptions& opt, int64_t new_pages) {
  const ModelConfig& c = model_.config();
  if (prompt.empty()) fail("batch: the prompt is empty");
  for (size_t i = 0; i < prompt.size(); ++i)
    if (prompt[i] < 0 || prompt[i] >= c.vocab_size)
      fail("batch: prompt token ", prompt[i], " at index ", i, " is outside the vocabulary [0, ", c.vocab_size, ")");
  if (opt.max_tokens < 1) fail("batch: max-tokens must be >= 1");
  if (opt.speculative_mtp) {
    if (c.num_nextn_predict_layers < 1 || model_.weights().mtp.empty())
      fail("batch: --speculative mtp: this checkpoint has no MTP module (num_nextn_predict_layers = 0)");
    if (opt.draft < 1 || opt.draft > 8) fail("batch: --draft must be in 1..8, not ", opt.draft);
    if (opt.constraint) fail("batch: a constrained sequence (structured output) cannot decode speculatively");
  }
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
  if (opt.speculative_mtp) {
    seqs_.back()->drafts.reserve(size_t(opt.max_tokens * opt.draft));
    st.mtp = std::make_unique<KvCache>(c, end + 1, 1);
    st.draft_logits.resize(size_t(c.vocab_size)), st.mtp_hidden.resize(size_t(c.hidden_size));
    st.q.assign(size_t(opt.draft), std::vector<float>(size_t(c.vocab_size)));
    st.drafts.reserve(size_t(opt.draft)), st.next.reserve(size_t(std::max<int64_t>(end + 1, opt.draft + 1)));
  }
  states_.push_back(std::make_unique<State>(std::move(st)));
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
  const PageTable& shared = (*states_[size_t(id)]).table;
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
  State& st = (*states_[size_t(child)]);
  st.inherited = int64_t(s.tokens.size());
  const State& from = (*states_[size_t(id)]);
  if (st.mtp && from.mtp) {  // the module's cache and prediction too (copied: one layer)
    const ModelConfig& c = model_.config();
    const int64_t len = from.mtp->length();
    const LayerCache<float> src = from.mtp->layer(0), dst = st.mtp->layer(0);
    std::copy_n(src.latent, size_t(len * c.kv_lora_rank), dst.latent);
    std::copy_n(src.k_pe, size_t(len * c.qk_rope_head_dim), dst.k_pe);
    st.mtp->advance(len);
    st.draft_logits = from.draft_logits, st.mtp_hidden = from.mtp_hidden;
  } else if (st.mtp) {
    fail("batch: a speculative fork needs a speculative parent (its MTP cache)");
  }
  std::vector<int32_t> reserved = std::move(st.table.pages);
  st.table = dsv3::fork(cache_, (*states_[size_t(id)]).table);
  if (st.table.pages.capacity() < reserved.capacity()) st.table.pages.reserve(reserved.capacity());
  return child;
}

void BatchEngine::cancel(int64_t id) {
  Sequence& s = *seqs_.at(size_t(id));
  State& st = (*states_[size_t(id)]);
  if (s.finished) return;
  s.finished = s.cancelled = true;
  s.seconds = now_seconds() - st.started;
  // Siblings waiting for it: the first reads the prompt itself, and the others wait for it.
  int64_t reader = -1;
  for (const Slot& slot : slots_) {
    if (slot.id < 0 || (*states_[size_t(slot.id)]).waits_for != id) continue;
    if (reader < 0) reader = slot.id, (*states_[size_t(slot.id)]).waits_for = -1;
    else (*states_[size_t(slot.id)]).waits_for = reader;
  }
  finish(id);
}

void BatchEngine::forget(int64_t id) {
  if (!seqs_.at(size_t(id))) return;
  if (!seqs_[size_t(id)]->finished) fail("batch: cannot forget sequence ", id, ": it is running");
  seqs_[size_t(id)].reset(), states_[size_t(id)].reset();
}

const BatchEngine::Sequence& BatchEngine::sequence(int64_t id) const {
  if (!seqs_.at(size_t(id))) fail("batch: sequence ", id, " was forgotten");
  return *seqs_[size_t(id)];
}

void BatchEngine::run_mtp(State& st, const int32_t* next_tokens, const float* hidden, int64_t n) {
  const int64_t dim = model_.config().hidden_size;
  model_.forward_mtp(next_tokens, hidden, n, *st.mtp, st.draft_logits.data());
  std::copy(model_.last_mtp_hidden() + (n - 1) * dim, model_.last_mtp_hidden() + n * dim, st.mtp_hidden.begin());
}

int32_t BatchEngine::sample(State& st, float* row) {
  if (st.opt.constraint) st.opt.constraint->mask(row, model_.config().vocab_size);
  return st.sampler->sample(row, model_.config().vocab_size);
}

bool BatchEngine::emit(int64_t id, int32_t t, double now, const float* row) {
  Sequence& s = *seqs_[size_t(id)];
  State& st = (*states_[size_t(id)]);
  s.tokens.push_back(t);
  if (st.opt.constraint) st.opt.constraint->accept(t);
  if (st.opt.logprobs >= 0) s.logprobs.push_back(token_logprobs(row, model_.config().vocab_size, t, st.opt.logprobs));
  if (int64_t(s.tokens.size()) == st.inherited + 1) s.first_token_seconds = now - st.started;
  const bool eos = st.opt.stop_at_eos && model_.config().is_eos(t);
  if (!eos && int64_t(s.tokens.size()) < st.opt.max_tokens) return false;
  s.finished = true, s.stopped_at_eos = eos;
  s.seconds = now - st.started;
  finish(id);
  return true;
}

bool BatchEngine::step() {
  ids_.clear(), tables_.clear(), pos_.clear(), want_.clear(), owner_.clear(), work_.clear();
  int64_t budget = step_tokens_;
  const int64_t vocab = model_.config().vocab_size, dim = model_.config().hidden_size;
  // Decoding sequences first (one token each, or a speculative check of 1 + drafts), then
  // prompt chunks in the order of arrival.
  std::vector<int64_t>& order = order_;  // kept between steps, as every buffer here
  order.clear();
  for (const Slot& s : slots_)
    if (s.id >= 0 && (*states_[size_t(s.id)]).waits_for < 0) order.push_back(s.id);  // siblings wait
  std::sort(order.begin(), order.end());
  // Decoders first (stable, without std::stable_partition's temporary buffer).
  size_t decoders = 0;
  for (size_t i = 0; i < order.size(); ++i) {
    const Sequence& s = *seqs_[size_t(order[i])];
    if (s.read == int64_t(s.prompt.size())) std::rotate(order.begin() + long(decoders), order.begin() + long(i), order.begin() + long(i) + 1), ++decoders;
  }
  // Drafts take what the budget leaves after one token for each decoder and one for the
  // first waiting prompt, so that a step never exceeds step_tokens and prompts keep moving.
  const int64_t pending_prompt = order.size() > decoders ? 1 : 0;
  int64_t decoders_left = int64_t(decoders);
  for (int64_t id : order) {
    Sequence& s = *seqs_[size_t(id)];
    State& st = (*states_[size_t(id)]);
    PageTable& table = st.table;
    const int64_t P = int64_t(s.prompt.size());
    if (s.read == P) {  // decoding: the last token in (and drafts after it), logits for each
      const int64_t pos = P + int64_t(s.tokens.size()) - 1, left = st.opt.max_tokens - int64_t(s.tokens.size());
      const int64_t spare = budget - decoders_left - pending_prompt;
      --decoders_left;
      const int64_t n = st.mtp ? std::min<int64_t>({st.opt.draft, left - 1, std::max<int64_t>(spare, 0)}) : 0;
      st.drafts.clear();
      if (n > 0) {  // drafts: the module's prediction, then the module chained on its own output
        const int64_t committed = st.mtp->length();
        for (int64_t j = 0; j < n; ++j) {
          if (j > 0) {
            model_.forward_mtp(&st.drafts.back(), st.mtp_hidden.data(), 1, *st.mtp, st.draft_logits.data());
            std::copy(model_.last_mtp_hidden(), model_.last_mtp_hidden() + dim, st.mtp_hidden.begin());
          }
          st.sampler->distribution(st.draft_logits.data(), vocab, st.q[size_t(j)]);
          st.drafts.push_back(st.sampler->draw(st.q[size_t(j)]));
        }
        st.mtp->truncate(committed);
        s.drafts.insert(s.drafts.end(), st.drafts.begin(), st.drafts.end());
      }
      extend(cache_, table, n + 1);
      work_.push_back({id, int64_t(ids_.size()), n + 1, int64_t(want_.size()), n + 1, n, false});
      ids_.push_back(s.tokens.back()), tables_.push_back(&table), pos_.push_back(pos);
      want_.push_back(int64_t(ids_.size()) - 1), owner_.push_back(id);
      for (int64_t j = 0; j < n; ++j) {
        ids_.push_back(st.drafts[size_t(j)]), tables_.push_back(&table), pos_.push_back(pos + 1 + j);
        want_.push_back(int64_t(ids_.size()) - 1), owner_.push_back(id);
      }
      budget -= n + 1;
    } else if (budget > 0) {  // a chunk of the prompt; logits once its last token is in
      const int64_t len = std::min(budget, P - s.read);
      chunk_[size_t(id)] = len;
      extend(cache_, table, len);
      const bool last = s.read + len == P;
      work_.push_back({id, int64_t(ids_.size()), len, int64_t(want_.size()), last ? 1 : 0, 0, true});
      for (int64_t i = 0; i < len; ++i)
        ids_.push_back(s.prompt[size_t(s.read + i)]), tables_.push_back(&table), pos_.push_back(s.read + i);
      if (last) want_.push_back(int64_t(ids_.size()) - 1), owner_.push_back(id);
      budget -= len;
    }
  }
  if (ids_.empty()) return false;
  logits_.resize(want_.size() * size_t(vocab));
  paged_rows(tables_.data(), pos_.data(), int64_t(ids_.size()), rows_, keys_);
  model_.forward_rows(ids_.data(), rows_, cache_, keys_, want_.data(), int64_t(want_.size()), logits_.data());
  const float* hidden = model_.last_hidden();  // the pass's states, until the next forward_rows
  const double now = now_seconds();
  for (const Work& w : work_) {
    Sequence& s = *seqs_[size_t(w.id)];
    State& st = (*states_[size_t(w.id)]);
    float* rows = logits_.data() + w.first_logit * vocab;
    if (w.prompt) {
      const int64_t from = s.read, P = int64_t(s.prompt.size());
      s.read += w.len, chunk_[size_t(w.id)] = 0;
      int32_t first = -1;
      if (w.logit_rows) first = sample(st, rows);
      if (st.mtp) {  // the module over the chunk: position i with token i+1 (the last one: the first token)
        st.next.assign(s.prompt.begin() + from + 1, s.prompt.begin() + std::min<int64_t>(from + w.len + 1, P));
        if (w.logit_rows) st.next.push_back(first);
        if (!st.next.empty()) run_mtp(st, st.next.data(), hidden + w.offset * dim, int64_t(st.next.size()));
      }
      if (w.logit_rows) {
        start_siblings(w.id, rows, hidden + (w.offset + w.len - 1) * dim, now);
        emit(w.id, first, now, rows);
      }
      continue;
    }
    if (w.drafts == 0) {  // a plain decoding step
      const int32_t t = sample(st, rows);
      if (!emit(w.id, t, now, rows) && st.mtp) run_mtp(st, &t, hidden + w.offset * dim, 1);
      continue;
    }
    // A speculative check: drafts kept in order by the speculative-sampling rule.
    int64_t kept = 0;
    int32_t last = -1;
    bool done = false;
    for (; kept < w.drafts; ++kept) {
      st.sampler->distribution(rows + kept * vocab, vocab, p_);
      bool accepted = false;
      last = check_draft(p_, st.q[size_t(kept)], st.drafts[size_t(kept)], *st.sampler, accepted);
      if (!accepted) break;
      ++s.accepted;
      if ((done = emit(w.id, last, now, rows + kept * vocab))) break;
    }
    if (done) continue;  // finished: its pages are returned
    if (kept == w.drafts) {  // all kept: the model's token after the last draft too
      st.sampler->distribution(rows + w.drafts * vocab, vocab, p_);
      last = st.sampler->draw(p_);
    }
    truncate(cache_, st.table, st.table.length - (w.drafts - kept));  // rejected drafts' positions
    if (emit(w.id, last, now, rows + kept * vocab)) continue;
    st.next.assign(st.drafts.begin(), st.drafts.begin() + kept);
    st.next.push_back(last);
    run_mtp(st, st.next.data(), hidden + w.offset * dim, kept + 1);
  }
  return true;
}

}  // namespace dsv3
