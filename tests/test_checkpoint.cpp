// Damaged checkpoint folders: copies of the golden checkpoints with one thing broken -
// a shard, the index, a tensor's presence, shape, dtype or FP8 scale, or config.json - must
// each fail with a message naming the file and the tensor at fault (Checkpoint for the
// folder layout, Transformer / load_weights for the model's tensors).
#include <cmath>
#include <limits>

#include "io/checkpoint.h"
#include "malformed_util.h"
#include "model/transformer.h"

namespace dsv3 {
namespace {

using namespace test;

// Sharded V2-Lite-style BF16 checkpoint: index + 2 shards.
constexpr char kSharded[] = "tiny-v2lite-bf16";
// V3-style BF16 checkpoint in a single model.safetensors.
constexpr char kSingle[] = "tiny-v3-bf16";
// FP8 checkpoint: 2 shards; this FP8 weight's scale lies in the other shard.
constexpr char kFp8[] = "tiny-v3-fp8";
constexpr char kCrossShardWeight[] = "model.layers.3.mlp.experts.3.down_proj.weight";

class CheckpointMalformed : public testing::Test {
 protected:
  std::string copy(const char* golden) { return copy_golden(dir_, golden); }
  static std::string open_error(const std::string& ckpt) {
    return error_of([&] { Checkpoint c(ckpt); });
  }
  static std::string load_error(const std::string& ckpt) {
    return error_of([&] { Transformer t(ckpt); });
  }
  ScratchDir dir_;
};

TEST_F(CheckpointMalformed, TheUndamagedCopiesLoad) {
  for (const char* name : {kSharded, kSingle, kFp8}) EXPECT_NO_THROW(Transformer t(copy(name))) << name;
}

// ---- folder layout (Checkpoint) ----

TEST_F(CheckpointMalformed, TruncatedShard) {
  const std::string ckpt = copy(kSharded);
  const std::string shard = ckpt + "/model-00002-of-00002.safetensors";
  // The tensor stored last in the file is the one cut short.
  std::string last;
  {
    SafetensorsFile f(shard);
    const uint8_t* last_end = nullptr;
    for (const auto& [name, v] : f.tensors())
      if (v.data + v.nbytes > last_end) last_end = v.data + v.nbytes, last = name;
  }
  truncate_by(shard, 2);
  EXPECT_THAT(open_error(ckpt), AllOf(HasSubstr(shard + ": tensor " + last + ": data_offsets"),
                                      HasSubstr("run past the data section")));
}

TEST_F(CheckpointMalformed, IndexNotValidJson) {
  const std::string ckpt = copy(kSharded);
  const std::string index = ckpt + "/" + kIndexFile;
  write_bytes(index, read_bytes(index).substr(0, 100));
  EXPECT_THAT(open_error(ckpt), HasSubstr(index + ": not valid JSON"));
}

TEST_F(CheckpointMalformed, IndexUnreadable) {
  const std::string ckpt = copy(kSharded);
  const std::string index = ckpt + "/" + kIndexFile;
  fs::remove(index);
  fs::create_directory(index);
  EXPECT_THAT(open_error(ckpt), HasSubstr(index + ": is a directory, not an index file"));
}

TEST_F(CheckpointMalformed, IndexWithoutWeightMap) {
  const std::string ckpt = copy(kSharded);
  const std::string index = ckpt + "/" + kIndexFile;
  edit_json(index, [](json& j) { j.erase("weight_map"); });
  EXPECT_THAT(open_error(ckpt), HasSubstr(index + ": missing \"weight_map\" object"));
}

TEST_F(CheckpointMalformed, WeightMapPointsToMissingFile) {
  const std::string ckpt = copy(kSharded);
  const std::string index = ckpt + "/" + kIndexFile;
  edit_json(index, [](json& j) { j["weight_map"]["model.norm.weight"] = "model-00003-of-00002.safetensors"; });
  EXPECT_THAT(open_error(ckpt), HasSubstr(index + ": tensor model.norm.weight is mapped to "
                                                  "model-00003-of-00002.safetensors, which does not exist"));
}

TEST_F(CheckpointMalformed, WeightMapNamesTensorTheShardLacks) {
  const std::string ckpt = copy(kSharded);
  const std::string name = "model.layers.0.mlp.gate_proj.weight";
  const std::string shard = file_holding(ckpt, name);
  rewrite_safetensors(shard, [&](OwnedFile& f) { f.erase(name); });  // the index still lists it
  EXPECT_THAT(open_error(ckpt), HasSubstr(shard + ": has no tensor " + name + ", though the index maps it there"));
}

TEST_F(CheckpointMalformed, ShardHoldsTensorTheIndexDoesNotList) {
  const std::string ckpt = copy(kSharded);
  const std::string name = "model.layers.2.self_attn.kv_a_layernorm.weight";
  const std::string shard = file_holding(ckpt, name);
  edit_json(ckpt + "/" + kIndexFile, [&](json& j) { j["weight_map"].erase(name); });
  EXPECT_THAT(open_error(ckpt),
              HasSubstr(shard + ": tensor " + name + " is not listed for this file in model.safetensors.index.json"));
}

TEST_F(CheckpointMalformed, FolderWithNeitherWeightsNorIndex) {
  const std::string ckpt = copy(kSingle);
  fs::remove(ckpt + "/model.safetensors");
  EXPECT_THAT(open_error(ckpt), HasSubstr(ckpt + ": no model.safetensors or model.safetensors.index.json"));
}

// ---- the model's tensors (Transformer -> load_weights) ----

TEST_F(CheckpointMalformed, MissingTensor) {
  const std::string ckpt = copy(kSingle);
  drop_tensor(ckpt, "model.layers.1.mlp.experts.7.up_proj.weight");
  EXPECT_THAT(load_error(ckpt), HasSubstr(ckpt + ": tensor model.layers.1.mlp.experts.7.up_proj.weight is missing"));
}

TEST_F(CheckpointMalformed, UnexpectedExtraTensor) {
  const std::string ckpt = copy(kSingle);
  rewrite_holding(ckpt, "model.norm.weight",
                  [](OwnedFile& f) { f.add("model.layers.0.self_attn.extra.weight", DType::bf16, {2, 3}); });
  EXPECT_THAT(load_error(ckpt), HasSubstr(ckpt + "/model.safetensors: unexpected tensor "
                                                 "model.layers.0.self_attn.extra.weight"));
}

TEST_F(CheckpointMalformed, WrongShape) {
  const std::string ckpt = copy(kSingle);
  const std::string name = "model.layers.0.self_attn.o_proj.weight";  // [hidden 144, heads*v 128]
  rewrite_holding(ckpt, name, [&](OwnedFile& f) { f.at(name).shape = {128, 144}; });
  EXPECT_THAT(load_error(ckpt), HasSubstr(ckpt + "/model.safetensors: tensor " + name +
                                          ": shape [128, 144] but config.json implies [144, 128]"));
}

TEST_F(CheckpointMalformed, WrongDtypeForNorm) {
  const std::string ckpt = copy(kSingle);
  rewrite_holding(ckpt, "model.norm.weight", [](OwnedFile& f) {
    f.erase("model.norm.weight");
    f.add("model.norm.weight", DType::i32, {144});
  });
  EXPECT_THAT(load_error(ckpt), HasSubstr(ckpt + "/model.safetensors: tensor model.norm.weight: dtype I32 is not "
                                                 "supported for this tensor (F32, BF16, F16)"));
}

TEST_F(CheckpointMalformed, WrongDtypeForMatrix) {
  const std::string ckpt = copy(kSingle);
  const std::string name = "model.layers.0.self_attn.o_proj.weight";
  rewrite_holding(ckpt, name, [&](OwnedFile& f) {
    f.erase(name);
    f.add(name, DType::i8, {144, 128});
  });
  EXPECT_THAT(load_error(ckpt), HasSubstr(ckpt + "/model.safetensors: tensor " + name +
                                          ": dtype I8 is not supported (F32, BF16, F16, F8_E4M3)"));
}

TEST_F(CheckpointMalformed, ConfigMismatchedToWeights) {
  const std::string ckpt = copy(kSingle);
  edit_json(ckpt + "/config.json", [](json& j) { j["hidden_size"] = 160; });
  EXPECT_THAT(load_error(ckpt), HasSubstr(ckpt + "/model.safetensors: tensor model.embed_tokens.weight: shape "
                                                 "[500, 144] but config.json implies [500, 160]"));
}

// ---- FP8 weights and their block scales ----

TEST_F(CheckpointMalformed, Fp8WeightWithoutScale) {
  const std::string ckpt = copy(kFp8);
  const std::string weight = kCrossShardWeight;
  drop_tensor(ckpt, weight + "_scale_inv");
  EXPECT_THAT(load_error(ckpt), HasSubstr(ckpt + ": tensor " + weight + "_scale_inv is missing (FP8 weight " +
                                          weight + " needs it)"));
}

TEST_F(CheckpointMalformed, Fp8ScaleWithWrongShape) {
  const std::string ckpt = copy(kFp8);
  const std::string weight = "model.layers.0.mlp.down_proj.weight";  // [192, 320]: scales [2, 3]
  const std::string scale = weight + "_scale_inv";
  rewrite_holding(ckpt, scale, [&](OwnedFile& f) { f.at(scale).shape = {3, 2}; });
  EXPECT_THAT(load_error(ckpt), HasSubstr(file_holding(ckpt, scale) + ": tensor " + scale + ": shape [3, 2] but " +
                                          weight + " needs [2, 3]"));
}

TEST_F(CheckpointMalformed, Fp8ScaleWithWrongDtype) {
  const std::string ckpt = copy(kFp8);
  const std::string scale = std::string(kCrossShardWeight) + "_scale_inv";  // F32 [2, 1]
  rewrite_holding(ckpt, scale, [&](OwnedFile& f) {
    f.erase(scale);
    f.add(scale, DType::bf16, {2, 1});
  });
  EXPECT_THAT(load_error(ckpt),
              HasSubstr(file_holding(ckpt, scale) + ": tensor " + scale + ": dtype BF16, expected F32"));
}

TEST_F(CheckpointMalformed, Fp8WeightWithoutQuantizationConfig) {
  const std::string ckpt = copy(kFp8);
  edit_json(ckpt + "/config.json", [](json& j) { j.erase("quantization_config"); });
  const std::string weight = "model.layers.0.self_attn.q_a_proj.weight";  // the first FP8 tensor loaded
  EXPECT_THAT(load_error(ckpt), HasSubstr(file_holding(ckpt, weight) + ": tensor " + weight +
                                          ": is F8_E4M3 but config.json has no fp8 quantization_config"));
}

TEST_F(CheckpointMalformed, Fp8ForTensorThatStaysBf16) {
  const std::string ckpt = copy(kFp8);
  rewrite_holding(ckpt, "lm_head.weight", [](OwnedFile& f) {
    f.erase("lm_head.weight");
    f.add("lm_head.weight", DType::f8_e4m3, {450, 192});
  });
  EXPECT_THAT(load_error(ckpt), HasSubstr(file_holding(ckpt, "lm_head.weight") +
                                          ": tensor lm_head.weight: F8_E4M3 is not expected for this tensor"));
}

// A bad value in block (1, 1) of a [2, 3] scale grid: NaN, infinity, zero or negative.
struct BadScale {
  const char* label;
  float value;
  const char* printed;
};

class Fp8BadScale : public CheckpointMalformed, public testing::WithParamInterface<BadScale> {};

TEST_P(Fp8BadScale, IsRejectedNamingTheBlock) {
  const std::string ckpt = copy(kFp8);
  const std::string scale = "model.layers.0.mlp.down_proj.weight_scale_inv";  // F32 [2, 3]
  rewrite_holding(ckpt, scale, [&](OwnedFile& f) { f.at(scale).set<float>(1 * 3 + 1, GetParam().value); });
  EXPECT_THAT(load_error(ckpt), HasSubstr(file_holding(ckpt, scale) + ": tensor " + scale + ": block 1,1 has scale " +
                                          GetParam().printed + "; scales must be finite and positive"));
}

INSTANTIATE_TEST_SUITE_P(Values, Fp8BadScale,
                         testing::Values(BadScale{"NaN", std::numeric_limits<float>::quiet_NaN(), "nan"},
                                         BadScale{"Inf", std::numeric_limits<float>::infinity(), "inf"},
                                         BadScale{"Zero", 0.0f, "0"},
                                         BadScale{"Negative", -0.5f, "-0.5"}),
                         [](const testing::TestParamInfo<BadScale>& info) { return std::string(info.param.label); });

}  // namespace
}  // namespace dsv3
