// Cost accounting, the DeepSeek-V3 report's headline (§1, Table 1): parameters (total and
// active per token), training FLOPs per token, and GPU-hour and dollar projections.
// Uses model only for ModelConfig and the tensor list (for_each_tensor); no backend ops.
//
// What is counted (docs/ARCHITECTURE.md, "What dsv3 cost counts"):
//   - parameters: every tensor for_each_tensor lists, i.e. exactly what a checkpoint holds.
//     total_params is the main model (embedding and lm_head included, MTP excluded);
//     mtp_params the MTP modules as the checkpoint stores them (with their copies of the
//     embedding and the output head).
//   - active_params: what one token uses: all but the routed experts it is not sent to
//     (k of n per MoE layer), and not the embedding table (a row read, not a matmul);
//     lm_head included. That is DeepSeek's own convention (README_WEIGHTS: "36.6B,
//     including 0.9B for the output Head"), which the report rounds to "37B".
//   - train_flops_per_token = 6 x active matmul weights (2 forward + 4 backward per weight)
//     + causal attention (QK^T and PV: 2 FLOPs x heads x (qk_head_dim + v_head_dim) x seq/2
//       mean keys per query, per layer; backward = 2 x forward, so 3 x forward in all)
//     + the MTP modules the same way (each processes every token: eh_proj, its block, the
//       shared head). Not counted: norms, activations, softmax, RoPE, router top-k, losses,
//       the optimizer step, and recomputation (MFU counts useful FLOPs only).
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "model/config.h"

namespace dsv3 {

// The peak precision MFU is measured against.
enum class Precision { bf16, fp8 };
Precision parse_precision(const std::string& name);  // "bf16" | "fp8"
const char* precision_name(Precision p);

// Dense (no sparsity) tensor-core peaks of the SXM parts, from NVIDIA's datasheets
// (which quote the 2:4-sparse figures, twice these).
struct GpuSpec {
  std::string name;   // "h800"
  std::string label;  // "H800"
  double bf16_tflops = 0;
  double fp8_tflops = 0;  // 0: no FP8 tensor cores
  double peak_flops(Precision p) const;  // FLOP/s; fails for fp8 on a GPU without it
};
const std::vector<GpuSpec>& gpu_specs();           // h800, h100, h200, a100
const GpuSpec& find_gpu(const std::string& name);  // fails naming the known ones

// A dense Llama-style transformer (GQA attention, SwiGLU MLP, untied or tied head), for
// the comparison beside DeepSeek-V3. Parsed from a Hugging Face config.json of
// model_type "llama" with the same field names.
struct DenseConfig {
  int64_t vocab_size = 0, hidden_size = 0, intermediate_size = 0, num_hidden_layers = 0;
  int64_t num_attention_heads = 0, num_key_value_heads = 0, head_dim = 0;
  bool tie_word_embeddings = false;
  static DenseConfig parse(const std::string& json_text, const std::string& what);
};
DenseConfig llama_3_1_405b();  // the same as configs/llama-3.1-405b.json

// Parameters and training FLOPs per token of one model (see the header comment).
struct ModelCount {
  std::string name;         // "deepseek-v3" (the config file's stem) or "Llama 3.1 405B"
  std::string description;  // "deepseek_v3 MoE: 61 layers, 8 of 256 routed experts + 1 shared"
  bool moe = false;
  int64_t seq_len = 0;      // the sequence length attention FLOPs assume
  // parameters (elements)
  int64_t total_params = 0;      // main model: embedding and lm_head included, MTP excluded
  int64_t embedding_params = 0;  // the main embedding table (in total_params)
  int64_t mtp_params = 0;        // MTP modules as stored, with their embedding / head copies
  int64_t mtp_copy_params = 0;   // of which copies of the embedding and the output head
  int64_t active_params = 0;     // per token, main model, no embedding table, lm_head included
  int64_t mtp_active_params = 0; // per token, MTP modules, same convention
  int64_t matmul_params = 0;     // the N of 6N: active_params less norms and router bias
  int64_t mtp_matmul_params = 0;
  // training FLOPs per token, forward + backward
  double matmul_flops = 0;     // 6 x matmul_params
  double attention_flops = 0;  // all main-model layers
  double mtp_flops = 0;        // 6 x mtp_matmul_params + MTP attention
  double train_flops_per_token = 0;

  int64_t active_params_with_embedding() const { return active_params + embedding_params; }
};

ModelCount count_model(const ModelConfig& c, int64_t seq_len, const std::string& name);
ModelCount count_model(const DenseConfig& c, int64_t seq_len, const std::string& name);
// A DeepSeek (model_type deepseek_v3 / deepseek_v2) or llama config.json; errors name the file.
ModelCount count_model_file(const std::string& path, int64_t seq_len);

struct CostOptions {
  double tokens = 14.8e12;                   // training tokens
  std::string gpu = "h800";
  Precision precision = Precision::bf16;     // the peak MFU is taken against
  double price_per_gpu_hour = 2.0;           // dollars
  std::optional<double> mfu;                 // project hours at this MFU, in (0, 1]
  std::optional<double> reported_gpu_hours;  // hours spent on `tokens` -> implied MFU
  double extra_gpu_hours = 0;  // hours not tied to `tokens` (context extension, post-training):
                               // added to the hours and the dollars, never to the MFU
  int64_t seq_len = 4096;
};
// Used when neither mfu nor reported_gpu_hours is given, and said so in the output.
constexpr double kDefaultMfu = 0.40;

enum class MfuSource { given, assumed, implied, measured };

struct CostReport {
  ModelCount model;
  CostOptions options;
  GpuSpec gpu;
  double peak_flops = 0;   // per GPU, FLOP/s, at options.precision
  double train_flops = 0;  // tokens x train_flops_per_token
  double mfu = 0;
  MfuSource mfu_source = MfuSource::assumed;
  double token_gpu_hours = 0;  // spent on options.tokens
  double gpu_hours = 0;        // token_gpu_hours + extra_gpu_hours
  double gpu_hours_per_trillion_tokens = 0;
  double dollars = 0;          // gpu_hours x price
};

// gpu_hours = tokens x flops_per_token / (peak x mfu x 3600), or, given reported hours,
// implied mfu = tokens x flops_per_token / (hours x 3600 x peak). Validates the options.
CostReport project_cost(const ModelCount& m, const CostOptions& o);
// The same projection from a measured training throughput (tokens per second per GPU),
// as `dsv3 train` reports it: the MFU achieved, then hours and dollars for o.tokens.
CostReport project_from_throughput(const ModelCount& m, double tokens_per_second_per_gpu, CostOptions o);

// DeepSeek-V3 report, Table 1 (H800 GPU-hours) and Meta's Llama 3.1 model card.
inline constexpr double kDeepSeekV3Tokens = 14.8e12;
inline constexpr double kDeepSeekV3PretrainGpuHours = 2664e3;
inline constexpr double kDeepSeekV3ContextExtensionGpuHours = 119e3;
inline constexpr double kDeepSeekV3PostTrainGpuHours = 5e3;
inline constexpr double kLlama405bTokens = 15.6e12;
inline constexpr double kLlama405bGpuHours = 30.84e6;  // H100

// Llama 3.1 405B's reported run (30.84M H100 GPU-hours, 15.6T tokens) under the same
// accounting, seq_len, precision and price as `like`: the implied MFU and the dollars.
CostReport llama_3_1_405b_reported(const CostOptions& like);

// A readable two-column table (compare may be null), and one JSON object with the keys of
// the report (compare nested under "compare").
std::string format_cost(const CostReport& r, const CostReport* compare);
std::string cost_json(const CostReport& r, const CostReport* compare);
// One line: "NAME: 260.6 GFLOP/token to train; 14.8T tokens on H800 at 40.6% MFU (measured vs
// dense BF16 peak) = 2.664M GPU-hours = $5.328M at $2.00/GPU-hour" (for `dsv3 train`).
std::string format_projection(const CostReport& r);

}  // namespace dsv3
