// The weights of a DeepSeek-V3 model, named as in the Hugging Face checkpoint, and the
// one list of them (for_each_tensor) that drives loading, validation, allocation of
// training parameters, gradients and optimiser state, and saving. Every tensor is a Mat
// (a vector is one row). Loaded matrices stay in their stored dtype (views into the mapped
// files); loaded vectors (norms, router bias) are converted to float32 storage owned here.
// Uses core, io and backend/ops.h (for Mat) only.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "backend/ops.h"
#include "model/config.h"

namespace dsv3 {

class Checkpoint;


struct MlaWeights {                  // §2.1.1, shapes [out, in]
  Mat q_a_proj;                      // (q_lora_rank, hidden)            if q_lora_rank > 0
  Mat q_a_layernorm;                 // (q_lora_rank)
  Mat q_b_proj;                      // (heads*(nope+rope), q_lora_rank)
  Mat q_proj;                        // (heads*(nope+rope), hidden)      if q_lora_rank == 0
  Mat kv_a_proj_with_mqa;            // (kv_lora_rank + rope, hidden): latent, then shared k_pe
  Mat kv_a_layernorm;                // (kv_lora_rank)
  Mat kv_b_proj;                     // (heads*(nope+v), kv_lora_rank): per head k_nope, then v
  Mat o_proj;                        // (hidden, heads*v)
};

struct MlpWeights {  // SwiGLU: down(silu(gate(x)) * up(x))
  Mat gate_proj;     // (inter, hidden)
  Mat up_proj;       // (inter, hidden)
  Mat down_proj;     // (hidden, inter)
};

struct MoeWeights {                   // §2.1.2
  Mat gate;                           // (n_routed_experts, hidden): router affinities
  Mat e_score_correction_bias;        // (n_routed_experts), noaux_tc only: selects, never weighs
  std::vector<MlpWeights> experts;    // n_routed_experts, inter = moe_intermediate_size
  MlpWeights shared_experts;          // inter = n_shared_experts * moe_intermediate_size
};

struct LayerWeights {
  Mat input_layernorm;           // (hidden) before attention
  MlaWeights self_attn;
  Mat post_attention_layernorm;  // (hidden) before the FFN
  bool is_moe = false;
  MlpWeights mlp;                // dense layers
  MoeWeights moe;                // MoE layers
};

struct MtpWeights {       // §2.2, stored as layer num_hidden_layers + k
  Mat embed_tokens;       // (vocab, hidden): a copy of the main embedding
  Mat enorm, hnorm;       // (hidden): RMSNorm of the token embedding / of the previous hidden state
  Mat eh_proj;            // (hidden, 2*hidden): projects [enorm(emb); hnorm(h)]
  LayerWeights block;     // one transformer block
  Mat shared_head_norm;   // (hidden)
  Mat shared_head_head;   // (vocab, hidden): a copy of lm_head
};

struct ModelWeights {
  Mat embed_tokens;                 // (vocab, hidden)
  std::vector<LayerWeights> layers;
  Mat norm;                         // (hidden)
  Mat lm_head;                      // (vocab, hidden)
  std::vector<MtpWeights> mtp;      // num_nextn_predict_layers
  std::vector<std::unique_ptr<uint8_t[]>> storage;  // owned bytes behind some Mats / scales
};

// One tensor of the model as the checkpoint names it.
struct TensorSlot {
  std::string name;              // HF name, e.g. "model.layers.3.self_attn.kv_b_proj.weight"
  std::vector<int64_t> shape;    // stored shape: [out, in] for matrices, [n] for vectors
  Mat* mat = nullptr;
  bool fp8_quantizable = false;  // stored as F8_E4M3 + _scale_inv in FP8 checkpoints
  bool trainable = true;         // false: e_score_correction_bias (moved by balancing, not gradients)
  bool mtp = false;              // part of an MTP module (layer num_hidden_layers + k)
};

// Visits every tensor of the model once, in checkpoint order of layers.
void for_each_tensor(const ModelConfig& c, ModelWeights& w, const std::function<void(const TensorSlot&)>& fn);

// Every tensor once, in for_each_tensor's order.
std::vector<TensorSlot> list_tensors(const ModelConfig& c, ModelWeights& w);

// Loads and validates every tensor from ckpt: shapes, dtypes, FP8 scales (finite, > 0),
// no tensor missing, none unexpected. Errors name the file and the tensor.
ModelWeights load_weights(const ModelConfig& c, const Checkpoint& ckpt);

// Weights in owned, zeroed storage of dtype F32 or F64 (training parameters, gradients,
// optimiser moments, or a float64 copy for gradient checks).
ModelWeights allocate_weights(const ModelConfig& c, DType dtype);
// dst (from allocate_weights) = src converted element by element (FP8 dequantized).
void convert_weights(const ModelConfig& c, const ModelWeights& src, ModelWeights& dst);

// Points every MTP module's embedding and output head at the main model's: in training they
// are one tensor each (§2.2: shared embedding and output head); checkpoints still store
// the copies under the MTP layer's names, as DeepSeek-V3's do.
void tie_mtp_shared(ModelWeights& w);

// The mutable elements of an owned float32 / float64 tensor.
template <typename T>
T* mutable_data(const Mat& m) {
  return reinterpret_cast<T*>(const_cast<uint8_t*>(m.data));
}

}  // namespace dsv3
