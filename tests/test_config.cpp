// ModelConfig::parse: the golden config.json files parse to the fields their README lists,
// fields that do not shape the model are ignored, and each invalid or unsupported config
// (made by editing a golden config.json) fails with a message naming the field.
#include "malformed_util.h"
#include "model/config.h"

namespace dsv3 {
namespace {

using test::HasSubstr;
using test::json;

constexpr char kWhat[] = "edited/config.json";

json golden_config(const std::string& name) {
  return json::parse(test::read_bytes(test::golden_dir(name) + "/config.json"));
}

// Every field of c, one per line, so two configs compare as strings.
std::string summary(const ModelConfig& c) {
  std::ostringstream os;
  os << c.vocab_size << ' ' << c.hidden_size << ' ' << c.intermediate_size << ' ' << c.num_hidden_layers << ' '
     << c.num_attention_heads << '\n'
     << c.q_lora_rank << ' ' << c.kv_lora_rank << ' ' << c.qk_nope_head_dim << ' ' << c.qk_rope_head_dim << ' '
     << c.v_head_dim << ' ' << c.max_position_embeddings << ' ' << c.rope_theta << ' ' << c.rms_norm_eps << '\n'
     << c.rope_scaling.enabled << ' ' << c.rope_scaling.factor << ' ' << c.rope_scaling.beta_fast << ' '
     << c.rope_scaling.beta_slow << ' ' << c.rope_scaling.mscale << ' ' << c.rope_scaling.mscale_all_dim << ' '
     << c.rope_scaling.original_max_position_embeddings << '\n'
     << c.n_routed_experts << ' ' << c.n_shared_experts << ' ' << c.num_experts_per_tok << ' '
     << c.moe_intermediate_size << ' ' << c.first_k_dense_replace << ' ' << c.moe_layer_freq << ' ' << c.n_group
     << ' ' << c.topk_group << ' ' << int(c.scoring_func) << ' ' << int(c.topk_method) << ' ' << c.norm_topk_prob
     << ' ' << c.routed_scaling_factor << '\n'
     << c.num_nextn_predict_layers << ' ' << c.bos_token_id << ' ' << c.eos_token_ids.size() << ' '
     << c.tie_word_embeddings << ' ' << c.fp8_weights << '\n';
  return os.str();
}

// ---- the golden configs ----

TEST(ConfigGolden, V3Bf16) {
  const ModelConfig c = ModelConfig::load(test::golden_dir("tiny-v3-bf16") + "/config.json");
  EXPECT_EQ(c.vocab_size, 500);
  EXPECT_EQ(c.hidden_size, 144);
  EXPECT_EQ(c.intermediate_size, 272);
  EXPECT_EQ(c.num_hidden_layers, 3);
  EXPECT_EQ(c.num_attention_heads, 4);
  EXPECT_EQ(c.q_lora_rank, 96);
  EXPECT_EQ(c.kv_lora_rank, 64);
  EXPECT_EQ(c.qk_head_dim(), 48);
  EXPECT_EQ(c.v_head_dim, 32);
  EXPECT_EQ(c.max_position_embeddings, 1280);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000);
  EXPECT_FLOAT_EQ(c.rms_norm_eps, 1e-6f);
  EXPECT_TRUE(c.rope_scaling.enabled);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 40);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 32);
  EXPECT_DOUBLE_EQ(c.rope_scaling.beta_fast, 32);
  EXPECT_DOUBLE_EQ(c.rope_scaling.beta_slow, 1);
  EXPECT_DOUBLE_EQ(c.rope_scaling.mscale, 1.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.mscale_all_dim, 1.0);
  EXPECT_EQ(c.n_routed_experts, 16);
  EXPECT_EQ(c.n_shared_experts, 1);
  EXPECT_EQ(c.num_experts_per_tok, 4);
  EXPECT_EQ(c.moe_intermediate_size, 32);
  EXPECT_EQ(c.first_k_dense_replace, 1);
  EXPECT_EQ(c.n_group, 4);
  EXPECT_EQ(c.topk_group, 2);
  EXPECT_EQ(c.scoring_func, ScoreFunc::sigmoid);
  EXPECT_EQ(c.topk_method, TopkMethod::noaux_tc);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_DOUBLE_EQ(c.routed_scaling_factor, 2.5);
  EXPECT_EQ(c.num_nextn_predict_layers, 1);
  EXPECT_EQ(c.bos_token_id, 0);
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{1});
  EXPECT_TRUE(c.is_eos(1));
  EXPECT_FALSE(c.is_eos(0));
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.fp8_weights);
  EXPECT_FALSE(c.is_moe_layer(0));
  for (int64_t layer : {1, 2, 3}) EXPECT_TRUE(c.is_moe_layer(layer)) << layer;  // 3: the MTP block
}

TEST(ConfigGolden, V2LiteBf16) {
  const ModelConfig c = ModelConfig::load(test::golden_dir("tiny-v2lite-bf16") + "/config.json");
  EXPECT_EQ(c.vocab_size, 400);
  EXPECT_EQ(c.hidden_size, 128);
  EXPECT_EQ(c.intermediate_size, 240);
  EXPECT_EQ(c.q_lora_rank, 0);  // null: q_proj
  EXPECT_EQ(c.kv_lora_rank, 48);
  EXPECT_EQ(c.n_routed_experts, 12);
  EXPECT_EQ(c.n_shared_experts, 2);
  EXPECT_EQ(c.num_experts_per_tok, 3);
  EXPECT_EQ(c.moe_intermediate_size, 40);
  EXPECT_EQ(c.n_group, 1);
  EXPECT_EQ(c.topk_group, 1);
  EXPECT_EQ(c.scoring_func, ScoreFunc::softmax);
  EXPECT_EQ(c.topk_method, TopkMethod::greedy);
  EXPECT_FALSE(c.norm_topk_prob);
  EXPECT_DOUBLE_EQ(c.routed_scaling_factor, 1.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 64);
  EXPECT_DOUBLE_EQ(c.rope_scaling.mscale, 0.707);
  EXPECT_DOUBLE_EQ(c.rope_scaling.mscale_all_dim, 0.707);
  EXPECT_FALSE(c.fp8_weights);
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_TRUE(c.is_moe_layer(1));
}

TEST(ConfigGolden, V3Fp8) {
  const ModelConfig c = ModelConfig::load(test::golden_dir("tiny-v3-fp8") + "/config.json");
  EXPECT_TRUE(c.fp8_weights);
  EXPECT_EQ(c.hidden_size, 192);
  EXPECT_EQ(c.num_hidden_layers, 4);
  EXPECT_EQ(c.num_attention_heads, 3);
  EXPECT_EQ(c.q_lora_rank, 144);
  EXPECT_EQ(c.kv_lora_rank, 96);
  EXPECT_EQ(c.v_head_dim, 48);
  EXPECT_EQ(c.first_k_dense_replace, 2);
  EXPECT_EQ(c.n_routed_experts, 12);
  EXPECT_EQ(c.topk_method, TopkMethod::noaux_tc);
  for (int64_t layer : {0, 1}) EXPECT_FALSE(c.is_moe_layer(layer)) << layer;
  for (int64_t layer : {2, 3, 4}) EXPECT_TRUE(c.is_moe_layer(layer)) << layer;
}

TEST(ConfigGolden, FieldsThatDoNotShapeTheModelAreIgnored) {
  const json original = golden_config("tiny-v3-bf16");
  json edited = original;
  edited["architectures"] = {"SomeOtherArchitecture"};
  edited["transformers_version"] = "99.0";
  edited.erase("auto_map");
  edited["a_field_from_the_future"] = {{"nested", {1, 2, 3}}};
  EXPECT_EQ(summary(ModelConfig::parse(edited.dump(), kWhat)), summary(ModelConfig::parse(original.dump(), kWhat)));
}

TEST(ConfigGolden, NullQLoraRankMeansDirectQProj) {
  json j = golden_config("tiny-v3-bf16");
  j["q_lora_rank"] = nullptr;
  EXPECT_EQ(ModelConfig::parse(j.dump(), kWhat).q_lora_rank, 0);
}

// ---- invalid configs: each message names the file and the field ----

class ConfigInvalid : public testing::Test {
 protected:
  // The message for the tiny-v3-bf16 (or `base`) config after edit.
  static std::string error_after(const std::function<void(json&)>& edit, const char* base = "tiny-v3-bf16") {
    json j = golden_config(base);
    edit(j);
    return error_for(j.dump());
  }
  static std::string error_for(const std::string& text) {
    return test::error_of([&] { ModelConfig::parse(text, kWhat); });
  }
  static auto says(const std::string& text) { return HasSubstr(std::string(kWhat) + ": " + text); }
};

TEST_F(ConfigInvalid, NotJson) {
  EXPECT_THAT(error_for(R"({"vocab_size": 500,)"), says("not valid JSON"));
  EXPECT_THAT(error_for("[1, 2]"), says("not a JSON object"));
}

TEST_F(ConfigInvalid, MissingVocabSize) {
  EXPECT_THAT(error_after([](json& j) { j.erase("vocab_size"); }), says("missing field 'vocab_size'"));
}

TEST_F(ConfigInvalid, MissingQLoraRankKey) {
  EXPECT_THAT(error_after([](json& j) { j.erase("q_lora_rank"); }), says("missing field 'q_lora_rank'"));
}

TEST_F(ConfigInvalid, NonIntegerHiddenSize) {
  EXPECT_THAT(error_after([](json& j) { j["hidden_size"] = 144.5; }), says("field 'hidden_size' must be an integer"));
  EXPECT_THAT(error_after([](json& j) { j["hidden_size"] = "144"; }), says("field 'hidden_size' must be an integer"));
}

TEST_F(ConfigInvalid, KeyValueHeadsDifferFromAttentionHeads) {
  EXPECT_THAT(error_after([](json& j) { j["num_key_value_heads"] = 1; }),
              says("field 'num_key_value_heads' (1) must equal num_attention_heads (4)"));
}

TEST_F(ConfigInvalid, UnknownScoringFunc) {
  EXPECT_THAT(error_after([](json& j) { j["scoring_func"] = "relu"; }),
              says("field 'scoring_func' is 'relu'; expected sigmoid or softmax"));
}

TEST_F(ConfigInvalid, UnknownTopkMethod) {
  EXPECT_THAT(error_after([](json& j) { j["topk_method"] = "random"; }), says("field 'topk_method' is 'random'"));
}

TEST_F(ConfigInvalid, TopkGroupExceedsNGroup) {
  EXPECT_THAT(error_after([](json& j) { j["topk_group"] = 5; }), says("field 'topk_group' (5) exceeds n_group (4)"));
}

TEST_F(ConfigInvalid, NodeLimitedRouting) {
  EXPECT_THAT(error_after([](json& j) { j["node_limited_routing"] = 2; }), says("field 'node_limited_routing' must be an object"));
  EXPECT_THAT(error_after([](json& j) { j["node_limited_routing"] = {{"nodes", 3}}; }),
              says("node_limited_routing: 3 nodes do not divide the 16 routed experts"));
  EXPECT_THAT(error_after([](json& j) { j["node_limited_routing"] = {{"nodes", 2}, {"max_nodes", 3}}; }),
              says("node_limited_routing: max_nodes (3) exceeds nodes (2)"));
  EXPECT_THAT(error_after([](json& j) { j["node_limited_routing"] = {{"nodes", 8}, {"max_nodes", 1}}; }),
              says("node_limited_routing: 4 experts per token do not fit on 1 nodes of 2"));
  EXPECT_THAT(error_after([](json& j) { j["node_limited_routing"] = {{"nodes", 8}, {"max_nodes", 4}}; }),
              says("node_limited_routing: 8 nodes must hold whole expert groups (n_group 4)"));
}

TEST_F(ConfigInvalid, NGroupDoesNotDivideRoutedExperts) {
  EXPECT_THAT(error_after([](json& j) { j["n_group"] = 3; }),
              says("field 'n_group' (3) does not divide n_routed_experts (16)"));
}

TEST_F(ConfigInvalid, MoreExpertsPerTokenThanRoutedExperts) {
  EXPECT_THAT(error_after([](json& j) { j["num_experts_per_tok"] = 17; }),
              says("field 'num_experts_per_tok' (17) exceeds n_routed_experts (16)"));
}

TEST_F(ConfigInvalid, LinearRopeScaling) {
  EXPECT_THAT(error_after([](json& j) { j["rope_scaling"]["type"] = j["rope_scaling"]["rope_type"] = "linear"; }),
              says("rope_scaling type 'linear' is not supported"));
}

TEST_F(ConfigInvalid, RopeScalingTypeAndRopeTypeDisagree) {
  EXPECT_THAT(error_after([](json& j) { j["rope_scaling"]["rope_type"] = "dynamic"; }),
              says("rope_scaling 'type' (yarn) and 'rope_type' (dynamic) disagree"));
}

TEST_F(ConfigInvalid, QuantMethodOtherThanFp8) {
  EXPECT_THAT(error_after([](json& j) { j["quantization_config"]["quant_method"] = "bitsandbytes"; }, "tiny-v3-fp8"),
              says("quantization_config quant_method 'bitsandbytes' is not supported (expected fp8)"));
}

TEST_F(ConfigInvalid, WeightBlockSizeNot128x128) {
  const std::string msg = "quantization_config weight_block_size must be [128, 128]";
  for (const json& block : {json::array({64, 64}), json::array({128}), json::array({128, 64}), json("128x128")})
    EXPECT_THAT(error_after([&](json& j) { j["quantization_config"]["weight_block_size"] = block; }, "tiny-v3-fp8"),
                says(msg))
        << block.dump();
  EXPECT_THAT(error_after([](json& j) { j["quantization_config"].erase("weight_block_size"); }, "tiny-v3-fp8"),
              says(msg));
}

TEST_F(ConfigInvalid, HiddenActNotSilu) {
  EXPECT_THAT(error_after([](json& j) { j["hidden_act"] = "gelu"; }),
              says("field 'hidden_act' is 'gelu'; only silu is supported"));
}

TEST_F(ConfigInvalid, EosTokenOutsideVocabulary) {
  EXPECT_THAT(error_after([](json& j) { j["eos_token_id"] = 500; }),
              says("field 'eos_token_id' 500 is outside the vocabulary"));
  EXPECT_THAT(error_after([](json& j) { j["eos_token_id"] = {1, -1}; }),
              says("field 'eos_token_id' -1 is outside the vocabulary"));
}

}  // namespace
}  // namespace dsv3
