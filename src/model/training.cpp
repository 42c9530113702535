// The training pass (see training.h). Forward:
//   h = embed(tokens); per layer: h += MLA(norm1(h)); h += FFN(norm2(h));
//   logits = lm_head(norm(h)); loss = mean CE.
// Backward walks the same steps in reverse; dh is the gradient of the residual stream.
#include "model/training.h"

#include <cstring>

#include "backend/train_ops.h"
#include "core/error.h"

namespace dsv3 {

template <typename T>
TrainingPass<T>::TrainingPass(const ModelConfig& c) : c_(c), rope_(Rope::from_config(c)) {}

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
  std::vector<T> h(static_cast<size_t>(N * dim)), delta(static_cast<size_t>(N * dim));
  const T* embed = w.embed_tokens.as<T>();
  for (int64_t t = 0; t < N; ++t) std::memcpy(&h[size_t(t * dim)], embed + tokens[t] * dim, size_t(dim) * sizeof(T));

  layers_.resize(size_t(c_.num_hidden_layers));
  for (int64_t l = 0; l < c_.num_hidden_layers; ++l) {
    const LayerWeights& lw = w.layers[size_t(l)];
    LayerActivations<T>& a = layers_[size_t(l)];
    a.h_in = h;
    a.inv1.resize(size_t(N)), a.xn1.resize(size_t(N * dim));
    rmsnorm_forward(h.data(), lw.input_layernorm.as<T>(), a.xn1.data(), a.inv1.data(), N, dim, c_.rms_norm_eps);
    mla_train_forward(c_, rope_, lw.self_attn, a.xn1.data(), B, S, a.mla, delta.data());
    for (int64_t i = 0; i < N * dim; ++i) h[size_t(i)] += delta[size_t(i)];
    a.h_mid = h;
    a.inv2.resize(size_t(N)), a.xn2.resize(size_t(N * dim));
    rmsnorm_forward(h.data(), lw.post_attention_layernorm.as<T>(), a.xn2.data(), a.inv2.data(), N, dim, c_.rms_norm_eps);
    if (lw.is_moe) moe_train_forward(c_, lw.moe, a.xn2.data(), N, a.moe, delta.data());
    else mlp_train_forward(lw.mlp, a.xn2.data(), N, a.mlp, delta.data());
    for (int64_t i = 0; i < N * dim; ++i) h[size_t(i)] += delta[size_t(i)];
  }
  h_last_ = h;
  inv_final_.resize(size_t(N)), xn_final_.resize(size_t(N * dim));
  rmsnorm_forward(h.data(), w.norm.as<T>(), xn_final_.data(), inv_final_.data(), N, dim, c_.rms_norm_eps);
  logits_.resize(size_t(N * vocab)), dlogits_.resize(size_t(N * vocab));
  matmul(xn_final_.data(), w.lm_head.as<T>(), logits_.data(), N, dim, vocab);
  return cross_entropy(logits_.data(), targets, N, vocab, dlogits_.data());
}

template <typename T>
void TrainingPass<T>::backward(const ModelWeights& w, ModelWeights& g) {
  const int64_t N = B_ * S_, dim = c_.hidden_size, vocab = c_.vocab_size;
  std::vector<T> dxn(static_cast<size_t>(N * dim)), dh(static_cast<size_t>(N * dim), T(0));
  // logits = norm(h) lm_head^T
  matmul_dw(dlogits_.data(), xn_final_.data(), mutable_data<T>(g.lm_head), N, dim, vocab);
  matmul_dx(dlogits_.data(), w.lm_head.as<T>(), dxn.data(), N, dim, vocab, false);
  rmsnorm_backward(dxn.data(), h_last_.data(), w.norm.as<T>(), inv_final_.data(), dh.data(), mutable_data<T>(g.norm), N,
                   dim);
  for (int64_t l = c_.num_hidden_layers - 1; l >= 0; --l) {
    const LayerWeights& lw = w.layers[size_t(l)];
    LayerWeights& lg = g.layers[size_t(l)];
    const LayerActivations<T>& a = layers_[size_t(l)];
    // h_out = h_mid + FFN(norm2(h_mid))
    std::fill(dxn.begin(), dxn.end(), T(0));
    if (lw.is_moe) moe_train_backward(c_, lw.moe, a.xn2.data(), N, a.moe, dh.data(), lg.moe, dxn.data());
    else mlp_train_backward(lw.mlp, a.xn2.data(), N, a.mlp, dh.data(), lg.mlp, dxn.data());
    rmsnorm_backward(dxn.data(), a.h_mid.data(), lw.post_attention_layernorm.as<T>(), a.inv2.data(), dh.data(),
                     mutable_data<T>(lg.post_attention_layernorm), N, dim);
    // h_mid = h_in + MLA(norm1(h_in))
    std::fill(dxn.begin(), dxn.end(), T(0));
    mla_train_backward(c_, rope_, lw.self_attn, a.xn1.data(), B_, S_, a.mla, dh.data(), lg.self_attn, dxn.data());
    rmsnorm_backward(dxn.data(), a.h_in.data(), lw.input_layernorm.as<T>(), a.inv1.data(), dh.data(),
                     mutable_data<T>(lg.input_layernorm), N, dim);
  }
  T* dembed = mutable_data<T>(g.embed_tokens);
  for (int64_t t = 0; t < N; ++t)
    for (int64_t d = 0; d < dim; ++d) dembed[tokens_[size_t(t)] * dim + d] += dh[size_t(t * dim + d)];
}

template class TrainingPass<float>;
template class TrainingPass<double>;

}  // namespace dsv3
