// MLP and MoE forward and backward for training (see moe_train.h).
#include "model/moe_train.h"

#include <cstring>

#include "backend/train_ops.h"
#include "core/error.h"
#include "model/router.h"

namespace dsv3 {

namespace {

// xe[m, dim] = the rows of x of the tokens in an expert's slots (slot = token * k + j).
template <typename T>
void gather_tokens(const T* x, int64_t dim, const std::vector<int64_t>& slots, int64_t k, std::vector<T>& xe) {
  xe.resize(slots.size() * size_t(dim));
  for (size_t i = 0; i < slots.size(); ++i)
    std::memcpy(&xe[i * size_t(dim)], x + (slots[i] / k) * dim, size_t(dim) * sizeof(T));
}

}  // namespace

template <typename T>
int64_t MoeActivations<T>::bytes() const {
  int64_t n = int64_t(logits.size() * sizeof(T) + experts.size() * sizeof(int32_t) + weights.size() * sizeof(T) +
                      load.size() * sizeof(int64_t) + balance_f.size() * sizeof(T)) + shared.bytes();
  for (const auto& s : slots) n += int64_t(s.size() * sizeof(int64_t));
  for (const auto& y : ye) n += int64_t(y.size() * sizeof(T));
  for (const auto& x : expert) n += x.bytes();
  return n;
}

template <typename T>
void mlp_train_forward(const MlpWeights& w, const T* x, int64_t m, MlpActivations<T>& act, T* out, const LinearGemm& lin,
                       SavedFormat saved) {
  const int64_t inter = w.gate_proj.rows, dim = w.gate_proj.cols;
  std::vector<T> a(static_cast<size_t>(m * inter)), b(a.size()), h(a.size());
  lin.forward(x, w.gate_proj.as<T>(), a.data(), m, dim, inter);
  lin.forward(x, w.up_proj.as<T>(), b.data(), m, dim, inter);
  swiglu_forward(a.data(), b.data(), h.data(), m * inter);
  lin.forward(h.data(), w.down_proj.as<T>(), out, m, inter, dim);
  act.a.save(a.data(), m, inter, saved);
  act.b.save(b.data(), m, inter, saved);
}

template <typename T>
void mlp_train_backward(const MlpWeights& w, const T* x, int64_t m, const MlpActivations<T>& act, const T* dout,
                        MlpWeights& g, T* dx, const LinearGemm& lin) {
  const int64_t inter = w.gate_proj.rows, dim = w.gate_proj.cols;
  std::vector<T> a_scratch, b_scratch;
  const T* a = act.a.read(a_scratch);
  const T* b = act.b.read(b_scratch);
  std::vector<T> h(static_cast<size_t>(m * inter)), dh(h.size()), da(h.size()), db(h.size());
  swiglu_forward(a, b, h.data(), m * inter);  // recomputed from the saved inputs
  lin.dw(dout, h.data(), mutable_data<T>(g.down_proj), m, inter, dim);
  lin.dx(dout, w.down_proj.as<T>(), dh.data(), m, inter, dim, false);
  swiglu_backward(dh.data(), a, b, da.data(), db.data(), m * inter);
  lin.dw(da.data(), x, mutable_data<T>(g.gate_proj), m, dim, inter);
  lin.dw(db.data(), x, mutable_data<T>(g.up_proj), m, dim, inter);
  lin.dx(da.data(), w.gate_proj.as<T>(), dx, m, dim, inter, true);
  lin.dx(db.data(), w.up_proj.as<T>(), dx, m, dim, inter, true);
}

template <typename T>
double moe_train_forward(const ModelConfig& c, const MoeWeights& w, const T* x, int64_t N, MoeActivations<T>& a, T* out,
                         const BalanceLoss& balance, const LinearGemm& lin) {
  const int64_t E = c.n_routed_experts, k = c.num_experts_per_tok, dim = c.hidden_size;
  a.logits.resize(size_t(N * E)), a.experts.resize(size_t(N * k)), a.weights.resize(size_t(N * k));
  matmul(x, w.gate.as<T>(), a.logits.data(), N, dim, E);
  route(c, a.logits.data(), N, w.e_score_correction_bias.data ? w.e_score_correction_bias.as<T>() : nullptr,
        a.experts.data(), a.weights.data());
  // Shared experts see every token; routed experts their own tokens, weighted by g.
  const SavedFormat saved = lin.moe_swiglu_input_format();
  if (c.n_shared_experts > 0) mlp_train_forward(w.shared_experts, x, N, a.shared, out, lin, saved);
  else std::fill(out, out + N * dim, T(0));
  a.slots.assign(size_t(E), {});
  for (int64_t i = 0; i < N * k; ++i) a.slots[size_t(a.experts[size_t(i)])].push_back(i);
  a.ye.assign(size_t(E), {}), a.expert.assign(size_t(E), {});
  std::vector<T> xe;
  for (int64_t e = 0; e < E; ++e) {
    const auto& s = a.slots[size_t(e)];
    if (s.empty()) continue;
    const int64_t m = int64_t(s.size());
    auto& ye = a.ye[size_t(e)];
    gather_tokens(x, dim, s, k, xe);
    ye.resize(size_t(m * dim));
    mlp_train_forward(w.experts[size_t(e)], xe.data(), m, a.expert[size_t(e)], ye.data(), lin, saved);
    for (int64_t i = 0; i < m; ++i) {
      const T gw = a.weights[size_t(s[size_t(i)])];
      T* o = out + (s[size_t(i)] / k) * dim;
      for (int64_t d = 0; d < dim; ++d) o[d] += gw * ye[size_t(i * dim + d)];
    }
  }
  // Sequences of S tokens, of which the first T count (the rest: MTP placeholders).
  const int64_t S = balance.seq_len > 0 ? balance.seq_len : N;
  const int64_t counted = S - balance.ignored_tail, n_seq = S > 0 ? N / S : 0;
  if (N <= 0 || N % S != 0 || counted <= 0 || balance.ignored_tail < 0)
    fail("MoE loads and balance loss: ", N, " tokens are not whole sequences of ", S, " with ", balance.ignored_tail,
         " placeholders each");
  a.balance = balance;
  a.load.assign(size_t(E), 0);
  for (int64_t t = 0; t < N; ++t)
    if (t % S < counted)
      for (int64_t j = 0; j < k; ++j) ++a.load[size_t(a.experts[size_t(t * k + j)])];
  a.balance_f.clear();
  if (balance.alpha <= 0) return 0;
  a.balance_f.assign(size_t(n_seq * E), T(0));
  std::vector<T> s(static_cast<size_t>(E));
  double loss = 0;
  for (int64_t b = 0; b < n_seq; ++b) {
    T* f = &a.balance_f[size_t(b * E)];
    std::vector<double> P(static_cast<size_t>(E), 0.0), count(static_cast<size_t>(E), 0.0);
    for (int64_t t = b * S; t < b * S + counted; ++t) {
      router_scores(c, &a.logits[size_t(t * E)], s.data());
      double sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += double(s[size_t(e)]);
      for (int64_t e = 0; e < E; ++e) P[size_t(e)] += double(s[size_t(e)]) / sum / double(counted);
      for (int64_t j = 0; j < k; ++j) count[size_t(a.experts[size_t(t * k + j)])] += 1;
    }
    for (int64_t e = 0; e < E; ++e) {
      const double fi = double(E) / double(k * counted) * count[size_t(e)];
      loss += balance.alpha * fi * P[size_t(e)] / double(n_seq);
      f[e] = T(balance.alpha * fi / double(counted * n_seq));  // d loss / d s'_{e,t}
    }
  }
  return loss;
}

template <typename T>
void moe_train_backward(const ModelConfig& c, const MoeWeights& w, const T* x, int64_t N, const MoeActivations<T>& a,
                        const T* dout, MoeWeights& g, T* dx, const LinearGemm& lin) {
  const int64_t E = c.n_routed_experts, k = c.num_experts_per_tok, dim = c.hidden_size;
  if (c.n_shared_experts > 0) mlp_train_backward(w.shared_experts, x, N, a.shared, dout, g.shared_experts, dx, lin);

  // Routed experts: d(expert out) = g_j dout; d(g_j) = dout . expert out.
  std::vector<T> dweight(static_cast<size_t>(N * k), T(0));
  for (int64_t e = 0; e < E; ++e) {
    const auto& s = a.slots[size_t(e)];
    if (s.empty()) continue;
    const int64_t m = int64_t(s.size());
    const auto& ye = a.ye[size_t(e)];
    std::vector<T> dye(static_cast<size_t>(m * dim)), dxe(static_cast<size_t>(m * dim), T(0)), xe;
    for (int64_t i = 0; i < m; ++i) {
      const int64_t slot = s[size_t(i)], t = slot / k;
      const T gw = a.weights[size_t(slot)];
      T dot = 0;
      for (int64_t d = 0; d < dim; ++d) {
        dye[size_t(i * dim + d)] = gw * dout[t * dim + d];
        dot += dout[t * dim + d] * ye[size_t(i * dim + d)];
      }
      dweight[size_t(slot)] = dot;
    }
    gather_tokens(x, dim, s, k, xe);
    mlp_train_backward(w.experts[size_t(e)], xe.data(), m, a.expert[size_t(e)], dye.data(),
                       g.experts[size_t(e)], dxe.data(), lin);
    for (int64_t i = 0; i < m; ++i) {
      T* d = dx + (s[size_t(i)] / k) * dim;
      for (int64_t j = 0; j < dim; ++j) d[j] += dxe[size_t(i * dim + j)];
    }
  }

  // Gate weights g_j = scale * s_j (/ sum of the chosen s if normalised), s = score(logits).
  std::vector<T> dlogits(static_cast<size_t>(N * E), T(0)), s(static_cast<size_t>(E)), ds(static_cast<size_t>(E));
  const T scale = T(c.routed_scaling_factor);
  const bool normalised = c.norm_topk_prob && k > 1;
  for (int64_t t = 0; t < N; ++t) {
    router_scores(c, &a.logits[size_t(t * E)], s.data());
    std::fill(ds.begin(), ds.end(), T(0));
    const int32_t* chosen = &a.experts[size_t(t * k)];
    const T* dw = &dweight[size_t(t * k)];
    T sum = 0, dot = 0;
    for (int64_t j = 0; j < k; ++j) sum += s[size_t(chosen[j])], dot += dw[j] * s[size_t(chosen[j])];
    for (int64_t j = 0; j < k; ++j)  // d g_j / d s_m = scale (delta_jm / sum - s_j / sum^2)
      ds[size_t(chosen[j])] += normalised ? scale * (dw[j] / sum - dot / (sum * sum)) : scale * dw[j];
    const int64_t S = a.balance.seq_len > 0 ? a.balance.seq_len : N;
    if (!a.balance_f.empty() && t % S < S - a.balance.ignored_tail) {
      // balance loss: s' = s / sum(s);  d/ds_m = (g_m - sum_i g_i s'_i) / sum(s)
      const T* gb = &a.balance_f[size_t((t / S) * E)];
      T all = 0, gs = 0;
      for (int64_t e = 0; e < E; ++e) all += s[size_t(e)];
      for (int64_t e = 0; e < E; ++e) gs += gb[e] * s[size_t(e)] / all;
      for (int64_t e = 0; e < E; ++e) ds[size_t(e)] += (gb[e] - gs) / all;
    }
    T* dl = &dlogits[size_t(t * E)];
    if (c.scoring_func == ScoreFunc::sigmoid) {
      for (int64_t e = 0; e < E; ++e) dl[e] = ds[size_t(e)] * s[size_t(e)] * (T(1) - s[size_t(e)]);
    } else {
      softmax_backward(s.data(), ds.data(), dl, E);
    }
  }
  matmul_dw(dlogits.data(), x, mutable_data<T>(g.gate), N, dim, E);
  matmul_dx(dlogits.data(), w.gate.as<T>(), dx, N, dim, E, true);
}

#define DSV3_INSTANTIATE(T)                                                                                       \
  template struct MoeActivations<T>;                                                                             \
  template void mlp_train_forward<T>(const MlpWeights&, const T*, int64_t, MlpActivations<T>&, T*,               \
                                     const LinearGemm&, SavedFormat);                                             \
  template void mlp_train_backward<T>(const MlpWeights&, const T*, int64_t, const MlpActivations<T>&, const T*,  \
                                      MlpWeights&, T*, const LinearGemm&);                                        \
  template double moe_train_forward<T>(const ModelConfig&, const MoeWeights&, const T*, int64_t,                   \
                                       MoeActivations<T>&, T*, const BalanceLoss&, const LinearGemm&);            \
  template void moe_train_backward<T>(const ModelConfig&, const MoeWeights&, const T*, int64_t,                   \
                                      const MoeActivations<T>&, const T*, MoeWeights&, T*, const LinearGemm&);
DSV3_INSTANTIATE(float)
DSV3_INSTANTIATE(double)

}  // namespace dsv3
