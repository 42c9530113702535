// dsv3 logits: float32 logits of every position of a token sequence, as safetensors.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <memory>

#include "cli/args.h"
#include "cli/commands.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "model/transformer.h"

namespace dsv3::cli {

namespace {

struct LogitsFlags {
  std::string model, ids, out, attn = "auto";
  int threads = 0;
};

void run(const LogitsFlags& f) {
  set_threads(f.threads);
  std::vector<int32_t> ids = parse_ids(f.ids, "--ids");
  Transformer model(f.model);
  if (f.attn == "naive") model.attn_form = AttnForm::naive;
  if (f.attn == "absorbed") model.attn_form = AttnForm::absorbed;
  const ModelConfig& c = model.config();
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] >= c.vocab_size) fail("--ids: id ", ids[i], " at index ", i, " is outside the vocabulary [0, ", c.vocab_size, ")");
  const int64_t n = int64_t(ids.size());
  if (n > c.max_position_embeddings) fail("--ids: ", n, " tokens exceed max_position_embeddings (", c.max_position_embeddings, ")");
  KvCache cache(c, n);
  std::vector<float> logits(static_cast<size_t>(n * c.vocab_size));
  model.forward(ids.data(), n, cache, logits.data(), true);
  write_safetensors(f.out, {{"logits", DType::f32, {n, c.vocab_size}, logits.data()}});
  std::fprintf(stderr, "wrote logits [%ld, %ld] to %s\n", long(n), long(c.vocab_size), f.out.c_str());
}

}  // namespace

void add_logits(CLI::App& app) {
  auto f = std::make_shared<LogitsFlags>();
  CLI::App* cmd = app.add_subcommand("logits", "Write the logits of every position of a token sequence (float32 safetensors)");
  cmd->add_option("--model,-m", f->model, "checkpoint folder")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--ids", f->ids, "token ids: \"1 2 3\"")->required();
  cmd->add_option("--out,-o", f->out, "output .safetensors file (tensor 'logits' [n, vocab])")->required();
  cmd->add_option("--attn", f->attn, "MLA form: auto (default: naive for prefill, absorbed for decoding, by multiply-adds), absorbed or naive")
      ->check(CLI::IsMember({"auto", "absorbed", "naive"}));
  cmd->add_option("--threads,-t", f->threads, "CPU threads (default: all)");
  cmd->callback([f] { run(*f); });
}

}  // namespace dsv3::cli
