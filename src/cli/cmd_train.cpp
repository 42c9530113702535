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
  int pp = 1;  // pipeline stages
  int dp = 0;  // data-parallel ranks per stage (0: the processes mpirun started / pp)
  int ep = 1;  // expert-parallel ranks within them
  int micro_batches = 0;  // 0: 1, or 2 x pp with a pipeline
  std::string pp_schedule;  // empty: 1f1b
  int ep_nodes = 0, max_nodes = 0;  // node-limited routing (0: as the config says)
};

// The config with node-limited routing (§2.1.2) set: the routed experts on `nodes` nodes
// (ranges of experts; groups of --ep / nodes expert-parallel ranks), each token's on at most
// `max_nodes`. Written into the run's config.json, so that inference routes alike.
std::string with_node_limit(const std::string& config_json, const TrainFlags& f) {
  if (f.max_nodes != 0 && f.ep_nodes == 0) fail("--max-nodes needs --ep-nodes (how many nodes the experts are on)");
  if (f.ep_nodes == 0) return config_json;
  if (f.ep_nodes < 1 || (f.ep > 1 && f.ep % f.ep_nodes != 0))
    fail("--ep-nodes ", f.ep_nodes, " must divide --ep ", f.ep, " (a node is a group of consecutive expert-parallel ranks)");
  if (f.max_nodes < 0 || f.max_nodes > f.ep_nodes)
    fail("--max-nodes ", f.max_nodes, " must be between 1 and --ep-nodes ", f.ep_nodes);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(config_json);
  } catch (const nlohmann::json::exception& e) {
    fail(f.config, ": not valid JSON: ", e.what());
  }
  if (!j.is_object()) fail(f.config, ": not a JSON object");
  j["node_limited_routing"] = {{"nodes", f.ep_nodes}, {"max_nodes", f.max_nodes > 0 ? f.max_nodes : f.ep_nodes}};
  return j.dump(2) + "\n";
}

// Every process of the job must run the same command on the same config: the launch's
// fingerprint (a hash of both) compared across ranks, before any work.
void check_same_launch(dist::Communicator& world, const std::string& text) {
  if (world.size() == 1) return;
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (unsigned char ch : text) h = (h ^ ch) * 1099511628211ull;
  std::vector<double> all(size_t(2 * world.size()), 0.0);
  all[size_t(2 * world.rank())] = double(h >> 32), all[size_t(2 * world.rank() + 1)] = double(h & 0xffffffffu);  // exact
  world.all_reduce(std::span<double>(all));
  for (int r = 1; r < world.size(); ++r)
    if (all[size_t(2 * r)] != all[0] || all[size_t(2 * r + 1)] != all[1])
      fail("rank ", r, " was started with another config or other flags than rank 0: every process of an mpirun job must "
           "run the same dsv3 train command on the same config.json");
}

void run(TrainFlags& f, const std::vector<std::string>& argv) {
  if (f.micro_batches == 0) f.micro_batches = f.pp > 1 ? 2 * f.pp : 1;
  f.opt.micro_batches = f.micro_batches;
  apply_training_flags(f);
  // The process grid (§3.2): world = pp x dp; rank = stage x dp + d, so that the dp ranks of
  // a stage are consecutive and expert-parallel groups of --ep lie within them. Under mpirun
  // each stage's dp ranks train their shares of each batch; rank 0 alone writes the run
  // folder. A mismatch is an error on every rank before any work.
  dist::Communicator& world = dist::world();
  if (f.pp < 1) fail("--pp must be at least 1, not ", f.pp);
  if (f.dp == 0 && world.size() % f.pp != 0) {
    if (world.size() == 1) fail("--pp ", f.pp, " runs a process per stage: start them with mpirun -np ", f.pp, " (x --dp)");
    fail("--pp ", f.pp, " does not divide the ", world.size(), " processes mpirun started (they are --pp x --dp)");
  }
  if (f.dp == 0) f.dp = std::max(world.size() / f.pp, 1);
  if (f.pp * f.dp != world.size())
    fail(f.pp > 1 ? cat("--pp ", f.pp, " x ") : "", "--dp ", f.dp, " must equal the number of processes (", world.size(),
         "; start them with mpirun -np ", f.pp * f.dp, ")");
  const bool lead = world.rank() == 0;
  if (f.ep < 1 || f.dp % f.ep != 0)
    fail("--ep ", f.ep, " must divide the ", f.dp, " data-parallel processes (expert-parallel groups are made of them)");
  if (!f.pp_schedule.empty() && f.pp == 1) fail("--pp-schedule ", f.pp_schedule, " needs a pipeline (--pp 2 or more)");
  if (f.pp_schedule.empty()) f.pp_schedule = "1f1b";
  if (f.pp_schedule != "1f1b" && f.pp_schedule != "dualpipe" && f.pp_schedule != "dualpipev")
    fail("--pp-schedule must be 1f1b, dualpipe or dualpipev, not '", f.pp_schedule, "'");
  const std::string config_json = with_node_limit(read_text(f.config), f);
  std::string launch = config_json;
  for (const std::string& a : argv) launch += "\n" + a;
  check_same_launch(world, launch);
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
  if (f.pp > c.num_hidden_layers)
    fail("--pp ", f.pp, " exceeds the model's ", c.num_hidden_layers, " layers (every pipeline stage needs one)");
  Trainer trainer(config_json, o, train, val, f.out);
  const int stage = world.rank() / f.dp;
  std::unique_ptr<dist::Communicator> dp_group = world.split(stage, world.rank());
  std::unique_ptr<dist::Communicator> pp_group = world.split(world.rank() % f.dp, world.rank());
  trainer.set_data_parallel(f.dp > 1 ? dp_group.get() : nullptr);
  // Expert-parallel groups of --ep consecutive ranks of a stage: they share its experts.
  std::unique_ptr<dist::Communicator> ep_group;
  if (f.ep > 1) ep_group = dp_group->split(dp_group->rank() / f.ep, dp_group->rank());
  // The nodes of node-limited routing (the flags', or the config's own) are runs of ep ranks.
  const int64_t nodes = c.route_nodes;
  if (f.ep > 1 && nodes > 1 && f.ep % nodes != 0)
    fail(f.config, ": node_limited_routing's ", nodes, " nodes must divide --ep ", f.ep, " (a node is a run of expert-parallel ranks)");
  trainer.set_expert_parallel(ep_group.get(), f.ep > 1 ? nodes : 1);
  trainer.set_pipeline(f.pp > 1 ? pp_group.get() : nullptr, f.pp_schedule);
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
  if (f.pp > 1) {
    std::string stages;
    const int n = trainer.pipeline().schedule().stages();  // DualPipeV: 2 x pp
    for (int s = 0; s < n; ++s) {
      const StageLayers l = Pipeline::stage_layers(c, n, s);
      stages += cat(s ? ", " : "", "[", l.begin, ", ", l.end, ")");
    }
    std::fprintf(stderr, "dsv3 train: pipeline of %d stages over %d ranks (layers %s; embedding on the first, head and MTP "
                 "on the last), %s over %d micro-batches\n", n, f.pp, stages.c_str(), f.pp_schedule.c_str(), f.micro_batches);
  }
  if (f.dp > 1)
    std::fprintf(stderr, "dsv3 train: data parallel over %d processes%s\n", f.dp,
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
  cmd->add_option("--pp", f->pp, "pipeline stages: the layers split over this many ranks (default 1); mpirun -np pp x dp");
  cmd->add_option("--dp", f->dp, "data-parallel processes per stage (default: the processes mpirun started / --pp)");
  cmd->add_option("--ep", f->ep, "expert-parallel processes: the routed experts split over groups of this many data-parallel processes (default 1)");
  cmd->add_option("--micro-batches", f->micro_batches, "each process's share of a batch runs as this many micro-batches, "
                  "gradients accumulated (default 1, or 2 x --pp with a pipeline)");
  cmd->add_option("--ep-nodes", f->ep_nodes, "node-limited routing (§2.1.2): the routed experts on this many nodes, "
                  "each a group of --ep / N consecutive expert-parallel ranks (written into the run's config.json)");
  cmd->add_option("--max-nodes", f->max_nodes, "with --ep-nodes: each token's experts on at most this many nodes, "
                  "chosen by the sum of each node's floor(k / M) highest affinities (default: every node, no limit)");
  cmd->add_option("--pp-schedule", f->pp_schedule, "pipeline schedule: 1f1b (default); dualpipe (--pp even, micro-batches "
                  "even and >= 2 x --pp); dualpipev (the model in 2 x --pp stages, micro-batches >= 2 x --pp)");
  cmd->callback([f, cmd] {
    std::vector<std::string> argv;  // what every process must have been given alike
    for (const CLI::Option* o : cmd->get_options())
      for (const std::string& v : o->results()) argv.push_back(o->get_name() + "=" + v);
    run(*f, argv);
  });
}

}  // namespace dsv3::cli
