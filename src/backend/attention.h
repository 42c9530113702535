// The attention core of MLA (§2.1.1) as one backend operation, forward and backward, for
// float and double: scores = scale * (q1 . k1 + q2 . k2), a causal softmax over each query's
// own sequence, out = P v. Both MLA forms are this op with different views:
//   naive:    q1 = q_nope, k1 = k_nope (per head), q2 = q_pe, k2 = k_pe (shared), v per head;
//   absorbed: q1 = W_uk^T q_nope, k1 = the latent c_kv (shared), q2 = q_pe, k2 = k_pe (shared),
//             v = the latent (shared): attention in the latent space.
// Every loop and thread of the attention core lives behind this op (backend/cpu/attention.cpp).
// Depends on core only.
#pragma once
#include <cstdint>

namespace dsv3 {

// Per-row, per-head vectors of `width` values: head h of row r starts at
// data[r * row_stride + h * head_stride]; head_stride 0 means one vector shared by all heads.
template <typename P>
struct HeadRows {
  P* data = nullptr;
  int64_t row_stride = 0, head_stride = 0, width = 0;
};

// The keys of query token t are the key rows [key_first[t], key_first[t] + key_count[t]):
// its sequence's positions 0 .. its own (causal). Tokens of one sequence are consecutive
// and share key_first; sequences' key rows do not overlap (the backward needs that).
template <typename T>
struct AttentionArgs {
  int64_t n = 0, heads = 0;        // query tokens, heads
  HeadRows<const T> q1, q2;        // [n, heads, width]; q2.width may be 0
  HeadRows<const T> k1, k2, v;     // [key rows, heads or shared, width]
  const int64_t* key_first = nullptr;
  const int64_t* key_count = nullptr;
  double scale = 1;                // the softmax scale
};

// out[n, heads, v.width] (dense, overwritten). If probs is given, the softmax rows are kept
// there: row (t * heads + h) at probs + (t * heads + h) * ld_probs, key_count[t] values,
// zeros after them up to the sequence's key count (ld_probs >= every key_count). If lse is
// given, each row's log-sum-exp of its scaled scores goes to lse[t * heads + h]: all the
// backward needs to recompute the probabilities, n * heads values instead of the n x keys
// square per head.
template <typename T>
void attention_forward(const AttentionArgs<T>& a, T* out, T* probs = nullptr, int64_t ld_probs = 0,
                       T* lse = nullptr);

// The gradients, accumulated (+=) into views laid out like q1, q2, k1, k2, v (k2's and a
// shared view's head contributions summed), from d_out [n, heads, v.width] and the probs
// the forward kept, or (probs null) its log-sum-exp rows: then each causal block's
// probabilities are recomputed from the scores, exp(scale * score - lse), as they are used.
template <typename T>
struct AttentionGrads {
  HeadRows<T> q1, q2, k1, k2, v;
};
template <typename T>
void attention_backward(const AttentionArgs<T>& a, const T* probs, int64_t ld_probs, const T* d_out,
                        const AttentionGrads<T>& g, const T* lse = nullptr);

// The scalar double-precision twins: the numerical reference of the conformance test.
template <typename T>
void attention_forward_reference(const AttentionArgs<T>& a, T* out, T* probs = nullptr, int64_t ld_probs = 0);
template <typename T>
void attention_backward_reference(const AttentionArgs<T>& a, const T* probs, int64_t ld_probs, const T* d_out,
                                  const AttentionGrads<T>& g);

}  // namespace dsv3
