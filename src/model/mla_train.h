// MLA for training (§2.1.1): the forward over whole sequences that saves what the backward
// needs, and the backward, in mirror order. Attention is in the naive form (keys and values
// expanded per head), causal within each of the B sequences of S tokens; positions start
// at 0. T is float (training) or double (gradient checks); weights and gradients are Mats
// of that type. Uses backend/train_ops.h only.
// What is kept for the backward follows §3.2.3 and §3.3.3: the low-rank latents c_q and c_kv,
// not their RMSNorms nor the up-projected queries, keys and values (the backward recomputes
// them), and the attention output in lin.attention_output_format() (E5M6 in FP8 training).
#pragma once
#include <cstdint>
#include <vector>

#include "backend/train_ops.h"
#include "model/rope.h"
#include "model/weights.h"

namespace dsv3 {

template <typename T>
struct MlaActivations {  // N = B*S rows
  std::vector<T> cq;     // q_a_proj output c_q [N, Lq] (q_lora_rank > 0)
  std::vector<T> c;      // latent c_kv [N, C]
  std::vector<T> k_pe;   // [N, R] with RoPE
  std::vector<T> p;      // [B, H, S, S] attention probabilities (0 above the diagonal)
  SavedActivation<T> o;  // [N, H*V] attention output, the input of o_proj
  int64_t bytes() const { return int64_t((cq.size() + c.size() + k_pe.size() + p.size()) * sizeof(T)) + o.bytes(); }
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
