// Feed-forward layers, one forward for inference and training and the backward beside it:
// the dense SwiGLU MLP and DeepSeekMoE (§2.1.2),
//   h' = sum_i shared_i(u) + sum_{i in top-k} g_i expert_i(u),
// the MoE in four named steps so that an expert all-to-all can be placed between them from
// outside (between dispatch and experts, and between experts and combine) without touching
// the math:
//   route     gate logits, affinities, bias-selected top-k, gate weights   (router.h)
//   dispatch  the (token, choice) slots grouped by expert, their inputs gathered
//   experts   every active expert's SwiGLU on its rows (grouped products), and the shared ones
//   combine   out[t] += g_j * expert output, over the token's k choices
// Expert selection is piecewise constant and is not differentiated; gradients reach the
// router (gate.weight and the input) through the gate weights of the chosen experts. The
// e_score_correction_bias only selects and gets no gradient. T is float (inference,
// training) or double (gradient checks). Uses backend ops only.
// What training keeps (§3.3.3): each MLP's SwiGLU inputs (E4M3 1x128 tiles for the experts
// in FP8 training), not its output, which the backward recomputes; experts' inputs are
// gathered again from the recomputed norm rather than kept.
#pragma once
#include <cstdint>
#include <vector>

#include "backend/ops.h"
#include "core/arena.h"
#include "model/weights.h"

namespace dsv3 {

// The SwiGLU inputs gate_proj x and up_proj x [m, inter].
template <typename T>
struct MlpRecord {
  SavedActivation<T> a, b;
  int64_t bytes() const { return a.bytes() + b.bytes(); }
};

// out[m, hidden] = down(silu(gate(x)) * up(x)) (overwritten). With a record, the SwiGLU
// inputs are kept there in `saved` (the backward then works from those values).
template <typename T>
void mlp_forward(const MlpWeights& w, const T* x, int64_t m, Arena& arena, T* out, const LinearGemm& lin = {},
                 MlpRecord<T>* record = nullptr, SavedFormat saved = SavedFormat::full);
// Weight gradients accumulated into g; input gradient accumulated into dx. x: the forward's input.
template <typename T>
void mlp_backward(const MlpWeights& w, const T* x, int64_t m, const MlpRecord<T>& record, const T* dout, MlpWeights& g,
                  T* dx, Arena& arena, const LinearGemm& lin = {});

// Step 1, route: what the router decided for n tokens.
template <typename T>
struct Routing {
  std::vector<T> logits;         // [n, E] = u W_g^T
  std::vector<int32_t> experts;  // [n, k] chosen experts, best first
  std::vector<T> weights;        // [n, k] their gate weights
};
template <typename T>
void route_tokens(const ModelConfig& c, const MoeWeights& w, const T* x, int64_t n, Routing<T>& r, Arena& arena);

// Step 2, dispatch: the n*k slots (slot = token * k + j) grouped by expert, in token order
// within each expert; expert e's rows are [offset[e], offset[e + 1]) of the grouped order,
// slot[row] says whose.
struct Dispatch {
  std::vector<int64_t> offset;  // [E + 1]
  std::vector<int64_t> slot;    // [n * k]
  std::vector<int64_t> token;   // [n * k]: slot / k
  int64_t rows(int64_t e) const { return offset[size_t(e + 1)] - offset[size_t(e)]; }
};
// Fills d (its vectors keep their memory from one pass to the next).
void dispatch(const std::vector<int32_t>& experts, int64_t n_experts, int64_t k, Dispatch& d);

// Where one MoE forward keeps the router's decisions and the dispatch: the record's in
// training; in inference the caller's, reused from layer to layer and pass to pass so that a
// pass allocates nothing.
template <typename T>
struct MoeState {
  Routing<T> routing;
  Dispatch dispatch;
};

// The complementary sequence-wise balance loss (§2.1.2, eq. 17-20): for each sequence of
// seq_len tokens, alpha * sum_i f_i P_i with f_i = E / (K T) * (tokens choosing expert i)
// and P_i the mean over the sequence of the normalised affinity s_i / sum_j s_j; averaged
// over the sequences. alpha = 0 turns it off. T counts a sequence's tokens except its last
// `ignored_tail`: the positions where MTP depth k feeds a placeholder (k of them), which
// count neither in this loss nor in the expert loads that drive the bias update. (When a
// sequence is no longer than k, TrainingPass still counts its first position: that MTP
// depth has no target at all then, and its block keeps a load.)
// `lengths` (optional, one per sequence) says how many of a sequence's positions are real:
// padding after them (SFT and GRPO batches) counts neither, nor, at MTP depth k, the last k
// real positions (their inputs are padding). The loss is the mean over the sequences with a
// counted position (per process under data parallelism, where no sequence is empty).
struct BalanceLoss {
  int64_t seq_len = 0;  // 0: the whole batch is one sequence
  double alpha = 0;
  int64_t ignored_tail = 0;
  const int64_t* lengths = nullptr;  // [sequences], valid during the forward; null: all real
};

// Expert parallelism (§3.2.2), applied from outside the model: a layer's routed experts are
// spread over the processes of a group, a contiguous range on each, and between dispatch and
// the experts each grouped row travels to the process holding its expert, the outputs
// travelling back before the combine (the backward mirrors both). The MoE calls an
// ExpertExchange at those points; without one, every expert is here. Rows arrive
// source-major (every process's rows for the experts here, process by process, each in its
// grouped order) and the MoE regroups them expert-major to run each expert once.
struct ExpertRoute {  // one layer's exchange, kept for its backward
  std::vector<int64_t> send;       // [processes] rows sent to each
  std::vector<int64_t> recv;       // [processes * experts here] rows received from each, per expert
  std::vector<int64_t> to_expert;  // expert-major row i is source-major row to_expert[i]
  std::vector<int64_t> to_source;  // source-major row j is expert-major row to_source[j]
  std::vector<int64_t> offset;     // [experts here + 1]: where each expert's rows start, expert-major
  std::vector<int64_t> source_start;  // [processes * experts here]: where (process, expert) starts, source-major
  int64_t received() const { return int64_t(to_expert.size()); }
};
class ExpertExchange {
 public:
  virtual ~ExpertExchange() = default;
  virtual int64_t first_expert() const = 0;  // the experts here: [first, first + count)
  virtual int64_t experts_here() const = 0;
  virtual int64_t processes() const = 0;
  // Fills route.send from the local dispatch (its offset [E + 1]; its token of each row for
  // accounting) and route.recv from every process's counts.
  virtual void plan(const Dispatch& d, ExpertRoute& route) = 0;
  // rows [sum send, width], local grouped order -> received [sum recv, width], source-major.
  virtual void to_experts(const ExpertRoute& route, const float* rows, int64_t width, float* received) = 0;
  // The reverse: rows [sum recv, width] source-major -> back [sum send, width] local grouped order.
  virtual void to_tokens(const ExpertRoute& route, const float* rows, int64_t width, float* back) = 0;
};
// route.to_expert, to_source and offset from route.recv (the regrouping, index arithmetic).
void order_by_expert(ExpertRoute& route, int64_t processes, int64_t experts_here);

// What the MoE backward needs, and the loads the bias update reads. The routed experts'
// SwiGLU inputs are kept as one activation over the n*k rows in grouped order (expert e's
// rows at dispatch.offset[e]), so a record's size depends on (n, k) only, not on routing.
template <typename T>
struct MoeRecord {
  MoeState<T> state;                  // routing and dispatch
  std::vector<T> ye;                  // [n*k, hidden] expert outputs, grouped order
  // [rows, moe_intermediate_size] gate / up outputs of the experts' rows: the n*k grouped rows,
  // or under expert parallelism the received rows, expert-major
  SavedActivation<T> expert_a, expert_b;
  ExpertRoute route;                  // under expert parallelism: the exchange
  MlpRecord<T> shared;
  BalanceLoss balance;                // as given to the forward
  std::vector<int64_t> load;          // per expert: counted tokens routed to it (see BalanceLoss)
  std::vector<int64_t> counted;       // per sequence: its positions in the loads and the balance loss
  std::vector<T> balance_f;           // [n / seq_len, E]: alpha * f_i / (T * sequences)
  int64_t bytes() const;
};

// out[n, hidden] = MoE(x) (overwritten); returns the balance loss (0 without a record or
// alpha). state: where the routing and dispatch go without a record (null: local storage,
// allocated for this call; traces and statistics read the routing there). lin: the
// precision of the experts' GEMMs (the router gate stays in T).
// experts: expert parallelism (float only; null: every expert here). Under it the weight
// gradients of the routed experts not here stay untouched.
template <typename T>
double moe_forward(const ModelConfig& c, const MoeWeights& w, const T* x, int64_t n, Arena& arena, T* out,
                   const LinearGemm& lin = {}, MoeRecord<T>* record = nullptr, const BalanceLoss& balance = {},
                   MoeState<T>* state = nullptr, ExpertExchange* experts = nullptr);
template <typename T>
void moe_backward(const ModelConfig& c, const MoeWeights& w, const T* x, int64_t n, const MoeRecord<T>& record,
                  const T* dout, MoeWeights& g, T* dx, Arena& arena, const LinearGemm& lin = {},
                  ExpertExchange* experts = nullptr);

}  // namespace dsv3
