// One training pass over B sequences of S tokens: the forward saves the activations, the
// backward turns the loss into gradients of every parameter, block by block in mirror
// order of the forward (llm.c style). The loss is DeepSeek-V3's (§2.2, §2.1.2):
//   mean next-token cross-entropy
//   + mtp_weight / D * sum over the D MTP depths of their cross-entropy (predicting the
//     token k+1 ahead at depth k)
//   + the complementary sequence-wise balance loss of every MoE layer (alpha), the MTP
//     modules' included.
// With mtp_weight = alpha = 0 it is the plain next-token loss (dsv3 grads).
// The MTP module at depth k takes hnorm(h^{k-1}), where h^0 is the main model's residual
// stream after its last block and BEFORE its final norm (the module normalises it with its
// own hnorm, and the paper's output head, norm included, sits after that representation),
// and enorm of the embedding of token i+k, concatenated as [enorm(emb); hnorm(h)] as in
// the released weights, projected by eh_proj, then one transformer block, shared_head.norm
// and the output head shared with the main model.
// The blocks, the MTP modules, the embedding and the head are the model's own modules
// (block.h, mtp.h, head.h), the ones inference runs: training calls them with a record.
// A pass may run one pipeline stage only (§3.2.1): the blocks [begin, end) of the main
// model, the first stage embedding the tokens, the last running the final norm, the head
// and the MTP modules (which share the embedding and head with the main model, as the
// report places them); the stage's input and output are the residual stream between blocks.
// T is float (training) or double (gradient checks).
#pragma once
#include <cstdint>
#include <vector>

#include "core/arena.h"
#include "model/block.h"
#include "model/mtp.h"

namespace dsv3 {

template <typename T>
struct MtpActivations {  // one depth
  std::vector<int32_t> next_tokens;  // [N] t_{i+k}; a placeholder (t_i) where i+k is outside the window
  std::vector<int32_t> targets;      // [N] t_{i+k+1}, -1 where it is outside the window
  MtpRecord<T> record;
  std::vector<T> h_out;              // h^k (shared_head.norm's input)
  std::vector<T> logits, dlogits;
  int64_t bytes() const;
};

struct TrainingLoss {
  double mtp_weight = 0;  // lambda (the paper: 0.3, then 0.1)
  double alpha = 0;       // sequence-wise balance factor (the paper: 0.0001)
  LinearGemm linear;      // precision of the Linear layers' GEMMs (§3.3); fp32 by default
};

// The main model's blocks a pass runs: [begin, end), end -1 for through the last.
struct StageLayers {
  int64_t begin = 0, end = -1;
};

template <typename T>
class TrainingPass {
 public:
  // Error if the stage's layers are not within the model's (or empty).
  explicit TrainingPass(const ModelConfig& c, const TrainingLoss& loss = {}, StageLayers stage = {});

  // The total loss (see above). tokens, targets: [B*S]; target -1 = ignored. lengths [B]
  // (optional): each sequence's real positions; the padding after them (SFT and GRPO
  // batches) counts neither in the balance loss nor in the expert loads.
  // A stage after the first reads its input, the previous stage's output [B*S, hidden], from
  // stage_input; a stage before the last returns its blocks' balance loss only, its output
  // in stage_output(). Every stage takes the tokens (positions, padding, MTP targets).
  double forward(const ModelWeights& w, const int32_t* tokens, const int32_t* targets, int64_t B, int64_t S,
                 const int64_t* lengths = nullptr, const T* stage_input = nullptr);
  // Gradients of the last forward's loss, accumulated into g. A stage before the last starts
  // from output_grad, the gradient of its output [B*S, hidden]; a stage after the first
  // leaves that of its input in input_grad(). mtp_embedding_grad (optional, vocab x hidden):
  // where the MTP modules' gradient of the shared embedding accumulates instead of g's.
  void backward(const ModelWeights& w, ModelWeights& g, const T* output_grad = nullptr,
                const Mat* mtp_embedding_grad = nullptr);
  bool first_stage() const { return begin_ == 0; }
  bool last_stage() const { return end_ == c_.num_hidden_layers; }
  const std::vector<T>& stage_output() const { return h_; }
  const std::vector<T>& input_grad() const { return dh_; }

  // Expert parallelism (float): every MoE layer's routed experts exchanged through ex, which
  // the caller keeps alive (null: every expert here). The gradients of the routed experts not
  // here stay untouched; those of the experts here gather every process's tokens.
  void set_expert_exchange(ExpertExchange* ex) { experts_ = ex; }

  const TrainingLoss& loss() const { return loss_; }
  double main_loss() const { return main_loss_; }
  double mtp_loss() const { return mtp_loss_; }          // mean over depths, unweighted
  double balance_loss() const { return balance_loss_; }  // summed over layers, with alpha
  const std::vector<T>& logits() const { return logits_; }  // [B*S, vocab]
  // Per-token objectives (GRPO): the log-probability the last forward's main model gives
  // each position's target [B*S] (0 where the target is -1).
  const std::vector<double>& token_logprobs();
  // Replaces the gradient of the main next-token loss by that of sum_i weights[i] * -logp_i
  // (weights [B*S]; the mean is the caller's to take), for the next backward. The MTP and
  // balance terms keep theirs: a per-token objective runs with mtp_weight = alpha = 0.
  void weigh_tokens(const double* weights);
  // Memory held for the backward by the last forward (activations, logits and their gradients).
  int64_t activation_bytes() const;
  // Tokens routed to each expert of each layer in the last forward (empty: dense), without
  // the MTP placeholder positions (see BalanceLoss): the main
  // model's layers, then the MTP modules' blocks (none if the MTP loss is off); zeros for
  // the layers of other pipeline stages.
  const std::vector<std::vector<int64_t>>& expert_loads() const { return loads_; }

 private:
  // ignored_tail: positions per sequence left out of the balance loss and expert loads.
  BlockContext block_context(int64_t ignored_tail = 0) const {
    return {{c_, angles_, AttnForm::naive, loss_.linear}, {S_, loss_.alpha, ignored_tail, lengths_.data()}, experts_};
  }

  const ModelConfig& c_;
  TrainingLoss loss_;
  int64_t begin_ = 0, end_ = 0;  // the stage's blocks
  ExpertExchange* experts_ = nullptr;
  Rope rope_;
  int64_t B_ = 0, S_ = 0;
  TokenRows rows_;      // B windows of S tokens
  RopeAngles angles_;   // of rows_.pos
  Arena arena_;         // the modules' scratch
  std::vector<int32_t> tokens_, targets_;
  std::vector<int64_t> lengths_;  // per sequence: its real positions (after them: padding)
  std::vector<double> token_logp_;
  std::vector<BlockRecord<T>> layers_;
  std::vector<MtpActivations<T>> mtp_;
  std::vector<T> h_last_, logits_, dlogits_;
  std::vector<T> h_, h_next_, dh_;  // working buffers of a step, kept between steps
  std::vector<std::vector<int64_t>> loads_;  // expert_loads() of the last forward
  double main_loss_ = 0, mtp_loss_ = 0, balance_loss_ = 0;
};

}  // namespace dsv3
