// MLA forward (see mla.h). Shapes: H heads, D = qk_nope_head_dim, R = qk_rope_head_dim,
// V = v_head_dim, C = kv_lora_rank. Per head h, rows h*(D+V) .. h*(D+V)+D of kv_b_proj are
// W_uk (D x C) and the next V rows are W_uv (V x C).
#include "model/mla.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "backend/ops.h"

namespace dsv3 {

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Copies column block [col, col+width) of the rows of src (row stride ld) into dst (dense).
void gather_cols(const float* src, int64_t rows, int64_t ld, int64_t col, int64_t width, float* dst) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * width, src + r * ld + col, size_t(width) * 4);
}
void scatter_cols(const float* src, int64_t rows, int64_t ld, int64_t col, int64_t width, float* dst) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * ld + col, src + r * width, size_t(width) * 4);
}

}  // namespace

void mla_forward(const MlaContext& ctx, const MlaWeights& w, const float* x, int64_t n, int64_t start_pos,
                 LayerKvCache cache, Arena& arena, float* out) {
  const ModelConfig& c = ctx.config;
  const int64_t H = c.num_attention_heads, D = c.qk_nope_head_dim, R = c.qk_rope_head_dim, V = c.v_head_dim;
  const int64_t C = c.kv_lora_rank, QK = D + R, T = start_pos + n;

  // Queries: q = W_uq(norm(W_dq x)) with the low-rank path, else q = W_q x.  [n, H*QK]
  float* q = arena.alloc(size_t(n * H * QK));
  if (c.q_lora_rank > 0) {
    float* cq = arena.alloc(size_t(n * c.q_lora_rank));
    linear(x, n, w.q_a_proj, cq);
    rmsnorm(cq, n, c.q_lora_rank, w.q_a_layernorm.data(), c.rms_norm_eps, cq);
    linear(cq, n, w.q_b_proj, q);
  } else {
    linear(x, n, w.q_proj, q);
  }
  // Latent and shared RoPE key: [c_kv ; k_pe] = W_dkv x.  Cache norm(c_kv) and rope(k_pe).
  float* kv = arena.alloc(size_t(n * (C + R)));
  linear(x, n, w.kv_a_proj_with_mqa, kv);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t pos = start_pos + t;
    rmsnorm(kv + t * (C + R), 1, C, w.kv_a_layernorm.data(), c.rms_norm_eps, cache.latent + pos * C);
    std::memcpy(cache.k_pe + pos * R, kv + t * (C + R) + C, size_t(R) * 4);
    ctx.rope.apply(cache.k_pe + pos * R, pos);
    for (int64_t h = 0; h < H; ++h) ctx.rope.apply(q + (t * H + h) * QK + D, pos);
  }

  float* o = arena.alloc(size_t(n * H * V));  // attention output per head, [n, H*V]
  if (ctx.form == AttnForm::absorbed) {
    // q_lat[t, h] = W_uk^T q_nope[t, h]  (C values): scores are then q_lat . c_kv + q_pe . k_pe
    float* q_lat = arena.alloc(size_t(n * H * C));
    float* qn = arena.alloc(size_t(n * std::max(D, C)));
    float* ql = arena.alloc(size_t(n * C));
    for (int64_t h = 0; h < H; ++h) {
      gather_cols(q, n, H * QK, h * QK, D, qn);
      linear_t(qn, n, w.kv_b_proj.row_slice(h * (D + V), D), ql);
      scatter_cols(ql, n, H * C, h * C, C, q_lat);
    }
    float* o_lat = arena.alloc(size_t(n * H * C));
#pragma omp parallel
    {
      std::vector<float> p(static_cast<size_t>(T));
#pragma omp for schedule(dynamic, 1) collapse(2)
      for (int64_t t = 0; t < n; ++t)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t visible = start_pos + t + 1;
          const float* qh = q_lat + (t * H + h) * C;
          const float* qp = q + (t * H + h) * QK + D;
          for (int64_t j = 0; j < visible; ++j)
            p[size_t(j)] = (dot(qh, cache.latent + j * C, C) + dot(qp, cache.k_pe + j * R, R)) * ctx.softmax_scale;
          softmax(p.data(), visible);
          float* ol = o_lat + (t * H + h) * C;
          std::fill(ol, ol + C, 0.0f);
          for (int64_t j = 0; j < visible; ++j) {
            const float pj = p[size_t(j)];
            const float* lj = cache.latent + j * C;
            for (int64_t k = 0; k < C; ++k) ol[k] += pj * lj[k];
          }
        }
    }
    // o[t, h] = W_uv o_lat[t, h]
    float* ov = arena.alloc(size_t(n * V));
    for (int64_t h = 0; h < H; ++h) {
      gather_cols(o_lat, n, H * C, h * C, C, qn);
      linear(qn, n, w.kv_b_proj.row_slice(h * (D + V) + D, V), ov);
      scatter_cols(ov, n, H * V, h * V, V, o);
    }
  } else {
    // Expand every cached latent to per-head k_nope and v: [T, H*(D+V)].
    float* kvb = arena.alloc(size_t(T * H * (D + V)));
    linear(cache.latent, T, w.kv_b_proj, kvb);
#pragma omp parallel
    {
      std::vector<float> p(static_cast<size_t>(T));
#pragma omp for schedule(dynamic, 1) collapse(2)
      for (int64_t t = 0; t < n; ++t)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t visible = start_pos + t + 1;
          const float* qh = q + (t * H + h) * QK;
          for (int64_t j = 0; j < visible; ++j)
            p[size_t(j)] = (dot(qh, kvb + (j * H + h) * (D + V), D) + dot(qh + D, cache.k_pe + j * R, R)) *
                           ctx.softmax_scale;
          softmax(p.data(), visible);
          float* oh = o + (t * H + h) * V;
          std::fill(oh, oh + V, 0.0f);
          for (int64_t j = 0; j < visible; ++j) {
            const float* vj = kvb + (j * H + h) * (D + V) + D;
            for (int64_t k = 0; k < V; ++k) oh[k] += p[size_t(j)] * vj[k];
          }
        }
    }
  }
  linear(o, n, w.o_proj, out);
}

}  // namespace dsv3
