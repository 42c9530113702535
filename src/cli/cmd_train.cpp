// dsv3 train: train a DeepSeek-V3-architecture model from token shards (dsv3 data) with
// the paper's recipe; live progress, metrics.csv, loss.svg and checkpoints in RUN_DIR.
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/args.h"
#include "cli/commands.h"
#include "core/error.h"
#include "dist/communicator.h"
#include "cost/cost.h"
#include "data/shard.h"
#include "train/plot.h"
#include "train/trainer.h"

namespace dsv3::cli {

namespace {

namespace fs = std::filesystem;

struct TrainFlags {
  std::string config, data, out, tokenizer, precision = "fp32";
  std::string fp8_accumulator, fp8_caches;  // empty: the paper's (promoted, fp8)
  TrainOptions opt;
  double warmup_frac = 0.05, decay_start_frac = 0.6;
  bool resume = false, fp32_moments = false;
  int threads = 0;
  int dp = 0;  // data-parallel ranks (0: every process mpirun started)
};

void run(TrainFlags& f) {
  set_threads(f.threads);
  // Under mpirun, every process trains its share of each batch (data parallelism); rank 0
  // alone writes the run folder. A mismatch is an error on every rank before any work.
  dist::Communicator& world = dist::world();
  if (f.dp == 0) f.dp = world.size();
  if (f.dp != world.size())
    fail("--dp ", f.dp, " must equal the number of processes (", world.size(), "; start them with mpirun -np ", f.dp, ")");
  const bool lead = world.rank() == 0;
  if ((!f.fp8_accumulator.empty() || !f.fp8_caches.empty()) && f.precision.rfind("fp8", 0) != 0)
    fail("--fp8-accumulator and --fp8-caches apply to --precision fp8 or fp8-tensor, not ", f.precision);
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
  o.adamw.bf16_moments = !f.fp32_moments;
  o.linear.precision = parse_gemm_precision(f.precision.c_str());
  // Ablations of the fp8 recipe: the accumulator, and the low-precision activation caches.
  if (f.fp8_accumulator == "fp32") o.linear.fp8 = kFp8Fp32Accumulate;
  if (f.fp8_accumulator == "unpromoted") o.linear.fp8 = kFp8NoPromotion;
  o.linear.low_precision_caches = f.fp8_caches != "full";
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
  if (!tok.empty()) {
    for (const char* name : {"tokenizer.json", "tokenizer_config.json"})
      if (fs::exists(tok + "/" + name)) o.extras.files.push_back(tok + "/" + name);
    if (o.extras.files.empty()) fail(tok_source, ": tokenizer folder ", tok, " has no tokenizer.json");
  }
  o.schedule.warmup_steps = int64_t(double(o.steps) * f.warmup_frac);
  o.schedule.decay_start = int64_t(double(o.steps) * f.decay_start_frac);
  o.schedule.decay_end = o.steps;
  fs::create_directories(f.out);
  // One trainer per run folder: a second one would interleave checkpoints and metrics.
  if (lead) {
    const int lock = ::open((f.out + "/.lock").c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0644);
    if (lock < 0) fail(f.out, "/.lock: cannot create: ", std::strerror(errno));
    if (::flock(lock, LOCK_EX | LOCK_NB) != 0) fail(f.out, " is in use by another dsv3 train (", f.out, "/.lock is held)");
  }
  Trainer trainer(config_json, o, train, val, f.out);
  trainer.set_data_parallel(world.size() > 1 ? &world : nullptr);
  const bool resumed = f.resume && trainer.resume();
  if (!lead) {  // the other ranks train their shares quietly
    if (!resumed && latest_checkpoint(f.out)) fail(f.out, " already holds checkpoints; pass --resume to continue, or choose another --out");
    trainer.run(nullptr);
    return;
  }
  if (f.resume && !resumed) std::fprintf(stderr, "no checkpoint in %s: starting from scratch\n", f.out.c_str());
  if (!resumed && latest_checkpoint(f.out))
    fail(f.out, " already holds checkpoints; pass --resume to continue, or choose another --out");

  int64_t params = 0;
  for (const TensorSlot& s : list_tensors(c, const_cast<ModelWeights&>(trainer.params())))
    if (!s.mtp) params += s.mat->numel();
  if (world.size() > 1) std::fprintf(stderr, "dsv3 train: data parallel over %d processes\n", world.size());
  std::fprintf(stderr, "dsv3 train: %.2fM parameters (main model), %ld steps of %ld x %ld tokens, %s GEMMs%s, %zu train shards%s\n",
               double(params) / 1e6, long(o.steps), long(o.batch), long(o.seq),
               (f.precision + (f.fp8_accumulator.empty() ? "" : " (" + f.fp8_accumulator + " accumulator)")).c_str(),
               f.precision == "fp32" ? "" : " (validation loss in fp32)", train_shards.size(),
               resumed ? cat(", resumed at step ", trainer.state().step).c_str() : "");

  const std::string csv_path = f.out + "/metrics.csv";
  Curve train_curve{"train loss", "#1f77b4", {}, {}}, val_curve{"validation loss", "#d62728", {}, {}};
  double smooth = -1, step_seconds = 0;
  if (resumed && fs::exists(csv_path)) {
    // Steps after the checkpoint were lost with the crash and run again: keep the rows up to
    // the checkpoint, and rebuild the curves from them.
    std::ifstream in(csv_path);
    std::string header, line, kept;
    std::getline(in, header);
    kept = header + "\n";
    while (std::getline(in, line)) {
      std::vector<std::string> cols;
      for (size_t a = 0, b; a <= line.size(); a = b + 1) {
        b = line.find(',', a);
        if (b == std::string::npos) b = line.size();
        cols.push_back(line.substr(a, b - a));
      }
      if (cols.size() < 6 || std::atoll(cols[0].c_str()) > trainer.state().step) continue;
      kept += line + "\n";
      const double step = std::atof(cols[0].c_str()), loss = std::atof(cols[3].c_str());
      smooth = smooth < 0 ? loss : 0.9 * smooth + 0.1 * loss;
      train_curve.points.push_back({step, smooth});
      if (!cols[5].empty()) val_curve.points.push_back({step, std::atof(cols[5].c_str())});
    }
    in.close();
    std::ofstream(csv_path, std::ios::trunc) << kept;
  }
  std::ofstream csv(csv_path, resumed ? std::ios::app : std::ios::trunc);
  if (!resumed) {  // max_vio is the largest of the per-layer max_vio_L columns
    csv << "step,tokens,batch,loss,mtp_loss,val_loss,lr,grad_norm,tokens_per_s,max_vio";
    for (int64_t l = 0; l < c.num_hidden_layers; ++l)
      if (c.is_moe_layer(l)) csv << ",max_vio_" << l;
    csv << "\n";
  }
  const bool tty = isatty(STDERR_FILENO);
  const auto start = std::chrono::steady_clock::now();
  const int64_t first_step = trainer.state().step;
  int64_t step_tokens = 0;
  trainer.run([&](const StepMetrics& m) {
    if (m.step == first_step + 1)
      std::fprintf(stderr, "activations held for the backward pass: %.1f MiB (%s)\n",
                   double(m.activation_bytes) / (1 << 20),
                   o.linear.attention_output_format() == SavedFormat::full
                       ? "norms and MLA up-projections recomputed"
                       : "norms and MLA up-projections recomputed; attention output in E5M6, MoE SwiGLU inputs in FP8");
    step_seconds += double(m.batch * o.seq) / m.tokens_per_s;  // the steps alone: no eval, no saving
    step_tokens += m.batch * o.seq;
    smooth = smooth < 0 ? m.loss : 0.9 * smooth + 0.1 * m.loss;
    char line[512];
    std::snprintf(line, sizeof(line), "%ld,%ld,%ld,%.6f,%.6f,%s,%.6g,%.4f,%.1f,%.4f\n", long(m.step), long(m.tokens),
                  long(m.batch), m.loss, m.mtp_loss, m.val_loss >= 0 ? cat(m.val_loss).c_str() : "", m.lr, m.grad_norm,
                  m.tokens_per_s, m.max_vio);
    csv << std::string(line, std::strlen(line) - 1);  // without the newline
    for (double v : m.max_vio_layers) csv << "," << v;
    csv << "\n" << std::flush;
    train_curve.points.push_back({double(m.step), smooth});
    if (m.val_loss >= 0) val_curve.points.push_back({double(m.step), m.val_loss});
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const double eta = elapsed / double(m.step - first_step) * double(o.steps - m.step);
    const int width = 24, filled = int(double(width) * double(m.step) / double(o.steps));
    std::string bar = std::string(size_t(filled), '#') + std::string(size_t(width - filled), '.');
    std::snprintf(line, sizeof(line),
                  "step %ld/%ld [%s] loss %.4f%s | mtp %.3f | lr %.2e | gnorm %.2f | %.0f tok/s | maxvio %.2f | ETA %s",
                  long(m.step), long(o.steps), bar.c_str(), smooth,
                  m.val_loss >= 0 ? cat(" val ", std::to_string(m.val_loss).substr(0, 6)).c_str() : "", m.mtp_loss, m.lr,
                  m.grad_norm, m.tokens_per_s, m.max_vio, format_duration(eta).c_str());
    if (tty) std::fprintf(stderr, "\r%s\033[K%s", line, m.step == o.steps || m.val_loss >= 0 ? "\n" : "");
    else if (m.step % std::max<int64_t>(o.log_every, 1) == 0 || m.step == o.steps || m.val_loss >= 0)
      std::fprintf(stderr, "%s\n", line);
    if (m.val_loss >= 0 || m.step == o.steps)
      write_svg_plot(f.out + "/loss.svg", "dsv3 training loss", {train_curve, val_curve});
  });
  // dsv3 cost's accounting applied to this run's measured throughput.
  if (step_tokens > 0 && step_seconds > 0) {
    const ModelCount count = count_model(c, o.seq, fs::path(f.config).stem().string());
    const double tok_s = double(step_tokens) / step_seconds;
    const double hours_per_t = 1e12 / tok_s / 3600;
    std::fprintf(stderr,
                 "cost: %.1f MFLOP per token to train (6 x %.2fM active matmul weights + attention at seq %ld + MTP); "
                 "measured %.0f tok/s = %.1f GFLOP/s here; 1T tokens at this rate: %.3g machine-hours = $%.3g at "
                 "$2/hour\n",
                 count.train_flops_per_token / 1e6, double(count.matmul_params) / 1e6, long(o.seq), tok_s,
                 tok_s * count.train_flops_per_token / 1e9, hours_per_t, 2 * hours_per_t);
  }
  const auto last = latest_checkpoint(f.out);
  std::fprintf(stderr, "done: %ld steps, %ld tokens in %s; checkpoint %s; metrics %s, plot %s/loss.svg\n",
               long(trainer.state().step), long(trainer.state().tokens),
               format_duration(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count()).c_str(),
               last ? last->c_str() : "(none)", csv_path.c_str(), f.out.c_str());
}

}  // namespace

void add_train(CLI::App& app) {
  auto f = std::make_shared<TrainFlags>();
  CLI::App* cmd = app.add_subcommand("train", "Train a DeepSeek-V3-architecture model from token shards");
  cmd->add_option("--config,-c", f->config, "model config.json")->required()->check(CLI::ExistingFile);
  cmd->add_option("--data,-d", f->data, "folder of token shards from dsv3 data (train-*.bin, val-*.bin)")->required();
  cmd->add_option("--out,-o", f->out, "run folder: checkpoints, metrics.csv, loss.svg")->required();
  cmd->add_option("--tokenizer", f->tokenizer, "tokenizer folder copied into checkpoints (default: the one in DATA/data.json)");
  TrainOptions& o = f->opt;
  cmd->add_option("--steps", o.steps, "optimizer steps")->capture_default_str();
  cmd->add_option("--batch", o.batch, "sequences per step (after the ramp)")->capture_default_str();
  cmd->add_option("--seq", o.seq, "tokens per sequence")->capture_default_str();
  cmd->add_option("--lr", o.schedule.lr, "peak learning rate (the paper: 2.2e-4)")->capture_default_str();
  cmd->add_option("--min-lr", o.schedule.min_lr, "learning rate after the cosine decay")->capture_default_str();
  cmd->add_option("--warmup", f->warmup_frac, "warmup, as a fraction of the steps")->capture_default_str();
  cmd->add_option("--decay-start", f->decay_start_frac, "start of the cosine decay, fraction of the steps")->capture_default_str();
  cmd->add_option("--batch-start", o.schedule.batch_start, "batch size at step 0 of the ramp (0: no ramp)");
  cmd->add_option("--batch-ramp", o.schedule.batch_ramp_steps, "steps of the batch-size ramp");
  cmd->add_option("--gamma", o.gamma, "bias update speed of aux-loss-free balancing")->capture_default_str();
  cmd->add_option("--alpha", o.alpha, "sequence-wise balance loss factor")->capture_default_str();
  cmd->add_option("--mtp-weight", o.mtp_weight, "MTP loss weight lambda (0: no MTP)")->capture_default_str();
  cmd->add_option("--clip", o.clip, "gradient norm clip (0: off)")->capture_default_str();
  cmd->add_option("--weight-decay", o.adamw.weight_decay, "AdamW weight decay")->capture_default_str();
  cmd->add_option("--init-std", o.init_std, "initialisation std")->capture_default_str();
  cmd->add_option("--eval-every", o.eval_every, "validation loss every N steps (0: never)")->capture_default_str();
  cmd->add_option("--eval-batches", o.eval_batches, "validation batches")->capture_default_str();
  cmd->add_option("--save-every", o.save_every, "checkpoint every N steps and at the end (0: no checkpoints)")
      ->capture_default_str();
  cmd->add_option("--keep", o.keep, "checkpoints kept (0: all)")->capture_default_str();
  cmd->add_option("--log-every", o.log_every, "log line every N steps when not on a terminal")->capture_default_str();
  cmd->add_option("--seed", o.seed, "seed of initialisation and data order")->capture_default_str();
  cmd->add_option("--dp", f->dp, "data-parallel processes: run under mpirun -np N (default: as many as mpirun started)");
  cmd->add_flag("--resume", f->resume, "continue from the newest checkpoint in --out");
  cmd->add_flag("--fp32-moments", f->fp32_moments, "AdamW moments in float32 (default BF16, as the paper)");
  cmd->add_option("--precision", f->precision,
                  "Linear GEMMs: fp32, bf16, fp8 (E4M3, 1x128 / 128x128 scales, promoted accumulation; emulated on "
                  "CPU), or fp8-tensor (fp8 with one scale per tensor for the GEMM inputs, for comparison)")
      ->check(CLI::IsMember({"fp32", "bf16", "fp8", "fp8-tensor"}))
      ->capture_default_str();
  cmd->add_option("--fp8-accumulator", f->fp8_accumulator,
                  "fp8 ablation: promoted (default: the tensor cores' 14-bit truncating accumulator, promoted to "
                  "FP32 every 128 of K), fp32 (exact FP32 accumulation) or unpromoted (14 bits over all of K)")
      ->check(CLI::IsMember({"promoted", "fp32", "unpromoted"}));
  cmd->add_option("--fp8-caches", f->fp8_caches,
                  "fp8 ablation: fp8 (default: attention output in E5M6, MoE SwiGLU inputs in E4M3 for the "
                  "backward) or full (kept in FP32)")
      ->check(CLI::IsMember({"fp8", "full"}));
  cmd->add_option("--threads,-t", f->threads, "CPU threads (default: all)");
  cmd->callback([f] { run(*f); });
}

}  // namespace dsv3::cli
