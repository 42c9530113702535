// dsv3 eval: score a checkpoint on a task file (multiple choice, generation, perplexity).
#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdio>
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/training_run.h"
#include "core/error.h"
#include "eval/eval.h"

namespace dsv3::cli {

namespace {

struct EvalFlags {
  std::string model, task;
  EvalOptions opt;
  bool json = false;
  int threads = 0;
};

void run(const EvalFlags& f) {
  set_threads(f.threads);
  if (!std::filesystem::exists(f.model + "/tokenizer.json")) fail("--model: ", f.model, " has no tokenizer.json (eval reads text)");
  Transformer model(f.model);
  const Tokenizer tok(f.model + "/tokenizer.json");
  std::unique_ptr<TokenizerConfig> config;
  if (std::filesystem::exists(f.model + "/tokenizer_config.json"))
    config = std::make_unique<TokenizerConfig>(load_tokenizer_config(f.model + "/tokenizer_config.json"));
  // Progress on stderr: the items of the file (up to --limit), at a rate and an ETA.
  int64_t total = 0;
  {
    std::ifstream in(f.task);
    for (std::string line; std::getline(in, line);) total += line.find_first_not_of(" \t\r") != std::string::npos;
    if (f.opt.limit > 0) total = std::min(total, f.opt.limit);
  }
  EvalOptions opt = f.opt;
  ProgressLine progress(0, total, std::max<int64_t>(1, total / 10), "items");
  opt.on_item = [&](int64_t items) {
    progress.show(items, cat(f.task, " | ", int64_t(double(items) / std::max(progress.elapsed(), 1e-9) * 60), " items/min"), false);
  };
  const EvalReport r = evaluate(model, tok, config.get(), f.task, opt);
  if (f.json) {
    nlohmann::json j = {{"task", f.task}, {"kind", r.kind}, {"items", r.items}, {"metrics", nlohmann::json::object()}};
    for (const EvalMetric& m : r.metrics) j["metrics"][m.name] = {{"value", m.value}, {"stderr", m.stderr_}};
    std::printf("%s\n", j.dump().c_str());
    return;
  }
  std::printf("%s: %s, %lld items\n", f.task.c_str(), r.kind.c_str(), (long long)r.items);
  for (const EvalMetric& m : r.metrics) {
    if (std::isnan(m.stderr_)) std::printf("  %-12s %.4f ± n/a\n", m.name.c_str(), m.value);
    else std::printf("  %-12s %.4f ± %.4f\n", m.name.c_str(), m.value, m.stderr_);
  }
}

}  // namespace

void add_eval(CLI::App& app) {
  auto f = std::make_shared<EvalFlags>();
  CLI::App* cmd = app.add_subcommand("eval", "score a checkpoint on a JSONL task: multiple choice, generation (exact match, pass@k), perplexity");
  cmd->add_option("--model,-m", f->model, "Hugging Face checkpoint folder (with tokenizer.json)")->required();
  cmd->add_option("--task", f->task, "JSONL task file (see README: Evaluation)")->required();
  cmd->add_option("--max-tokens", f->opt.max_tokens, "generation: tokens per answer (default 64)");
  cmd->add_option("--samples", f->opt.samples, "generation: answers per prompt, for pass@k (default 1)");
  cmd->add_option("--temperature", f->opt.temperature, "generation: 0 greedy (default)");
  cmd->add_option("--k", f->opt.k, "generation: pass@k for these k (default 1)")->delimiter(',');
  cmd->add_option("--seed", f->opt.seed, "sampling and bootstrap seed (default 0)");
  cmd->add_option("--bootstrap", f->opt.bootstrap, "perplexity: bootstrap resamples for the standard error (default 1000)");
  cmd->add_option("--limit", f->opt.limit, "score only the first N items");
  cmd->add_flag("--chat", f->opt.chat, "generation: each prompt as a user message in the checkpoint's chat template");
  cmd->add_option("--reward", f->opt.reward, "generation: score answers with a verifier (exact: the final answer after #### or in \\boxed{}; format; countdown) instead of text equality");
  cmd->add_flag("--json", f->json, "one JSON object");
  cmd->add_flag_callback("--no-bos", [f] { f->opt.bos = false; }, "no BOS token first (lm-evaluation-harness's default)");
  cmd->add_option("--threads,-t", f->threads, "CPU threads (default: all)");
  cmd->callback([f] { run(*f); });
}

}  // namespace dsv3::cli
