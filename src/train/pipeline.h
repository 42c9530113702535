// One training step's micro-batches through the pipeline stages (§3.2.1; the multi-process
// issue, item 5). The main model's layers are split into stages, P or 2P for P ranks (the
// first embeds the tokens; the last runs the final norm, the output head and the MTP modules,
// which share the embedding and the head with the main model). Each pipeline rank runs the
// op list dist::Schedule gives it (1F1B: stage r; DualPipe: stages r and P-1-r, half of the
// micro-batches entering at each end; DualPipeV: stages r and 2P-1-r of 2P, every micro-batch
// down the ranks and back), receiving a stage's input from the previous stage's rank (every
// receive posted at the step's start) and sending its output on; the backward sends the
// input's gradient back. With one
// process (no pipeline group) the same code runs every stage, the micro-batches one after
// another: gradient accumulation.
//
// The schedule changes no arithmetic. Every parameter's gradient is summed in micro-batch
// order within each half of the micro-batches (the first ceil(M/2), then the rest: DualPipe's
// two directions, whose copies of a stage live on two ranks), then the halves are added:
//   g = (G_0 + E_0) + (G_1 + E_1)
// where E_h is the MTP modules' gradient of the shared embedding (on the last stage, while
// the first stage holds the main model's part of G_h). Each element of a half has one rank
// that computes it (the others hold zeros), so the sum over the pipeline ranks is exact, and
// a pipeline step equals the one-process step on the same micro-batches bit for bit.
// W (DualPipe's weight-gradient chunk) is folded into its B: the model's backward computes
// both at once; FB runs its forward, then its backward (no second thread overlaps them).
// Uses model, dist and backend.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "dist/communicator.h"
#include "dist/schedule.h"
#include "model/training.h"

namespace dsv3 {

struct MicroBatch {
  const int32_t *tokens, *targets;  // [B*S]
  const int64_t* lengths;           // [B]
  int64_t B, S;
};

// The step's results, the same on every pipeline rank.
struct PipelineResult {
  double loss = 0, mtp_loss = 0;             // means over the micro-batches, as one process has them
  double total = 0;                          // the whole objective (its balance terms summed per stage)
  int64_t activation_bytes = 0;              // the most held at once by this rank
  int64_t p2p_bytes = 0;                     // activations and their gradients this rank sent to its neighbours
  std::vector<std::vector<int64_t>> loads;   // summed over micro-batches and stages
};

// The last step's measured time on each pipeline rank, and what the schedule's simulation
// gives for the same chunk costs (dist::simulate with each rank's measured mean F and B, W
// folded into B, FB = F + B).
struct PipelineTiming {
  std::vector<double> busy, window;  // per rank: seconds computing, seconds from the step's start to its end
  std::vector<double> f, b;          // per rank: mean seconds of a forward / backward chunk
  double measured_bubble = 0;        // idle fraction: sum of (makespan - busy) / (P x makespan)
  double simulated_bubble = 0;       // the same fraction in the simulated timeline
};

class Pipeline {
 public:
  // pp: the pipeline group (null or one rank: every stage here). schedule: 1f1b, dualpipe or
  // dualpipev. Error naming the violation: more stages than layers, the schedule's conditions.
  Pipeline(const ModelConfig& c, const TrainingLoss& loss, dist::Communicator* pp, const std::string& schedule,
           int micro_batches);
  ~Pipeline();
  void set_expert_exchange(ExpertExchange* ex);

  // One step: every micro-batch's forward and backward through the stages held here, the
  // gradients summed as above into grads (zeroed by the caller; allocated like w) and divided
  // by the number of micro-batches, the losses and loads gathered over the pipeline ranks.
  const PipelineResult& run(const ModelWeights& w, std::span<const MicroBatch> micro, ModelWeights& grads);
  // Measured and simulated bubbles of the last run (pipeline ranks > 1).
  const PipelineTiming& timing();

  int micro_batches() const { return M_; }
  int ranks() const { return P_; }
  const dist::Schedule& schedule() const { return schedule_; }
  // The blocks of stage s of P: L/P each, the first L mod P stages one more.
  static StageLayers stage_layers(const ModelConfig& c, int P, int s);

 private:
  struct Slot;
  struct Stage;
  Slot& acquire(Stage& st);
  void post_receives(std::span<const MicroBatch> micro);
  void forward(const ModelWeights& w, int dir, int micro, std::span<const MicroBatch> batches);
  void backward(const ModelWeights& w, int dir, int micro, ModelWeights& grads);
  void hand_over(int kind, int dir, int micro, int to_stage, const std::vector<float>& data, Slot& slot);
  // The micro-batch of an op: DualPipe's directions hold halves of them; DualPipeV's phases
  // are one stream.
  int global_micro(int dir, int micro) const { return schedule_.v_shape ? micro : dir * (M_ / 2) + micro; }
  int half_of(int j) const { return j < (M_ + 1) / 2 ? 0 : 1; }
  int stage_of(int dir) const { return schedule_.stage_of(rank_, dir); }
  // Where a stage runs for a direction's micro-batches, and in which direction (phase).
  int dir_of(int stage, int dir) const { return schedule_.v_shape ? (stage < P_ ? 0 : 1) : dir; }
  int rank_of(int stage, int dir) const {
    if (schedule_.v_shape) return stage < P_ ? stage : 2 * P_ - 1 - stage;
    return dir == 0 ? stage : P_ - 1 - stage;
  }
  int key(int dir, int j) const { return dir * M_ + j; }  // a micro-batch's work in one direction
  int tag(int kind, int dir, int micro) const { return (kind * 2 + dir) * M_ + micro; }

  const ModelConfig& c_;
  TrainingLoss loss_;
  dist::Communicator* pp_;
  int P_ = 1, rank_ = 0, M_ = 1;
  dist::Schedule schedule_;
  std::vector<std::unique_ptr<Stage>> stages_;  // the stages this rank holds (by stage index; null if not)
  std::vector<Slot*> inflight_;                 // per key(): its pass between F and B
  // Per key(): the stage input [0] and output gradient [1] it receives, and their receives,
  // posted at the step's start (none where the neighbouring stage is on this rank).
  std::vector<std::vector<float>> inbox_[2];
  std::vector<std::unique_ptr<dist::Handle>> received_[2];
  std::vector<uint8_t> expected_[2];  // per key(): a receive posted, or handed over on this rank, this step
  ExpertExchange* experts_ = nullptr;
  ModelWeights second_;                         // G_1 (two or more micro-batches)
  std::vector<float> mtp_embed_[2];             // E_0, E_1 (the MTP loss on)
  std::vector<double> per_micro_;               // total, loss, mtp of each micro-batch, then loads
  PipelineResult result_;
  PipelineTiming timing_;
  struct RankTimes {  // one rank's step, in seconds; reduced over the ranks as plain doubles
    double busy = 0, window = 0, f = 0, f_count = 0, b = 0, b_count = 0;
  };
  std::vector<RankTimes> times_;                // per pipeline rank (this one's measured, the others' received)
  int64_t held_ = 0;                            // activation bytes of the passes between forward and backward
};

}  // namespace dsv3
