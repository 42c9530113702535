// dsv3 export: BF16 and FP8 (DeepSeek-V3's release format) checkpoints that load and give
// the source's logits within the format's rounding. The FP8 encoder is checked against the
// golden FP8 checkpoint, whose codes and scales were written by an independent encoder.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "cli_util.h"
#include "core/dtype.h"
#include "core/error.h"
#include "golden_util.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "model/transformer.h"
#include "train/checkpoint.h"
#include "train/export.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

class ExportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = ::testing::TempDir() + "/dsv3-export-" + ::testing::UnitTest::GetInstance()->current_test_info()->name();
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // A float32 copy of a checkpoint folder, as a training checkpoint holds its weights (no
  // quantization_config), with a tokenizer-like file beside it.
  std::string float32_copy(const std::string& src) {
    const std::string dst = dir_ + "/f32-source";
    fs::create_directories(dst);
    Transformer model(src);
    const ModelConfig& c = model.config();
    ModelWeights w = allocate_weights(c, DType::f32);
    convert_weights(c, model.weights(), w);
    std::vector<TensorToWrite> tensors;
    for (const TensorSlot& s : list_tensors(c, w)) tensors.push_back({s.name, DType::f32, s.shape, s.mat->data});
    write_safetensors(dst + "/model.safetensors", tensors);
    json cfg = json::parse(read_text(src + "/config.json"));
    cfg.erase("quantization_config");
    write_text(dst + "/config.json", cfg.dump(2));
    write_text(dst + "/tokenizer_config.json", "{\"bos_token\": null}\n");
    write_text(dst + "/trainer_state.json", "{}\n");  // a training checkpoint's: not exported
    return dst;
  }

  static std::vector<float> logits(const std::string& dir, const std::vector<int32_t>& ids) {
    Transformer model(dir);
    KvCache cache(model.config(), int64_t(ids.size()));
    std::vector<float> out(ids.size() * size_t(model.config().vocab_size));
    model.forward(ids.data(), int64_t(ids.size()), cache, out.data(), true);
    return out;
  }

  std::string dir_;
};

const std::vector<int32_t> kIds = {0, 17, 3, 99, 250, 41, 7, 300, 12, 5};

// BF16 values pass through float32 exactly: a BF16 export of a BF16 release is that release.
TEST_F(ExportTest, Bf16OfBf16IsExact) {
  const std::string src = test::golden_dir("tiny-v3-bf16"), out = dir_ + "/bf16";
  const ExportSummary s = export_checkpoint(src, out, {.dtype = DType::bf16});
  EXPECT_EQ(s.shards, 1);
  EXPECT_EQ(s.fp8_tensors, 0);
  const Checkpoint a(src), b(out);
  ASSERT_EQ(a.names(), b.names());
  for (const std::string& name : a.names()) {
    const TensorView* x = a.find(name);
    const TensorView* y = b.find(name);
    EXPECT_EQ(x->dtype, y->dtype) << name;  // BF16, and F32 for e_score_correction_bias
    EXPECT_EQ(x->shape, y->shape) << name;
    ASSERT_EQ(x->nbytes, y->nbytes) << name;
    EXPECT_EQ(std::memcmp(x->data, y->data, x->nbytes), 0) << name;
  }
  EXPECT_EQ(logits(src, kIds), logits(out, kIds));
  const json cfg = json::parse(read_text(out + "/config.json"));
  EXPECT_FALSE(cfg.contains("quantization_config"));
  EXPECT_EQ(cfg["torch_dtype"], "bfloat16");
}

// FP8 export of the golden FP8 checkpoint's weights (dequantized to float32, as a trainer's
// master weights would hold them): every code equals the golden's, every scale matches to
// float32 rounding, and the logits are the golden checkpoint's.
TEST_F(ExportTest, Fp8ReproducesTheReleaseEncoding) {
  const std::string golden = test::golden_dir("tiny-v3-fp8");
  const std::string src = float32_copy(golden), out = dir_ + "/fp8";
  const ExportSummary s = export_checkpoint(src, out, {.dtype = DType::f8_e4m3, .max_shard_bytes = 1'000'000});
  EXPECT_GT(s.shards, 1);
  EXPECT_TRUE(fs::exists(out + "/model.safetensors.index.json"));
  EXPECT_TRUE(fs::exists(out + "/tokenizer_config.json"));
  EXPECT_FALSE(fs::exists(out + "/trainer_state.json"));
  const Checkpoint g(golden), e(out);
  ASSERT_EQ(g.names(), e.names());  // the same tensors, scales included, by name
  int64_t fp8 = 0;
  for (const std::string& name : g.names()) {
    const TensorView* x = g.find(name);
    const TensorView* y = e.find(name);
    ASSERT_EQ(x->dtype, y->dtype) << name;
    ASSERT_EQ(x->shape, y->shape) << name;
    if (x->dtype == DType::f8_e4m3) {
      ++fp8;
      EXPECT_EQ(std::memcmp(x->data, y->data, x->nbytes), 0) << name << ": codes differ";
    } else if (name.ends_with("_scale_inv")) {
      const float* a = reinterpret_cast<const float*>(x->data);
      const float* b = reinterpret_cast<const float*>(y->data);
      for (int64_t i = 0; i < x->numel(); ++i) EXPECT_NEAR(b[i], a[i], 2e-7 * a[i]) << name << " block " << i;
    } else {
      EXPECT_EQ(std::memcmp(x->data, y->data, x->nbytes), 0) << name;  // BF16 / F32 as released
    }
  }
  EXPECT_EQ(fp8, s.fp8_tensors);
  const json cfg = json::parse(read_text(out + "/config.json"));
  EXPECT_EQ(cfg["quantization_config"]["weight_block_size"], json({128, 128}));
  EXPECT_EQ(cfg["quantization_config"]["fmt"], "e4m3");
  const std::vector<float> want = logits(golden, kIds), got = logits(out, kIds);
  EXPECT_LE(test::max_abs_diff(want.data(), got.data(), want.size()), 1e-5f * test::max_abs(want));
}

// A float32 checkpoint exported to BF16 and FP8: each loads and gives the logits of the
// source rounded to its format. The source holds BF16 values, so BF16 keeps every value; for FP8 the
// reference is the source with every projection weight rounded here, by the release's rule
// written out element by element with core/dtype's scalar E4M3 encoder.
TEST_F(ExportTest, Float32CheckpointToBothFormats) {
  const std::string src = float32_copy(test::golden_dir("tiny-v3-bf16"));
  export_checkpoint(src, dir_ + "/out-bf16", {.dtype = DType::bf16});
  {  // every value kept exactly; the logits then differ only by the kernels' summation order
    const Checkpoint a(src), b(dir_ + "/out-bf16");
    for (const std::string& name : a.names()) {
      const TensorView* x = a.find(name);
      const TensorView* y = b.find(name);
      const float* f = reinterpret_cast<const float*>(x->data);
      for (int64_t i = 0; i < x->numel(); ++i) {
        const float v = y->dtype == DType::bf16 ? bf16_to_f32(reinterpret_cast<const uint16_t*>(y->data)[i])
                                                : reinterpret_cast<const float*>(y->data)[i];
        ASSERT_EQ(v, f[i]) << name << " element " << i;
      }
    }
    const std::vector<float> want = logits(src, kIds), got = logits(dir_ + "/out-bf16", kIds);
    EXPECT_LE(test::max_abs_diff(want.data(), got.data(), want.size()), 1e-5f * test::max_abs(want));
  }

  export_checkpoint(src, dir_ + "/out-fp8", {.dtype = DType::f8_e4m3});
  const std::string rounded = dir_ + "/rounded";
  fs::create_directories(rounded);
  fs::copy_file(src + "/config.json", rounded + "/config.json");
  {
    Transformer model(src);
    const ModelConfig& c = model.config();
    ModelWeights w = allocate_weights(c, DType::f32);
    convert_weights(c, model.weights(), w);
    std::vector<TensorToWrite> tensors;
    for (const TensorSlot& s : list_tensors(c, w)) {
      if (s.fp8_quantizable) {
        float* x = mutable_data<float>(*s.mat);
        const int64_t rows = s.shape[0], cols = s.shape[1];
        for (int64_t r0 = 0; r0 < rows; r0 += 128)
          for (int64_t c0 = 0; c0 < cols; c0 += 128) {
            float amax = 0;
            for (int64_t r = r0; r < std::min(rows, r0 + 128); ++r)
              for (int64_t k = c0; k < std::min(cols, c0 + 128); ++k) amax = std::max(amax, std::fabs(x[r * cols + k]));
            const float scale = amax / 448.0f;  // scale_inv = max|w| / 448
            for (int64_t r = r0; r < std::min(rows, r0 + 128); ++r)
              for (int64_t k = c0; k < std::min(cols, c0 + 128); ++k) {
                float& v = x[r * cols + k];
                v = scale == 0 ? 0.0f : fp8_e4m3_to_f32(f32_to_fp8_e4m3(v / scale)) * scale;
              }
          }
      }
      tensors.push_back({s.name, DType::f32, s.shape, s.mat->data});
    }
    write_safetensors(rounded + "/model.safetensors", tensors);
  }
  const std::vector<float> want = logits(rounded, kIds), got = logits(dir_ + "/out-fp8", kIds);
  EXPECT_LE(test::max_abs_diff(want.data(), got.data(), want.size()), 1e-5f * test::max_abs(want));
}

TEST_F(ExportTest, BadInputIsAClearErrorAndLeavesNothing) {
  const std::string src = test::golden_dir("tiny-v3-bf16");
  // An existing, non-empty destination is never overwritten.
  const std::string busy = dir_ + "/busy";
  fs::create_directories(busy);
  write_text(busy + "/keep.txt", "mine\n");
  EXPECT_THROW(
      {
        try {
          export_checkpoint(src, busy, {.dtype = DType::bf16});
        } catch (const Error& e) {
          EXPECT_NE(std::string(e.what()).find("not an empty folder"), std::string::npos) << e.what();
          throw;
        }
      },
      Error);
  EXPECT_EQ(read_text(busy + "/keep.txt"), "mine\n");
  EXPECT_THROW(parse_export_dtype("int4"), Error);
  EXPECT_THROW(export_checkpoint(src, dir_ + "/x", {.dtype = DType::f32}), Error);

  // A non-finite weight: the error names the tensor, and no folder (nor its temporary) stays.
  const std::string broken = float32_copy(src);
  {
    SafetensorsFile f(broken + "/model.safetensors");
    std::vector<TensorToWrite> tensors;
    std::vector<std::vector<float>> copies;
    for (const auto& [name, v] : f.tensors()) {
      copies.emplace_back(reinterpret_cast<const float*>(v.data), reinterpret_cast<const float*>(v.data) + v.numel());
      if (name == "model.layers.1.mlp.experts.3.up_proj.weight") copies.back()[5] = NAN;
      tensors.push_back({name, DType::f32, v.shape, copies.back().data()});
    }
    write_safetensors(broken + "/model.safetensors.new", tensors);
  }
  fs::rename(broken + "/model.safetensors.new", broken + "/model.safetensors");
  for (DType dtype : {DType::bf16, DType::f8_e4m3}) {
    const std::string out = dir_ + "/never";
    try {
      export_checkpoint(broken, out, {.dtype = dtype});
      ADD_FAILURE() << "a NaN weight was exported";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("model.layers.1.mlp.experts.3.up_proj.weight"), std::string::npos)
          << e.what();
    }
    EXPECT_FALSE(fs::exists(out));
    for (const auto& entry : fs::directory_iterator(dir_))
      EXPECT_EQ(entry.path().filename().string().find(".export-tmp"), std::string::npos) << entry.path();
  }
}

// Through the CLI, as a user runs it: sharded FP8, then dsv3 generate on the export.
TEST_F(ExportTest, Cli) {
  const std::string out = dir_ + "/cli-fp8";
  const test::CliResult r = test::run("export --model " + test::golden_dir("tiny-v3-bf16") + " --dtype fp8 --out " +
                                      out + " --max-shard-size 1MB");
  ASSERT_EQ(r.status, 0) << r.out;
  EXPECT_NE(r.out.find("in FP8 E4M3"), std::string::npos) << r.out;
  EXPECT_TRUE(fs::exists(out + "/model.safetensors.index.json"));
  EXPECT_EQ(json::parse(read_text(out + "/config.json"))["quantization_config"]["quant_method"], "fp8");
  const Checkpoint e(out);
  EXPECT_EQ(e.find("model.layers.1.mlp.experts.0.up_proj.weight")->dtype, DType::f8_e4m3);
  // A destination written with a trailing slash, as shell completion gives it, is that folder.
  const test::CliResult slash =
      test::run("export --model " + test::golden_dir("tiny-v3-bf16") + " --dtype bf16 --out " + dir_ + "/slash/");
  ASSERT_EQ(slash.status, 0) << slash.out;
  EXPECT_NE(slash.out.find("in BF16"), std::string::npos) << slash.out;
  EXPECT_TRUE(fs::exists(dir_ + "/slash/model.safetensors"));
  const test::CliResult g =
      test::run("generate --model " + out + " --prompt-ids '0 17 3' --max-tokens 4 --temperature 0 --output-ids");
  EXPECT_EQ(g.status, 0) << g.out;
  const test::CliResult bad = test::run("export --model " + test::golden_dir("tiny-v3-bf16") + " --dtype fp8 --out " +
                                        dir_ + "/y --max-shard-size lots");
  EXPECT_NE(bad.status, 0);
  EXPECT_NE(bad.out.find("--max-shard-size 'lots'"), std::string::npos) << bad.out;
  const test::CliResult dtype = test::run("export --model " + test::golden_dir("tiny-v3-bf16") + " --dtype int4 --out " +
                                          dir_ + "/z");
  EXPECT_NE(dtype.status, 0);
  EXPECT_NE(dtype.out.find("--dtype 'int4'"), std::string::npos) << dtype.out;
}

}  // namespace
}  // namespace dsv3
