// GRPO on a checkpoint (the post-training issue, item 2; DeepSeekMath §4.1, DeepSeek-V3
// §5.2.2). Each optimizer step draws `prompts` tasks, samples `group` answers to each from
// the current policy (the batch engine over the trainer's own float32 weights, the prompt
// read once per group), scores every answer with a rule-based verifier (rewards.h), and
// descends grpo_loss (grpo.h) through the training pass: one forward over the prompts and
// answers gives the policy's log-probability of every sampled token, and the gradient of
// the loss with respect to those log-probabilities becomes per-token weights of the output
// head's gradient (TrainingPass::weigh_tokens). The reference is the starting checkpoint,
// frozen; the sampling policy's log-probabilities are the engine's, stored as each token is
// drawn (at temperature 1 they are the policy's own). With updates > 1 (DeepSeekMath's mu)
// the same samples serve that many steps, and the clipped ratio keeps each step near the
// policy that sampled them (dsv3 grpo keeps checkpoints between such batches). Samples are
// seeded by the run's seed and their batch's number, so a resumed run continues exactly. The trainer supplies the rest: clipping, AdamW, the bias
// update, checkpoints and resume. Uses train, infer (batch engine), eval (rewards) and
// tokenizer (chat template).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "infer/batch.h"
#include "model/transformer.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/tokenizer_config.h"
#include "train/grpo.h"
#include "train/trainer.h"

namespace dsv3 {

struct GrpoTask {
  std::string prompt, answer;  // the user's message; the verifier's reference
};
// {"prompt": "...", "answer": "..."} per line (dsv3 eval's generation format; blank lines
// skipped); Error naming the line that is not one.
std::vector<GrpoTask> read_grpo_tasks(const std::string& path);

// The tasks in an epoch order from the seed: the trainer's data, saved in checkpoints.
class GrpoTasks : public TrainingData {
 public:
  GrpoTasks(std::vector<GrpoTask> tasks, uint64_t seed) : tasks_(std::move(tasks)), order_(int64_t(tasks_.size()), seed) {}
  int64_t next() { return order_.next(); }  // the next task's index in all()
  const std::vector<GrpoTask>& all() const { return tasks_; }
  DataPosition position() const override { return order_.position(); }
  void seek(DataPosition p) override { order_.seek(p); }
  int64_t size() const override { return order_.size(); }

 private:
  std::vector<GrpoTask> tasks_;
  EpochOrder order_;
};

struct GrpoOptions {
  int64_t prompts = 8;          // tasks per step
  int64_t group = 8;            // G: answers sampled per task
  int64_t max_new_tokens = 64;  // per answer
  float temperature = 1.0f;     // sampling; 1 samples the policy itself
  std::string reward = "exact";
  int64_t updates = 1;          // optimizer steps per batch of samples (mu)
  GrpoConfig loss;
  uint64_t seed = 0;
};

// Error naming the first option out of range (the group, lengths, clip, KL, reward name).
void check_grpo_options(const GrpoOptions& opt);

struct GrpoStepStats {  // of the samples the last step trained on
  int64_t samples = 0;
  double reward = 0;          // mean
  double informative = 0;     // fraction of groups whose rewards differ (the others give no gradient)
  double kl = 0;              // mean over groups of grpo_loss's KL
  double clipped = 0;         // mean over groups of the clipped fraction
  double length = 0;          // mean answer length in tokens
  double sample_seconds = 0;  // spent sampling (0 on a step that reuses samples)
  double max_logp_gap = 0;    // largest |engine - training pass| log-probability on a fresh batch (should be ~1e-5)
};

class GrpoTrainer {
 public:
  // trainer: made with GrpoTasks as its data, mtp_weight = alpha = 0, and started from the
  // checkpoint whose weights `reference` holds (float32, allocate_weights(..., tied)).
  GrpoTrainer(Trainer& trainer, GrpoTasks& tasks, const Tokenizer& tok, const TokenizerConfig& chat,
              const ModelWeights& reference, const GrpoOptions& opt);
  // The trainer's objective for one step (Trainer::run / step_with).
  double objective(StepMetrics& m);
  const GrpoStepStats& stats() const { return stats_; }
  // The policy as a model for generation (held-out evaluation between steps).
  Transformer& policy() { return policy_; }

 private:
  struct Sample {
    int64_t prompt_len = 0;
    std::vector<int32_t> tokens;     // prompt, then the answer
    std::vector<double> old_logp;    // per answer token, at sampling time
    double reward = 0;
  };
  void sample_groups(int64_t batch);
  Trainer& trainer_;
  GrpoTasks& tasks_;
  const Tokenizer& tok_;
  const TokenizerConfig& chat_;
  const ModelWeights& reference_;
  GrpoOptions opt_;
  Transformer policy_;
  std::unique_ptr<BatchEngine> engine_;
  TrainingPass<float> ref_pass_;
  std::vector<std::vector<int32_t>> prompts_;  // every task's prompt as the model reads it
  std::vector<Sample> samples_;  // prompts x group, group by group
  GrpoStepStats stats_;
  std::vector<int32_t> inputs_, targets_;
  std::vector<int64_t> lengths_;  // each sequence's real positions (the rest pads it to the longest)
  std::vector<double> weights_;
};

}  // namespace dsv3
