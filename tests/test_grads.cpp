// Gradients of the next-token loss against PyTorch autograd through DeepSeek's official
// modules (grads.safetensors of every golden checkpoint): the loss within 1e-4, and every
// gradient tensor within max(1e-4 * max|g_ref|, 1e-7) (the golden README's tolerance), in
// process and through `dsv3 grads`.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>

#include "golden_util.h"
#include "io/checkpoint.h"
#include "model/training.h"

namespace dsv3 {
namespace {

void expect_matches_golden(const SafetensorsFile& got, const SafetensorsFile& want, const std::string& what) {
  const float loss = test::read_f32(got, "loss")[0], loss_ref = test::read_f32(want, "loss")[0];
  EXPECT_NEAR(loss, loss_ref, 1e-4) << what;
  int compared = 0;
  for (const auto& [name, view] : want.tensors()) {
    if (name.rfind("grad.", 0) != 0) continue;
    ++compared;
    ASSERT_NE(got.find(name), nullptr) << what << ": missing " << name;
    ASSERT_EQ(got.find(name)->shape, view.shape) << name;
    const auto g = test::read_f32(got, name), ref = test::read_f32(want, name);
    const float tol = std::max(1e-4f * test::max_abs(ref), 1e-7f);
    EXPECT_LE(test::max_abs_diff(g.data(), ref.data(), g.size()), tol) << what << ": " << name;
  }
  EXPECT_GT(compared, 100) << what;
  int extra = 0;
  for (const auto& [name, view] : got.tensors()) extra += name.rfind("grad.", 0) == 0 && !want.find(name);
  EXPECT_EQ(extra, 0) << what << ": gradients the reference does not have (MTP or the router bias?)";
}

class Grads : public testing::TestWithParam<std::string> {};

TEST_P(Grads, MatchPytorchThroughOfficialModules) {
  const std::string dir = test::golden_dir(GetParam());
  SafetensorsFile golden(dir + "/grads.safetensors");
  const auto tokens = test::read_i32(golden, "tokens");
  const int64_t n = int64_t(tokens.size());

  const ModelConfig c = ModelConfig::load(dir + "/config.json");
  Checkpoint ckpt(dir);
  ModelWeights stored = load_weights(c, ckpt);
  ModelWeights params = allocate_weights(c, DType::f32), grads = allocate_weights(c, DType::f32);
  convert_weights(c, stored, params);
  std::vector<int32_t> targets(tokens.begin() + 1, tokens.end());
  targets.push_back(-1);
  TrainingPass<float> pass(c);
  const float loss = float(pass.forward(params, tokens.data(), targets.data(), 1, n));
  pass.backward(params, grads);

  // The forward of training is the same model: its logits are the golden ones.
  SafetensorsFile fwd(dir + "/golden.safetensors");
  const auto want_logits = test::read_f32(fwd, "logits_2");
  EXPECT_LE(test::max_abs_diff(pass.logits().data(), want_logits.data(), want_logits.size()),
            1e-4f * test::max_abs(want_logits));

  std::vector<TensorToWrite> out = {{"loss", DType::f32, {1}, &loss}};
  std::vector<std::string> names;
  const auto slots = list_tensors(c, grads);
  names.reserve(slots.size());
  for (const TensorSlot& s : slots)
    if (s.trainable && !s.mtp) {
      names.push_back("grad." + s.name);
      out.push_back({names.back(), DType::f32, s.shape, s.mat->data});
    }
  const std::string path = testing::TempDir() + "/grads_" + GetParam() + ".safetensors";
  write_safetensors(path, out);
  expect_matches_golden(SafetensorsFile(path), golden, "in process");
}

TEST_P(Grads, ThroughTheCli) {
  const std::string dir = test::golden_dir(GetParam());
  SafetensorsFile golden(dir + "/grads.safetensors");
  const auto tokens = test::read_i32(golden, "tokens");
  std::string ids;
  for (int32_t t : tokens) ids += std::to_string(t) + " ";
  const std::string path = testing::TempDir() + "/cli_grads_" + GetParam() + ".safetensors";
  const std::string cmd = std::string(DSV3_BINARY) + " grads --model " + dir + " --ids \"" + ids + "\" --out " + path + " 2>&1";
  ASSERT_EQ(WEXITSTATUS(std::system(cmd.c_str())), 0);
  expect_matches_golden(SafetensorsFile(path), golden, "dsv3 grads");
}

INSTANTIATE_TEST_SUITE_P(Golden, Grads, testing::Values("tiny-v3-bf16", "tiny-v3-fp8", "tiny-v2lite-bf16"),
                         [](const auto& info) {
                           std::string s = info.param;
                           std::replace(s.begin(), s.end(), '-', '_');
                           return s;
                         });

}  // namespace
}  // namespace dsv3
