// SwiGLU MLP and DeepSeekMoE for training (§2.1.2): forwards that save what the backwards
// need, and the backwards, in mirror order. Expert selection is piecewise constant and is
// not differentiated; gradients reach the router (gate.weight and the input) through the
// gate weights of the chosen experts: with sigmoid scores through each s_j and the sum that
// normalises them, with softmax scores through the softmax over all experts. The
// e_score_correction_bias only selects and gets no gradient. Uses backend/train_ops.h only.
#pragma once
#include <cstdint>
#include <vector>

#include "backend/train_ops.h"
#include "model/weights.h"

namespace dsv3 {

// The SwiGLU inputs gate_proj x and up_proj x [m, inter]; its output silu(a) * b is
// recomputed in the backward instead of kept (§3.3.3).
template <typename T>
struct MlpActivations {
  SavedActivation<T> a, b;
  int64_t bytes() const { return a.bytes() + b.bytes(); }
};

// out[m, hidden] = down(silu(gate(x)) * up(x))  (overwritten). saved: the format the SwiGLU
// inputs are kept in (the backward then works from those values).
template <typename T>
void mlp_train_forward(const MlpWeights& w, const T* x, int64_t m, MlpActivations<T>& act, T* out,
                       const LinearGemm& lin = {}, SavedFormat saved = SavedFormat::full);
// Weight gradients accumulated into g; input gradient accumulated into dx. x: the forward's input.
template <typename T>
void mlp_train_backward(const MlpWeights& w, const T* x, int64_t m, const MlpActivations<T>& act, const T* dout,
                        MlpWeights& g, T* dx, const LinearGemm& lin = {});

// The complementary sequence-wise balance loss (§2.1.2, eq. 17-20): for each sequence of
// seq_len tokens, alpha * sum_i f_i P_i with f_i = E / (K T) * (tokens choosing expert i)
// and P_i the mean over the sequence of the normalised affinity s_i / sum_j s_j; averaged
// over the sequences. alpha = 0 turns it off. T counts a sequence's tokens except its last
// `ignored_tail`: the positions where MTP depth k feeds a placeholder (k of them), which
// count neither in this loss nor in the expert loads that drive the bias update. (When a
// sequence is no longer than k, TrainingPass still counts its first position: that MTP
// depth has no target at all then, and its block keeps a load.)
struct BalanceLoss {
  int64_t seq_len = 0;  // 0: the whole batch is one sequence
  double alpha = 0;
  int64_t ignored_tail = 0;
};

// The experts' inputs are gathered again from x in the backward rather than kept. Experts'
// SwiGLU inputs are saved in lin.moe_swiglu_input_format() (E4M3 in FP8 training, §3.3.3).
template <typename T>
struct MoeActivations {
  std::vector<T> logits;                   // [N, E] = x W_g^T
  std::vector<int32_t> experts;            // [N, k] chosen experts
  std::vector<T> weights;                  // [N, k] their gate weights
  std::vector<std::vector<int64_t>> slots;  // per expert: the (token * k + j) routed to it
  std::vector<int64_t> load;               // per expert: counted tokens routed to it (see BalanceLoss)
  std::vector<std::vector<T>> ye;          // per expert: outputs [m_e, hidden]
  std::vector<MlpActivations<T>> expert;   // per expert
  MlpActivations<T> shared;
  BalanceLoss balance;                     // as given to the forward
  std::vector<T> balance_f;                // [N / seq_len, E]: alpha * f_i / (T * sequences)
  int64_t bytes() const;
};

// Returns the balance loss (0 if off).
// lin: the precision of the experts' GEMMs (the router gate stays in T).
template <typename T>
double moe_train_forward(const ModelConfig& c, const MoeWeights& w, const T* x, int64_t N, MoeActivations<T>& a, T* out,
                         const BalanceLoss& balance = {}, const LinearGemm& lin = {});
template <typename T>
void moe_train_backward(const ModelConfig& c, const MoeWeights& w, const T* x, int64_t N, const MoeActivations<T>& a,
                        const T* dout, MoeWeights& g, T* dx, const LinearGemm& lin = {});

}  // namespace dsv3
