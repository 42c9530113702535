// The model's forward pass (see transformer.h).
#include "model/transformer.h"

#include <algorithm>

#include "backend/ops.h"
#include "core/error.h"
#include "model/block.h"
#include "model/head.h"
#include "model/mtp.h"
#include "model/paged_cache.h"

namespace dsv3 {

KvCache::KvCache(const ModelConfig& c, int64_t capacity, int64_t layers) : capacity_(capacity) {
  if (layers < 0) layers = c.num_hidden_layers;
  latent_.resize(size_t(layers));
  k_pe_.resize(size_t(layers));
  for (int64_t i = 0; i < layers; ++i) {
    latent_[size_t(i)].resize(size_t(capacity * c.kv_lora_rank));
    k_pe_[size_t(i)].resize(size_t(capacity * c.qk_rope_head_dim));
  }
}

void KvCache::truncate(int64_t n) {
  if (n < 0 || n > length_) fail("KV cache: cannot truncate ", length_, " positions to ", n);
  length_ = n;
}

void KvCache::copy_rows(int64_t from, int64_t to, int64_t count) {
  if (count < 0 || from < 0 || to < 0 || from + count > capacity_ || to + count > capacity_)
    fail("KV cache: cannot copy ", count, " rows from ", from, " to ", to, " of ", capacity_);
  for (size_t l = 0; l < latent_.size(); ++l) {
    const size_t C = latent_[l].size() / size_t(capacity_), R = k_pe_[l].size() / size_t(capacity_);
    std::copy_n(latent_[l].begin() + long(size_t(from) * C), size_t(count) * C, latent_[l].begin() + long(size_t(to) * C));
    std::copy_n(k_pe_[l].begin() + long(size_t(from) * R), size_t(count) * R, k_pe_[l].begin() + long(size_t(to) * R));
  }
}

Transformer::Transformer(const std::string& dir)
    : config_(ModelConfig::load(dir + "/config.json")),
      checkpoint_(std::make_unique<Checkpoint>(dir)),
      own_weights_(load_weights(config_, *checkpoint_)),
      weights_(&own_weights_),
      rope_(Rope::from_config(config_)) {}

Transformer::Transformer(const ModelConfig& c, const ModelWeights& w)
    : config_(c), own_weights_(c), weights_(&w), rope_(Rope::from_config(config_)) {}

void Transformer::forward(const int32_t* tokens, int64_t n, KvCache& cache, float* logits, bool all_rows,
                          ForwardTrace* trace) {
  const ModelConfig& c = config_;
  const int64_t dim = c.hidden_size, start = cache.length();
  if (n <= 0) fail("forward: no tokens");
  if (start + n > cache.capacity())
    fail("context full: ", start + n, " positions needed, the KV cache holds ", cache.capacity());
  for (int64_t i = 0; i < n; ++i)
    if (tokens[i] < 0 || tokens[i] >= c.vocab_size)
      fail("token id ", tokens[i], " at index ", i, " is out of range [0, ", c.vocab_size, ")");
  arena_.reset();
  rows_.set_sequence(start, n);
  const TokenRows& rows = rows_;
  rope_.angles(rows.pos, angles_);
  const BlockContext ctx{{c, angles_, attn_form}};

  float* h = arena_.alloc(size_t(n * dim));  // the residual stream
  embed_forward(weights_->embed_tokens, tokens, n, h, arena_);
  if (trace) trace->layer_out.clear();
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& w = weights_->layers[size_t(l)];
    block_forward<float>(ctx, w, rows, cache.layer(l), h, arena_, nullptr, &moe_state_);
    if (trace) {
      trace->layer_out.emplace_back(h, h + n * dim);
      if (w.is_moe) trace->routing[l] = moe_state_.routing;
    }
  }
  cache.advance(n);
  last_hidden_ = h;
  if (trace) {
    trace->prenorm_hidden.assign(h, h + n * dim);
    trace->hidden.resize(size_t(n * dim));
    // The trace's normed rows only: the logits below are computed as without a trace.
    rmsnorm_forward(h, weights_->norm.f32(), trace->hidden.data(), arena_.alloc(size_t(n)), n, dim, c.rms_norm_eps);
  }
  if (all_rows) head_forward(c, weights_->norm, weights_->lm_head, h, n, logits, arena_);
  else head_forward(c, weights_->norm, weights_->lm_head, h + (n - 1) * dim, 1, logits, arena_);
}

template <typename LayerOf>
void Transformer::run_rows(const int32_t* tokens, const TokenRows& rows, int64_t cache_rows, LayerOf layer_of,
                           const int64_t* logit_tokens, int64_t count, float* logits) {
  const ModelConfig& c = config_;
  const int64_t n = rows.size(), dim = c.hidden_size;
  if (n <= 0) fail("forward: no tokens");
  for (int64_t i = 0; i < n; ++i) {
    if (tokens[i] < 0 || tokens[i] >= c.vocab_size)
      fail("token id ", tokens[i], " at index ", i, " is out of range [0, ", c.vocab_size, ")");
    if (rows.row[size_t(i)] < 0 || rows.row[size_t(i)] >= cache_rows)
      fail("token ", i, ": cache row ", rows.row[size_t(i)], " outside the cache's ", cache_rows, " rows");
  }
  for (int64_t j = 0; j < count; ++j)
    if (logit_tokens[j] < 0 || logit_tokens[j] >= n) fail("logits asked for token ", logit_tokens[j], " of ", n);
  arena_.reset();
  rope_.angles(rows.pos, angles_);
  const BlockContext ctx{{c, angles_, attn_form}};
  float* h = arena_.alloc(size_t(n * dim));
  embed_forward(weights_->embed_tokens, tokens, n, h, arena_);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)
    block_forward<float>(ctx, weights_->layers[size_t(l)], rows, layer_of(l), h, arena_, nullptr, &moe_state_);
  last_hidden_ = h;
  float* picked = arena_.alloc(size_t(count * dim));
  for (int64_t j = 0; j < count; ++j)
    std::copy(h + logit_tokens[j] * dim, h + (logit_tokens[j] + 1) * dim, picked + j * dim);
  head_forward(c, weights_->norm, weights_->lm_head, picked, count, logits, arena_);
}

void Transformer::forward_rows(const int32_t* tokens, const TokenRows& rows, KvCache& cache,
                               const int64_t* logit_tokens, int64_t count, float* logits) {
  run_rows(tokens, rows, cache.capacity(), [&](int64_t l) { return cache.layer(l); }, logit_tokens, count, logits);
}

void Transformer::forward_rows(const int32_t* tokens, const TokenRows& rows, PagedKvCache& cache, const KeyGather& keys,
                               const int64_t* logit_tokens, int64_t count, float* logits) {
  const int64_t pool = cache.pages() * PagedKvCache::kPageTokens;
  for (int64_t r : keys.rows)
    if (r < 0 || r >= pool) fail("forward: gathered key row ", r, " outside the cache's ", pool, " rows");
  run_rows(
      tokens, rows, cache.pages() * PagedKvCache::kPageTokens,
      [&](int64_t l) {
        LayerCache<float> layer = cache.layer(l);
        layer.gather = &keys;
        return layer;
      },
      logit_tokens, count, logits);
}

void Transformer::forward_mtp(const int32_t* next_tokens, const float* h_prev, int64_t n, KvCache& cache,
                              float* logits) {
  const ModelConfig& c = config_;
  const int64_t dim = c.hidden_size, start = cache.length();
  if (weights_->mtp.empty()) fail("this checkpoint has no MTP module (num_nextn_predict_layers = 0)");
  if (n <= 0) fail("forward_mtp: no tokens");
  if (start + n > cache.capacity())
    fail("context full: ", start + n, " positions needed, the MTP cache holds ", cache.capacity());
  for (int64_t i = 0; i < n; ++i)
    if (next_tokens[i] < 0 || next_tokens[i] >= c.vocab_size)
      fail("token id ", next_tokens[i], " at index ", i, " is out of range [0, ", c.vocab_size, ")");
  const MtpWeights& w = weights_->mtp[0];
  mtp_arena_.reset();
  mtp_rows_.set_sequence(start, n);
  rope_.angles(mtp_rows_.pos, mtp_angles_);
  const BlockContext ctx{{c, mtp_angles_, attn_form}};
  float* h = mtp_arena_.alloc(size_t(n * dim));
  mtp_forward<float>(ctx, w, next_tokens, h_prev, mtp_rows_, cache.layer(0), h, mtp_arena_, nullptr, &moe_state_);
  cache.advance(n);
  last_mtp_hidden_ = h;
  head_forward(c, w.shared_head_norm, w.shared_head_head, h + (n - 1) * dim, 1, logits, mtp_arena_);
}

}  // namespace dsv3
