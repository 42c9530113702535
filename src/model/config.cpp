// config.json parsing and validation. Every error names the field.
#include "model/config.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"

namespace dsv3 {

using json = nlohmann::json;

namespace {

struct Reader {
  const json& j;
  std::string what;

  const json* get(const char* key) const {
    auto it = j.find(key);
    return it == j.end() || it->is_null() ? nullptr : &*it;
  }
  int64_t integer(const char* key, int64_t min, const int64_t* fallback = nullptr) const {
    const json* v = get(key);
    if (!v) {
      if (fallback) return *fallback;
      fail(what, ": missing field '", key, "'");
    }
    if (!v->is_number_integer()) fail(what, ": field '", key, "' must be an integer");
    int64_t x = v->get<int64_t>();
    if (x < min) fail(what, ": field '", key, "' is ", x, ", must be >= ", min);
    return x;
  }
  int64_t integer_or(const char* key, int64_t min, int64_t fallback) const { return integer(key, min, &fallback); }
  double number(const char* key, const double* fallback = nullptr) const {
    const json* v = get(key);
    if (!v) {
      if (fallback) return *fallback;
      fail(what, ": missing field '", key, "'");
    }
    if (!v->is_number()) fail(what, ": field '", key, "' must be a number");
    double x = v->get<double>();
    if (!std::isfinite(x)) fail(what, ": field '", key, "' is not finite");
    return x;
  }
  double number_or(const char* key, double fallback) const { return number(key, &fallback); }
  bool boolean_or(const char* key, bool fallback) const {
    const json* v = get(key);
    if (!v) return fallback;
    if (!v->is_boolean()) fail(what, ": field '", key, "' must be true or false");
    return v->get<bool>();
  }
  std::string string_or(const char* key, const std::string& fallback) const {
    const json* v = get(key);
    if (!v) return fallback;
    if (!v->is_string()) fail(what, ": field '", key, "' must be a string");
    return v->get<std::string>();
  }
};

}  // namespace

bool ModelConfig::is_eos(int64_t id) const {
  return std::find(eos_token_ids.begin(), eos_token_ids.end(), id) != eos_token_ids.end();
}

ModelConfig ModelConfig::parse(const std::string& text, const std::string& what) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    fail(what, ": not valid JSON: ", e.what());
  }
  if (!j.is_object()) fail(what, ": not a JSON object");
  Reader r{j, what};
  ModelConfig c;

  const std::string model_type = r.string_or("model_type", "deepseek_v3");
  if (model_type != "deepseek_v3" && model_type != "deepseek_v2")
    fail(what, ": field 'model_type' is '", model_type, "'; dsv3 runs deepseek_v3 and deepseek_v2 models");
  const std::string act = r.string_or("hidden_act", "silu");
  if (act != "silu") fail(what, ": field 'hidden_act' is '", act, "'; only silu is supported");
  if (r.boolean_or("attention_bias", false)) fail(what, ": field 'attention_bias' true is not supported");

  c.vocab_size = r.integer("vocab_size", 1);
  c.hidden_size = r.integer("hidden_size", 1);
  c.intermediate_size = r.integer("intermediate_size", 1);
  c.num_hidden_layers = r.integer("num_hidden_layers", 1);
  c.num_attention_heads = r.integer("num_attention_heads", 1);
  const int64_t kv_heads = r.integer_or("num_key_value_heads", 1, c.num_attention_heads);
  if (kv_heads != c.num_attention_heads)
    fail(what, ": field 'num_key_value_heads' (", kv_heads, ") must equal num_attention_heads (",
         c.num_attention_heads, "): MLA has one latent shared by all heads");
  if (!j.contains("q_lora_rank")) fail(what, ": missing field 'q_lora_rank' (null for direct q_proj)");
  c.q_lora_rank = r.integer_or("q_lora_rank", 1, 0);
  c.kv_lora_rank = r.integer("kv_lora_rank", 1);
  c.qk_nope_head_dim = r.integer("qk_nope_head_dim", 1);
  c.qk_rope_head_dim = r.integer("qk_rope_head_dim", 2);
  if (c.qk_rope_head_dim % 2) fail(what, ": field 'qk_rope_head_dim' must be even");
  c.v_head_dim = r.integer("v_head_dim", 1);
  c.max_position_embeddings = r.integer("max_position_embeddings", 1);
  c.rope_theta = r.number("rope_theta");
  if (c.rope_theta <= 1) fail(what, ": field 'rope_theta' must be > 1");
  c.rms_norm_eps = float(r.number_or("rms_norm_eps", 1e-6));
  if (!(c.rms_norm_eps > 0)) fail(what, ": field 'rms_norm_eps' must be > 0");

  if (const json* rs = r.get("rope_scaling")) {
    if (!rs->is_object()) fail(what, ": field 'rope_scaling' must be an object or null");
    Reader s{*rs, what + ": rope_scaling"};
    const std::string type = s.string_or("type", ""), rope_type = s.string_or("rope_type", "");
    if (!type.empty() && !rope_type.empty() && type != rope_type)
      fail(what, ": rope_scaling 'type' (", type, ") and 'rope_type' (", rope_type, ") disagree");
    const std::string t = type.empty() ? rope_type : type;
    if (t != "yarn")
      fail(what, ": rope_scaling type '", t, "' is not supported (dsv3 implements yarn, as DeepSeek-V3 uses)");
    YarnScaling& y = c.rope_scaling;
    y.enabled = true;
    y.factor = s.number("factor");
    if (y.factor < 1) fail(what, ": rope_scaling field 'factor' must be >= 1");
    y.original_max_position_embeddings = s.integer("original_max_position_embeddings", 1);
    y.beta_fast = s.number_or("beta_fast", 32);
    y.beta_slow = s.number_or("beta_slow", 1);
    y.mscale = s.number_or("mscale", 1);
    y.mscale_all_dim = s.number_or("mscale_all_dim", 0);
    if (y.beta_fast <= 0 || y.beta_slow <= 0 || y.beta_fast < y.beta_slow)
      fail(what, ": rope_scaling needs beta_fast >= beta_slow > 0");
  }

  const int64_t no_experts = 0;
  c.n_routed_experts = r.integer("n_routed_experts", 0, &no_experts);
  if (c.n_routed_experts > 0) {
    c.n_shared_experts = r.integer_or("n_shared_experts", 0, 0);
    c.num_experts_per_tok = r.integer("num_experts_per_tok", 1);
    c.moe_intermediate_size = r.integer("moe_intermediate_size", 1);
    c.first_k_dense_replace = r.integer_or("first_k_dense_replace", 0, 0);
    c.moe_layer_freq = r.integer_or("moe_layer_freq", 1, 1);
    c.n_group = r.integer_or("n_group", 1, 1);
    c.topk_group = r.integer_or("topk_group", 1, 1);
    const std::string sf = r.string_or("scoring_func", "softmax");
    if (sf == "sigmoid") c.scoring_func = ScoreFunc::sigmoid;
    else if (sf == "softmax") c.scoring_func = ScoreFunc::softmax;
    else fail(what, ": field 'scoring_func' is '", sf, "'; expected sigmoid or softmax");
    const std::string tm = r.string_or("topk_method", "greedy");
    if (tm == "greedy") c.topk_method = TopkMethod::greedy;
    else if (tm == "group_limited_greedy") c.topk_method = TopkMethod::group_limited_greedy;
    else if (tm == "noaux_tc") c.topk_method = TopkMethod::noaux_tc;
    else fail(what, ": field 'topk_method' is '", tm, "'; expected greedy, group_limited_greedy or noaux_tc");
    c.norm_topk_prob = r.boolean_or("norm_topk_prob", false);
    c.routed_scaling_factor = r.number_or("routed_scaling_factor", 1.0);
    if (c.num_experts_per_tok > c.n_routed_experts)
      fail(what, ": field 'num_experts_per_tok' (", c.num_experts_per_tok, ") exceeds n_routed_experts (",
           c.n_routed_experts, ")");
    if (c.n_routed_experts % c.n_group)
      fail(what, ": field 'n_group' (", c.n_group, ") does not divide n_routed_experts (", c.n_routed_experts, ")");
    if (c.topk_group > c.n_group)
      fail(what, ": field 'topk_group' (", c.topk_group, ") exceeds n_group (", c.n_group, ")");
    if (c.topk_method != TopkMethod::greedy &&
        c.num_experts_per_tok > c.topk_group * (c.n_routed_experts / c.n_group))
      fail(what, ": field 'num_experts_per_tok' (", c.num_experts_per_tok, ") exceeds the experts in topk_group (",
           c.topk_group, ") groups");
    if (const json* nl = r.get("node_limited_routing")) {
      if (!nl->is_object()) fail(what, ": field 'node_limited_routing' must be an object");
      Reader n{*nl, what + ": node_limited_routing"};
      c.route_nodes = n.integer("nodes", 1);
      c.route_max_nodes = n.integer_or("max_nodes", 1, c.route_nodes);
      const int64_t E = c.n_routed_experts, k = c.num_experts_per_tok;
      if (E % c.route_nodes) fail(what, ": node_limited_routing: ", c.route_nodes, " nodes do not divide the ", E, " routed experts");
      if (c.route_max_nodes > c.route_nodes)
        fail(what, ": node_limited_routing: max_nodes (", c.route_max_nodes, ") exceeds nodes (", c.route_nodes, ")");
      if (k > c.route_max_nodes * (E / c.route_nodes))
        fail(what, ": node_limited_routing: ", k, " experts per token do not fit on ", c.route_max_nodes, " nodes of ",
             E / c.route_nodes);
      if (c.topk_method != TopkMethod::greedy && c.n_group > 1) {
        if (c.n_group % c.route_nodes)
          fail(what, ": node_limited_routing: ", c.route_nodes, " nodes must hold whole expert groups (n_group ", c.n_group, ")");
        if (k > std::min(c.topk_group, c.route_max_nodes * (c.n_group / c.route_nodes)) * (E / c.n_group))
          fail(what, ": node_limited_routing: ", k, " experts per token do not fit in the groups of ", c.route_max_nodes,
               " nodes");
      }
    }
    if (c.topk_method == TopkMethod::noaux_tc && c.n_routed_experts / c.n_group < 2)
      fail(what, ": topk_method noaux_tc scores groups by their top-2 experts; groups need >= 2 experts");
    if (c.first_k_dense_replace > c.num_hidden_layers)
      fail(what, ": field 'first_k_dense_replace' exceeds num_hidden_layers");
  }
  c.num_nextn_predict_layers = r.integer_or("num_nextn_predict_layers", 0, 0);
  c.tie_word_embeddings = r.boolean_or("tie_word_embeddings", false);
  c.bos_token_id = r.integer_or("bos_token_id", 0, -1);
  if (const json* eos = r.get("eos_token_id")) {
    if (eos->is_number_integer()) c.eos_token_ids.push_back(eos->get<int64_t>());
    else if (eos->is_array()) {
      for (const json& e : *eos) {
        if (!e.is_number_integer()) fail(what, ": field 'eos_token_id' must hold integers");
        c.eos_token_ids.push_back(e.get<int64_t>());
      }
    } else fail(what, ": field 'eos_token_id' must be an integer or a list of integers");
  }
  for (int64_t id : c.eos_token_ids)
    if (id < 0 || id >= c.vocab_size) fail(what, ": field 'eos_token_id' ", id, " is outside the vocabulary");

  if (const json* q = r.get("quantization_config")) {
    if (!q->is_object()) fail(what, ": field 'quantization_config' must be an object");
    Reader s{*q, what + ": quantization_config"};
    const std::string method = s.string_or("quant_method", "");
    if (method != "fp8")
      fail(what, ": quantization_config quant_method '", method, "' is not supported (expected fp8)");
    const std::string fmt = s.string_or("fmt", "e4m3");
    if (fmt != "e4m3") fail(what, ": quantization_config fmt '", fmt, "' is not supported (expected e4m3)");
    const std::string act = s.string_or("activation_scheme", "dynamic");
    if (act != "dynamic")
      fail(what, ": quantization_config activation_scheme '", act, "' is not supported (expected dynamic)");
    const json* block = s.get("weight_block_size");
    if (!block || !block->is_array() || block->size() != 2 || (*block)[0] != 128 || (*block)[1] != 128)
      fail(what, ": quantization_config weight_block_size must be [128, 128]");
    c.fp8_weights = true;
  }
  return c;
}

ModelConfig ModelConfig::load(const std::string& path) {
  std::ifstream in(path);
  if (!in) fail(path, ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  return parse(ss.str(), path);
}

}  // namespace dsv3
