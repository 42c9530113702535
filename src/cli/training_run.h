// What dsv3 train, sft and grpo share: their optimisation flags, the run folder (one trainer
// at a time; no fresh run over old checkpoints), metrics.csv kept consistent across resumes,
// and the progress line with its ETA.
#pragma once
#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include "train/trainer.h"

namespace CLI {
class App;
}

namespace dsv3::cli {

struct TrainingFlags {
  std::string out, precision = "fp32";
  std::string fp8_accumulator, fp8_caches;  // empty: the paper's (promoted, fp8)
  TrainOptions opt;
  double warmup_frac = 0.05, decay_start_frac = 0.6;
  bool resume = false, fp32_moments = false;
  int threads = 0;
};

// Which command registers the flags: GRPO has no --seq (its lengths come from the prompts
// and --max-new-tokens) nor MTP and balance losses, and names the gradient clip --grad-clip
// (its --clip is the policy ratio's).
enum class RunKind { pretrain, sft, grpo };
void add_training_flags(CLI::App* cmd, TrainingFlags& f, RunKind kind);
// The flags turned into f.opt (precision, the schedule's steps); Error for contradictions.
void apply_training_flags(TrainingFlags& f);
// tokenizer.json (required) and tokenizer_config.json of `folder` copied into every checkpoint.
void add_tokenizer_files(const std::string& folder, const std::string& source, CheckpointExtras& extras);

// The config.json of a checkpoint to fine-tune (SFT, GRPO), as the run writes it: without a
// quantization_config, since the fine-tuned weights are float32. Error if the folder lacks
// config.json, tokenizer.json or tokenizer_config.json (`why` says what needs them).
std::string fine_tuning_config(const std::string& model_dir, const std::string& why);

// Creates the run folder and holds its lock for the life of the process: Error if another
// trainer holds it.
void lock_run_folder(const std::string& out);
// Error if the run starts fresh over a folder that already holds checkpoints.
void refuse_overwrite(const std::string& out, bool resumed);

// RUN/metrics.csv: a fresh run writes the header; a resumed one keeps the rows up to the
// checkpoint's step (later ones were lost with the crash and run again) and returns them.
class MetricsCsv {
 public:
  MetricsCsv(const std::string& path, const std::string& header, bool resumed, int64_t resumed_step);
  const std::vector<std::vector<std::string>>& kept() const { return kept_; }  // columns of each kept row
  void write(const std::string& row);  // one line, flushed
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::vector<std::vector<std::string>> kept_;
  std::ofstream out_;
};

// Runs the trainer to opt.steps: metrics.csv (step, tokens, batch, loss, mtp_loss, val_loss,
// lr, grad_norm, tokens_per_s, max_vio and each MoE layer's), loss.svg and the progress line.
struct RunTotals {
  double step_seconds = 0, wall_seconds = 0;  // in optimizer steps alone (no evaluation, no saving); in all
  int64_t step_tokens = 0;
  double bubble = 0, bubble_sim = 0;  // pipeline: summed over bubble_steps steps
  int64_t bubble_steps = 0;
};
RunTotals run_reported(Trainer& trainer, const TrainingFlags& f);
// "done: N steps, T tokens in H:MM:SS; checkpoint ...; metrics ..., plot ..."
void report_done(const Trainer& trainer, const TrainingFlags& f, const RunTotals& totals);

// "step 12/300 [####....] TEXT | ETA 01:23" on stderr: rewritten in place on a terminal,
// else one line every log_every steps, and whenever `keep` asks (unit: "step", or "items").
class ProgressLine {
 public:
  ProgressLine(int64_t first_step, int64_t steps, int64_t log_every, std::string unit = "step");
  void show(int64_t step, const std::string& text, bool keep);
  double elapsed() const;

 private:
  int64_t first_, steps_, log_every_;
  std::string unit_;
  bool tty_;
  double start_;
};

}  // namespace dsv3::cli
