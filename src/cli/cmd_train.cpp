// dsv3 train: train a DeepSeek-V3-architecture model from token shards (dsv3 data) with
// the paper's recipe; live progress, metrics.csv, loss.svg and checkpoints in RUN_DIR.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/training_run.h"
#include "core/error.h"
#include "cost/cost.h"
#include "data/shard.h"
#include "dist/communicator.h"

namespace dsv3::cli {

namespace {

namespace fs = std::filesystem;

struct TrainFlags : TrainingFlags {
  std::string config, data, tokenizer;
  int dp = 0;  // data-parallel ranks (0: every process mpirun started)
  int ep = 1;  // expert-parallel ranks within them
};

void run(TrainFlags& f) {
  apply_training_flags(f);
  // Under mpirun, every process trains its share of each batch (data parallelism); rank 0
  // alone writes the run folder. A mismatch is an error on every rank before any work.
  dist::Communicator& world = dist::world();
  if (f.dp == 0) f.dp = world.size();
  if (f.dp != world.size())
    fail("--dp ", f.dp, " must equal the number of processes (", world.size(), "; start them with mpirun -np ", f.dp, ")");
  const bool lead = world.rank() == 0;
  if (f.ep < 1 || f.dp % f.ep != 0)
    fail("--ep ", f.ep, " must divide the ", f.dp, " data-parallel processes (expert-parallel groups are made of them)");
  const std::string config_json = read_text(f.config);
  if (!fs::is_directory(f.data)) fail("--data: ", f.data, " is not a folder of token shards");
  auto train_shards = open_shards(f.data, "train"), val_shards = open_shards(f.data, "val");
  if (train_shards.empty()) fail("--data: ", f.data, " has no train-*.bin shards (make them with dsv3 data)");
  const ModelConfig c = ModelConfig::parse(config_json, f.config);
  std::vector<std::span<const uint32_t>> train, val;
  for (const auto* list : {&train_shards, &val_shards})
    for (const auto& s : *list)
      if (s->header().vocab_size > uint32_t(c.vocab_size))
        fail(s->path(), ": token ids up to ", s->header().vocab_size, " but the model's vocab_size is ", c.vocab_size);
  for (const auto& s : train_shards) train.push_back(s->tokens());
  for (const auto& s : val_shards) val.push_back(s->tokens());

  TrainOptions& o = f.opt;
  // The tokenizer goes into every checkpoint: --tokenizer, else the one dsv3 data used.
  std::string tok = f.tokenizer, tok_source = "--tokenizer";
  if (tok.empty() && fs::exists(f.data + "/data.json")) {
    tok_source = f.data + "/data.json";
    try {
      const auto summary = nlohmann::json::parse(read_text(f.data + "/data.json"));
      if (summary.is_object() && summary.contains("tokenizer") && summary["tokenizer"].is_string())
        tok = summary["tokenizer"].get<std::string>();
    } catch (const nlohmann::json::exception& e) {
      fail(f.data, "/data.json: not valid JSON: ", e.what());
    }
  }
  if (!tok.empty()) add_tokenizer_files(tok, tok_source, o.extras);
  if (lead) lock_run_folder(f.out);
  Trainer trainer(config_json, o, train, val, f.out);
  trainer.set_data_parallel(world.size() > 1 ? &world : nullptr);
  // Expert-parallel groups of --ep consecutive ranks: ranks r and r' share experts when r / ep = r' / ep.
  std::unique_ptr<dist::Communicator> ep_group;
  if (f.ep > 1) ep_group = world.split(world.rank() / f.ep, world.rank());
  trainer.set_expert_parallel(ep_group.get());
  const bool resumed = f.resume && trainer.resume();
  refuse_overwrite(f.out, resumed);
  if (!lead) {  // the other ranks train their shares quietly
    trainer.run(nullptr);
    return;
  }
  if (f.resume && !resumed) std::fprintf(stderr, "no checkpoint in %s: starting from scratch\n", f.out.c_str());

  int64_t params = 0;
  for (const TensorSlot& s : list_tensors(c, const_cast<ModelWeights&>(trainer.params())))
    if (!s.mtp) params += s.mat->numel();
  if (world.size() > 1)
    std::fprintf(stderr, "dsv3 train: data parallel over %d processes%s\n", world.size(),
                 f.ep > 1 ? cat(", routed experts split over groups of ", f.ep, " (expert parallelism)").c_str() : "");
  std::fprintf(stderr, "dsv3 train: %.2fM parameters (main model), %ld steps of %ld x %ld tokens, %s GEMMs%s, %zu train shards%s\n",
               double(params) / 1e6, long(o.steps), long(o.batch), long(o.seq),
               (f.precision + (f.fp8_accumulator.empty() ? "" : " (" + f.fp8_accumulator + " accumulator)")).c_str(),
               f.precision == "fp32" ? "" : " (validation loss in fp32)", train_shards.size(),
               resumed ? cat(", resumed at step ", trainer.state().step).c_str() : "");
  const RunTotals totals = run_reported(trainer, f);
  // dsv3 cost's accounting applied to this run's measured throughput.
  if (totals.step_tokens > 0 && totals.step_seconds > 0) {
    const ModelCount count = count_model(c, o.seq, fs::path(f.config).stem().string());
    const double tok_s = double(totals.step_tokens) / totals.step_seconds;
    const double hours_per_t = 1e12 / tok_s / 3600;
    std::fprintf(stderr,
                 "cost: %.1f MFLOP per token to train (6 x %.2fM active matmul weights + attention at seq %ld + MTP); "
                 "measured %.0f tok/s = %.1f GFLOP/s here; 1T tokens at this rate: %.3g machine-hours = $%.3g at "
                 "$2/hour\n",
                 count.train_flops_per_token / 1e6, double(count.matmul_params) / 1e6, long(o.seq), tok_s,
                 tok_s * count.train_flops_per_token / 1e9, hours_per_t, 2 * hours_per_t);
  }
  report_done(trainer, f, totals);
}

}  // namespace

void add_train(CLI::App& app) {
  auto f = std::make_shared<TrainFlags>();
  CLI::App* cmd = app.add_subcommand("train", "Train a DeepSeek-V3-architecture model from token shards");
  cmd->add_option("--config,-c", f->config, "model config.json")->required()->check(CLI::ExistingFile);
  cmd->add_option("--data,-d", f->data, "folder of token shards from dsv3 data (train-*.bin, val-*.bin)")->required();
  cmd->add_option("--tokenizer", f->tokenizer, "tokenizer folder copied into checkpoints (default: the one in DATA/data.json)");
  add_training_flags(cmd, *f, RunKind::pretrain);
  cmd->add_option("--dp", f->dp, "data-parallel processes: run under mpirun -np N (default: as many as mpirun started)");
  cmd->add_option("--ep", f->ep, "expert-parallel processes: the routed experts split over groups of this many data-parallel processes (default 1)");
  cmd->callback([f] { run(*f); });
}

}  // namespace dsv3::cli
