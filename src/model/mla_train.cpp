// MLA forward and backward for training (see mla_train.h). Shapes: H heads, D nope, R rope,
// V value, C kv_lora_rank, Lq q_lora_rank. Per sequence b and head h, attention is
// products of [S, *] blocks: scores = q_nope k_nope^T + q_pe k_pe^T (times the softmax
// scale), causal softmax, o = P v.
#include "model/mla_train.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include "backend/train_ops.h"

namespace dsv3 {

namespace {

template <typename T>
const T* W(const Mat& m) {
  return m.as<T>();
}
template <typename T>
T* G(const Mat& m) {
  return mutable_data<T>(m);
}

// dst[S, width] = columns [col, col + width) of rows r0 .. r0+S of src (row stride ld).
template <typename T>
void gather(const T* src, int64_t ld, int64_t r0, int64_t S, int64_t col, int64_t width, T* dst) {
  for (int64_t i = 0; i < S; ++i) std::memcpy(dst + i * width, src + (r0 + i) * ld + col, size_t(width) * sizeof(T));
}
template <typename T>
void scatter(const T* src, int64_t ld, int64_t r0, int64_t S, int64_t col, int64_t width, T* dst) {
  for (int64_t i = 0; i < S; ++i) std::memcpy(dst + (r0 + i) * ld + col, src + i * width, size_t(width) * sizeof(T));
}

// What the forward computes from the saved latents and the backward computes again
// (§3.2.3: RMSNorm and the MLA up-projections are recomputed, not stored).
template <typename T>
struct UpProjected {
  std::vector<T> cq_norm, cq_inv;  // q_a_layernorm(c_q) and its 1/rms (q_lora_rank > 0)
  std::vector<T> q;                // [N, H*(D+R)], RoPE applied to each head's last R
  std::vector<T> c_norm, c_inv;    // kv_a_layernorm(c_kv), 1/rms
  std::vector<T> kvb;              // [N, H*(D+V)]: per head k_nope, v
};

// q = W_uq norm(c_q) (or W_q x without q_lora_rank), with RoPE; [k_nope ; v] = W_ukv norm(c_kv).
template <typename T>
void up_project(const ModelConfig& c, const Rope& rope, const MlaWeights& w, const T* x, int64_t B, int64_t S,
                const MlaActivations<T>& a, const LinearGemm& lin, UpProjected<T>& u) {
  const int64_t H = c.num_attention_heads, D = c.qk_nope_head_dim, R = c.qk_rope_head_dim, V = c.v_head_dim;
  const int64_t C = c.kv_lora_rank, Lq = c.q_lora_rank, QK = D + R, N = B * S, dim = c.hidden_size;
  u.q.resize(size_t(N * H * QK));
  if (Lq > 0) {
    u.cq_inv.resize(size_t(N)), u.cq_norm.resize(size_t(N * Lq));
    rmsnorm_forward(a.cq.data(), W<T>(w.q_a_layernorm), u.cq_norm.data(), u.cq_inv.data(), N, Lq, c.rms_norm_eps);
    lin.forward(u.cq_norm.data(), W<T>(w.q_b_proj), u.q.data(), N, Lq, H * QK);
  } else {
    lin.forward(x, W<T>(w.q_proj), u.q.data(), N, dim, H * QK);
  }
  std::vector<double> cos, sin;
  rope.table(S, cos, sin);
#pragma omp parallel for schedule(static) if (N * H * R > 32768)
  for (int64_t t = 0; t < N; ++t) {
    const size_t pos = size_t(t % S) * size_t(R / 2);
    for (int64_t h = 0; h < H; ++h) rope.rotate(&u.q[size_t((t * H + h) * QK + D)], &cos[pos], &sin[pos], false);
  }
  u.c_inv.resize(size_t(N)), u.c_norm.resize(size_t(N * C));
  rmsnorm_forward(a.c.data(), W<T>(w.kv_a_layernorm), u.c_norm.data(), u.c_inv.data(), N, C, c.rms_norm_eps);
  u.kvb.resize(size_t(N * H * (D + V)));
  lin.forward(u.c_norm.data(), W<T>(w.kv_b_proj), u.kvb.data(), N, C, H * (D + V));
}

}  // namespace

template <typename T>
void mla_train_forward(const ModelConfig& c, const Rope& rope, const MlaWeights& w, const T* x, int64_t B, int64_t S,
                       MlaActivations<T>& a, T* out, const LinearGemm& lin) {
  const int64_t H = c.num_attention_heads, D = c.qk_nope_head_dim, R = c.qk_rope_head_dim, V = c.v_head_dim;
  const int64_t C = c.kv_lora_rank, Lq = c.q_lora_rank, QK = D + R, N = B * S, dim = c.hidden_size;
  const T scale = T(softmax_scale(c));

  // The down-projections: c_q = W_dq x; [c_kv ; k_pe] = W_dkv x, RoPE on k_pe.
  if (Lq > 0) {
    a.cq.resize(size_t(N * Lq));
    lin.forward(x, W<T>(w.q_a_proj), a.cq.data(), N, dim, Lq);
  }
  std::vector<T> kv(static_cast<size_t>(N * (C + R)));
  lin.forward(x, W<T>(w.kv_a_proj_with_mqa), kv.data(), N, dim, C + R);
  a.c.resize(size_t(N * C)), a.k_pe.resize(size_t(N * R));
  std::vector<double> cos, sin;
  rope.table(S, cos, sin);
  for (int64_t t = 0; t < N; ++t) {
    const size_t pos = size_t(t % S) * size_t(R / 2);
    std::memcpy(&a.c[size_t(t * C)], &kv[size_t(t * (C + R))], size_t(C) * sizeof(T));
    std::memcpy(&a.k_pe[size_t(t * R)], &kv[size_t(t * (C + R) + C)], size_t(R) * sizeof(T));
    rope.rotate(&a.k_pe[size_t(t * R)], &cos[pos], &sin[pos], false);
  }
  UpProjected<T> u;
  up_project(c, rope, w, x, B, S, a, lin, u);

  a.p.assign(size_t(B * H * S * S), T(0));
  std::vector<T> o(static_cast<size_t>(N * H * V));
#pragma omp parallel
  {
    std::vector<T> qn(size_t(S * D)), qp(size_t(S * R)), kn(size_t(S * D)), v(size_t(S * V)), s2(size_t(S * S)),
        oh(size_t(S * V));
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H, r0 = b * S;
      T* p = &a.p[size_t(bh * S * S)];
      gather(u.q.data(), H * QK, r0, S, h * QK, D, qn.data());
      gather(u.q.data(), H * QK, r0, S, h * QK + D, R, qp.data());
      gather(u.kvb.data(), H * (D + V), r0, S, h * (D + V), D, kn.data());
      gather(u.kvb.data(), H * (D + V), r0, S, h * (D + V) + D, V, v.data());
      matmul(qn.data(), kn.data(), p, S, D, S);
      matmul(qp.data(), &a.k_pe[size_t(r0 * R)], s2.data(), S, R, S);
      for (int64_t i = 0; i < S; ++i) {
        T* row = p + i * S;
        for (int64_t j = 0; j <= i; ++j) row[j] = (row[j] + s2[size_t(i * S + j)]) * scale;
        softmax_forward(row, i + 1);
        std::fill(row + i + 1, row + S, T(0));  // causal: later positions get no weight
      }
      matmul_dx(p, v.data(), oh.data(), S, V, S, false);  // o = P v
      scatter(oh.data(), H * V, r0, S, h * V, V, o.data());
    }
  }
  lin.forward(o.data(), W<T>(w.o_proj), out, N, H * V, dim);
  a.o.save(o.data(), N, H * V, lin.attention_output_format());
}

template <typename T>
void mla_train_backward(const ModelConfig& c, const Rope& rope, const MlaWeights& w, const T* x, int64_t B, int64_t S,
                        const MlaActivations<T>& a, const T* dout, MlaWeights& g, T* dx, const LinearGemm& lin) {
  const int64_t H = c.num_attention_heads, D = c.qk_nope_head_dim, R = c.qk_rope_head_dim, V = c.v_head_dim;
  const int64_t C = c.kv_lora_rank, Lq = c.q_lora_rank, QK = D + R, N = B * S, dim = c.hidden_size;
  const T scale = T(softmax_scale(c));

  UpProjected<T> u;  // recomputed
  up_project(c, rope, w, x, B, S, a, lin, u);

  // out = o W_o^T
  std::vector<T> d_o(static_cast<size_t>(N * H * V));
  std::vector<T> o_scratch;
  lin.dw(dout, a.o.read(o_scratch), G<T>(g.o_proj), N, H * V, dim);
  lin.dx(dout, W<T>(w.o_proj), d_o.data(), N, H * V, dim, false);

  // Attention, per sequence and head. The shared k_pe gets one gradient per head, summed after.
  std::vector<T> dq(static_cast<size_t>(N * H * QK)), dkvb(static_cast<size_t>(N * H * (D + V)));
  std::vector<T> dkpe_heads(static_cast<size_t>(B * H * S * R));
#pragma omp parallel
  {
    std::vector<T> qn(size_t(S * D)), qp(size_t(S * R)), kn(size_t(S * D)), v(size_t(S * V)), doh(size_t(S * V)),
        dp(size_t(S * S)), ds(size_t(S * S)), dqn(size_t(S * D)), dqp(size_t(S * R)), dkn(size_t(S * D)),
        dv(size_t(S * V));
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H, r0 = b * S;
      const T* p = &a.p[size_t(bh * S * S)];
      const T* kpe = &a.k_pe[size_t(r0 * R)];
      gather(u.q.data(), H * QK, r0, S, h * QK, D, qn.data());
      gather(u.q.data(), H * QK, r0, S, h * QK + D, R, qp.data());
      gather(u.kvb.data(), H * (D + V), r0, S, h * (D + V), D, kn.data());
      gather(u.kvb.data(), H * (D + V), r0, S, h * (D + V) + D, V, v.data());
      gather(d_o.data(), H * V, r0, S, h * V, V, doh.data());
      // o = P v:  dP = do v^T,  dv = P^T do
      matmul(doh.data(), v.data(), dp.data(), S, V, S);
      std::fill(dv.begin(), dv.end(), T(0));
      matmul_dw(p, doh.data(), dv.data(), S, V, S);
      // P = softmax(scale * scores) over j <= i
      for (int64_t i = 0; i < S; ++i) {
        softmax_backward(p + i * S, &dp[size_t(i * S)], &ds[size_t(i * S)], i + 1);
        for (int64_t j = 0; j <= i; ++j) ds[size_t(i * S + j)] *= scale;
        std::fill(ds.begin() + i * S + i + 1, ds.begin() + (i + 1) * S, T(0));
      }
      // scores = q_nope k_nope^T + q_pe k_pe^T
      matmul_dx(ds.data(), kn.data(), dqn.data(), S, D, S, false);
      matmul_dx(ds.data(), kpe, dqp.data(), S, R, S, false);
      std::fill(dkn.begin(), dkn.end(), T(0));
      matmul_dw(ds.data(), qn.data(), dkn.data(), S, D, S);
      T* dkpe = &dkpe_heads[size_t(bh * S * R)];
      matmul_dw(ds.data(), qp.data(), dkpe, S, R, S);
      scatter(dqn.data(), H * QK, r0, S, h * QK, D, dq.data());
      scatter(dqp.data(), H * QK, r0, S, h * QK + D, R, dq.data());
      scatter(dkn.data(), H * (D + V), r0, S, h * (D + V), D, dkvb.data());
      scatter(dv.data(), H * (D + V), r0, S, h * (D + V) + D, V, dkvb.data());
    }
  }
  // RoPE is a rotation: its backward rotates the gradient back.
  std::vector<T> dkv(static_cast<size_t>(N * (C + R)), T(0));
  std::vector<double> cos, sin;
  rope.table(S, cos, sin);
#pragma omp parallel for schedule(static) if (N * H * R > 32768)
  for (int64_t t = 0; t < N; ++t) {
    const int64_t b = t / S, i = t % S;
    const size_t pos = size_t(i) * size_t(R / 2);
    T* dk = &dkv[size_t(t * (C + R) + C)];
    for (int64_t h = 0; h < H; ++h) {
      const T* src = &dkpe_heads[size_t(((b * H + h) * S + i) * R)];
      for (int64_t r = 0; r < R; ++r) dk[r] += src[r];
      rope.rotate(&dq[size_t((t * H + h) * QK + D)], &cos[pos], &sin[pos], true);
    }
    rope.rotate(dk, &cos[pos], &sin[pos], true);
  }
  // [k_nope ; v] = W_ukv c_norm;  c_norm = kv_a_layernorm(c)
  std::vector<T> dc_norm(static_cast<size_t>(N * C)), dc(static_cast<size_t>(N * C), T(0));
  lin.dw(dkvb.data(), u.c_norm.data(), G<T>(g.kv_b_proj), N, C, H * (D + V));
  lin.dx(dkvb.data(), W<T>(w.kv_b_proj), dc_norm.data(), N, C, H * (D + V), false);
  rmsnorm_backward(dc_norm.data(), a.c.data(), W<T>(w.kv_a_layernorm), u.c_inv.data(), dc.data(),
                   G<T>(g.kv_a_layernorm), N, C);
  for (int64_t t = 0; t < N; ++t) std::memcpy(&dkv[size_t(t * (C + R))], &dc[size_t(t * C)], size_t(C) * sizeof(T));
  // [c ; k_pe] = W_dkv x
  lin.dw(dkv.data(), x, G<T>(g.kv_a_proj_with_mqa), N, dim, C + R);
  lin.dx(dkv.data(), W<T>(w.kv_a_proj_with_mqa), dx, N, dim, C + R, true);
  // q = W_uq norm(W_dq x)  or  W_q x
  if (Lq > 0) {
    std::vector<T> dcq_norm(static_cast<size_t>(N * Lq)), dcq(static_cast<size_t>(N * Lq), T(0));
    lin.dw(dq.data(), u.cq_norm.data(), G<T>(g.q_b_proj), N, Lq, H * QK);
    lin.dx(dq.data(), W<T>(w.q_b_proj), dcq_norm.data(), N, Lq, H * QK, false);
    rmsnorm_backward(dcq_norm.data(), a.cq.data(), W<T>(w.q_a_layernorm), u.cq_inv.data(), dcq.data(),
                     G<T>(g.q_a_layernorm), N, Lq);
    lin.dw(dcq.data(), x, G<T>(g.q_a_proj), N, dim, Lq);
    lin.dx(dcq.data(), W<T>(w.q_a_proj), dx, N, dim, Lq, true);
  } else {
    lin.dw(dq.data(), x, G<T>(g.q_proj), N, dim, H * QK);
    lin.dx(dq.data(), W<T>(w.q_proj), dx, N, dim, H * QK, true);
  }
}

#define DSV3_INSTANTIATE(T)                                                                                        \
  template void mla_train_forward<T>(const ModelConfig&, const Rope&, const MlaWeights&, const T*, int64_t,         \
                                     int64_t, MlaActivations<T>&, T*, const LinearGemm&);                            \
  template void mla_train_backward<T>(const ModelConfig&, const Rope&, const MlaWeights&, const T*, int64_t,        \
                                      int64_t, const MlaActivations<T>&, const T*, MlaWeights&, T*,                 \
                                      const LinearGemm&);
DSV3_INSTANTIATE(float)
DSV3_INSTANTIATE(double)

}  // namespace dsv3
