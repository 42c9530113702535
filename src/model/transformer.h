// The DeepSeek-V3 model: embedding, decoder blocks (x += MLA(norm(x)); x += FFN(norm(x))),
// final norm and output head, over a latent KV cache. Loads a Hugging Face checkpoint
// folder. Uses backend, io and the other model files.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/arena.h"
#include "io/checkpoint.h"
#include "model/mla.h"
#include "model/moe.h"
#include "model/rope.h"
#include "model/token_rows.h"
#include "model/weights.h"

namespace dsv3 {

class PagedKvCache;

// Per layer, per position: kv_lora_rank + qk_rope_head_dim floats (MLA's compressed cache).
class KvCache {
 public:
  // layers < 0: the main model's num_hidden_layers; an MTP module's cache has 1.
  KvCache(const ModelConfig& c, int64_t capacity, int64_t layers = -1);
  int64_t capacity() const { return capacity_; }
  int64_t length() const { return length_; }  // positions filled
  void clear() { length_ = 0; }
  // Keeps positions [0, n) and drops the rest (a rejected draft, an edited conversation):
  // the next forward continues at position n.
  void truncate(int64_t n);
  LayerCache<float> layer(int64_t i) { return {latent_[size_t(i)].data(), k_pe_[size_t(i)].data()}; }
  // Rows [from, from + count) copied to [to, to + count) in every layer (a forked sequence).
  void copy_rows(int64_t from, int64_t to, int64_t count);
  void advance(int64_t n) { length_ += n; }

 private:
  int64_t capacity_ = 0, length_ = 0;
  std::vector<std::vector<float>> latent_, k_pe_;
};

// Intermediate results of one forward pass, for parity tests against the goldens.
struct ForwardTrace {
  std::vector<std::vector<float>> layer_out;  // residual stream after each layer [n, hidden]
  std::vector<float> prenorm_hidden, hidden;  // before / after model.norm [n, hidden]
  std::map<int64_t, Routing<float>> routing;  // per MoE layer
};

class Transformer {
 public:
  explicit Transformer(const std::string& model_dir);  // throws Error naming the file at fault
  // Over weights held elsewhere (a trainer's float32 parameters, which it may update between
  // passes: GRPO samples from the policy it trains). w must outlive the model.
  Transformer(const ModelConfig& c, const ModelWeights& w);
  Transformer(const Transformer&) = delete;  // weights_ may point into the object itself
  Transformer& operator=(const Transformer&) = delete;

  const ModelConfig& config() const { return config_; }
  const ModelWeights& weights() const { return *weights_; }
  AttnForm attn_form = AttnForm::automatic;

  // Runs tokens[0..n) at positions cache.length() .. +n, appending to the cache. Writes
  // float32 logits [n, vocab] if all_rows, else only the last position's [vocab].
  void forward(const int32_t* tokens, int64_t n, KvCache& cache, float* logits, bool all_rows,
               ForwardTrace* trace = nullptr);
  // One pass over tokens of several sequences (a batch step: prompts being read, sequences
  // decoding), each token at rows.pos[i] of its sequence and in cache row rows.row[i]; a
  // sequence's tokens are consecutive, its rows consecutive in `cache` from its position 0
  // at row - pos, and sequences' rows do not overlap. Writes the logits of the tokens
  // listed in logit_tokens ([count, vocab], in that order). The cache's length is not used.
  void forward_rows(const int32_t* tokens, const TokenRows& rows, KvCache& cache, const int64_t* logit_tokens,
                    int64_t count, float* logits);
  // The same over a paged cache: rows are the tokens' rows in the pool, and each sequence's
  // keys are read through `keys` (paged_rows() in paged_cache.h fills both).
  void forward_rows(const int32_t* tokens, const TokenRows& rows, PagedKvCache& cache, const KeyGather& keys,
                    const int64_t* logit_tokens, int64_t count, float* logits);

  // The residual stream of the last forward's tokens after the last block, before the final
  // norm [n, hidden]: h^0 of the MTP module (§2.2). Valid until the next forward.
  const float* last_hidden() const { return last_hidden_; }

  // The MTP module at depth 1 (layer num_hidden_layers, §2.2) as an inference module over a
  // latent cache of its own (KvCache with 1 layer): n tokens at positions cache.length() ..,
  // where token i combines h_prev[i] (the main model's h^0 at that position) with
  // next_tokens[i] (the token one ahead). Writes the last token's logits [vocab], its
  // prediction of the token two ahead. The speculative decoder's draft.
  void forward_mtp(const int32_t* next_tokens, const float* h_prev, int64_t n, KvCache& cache, float* logits);
  // The module's output states h^1 of the last forward_mtp's tokens [n, hidden] (what a
  // chained draft feeds back in as h_prev). Valid until the next forward_mtp.
  const float* last_mtp_hidden() const { return last_mtp_hidden_; }

 private:
  template <typename LayerOf>
  void run_rows(const int32_t* tokens, const TokenRows& rows, int64_t cache_rows, LayerOf layer_of,
                const int64_t* logit_tokens, int64_t count, float* logits);

  ModelConfig config_;
  std::unique_ptr<Checkpoint> checkpoint_;  // owns the mapped files the weights point into
  ModelWeights own_weights_;     // loaded from the folder (the other constructor: none)
  const ModelWeights* weights_;  // what the passes read
  Rope rope_;
  // What a pass reuses, so that after the first pass of a shape nothing is allocated:
  TokenRows rows_;             // where the pass's tokens sit
  RopeAngles angles_;          // of their positions
  MoeState<float> moe_state_;  // an MoE layer's routing and dispatch (one layer at a time)
  Arena arena_;                // every other activation and scratch
  const float* last_hidden_ = nullptr;  // in arena_, see last_hidden()
  const float* last_mtp_hidden_ = nullptr;  // in mtp_arena_
  Arena mtp_arena_;                     // forward_mtp's, so last_hidden() outlives it
  TokenRows mtp_rows_;
  RopeAngles mtp_angles_;
};

}  // namespace dsv3
