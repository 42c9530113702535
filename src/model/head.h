// The two ends of the model, shared by the main model and the MTP modules (§2.2: "shared
// embedding" and "shared output head"): the token embedding, and the output head
// logits = W_head RMSNorm(h). Both stay in the working precision in training (§3.3: the
// embedding and output head are not FP8 GEMMs). T is float or double (gradient checks).
#pragma once
#include <cstdint>

#include "core/arena.h"
#include "model/config.h"
#include "model/weights.h"

namespace dsv3 {

// out[n, hidden] = rows ids of table (any stored dtype in float; T otherwise). Ids are
// checked against the table.
template <typename T>
void embed_forward(const Mat& table, const int32_t* ids, int64_t n, T* out, Arena& arena);
// g rows ids += dout rows, in token order (deterministic); g is an owned gradient tensor.
template <typename T>
void embed_backward(const int32_t* ids, int64_t n, const T* dout, const Mat& g, Arena& arena);

// logits[n, vocab] = head norm(h[n, hidden]) (overwritten).
template <typename T>
void head_forward(const ModelConfig& c, const Mat& norm, const Mat& head, const T* h, int64_t n, T* logits, Arena& arena);
// From dlogits: dh += the input gradient; the norm's and head's weight gradients
// accumulated into g_norm, g_head. h as in the forward.
template <typename T>
void head_backward(const ModelConfig& c, const Mat& norm, const Mat& head, const T* h, int64_t n, const T* dlogits,
                   T* dh, const Mat& g_norm, const Mat& g_head, Arena& arena);

}  // namespace dsv3
