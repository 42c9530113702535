// The training pass (see training.h). Forward:
//   h = embed(tokens); per layer: h += MLA(norm1(h)); h += FFN(norm2(h));
//   logits = lm_head(norm(h)); MTP depths from h; loss.
// Backward walks the same steps in reverse; dh is the gradient of the residual stream.
#include "model/training.h"

#include <algorithm>
#include <cstring>

#include "backend/train_ops.h"
#include "core/error.h"

namespace dsv3 {

template <typename T>
TrainingPass<T>::TrainingPass(const ModelConfig& c, const TrainingLoss& loss)
    : c_(c), loss_(loss), rope_(Rope::from_config(c)) {}

namespace {

template <typename V>
int64_t bytes_of(const V& v) {
  return int64_t(v.size() * sizeof(v[0]));
}

// y = norm(x) for N rows, with its 1/rms: run in the forward, and again in the backward.
template <typename T>
struct Normed {
  std::vector<T> y, inv;
  Normed(const std::vector<T>& x, const Mat& w, int64_t N, int64_t dim, double eps)
      : y(static_cast<size_t>(N * dim)), inv(static_cast<size_t>(N)) {
    rmsnorm_forward(x.data(), w.as<T>(), y.data(), inv.data(), N, dim, eps);
  }
};

}  // namespace

template <typename T>
int64_t LayerActivations<T>::bytes() const {
  return bytes_of(h_in) + bytes_of(h_mid) + mla.bytes() + mlp.bytes() + moe.bytes();
}

template <typename T>
int64_t MtpActivations<T>::bytes() const {
  return bytes_of(targets) + bytes_of(e) + bytes_of(h_prev) + bytes_of(h_out) + block.bytes() + bytes_of(logits) +
         bytes_of(dlogits);
}

template <typename T>
double TrainingPass<T>::block_forward(const LayerWeights& lw, LayerActivations<T>& a, std::vector<T>& h,
                                      int64_t ignored_tail) {
  const int64_t N = B_ * S_, dim = c_.hidden_size;
  std::vector<T> delta(static_cast<size_t>(N * dim));
  a.h_in = h;
  const Normed<T> xn1(h, lw.input_layernorm, N, dim, c_.rms_norm_eps);
  mla_forward<T>(mla_context(), lw.self_attn, xn1.y.data(), rows_, {}, arena_, delta.data(), &a.mla);
  add_to(h.data(), delta.data(), N * dim);
  a.h_mid = h;
  const Normed<T> xn2(h, lw.post_attention_layernorm, N, dim, c_.rms_norm_eps);
  double balance = 0;
  if (lw.is_moe)
    balance = moe_forward<T>(c_, lw.moe, xn2.y.data(), N, arena_, delta.data(), loss_.linear, &a.moe,
                             {S_, loss_.alpha, ignored_tail});
  else mlp_forward<T>(lw.mlp, xn2.y.data(), N, arena_, delta.data(), loss_.linear, &a.mlp);
  add_to(h.data(), delta.data(), N * dim);
  return balance;
}

template <typename T>
void TrainingPass<T>::block_backward(const LayerWeights& lw, LayerWeights& lg, const LayerActivations<T>& a,
                                     std::vector<T>& dh) {
  const int64_t N = B_ * S_, dim = c_.hidden_size;
  std::vector<T> dxn(static_cast<size_t>(N * dim), T(0));
  // h_out = h_mid + FFN(norm2(h_mid))
  const Normed<T> xn2(a.h_mid, lw.post_attention_layernorm, N, dim, c_.rms_norm_eps);  // recomputed
  if (lw.is_moe) moe_backward<T>(c_, lw.moe, xn2.y.data(), N, a.moe, dh.data(), lg.moe, dxn.data(), arena_, loss_.linear);
  else mlp_backward<T>(lw.mlp, xn2.y.data(), N, a.mlp, dh.data(), lg.mlp, dxn.data(), arena_, loss_.linear);
  rmsnorm_backward(dxn.data(), a.h_mid.data(), lw.post_attention_layernorm.as<T>(), xn2.inv.data(), dh.data(),
                   mutable_data<T>(lg.post_attention_layernorm), N, dim);
  // h_mid = h_in + MLA(norm1(h_in))
  std::fill(dxn.begin(), dxn.end(), T(0));
  const Normed<T> xn1(a.h_in, lw.input_layernorm, N, dim, c_.rms_norm_eps);  // recomputed
  mla_backward<T>(mla_context(), lw.self_attn, xn1.y.data(), rows_, a.mla, dh.data(), lg.self_attn, dxn.data(), arena_);
  rmsnorm_backward(dxn.data(), a.h_in.data(), lw.input_layernorm.as<T>(), xn1.inv.data(), dh.data(),
                   mutable_data<T>(lg.input_layernorm), N, dim);
}

template <typename T>
double TrainingPass<T>::forward(const ModelWeights& w, const int32_t* tokens, const int32_t* targets, int64_t B,
                                int64_t S) {
  const int64_t N = B * S, dim = c_.hidden_size, vocab = c_.vocab_size;
  if (N <= 0) fail("training pass: no tokens");
  for (int64_t i = 0; i < N; ++i) {
    if (tokens[i] < 0 || tokens[i] >= vocab) fail("token id ", tokens[i], " at index ", i, " is out of range [0, ", vocab, ")");
    if (targets[i] >= vocab) fail("target id ", targets[i], " at index ", i, " is out of range [0, ", vocab, ")");
  }
  B_ = B, S_ = S;
  tokens_.assign(tokens, tokens + N);
  rows_ = TokenRows::windows(B, S);
  rope_.angles(rows_.pos, angles_);
  arena_.reset();
  std::vector<T> h(static_cast<size_t>(N * dim));
  const T* embed = w.embed_tokens.as<T>();
  for (int64_t t = 0; t < N; ++t) std::memcpy(&h[size_t(t * dim)], embed + tokens[t] * dim, size_t(dim) * sizeof(T));

  balance_loss_ = 0;
  layers_.resize(size_t(c_.num_hidden_layers));
  for (int64_t l = 0; l < c_.num_hidden_layers; ++l) balance_loss_ += block_forward(w.layers[size_t(l)], layers_[size_t(l)], h);
  h_last_ = h;
  logits_.resize(size_t(N * vocab)), dlogits_.resize(size_t(N * vocab));
  matmul(Normed<T>(h, w.norm, N, dim, c_.rms_norm_eps).y.data(), w.lm_head.as<T>(), logits_.data(), N, dim, vocab);
  main_loss_ = cross_entropy(logits_.data(), targets, N, vocab, dlogits_.data());

  // MTP depths k = 1..D: predict the token k+1 ahead of each position (§2.2).
  const int64_t D = loss_.mtp_weight > 0 ? c_.num_nextn_predict_layers : 0;
  mtp_.resize(size_t(D));
  mtp_loss_ = 0;
  for (int64_t k = 1; k <= D; ++k) {
    const MtpWeights& mw = w.mtp[size_t(k - 1)];
    MtpActivations<T>& a = mtp_[size_t(k - 1)];
    a.targets.assign(size_t(N), -1);
    a.e.resize(size_t(N * dim));
    for (int64_t t = 0; t < N; ++t) {
      const int64_t i = t % S;
      const int32_t tok = i + k < S ? tokens[t + k] : tokens[t];  // beyond the window: ignored below
      if (i + k < S) a.targets[size_t(t)] = targets[t + k];
      std::memcpy(&a.e[size_t(t * dim)], mw.embed_tokens.as<T>() + tok * dim, size_t(dim) * sizeof(T));
    }
    a.h_prev = h;
    loss_.linear.forward(mtp_input(mw, a).cat.data(), mw.eh_proj.as<T>(), h.data(), N, 2 * dim, dim);
    // An MoE layer like the others; its last k positions per sequence hold placeholders.
    balance_loss_ += block_forward(mw.block, a.block, h, std::min(k, S - 1));
    a.h_out = h;
    a.logits.resize(size_t(N * vocab)), a.dlogits.resize(size_t(N * vocab));
    matmul(Normed<T>(h, mw.shared_head_norm, N, dim, c_.rms_norm_eps).y.data(), mw.shared_head_head.as<T>(),
           a.logits.data(), N, dim, vocab);
    mtp_loss_ += cross_entropy(a.logits.data(), a.targets.data(), N, vocab, a.dlogits.data(),
                               loss_.mtp_weight / double(D)) / double(D);
  }
  return main_loss_ + loss_.mtp_weight * mtp_loss_ + balance_loss_;
}

template <typename T>
void TrainingPass<T>::backward(const ModelWeights& w, ModelWeights& g) {
  const int64_t N = B_ * S_, dim = c_.hidden_size, vocab = c_.vocab_size;
  std::vector<T> dxn(static_cast<size_t>(N * dim)), dh(static_cast<size_t>(N * dim), T(0));
  // MTP depths, last first: dh carries d h^{k} back to depth k-1, and at the end to h^0.
  for (int64_t k = int64_t(mtp_.size()); k >= 1; --k) {
    const MtpWeights& mw = w.mtp[size_t(k - 1)];
    MtpWeights& mg = g.mtp[size_t(k - 1)];
    const MtpActivations<T>& a = mtp_[size_t(k - 1)];
    const Normed<T> xn_out(a.h_out, mw.shared_head_norm, N, dim, c_.rms_norm_eps);  // recomputed
    matmul_dw(a.dlogits.data(), xn_out.y.data(), mutable_data<T>(mg.shared_head_head), N, dim, vocab);
    matmul_dx(a.dlogits.data(), mw.shared_head_head.as<T>(), dxn.data(), N, dim, vocab, false);
    rmsnorm_backward(dxn.data(), a.h_out.data(), mw.shared_head_norm.as<T>(), xn_out.inv.data(), dh.data(),
                     mutable_data<T>(mg.shared_head_norm), N, dim);
    block_backward(mw.block, mg.block, a.block, dh);
    std::vector<T> dcat(static_cast<size_t>(N * 2 * dim)), den(static_cast<size_t>(N * dim)),
        dhn(static_cast<size_t>(N * dim)), de(static_cast<size_t>(N * dim), T(0));
    const MtpInput in = mtp_input(mw, a);  // recomputed
    loss_.linear.dw(dh.data(), in.cat.data(), mutable_data<T>(mg.eh_proj), N, 2 * dim, dim);
    loss_.linear.dx(dh.data(), mw.eh_proj.as<T>(), dcat.data(), N, 2 * dim, dim, false);
    for (int64_t t = 0; t < N; ++t) {
      std::memcpy(&den[size_t(t * dim)], &dcat[size_t(t * 2 * dim)], size_t(dim) * sizeof(T));
      std::memcpy(&dhn[size_t(t * dim)], &dcat[size_t(t * 2 * dim + dim)], size_t(dim) * sizeof(T));
    }
    rmsnorm_backward(den.data(), a.e.data(), mw.enorm.as<T>(), in.e_inv.data(), de.data(), mutable_data<T>(mg.enorm), N,
                     dim);
    T* dembed = mutable_data<T>(mg.embed_tokens);
    for (int64_t t = 0; t < N; ++t) {
      const int64_t i = t % S_;
      const int32_t tok = i + k < S_ ? tokens_[size_t(t + k)] : tokens_[size_t(t)];
      for (int64_t d = 0; d < dim; ++d) dembed[tok * dim + d] += de[size_t(t * dim + d)];
    }
    std::fill(dh.begin(), dh.end(), T(0));
    rmsnorm_backward(dhn.data(), a.h_prev.data(), mw.hnorm.as<T>(), in.h_inv.data(), dh.data(), mutable_data<T>(mg.hnorm),
                     N, dim);
  }
  // logits = norm(h) lm_head^T; dh already holds what the MTP modules send back to h^0.
  const Normed<T> xn_final(h_last_, w.norm, N, dim, c_.rms_norm_eps);  // recomputed
  matmul_dw(dlogits_.data(), xn_final.y.data(), mutable_data<T>(g.lm_head), N, dim, vocab);
  matmul_dx(dlogits_.data(), w.lm_head.as<T>(), dxn.data(), N, dim, vocab, false);
  rmsnorm_backward(dxn.data(), h_last_.data(), w.norm.as<T>(), xn_final.inv.data(), dh.data(), mutable_data<T>(g.norm), N,
                   dim);
  for (int64_t l = c_.num_hidden_layers - 1; l >= 0; --l)
    block_backward(w.layers[size_t(l)], g.layers[size_t(l)], layers_[size_t(l)], dh);
  T* dembed = mutable_data<T>(g.embed_tokens);
  for (int64_t t = 0; t < N; ++t)
    for (int64_t d = 0; d < dim; ++d) dembed[tokens_[size_t(t)] * dim + d] += dh[size_t(t * dim + d)];
}

template <typename T>
int64_t TrainingPass<T>::activation_bytes() const {
  int64_t n = bytes_of(tokens_) + bytes_of(h_last_) + bytes_of(logits_) + bytes_of(dlogits_);
  for (const auto& l : layers_) n += l.bytes();
  for (const auto& m : mtp_) n += m.bytes();
  return n;
}

template <typename T>
typename TrainingPass<T>::MtpInput TrainingPass<T>::mtp_input(const MtpWeights& mw, const MtpActivations<T>& a) const {
  const int64_t N = B_ * S_, dim = c_.hidden_size;
  const Normed<T> en(a.e, mw.enorm, N, dim, c_.rms_norm_eps), hn(a.h_prev, mw.hnorm, N, dim, c_.rms_norm_eps);
  MtpInput in;
  in.cat.resize(size_t(N * 2 * dim));
  for (int64_t t = 0; t < N; ++t) {
    std::memcpy(&in.cat[size_t(t * 2 * dim)], &en.y[size_t(t * dim)], size_t(dim) * sizeof(T));
    std::memcpy(&in.cat[size_t(t * 2 * dim + dim)], &hn.y[size_t(t * dim)], size_t(dim) * sizeof(T));
  }
  in.e_inv = en.inv, in.h_inv = hn.inv;
  return in;
}

template <typename T>
std::vector<std::vector<int64_t>> TrainingPass<T>::expert_loads() const {
  std::vector<std::vector<int64_t>> out(layers_.size() + mtp_.size());
  for (size_t l = 0; l < layers_.size(); ++l)
    out[l] = layers_[l].moe.load;
  for (size_t k = 0; k < mtp_.size(); ++k) out[layers_.size() + k] = mtp_[k].block.moe.load;
  return out;
}

template struct LayerActivations<float>;
template struct LayerActivations<double>;
template struct MtpActivations<float>;
template struct MtpActivations<double>;
template class TrainingPass<float>;
template class TrainingPass<double>;

}  // namespace dsv3
