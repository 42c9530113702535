// Dense MLP and DeepSeekMoE, forward and backward (see moe.h). Tokens are grouped by expert
// so that each expert's weights are read once per pass, whatever the number of tokens, and
// the active experts (with the shared ones) run as grouped products.
#include "model/moe.h"

#include <algorithm>
#include <type_traits>

#include "core/error.h"
#include "model/router.h"

namespace dsv3 {

namespace {

template <typename T>
T* sized(std::vector<T>& v, int64_t n) {
  v.resize(size_t(n));
  return v.data();
}

// One SwiGLU MLP of a grouped pass: its weights, its m input rows, its SwiGLU inputs
// a = gate(x) and b = up(x) [m, inter] (a becomes silu(a) * b) and its output rows.
template <typename T>
struct SwigluJob {
  const MlpWeights* w;
  const T* x;
  int64_t m;
  T* a;
  T* b;
  T* out;
};

// a = gate(x), b = up(x) for every job, as one grouped pass. products: room for 2 * count
// (taken by the caller, so that the arena's use does not depend on how many experts are active).
template <typename T>
void swiglu_inputs(const SwigluJob<T>* jobs, size_t count, LinearGemm::Job<T>* products, const LinearGemm& lin) {
  for (size_t i = 0; i < count; ++i) {
    products[2 * i] = {jobs[i].x, jobs[i].m, jobs[i].w->gate_proj, jobs[i].a};
    products[2 * i + 1] = {jobs[i].x, jobs[i].m, jobs[i].w->up_proj, jobs[i].b};
  }
  lin.forward_batch(products, 2 * count);
}

// out = down(silu(a) * b) for every job, as one grouped pass (a overwritten by silu(a) * b).
// products: room for count.
template <typename T>
void swiglu_outputs(const SwigluJob<T>* jobs, size_t count, LinearGemm::Job<T>* products, const LinearGemm& lin) {
  for (size_t i = 0; i < count; ++i) {
    const int64_t size = jobs[i].m * jobs[i].w->gate_proj.rows;
    swiglu_forward(jobs[i].a, jobs[i].b, jobs[i].a, size);
    products[i] = {jobs[i].a, jobs[i].m, jobs[i].w->down_proj, jobs[i].out};
  }
  lin.forward_batch(products, count);
}

// The backward of one SwiGLU MLP from its saved inputs a, b [m, inter]: weight gradients
// accumulated into g, the input gradient accumulated into dx. work: 4 * m * inter values of
// scratch (the MoE hands each expert its slice of one buffer over the grouped rows).
template <typename T>
void swiglu_mlp_backward(const MlpWeights& w, const T* x, int64_t m, const T* a, const T* b, const T* dout,
                         MlpWeights& g, T* dx, T* work, const LinearGemm& lin) {
  const int64_t inter = w.gate_proj.rows, dim = w.gate_proj.cols;
  T* h = work;
  T* dh = h + m * inter;
  T* da = dh + m * inter;
  T* db = da + m * inter;
  swiglu_forward(a, b, h, m * inter);  // recomputed from the saved inputs
  lin.dw(dout, h, mutable_data<T>(g.down_proj), m, inter, dim);
  lin.dx(dout, w.down_proj.as<T>(), dh, m, inter, dim, false);
  swiglu_backward(dh, a, b, da, db, m * inter);
  lin.dw(da, x, mutable_data<T>(g.gate_proj), m, dim, inter);
  lin.dw(db, x, mutable_data<T>(g.up_proj), m, dim, inter);
  lin.dx(da, w.gate_proj.as<T>(), dx, m, dim, inter, true);
  lin.dx(db, w.up_proj.as<T>(), dx, m, dim, inter, true);
}

// Loads and the balance loss's factors of a recorded forward; returns the loss.
template <typename T>
double balance_statistics(const ModelConfig& c, int64_t N, const BalanceLoss& balance, MoeRecord<T>& a, Arena& arena) {
  const int64_t E = c.n_routed_experts, k = c.num_experts_per_tok;
  // Sequences of S tokens, of which the first T count (the rest: MTP placeholders, and
  // padding after a sequence's real positions).
  const int64_t S = balance.seq_len > 0 ? balance.seq_len : N;
  const int64_t tail_free = S - balance.ignored_tail, n_seq = S > 0 ? N / S : 0;
  if (N <= 0 || N % S != 0 || tail_free <= 0 || balance.ignored_tail < 0)
    fail("MoE loads and balance loss: ", N, " tokens are not whole sequences of ", S, " with ", balance.ignored_tail,
         " placeholders each");
  a.balance = balance;
  a.balance.lengths = nullptr;  // not kept: `counted` says it
  a.counted.resize(size_t(n_seq));
  int64_t sequences = 0;  // with at least one counted position
  for (int64_t b = 0; b < n_seq; ++b) {
    // A padded sequence's last real positions read padding at an MTP depth (their next
    // tokens are past its end): the tail comes off its length as off a whole window.
    a.counted[size_t(b)] = std::clamp<int64_t>((balance.lengths ? balance.lengths[b] : S) - balance.ignored_tail, 0, tail_free);
    sequences += a.counted[size_t(b)] > 0;
  }
  a.load.assign(size_t(E), 0);
  const std::vector<int32_t>& experts = a.state.routing.experts;
  for (int64_t t = 0; t < N; ++t)
    if (t % S < a.counted[size_t(t / S)])
      for (int64_t j = 0; j < k; ++j) ++a.load[size_t(experts[size_t(t * k + j)])];
  a.balance_f.clear();
  if (balance.alpha <= 0 || sequences == 0) return 0;
  a.balance_f.assign(size_t(n_seq * E), T(0));
  ArenaScope scope(arena);
  T* s = arena.alloc<T>(size_t(E));
  double* P = arena.alloc<double>(size_t(E));
  double* count = arena.alloc<double>(size_t(E));
  double loss = 0;
  for (int64_t b = 0; b < n_seq; ++b) {
    const int64_t counted = a.counted[size_t(b)];
    if (counted == 0) continue;
    T* f = &a.balance_f[size_t(b * E)];
    std::fill(P, P + E, 0.0), std::fill(count, count + E, 0.0);
    for (int64_t t = b * S; t < b * S + counted; ++t) {
      router_scores(c, &a.state.routing.logits[size_t(t * E)], s);
      double sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += double(s[e]);
      for (int64_t e = 0; e < E; ++e) P[e] += double(s[e]) / sum / double(counted);
      for (int64_t j = 0; j < k; ++j) count[experts[size_t(t * k + j)]] += 1;
    }
    for (int64_t e = 0; e < E; ++e) {
      const double fi = double(E) / double(k * counted) * count[e];
      loss += balance.alpha * fi * P[e] / double(sequences);
      f[e] = T(balance.alpha * fi / double(counted * sequences));  // d loss / d s'_{e,t}
    }
  }
  return loss;
}

}  // namespace

template <typename T>
int64_t MoeRecord<T>::bytes() const {
  const Routing<T>& r = state.routing;
  const Dispatch& d = state.dispatch;
  return int64_t((r.logits.size() + r.weights.size() + ye.size() + balance_f.size()) * sizeof(T) +
                 r.experts.size() * sizeof(int32_t) +
                 (d.offset.size() + d.slot.size() + d.token.size() + load.size() + counted.size() + route.send.size() +
                  route.recv.size() + route.to_expert.size() + route.to_source.size() + route.offset.size() +
                  route.source_start.size()) * sizeof(int64_t)) +
         expert_a.bytes() + expert_b.bytes() + shared.bytes();
}

template <typename T>
void mlp_forward(const MlpWeights& w, const T* x, int64_t m, Arena& arena, T* out, const LinearGemm& lin,
                 MlpRecord<T>* record, SavedFormat saved) {
  ArenaScope scope(arena);
  const int64_t inter = w.gate_proj.rows;
  const SwigluJob<T> job{&w, x, m, arena.alloc<T>(size_t(m * inter)), arena.alloc<T>(size_t(m * inter)), out};
  auto* products = arena.alloc_objects<LinearGemm::Job<T>>(2);
  swiglu_inputs(&job, 1, products, lin);
  if (record) record->a.save(job.a, m, inter, saved), record->b.save(job.b, m, inter, saved);
  swiglu_outputs(&job, 1, products, lin);
}

template <typename T>
void mlp_backward(const MlpWeights& w, const T* x, int64_t m, const MlpRecord<T>& act, const T* dout, MlpWeights& g,
                  T* dx, Arena& arena, const LinearGemm& lin) {
  ArenaScope scope(arena);
  const T* a = act.a.read(arena);
  const T* b = act.b.read(arena);
  swiglu_mlp_backward(w, x, m, a, b, dout, g, dx, arena.alloc<T>(size_t(4 * m * w.gate_proj.rows)), lin);
}

template <typename T>
void route_tokens(const ModelConfig& c, const MoeWeights& w, const T* x, int64_t n, Routing<T>& r, Arena& arena) {
  const int64_t E = c.n_routed_experts, k = c.num_experts_per_tok;
  // The gate stays in full precision whatever the experts' GEMMs use (§3.3).
  LinearGemm{}.forward(x, w.gate, sized(r.logits, n * E), n);
  route(c, r.logits.data(), n, w.e_score_correction_bias.data ? w.e_score_correction_bias.as<T>() : nullptr,
        sized(r.experts, n * k), sized(r.weights, n * k), arena);
}

void dispatch(const std::vector<int32_t>& experts, int64_t n_experts, int64_t k, Dispatch& d) {
  // A counting sort: offset[e + 1] counts expert e's slots, then offset[e] is where its rows
  // start; placing a slot advances offset[e], after which offset[e] is where e + 1 starts,
  // so one shift restores the starts.
  d.offset.assign(size_t(n_experts + 1), 0);
  for (int32_t e : experts) ++d.offset[size_t(e) + 1];
  for (int64_t e = 0; e < n_experts; ++e) d.offset[size_t(e + 1)] += d.offset[size_t(e)];
  d.slot.resize(experts.size()), d.token.resize(experts.size());
  for (size_t i = 0; i < experts.size(); ++i) {  // slots in token order within each expert
    const int64_t row = d.offset[size_t(experts[i])]++;
    d.slot[size_t(row)] = int64_t(i);
    d.token[size_t(row)] = int64_t(i) / k;
  }
  for (int64_t e = n_experts; e > 0; --e) d.offset[size_t(e)] = d.offset[size_t(e - 1)];
  d.offset[0] = 0;
}

void order_by_expert(ExpertRoute& route, int64_t processes, int64_t here) {
  const int64_t P = processes, H = here;
  if (int64_t(route.recv.size()) != P * H) fail("expert exchange: ", route.recv.size(), " counts for ", P, " x ", H);
  std::vector<int64_t>& source_start = route.source_start;
  source_start.resize(size_t(P * H));
  int64_t at = 0;
  for (int64_t q = 0; q < P * H; ++q) source_start[size_t(q)] = at, at += route.recv[size_t(q)];
  route.to_expert.clear();
  route.offset.assign(size_t(H + 1), 0);
  for (int64_t e = 0; e < H; ++e) {
    route.offset[size_t(e)] = int64_t(route.to_expert.size());
    for (int64_t p = 0; p < P; ++p)
      for (int64_t r = 0; r < route.recv[size_t(p * H + e)]; ++r) route.to_expert.push_back(source_start[size_t(p * H + e)] + r);
  }
  route.offset[size_t(H)] = int64_t(route.to_expert.size());
  route.to_source.resize(route.to_expert.size());
  for (size_t i = 0; i < route.to_expert.size(); ++i) route.to_source[size_t(route.to_expert[i])] = int64_t(i);
}

namespace {

// The rows [n, width] of `rows` sent to their experts' processes and regrouped expert-major
// (float only: the exchange's type).
template <typename T>
T* exchange_to_experts(ExpertExchange& ex, const ExpertRoute& route, const T* rows, int64_t width, Arena& arena) {
  const int64_t m = route.received();
  T* source_major = arena.alloc<T>(size_t(m * width));
  T* expert_major = arena.alloc<T>(size_t(m * width));
  if constexpr (std::is_same_v<T, float>) ex.to_experts(route, rows, width, source_major);
  else fail("expert parallelism runs in float");
  gather_rows(source_major, width, route.to_expert.data(), static_cast<const T*>(nullptr), m, width, expert_major, width);
  return expert_major;
}

// The reverse: expert-major rows [received, width] back to the local grouped order in `back`.
template <typename T>
void exchange_to_tokens(ExpertExchange& ex, const ExpertRoute& route, const T* rows, int64_t width, T* back, Arena& arena) {
  const int64_t m = route.received();
  T* source_major = arena.alloc<T>(size_t(m * width));
  gather_rows(rows, width, route.to_source.data(), static_cast<const T*>(nullptr), m, width, source_major, width);
  if constexpr (std::is_same_v<T, float>) ex.to_tokens(route, source_major, width, back);
  else fail("expert parallelism runs in float");
}

}  // namespace

template <typename T>
double moe_forward(const ModelConfig& c, const MoeWeights& w, const T* x, int64_t n, Arena& arena, T* out,
                   const LinearGemm& lin, MoeRecord<T>* record, const BalanceLoss& balance, MoeState<T>* state,
                   ExpertExchange* ex) {
  const int64_t E = c.n_routed_experts, k = c.num_experts_per_tok, dim = c.hidden_size;
  const int64_t inter = c.moe_intermediate_size, shared_inter = c.n_shared_experts * inter;
  ArenaScope scope(arena);
  MoeState<T> local;
  MoeState<T>& st = record ? record->state : state ? *state : local;
  // 1. route
  route_tokens(c, w, x, n, st.routing, arena);
  // 2. dispatch: the slots grouped by expert, their tokens' rows gathered [n*k, dim]
  const Dispatch& d = st.dispatch;
  dispatch(st.routing.experts, E, k, st.dispatch);
  T* xe = arena.alloc<T>(size_t(n * k * dim));
  gather_rows(x, dim, d.token.data(), static_cast<const T*>(nullptr), n * k, dim, xe, dim);
  T* ye = record ? sized(record->ye, n * k * dim) : arena.alloc<T>(size_t(n * k * dim));
  // Under expert parallelism the rows go to their experts' processes (§3.2.2): the experts
  // here then run on every process's rows for them, expert-major.
  ExpertRoute local_route;
  ExpertRoute& route = record ? record->route : local_route;
  int64_t first = 0, here = E, m = n * k;  // the experts computed here and their rows
  const T* xm = xe;
  T* ym = ye;
  const std::vector<int64_t>* offset = &d.offset;
  if (ex) {
    ex->plan(d, route);
    order_by_expert(route, ex->processes(), ex->experts_here());
    first = ex->first_expert(), here = ex->experts_here(), m = route.received(), offset = &route.offset;
    xm = exchange_to_experts(*ex, route, xe, dim, arena);
    ym = arena.alloc<T>(size_t(m * dim));
  }
  // 3. experts: each active one on its rows, the shared ones on every token; the routed
  // experts' SwiGLU inputs in one grouped buffer
  T* ae = arena.alloc<T>(size_t(m * inter));
  T* be = arena.alloc<T>(size_t(m * inter));
  auto* jobs = arena.alloc_objects<SwigluJob<T>>(size_t(here + 1));
  size_t count = 0;
  if (c.n_shared_experts > 0)
    jobs[count++] = {&w.shared_experts, x, n, arena.alloc<T>(size_t(n * shared_inter)),
                     arena.alloc<T>(size_t(n * shared_inter)), out};
  for (int64_t e = 0; e < here; ++e) {
    const int64_t row = (*offset)[size_t(e)], rows = (*offset)[size_t(e + 1)] - row;
    if (rows > 0) jobs[count++] = {&w.experts[size_t(first + e)], xm + row * dim, rows, ae + row * inter, be + row * inter, ym + row * dim};
  }
  auto* products = arena.alloc_objects<LinearGemm::Job<T>>(size_t(2 * (here + 1)));
  swiglu_inputs(jobs, count, products, lin);
  if (record) {
    const SavedFormat saved = lin.moe_swiglu_input_format();
    record->expert_a.save(ae, m, inter, saved), record->expert_b.save(be, m, inter, saved);
    if (c.n_shared_experts > 0) record->shared.a.save(jobs[0].a, n, shared_inter, saved),
                                record->shared.b.save(jobs[0].b, n, shared_inter, saved);
  }
  swiglu_outputs(jobs, count, products, lin);
  if (ex) exchange_to_tokens(*ex, route, ym, dim, ye, arena);  // the outputs back to their tokens' processes
  // 4. combine: out[t] = shared(u) + sum_j g_j expert_j(u), in the grouped order
  if (c.n_shared_experts == 0) std::fill(out, out + n * dim, T(0));
  T* g = arena.alloc<T>(size_t(n * k));
  gather_rows(st.routing.weights.data(), 1, d.slot.data(), static_cast<const T*>(nullptr), n * k, 1, g, 1);
  scatter_add_rows(ye, d.token.data(), g, n * k, dim, out);
  return record ? balance_statistics(c, n, balance, *record, arena) : 0.0;
}

template <typename T>
void moe_backward(const ModelConfig& c, const MoeWeights& w, const T* x, int64_t N, const MoeRecord<T>& a,
                  const T* dout, MoeWeights& g, T* dx, Arena& arena, const LinearGemm& lin, ExpertExchange* ex) {
  const int64_t E = c.n_routed_experts, k = c.num_experts_per_tok, dim = c.hidden_size;
  const int64_t inter = c.moe_intermediate_size;
  ArenaScope scope(arena);
  const Dispatch& d = a.state.dispatch;
  const Routing<T>& r = a.state.routing;
  if (c.n_shared_experts > 0) mlp_backward(w.shared_experts, x, N, a.shared, dout, g.shared_experts, dx, arena, lin);

  // combine, backwards: d(expert out) = g_j dout[t];  d(g_j) = dout[t] . expert out
  T* gw = arena.alloc<T>(size_t(N * k));
  gather_rows(r.weights.data(), 1, d.slot.data(), static_cast<const T*>(nullptr), N * k, 1, gw, 1);
  T* dye = arena.alloc<T>(size_t(N * k * dim));
  gather_rows(dout, dim, d.token.data(), gw, N * k, dim, dye, dim);
  T* dg = arena.alloc<T>(size_t(N * k));  // grouped order
  row_dots(dout, d.token.data(), a.ye.data(), N * k, dim, dg);
  T* dweight = arena.alloc<T>(size_t(N * k));  // slot order
  for (int64_t row = 0; row < N * k; ++row) dweight[d.slot[size_t(row)]] = dg[row];
  // experts, backwards, on their gathered inputs; dispatch, backwards: their input
  // gradients summed into their tokens' rows
  T* xe = arena.alloc<T>(size_t(N * k * dim));
  gather_rows(x, dim, d.token.data(), static_cast<const T*>(nullptr), N * k, dim, xe, dim);
  T* dxe = arena.alloc<T>(size_t(N * k * dim));
  // Under expert parallelism the output gradients and the inputs travel to the experts'
  // processes again (the inputs are not kept: as in the forward's exchange), and the input
  // gradients come back.
  int64_t first = 0, here = E, m = N * k;
  const T* xm = xe;
  const T* dym = dye;
  T* dxm = dxe;
  const std::vector<int64_t>* offset = &d.offset;
  if (ex) {
    first = ex->first_expert(), here = ex->experts_here(), m = a.route.received(), offset = &a.route.offset;
    dym = exchange_to_experts(*ex, a.route, dye, dim, arena);
    xm = exchange_to_experts(*ex, a.route, xe, dim, arena);
    dxm = arena.alloc<T>(size_t(m * dim));
  }
  std::fill(dxm, dxm + m * dim, T(0));
  const T* ae = a.expert_a.read(arena);
  const T* be = a.expert_b.read(arena);
  T* work = arena.alloc<T>(size_t(4 * m * inter));  // every expert's scratch, by grouped rows
  for (int64_t e = 0; e < here; ++e) {
    const int64_t row = (*offset)[size_t(e)], rows = (*offset)[size_t(e + 1)] - row;
    if (rows == 0) continue;
    swiglu_mlp_backward(w.experts[size_t(first + e)], xm + row * dim, rows, ae + row * inter, be + row * inter,
                        dym + row * dim, g.experts[size_t(first + e)], dxm + row * dim, work + 4 * row * inter, lin);
  }
  if (ex) exchange_to_tokens(*ex, a.route, dxm, dim, dxe, arena);
  scatter_add_rows(dxe, d.token.data(), static_cast<const T*>(nullptr), N * k, dim, dx);

  // route, backwards. Gate weights g_j = scale * s_j (/ sum of the chosen s if normalised),
  // s = score(logits).
  T* dlogits = arena.alloc<T>(size_t(N * E));
  T* s = arena.alloc<T>(size_t(E));
  T* ds = arena.alloc<T>(size_t(E));
  const T scale = T(c.routed_scaling_factor);
  const bool normalised = c.norm_topk_prob && k > 1;
  for (int64_t t = 0; t < N; ++t) {
    router_scores(c, &r.logits[size_t(t * E)], s);
    std::fill(ds, ds + E, T(0));
    const int32_t* chosen = &r.experts[size_t(t * k)];
    const T* dw = dweight + t * k;
    T sum = 0, dot = 0;
    for (int64_t j = 0; j < k; ++j) sum += s[chosen[j]], dot += dw[j] * s[chosen[j]];
    for (int64_t j = 0; j < k; ++j)  // d g_j / d s_m = scale (delta_jm / sum - s_j / sum^2)
      ds[chosen[j]] += normalised ? scale * (dw[j] / sum - dot / (sum * sum)) : scale * dw[j];
    const int64_t S = a.balance.seq_len > 0 ? a.balance.seq_len : N;
    if (!a.balance_f.empty() && t % S < a.counted[size_t(t / S)]) {
      // balance loss: s' = s / sum(s);  d/ds_m = (g_m - sum_i g_i s'_i) / sum(s)
      const T* gb = &a.balance_f[size_t((t / S) * E)];
      T all = 0, gs = 0;
      for (int64_t e = 0; e < E; ++e) all += s[e];
      for (int64_t e = 0; e < E; ++e) gs += gb[e] * s[e] / all;
      for (int64_t e = 0; e < E; ++e) ds[e] += (gb[e] - gs) / all;
    }
    T* dl = dlogits + t * E;
    if (c.scoring_func == ScoreFunc::sigmoid) {
      for (int64_t e = 0; e < E; ++e) dl[e] = ds[e] * s[e] * (T(1) - s[e]);
    } else {
      softmax_backward(s, ds, dl, E);
    }
  }
  matmul_dw(dlogits, x, mutable_data<T>(g.gate), N, dim, E);
  matmul_dx(dlogits, w.gate.as<T>(), dx, N, dim, E, true);
}

#define DSV3_INSTANTIATE(T)                                                                                      \
  template struct MoeRecord<T>;                                                                                 \
  template void mlp_forward<T>(const MlpWeights&, const T*, int64_t, Arena&, T*, const LinearGemm&,             \
                               MlpRecord<T>*, SavedFormat);                                                      \
  template void mlp_backward<T>(const MlpWeights&, const T*, int64_t, const MlpRecord<T>&, const T*, MlpWeights&, \
                                T*, Arena&, const LinearGemm&);                                                  \
  template void route_tokens<T>(const ModelConfig&, const MoeWeights&, const T*, int64_t, Routing<T>&, Arena&);  \
  template double moe_forward<T>(const ModelConfig&, const MoeWeights&, const T*, int64_t, Arena&, T*,           \
                                 const LinearGemm&, MoeRecord<T>*, const BalanceLoss&, MoeState<T>*,              \
                                 ExpertExchange*);                                                                 \
  template void moe_backward<T>(const ModelConfig&, const MoeWeights&, const T*, int64_t, const MoeRecord<T>&,   \
                                const T*, MoeWeights&, T*, Arena&, const LinearGemm&, ExpertExchange*);
DSV3_INSTANTIATE(float)
DSV3_INSTANTIATE(double)

}  // namespace dsv3
