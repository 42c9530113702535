// MLA forward and backward (see mla.h). Shapes: H heads, D = qk_nope_head_dim,
// R = qk_rope_head_dim, V = v_head_dim, C = kv_lora_rank, Lq = q_lora_rank. Per head h, rows
// h*(D+V) .. h*(D+V)+D of kv_b_proj are W_uk (D x C) and the next V rows are W_uv (V x C).
// The attention core (scores = q_nope k_nope^T + q_pe k_pe^T, causal softmax, o = P v) is
// the backend's attention op; the two forms are two views of it.
#include "model/mla.h"

#include <algorithm>
#include <type_traits>

#include "backend/attention.h"
#include "core/error.h"

namespace dsv3 {

namespace {

struct Dims {
  int64_t H, D, R, V, C, Lq, QK, dim;
  explicit Dims(const ModelConfig& c)
      : H(c.num_attention_heads), D(c.qk_nope_head_dim), R(c.qk_rope_head_dim), V(c.v_head_dim), C(c.kv_lora_rank),
        Lq(c.q_lora_rank), QK(c.qk_nope_head_dim + c.qk_rope_head_dim), dim(c.hidden_size) {}
};

template <typename T>
const T* W(const Mat& m) {
  return m.as<T>();
}
template <typename T>
T* G(const Mat& m) {
  return mutable_data<T>(m);
}
template <typename T>
T* sized(std::vector<T>& v, int64_t n) {
  v.resize(size_t(n));
  return v.data();
}
template <typename T>
T* zeros(Arena& arena, int64_t n) {
  T* p = arena.alloc<T>(size_t(n));
  std::fill(p, p + n, T(0));
  return p;
}

// The key rows each query sees: its sequence's rows from position 0 to its own, as offsets
// from `lo` (the first key row the pass reads), so every key view can start there.
struct KeyRanges {
  int64_t lo = 0, hi = 0;  // key rows [lo, hi)
  int64_t* first = nullptr;
  int64_t* count = nullptr;
};
KeyRanges key_ranges(const TokenRows& tokens, Arena& arena) {
  const int64_t n = tokens.size();
  KeyRanges k;
  k.first = arena.alloc<int64_t>(size_t(n)), k.count = arena.alloc<int64_t>(size_t(n));
  k.lo = tokens.first_row(0), k.hi = 0;
  for (int64_t t = 0; t < n; ++t) {
    k.lo = std::min(k.lo, tokens.first_row(t));
    k.hi = std::max(k.hi, tokens.row[size_t(t)] + 1);
  }
  for (int64_t t = 0; t < n; ++t) k.first[t] = tokens.first_row(t) - k.lo, k.count[t] = tokens.pos[size_t(t)] + 1;
  return k;
}

// The queries, with RoPE on each head's last R values: q = W_uq norm(c_q) with the low-rank
// path (c_q given), else q = W_q x, unless the caller already computed it (q_projected).
// [n, H*QK]
template <typename T>
void queries(const MlaContext& ctx, const MlaWeights& w, const T* x, const T* cq, int64_t n, T* q, T* cq_norm,
             T* cq_inv, bool q_projected) {
  const Dims d(ctx.config);
  if (d.Lq > 0) {
    rmsnorm_forward(cq, W<T>(w.q_a_layernorm), cq_norm, cq_inv, n, d.Lq, ctx.config.rms_norm_eps);
    ctx.lin.forward(cq_norm, w.q_b_proj, q, n);
  } else if (!q_projected) {
    ctx.lin.forward(x, w.q_proj, q, n);
  }
  rope_rotate(q + d.D, n, d.H * d.QK, d.H, d.QK, d.R, ctx.angles.cos.data(), ctx.angles.sin.data(), false);
}

// The naive form's views: k_nope and v from kvb = W_ukv(latent) [rows, H*(D+V)], the shared
// k_pe, with key rows counted from the views' starts.
template <typename T>
AttentionArgs<T> naive_args(const Dims& d, const T* q, const T* kvb, const T* k_pe, const KeyRanges& k, int64_t n,
                            double scale) {
  AttentionArgs<T> a;
  a.n = n, a.heads = d.H;
  a.q1 = {q, d.H * d.QK, d.QK, d.D};
  a.q2 = {q + d.D, d.H * d.QK, d.QK, d.R};
  a.k1 = {kvb, d.H * (d.D + d.V), d.D + d.V, d.D};
  a.k2 = {k_pe, d.R, 0, d.R};
  a.v = {kvb + d.D, d.H * (d.D + d.V), d.D + d.V, d.V};
  a.key_first = k.first, a.key_count = k.count, a.scale = scale;
  return a;
}

template <typename T>
AttnForm form_for(AttnForm form, const ModelConfig& c, const KeyRanges& k, int64_t n) {
  if (form != AttnForm::automatic) return form;
  if constexpr (!std::is_same_v<T, float>) return AttnForm::naive;  // absorbed runs in float only
  double pairs = 0;
  for (int64_t t = 0; t < n; ++t) pairs += double(k.count[t]);
  return cheaper_attn_form(c, n, k.hi - k.lo, pairs);
}

// Attention in the latent space (absorbed form): q_lat[t, h] = W_uk_h^T q_nope[t, h] (C
// values) scores against the latents directly, o_lat = P c_kv, and o[t, h] = W_uv_h o_lat[t, h].
void absorbed_attention(const Dims& d, const MlaWeights& w, const float* q, const float* latent, const float* k_pe,
                        const KeyRanges& k, int64_t n, double scale, Arena& arena, float* o) {
  float* q_lat = arena.alloc(size_t(n * d.H * d.C));
  float* o_lat = arena.alloc(size_t(n * d.H * d.C));
  auto* jobs = arena.alloc_objects<StridedLinearJob>(size_t(d.H));
  for (int64_t h = 0; h < d.H; ++h)
    jobs[size_t(h)] = {q + h * d.QK, d.H * d.QK, w.kv_b_proj.row_slice(h * (d.D + d.V), d.D), q_lat + h * d.C,
                       d.H * d.C, true};
  linear_strided_batch(jobs, size_t(d.H), n);
  // Every head attends to the same latents: the backend reads them once for all heads.
  AttentionArgs<float> a;
  a.n = n, a.heads = d.H;
  a.q1 = {q_lat, d.H * d.C, d.C, d.C};
  a.q2 = {q + d.D, d.H * d.QK, d.QK, d.R};
  a.k1 = {latent, d.C, 0, d.C};
  a.k2 = {k_pe, d.R, 0, d.R};
  a.v = {latent, d.C, 0, d.C};
  a.key_first = k.first, a.key_count = k.count, a.scale = scale;
  attention_forward(a, o_lat);
  for (int64_t h = 0; h < d.H; ++h)
    jobs[size_t(h)] = {o_lat + h * d.C, d.H * d.C, w.kv_b_proj.row_slice(h * (d.D + d.V) + d.D, d.V), o + h * d.V,
                       d.H * d.V, false};
  linear_strided_batch(jobs, size_t(d.H), n);
}

}  // namespace

// naive: every key row's k_nope and v expanded (keys x C x H x (D+V)), then each attended
// pair costs H x (D+R) for the score and H x V for the output; absorbed: each token's query
// taken into the latent space and its output out of it (n x H x C x (D+V)), each pair
// H x (C+R) and H x C.
AttnForm cheaper_attn_form(const ModelConfig& c, int64_t n, int64_t keys, double pairs) {
  const Dims d(c);
  const double H = double(d.H), rows = double(keys);
  const double naive = rows * d.C * H * (d.D + d.V) + pairs * H * (d.D + d.R + d.V);
  const double absorbed = double(n) * H * d.C * (d.D + d.V) + pairs * H * (2.0 * d.C + d.R);
  const double expanded_bytes = rows * H * (d.D + d.V) * sizeof(float);
  return naive < absorbed && expanded_bytes <= double(256 << 20) ? AttnForm::naive : AttnForm::absorbed;
}

template <typename T>
void mla_forward(const MlaContext& ctx, const MlaWeights& w, const T* x, const TokenRows& tokens, LayerCache<T> cache,
                 Arena& arena, T* out, MlaRecord<T>* record) {
  const ModelConfig& c = ctx.config;
  const Dims d(c);
  const int64_t n = tokens.size();
  if (n <= 0) fail("mla: no tokens");
  if (tokens.row.size() != tokens.pos.size())
    fail("mla: ", tokens.pos.size(), " positions but ", tokens.row.size(), " cache rows");
  for (int64_t t = 0; t < n; ++t)
    if (tokens.pos[size_t(t)] < 0 || (!cache.gather && tokens.first_row(t) < 0))
      fail("mla: token ", t, " at position ", tokens.pos[size_t(t)], " in cache row ", tokens.row[size_t(t)],
           " has no room for its sequence's earlier positions");
  if (cache.gather) {
    const KeyGather& g = *cache.gather;
    if (g.keys.size() != n) fail("mla: key rows given for ", g.keys.size(), " tokens, not ", n);
    const int64_t G = int64_t(g.rows.size());
    for (int64_t t = 0; t < n; ++t)
      if (g.keys.pos[size_t(t)] != tokens.pos[size_t(t)] || g.keys.first_row(t) < 0 || g.keys.row[size_t(t)] >= G)
        fail("mla: token ", t, "'s gathered keys do not match its position ", tokens.pos[size_t(t)]);
    for (int64_t r : g.rows)
      if (r < 0) fail("mla: gathered key row ", r, " is negative");
  }
  if (ctx.angles.cos.size() < size_t(n * d.R / 2) || ctx.angles.sin.size() < size_t(n * d.R / 2))
    fail("mla: RoPE angles for ", ctx.angles.cos.size() / size_t(std::max<int64_t>(d.R / 2, 1)), " tokens, not ", n);
  if (record && (ctx.form != AttnForm::naive || !cache.empty()))
    fail("mla: a forward recorded for the backward runs in the naive form over its own rows");
  ArenaScope scope(arena);
  if (cache.empty()) {  // the pass's own rows hold its keys: token t is row t
    for (int64_t t = 0; t < n; ++t)
      if (tokens.row[size_t(t)] != t || tokens.first_row(t) < 0)
        fail("mla: token ", t, " is not row ", t, " of a pass that attends within itself");
    cache.latent = arena.alloc<T>(size_t(n * d.C));
    cache.k_pe = record ? sized(record->k_pe, n * d.R) : arena.alloc<T>(size_t(n * d.R));
  }

  // The down-projections, which read the same x: c_q = W_dq x and [c_kv ; k_pe] = W_dkv x.
  T* q = arena.alloc<T>(size_t(n * d.H * d.QK));
  T* kv = arena.alloc<T>(size_t(n * (d.C + d.R)));
  T* cq = nullptr;
  if (d.Lq > 0) cq = record ? sized(record->cq, n * d.Lq) : arena.alloc<T>(size_t(n * d.Lq));
  const LinearGemm::Job<T> down[2] = {{x, n, d.Lq > 0 ? w.q_a_proj : w.q_proj, d.Lq > 0 ? cq : q},
                                      {x, n, w.kv_a_proj_with_mqa, kv}};
  ctx.lin.forward_batch(down, 2);
  // Without the low-rank path the batch above already gave q = W_q x.
  queries(ctx, w, x, cq, n, q, arena.alloc<T>(size_t(n * std::max<int64_t>(d.Lq, 1))), arena.alloc<T>(size_t(n)),
          /*q_projected=*/true);

  // The cache keeps norm(c_kv) and rope(k_pe), at the tokens' rows.
  T* c_kv = record ? sized(record->c, n * d.C) : arena.alloc<T>(size_t(n * d.C));
  T* c_norm = arena.alloc<T>(size_t(n * d.C));
  copy_rows(kv, d.C + d.R, n, d.C, c_kv, d.C);
  rmsnorm_forward(c_kv, W<T>(w.kv_a_layernorm), c_norm, arena.alloc<T>(size_t(n)), n, d.C, c.rms_norm_eps);
  copy_rows(c_norm, d.C, n, d.C, cache.latent, d.C, tokens.row.data());
  rope_rotate(kv + d.C, n, d.C + d.R, 1, 0, d.R, ctx.angles.cos.data(), ctx.angles.sin.data(), false);
  copy_rows(kv + d.C, d.C + d.R, n, d.R, cache.k_pe, d.R, tokens.row.data());

  // A paged cache: every sequence's keys gathered into one range first.
  const T* latent_rows = cache.latent;
  const T* k_pe_rows = cache.k_pe;
  if (cache.gather) {
    const int64_t G = int64_t(cache.gather->rows.size());
    T* gl = arena.alloc<T>(size_t(G * d.C));
    T* gk = arena.alloc<T>(size_t(G * d.R));
    gather_rows(cache.latent, d.C, cache.gather->rows.data(), static_cast<const T*>(nullptr), G, d.C, gl, d.C);
    gather_rows(cache.k_pe, d.R, cache.gather->rows.data(), static_cast<const T*>(nullptr), G, d.R, gk, d.R);
    latent_rows = gl, k_pe_rows = gk;
  }
  const KeyRanges k = key_ranges(cache.gather ? cache.gather->keys : tokens, arena);
  const double scale = softmax_scale(c);
  const T* latent = latent_rows + k.lo * d.C;
  const T* k_pe = k_pe_rows + k.lo * d.R;
  T* o = arena.alloc<T>(size_t(n * d.H * d.V));  // attention output per head, [n, H*V]
  if (form_for<T>(ctx.form, c, k, n) == AttnForm::absorbed) {
    if constexpr (std::is_same_v<T, float>) absorbed_attention(d, w, q, latent, k_pe, k, n, scale, arena, o);
    else fail("mla: the absorbed form runs in float only");
  } else {
    // k_nope and v of every key row read, expanded from the latents.
    T* kvb = arena.alloc<T>(size_t((k.hi - k.lo) * d.H * (d.D + d.V)));
    ctx.lin.forward(latent, w.kv_b_proj, kvb, k.hi - k.lo);
    const AttentionArgs<T> a = naive_args(d, q, kvb, k_pe, k, n, scale);
    attention_forward(a, o, static_cast<T*>(nullptr), 0, record ? sized(record->lse, n * d.H) : nullptr);
  }
  ctx.lin.forward(o, w.o_proj, out, n);
  if (record) record->o.save(o, n, d.H * d.V, ctx.lin.attention_output_format());
}

template <typename T>
void mla_backward(const MlaContext& ctx, const MlaWeights& w, const T* x, const TokenRows& tokens,
                  const MlaRecord<T>& rec, const T* dout, MlaWeights& g, T* dx, Arena& arena) {
  const ModelConfig& c = ctx.config;
  const Dims d(c);
  const int64_t n = tokens.size();
  const double* cos = ctx.angles.cos.data();
  const double* sin = ctx.angles.sin.data();
  if (rec.c.size() != size_t(n * d.C) || rec.k_pe.size() != size_t(n * d.R) ||
      rec.cq.size() != size_t(n * d.Lq) || rec.lse.size() != size_t(n * d.H))
    fail("mla backward: the record is not of a forward over these ", n, " tokens");
  ArenaScope scope(arena);

  // Recomputed (§3.2.3): the queries, norm(c_kv) and its expansion to k_nope and v.
  T* q = arena.alloc<T>(size_t(n * d.H * d.QK));
  T* cq_norm = arena.alloc<T>(size_t(n * std::max<int64_t>(d.Lq, 1)));
  T* cq_inv = arena.alloc<T>(size_t(n));
  queries(ctx, w, x, rec.cq.data(), n, q, cq_norm, cq_inv, /*q_projected=*/false);
  T* c_norm = arena.alloc<T>(size_t(n * d.C));
  T* c_inv = arena.alloc<T>(size_t(n));
  rmsnorm_forward(rec.c.data(), W<T>(w.kv_a_layernorm), c_norm, c_inv, n, d.C, c.rms_norm_eps);
  const KeyRanges k = key_ranges(tokens, arena);  // the pass's own rows: token t is key row t, lo = 0
  T* kvb = arena.alloc<T>(size_t(n * d.H * (d.D + d.V)));
  ctx.lin.forward(c_norm, w.kv_b_proj, kvb, n);

  // out = o W_o^T
  T* d_o = arena.alloc<T>(size_t(n * d.H * d.V));
  ctx.lin.dw(dout, rec.o.read(arena), G<T>(g.o_proj), n, d.H * d.V, d.dim);
  ctx.lin.dx(dout, W<T>(w.o_proj), d_o, n, d.H * d.V, d.dim, false);

  // The attention core; the shared k_pe's gradient goes straight into [dc ; dk_pe].
  T* dq = zeros<T>(arena, n * d.H * d.QK);
  T* dkvb = zeros<T>(arena, n * d.H * (d.D + d.V));
  T* dkv = zeros<T>(arena, n * (d.C + d.R));
  const AttentionArgs<T> a = naive_args(d, q, kvb, rec.k_pe.data(), k, n, softmax_scale(c));
  AttentionGrads<T> ga;
  ga.q1 = {dq, d.H * d.QK, d.QK, d.D};
  ga.q2 = {dq + d.D, d.H * d.QK, d.QK, d.R};
  ga.k1 = {dkvb, d.H * (d.D + d.V), d.D + d.V, d.D};
  ga.k2 = {dkv + d.C, d.C + d.R, 0, d.R};
  ga.v = {dkvb + d.D, d.H * (d.D + d.V), d.D + d.V, d.V};
  attention_backward(a, static_cast<const T*>(nullptr), 0, d_o, ga, rec.lse.data());
  // RoPE is a rotation: its backward rotates the gradients back.
  rope_rotate(dq + d.D, n, d.H * d.QK, d.H, d.QK, d.R, cos, sin, true);
  rope_rotate(dkv + d.C, n, d.C + d.R, 1, 0, d.R, cos, sin, true);

  // [k_nope ; v] = W_ukv c_norm;  c_norm = kv_a_layernorm(c)
  T* dc_norm = arena.alloc<T>(size_t(n * d.C));
  T* dc = zeros<T>(arena, n * d.C);
  ctx.lin.dw(dkvb, c_norm, G<T>(g.kv_b_proj), n, d.C, d.H * (d.D + d.V));
  ctx.lin.dx(dkvb, W<T>(w.kv_b_proj), dc_norm, n, d.C, d.H * (d.D + d.V), false);
  rmsnorm_backward(dc_norm, rec.c.data(), W<T>(w.kv_a_layernorm), c_inv, dc, G<T>(g.kv_a_layernorm), n, d.C);
  copy_rows(dc, d.C, n, d.C, dkv, d.C + d.R);
  // [c ; k_pe] = W_dkv x
  ctx.lin.dw(dkv, x, G<T>(g.kv_a_proj_with_mqa), n, d.dim, d.C + d.R);
  ctx.lin.dx(dkv, W<T>(w.kv_a_proj_with_mqa), dx, n, d.dim, d.C + d.R, true);
  // q = W_uq norm(W_dq x)  or  W_q x
  if (d.Lq > 0) {
    T* dcq_norm = arena.alloc<T>(size_t(n * d.Lq));
    T* dcq = zeros<T>(arena, n * d.Lq);
    ctx.lin.dw(dq, cq_norm, G<T>(g.q_b_proj), n, d.Lq, d.H * d.QK);
    ctx.lin.dx(dq, W<T>(w.q_b_proj), dcq_norm, n, d.Lq, d.H * d.QK, false);
    rmsnorm_backward(dcq_norm, rec.cq.data(), W<T>(w.q_a_layernorm), cq_inv, dcq, G<T>(g.q_a_layernorm), n, d.Lq);
    ctx.lin.dw(dcq, x, G<T>(g.q_a_proj), n, d.dim, d.Lq);
    ctx.lin.dx(dcq, W<T>(w.q_a_proj), dx, n, d.dim, d.Lq, true);
  } else {
    ctx.lin.dw(dq, x, G<T>(g.q_proj), n, d.dim, d.H * d.QK);
    ctx.lin.dx(dq, W<T>(w.q_proj), dx, n, d.dim, d.H * d.QK, true);
  }
}

#define DSV3_INSTANTIATE(T)                                                                                      \
  template void mla_forward<T>(const MlaContext&, const MlaWeights&, const T*, const TokenRows&, LayerCache<T>,  \
                               Arena&, T*, MlaRecord<T>*);                                                        \
  template void mla_backward<T>(const MlaContext&, const MlaWeights&, const T*, const TokenRows&,               \
                                const MlaRecord<T>&, const T*, MlaWeights&, T*, Arena&);
DSV3_INSTANTIATE(float)
DSV3_INSTANTIATE(double)

}  // namespace dsv3
