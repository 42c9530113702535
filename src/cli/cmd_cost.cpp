// dsv3 cost: parameters, training FLOPs per token, GPU-hours and dollars for a config.json,
// with Llama 3.1 405B's reported run beside it (the accounting lives in src/cost).
#include <CLI/CLI.hpp>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cost/cost.h"
#include "cost/parallel.h"
#include "model/config.h"
#include "core/error.h"

namespace dsv3::cli {

namespace {

struct CostFlags {
  std::string config, precision = "bf16";
  CostOptions options;
  double mfu = 0, reported_gpu_hours = 0;
  bool json = false, no_compare = false;
  ParallelLayout layout;
};

void run(CostFlags& f, const CLI::App& cmd) {
  CostOptions o = f.options;
  o.precision = parse_precision(f.precision);
  if (cmd.count("--mfu")) o.mfu = f.mfu;
  if (cmd.count("--reported-gpu-hours")) o.reported_gpu_hours = f.reported_gpu_hours;
  const CostReport r = project_cost(count_model_file(f.config, o.seq_len), o);
  std::unique_ptr<CostReport> llama;
  if (!f.no_compare) llama = std::make_unique<CostReport>(llama_3_1_405b_reported(o));
  std::string text = f.json ? cost_json(r, llama.get()) : format_cost(r, llama.get());
  // A parallel layout (--gpus): the expert all-to-all it implies, and whether DualPipe hides it.
  if (cmd.count("--gpus")) {
    if (r.model.name.empty() || !r.model.moe) fail("--gpus: the parallel estimate needs a DeepSeek MoE config");
    const ParallelEstimate e = estimate_parallel(ModelConfig::load(f.config), r, f.layout);
    if (f.json) {
      nlohmann::ordered_json j = nlohmann::ordered_json::parse(text);
      j["parallel"] = nlohmann::ordered_json::parse(parallel_json(e));
      text = j.dump();
    } else {
      text += format_parallel(e, r);
    }
  }
  if (f.json) text += "\n";
  std::fputs(text.c_str(), stdout);
}

}  // namespace

void add_cost(CLI::App& app) {
  auto f = std::make_shared<CostFlags>();
  CLI::App* cmd = app.add_subcommand(
      "cost", "Parameters, training FLOPs per token, GPU-hours and dollars for a model config (Llama 3.1 405B beside it)");
  cmd->add_option("--config,-c", f->config, "config.json (deepseek_v3 / deepseek_v2, or llama for dense)")->required();
  cmd->add_option("--tokens", f->options.tokens, "training tokens")->capture_default_str();
  cmd->add_option("--gpu", f->options.gpu, "h800, h100, h200 or a100")->capture_default_str();
  cmd->add_option("--precision", f->precision, "peak the MFU is taken against: bf16 or fp8")
      ->capture_default_str()
      ->check(CLI::IsMember({"bf16", "fp8"}));
  cmd->add_option("--price", f->options.price_per_gpu_hour, "dollars per GPU-hour")->capture_default_str();
  cmd->add_option("--mfu", f->mfu, "model FLOPs utilisation in (0, 1] to project GPU-hours (default 0.40, assumed)");
  cmd->add_option("--reported-gpu-hours", f->reported_gpu_hours,
                  "GPU-hours spent on --tokens: prints the implied MFU and prices these hours");
  cmd->add_option("--extra-gpu-hours", f->options.extra_gpu_hours,
                  "GPU-hours not tied to --tokens (context extension, post-training), added to the total");
  cmd->add_option("--seq", f->options.seq_len, "sequence length for attention FLOPs")->capture_default_str();
  ParallelLayout& l = f->layout;
  cmd->add_option("--gpus", l.gpus, "GPUs of a parallel layout: adds the expert all-to-all estimate (default layout: the report's)");
  cmd->add_option("--pp", l.pp, "pipeline stages")->capture_default_str();
  cmd->add_option("--ep", l.ep, "expert-parallel GPUs (a group within each stage's data-parallel GPUs)")->capture_default_str();
  cmd->add_option("--gpus-per-node", l.gpus_per_node, "GPUs per node (NVLink within, InfiniBand between)")->capture_default_str();
  cmd->add_option("--max-nodes", l.max_nodes, "node-limited routing: nodes per token at most")->capture_default_str();
  cmd->add_option("--ib", l.ib_gb_s, "InfiniBand GB/s per GPU")->capture_default_str();
  cmd->add_option("--nvlink", l.nvlink_gb_s, "NVLink GB/s per GPU")->capture_default_str();
  cmd->add_option("--micro-batch-tokens", l.micro_batch_tokens, "tokens per GPU per micro-batch")->capture_default_str();
  cmd->add_flag("--json", f->json, "print one JSON object");
  cmd->add_flag("--no-compare", f->no_compare, "leave out Llama 3.1 405B");
  cmd->callback([f, cmd] { run(*f, *cmd); });
}

}  // namespace dsv3::cli
