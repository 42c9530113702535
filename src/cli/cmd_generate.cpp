// dsv3 generate: stream a continuation of a prompt from a Hugging Face checkpoint folder.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "cli/args.h"
#include "cli/commands.h"
#include "core/error.h"
#include "infer/batch.h"
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
  std::string prompts;  // a JSONL file: many prompts in one batch
  int64_t max_batch = 16;
  int64_t kv_cache_tokens = 0;  // the batch's page pool (0: room for every sequence at its longest)
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

// A text prompt's ids: a BOS token first if the folder's tokenizer_config.json asks for one
// (add_bos_token), as the checkpoint's own tokenizer does.
std::vector<int32_t> encode_prompt(const Tokenizer& tokenizer, const std::string& model_dir, const std::string& text) {
  std::vector<int32_t> prompt;
  const std::string config_path = model_dir + "/tokenizer_config.json";
  if (std::filesystem::exists(config_path)) {
    const TokenizerConfig tc = load_tokenizer_config(config_path);
    if (tc.add_bos_token && tc.bos_token)
      if (auto bos = tokenizer.token_id(*tc.bos_token)) prompt.push_back(*bos);
  }
  const auto ids = tokenizer.encode(text);
  prompt.insert(prompt.end(), ids.begin(), ids.end());
  return prompt;
}

// The checkpoint, with --attn applied.
std::unique_ptr<Transformer> load_model(const GenerateFlags& f) {
  auto model = std::make_unique<Transformer>(f.model);
  if (f.attn == "naive") model->attn_form = AttnForm::naive;
  if (f.attn == "absorbed") model->attn_form = AttnForm::absorbed;
  return model;
}

// The generation options the flags give (the seed from the clock unless --seed).
GenerateOptions generate_options(const GenerateFlags& f) {
  if (f.draft != 1 && f.speculative.empty()) fail("--draft ", f.draft, " goes with --speculative mtp");
  if (f.draft < 1 || f.draft > 8) fail("--draft must be in 1..8, not ", f.draft);
  GenerateOptions opt;
  opt.max_tokens = f.max_tokens;
  opt.speculative_mtp = f.speculative == "mtp";
  opt.draft = f.draft;
  opt.sampling.temperature = f.temperature;
  opt.sampling.top_p = f.top_p;
  opt.sampling.top_k = f.top_k;
  opt.sampling.seed = f.seed >= 0 ? uint64_t(f.seed)
                                  : uint64_t(std::chrono::steady_clock::now().time_since_epoch().count());
  return opt;
}

// --prompts FILE.jsonl: one JSON object per line, {"prompt": "text"} or {"prompt_ids": [ids]},
// optionally "max_tokens"; all run together in batches of --max-batch sequences. One JSON line
// per result on stdout as each finishes: index (the request's: non-blank lines counted from
// 0), text (with a tokenizer),
// ids, prompt_tokens, tokens, finish_reason ("stop" at EOS, "length"), seconds to the first
// token and in all.
void run_batch(const GenerateFlags& f, const GenerateOptions& base) {
  const std::unique_ptr<Transformer> loaded = load_model(f);
  Transformer& model = *loaded;
  std::unique_ptr<Tokenizer> tokenizer;
  const std::string tok_path = f.model + "/tokenizer.json";
  if (std::filesystem::exists(tok_path)) tokenizer = std::make_unique<Tokenizer>(tok_path);
  std::ifstream in(f.prompts);
  if (!in) fail("--prompts: cannot read ", f.prompts);
  struct Request {
    std::vector<int32_t> prompt;
    GenerateOptions opt;
  };
  std::vector<Request> requests;
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      fail(f.prompts, " line ", n, ": not JSON (", e.what(), ")");
    }
    if (!j.is_object()) fail(f.prompts, " line ", n, ": expected an object");
    Request r;
    r.opt = base;
    r.opt.sampling.seed = base.sampling.seed + uint64_t(requests.size());
    if (j.contains("max_tokens")) {
      if (!j["max_tokens"].is_number_integer() || j["max_tokens"].get<int64_t>() < 1 ||
          j["max_tokens"].get<int64_t>() > model.config().max_position_embeddings)
        fail(f.prompts, " line ", n, ": max_tokens must be an integer in [1, max_position_embeddings = ",
             model.config().max_position_embeddings, "]");
      r.opt.max_tokens = j["max_tokens"].get<int64_t>();
    }
    if (j.contains("prompt_ids")) {
      if (!j["prompt_ids"].is_array()) fail(f.prompts, " line ", n, ": prompt_ids must be an array of token ids");
      for (const auto& v : j["prompt_ids"]) {
        if (!v.is_number_integer()) fail(f.prompts, " line ", n, ": prompt_ids must be an array of token ids");
        const int64_t id = v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX) ? INT64_MAX : v.get<int64_t>();
        if (id < 0 || id >= model.config().vocab_size)
          fail(f.prompts, " line ", n, ": token id ", id, " is outside the vocabulary [0, ", model.config().vocab_size, ")");
        r.prompt.push_back(int32_t(id));
      }
    } else if (j.contains("prompt") && j["prompt"].is_string()) {
      if (!tokenizer) fail(f.prompts, " line ", n, ": a text prompt needs ", tok_path, " (or give prompt_ids)");
      r.prompt = encode_prompt(*tokenizer, f.model, j["prompt"].get<std::string>());
    } else {
      fail(f.prompts, " line ", n, ": expected \"prompt\" (a string) or \"prompt_ids\" (an array)");
    }
    if (r.prompt.empty()) fail(f.prompts, " line ", n, ": the prompt is empty");
    for (int32_t id : r.prompt)
      if (id < 0 || id >= model.config().vocab_size)
        fail(f.prompts, " line ", n, ": token id ", id, " is outside the vocabulary [0, ", model.config().vocab_size, ")");
    requests.push_back(std::move(r));
  }
  if (requests.empty()) fail("--prompts: ", f.prompts, " has no prompts");
  int64_t max_len = 0;
  for (const Request& r : requests) max_len = std::max<int64_t>(max_len, int64_t(r.prompt.size()) + r.opt.max_tokens);
  if (max_len > model.config().max_position_embeddings)
    fail("--prompts: a prompt + max-tokens needs ", max_len, " positions, beyond max_position_embeddings (",
         model.config().max_position_embeddings, ")");
  const int64_t slots = std::min<int64_t>(f.max_batch, int64_t(requests.size()));
  BatchEngine engine(model, slots, max_len, std::max<int64_t>(512, slots), f.kv_cache_tokens);
  std::vector<int64_t> ids(requests.size(), -1);
  std::vector<bool> reported(requests.size(), false);
  size_t next = 0;
  int64_t generated = 0, drafted = 0, accepted = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (;;) {
    while (next < requests.size()) {
      const int64_t id = engine.add(requests[next].prompt, requests[next].opt);
      if (id < 0) break;
      ids[next++] = id;
    }
    if (!engine.step() && next == requests.size()) break;
    for (size_t i = 0; i < next; ++i) {
      const auto& s = engine.sequence(ids[i]);
      if (!s.finished || reported[i]) continue;
      reported[i] = true;
      generated += int64_t(s.tokens.size());
      drafted += int64_t(s.drafts.size()), accepted += s.accepted;
      nlohmann::json out;
      out["index"] = i;
      if (tokenizer) out["text"] = tokenizer->decode(s.tokens, true);
      out["ids"] = s.tokens;
      out["prompt_tokens"] = s.prompt.size();
      out["tokens"] = s.tokens.size();
      out["finish_reason"] = s.stopped_at_eos ? "stop" : "length";
      out["first_token_seconds"] = s.first_token_seconds;
      out["seconds"] = s.seconds;
      std::printf("%s\n", out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
      std::fflush(stdout);
    }
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "%zu prompts, %ld tokens generated in %.3f s (%.1f tok/s), up to %ld at once", requests.size(),
               long(generated), seconds, double(generated) / std::max(seconds, 1e-9), long(slots));
  if (base.speculative_mtp)
    std::fprintf(stderr, " | MTP drafts accepted: %ld of %ld (%.1f %%)", long(accepted), long(drafted),
                 drafted ? 100.0 * double(accepted) / double(drafted) : 0.0);
  std::fprintf(stderr, "\n");
}

void run(const GenerateFlags& f) {
  set_threads(f.threads);
  if (!f.prompts.empty()) {
    if (!f.prompt.empty() || !f.prompt_ids.empty()) fail("give --prompts, or one of --prompt and --prompt-ids, not both");
    if (f.max_batch < 1) fail("--max-batch must be >= 1");
    if (f.max_tokens < 1) fail("--max-tokens must be >= 1");
    const GenerateOptions opt = generate_options(f);
    Sampler check(opt.sampling);  // bad sampling flags fail before the model loads
    run_batch(f, opt);
    return;
  }
  if (f.prompt.empty() == f.prompt_ids.empty()) fail("give exactly one of --prompt and --prompt-ids");
  if (f.kv_cache_tokens != 0 || f.max_batch != 16) fail("--kv-cache-tokens and --max-batch go with --prompts");
  std::unique_ptr<Tokenizer> tokenizer;
  std::vector<int32_t> prompt;
  if (!f.prompt.empty()) {
    const std::string path = f.model + "/tokenizer.json";
    if (!std::filesystem::exists(path)) fail(f.model, ": no tokenizer.json, needed for --prompt (or pass --prompt-ids)");
    tokenizer = std::make_unique<Tokenizer>(path);
    prompt = encode_prompt(*tokenizer, f.model, f.prompt);
    if (prompt.empty()) fail("--prompt: the prompt encodes to no tokens");
  } else {
    prompt = parse_ids(f.prompt_ids, "--prompt-ids");
  }
  const GenerateOptions opt = generate_options(f);
  const std::unique_ptr<Transformer> loaded = load_model(f);
  Transformer& model = *loaded;
  for (size_t i = 0; i < prompt.size(); ++i)
    if (prompt[i] >= model.config().vocab_size)
      fail("--prompt-ids: id ", prompt[i], " at index ", i, " is outside the vocabulary [0, ", model.config().vocab_size, ")");

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
  cmd->add_option("--draft", f->draft, "with --speculative mtp: tokens drafted per check, 1..8 (beyond 1 the module "
                  "is chained on its own output)")->capture_default_str();
  cmd->add_option("--prompts", f->prompts,
                  "a JSONL file of prompts ({\"prompt\": text} or {\"prompt_ids\": [ids]}, optional max_tokens) "
                  "generated together; one JSON line per result");
  cmd->add_option("--max-batch", f->max_batch, "with --prompts: sequences running at once")->capture_default_str();
  cmd->add_option("--kv-cache-tokens", f->kv_cache_tokens,
                  "with --prompts: positions of latent cache in all, in pages of 64 (default: every sequence at its "
                  "longest); sequences wait for pages as others finish");
  cmd->add_option("--threads,-t", f->threads, "CPU threads (default: all)");
  cmd->callback([f] { run(*f); });
}

}  // namespace dsv3::cli
