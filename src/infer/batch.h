// Many sequences generated together: every step is one forward pass over the next tokens of
// all running sequences (Transformer::forward_rows), so each weight is read once per step for
// all of them. Sequences join at any step and read their prompt in chunks within a per-step
// token budget while the others keep decoding (chunked prefill), and leave when they finish
// or are cancelled. Their latent caches are page tables into one pool of 64-position pages
// (model/paged_cache.h), sized once from a token budget: pages are taken as a sequence grows
// and returned when it leaves, and a fork shares its parent's pages (the prompt is neither
// run nor copied again). A sequence with GenerateOptions::speculative_mtp drafts with the
// MTP module (its own small latent cache) before each step and has its drafts checked in
// rows of the shared pass, within what the step's budget leaves. A sequence's tokens are
// those it gets alone (tests: within the golden tolerance). Uses model and sampler.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "infer/generate.h"
#include "infer/sampler.h"
#include "model/paged_cache.h"
#include "model/transformer.h"

namespace dsv3 {

class BatchEngine {
 public:
  struct Sequence {
    std::vector<int32_t> prompt, tokens;  // tokens: generated so far (EOS included)
    int64_t read = 0;                     // prompt tokens already in the cache
    bool finished = false, stopped_at_eos = false, cancelled = false;
    double first_token_seconds = 0, seconds = 0;  // since add() (a fork: to its first own token)
    std::vector<int32_t> drafts;  // speculative decoding: every draft checked, in order
    int64_t accepted = 0;         // drafts kept
    int64_t cached = 0;           // prompt positions that came from a shared prefix (add's prefix)
    std::vector<TokenLogprobs> logprobs;  // per token, with GenerateOptions::logprobs >= 0
  };

  // Up to max_sequences running at once, each up to max_len positions (prompt and generated
  // tokens); a step runs at most step_tokens tokens (decoders first, then prompt chunks in
  // the order the sequences were added); cache_tokens positions of pages in all (0: room
  // for max_sequences sequences of max_len).
  BatchEngine(Transformer& model, int64_t max_sequences, int64_t max_len, int64_t step_tokens = 512,
              int64_t cache_tokens = 0);

  // A new sequence; its id. Throws Error (naming the problem) for an empty or out-of-range
  // prompt, or a prompt plus max_tokens beyond max_len; returns -1 while all sequence places
  // are taken or the free pages cannot hold it to its end beside the running ones' growth.
  int64_t add(std::vector<int32_t> prompt, const GenerateOptions& opt);
  // add(), with the prompt's first prefix.length positions already in prefix's pages (a
  // prefix cache's): the sequence shares them (one holder more each; a shared page is copied
  // before it is written) and reads only the rest. prefix.length < the prompt's length.
  int64_t add(std::vector<int32_t> prompt, const GenerateOptions& opt, const PageTable& prefix);
  // A sequence with id's prompt that waits for id to read it, then shares its pages and
  // samples its own first token from the same logits (n > 1 completions of one prompt: the
  // prompt is run once). -1 as add(); Error if id has already read its prompt or finished.
  // If id is cancelled first, its first waiting sibling reads the prompt and the others wait
  // for that one.
  int64_t add_sibling(int64_t id, const GenerateOptions& opt);
  void cancel(int64_t id);  // finishes it now; its slot is free for the next add()
  // A new sequence that continues from where `id` is now (its prompt read, its tokens so
  // far), sampling with opt (opt.max_tokens counts all its tokens, the inherited ones too):
  // it shares the parent's pages (a shared page is copied only when one of them writes into
  // it), so the prompt is neither run nor copied again (n > 1 completions of one prompt). -1
  // as add(); Error if id is still reading its prompt or has finished.
  int64_t fork(int64_t id, const GenerateOptions& opt);
  // One forward over the running sequences; false if none was running.
  bool step();
  const Sequence& sequence(int64_t id) const;
  // Frees a finished sequence's tokens and state (a server forgets each after answering);
  // sequence(id) is an Error after.
  void forget(int64_t id);
  int64_t running() const;
  int64_t free_pages() const { return cache_.free_pages(); }
  // Free pages beyond those the running sequences may still grow into (what add() admits by).
  int64_t spare_pages() const { return cache_.free_pages() - pages_still_needed(); }
  int64_t last_step_tokens() const { return int64_t(ids_.size()); }  // tokens the last step ran
  int64_t max_sequences() const { return int64_t(slots_.size()); }
  PagedKvCache& pages() { return cache_; }
  const PagedKvCache& pages() const { return cache_; }
  // Called as a sequence leaves (finished or cancelled) with its page table and how many of
  // its positions hold keys of its own tokens (prompt, then generated): a prefix cache keeps
  // the pages it wants (PagedKvCache::retain) before they are returned.
  std::function<void(int64_t id, const PageTable& table, int64_t valid)> on_release;

 private:
  struct Slot {
    int64_t id = -1;  // the sequence in it, or -1
  };
  struct State {
    GenerateOptions opt;
    std::unique_ptr<Sampler> sampler;
    int64_t slot = -1;
    double started = 0;
    PageTable table;  // its positions' pages
    int64_t end = 0;  // the positions it may reach: prompt + max_tokens - 1
    int64_t inherited = 0;  // tokens a fork started with
    int64_t waits_for = -1;  // a sibling: the sequence whose prompt it shares (add_sibling)
    // Speculative decoding (opt.speculative_mtp): the MTP module's own latent cache, its
    // prediction at the last committed position and its output state there, and each
    // step's drafts with their distributions.
    std::unique_ptr<KvCache> mtp;
    std::vector<float> draft_logits, mtp_hidden;
    std::vector<std::vector<float>> q;
    std::vector<int32_t> drafts, next;
  };
  // One sequence's share of a step: its tokens [offset, offset + len) of the pass, its
  // logits rows [first_logit, first_logit + logit_rows), its drafts (speculative decoders).
  struct Work {
    int64_t id, offset, len, first_logit, logit_rows, drafts;
    bool prompt;
  };
  // The MTP module over positions of s whose next tokens are known, with the model's states
  // for them (rows of the pass's last_hidden()).
  void run_mtp(State& st, const int32_t* next_tokens, const float* hidden, int64_t n);
  // Emits a token (chosen from the logits row); true when the sequence ends with it.
  bool emit(int64_t id, int32_t t, double now, const float* row);
  // Siblings waiting for id, now that its prompt is read: they share its pages and sample
  // their first tokens from its last prompt row.
  void start_siblings(int64_t id, float* row, const float* hidden_row, double now);
  // The next token from a logits row, within the sequence's constraint if it has one.
  int32_t sample(State& st, float* row);
  int64_t pages_still_needed() const;  // by the running sequences, to reach their ends
  // add(), with the pages the new sequence will take (-1: all it will reach).
  int64_t add_sequence(std::vector<int32_t> prompt, const GenerateOptions& opt, int64_t new_pages);
  void finish(int64_t id);             // frees its place and pages
  Transformer& model_;
  int64_t max_len_, step_tokens_;
  std::vector<Slot> slots_;
  std::vector<std::unique_ptr<Sequence>> seqs_;
  std::vector<std::unique_ptr<State>> states_;  // null once forgotten, as seqs_
  PagedKvCache cache_;
  // Reused by every step:
  std::vector<int32_t> ids_;
  std::vector<const PageTable*> tables_;
  std::vector<int64_t> pos_;
  TokenRows rows_;
  KeyGather keys_;
  std::vector<int64_t> want_, owner_, order_, chunk_;
  std::vector<Work> work_;
  std::vector<float> logits_, p_;
};

}  // namespace dsv3
