// dsv3 sft: supervised fine-tuning of a checkpoint on conversations (report §5.1): each
// conversation rendered with the checkpoint's chat template, the loss on the assistant's
// tokens only, one conversation per sequence. The trainer, precisions, balancing,
// checkpoints and resume are dsv3 train's.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <memory>

#include "cli/commands.h"
#include "cli/training_run.h"
#include "core/error.h"
#include "train/sft_data.h"

namespace dsv3::cli {

namespace {

struct SftFlags : TrainingFlags {
  std::string model, data, val;
};

void run(SftFlags& f) {
  apply_training_flags(f);
  const std::string config_json = fine_tuning_config(f.model, "SFT renders conversations with its chat template");
  const ModelConfig c = ModelConfig::parse(config_json, f.model + "/config.json");

  const Tokenizer tok(f.model + "/tokenizer.json");
  const TokenizerConfig tok_config = load_tokenizer_config(f.model + "/tokenizer_config.json");
  if (c.eos_token_ids.empty()) fail(f.model, "/config.json: no eos_token_id (SFT pads conversations with it)");
  const int32_t pad = int32_t(c.eos_token_ids[0]);
  auto load = [&](const std::string& path) {
    auto examples = read_sft_file(tok, tok_config, path);
    for (size_t i = 0; i < examples.size(); ++i)
      for (int32_t t : examples[i].tokens)
        if (t < 0 || t >= c.vocab_size) fail(path, ": conversation ", i + 1, " has token ", t, " outside the model's vocabulary");
    return std::make_unique<SftBatches>(std::move(examples), f.opt.seq, pad, f.opt.seed);
  };
  auto train = load(f.data);
  std::unique_ptr<SftBatches> val;
  if (!f.val.empty() && f.opt.eval_every > 0) val = load(f.val);
  const int64_t conversations = train->size(), cut = train->truncated();
  TrainOptions& o = f.opt;
  add_tokenizer_files(f.model, "--model", o.extras);
  lock_run_folder(f.out);
  Trainer trainer(config_json, o, std::move(train), std::move(val), f.out);
  const bool resumed = f.resume && trainer.resume();
  refuse_overwrite(f.out, resumed);
  if (f.resume && !resumed) std::fprintf(stderr, "no checkpoint in %s: starting from %s\n", f.out.c_str(), f.model.c_str());
  if (!resumed) trainer.init_from(f.model);
  std::fprintf(stderr, "dsv3 sft: %s, %ld conversations (%ld longer than --seq %ld, cut), %ld steps of %ld, %s GEMMs%s\n",
               f.model.c_str(), long(conversations), long(cut), long(o.seq), long(o.steps), long(o.batch), f.precision.c_str(),
               resumed ? cat(", resumed at step ", trainer.state().step).c_str() : "");
  report_done(trainer, f, run_reported(trainer, f));
}

}  // namespace

void add_sft(CLI::App& app) {
  auto f = std::make_shared<SftFlags>();
  // Fine-tuning defaults: fewer steps at a lower rate than pre-training, no MTP loss.
  f->opt.steps = 300, f->opt.seq = 512, f->opt.schedule.lr = 1e-4, f->opt.schedule.min_lr = 1e-5, f->opt.mtp_weight = 0;
  f->opt.eval_every = 50;
  CLI::App* cmd = app.add_subcommand("sft", "Fine-tune a checkpoint on conversations (loss on the assistant's tokens)");
  cmd->add_option("--model,-m", f->model, "Hugging Face checkpoint folder with tokenizer.json and a chat template")->required();
  cmd->add_option("--data,-d", f->data, "JSONL conversations: {\"messages\": [{\"role\", \"content\"}, ...]} per line")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--val", f->val, "JSONL conversations held out for the validation loss")->check(CLI::ExistingFile);
  add_training_flags(cmd, *f, RunKind::sft);
  cmd->callback([f] { run(*f); });
}

}  // namespace dsv3::cli
