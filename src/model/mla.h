// Multi-head Latent Attention (§2.1.1): one forward for inference and training, and the
// backward beside it. Keys and values are never kept per head: per token, the cache holds
// the normalised latent c_kv (kv_lora_rank) and the shared RoPE key k_pe
// (qk_rope_head_dim). Two equivalent forms of the attention:
//   absorbed: W_uk is folded into the query and W_uv applied after attention, so attention
//             runs in the latent space (the form for decoding; float only);
//   naive:    k_nope and v are re-expanded from the latent for every key row (the form
//             training differentiates, and a check of the other; cheaper for prefill).
// T is float (inference, training) or double (gradient checks). Uses backend ops only.
// What training keeps for the backward follows §3.2.3 and §3.3.3: the low-rank latents c_q
// and c_kv, not their RMSNorms nor the up-projected queries, keys and values (the backward
// recomputes them), the attention output in lin.attention_output_format() (E5M6 in FP8
// training), and of the softmax only each row's log-sum-exp (the probabilities are
// recomputed block by block).
#pragma once
#include <cstdint>
#include <vector>

#include "backend/ops.h"
#include "core/arena.h"
#include "model/rope.h"
#include "model/token_rows.h"
#include "model/weights.h"

namespace dsv3 {

// automatic: per forward, the form with fewer multiply-adds: naive when many new tokens
// attend over keys expanded once (prefill), absorbed when few tokens attend over a long cache
// (decoding); naive also only while its expanded keys and values stay within 256 MiB.
enum class AttnForm { absorbed, naive, automatic };

// The form with fewer multiply-adds for n tokens attending over `keys` cache rows in
// `pairs` (token, key) pairs (what AttnForm::automatic runs).
AttnForm cheaper_attn_form(const ModelConfig& c, int64_t n, int64_t keys, double pairs);

// The keys of a paged cache (infer's PagedKvCache): a sequence's positions lie in pages
// anywhere in the cache, so before attention each layer gathers them, sequence after
// sequence, into one contiguous range (arena scratch, per pass; the pages themselves are
// shared between sequences and never copied for it).
struct KeyGather {
  std::vector<int64_t> rows;  // cache row of gathered key j: each sequence's positions 0 .. its last
  TokenRows keys;             // per pass token: its position, and its own row in the gathered range
};

// One layer's latent cache: row r holds the latent [kv_lora_rank] and the RoPE key
// [qk_rope_head_dim] of the token whose TokenRows row is r. With `gather`, a token's
// earlier positions are not the rows before its own: they are listed there.
template <typename T>
struct LayerCache {
  T* latent = nullptr;
  T* k_pe = nullptr;
  const KeyGather* gather = nullptr;
  bool empty() const { return latent == nullptr; }
};

struct MlaContext {
  const ModelConfig& config;
  const RopeAngles& angles;  // of the pass's tokens (Rope::angles of TokenRows::pos)
  AttnForm form = AttnForm::absorbed;
  LinearGemm lin = {};  // the precision of the projections' GEMMs; the attention core stays in T
};

// What the backward needs from a forward over n tokens (heads H).
template <typename T>
struct MlaRecord {
  std::vector<T> cq;     // q_a_proj output c_q [n, q_lora_rank] (q_lora_rank > 0)
  std::vector<T> c;      // latent c_kv before kv_a_layernorm [n, kv_lora_rank]
  std::vector<T> k_pe;   // [n, qk_rope_head_dim], RoPE applied
  // Per (token t, head h), row t*H + h: the log-sum-exp of the softmax over its scaled
  // scores. The backward recomputes the attention probabilities from it, a causal block at
  // a time, so the n x n square per head is never stored.
  std::vector<T> lse;
  SavedActivation<T> o;  // [n, H*v_head_dim] attention output, the input of o_proj
  int64_t bytes() const { return int64_t((cq.size() + c.size() + k_pe.size() + lse.size()) * sizeof(T)) + o.bytes(); }
};

// out[n, hidden] = MLA(x[n, hidden]) (overwritten) for the tokens placed by `tokens`:
// their latents are written to the cache at their rows, and each attends causally over its
// sequence's rows. An empty cache means the pass attends within itself (training windows):
// token t must then be row t. With a record (naive form, empty cache), what the
// backward needs is kept there. Scratch comes from arena and is released on return.
template <typename T>
void mla_forward(const MlaContext& ctx, const MlaWeights& w, const T* x, const TokenRows& tokens, LayerCache<T> cache,
                 Arena& arena, T* out, MlaRecord<T>* record = nullptr);

// From dout: weight gradients accumulated into g, the input gradient accumulated into dx;
// x, tokens and ctx as in the recorded forward.
template <typename T>
void mla_backward(const MlaContext& ctx, const MlaWeights& w, const T* x, const TokenRows& tokens,
                  const MlaRecord<T>& record, const T* dout, MlaWeights& g, T* dx, Arena& arena);

}  // namespace dsv3
