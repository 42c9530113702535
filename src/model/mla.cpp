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
  // Latent and shared RoPE key: [c_kv ; k_pe] = W_dkv x (computed with the query's
  // down-projection, which reads the same x). The cache keeps norm(c_kv) and rope(k_pe).
  float* q = arena.alloc(size_t(n * H * QK));
  float* kv = arena.alloc(size_t(n * (C + R)));
  if (c.q_lora_rank > 0) {
    float* cq = arena.alloc(size_t(n * c.q_lora_rank));
    const LinearJob down[2] = {{x, n, w.q_a_proj, cq}, {x, n, w.kv_a_proj_with_mqa, kv}};
    linear_batch(down, 2);
    rmsnorm(cq, n, c.q_lora_rank, w.q_a_layernorm.f32(), c.rms_norm_eps, cq);
    linear(cq, n, w.q_b_proj, q);
  } else {
    const LinearJob proj[2] = {{x, n, w.q_proj, q}, {x, n, w.kv_a_proj_with_mqa, kv}};
    linear_batch(proj, 2);
  }
  for (int64_t t = 0; t < n; ++t) {
    const int64_t pos = start_pos + t;
    rmsnorm(kv + t * (C + R), 1, C, w.kv_a_layernorm.f32(), c.rms_norm_eps, cache.latent + pos * C);
    std::memcpy(cache.k_pe + pos * R, kv + t * (C + R) + C, size_t(R) * 4);
    ctx.rope.apply(cache.k_pe + pos * R, pos);
    for (int64_t h = 0; h < H; ++h) ctx.rope.apply(q + (t * H + h) * QK + D, pos);
  }

  float* o = arena.alloc(size_t(n * H * V));  // attention output per head, [n, H*V]
  if (ctx.form == AttnForm::absorbed) {
    // q_lat[t, h] = W_uk^T q_nope[t, h]  (C values): scores are then q_lat . c_kv + q_pe . k_pe
    float* q_lat = arena.alloc(size_t(n * H * C));
    float* qn = arena.alloc(size_t(H * n * std::max(D, C)));  // per-head scratch
    float* ql = arena.alloc(size_t(H * n * std::max(C, V)));
    // Heads are independent: for a few tokens (decode) each head's small product runs on
    // its own thread; for many tokens the products themselves are threaded.
#pragma omp parallel for schedule(static) if (n <= 8 && H > 1)
    for (int64_t h = 0; h < H; ++h) {
      float* qn_h = qn + h * n * std::max(D, C);
      float* ql_h = ql + h * n * std::max(C, V);
      gather_cols(q, n, H * QK, h * QK, D, qn_h);
      linear_t(qn_h, n, w.kv_b_proj.row_slice(h * (D + V), D), ql_h);
      scatter_cols(ql_h, n, H * C, h * C, C, q_lat);
    }
    // Attention in the latent space. Every head attends to the same cached latents, so the
    // (token, head) pairs are the rows of one product: scores [n*H, T] = q_lat c_kv^T +
    // q_pe k_pe^T, then o_lat [n*H, C] = softmax(scores) c_kv. Query rows are taken in
    // chunks so the score matrix stays bounded for long prompts.
    float* o_lat = arena.alloc(size_t(n * H * C));
    const Mat latents{DType::f32, T, C, reinterpret_cast<const uint8_t*>(cache.latent), nullptr, 0, 0};
    const Mat rope_keys{DType::f32, T, R, reinterpret_cast<const uint8_t*>(cache.k_pe), nullptr, 0, 0};
    const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 22) / (H * T));  // tokens per chunk
    float* scores = arena.alloc(size_t(std::min(chunk, n) * H * T));
    float* scores_pe = arena.alloc(size_t(std::min(chunk, n) * H * T));
    float* q_pe = arena.alloc(size_t(std::min(chunk, n) * H * R));
    for (int64_t t0 = 0; t0 < n; t0 += chunk) {
      const int64_t nt = std::min(chunk, n - t0), rows = nt * H;
      for (int64_t i = 0; i < rows; ++i) std::memcpy(q_pe + i * R, q + (t0 * H + i) * QK + D, size_t(R) * 4);
      linear(q_lat + t0 * H * C, rows, latents, scores);
      linear(q_pe, rows, rope_keys, scores_pe);
#pragma omp parallel for schedule(static) if (rows * T > 65536)
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t visible = start_pos + t0 + i / H + 1;  // causal: positions 0 .. own
        float* s = scores + i * T;
        for (int64_t j = 0; j < visible; ++j) s[j] = (s[j] + scores_pe[i * T + j]) * ctx.softmax_scale;
        softmax(s, visible);
        std::fill(s + visible, s + T, 0.0f);
      }
      linear_t(scores, rows, latents, o_lat + t0 * H * C);
    }
    // o[t, h] = W_uv o_lat[t, h]
#pragma omp parallel for schedule(static) if (n <= 8 && H > 1)
    for (int64_t h = 0; h < H; ++h) {
      float* ol_h = qn + h * n * std::max(D, C);
      float* ov_h = ql + h * n * std::max(C, V);
      gather_cols(o_lat, n, H * C, h * C, C, ol_h);
      linear(ol_h, n, w.kv_b_proj.row_slice(h * (D + V) + D, V), ov_h);
      scatter_cols(ov_h, n, H * V, h * V, V, o);
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
