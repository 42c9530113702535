// Shared pieces of the training commands (see training_run.h).
#include "cli/training_run.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "cli/args.h"
#include "core/error.h"
#include "train/plot.h"

namespace dsv3::cli {

namespace fs = std::filesystem;

void add_training_flags(CLI::App* cmd, TrainingFlags& f, RunKind kind) {
  TrainOptions& o = f.opt;
  cmd->add_option("--out,-o", f.out, "run folder: checkpoints, metrics.csv, plots")->required();
  cmd->add_option("--steps", o.steps, "optimizer steps")->capture_default_str();
  if (kind == RunKind::grpo) {
    cmd->add_option("--prompts", o.batch, "prompts per step (each sampled --group times)")->capture_default_str();
  } else {
    cmd->add_option("--batch", o.batch, "sequences per step (after the ramp)")->capture_default_str();
    cmd->add_option("--seq", o.seq, kind == RunKind::sft ? "tokens per sequence (longer conversations are cut)" : "tokens per sequence")
        ->capture_default_str();
  }
  cmd->add_option("--lr", o.schedule.lr, "peak learning rate (the paper: 2.2e-4 pre-training)")->capture_default_str();
  cmd->add_option("--min-lr", o.schedule.min_lr, "learning rate after the cosine decay")->capture_default_str();
  cmd->add_option("--warmup", f.warmup_frac, "warmup, as a fraction of the steps")->capture_default_str();
  cmd->add_option("--decay-start", f.decay_start_frac, "start of the cosine decay, fraction of the steps")->capture_default_str();
  if (kind != RunKind::grpo) {
    cmd->add_option("--batch-start", o.schedule.batch_start, "batch size at step 0 of the ramp (0: no ramp)");
    cmd->add_option("--batch-ramp", o.schedule.batch_ramp_steps, "steps of the batch-size ramp");
    cmd->add_option("--alpha", o.alpha, "sequence-wise balance loss factor")->capture_default_str();
    cmd->add_option("--mtp-weight", o.mtp_weight, "MTP loss weight lambda (0: no MTP)")->capture_default_str();
    cmd->add_option("--clip", o.clip, "gradient norm clip (0: off)")->capture_default_str();
    cmd->add_option("--init-std", o.init_std, "initialisation std")->capture_default_str();
    cmd->add_option("--eval-batches", o.eval_batches, "validation batches")->capture_default_str();
  } else {
    cmd->add_option("--grad-clip", o.clip, "gradient norm clip (0: off)")->capture_default_str();
  }
  cmd->add_option("--gamma", o.gamma, "bias update speed of aux-loss-free balancing")->capture_default_str();
  cmd->add_option("--weight-decay", o.adamw.weight_decay, "AdamW weight decay")->capture_default_str();
  cmd->add_option("--eval-every", o.eval_every, kind == RunKind::grpo ? "held-out accuracy every N steps (0: never)"
                                                                      : "validation loss every N steps (0: never)")
      ->capture_default_str();
  cmd->add_option("--save-every", o.save_every, "checkpoint every N steps and at the end (0: no checkpoints)")->capture_default_str();
  cmd->add_option("--keep", o.keep, "checkpoints kept (0: all)")->capture_default_str();
  cmd->add_option("--log-every", o.log_every, "log line every N steps when not on a terminal")->capture_default_str();
  cmd->add_option("--seed", o.seed, "seed of initialisation, data order and sampling")->capture_default_str();
  cmd->add_flag("--resume", f.resume, "continue from the newest checkpoint in --out");
  cmd->add_flag("--fp32-moments", f.fp32_moments, "AdamW moments in float32 (default BF16, as the paper)");
  cmd->add_option("--precision", f.precision,
                  "Linear GEMMs: fp32, bf16, fp8 (E4M3, 1x128 / 128x128 scales, promoted accumulation; emulated on "
                  "CPU), or fp8-tensor (fp8 with one scale per tensor for the GEMM inputs, for comparison)")
      ->check(CLI::IsMember({"fp32", "bf16", "fp8", "fp8-tensor"}))
      ->capture_default_str();
  cmd->add_option("--fp8-accumulator", f.fp8_accumulator,
                  "fp8 ablation: promoted (default: the tensor cores' 14-bit truncating accumulator, promoted to "
                  "FP32 every 128 of K), fp32 (exact FP32 accumulation) or unpromoted (14 bits over all of K)")
      ->check(CLI::IsMember({"promoted", "fp32", "unpromoted"}));
  cmd->add_option("--fp8-caches", f.fp8_caches,
                  "fp8 ablation: fp8 (default: attention output in E5M6, MoE SwiGLU inputs in E4M3 for the "
                  "backward) or full (kept in FP32)")
      ->check(CLI::IsMember({"fp8", "full"}));
  cmd->add_option("--threads,-t", f.threads, "CPU threads (default: all)");
}

void apply_training_flags(TrainingFlags& f) {
  set_threads(f.threads);
  if ((!f.fp8_accumulator.empty() || !f.fp8_caches.empty()) && f.precision.rfind("fp8", 0) != 0)
    fail("--fp8-accumulator and --fp8-caches apply to --precision fp8 or fp8-tensor, not ", f.precision);
  TrainOptions& o = f.opt;
  o.adamw.bf16_moments = !f.fp32_moments;
  o.linear.precision = parse_gemm_precision(f.precision.c_str());
  // Ablations of the fp8 recipe: the accumulator, and the low-precision activation caches.
  if (f.fp8_accumulator == "fp32") o.linear.fp8 = kFp8Fp32Accumulate;
  if (f.fp8_accumulator == "unpromoted") o.linear.fp8 = kFp8NoPromotion;
  o.linear.low_precision_caches = f.fp8_caches != "full";
  o.schedule.warmup_steps = int64_t(double(o.steps) * f.warmup_frac);
  o.schedule.decay_start = int64_t(double(o.steps) * f.decay_start_frac);
  o.schedule.decay_end = o.steps;
}

void add_tokenizer_files(const std::string& folder, const std::string& source, CheckpointExtras& extras) {
  if (!fs::exists(folder + "/tokenizer.json")) fail(source, ": tokenizer folder ", folder, " has no tokenizer.json");
  for (const char* name : {"tokenizer.json", "tokenizer_config.json"})
    if (fs::exists(folder + "/" + name)) extras.files.push_back(folder + "/" + name);
}

std::string fine_tuning_config(const std::string& dir, const std::string& why) {
  if (!fs::exists(dir + "/config.json")) fail("--model: ", dir, " has no config.json (a Hugging Face checkpoint folder)");
  for (const char* name : {"tokenizer.json", "tokenizer_config.json"})
    if (!fs::exists(dir + "/" + name)) fail("--model: ", dir, " has no ", name, " (", why, ")");
  nlohmann::json config;
  try {
    config = nlohmann::json::parse(read_text(dir + "/config.json"));
  } catch (const nlohmann::json::exception& e) {
    fail(dir, "/config.json: not valid JSON: ", e.what());
  }
  if (config.is_object()) config.erase("quantization_config");
  return config.dump(2);
}

void lock_run_folder(const std::string& out) {
  fs::create_directories(out);
  // One trainer per run folder: a second one would interleave checkpoints and metrics. The
  // descriptor stays open (and locked) until the process ends.
  const int lock = ::open((out + "/.lock").c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0644);
  if (lock < 0) fail(out, "/.lock: cannot create: ", std::strerror(errno));
  if (::flock(lock, LOCK_EX | LOCK_NB) != 0) fail(out, " is in use by another dsv3 run (", out, "/.lock is held)");
}

void refuse_overwrite(const std::string& out, bool resumed) {
  if (!resumed && latest_checkpoint(out))
    fail(out, " already holds checkpoints; pass --resume to continue, or choose another --out");
}

MetricsCsv::MetricsCsv(const std::string& path, const std::string& header, bool resumed, int64_t resumed_step) : path_(path) {
  if (resumed && fs::exists(path)) {
    std::ifstream in(path);
    std::string head, line, text;
    std::getline(in, head);
    // A run started by an older dsv3 may lack columns added since at the end: its rows are
    // padded with empty cells under the new header. Any other difference is another run.
    if (head != header && header.rfind(head + ",", 0) != 0)
      fail(path, ": its columns (", head, ") are not this run's; move it aside to resume");
    const size_t missing = size_t(std::count(header.begin(), header.end(), ',') - std::count(head.begin(), head.end(), ','));
    text = header + "\n";
    while (std::getline(in, line)) {
      std::vector<std::string> cols;
      for (size_t a = 0, b; a <= line.size(); a = b + 1) {
        b = line.find(',', a);
        if (b == std::string::npos) b = line.size();
        cols.push_back(line.substr(a, b - a));
      }
      if (cols.empty() || cols[0].empty() || std::atoll(cols[0].c_str()) > resumed_step) continue;
      text += line + std::string(missing, ',') + "\n";
      cols.resize(cols.size() + missing);
      kept_.push_back(std::move(cols));
    }
    in.close();
    std::ofstream(path, std::ios::trunc) << text;
    out_.open(path, std::ios::app);
  } else {
    out_.open(path, std::ios::trunc);
    out_ << header << "\n" << std::flush;
  }
  if (!out_) fail(path, ": cannot write");
}

void MetricsCsv::write(const std::string& row) { out_ << row << "\n" << std::flush; }

ProgressLine::ProgressLine(int64_t first_step, int64_t steps, int64_t log_every, std::string unit)
    : first_(first_step), steps_(steps), log_every_(std::max<int64_t>(log_every, 1)), unit_(std::move(unit)), tty_(isatty(STDERR_FILENO)) {
  start_ = std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double ProgressLine::elapsed() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count() - start_;
}

void ProgressLine::show(int64_t step, const std::string& text, bool keep) {
  const double eta = elapsed() / double(std::max<int64_t>(step - first_, 1)) * double(steps_ - step);
  const int width = 24, filled = int(double(width) * double(step) / double(std::max<int64_t>(steps_, 1)));
  const std::string bar = std::string(size_t(filled), '#') + std::string(size_t(width - filled), '.');
  char line[768];
  std::snprintf(line, sizeof(line), "%s %ld/%ld [%s] %s | ETA %s", unit_.c_str(), long(step), long(steps_), bar.c_str(),
                text.c_str(), format_duration(eta).c_str());
  keep = keep || step == steps_;
  if (tty_) std::fprintf(stderr, "\r%s\033[K%s", line, keep ? "\n" : "");
  else if (step % log_every_ == 0 || keep) std::fprintf(stderr, "%s\n", line);
}

}  // namespace dsv3::cli

namespace dsv3::cli {

RunTotals run_reported(Trainer& trainer, const TrainingFlags& f) {
  const ModelConfig& c = trainer.config();
  const TrainOptions& o = f.opt;
  const bool resumed = trainer.state().step > 0;
  std::string header = "step,tokens,batch,loss,mtp_loss,val_loss,lr,grad_norm,tokens_per_s,max_vio";
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)  // max_vio is the largest of these
    if (c.is_moe_layer(l)) header += cat(",max_vio_", l);
  header += ",a2a_mb";  // expert parallelism: MB this process sent to other processes' experts
  header += ",bubble,bubble_sim";  // pipeline parallelism: the step's idle fraction, measured and simulated
  header += ",p2p_mb";             // pipeline parallelism: MB of activations and gradients sent to the neighbouring stages
  header += ",node_mb";            // expert parallelism over nodes: MB of tokens' rows sent to other nodes, once per node
  MetricsCsv csv(f.out + "/metrics.csv", header, resumed, trainer.state().step);
  Curve train_curve{"train loss", "#1f77b4", {}, {}}, val_curve{"validation loss", "#d62728", {}, {}};
  double smooth = -1;
  for (const auto& cols : csv.kept()) {  // the curves of the steps before the resume
    if (cols.size() < 6) continue;
    const double step = std::atof(cols[0].c_str()), loss = std::atof(cols[3].c_str());
    smooth = smooth < 0 ? loss : 0.9 * smooth + 0.1 * loss;
    train_curve.points.push_back({step, smooth});
    if (!cols[5].empty()) val_curve.points.push_back({step, std::atof(cols[5].c_str())});
  }
  ProgressLine progress(trainer.state().step, o.steps, o.log_every);
  const int64_t first_step = trainer.state().step;
  RunTotals totals;
  trainer.run([&](const StepMetrics& m) {
    if (m.step == first_step + 1)
      std::fprintf(stderr, "activations held for the backward pass: %.1f MiB (%s)\n",
                   double(m.activation_bytes) / (1 << 20),
                   o.linear.attention_output_format() == SavedFormat::full
                       ? "norms and MLA up-projections recomputed"
                       : "norms and MLA up-projections recomputed; attention output in E5M6, MoE SwiGLU inputs in FP8");
    totals.step_seconds += double(m.batch * o.seq) / m.tokens_per_s;
    totals.step_tokens += m.batch * o.seq;
    smooth = smooth < 0 ? m.loss : 0.9 * smooth + 0.1 * m.loss;
    char line[512];
    std::snprintf(line, sizeof(line), "%ld,%ld,%ld,%.6f,%.6f,%s,%.6g,%.6f,%.1f,%.4f", long(m.step), long(m.tokens),
                  long(m.batch), m.loss, m.mtp_loss, m.val_loss >= 0 ? cat(m.val_loss).c_str() : "", m.lr, m.grad_norm,
                  m.tokens_per_s, m.max_vio);
    std::string row = line;
    for (double v : m.max_vio_layers) row += cat(",", v);
    row += cat(",", double(m.a2a_bytes) / 1e6);
    row += m.bubble >= 0 ? cat(",", m.bubble, ",", m.bubble_sim) : std::string(",,");
    row += cat(",", double(m.p2p_bytes) / 1e6, ",", double(m.node_bytes) / 1e6);
    csv.write(row);
    if (m.bubble >= 0 && m.step > first_step + 1) {  // the first step allocates: not counted
      totals.bubble += m.bubble, totals.bubble_sim += m.bubble_sim;
      ++totals.bubble_steps;
    }
    train_curve.points.push_back({double(m.step), smooth});
    if (m.val_loss >= 0) val_curve.points.push_back({double(m.step), m.val_loss});
    std::snprintf(line, sizeof(line), "loss %.4f%s | mtp %.3f | lr %.2e | gnorm %.2f | %.0f tok/s | maxvio %.2f", smooth,
                  m.val_loss >= 0 ? cat(" val ", std::to_string(m.val_loss).substr(0, 6)).c_str() : "", m.mtp_loss, m.lr,
                  m.grad_norm, m.tokens_per_s, m.max_vio);
    std::string text = line;
    if (m.a2a_bytes > 0) text += cat(" | all-to-all ", std::to_string(double(m.a2a_bytes) / 1e6).substr(0, 5), " MB");
    if (m.node_bytes > 0) text += cat(" (", std::to_string(double(m.node_bytes) / 1e6).substr(0, 5), " MB to other nodes)");
    if (m.bubble >= 0)
      text += cat(" | bubble ", int(std::lround(100 * m.bubble)), "% (simulated ", int(std::lround(100 * m.bubble_sim)), "%), sent ",
                  std::to_string(double(m.p2p_bytes) / 1e6).substr(0, 5), " MB");
    progress.show(m.step, text, m.val_loss >= 0);
    if (m.val_loss >= 0 || m.step == o.steps)
      write_svg_plot(f.out + "/loss.svg", "dsv3 training loss", {train_curve, val_curve});
  });
  totals.wall_seconds = progress.elapsed();
  return totals;
}

void report_done(const Trainer& trainer, const TrainingFlags& f, const RunTotals& totals) {
  if (totals.bubble_steps > 0)
    std::fprintf(stderr,
                 "pipeline bubble: %.1f%% of the ranks' time idle, measured (mean of %ld steps after the first); %.1f%% "
                 "simulated by dsv3 schedule's timeline with the measured chunk times\n",
                 100 * totals.bubble / double(totals.bubble_steps), long(totals.bubble_steps),
                 100 * totals.bubble_sim / double(totals.bubble_steps));
  const auto last = latest_checkpoint(f.out);
  std::fprintf(stderr, "done: %ld steps, %ld tokens in %s; checkpoint %s; metrics %s/metrics.csv, plot %s/loss.svg\n",
               long(trainer.state().step), long(trainer.state().tokens), format_duration(totals.wall_seconds).c_str(),
               last ? last->c_str() : "(none)", f.out.c_str(), f.out.c_str());
}

}  // namespace dsv3::cli
