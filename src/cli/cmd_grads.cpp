// dsv3 grads: the loss (mean next-token cross-entropy, no MTP, no balance loss) of one
// sequence and its gradient with respect to every trainable parameter of the main model,
// written as safetensors ("loss" [1], "grad.<HF name>" in the weight's shape), float32.
// FP8 weights are differentiated as their dequantized float32 values.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <memory>

#include "cli/args.h"
#include "cli/commands.h"
#include "core/error.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "model/training.h"

namespace dsv3::cli {

namespace {

struct GradsFlags {
  std::string model, ids, out;
  int threads = 0;
};

void run(const GradsFlags& f) {
  set_threads(f.threads);
  std::vector<int32_t> ids = parse_ids(f.ids, "--ids");
  if (ids.size() < 2) fail("--ids: at least 2 tokens are needed for a next-token loss");
  const ModelConfig c = ModelConfig::load(f.model + "/config.json");
  const int64_t n = int64_t(ids.size());
  for (int64_t i = 0; i < n; ++i)
    if (ids[size_t(i)] >= c.vocab_size)
      fail("--ids: id ", ids[size_t(i)], " at index ", i, " is outside the vocabulary [0, ", c.vocab_size, ")");
  if (n > c.max_position_embeddings) fail("--ids: ", n, " tokens exceed max_position_embeddings (", c.max_position_embeddings, ")");

  Checkpoint ckpt(f.model);
  ModelWeights stored = load_weights(c, ckpt);
  ModelWeights params = allocate_weights(c, DType::f32);
  convert_weights(c, stored, params);
  ModelWeights grads = allocate_weights(c, DType::f32);

  std::vector<int32_t> targets(ids.begin() + 1, ids.end());
  targets.push_back(-1);  // the last position predicts nothing
  TrainingPass<float> pass(c);
  const float loss = float(pass.forward(params, ids.data(), targets.data(), 1, n));
  pass.backward(params, grads);

  std::vector<TensorToWrite> out = {{"loss", DType::f32, {1}, &loss}};
  std::vector<std::string> names;  // keeps the "grad." names alive until written
  const auto slots = list_tensors(c, grads);
  names.reserve(slots.size());
  for (const TensorSlot& s : slots) {
    if (!s.trainable || s.mtp) continue;
    names.push_back("grad." + s.name);
    out.push_back({names.back(), DType::f32, s.shape, s.mat->data});
  }
  write_safetensors(f.out, out);
  std::fprintf(stderr, "loss %.6f over %ld positions; wrote %zu gradients to %s\n", double(loss), long(n - 1),
               out.size() - 1, f.out.c_str());
}

}  // namespace

void add_grads(CLI::App& app) {
  auto f = std::make_shared<GradsFlags>();
  CLI::App* cmd = app.add_subcommand("grads", "Write the next-token loss of a sequence and its parameter gradients");
  cmd->add_option("--model,-m", f->model, "checkpoint folder")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--ids", f->ids, "token ids: \"1 2 3 ...\"")->required();
  cmd->add_option("--out,-o", f->out, "output .safetensors (loss, grad.<name>)")->required();
  cmd->add_option("--threads,-t", f->threads, "CPU threads (default: all)");
  cmd->callback([f] { run(*f); });
}

}  // namespace dsv3::cli
