// The training pass (see training.h). Forward:
//   h = embed(tokens); per layer: h += MLA(norm1(h)); h += FFN(norm2(h));
//   logits = lm_head(norm(h)); MTP depths from h; loss.
// Backward walks the same steps in reverse; dh is the gradient of the residual stream.
#include "model/training.h"

#include <algorithm>
#include <cstring>

#include "backend/ops.h"
#include "core/error.h"
#include "model/head.h"

namespace dsv3 {

template <typename T>
TrainingPass<T>::TrainingPass(const ModelConfig& c, const TrainingLoss& loss, StageLayers stage)
    : c_(c), loss_(loss), begin_(stage.begin), end_(stage.end < 0 ? c.num_hidden_layers : stage.end),
      rope_(Rope::from_config(c)) {
  if (begin_ < 0 || begin_ >= end_ || end_ > c.num_hidden_layers)
    fail("training pass: a stage of layers [", begin_, ", ", end_, ") in a model of ", c.num_hidden_layers, " layers");
}

namespace {

template <typename V>
int64_t bytes_of(const V& v) {
  return int64_t(v.size() * sizeof(v[0]));
}

}  // namespace

template <typename T>
int64_t MtpActivations<T>::bytes() const {
  return bytes_of(next_tokens) + bytes_of(targets) + record.bytes() + bytes_of(h_out) + bytes_of(logits) +
         bytes_of(dlogits);
}

template <typename T>
double TrainingPass<T>::forward(const ModelWeights& w, const int32_t* tokens, const int32_t* targets, int64_t B,
                                int64_t S, const int64_t* lengths, const T* stage_input) {
  const int64_t N = B * S, dim = c_.hidden_size, vocab = c_.vocab_size;
  if (N <= 0) fail("training pass: no tokens");
  for (int64_t i = 0; i < N; ++i) {
    if (tokens[i] < 0 || tokens[i] >= vocab) fail("token id ", tokens[i], " at index ", i, " is out of range [0, ", vocab, ")");
    if (targets[i] >= vocab) fail("target id ", targets[i], " at index ", i, " is out of range [0, ", vocab, ")");
  }
  B_ = B, S_ = S;
  tokens_.assign(tokens, tokens + N);
  targets_.assign(targets, targets + N);
  if (lengths) lengths_.assign(lengths, lengths + B);
  else lengths_.assign(size_t(B), S);
  rows_.set_windows(B, S);
  rope_.angles(rows_.pos, angles_);
  arena_.reset();
  std::vector<T>& h = h_;  // the residual stream; h_ and h_next_ keep their memory between steps
  h.resize(size_t(N * dim));
  if (first_stage()) {
    embed_forward(w.embed_tokens, tokens, N, h.data(), arena_);
  } else {
    if (!stage_input) fail("training pass: a pipeline stage after the first needs its input");
    std::copy_n(stage_input, N * dim, h.data());
  }

  balance_loss_ = 0;
  layers_.resize(size_t(c_.num_hidden_layers));
  for (int64_t l = begin_; l < end_; ++l)
    balance_loss_ += block_forward<T>(block_context(), w.layers[size_t(l)], rows_, {}, h.data(), arena_, &layers_[size_t(l)]);
  const int64_t D = loss_.mtp_weight > 0 ? c_.num_nextn_predict_layers : 0;
  // The expert loads the bias update reads, copied into vectors that keep their memory;
  // zeros for the layers of other stages, so that stages' loads add up.
  auto record_loads = [&] {
    loads_.resize(layers_.size() + size_t(D));
    for (size_t l = 0; l < layers_.size(); ++l) {
      if (int64_t(l) >= begin_ && int64_t(l) < end_) loads_[l] = layers_[l].moe.load;
      else loads_[l].assign(w.layers[l].is_moe ? size_t(c_.n_routed_experts) : 0, 0);
    }
    for (size_t k = 0; k < size_t(D); ++k) {
      if (last_stage()) loads_[layers_.size() + k] = mtp_[k].record.block.moe.load;
      else loads_[layers_.size() + k].assign(w.mtp[k].block.is_moe ? size_t(c_.n_routed_experts) : 0, 0);
    }
  };
  if (!last_stage()) {  // the output goes to the next stage
    main_loss_ = mtp_loss_ = 0;
    record_loads();
    return balance_loss_;
  }
  h_last_ = h;
  logits_.resize(size_t(N * vocab)), dlogits_.resize(size_t(N * vocab));
  head_forward(c_, w.norm, w.lm_head, h.data(), N, logits_.data(), arena_);
  main_loss_ = cross_entropy(logits_.data(), targets, N, vocab, dlogits_.data());

  // MTP depths k = 1..D: predict the token k+1 ahead of each position (§2.2).
  mtp_.resize(size_t(D));
  mtp_loss_ = 0;
  std::vector<T>& h_k = h_next_;
  if (D > 0) h_k.resize(h.size());
  for (int64_t k = 1; k <= D; ++k) {
    const MtpWeights& mw = w.mtp[size_t(k - 1)];
    MtpActivations<T>& a = mtp_[size_t(k - 1)];
    a.targets.assign(size_t(N), -1);
    a.next_tokens.resize(size_t(N));
    for (int64_t t = 0; t < N; ++t) {
      const int64_t i = t % S;
      a.next_tokens[size_t(t)] = i + k < S ? tokens[t + k] : tokens[t];  // beyond the window: ignored below
      if (i + k < S) a.targets[size_t(t)] = targets[t + k];
    }
    // An MoE layer like the others; its last k positions per sequence hold placeholders.
    balance_loss_ += mtp_forward<T>(block_context(std::min(k, S - 1)), mw, a.next_tokens.data(), h.data(), rows_, {},
                                    h_k.data(), arena_, &a.record);
    h.swap(h_k);
    a.h_out = h;
    a.logits.resize(size_t(N * vocab)), a.dlogits.resize(size_t(N * vocab));
    head_forward(c_, mw.shared_head_norm, mw.shared_head_head, h.data(), N, a.logits.data(), arena_);
    mtp_loss_ += cross_entropy(a.logits.data(), a.targets.data(), N, vocab, a.dlogits.data(),
                               loss_.mtp_weight / double(D)) / double(D);
  }
  record_loads();
  return main_loss_ + loss_.mtp_weight * mtp_loss_ + balance_loss_;
}

template <typename T>
void TrainingPass<T>::backward(const ModelWeights& w, ModelWeights& g, const T* output_grad, const Mat* mtp_embedding_grad) {
  const int64_t N = B_ * S_, dim = c_.hidden_size;
  std::vector<T>& dh = dh_;
  if (!last_stage()) {
    if (!output_grad) fail("training pass: a pipeline stage before the last needs the gradient of its output");
    dh.assign(output_grad, output_grad + N * dim);
  } else {
    dh.assign(size_t(N * dim), T(0));
  }
  // MTP depths, last first: dh carries d h^{k} back to depth k-1, and at the end to h^0.
  for (int64_t k = last_stage() ? int64_t(mtp_.size()) : 0; k >= 1; --k) {
    const MtpWeights& mw = w.mtp[size_t(k - 1)];
    MtpWeights& mg = g.mtp[size_t(k - 1)];
    const MtpActivations<T>& a = mtp_[size_t(k - 1)];
    head_backward(c_, mw.shared_head_norm, mw.shared_head_head, a.h_out.data(), N, a.dlogits.data(), dh.data(),
                  mg.shared_head_norm, mg.shared_head_head, arena_);
    mtp_backward<T>(block_context(std::min(k, S_ - 1)), mw, a.next_tokens.data(), rows_, a.record, dh.data(), mg, arena_,
                    mtp_embedding_grad);
  }
  // logits = head(norm(h)); dh already holds what the MTP modules send back to h^0.
  if (last_stage())
    head_backward(c_, w.norm, w.lm_head, h_last_.data(), N, dlogits_.data(), dh.data(), g.norm, g.lm_head, arena_);
  for (int64_t l = end_ - 1; l >= begin_; --l)
    block_backward<T>(block_context(), w.layers[size_t(l)], rows_, layers_[size_t(l)], dh.data(), g.layers[size_t(l)],
                      arena_);
  if (first_stage()) embed_backward(tokens_.data(), N, dh.data(), g.embed_tokens, arena_);
}

template <typename T>
const std::vector<double>& TrainingPass<T>::token_logprobs() {
  token_logp_.resize(targets_.size());
  target_logprobs(logits_.data(), targets_.data(), B_ * S_, c_.vocab_size, token_logp_.data());
  return token_logp_;
}

template <typename T>
void TrainingPass<T>::weigh_tokens(const double* weights) {
  token_logp_.resize(targets_.size());
  target_logprobs(logits_.data(), targets_.data(), B_ * S_, c_.vocab_size, token_logp_.data(), weights, dlogits_.data());
}

template <typename T>
int64_t TrainingPass<T>::activation_bytes() const {
  int64_t n = bytes_of(tokens_) + bytes_of(targets_) + bytes_of(h_last_) + bytes_of(logits_) + bytes_of(dlogits_);
  for (const auto& l : layers_) n += l.bytes();
  for (const auto& m : mtp_) n += m.bytes();
  return n;
}

template struct MtpActivations<float>;
template struct MtpActivations<double>;
template class TrainingPass<float>;
template class TrainingPass<double>;

}  // namespace dsv3
