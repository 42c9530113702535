// MLA for training (§2.1.1): the forward over whole sequences that saves what the backward
// needs, and the backward, in mirror order. Attention is in the naive form (keys and values
// expanded per head), causal within each of the B sequences of S tokens; positions start
// at 0. T is float (training) or double (gradient checks); weights and gradients are Mats
// of that type. Uses backend/train_ops.h only.
#pragma once
#include <cstdint>
#include <vector>

#include "backend/train_ops.h"
#include "model/rope.h"
#include "model/weights.h"

namespace dsv3 {

template <typename T>
struct MlaActivations {  // N = B*S rows
  std::vector<T> cq, cq_inv, cq_norm;  // q_a_proj output, its 1/rms, the normalised (q_lora_rank > 0)
  std::vector<T> q;                    // [N, H*(D+R)], RoPE applied to each head's last R
  std::vector<T> c, c_inv, c_norm;     // latent c_kv [N, C], 1/rms, kv_a_layernorm(c_kv)
  std::vector<T> k_pe;                 // [N, R] with RoPE
  std::vector<T> kvb;                  // [N, H*(D+V)]: per head k_nope, v
  std::vector<T> p;                    // [B, H, S, S] attention probabilities (0 above the diagonal)
  std::vector<T> o;                    // [N, H*V] attention output before o_proj
};

// out[N, hidden] = MLA(x[N, hidden]) (overwritten). lin: the precision of the projections'
// GEMMs (the attention core stays in T).
template <typename T>
void mla_train_forward(const ModelConfig& c, const Rope& rope, const MlaWeights& w, const T* x, int64_t B, int64_t S,
                       MlaActivations<T>& a, T* out, const LinearGemm& lin = {});

// From dout: weight gradients accumulated into g, input gradient accumulated into dx.
template <typename T>
void mla_train_backward(const ModelConfig& c, const Rope& rope, const MlaWeights& w, const T* x, int64_t B, int64_t S,
                        const MlaActivations<T>& a, const T* dout, MlaWeights& g, T* dx, const LinearGemm& lin = {});

}  // namespace dsv3
