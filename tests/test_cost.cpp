// dsv3 cost against the DeepSeek-V3 report's own accounting (671B total / 37B active,
// 14B MTP, 180K H800 GPU-hours per trillion tokens, 2.788M GPU-hours = $5.576M at $2) from
// configs/deepseek-v3.json, the Llama 3.1 405B comparison, and the errors of `dsv3 cost`.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli_util.h"
#include "core/error.h"
#include "cost/cost.h"
#include "cost/parallel.h"
#include "io/checkpoint.h"

namespace dsv3 {
namespace {

using test::CliResult;
using test::run;

using testing::HasSubstr;

const std::string kV3 = std::string(DSV3_CONFIGS) + "/deepseek-v3.json";
const std::string kLlama = std::string(DSV3_CONFIGS) + "/llama-3.1-405b.json";

double rel(double got, double want) { return std::fabs(got - want) / want; }

// The report's numbers: 14.8T tokens in 2664K H800 GPU-hours, + 119K + 5K = 2788K.
CostReport deepseek_v3_reported(double extra_gpu_hours = 0, Precision p = Precision::bf16) {
  CostOptions o;
  o.tokens = kDeepSeekV3Tokens;
  o.gpu = "h800";
  o.precision = p;
  o.reported_gpu_hours = kDeepSeekV3PretrainGpuHours;
  o.extra_gpu_hours = extra_gpu_hours;
  return project_cost(count_model_file(kV3, o.seq_len), o);
}

TEST(Cost, DeepSeekV3Parameters) {
  const ModelCount m = count_model_file(kV3, 4096);
  std::printf("total %ld, MTP %ld, active %ld (with embedding row %ld), MTP active %ld\n", long(m.total_params),
              long(m.mtp_params), long(m.active_params), long(m.active_params_with_embedding()),
              long(m.mtp_active_params));
  // Report: 671B total. We get 671,026,419,200 (0.004% over).
  EXPECT_EQ(m.total_params, 671026419200);
  EXPECT_LT(rel(double(m.total_params), 671e9), 0.005);
  // Release: "685B = 671B main + 14B MTP". The MTP module as stored (its block, eh_proj,
  // norms, and its copies of the embedding and the head) is 13,463,426,304 (3.8% under
  // "14B"); the checkpoint is 684.49B (0.07% under "685B").
  EXPECT_EQ(m.mtp_params, 13463426304);
  EXPECT_LT(rel(double(m.mtp_params), 14e9), 0.10);
  EXPECT_LT(rel(double(m.total_params + m.mtp_params), 685e9), 0.005);
  EXPECT_EQ(m.mtp_copy_params, 2 * 129280LL * 7168);
  // Report: "37B activated". We get 36,625,618,432: everything a token uses but the
  // routed experts it is not sent to and the embedding table (a row read, not a matmul),
  // lm_head included. That is exactly DeepSeek's own count in README_WEIGHTS.md ("36.6B,
  // including 0.9B for the output Head"); the report rounds it to 37B, so the gap to 37B
  // is 1.01% (counting the embedding row too, 37.55B, it would be 1.5% over).
  EXPECT_EQ(m.active_params, 36625618432);
  EXPECT_LT(rel(double(m.active_params), 36.6e9), 0.001);
  EXPECT_EQ(std::lround(double(m.active_params) / 1e9), 37);
  EXPECT_LT(rel(double(m.active_params), 37e9), 0.011);
  EXPECT_EQ(m.active_params_with_embedding(), m.active_params + 129280LL * 7168);
}

// The same counts from the dimensions by hand, independent of for_each_tensor.
TEST(Cost, DeepSeekV3ActiveByHand) {
  const int64_t h = 7168, vocab = 129280, heads = 128;
  const int64_t attn = 1536 * h + 1536 + heads * 192 * 1536 + (512 + 64) * h + 512 + heads * 256 * 512 + h * heads * 128;
  const int64_t norms = 2 * h, expert = 3 * 2048 * h, router = 256 * h + 256;
  const int64_t dense_layer = attn + norms + 3 * 18432 * h;
  const int64_t moe_active = attn + norms + router + (8 + 1) * expert;
  const ModelCount m = count_model_file(kV3, 4096);
  EXPECT_EQ(m.active_params, vocab * h /*lm_head*/ + h /*final norm*/ + 3 * dense_layer + 58 * moe_active);
  EXPECT_EQ(m.total_params, 2 * vocab * h + h + 3 * dense_layer + 58 * (attn + norms + router + 257 * expert));
  // matmuls only: no norms, no router bias
  const int64_t vectors = h + 61 * (2 * h + 1536 + 512) + 58 * 256;
  EXPECT_EQ(m.matmul_params, m.active_params - vectors);
  // MTP: eh_proj (h x 2h) + one MoE block + the head, each token
  EXPECT_EQ(m.mtp_matmul_params, 2 * h * h + (moe_active - (2 * h + 1536 + 512 + 256)) + vocab * h);
}

TEST(Cost, DeepSeekV3FlopsPerToken) {
  const ModelCount m = count_model_file(kV3, 4096);
  // causal attention per layer: 3 x 2 x 128 heads x (192 + 128) x 4096/2
  const double attn = 3.0 * 2 * 128 * (192 + 128) * 2048;
  EXPECT_DOUBLE_EQ(m.attention_flops, 61 * attn);
  EXPECT_DOUBLE_EQ(m.matmul_flops, 6.0 * double(m.matmul_params));
  EXPECT_DOUBLE_EQ(m.mtp_flops, 6.0 * double(m.mtp_matmul_params) + attn);
  EXPECT_DOUBLE_EQ(m.train_flops_per_token, m.matmul_flops + m.attention_flops + m.mtp_flops);
  std::printf("train FLOPs/token %.4g = matmuls %.4g + attention %.4g + MTP %.4g\n", m.train_flops_per_token,
              m.matmul_flops, m.attention_flops, m.mtp_flops);
  EXPECT_NEAR(m.train_flops_per_token / 1e9, 260.64, 0.01);
  // seq scales only the attention term
  const ModelCount m8k = count_model_file(kV3, 8192);
  EXPECT_DOUBLE_EQ(m8k.attention_flops, 2 * m.attention_flops);
  EXPECT_DOUBLE_EQ(m8k.matmul_flops, m.matmul_flops);
}

TEST(Cost, ReportDollars) {
  // 2664K pre-training + 119K context extension + 5K post-training = 2788K GPU-hours
  const CostReport r = deepseek_v3_reported(kDeepSeekV3ContextExtensionGpuHours + kDeepSeekV3PostTrainGpuHours);
  EXPECT_EQ(r.gpu_hours, 2788e3);
  EXPECT_EQ(r.dollars, 5.576e6);  // exactly, at $2 per GPU-hour
  CostOptions o;
  o.reported_gpu_hours = 2.788e6;
  EXPECT_EQ(project_cost(count_model_file(kV3, 4096), o).dollars, 5.576e6);
}

TEST(Cost, ImpliedMfuAndRoundTrip) {
  const CostReport r = deepseek_v3_reported();
  std::printf("implied MFU of 2664K H800 GPU-hours for 14.8T tokens: %.2f%% of dense BF16, %.2f%% of dense FP8\n",
              100 * r.mfu, 100 * deepseek_v3_reported(0, Precision::fp8).mfu);
  // 40.6% of the BF16 peak (20.3% of FP8). Plausible: large-scale BF16 runs report 35-45%
  // (Llama 3.1 405B: 38-43%), and DeepSeek-V3 ran its GEMMs in FP8, which can lift it above.
  EXPECT_EQ(r.mfu_source, MfuSource::implied);
  EXPECT_GT(r.mfu, 0.30);
  EXPECT_LT(r.mfu, 0.55);
  EXPECT_NEAR(deepseek_v3_reported(0, Precision::fp8).mfu, r.mfu * 989.5 / 1979, 1e-12);
  EXPECT_NEAR(r.gpu_hours_per_trillion_tokens, 180e3, 1e-6);
  // Projecting forward at the implied MFU gives back 180K GPU-hours per trillion tokens.
  CostOptions o;
  o.tokens = 1e12;
  o.mfu = r.mfu;
  const CostReport fwd = project_cost(r.model, o);
  EXPECT_EQ(fwd.mfu_source, MfuSource::given);
  EXPECT_LT(rel(fwd.gpu_hours, 180e3), 1e-12);
  // and from the throughput that run achieved (tokens per second per GPU)
  const CostReport thr = project_from_throughput(r.model, 14.8e12 / (2664e3 * 3600), CostOptions{});
  EXPECT_LT(rel(thr.mfu, r.mfu), 1e-12);
  EXPECT_LT(rel(thr.gpu_hours, 2664e3), 1e-12);
  EXPECT_THAT(format_projection(thr), HasSubstr("2.664M GPU-hours"));
}

TEST(Cost, LlamaComparison) {
  const ModelCount l = count_model(llama_3_1_405b(), 4096, "Llama 3.1 405B");
  const ModelCount f = count_model_file(kLlama, 4096);
  EXPECT_EQ(f.total_params, l.total_params);
  EXPECT_DOUBLE_EQ(f.train_flops_per_token, l.train_flops_per_token);
  EXPECT_LT(rel(double(l.total_params), 405e9), 0.005);  // 405.85B
  EXPECT_EQ(l.active_params, l.total_params - l.embedding_params);  // dense: all but the table
  EXPECT_EQ(l.mtp_params, 0);
  const CostReport ds = deepseek_v3_reported(124e3);
  const CostReport llama = llama_3_1_405b_reported(ds.options);
  std::printf("Llama 3.1 405B / DeepSeek-V3: GPU-hours %.2fx, FLOPs/token %.2fx, training FLOPs %.2fx; "
              "Llama implied MFU %.1f%%\n",
              llama.gpu_hours / ds.gpu_hours, l.train_flops_per_token / ds.model.train_flops_per_token,
              llama.train_flops / ds.train_flops, 100 * llama.mfu);
  EXPECT_EQ(llama.gpu_hours, 30.84e6);
  EXPECT_NEAR(llama.gpu_hours / ds.gpu_hours, 11.06, 0.01);  // "~11x"
  EXPECT_NEAR(l.train_flops_per_token / ds.model.train_flops_per_token, 9.5, 0.2);
  EXPECT_NEAR(llama.train_flops / ds.train_flops, 10.0, 0.2);
  EXPECT_GT(llama.mfu, 0.30);
  EXPECT_LT(llama.mfu, 0.45);
}

// For a real checkpoint, the counts are exactly the elements it stores.
TEST(Cost, CountsMatchAGoldenCheckpoint) {
  for (const char* name : {"tiny-v3-bf16", "tiny-v2lite-bf16"}) {
    const std::string dir = std::string(DSV3_TEST_DATA) + "/golden/" + name;
    Checkpoint ckpt(dir);
    int64_t stored = 0;
    for (const std::string& t : ckpt.names()) stored += ckpt.find(t)->numel();
    const ModelCount m = count_model_file(ckpt.config_path(), 16);
    EXPECT_EQ(m.total_params + m.mtp_params, stored) << name;
  }
}

TEST(Cost, Errors) {
  auto error_of = [](auto&& f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  EXPECT_THAT(error_of([] { count_model_file("/nonexistent/config.json", 4096); }),
              HasSubstr("/nonexistent/config.json: cannot open"));
  const ModelCount m = count_model_file(kV3, 4096);
  for (double bad : {0.0, -0.1, 1.5}) {
    CostOptions o;
    o.mfu = bad;
    EXPECT_THAT(error_of([&] { project_cost(m, o); }), HasSubstr("must be in (0, 1]")) << bad;
  }
  CostOptions o;
  o.gpu = "v100";
  EXPECT_THAT(error_of([&] { project_cost(m, o); }), HasSubstr("unknown GPU 'v100' (known: h800, h100, h200, a100)"));
  o = {};
  o.gpu = "a100";
  o.precision = Precision::fp8;
  EXPECT_THAT(error_of([&] { project_cost(m, o); }), HasSubstr("a100 has no fp8"));
  o = {};
  o.mfu = 0.4;
  o.reported_gpu_hours = 1e6;
  EXPECT_THAT(error_of([&] { project_cost(m, o); }), HasSubstr("not both"));
  o = {};
  o.tokens = 0;
  EXPECT_THAT(error_of([&] { project_cost(m, o); }), HasSubstr("tokens"));
  EXPECT_THAT(error_of([] { parse_precision("fp4"); }), HasSubstr("fp4"));
  EXPECT_THAT(error_of([] { DenseConfig::parse(R"({"model_type": "llama", "vocab_size": 10})", "x.json"); }),
              HasSubstr("x.json: missing field 'hidden_size'"));
}

// ---- the dsv3 program ----------------------------------------------------------------

TEST(CostCli, ReproducesTheReport) {
  const CliResult r = run("cost --config " + kV3 + " --reported-gpu-hours 2.664e6 --extra-gpu-hours 124e3");
  ASSERT_EQ(r.status, 0) << r.out;
  std::printf("%s", r.out.c_str());
  for (const char* want : {"671.03B", "36.63B", "13.46B", "180.0K", "2.788M", "$5.576M", "implied", "30.84M", "11.1x"})
    EXPECT_THAT(r.out, HasSubstr(want));
}

TEST(CostCli, Json) {
  const CliResult r = run("cost --config " + kV3 + " --tokens 14.8e12 --gpu h800 --price 2 --reported-gpu-hours 2.788e6 --json");
  ASSERT_EQ(r.status, 0) << r.out;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["total_params"].get<int64_t>(), 671026419200);
  EXPECT_EQ(j["mtp_params"].get<int64_t>(), 13463426304);
  EXPECT_EQ(j["active_params"].get<int64_t>(), 36625618432);
  EXPECT_NEAR(j["train_flops_per_token"].get<double>(), 260.64e9, 0.01e9);
  EXPECT_EQ(j["gpu_hours"].get<double>(), 2.788e6);
  EXPECT_EQ(j["dollars"].get<double>(), 5.576e6);
  EXPECT_GT(j["implied_mfu"].get<double>(), 0.3);
  EXPECT_EQ(j["compare"]["model"], "Llama 3.1 405B");
  // --mfu: projected, implied_mfu null
  const CliResult p = run("cost --config " + kV3 + " --mfu 0.5 --precision fp8 --json --no-compare");
  ASSERT_EQ(p.status, 0) << p.out;
  const nlohmann::json q = nlohmann::json::parse(p.out);
  EXPECT_TRUE(q["implied_mfu"].is_null());
  EXPECT_EQ(q["mfu_source"], "given");
  EXPECT_FALSE(q.contains("compare"));
  EXPECT_NEAR(q["gpu_hours"].get<double>(), 14.8e12 * q["train_flops_per_token"].get<double>() / (1979e12 * 0.5 * 3600), 1e-3);
}

TEST(CostCli, Errors) {
  CliResult r = run("cost --config /nonexistent/config.json");
  EXPECT_EQ(r.status, 1);
  EXPECT_THAT(r.out, HasSubstr("dsv3: error: /nonexistent/config.json: cannot open"));
  for (const char* bad : {"0", "-1", "1.5"}) {
    r = run("cost --config " + kV3 + " --mfu " + bad);
    EXPECT_EQ(r.status, 1) << bad;
    EXPECT_THAT(r.out, HasSubstr("dsv3: error: mfu is")) << bad;
  }
  r = run("cost --config " + kV3 + " --gpu v100");
  EXPECT_EQ(r.status, 1);
  EXPECT_THAT(r.out, HasSubstr("unknown GPU 'v100'"));
  r = run("cost --config " + kV3 + " --precision fp4");
  EXPECT_NE(r.status, 0);
  EXPECT_THAT(r.out, HasSubstr("--precision"));
  r = run("cost --config " + kV3 + " --mfu 0.4 --reported-gpu-hours 1e6");
  EXPECT_EQ(r.status, 1);
  EXPECT_THAT(r.out, HasSubstr("not both"));
}


// The report's layout (2048 GPUs, PP16, EP64 over 8 nodes, 4 nodes per token) by hand:
// hidden 7168 in FP8 with 56 float scales is 7392 bytes, in BF16 14336; a token reaches 4
// nodes, its own among them half the time (4 of 8), so 3.5 cross InfiniBand; 8 experts'
// GPUs over NVLink; 58 MoE layers.
TEST(CostParallel, DeepSeekV3LayoutByHand) {
  const ModelConfig c = ModelConfig::load(kV3);
  CostOptions o;
  o.mfu = 0.4;
  o.precision = Precision::fp8;
  const CostReport r = project_cost(count_model_file(kV3, o.seq_len), o);
  const ParallelEstimate e = estimate_parallel(c, r, ParallelLayout{});
  EXPECT_EQ(e.dp, 128);
  EXPECT_EQ(e.ep_nodes, 8);
  EXPECT_EQ(e.experts_per_gpu, 4);
  EXPECT_EQ(e.moe_layers_per_stage, 4);  // ceil(58 / 16)
  EXPECT_DOUBLE_EQ(e.ib_nodes_per_token, 3.5);
  EXPECT_DOUBLE_EQ(e.dispatch_ib_bytes, 3.5 * 7392);
  EXPECT_DOUBLE_EQ(e.combine_ib_bytes, 3.5 * 14336);
  EXPECT_DOUBLE_EQ(e.dispatch_nvlink_bytes, 8.0 * 7392);
  EXPECT_DOUBLE_EQ(e.combine_nvlink_bytes, 8.0 * 14336);
  EXPECT_DOUBLE_EQ(e.all_to_all_bytes_per_token, 58 * (3.5 * 7392 + 3 * 3.5 * 14336));
  const double flops = 4096 * (r.model.train_flops_per_token - r.model.mtp_flops) / 3 / 61;
  EXPECT_NEAR(e.forward_flops, flops, flops * 1e-12);
  EXPECT_NEAR(e.forward_seconds, flops / (1979e12 * 0.4), 1e-12);
  // NVLink carries 8 copies at 160 GB/s (2.5 token-copies of time per IB copy at 50 GB/s)
  // against IB's 3.5: IB is the slower link both ways.
  const double comm = 4096 * (3.5 * 7392 + 3.5 * 14336) / 50e9;
  EXPECT_NEAR(e.forward_comm_seconds, comm, 1e-12);
  EXPECT_NEAR(e.ratio, e.forward_seconds / comm, 1e-9);
  EXPECT_GT(e.ratio, 0.8);  // about the report's 1:1 with FP8 at 40% MFU
  EXPECT_LT(e.ratio, 1.5);
  EXPECT_TRUE(e.dualpipe_hides);
  // One node per token: nothing crosses InfiniBand when the group is one node.
  ParallelLayout one;
  one.gpus = 128, one.pp = 16, one.ep = 8, one.max_nodes = 1;
  EXPECT_EQ(estimate_parallel(c, r, one).ib_nodes_per_token, 0.0);
}

TEST(CostParallel, BadLayoutsAreNamed) {
  const std::pair<const char*, const char*> cases[] = {
      {"--gpus 2040", "is not a multiple of --pp 16"},
      {"--gpus 2048 --ep 48", "--ep 48 must divide the 128 GPUs"},
      {"--gpus 2048 --pp 64", "--pp 64 exceeds the model's 61 layers"},
      {"--gpus 2048 --pp 8 --ep 256 --gpus-per-node 8", "ok"},
      {"--gpus 3072 --pp 16 --ep 192", "must divide the model's 256 routed experts"},
      {"--gpus 2048 --max-nodes 9", "--max-nodes 9 must be in [1, 8]"},
      {"--gpus 2048 --ep 12 --pp 16 --gpus-per-node 8", "must divide the 128 GPUs"}};
  for (const auto& [flags, says] : cases) {
    const CliResult r = run("cost --config " + kV3 + " --no-compare " + flags);
    if (std::string(says) == "ok") {
      EXPECT_EQ(r.status, 0) << flags << r.out;
      continue;
    }
    EXPECT_EQ(r.status, 1) << flags;
    EXPECT_THAT(r.out, HasSubstr(says)) << flags;
  }
  const CliResult llama = run("cost --config " + kLlama + " --gpus 2048");
  EXPECT_EQ(llama.status, 1);
  EXPECT_THAT(llama.out, HasSubstr("needs a DeepSeek MoE config"));
  const CliResult j = run("cost --config " + kV3 + " --gpus 2048 --json --no-compare");
  ASSERT_EQ(j.status, 0) << j.out;
  const nlohmann::json p = nlohmann::json::parse(j.out)["parallel"];
  EXPECT_EQ(p["dp"].get<int64_t>(), 128);
  EXPECT_TRUE(p["dualpipe_hides_all_to_all"].get<bool>());
  const CliResult t = run("cost --config " + kV3 + " --gpus 2048 --no-compare");
  EXPECT_THAT(t.out, HasSubstr("computation : communication"));
  EXPECT_THAT(t.out, HasSubstr("DualPipe"));
}

}  // namespace
}  // namespace dsv3
