// The training loop of DeepSeek-V3 models (§4.2 recipe, scaled by flags): batches from
// token shards, forward/backward, gradient clipping, AdamW, the auxiliary-loss-free bias
// update, validation loss, metrics (CSV and an SVG plot) and checkpoints with exact resume.
// Uses model, data and the train/ parts.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "dist/communicator.h"
#include "model/training.h"
#include "train/adamw.h"
#include "train/batch_sampler.h"
#include "train/expert_parallel.h"
#include "train/checkpoint.h"
#include "train/pipeline.h"
#include "train/schedule.h"

namespace dsv3 {

struct TrainOptions {
  int64_t steps = 1000;
  int64_t batch = 8, seq = 128;  // sequences per step (after the ramp), tokens per sequence
  int micro_batches = 1;         // each process's share of a batch runs as this many micro-batches
  Schedule schedule;             // lr / batch schedules (batch overrides schedule.batch)
  AdamWConfig adamw;
  double clip = 1.0;        // global gradient-norm clip (the paper: 1.0)
  double gamma = 0.001;     // bias update speed of aux-loss-free balancing (the paper: 0.001)
  double alpha = 0.0001;    // sequence-wise balance loss factor (the paper: 0.0001)
  double mtp_weight = 0.3;  // lambda, the MTP loss weight (the paper: 0.3, then 0.1)
  LinearGemm linear;        // precision of the Linear layers' GEMMs: fp32, bf16, fp8, fp8-tensor (§3.3)
  double init_std = 0.006;  // the paper's initialisation
  int64_t eval_every = 100, eval_batches = 8, save_every = 200, log_every = 10;
  int keep = 3;             // checkpoints kept
  uint64_t seed = 1234;
  CheckpointExtras extras;  // files copied into every checkpoint (tokenizer)
};

struct StepMetrics {
  int64_t step = 0, tokens = 0, batch = 0;
  double loss = 0, mtp_loss = 0, lr = 0, grad_norm = 0, tokens_per_s = 0, max_vio = 0;  // loss: next-token CE
  double val_loss = -1;  // when evaluated at this step
  std::vector<double> max_vio_layers;  // MaxVio of each MoE layer of the main model, in order
  int64_t activation_bytes = 0;        // held for the backward pass (TrainingPass::activation_bytes)
  int64_t a2a_bytes = 0;               // expert parallelism: this process's rows sent to other processes' experts, and their replies
  double bubble = -1, bubble_sim = -1; // pipeline parallelism: idle fraction of the step's schedule, measured and simulated
  int64_t p2p_bytes = 0;               // pipeline parallelism: activations and gradients this process sent to its neighbours
  int64_t node_bytes = 0;              // expert parallelism over nodes: tokens' rows sent to other nodes, once per token and node
};

class Trainer {
 public:
  // config_json: the text of config.json (written into every checkpoint). train: what
  // step() reads (size() and position are saved in checkpoints); val: the validation
  // sequences (null: none), read in order from their start at every evaluation.
  Trainer(const std::string& config_json, const TrainOptions& opt, std::unique_ptr<TrainingData> train,
          std::unique_ptr<TrainingData> val, const std::string& run_dir);
  // Pre-training: windows of token streams (BatchSampler; validation in seed 0's order).
  Trainer(const std::string& config_json, const TrainOptions& opt, std::vector<std::span<const uint32_t>> train,
          std::vector<std::span<const uint32_t>> val, const std::string& run_dir);

  // Starts from a Hugging Face checkpoint's weights instead of random ones (fine-tuning):
  // BF16 and block-FP8 tensors converted to float32. Its config must be this run's.
  void init_from(const std::string& checkpoint_dir);

  // ZeRO-1 data parallelism (the multi-process issue): every rank of dp reads the same global
  // batch and runs its 1/dp share of the sequences; the gradients are reduce-scattered and
  // averaged, each rank clipping (by the global norm) and updating its shard of the flat
  // weights with its shard of the AdamW moments, and the shards are all-gathered; so each
  // rank takes the step a single process takes on the whole batch (up to the order of float
  // sums). Expert loads for the balancing are summed over ranks; checkpoints gather the
  // moments and rank 0 writes them. null: one process.
  void set_data_parallel(dist::Communicator* dp);
  // Expert parallelism (§3.2.2) inside the data-parallel group: the routed experts of every
  // MoE layer split over the processes of `ep` (a sub-group of dp), tokens sent to their
  // experts' processes by all-to-all and back (train/expert_parallel.h). Every process still
  // holds all the weights (ZeRO-1 gathers them); an expert's gradient is computed on its own
  // process from every process's tokens, and the data-parallel reduction sums it with the
  // others' zeros. Error if ep's size does not divide the routed experts. null: off.
  // nodes: ep's ranks in that many nodes (node-limited routing), for the inter-node volume.
  void set_expert_parallel(dist::Communicator* ep, int64_t nodes = 1);
  // Pipeline parallelism (§3.2.1; train/pipeline.h): the layers split into pp's size stages,
  // this process running the stages its rank holds under `schedule` (1f1b, dualpipe) over
  // opt.micro_batches micro-batches; every rank still holds (and updates) all the weights,
  // the gradients summed over the pipeline ranks exactly. Checkpoints are written by
  // pipeline rank 0. null: every stage here.
  void set_pipeline(dist::Communicator* pp, const std::string& schedule);
  const Pipeline& pipeline() const { return *pipe_; }
  // Continues from the newest checkpoint of run_dir; false if there is none.
  bool resume();
  // What a step descends: it runs pass()'s forward and backward passes, the gradients going
  // into grads() (zeroed before), and returns the loss, setting m.loss, m.mtp_loss,
  // m.activation_bytes, m.batch (sequences) and m.tokens (this step's tokens).
  using Objective = std::function<double(StepMetrics& m)>;
  // Runs until opt.steps; on_step sees every step's metrics. objective: null for step()'s.
  void run(const std::function<void(const StepMetrics&)>& on_step, const Objective& objective = nullptr);
  // One optimizer step on the next batch's loss (this rank's share of it); its metrics stay
  // valid until the next step. After the first steps of a batch shape a step allocates nothing.
  const StepMetrics& step();
  // One optimizer step on another objective's gradients (GRPO's; one process only): the
  // clip, AdamW, the bias update from pass()'s last expert loads, and the state.
  const StepMetrics& step_with(const Objective& objective);
  TrainingPass<float>& pass() { return pass_; }
  ModelWeights& grads() { return grads_; }
  double validation_loss();
  std::string save();  // checkpoint now

  const ModelConfig& config() const { return c_; }
  const TrainerState& state() const { return state_; }
  const ModelWeights& params() const { return params_; }

 private:
  std::string config_json_;
  ModelConfig c_;
  TrainOptions opt_;
  std::string run_dir_;
  ModelWeights params_, grads_;  // flat, the MTP embedding and head tied to the main model's
  AdamW adamw_;                  // its moments, laid out as params_
  std::vector<FloatSpan> grad_spans_;  // grads_'s trainable tensors, listed once for the clip
  TrainingPass<float> pass_;    // step_with's objectives (GRPO)
  std::unique_ptr<Pipeline> pipe_;  // step()'s micro-batches through the stages
  std::vector<MicroBatch> micro_;
  bool writer_ = true;              // writes checkpoints (pipeline rank 0)
  const std::vector<std::vector<int64_t>>* step_loads_ = nullptr;  // the objective's expert loads, if not pass_'s
  void check_batches(int64_t ranks) const;
  std::unique_ptr<TrainingData> train_, val_;
  TrainerState state_;
  StepMetrics metrics_;  // the last step's (its vector keeps its memory)
  std::vector<int32_t> inputs_, targets_;
  std::vector<int64_t> lengths_;  // each sequence's real positions (SFT pads)
  dist::Communicator* dp_ = nullptr;
  std::unique_ptr<CommExpertExchange> ep_;
  std::vector<double> reduced_;  // loads and losses summed over the data-parallel ranks
  std::vector<std::vector<int64_t>> loads_;  // the whole batch's expert loads
  // ZeRO-1: this rank's flat elements [lo_, hi_), every rank's count, the gradients padded
  // to ranks x shard for the reduce-scatter, this rank's shard, its trainable spans.
  void zero_shard();
  double clip_sharded();  // the global norm's clip, each rank scaling its shard
  int64_t lo_ = 0, hi_ = 0;
  std::vector<int64_t> counts_;
  std::vector<float> padded_, own_;
  std::vector<FloatSpan> shard_spans_;
};

// A Hugging Face checkpoint's weights converted to float32 into dst (allocate_weights(c, f32,
// ...)): BF16 and block-FP8 tensors dequantized, read with the checkpoint's own config.json;
// Error naming the tensor that does not fit c.
void load_float_weights(const std::string& dir, const ModelConfig& c, ModelWeights& dst);

// Random initial weights: matrices N(0, std^2), norm weights 1, router biases 0; the MTP
// modules share the embedding and the output head with the main model.
void init_weights(const ModelConfig& c, ModelWeights& w, double std, uint64_t seed);

}  // namespace dsv3
