// dsv3 generate: stream a continuation of a prompt from a Hugging Face checkpoint folder.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>

#include "cli/args.h"
#include "cli/commands.h"
#include "core/error.h"
#include "infer/generate.h"

namespace dsv3::cli {

namespace {

struct GenerateFlags {
  std::string model, prompt, prompt_ids, attn = "absorbed";
  int64_t max_tokens = 128;
  float temperature = 0.8f, top_p = 0.95f;
  int64_t top_k = 40;
  int64_t seed = -1;
  bool output_ids = false;
  int threads = 0;
};

void run(const GenerateFlags& f) {
  set_threads(f.threads);
  if (f.prompt.empty() == f.prompt_ids.empty()) fail("give exactly one of --prompt and --prompt-ids");
  if (!f.prompt.empty())
    fail("--prompt needs the tokenizer, which dsv3 does not implement yet; pass token ids with --prompt-ids");
  std::vector<int32_t> prompt = parse_ids(f.prompt_ids, "--prompt-ids");
  Transformer model(f.model);
  if (f.attn == "naive") model.attn_form = AttnForm::naive;
  for (size_t i = 0; i < prompt.size(); ++i)
    if (prompt[i] >= model.config().vocab_size)
      fail("--prompt-ids: id ", prompt[i], " at index ", i, " is outside the vocabulary [0, ", model.config().vocab_size, ")");

  GenerateOptions opt;
  opt.max_tokens = f.max_tokens;
  opt.sampling.temperature = f.temperature;
  opt.sampling.top_p = f.top_p;
  opt.sampling.top_k = f.top_k;
  opt.sampling.seed = f.seed >= 0 ? uint64_t(f.seed)
                                  : uint64_t(std::chrono::steady_clock::now().time_since_epoch().count());
  bool first = true;
  GenerateResult r = generate(model, prompt, opt, [&](int32_t id) {
    if (f.output_ids) return;
    std::printf(first ? "%d" : " %d", id);  // ids until the tokenizer lands
    std::fflush(stdout);
    first = false;
  });
  if (f.output_ids) std::printf("%s\n", ids_json(r.tokens).c_str());
  else std::printf("\n");
  std::fflush(stdout);
  std::fprintf(stderr, "prefill: %zu tokens in %.3f s (%.1f tok/s) | decode: %ld tokens in %.3f s (%.1f tok/s)%s\n",
               prompt.size(), r.prefill_seconds, double(prompt.size()) / std::max(r.prefill_seconds, 1e-9),
               long(r.decode_steps), r.decode_seconds,
               r.decode_steps > 0 ? double(r.decode_steps) / std::max(r.decode_seconds, 1e-9) : 0.0,
               r.stopped_at_eos ? " | stopped at EOS" : "");
}

}  // namespace

void add_generate(CLI::App& app) {
  auto f = std::make_shared<GenerateFlags>();
  CLI::App* cmd = app.add_subcommand("generate", "Generate a continuation from a Hugging Face DeepSeek-V3 checkpoint");
  cmd->add_option("--model,-m", f->model, "checkpoint folder (config.json + safetensors)")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--prompt,-p", f->prompt, "prompt text (needs the tokenizer)");
  cmd->add_option("--prompt-ids", f->prompt_ids, "prompt as token ids: \"1 2 3\"");
  cmd->add_option("--max-tokens,-n", f->max_tokens, "tokens to generate")->capture_default_str();
  cmd->add_option("--temperature", f->temperature, "sampling temperature; 0 = greedy")->capture_default_str();
  cmd->add_option("--top-p", f->top_p, "nucleus sampling threshold")->capture_default_str();
  cmd->add_option("--top-k", f->top_k, "sample from the k most likely tokens; 0 = all")->capture_default_str();
  cmd->add_option("--seed", f->seed, "random seed (default: from the clock)");
  cmd->add_flag("--output-ids", f->output_ids, "print the generated ids as one JSON array");
  cmd->add_option("--attn", f->attn, "MLA form: absorbed (default) or naive")->check(CLI::IsMember({"absorbed", "naive"}));
  cmd->add_option("--threads,-t", f->threads, "CPU threads (default: all)");
  cmd->callback([f] { run(*f); });
}

}  // namespace dsv3::cli
