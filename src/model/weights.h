// The weights of a DeepSeek-V3 model, named as in the Hugging Face checkpoint, and the
// one list of them (for_each_tensor) that drives loading, validation, the flat layout of
// training parameters, gradients and optimiser state, and saving. Every tensor is a Mat
// (a vector is one row). Loaded matrices stay in their stored dtype (views into the mapped
// files); loaded vectors (norms, router bias) are converted to float32 storage owned here.
// Allocated weights (training) are one aligned allocation, laid out by the list.
// Uses core, io and backend/ops.h (for Mat) only.
#pragma once
#include <cstdlib>
#include <functional>
#include <memory>
#include <span>
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

// The MTP modules' embedding and output head: their own tensors, as checkpoints store them,
// or the main model's (§2.2: shared in training, so laid out, updated and summed once).
enum class MtpTying { copies, tied };

// Where each tensor of an allocation starts: a cache line, one AVX-512 register.
constexpr size_t kFlatAlignment = 64;  // bytes

// allocate_weights' one allocation: every tensor of the list in for_each_tensor order, each
// start 64-byte aligned, the padding between them zero. Empty for load_weights' views.
// Parameters and gradients laid out alike can be treated as one array (all-reduce, ZeRO).
struct FlatWeights {
  DType dtype = DType::f32;
  MtpTying mtp = MtpTying::copies;
  int64_t numel = 0;        // elements, padding included
  uint8_t* data = nullptr;  // 64-byte aligned

  template <typename T>
  std::span<T> as() const {
    return {reinterpret_cast<T*>(data), size_t(numel)};
  }
  size_t bytes() const { return size_t(numel) * dtype_size(dtype); }
  // Elements from data to m's first element (m must point into this allocation).
  int64_t offset_of(const Mat& m) const { return int64_t(m.data - data) / int64_t(dtype_size(dtype)); }

  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<uint8_t, Free> owner;  // data lies inside it
};

struct ModelWeights {
  // Unshaped: for_each_tensor refuses it. Use ModelWeights(config).
  ModelWeights() = default;
  // Shaped for c (layers, each MoE layer's experts, MTP modules), every Mat empty: what
  // for_each_tensor visits. No tensor storage.
  explicit ModelWeights(const ModelConfig& c);

  Mat embed_tokens;                 // (vocab, hidden)
  std::vector<LayerWeights> layers;
  Mat norm;                         // (hidden)
  Mat lm_head;                      // (vocab, hidden)
  std::vector<MtpWeights> mtp;      // num_nextn_predict_layers
  FlatWeights flat;                 // allocate_weights: the storage behind every Mat
  std::vector<std::unique_ptr<uint8_t[]>> storage;  // load_weights: converted vectors, FP8 scales
};

// One tensor of the model as the checkpoint names it.
struct TensorSlot {
  std::string name;              // HF name, e.g. "model.layers.3.self_attn.kv_b_proj.weight"
  std::vector<int64_t> shape;    // stored shape: [out, in] for matrices, [n] for vectors
  Mat* mat = nullptr;
  bool fp8_quantizable = false;  // stored as F8_E4M3 + _scale_inv in FP8 checkpoints
  bool trainable = true;         // false: e_score_correction_bias (moved by balancing, not gradients)
  bool mtp = false;              // part of an MTP module (layer num_hidden_layers + k)
  const Mat* copy_of = nullptr;  // an MTP module's embedding / head: the main model's tensor it copies
};

// Visits every tensor of the model once, in checkpoint order of layers. Only visits: w must
// be shaped for c (ModelWeights(c), load_weights, allocate_weights), else it fails saying so.
void for_each_tensor(const ModelConfig& c, ModelWeights& w, const std::function<void(const TensorSlot&)>& fn);

// Every tensor once, in for_each_tensor's order.
std::vector<TensorSlot> list_tensors(const ModelConfig& c, ModelWeights& w);

// Loads and validates every tensor from ckpt: shapes, dtypes, FP8 scales (finite, > 0),
// no tensor missing, none unexpected. Errors name the file and the tensor.
ModelWeights load_weights(const ModelConfig& c, const Checkpoint& ckpt);

// Where each tensor of the list lies in allocate_weights(c, dtype, mtp).flat, computed from
// the list alone (no storage): offsets in elements, each a multiple of 64 bytes; a tied MTP
// copy has its main tensor's offset and takes no space of its own.
struct FlatTensor {
  std::string name;
  std::vector<int64_t> shape;
  int64_t offset = 0, numel = 0;
  bool trainable = true, mtp = false;
  bool tied = false;  // an MTP copy laid out as the main model's tensor (MtpTying::tied)
};
struct FlatLayout {
  DType dtype = DType::f32;
  MtpTying mtp = MtpTying::copies;
  std::vector<FlatTensor> tensors;  // for_each_tensor order
  int64_t numel = 0;                // of the allocation, padding included
};
FlatLayout flat_layout(const ModelConfig& c, DType dtype, MtpTying mtp = MtpTying::copies);

// Weights of dtype F32 or F64 in one zeroed allocation laid out by flat_layout (training
// parameters and gradients, or a float64 copy for gradient checks). MtpTying::tied points
// the MTP modules' embedding and head at the main model's, as tie_mtp_shared does, with no
// dead copies in the allocation.
ModelWeights allocate_weights(const ModelConfig& c, DType dtype, MtpTying mtp = MtpTying::copies);
// dst (from allocate_weights) = src converted element by element (FP8 dequantized).
void convert_weights(const ModelConfig& c, const ModelWeights& src, ModelWeights& dst);

// Points every MTP module's embedding and output head at the main model's: in training they
// are one tensor each (§2.2: shared embedding and output head); checkpoints still store
// the copies under the MTP layer's names, as DeepSeek-V3's do. On weights allocated with
// MtpTying::copies this leaves the copies' space unused; MtpTying::tied does not lay it out.
void tie_mtp_shared(ModelWeights& w);

// The mutable elements of an owned float32 / float64 tensor.
template <typename T>
T* mutable_data(const Mat& m) {
  return reinterpret_cast<T*>(const_cast<uint8_t*>(m.data));
}

}  // namespace dsv3
