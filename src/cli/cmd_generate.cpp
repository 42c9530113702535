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
#include "tokenizer/tokenizer.h"
#include "tokenizer/tokenizer_config.h"

namespace dsv3::cli {

namespace {

struct GenerateFlags {
  std::string model, prompt, prompt_ids, attn = "auto";
  int64_t max_tokens = 128;
  float temperature = 0.8f, top_p = 0.95f;
  int64_t top_k = 40;
  int64_t seed = -1;
  bool output_ids = false;
  int threads = 0;
  std::string speculative;  // "" or "mtp"
  int64_t draft = 1;
};

// The length of the longest prefix of s that does not end inside a UTF-8 sequence (text
// is streamed token by token, and a character may span tokens).
size_t complete_utf8(const std::string& s) {
  size_t n = s.size();
  for (size_t back = 1; back <= 3 && back <= n; ++back) {
    const unsigned char ch = static_cast<unsigned char>(s[n - back]);
    if ((ch & 0xC0) == 0x80) continue;  // continuation byte
    const size_t need = ch >= 0xF0 ? 4 : ch >= 0xE0 ? 3 : ch >= 0xC0 ? 2 : 1;
    return need > back ? n - back : n;
  }
  return n;
}

void run(const GenerateFlags& f) {
  set_threads(f.threads);
  if (f.prompt.empty() == f.prompt_ids.empty()) fail("give exactly one of --prompt and --prompt-ids");
  std::unique_ptr<Tokenizer> tokenizer;
  std::vector<int32_t> prompt;
  if (!f.prompt.empty()) {
    const std::string path = f.model + "/tokenizer.json";
    if (!std::filesystem::exists(path)) fail(f.model, ": no tokenizer.json, needed for --prompt (or pass --prompt-ids)");
    tokenizer = std::make_unique<Tokenizer>(path);
    const std::string config_path = f.model + "/tokenizer_config.json";
    if (std::filesystem::exists(config_path)) {
      const TokenizerConfig tc = load_tokenizer_config(config_path);
      if (tc.add_bos_token && tc.bos_token)
        if (auto bos = tokenizer->token_id(*tc.bos_token)) prompt.push_back(*bos);
    }
    const auto ids = tokenizer->encode(f.prompt);
    prompt.insert(prompt.end(), ids.begin(), ids.end());
    if (prompt.empty()) fail("--prompt: the prompt encodes to no tokens");
  } else {
    prompt = parse_ids(f.prompt_ids, "--prompt-ids");
  }
  Transformer model(f.model);
  if (f.attn == "naive") model.attn_form = AttnForm::naive;
  if (f.attn == "absorbed") model.attn_form = AttnForm::absorbed;
  for (size_t i = 0; i < prompt.size(); ++i)
    if (prompt[i] >= model.config().vocab_size)
      fail("--prompt-ids: id ", prompt[i], " at index ", i, " is outside the vocabulary [0, ", model.config().vocab_size, ")");

  GenerateOptions opt;
  opt.max_tokens = f.max_tokens;
  opt.speculative_mtp = f.speculative == "mtp";
  if (f.draft != 1)
    fail("--draft ", f.draft, ": the MTP module drafts one token per step (DeepSeek-V3 ships one module, depth 1)");
  opt.sampling.temperature = f.temperature;
  opt.sampling.top_p = f.top_p;
  opt.sampling.top_k = f.top_k;
  opt.sampling.seed = f.seed >= 0 ? uint64_t(f.seed)
                                  : uint64_t(std::chrono::steady_clock::now().time_since_epoch().count());
  bool first = true;
  std::vector<int32_t> generated;
  size_t printed = 0;
  if (tokenizer && !f.output_ids) std::printf("%s", f.prompt.c_str());
  GenerateResult r = generate(model, prompt, opt, [&](int32_t id) {
    if (f.output_ids) return;
    if (tokenizer) {  // stream the text, holding back an unfinished UTF-8 character
      generated.push_back(id);
      const std::string text = tokenizer->decode(generated, true);
      const size_t ready = complete_utf8(text);
      if (ready > printed) std::fwrite(text.data() + printed, 1, ready - printed, stdout), printed = ready;
    } else {
      std::printf(first ? "%d" : " %d", id);
    }
    std::fflush(stdout);
    first = false;
  });
  if (f.output_ids) std::printf("%s\n", ids_json(r.tokens).c_str());
  else {
    if (tokenizer) {
      const std::string text = tokenizer->decode(generated, true);
      if (text.size() > printed) std::fwrite(text.data() + printed, 1, text.size() - printed, stdout);
    }
    std::printf("\n");
  }
  std::fflush(stdout);
  // Decoded tokens: those after the first (which the prefill's logits give).
  const long decoded = long(std::max<size_t>(r.tokens.size(), 1) - 1);
  std::fprintf(stderr, "prefill: %zu tokens in %.3f s (%.1f tok/s) | decode: %ld tokens in %.3f s (%.1f tok/s)%s",
               prompt.size(), r.prefill_seconds, double(prompt.size()) / std::max(r.prefill_seconds, 1e-9), decoded,
               r.decode_seconds, decoded > 0 ? double(decoded) / std::max(r.decode_seconds, 1e-9) : 0.0,
               r.stopped_at_eos ? " | stopped at EOS" : "");
  if (opt.speculative_mtp)
    std::fprintf(stderr, " | MTP drafts accepted: %ld of %ld (%.1f %%), %.2f tokens per main-model step",
                 long(r.accepted), long(r.drafted), r.drafted ? 100.0 * double(r.accepted) / double(r.drafted) : 0.0,
                 r.decode_steps ? double(decoded) / double(r.decode_steps) : 0.0);
  std::fprintf(stderr, "\n");
}

}  // namespace

void add_generate(CLI::App& app) {
  auto f = std::make_shared<GenerateFlags>();
  CLI::App* cmd = app.add_subcommand("generate", "Generate a continuation from a Hugging Face DeepSeek-V3 checkpoint");
  cmd->add_option("--model,-m", f->model, "checkpoint folder (config.json + safetensors)")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--prompt,-p", f->prompt, "prompt text (encoded with the folder's tokenizer.json)");
  cmd->add_option("--prompt-ids", f->prompt_ids, "prompt as token ids: \"1 2 3\"");
  cmd->add_option("--max-tokens,-n", f->max_tokens, "tokens to generate")->capture_default_str();
  cmd->add_option("--temperature", f->temperature, "sampling temperature; 0 = greedy")->capture_default_str();
  cmd->add_option("--top-p", f->top_p, "nucleus sampling threshold")->capture_default_str();
  cmd->add_option("--top-k", f->top_k, "sample from the k most likely tokens; 0 = all")->capture_default_str();
  cmd->add_option("--seed", f->seed, "random seed (default: from the clock)");
  cmd->add_flag("--output-ids", f->output_ids, "print the generated ids as one JSON array");
  cmd->add_option("--attn", f->attn, "MLA form: auto (default: naive for prefill, absorbed for decoding, by multiply-adds), absorbed or naive")
      ->check(CLI::IsMember({"auto", "absorbed", "naive"}));
  cmd->add_option("--speculative", f->speculative,
                  "speculative decoding: mtp (the checkpoint's MTP module drafts, the model checks; same output "
                  "distribution, greedy output unchanged)")
      ->check(CLI::IsMember({"mtp"}));
  cmd->add_option("--draft", f->draft, "tokens drafted per step (the MTP module: 1)")->capture_default_str();
  cmd->add_option("--threads,-t", f->threads, "CPU threads (default: all)");
  cmd->callback([f] { run(*f); });
}

}  // namespace dsv3::cli
