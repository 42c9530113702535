// The weights of a DeepSeek-V3 model, named as in the Hugging Face checkpoint, and the
// one list of them (for_each_tensor) that drives loading and validation (and, later,
// saving, initialisation and the optimiser). Matrices stay in their stored dtype (views
// into the mapped files); vectors (norms, router bias) are copied to float.
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

using Vec = std::vector<float>;

struct MlaWeights {                  // §2.1.1, shapes [out, in]
  Mat q_a_proj;                      // (q_lora_rank, hidden)            if q_lora_rank > 0
  Vec q_a_layernorm;                 // (q_lora_rank)
  Mat q_b_proj;                      // (heads*(nope+rope), q_lora_rank)
  Mat q_proj;                        // (heads*(nope+rope), hidden)      if q_lora_rank == 0
  Mat kv_a_proj_with_mqa;            // (kv_lora_rank + rope, hidden): latent, then shared k_pe
  Vec kv_a_layernorm;                // (kv_lora_rank)
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
  Vec e_score_correction_bias;        // (n_routed_experts), noaux_tc only: selects, never weighs
  std::vector<MlpWeights> experts;    // n_routed_experts, inter = moe_intermediate_size
  MlpWeights shared_experts;          // inter = n_shared_experts * moe_intermediate_size
};

struct LayerWeights {
  Vec input_layernorm;           // (hidden) before attention
  MlaWeights self_attn;
  Vec post_attention_layernorm;  // (hidden) before the FFN
  bool is_moe = false;
  MlpWeights mlp;                // dense layers
  MoeWeights moe;                // MoE layers
};

struct MtpWeights {       // §2.2, stored as layer num_hidden_layers + k
  Mat embed_tokens;       // (vocab, hidden): a copy of the main embedding
  Vec enorm, hnorm;       // (hidden): RMSNorm of the token embedding / of the previous hidden state
  Mat eh_proj;            // (hidden, 2*hidden): projects [enorm(emb); hnorm(h)]
  LayerWeights block;     // one transformer block
  Vec shared_head_norm;   // (hidden)
  Mat shared_head_head;   // (vocab, hidden): a copy of lm_head
};

struct ModelWeights {
  Mat embed_tokens;                 // (vocab, hidden)
  std::vector<LayerWeights> layers;
  Vec norm;                         // (hidden)
  Mat lm_head;                      // (vocab, hidden)
  std::vector<MtpWeights> mtp;      // num_nextn_predict_layers
  std::vector<Vec> fp8_scales;      // storage behind the Mats' scale_inv
};

// One tensor of the model as the checkpoint names it.
struct TensorSlot {
  std::string name;              // HF name, e.g. "model.layers.3.self_attn.kv_b_proj.weight"
  std::vector<int64_t> shape;    // expected stored shape
  Mat* mat = nullptr;            // set for matrices...
  Vec* vec = nullptr;            // ...or for vectors
  bool fp8_quantizable = false;  // stored as F8_E4M3 + _scale_inv in FP8 checkpoints
};

// Visits every tensor of the model once, in checkpoint order of layers.
void for_each_tensor(const ModelConfig& c, ModelWeights& w, const std::function<void(const TensorSlot&)>& fn);

// Loads and validates every tensor from ckpt: shapes, dtypes, FP8 scales (finite, > 0),
// no tensor missing, none unexpected. Errors name the file and the tensor.
ModelWeights load_weights(const ModelConfig& c, const Checkpoint& ckpt);

}  // namespace dsv3
