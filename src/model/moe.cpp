// Dense MLP and DeepSeekMoE, forward and backward (see moe.h). Tokens are grouped by expert
// so that each expert's weights are read once per pass, whatever the number of tokens, and
// the active experts (with the shared ones) run as grouped products.
#include "model/moe.h"

#include <algorithm>

#include "core/error.h"
#include "model/router.h"

namespace dsv3 {

namespace {

template <typename T>
T* sized(std::vector<T>& v, int64_t n) {
  v.resize(size_t(n));
  return v.data();
}

// One SwiGLU MLP of a grouped pass: its weights, its m input rows and its output rows.
template <typename T>
struct SwigluJob {
  const MlpWeights* w;
  const T* x;
  int64_t m;
  T* out;
  MlpRecord<T>* record;  // null: nothing kept
};

// out = down(silu(gate(x)) * up(x)) for every job, as two grouped passes (gate and up of all
// jobs, then their down projections).
template <typename T>
void swiglu_mlps(const std::vector<SwigluJob<T>>& jobs, Arena& arena, const LinearGemm& lin, SavedFormat saved) {
  std::vector<T*> a(jobs.size()), b(jobs.size());
  std::vector<LinearGemm::Job<T>> products;
  for (size_t i = 0; i < jobs.size(); ++i) {
    const int64_t size = jobs[i].m * jobs[i].w->gate_proj.rows;
    a[i] = arena.alloc<T>(size_t(size)), b[i] = arena.alloc<T>(size_t(size));
    products.push_back({jobs[i].x, jobs[i].m, jobs[i].w->gate_proj, a[i]});
    products.push_back({jobs[i].x, jobs[i].m, jobs[i].w->up_proj, b[i]});
  }
  lin.forward_batch(products.data(), products.size());
  products.clear();
  for (size_t i = 0; i < jobs.size(); ++i) {
    const int64_t inter = jobs[i].w->gate_proj.rows;
    if (jobs[i].record) {
      jobs[i].record->a.save(a[i], jobs[i].m, inter, saved);
      jobs[i].record->b.save(b[i], jobs[i].m, inter, saved);
    }
    swiglu_forward(a[i], b[i], a[i], jobs[i].m * inter);  // h = silu(a) * b, in place of a
    products.push_back({a[i], jobs[i].m, jobs[i].w->down_proj, jobs[i].out});
  }
  lin.forward_batch(products.data(), products.size());
}

// Loads and the balance loss's factors of a recorded forward; returns the loss.
template <typename T>
double balance_statistics(const ModelConfig& c, int64_t N, const BalanceLoss& balance, MoeRecord<T>& a) {
  const int64_t E = c.n_routed_experts, k = c.num_experts_per_tok;
  // Sequences of S tokens, of which the first T count (the rest: MTP placeholders).
  const int64_t S = balance.seq_len > 0 ? balance.seq_len : N;
  const int64_t counted = S - balance.ignored_tail, n_seq = S > 0 ? N / S : 0;
  if (N <= 0 || N % S != 0 || counted <= 0 || balance.ignored_tail < 0)
    fail("MoE loads and balance loss: ", N, " tokens are not whole sequences of ", S, " with ", balance.ignored_tail,
         " placeholders each");
  a.balance = balance;
  a.load.assign(size_t(E), 0);
  const std::vector<int32_t>& experts = a.routing.experts;
  for (int64_t t = 0; t < N; ++t)
    if (t % S < counted)
      for (int64_t j = 0; j < k; ++j) ++a.load[size_t(experts[size_t(t * k + j)])];
  a.balance_f.clear();
  if (balance.alpha <= 0) return 0;
  a.balance_f.assign(size_t(n_seq * E), T(0));
  std::vector<T> s(static_cast<size_t>(E));
  double loss = 0;
  for (int64_t b = 0; b < n_seq; ++b) {
    T* f = &a.balance_f[size_t(b * E)];
    std::vector<double> P(static_cast<size_t>(E), 0.0), count(static_cast<size_t>(E), 0.0);
    for (int64_t t = b * S; t < b * S + counted; ++t) {
      router_scores(c, &a.routing.logits[size_t(t * E)], s.data());
      double sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += double(s[size_t(e)]);
      for (int64_t e = 0; e < E; ++e) P[size_t(e)] += double(s[size_t(e)]) / sum / double(counted);
      for (int64_t j = 0; j < k; ++j) count[size_t(experts[size_t(t * k + j)])] += 1;
    }
    for (int64_t e = 0; e < E; ++e) {
      const double fi = double(E) / double(k * counted) * count[size_t(e)];
      loss += balance.alpha * fi * P[size_t(e)] / double(n_seq);
      f[e] = T(balance.alpha * fi / double(counted * n_seq));  // d loss / d s'_{e,t}
    }
  }
  return loss;
}

}  // namespace

template <typename T>
int64_t MoeRecord<T>::bytes() const {
  int64_t n = int64_t((routing.logits.size() + routing.weights.size() + ye.size() + balance_f.size()) * sizeof(T) +
                      routing.experts.size() * sizeof(int32_t) +
                      (dispatch.offset.size() + dispatch.slot.size() + dispatch.token.size() + load.size()) *
                          sizeof(int64_t)) +
              shared.bytes();
  for (const auto& x : expert) n += x.bytes();
  return n;
}

template <typename T>
void mlp_forward(const MlpWeights& w, const T* x, int64_t m, Arena& arena, T* out, const LinearGemm& lin,
                 MlpRecord<T>* record, SavedFormat saved) {
  ArenaScope scope(arena);
  swiglu_mlps<T>({{&w, x, m, out, record}}, arena, lin, saved);
}

template <typename T>
void mlp_backward(const MlpWeights& w, const T* x, int64_t m, const MlpRecord<T>& act, const T* dout, MlpWeights& g,
                  T* dx, Arena& arena, const LinearGemm& lin) {
  ArenaScope scope(arena);
  const int64_t inter = w.gate_proj.rows, dim = w.gate_proj.cols;
  std::vector<T> a_scratch, b_scratch;
  const T* a = act.a.read(a_scratch);
  const T* b = act.b.read(b_scratch);
  T* h = arena.alloc<T>(size_t(m * inter));
  T* dh = arena.alloc<T>(size_t(m * inter));
  T* da = arena.alloc<T>(size_t(m * inter));
  T* db = arena.alloc<T>(size_t(m * inter));
  swiglu_forward(a, b, h, m * inter);  // recomputed from the saved inputs
  lin.dw(dout, h, mutable_data<T>(g.down_proj), m, inter, dim);
  lin.dx(dout, w.down_proj.as<T>(), dh, m, inter, dim, false);
  swiglu_backward(dh, a, b, da, db, m * inter);
  lin.dw(da, x, mutable_data<T>(g.gate_proj), m, dim, inter);
  lin.dw(db, x, mutable_data<T>(g.up_proj), m, dim, inter);
  lin.dx(da, w.gate_proj.as<T>(), dx, m, dim, inter, true);
  lin.dx(db, w.up_proj.as<T>(), dx, m, dim, inter, true);
}

template <typename T>
void route_tokens(const ModelConfig& c, const MoeWeights& w, const T* x, int64_t n, Routing<T>& r) {
  const int64_t E = c.n_routed_experts, k = c.num_experts_per_tok;
  // The gate stays in full precision whatever the experts' GEMMs use (§3.3).
  LinearGemm{}.forward(x, w.gate, sized(r.logits, n * E), n);
  route(c, r.logits.data(), n, w.e_score_correction_bias.data ? w.e_score_correction_bias.as<T>() : nullptr,
        sized(r.experts, n * k), sized(r.weights, n * k));
}

Dispatch dispatch(const std::vector<int32_t>& experts, int64_t n_experts, int64_t k) {
  Dispatch d;
  d.offset.assign(size_t(n_experts + 1), 0);
  for (int32_t e : experts) ++d.offset[size_t(e) + 1];
  for (int64_t e = 0; e < n_experts; ++e) d.offset[size_t(e + 1)] += d.offset[size_t(e)];
  d.slot.resize(experts.size()), d.token.resize(experts.size());
  std::vector<int64_t> next(d.offset.begin(), d.offset.end() - 1);
  for (size_t i = 0; i < experts.size(); ++i) {  // slots in token order within each expert
    const int64_t row = next[size_t(experts[i])]++;
    d.slot[size_t(row)] = int64_t(i);
    d.token[size_t(row)] = int64_t(i) / k;
  }
  return d;
}

template <typename T>
double moe_forward(const ModelConfig& c, const MoeWeights& w, const T* x, int64_t n, Arena& arena, T* out,
                   const LinearGemm& lin, MoeRecord<T>* record, const BalanceLoss& balance, Routing<T>* routing) {
  const int64_t E = c.n_routed_experts, k = c.num_experts_per_tok, dim = c.hidden_size;
  ArenaScope scope(arena);
  // 1. route
  Routing<T> local;
  Routing<T>& r = record ? record->routing : routing ? *routing : local;
  route_tokens(c, w, x, n, r);
  // 2. dispatch: the slots grouped by expert, their tokens' rows gathered [n*k, dim]
  Dispatch local_d;
  Dispatch& d = record ? record->dispatch : local_d;
  d = dispatch(r.experts, E, k);
  T* xe = arena.alloc<T>(size_t(n * k * dim));
  gather_rows(x, dim, d.token.data(), static_cast<const T*>(nullptr), n * k, dim, xe, dim);
  // 3. experts: each active one on its rows, the shared ones on every token
  T* ye = record ? sized(record->ye, n * k * dim) : arena.alloc<T>(size_t(n * k * dim));
  if (record) record->expert.assign(size_t(E), {});
  std::vector<SwigluJob<T>> jobs;
  if (c.n_shared_experts > 0) jobs.push_back({&w.shared_experts, x, n, out, record ? &record->shared : nullptr});
  for (int64_t e = 0; e < E; ++e)
    if (d.rows(e) > 0)
      jobs.push_back({&w.experts[size_t(e)], xe + d.offset[size_t(e)] * dim, d.rows(e), ye + d.offset[size_t(e)] * dim,
                      record ? &record->expert[size_t(e)] : nullptr});
  swiglu_mlps(jobs, arena, lin, lin.moe_swiglu_input_format());
  // 4. combine: out[t] = shared(u) + sum_j g_j expert_j(u), in the grouped order
  if (c.n_shared_experts == 0) std::fill(out, out + n * dim, T(0));
  T* g = arena.alloc<T>(size_t(n * k));
  gather_rows(r.weights.data(), 1, d.slot.data(), static_cast<const T*>(nullptr), n * k, 1, g, 1);
  scatter_add_rows(ye, d.token.data(), g, n * k, dim, out);
  return record ? balance_statistics(c, n, balance, *record) : 0.0;
}

template <typename T>
void moe_backward(const ModelConfig& c, const MoeWeights& w, const T* x, int64_t N, const MoeRecord<T>& a,
                  const T* dout, MoeWeights& g, T* dx, Arena& arena, const LinearGemm& lin) {
  const int64_t E = c.n_routed_experts, k = c.num_experts_per_tok, dim = c.hidden_size;
  ArenaScope scope(arena);
  const Dispatch& d = a.dispatch;
  if (c.n_shared_experts > 0) mlp_backward(w.shared_experts, x, N, a.shared, dout, g.shared_experts, dx, arena, lin);

  // combine, backwards: d(expert out) = g_j dout[t];  d(g_j) = dout[t] . expert out
  T* gw = arena.alloc<T>(size_t(N * k));
  gather_rows(a.routing.weights.data(), 1, d.slot.data(), static_cast<const T*>(nullptr), N * k, 1, gw, 1);
  T* dye = arena.alloc<T>(size_t(N * k * dim));
  gather_rows(dout, dim, d.token.data(), gw, N * k, dim, dye, dim);
  T* dg = arena.alloc<T>(size_t(N * k));  // grouped order
  row_dots(dout, d.token.data(), a.ye.data(), N * k, dim, dg);
  std::vector<T> dweight(static_cast<size_t>(N * k), T(0));  // slot order
  for (int64_t row = 0; row < N * k; ++row) dweight[size_t(d.slot[size_t(row)])] = dg[row];
  // experts, backwards, on their gathered inputs; dispatch, backwards: their input
  // gradients summed into their tokens' rows
  T* xe = arena.alloc<T>(size_t(N * k * dim));
  gather_rows(x, dim, d.token.data(), static_cast<const T*>(nullptr), N * k, dim, xe, dim);
  T* dxe = arena.alloc<T>(size_t(N * k * dim));
  std::fill(dxe, dxe + N * k * dim, T(0));
  for (int64_t e = 0; e < E; ++e) {
    if (d.rows(e) == 0) continue;
    const int64_t off = d.offset[size_t(e)] * dim;
    mlp_backward(w.experts[size_t(e)], xe + off, d.rows(e), a.expert[size_t(e)], dye + off, g.experts[size_t(e)],
                 dxe + off, arena, lin);
  }
  scatter_add_rows(dxe, d.token.data(), static_cast<const T*>(nullptr), N * k, dim, dx);

  // route, backwards. Gate weights g_j = scale * s_j (/ sum of the chosen s if normalised),
  // s = score(logits).
  std::vector<T> dlogits(static_cast<size_t>(N * E), T(0)), s(static_cast<size_t>(E)), ds(static_cast<size_t>(E));
  const T scale = T(c.routed_scaling_factor);
  const bool normalised = c.norm_topk_prob && k > 1;
  for (int64_t t = 0; t < N; ++t) {
    router_scores(c, &a.routing.logits[size_t(t * E)], s.data());
    std::fill(ds.begin(), ds.end(), T(0));
    const int32_t* chosen = &a.routing.experts[size_t(t * k)];
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

#define DSV3_INSTANTIATE(T)                                                                                      \
  template struct MoeRecord<T>;                                                                                 \
  template void mlp_forward<T>(const MlpWeights&, const T*, int64_t, Arena&, T*, const LinearGemm&,             \
                               MlpRecord<T>*, SavedFormat);                                                      \
  template void mlp_backward<T>(const MlpWeights&, const T*, int64_t, const MlpRecord<T>&, const T*, MlpWeights&, \
                                T*, Arena&, const LinearGemm&);                                                  \
  template void route_tokens<T>(const ModelConfig&, const MoeWeights&, const T*, int64_t, Routing<T>&);          \
  template double moe_forward<T>(const ModelConfig&, const MoeWeights&, const T*, int64_t, Arena&, T*,           \
                                 const LinearGemm&, MoeRecord<T>*, const BalanceLoss&, Routing<T>*);             \
  template void moe_backward<T>(const ModelConfig&, const MoeWeights&, const T*, int64_t, const MoeRecord<T>&,   \
                                const T*, MoeWeights&, T*, Arena&, const LinearGemm&);
DSV3_INSTANTIATE(float)
DSV3_INSTANTIATE(double)

}  // namespace dsv3
