// ModelConfig: the fields of a DeepSeek-V3 (or V2 / V2-Lite) config.json that shape the
// model, parsed and validated once. Variants are enums, never guessed from tensors.
// Uses core only (the JSON parser stays inside config.cpp).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dsv3 {

enum class ScoreFunc { sigmoid, softmax };                       // scoring_func
enum class TopkMethod { greedy, group_limited_greedy, noaux_tc };  // topk_method

// rope_scaling {type: "yarn", ...}: YaRN (arXiv 2309.00071) as in DeepSeek-V3 §4.3.
struct YarnScaling {
  bool enabled = false;
  double factor = 1, beta_fast = 32, beta_slow = 1;
  double mscale = 1, mscale_all_dim = 0;  // HF defaults when the keys are absent
  int64_t original_max_position_embeddings = 0;
};

struct ModelConfig {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;   // dense SwiGLU layers
  int64_t num_hidden_layers = 0;   // main model; MTP modules follow at this index
  int64_t num_attention_heads = 0;
  // MLA (§2.1.1)
  int64_t q_lora_rank = 0;  // 0: queries use q_proj directly (V2-Lite)
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_head_dim = 0, qk_rope_head_dim = 0, v_head_dim = 0;
  int64_t max_position_embeddings = 0;
  double rope_theta = 10000;
  YarnScaling rope_scaling;
  float rms_norm_eps = 1e-6f;
  // DeepSeekMoE (§2.1.2); n_routed_experts == 0 means every layer is dense
  int64_t n_routed_experts = 0, n_shared_experts = 0, num_experts_per_tok = 0;
  int64_t moe_intermediate_size = 0;
  int64_t first_k_dense_replace = 0, moe_layer_freq = 1;
  int64_t n_group = 1, topk_group = 1;
  // Node-limited routing (§2.1.2): the routed experts in `nodes` equal ranges (the experts
  // each node holds), each token's experts on at most max_nodes of them, chosen by the sum
  // of each node's floor(k / max_nodes) (at least 1) highest affinities (+ bias). dsv3's
  // extension of config.json, "node_limited_routing": {"nodes": N, "max_nodes": M} (dsv3
  // train --ep-nodes, --max-nodes); applied before the group limit. nodes = 1: off.
  int64_t route_nodes = 1, route_max_nodes = 1;
  ScoreFunc scoring_func = ScoreFunc::softmax;
  TopkMethod topk_method = TopkMethod::greedy;
  bool norm_topk_prob = false;
  double routed_scaling_factor = 1.0;
  // MTP (§2.2)
  int64_t num_nextn_predict_layers = 0;
  // tokens
  int64_t bos_token_id = -1;
  std::vector<int64_t> eos_token_ids;
  bool tie_word_embeddings = false;
  // quantization_config {quant_method: fp8, fmt: e4m3, weight_block_size: [128, 128]}
  bool fp8_weights = false;

  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  bool is_moe_layer(int64_t layer) const {
    return n_routed_experts > 0 && layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
  }
  bool is_eos(int64_t id) const;

  // `what` names the source in errors ("DIR/config.json").
  static ModelConfig parse(const std::string& json_text, const std::string& what);
  static ModelConfig load(const std::string& path);
};

}  // namespace dsv3
