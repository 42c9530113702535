// Multi-head Latent Attention (§2.1.1). Keys and values are never cached per head: the
// cache holds, per token, the normalised latent c_kv (kv_lora_rank) and the shared RoPE
// key k_pe (qk_rope_head_dim). Two equivalent forms:
//   absorbed: W_uk is folded into the query and W_uv applied after attention, so attention
//             runs in the latent space (the form for decoding);
//   naive:    k_nope and v are re-expanded from the latent for every cached token (a check).
// Uses backend ops only.
#pragma once
#include <cstdint>

#include "core/arena.h"
#include "model/rope.h"
#include "model/weights.h"

namespace dsv3 {

enum class AttnForm { absorbed, naive };

struct LayerKvCache {  // rows are positions
  float* latent;       // (capacity, kv_lora_rank): kv_a_layernorm(c_kv)
  float* k_pe;         // (capacity, qk_rope_head_dim): RoPE applied
};

struct MlaContext {
  const ModelConfig& config;
  const Rope& rope;
  float softmax_scale;
  AttnForm form;
};

// out[n, hidden] = MLA(x[n, hidden]) for tokens at positions start_pos .. start_pos+n-1;
// appends their latents to the cache and attends causally over positions 0 .. start_pos+n-1.
void mla_forward(const MlaContext& ctx, const MlaWeights& w, const float* x, int64_t n, int64_t start_pos,
                 LayerKvCache cache, Arena& arena, float* out);

}  // namespace dsv3
