// The pipeline of one training step (see pipeline.h).
#include "train/pipeline.h"

#include <algorithm>
#include <chrono>

#include "backend/optimizer.h"
#include "core/error.h"
#include "train/adamw.h"

namespace dsv3 {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

}  // namespace

// A training pass, held by a micro-batch from its forward to its backward.
struct Pipeline::Slot {
  std::unique_ptr<TrainingPass<float>> pass;
  std::vector<std::unique_ptr<dist::Handle>> sends;  // in flight from this pass's buffers
  int64_t bytes = 0;                                 // activations held since its forward
  void settle() {
    for (auto& h : sends) h->wait();
    sends.clear();
  }
  // Whether its sends have been received (a send can wait for a receive that the
  // neighbour's schedule posts only after this rank's next forwards).
  bool settled() {
    for (auto& h : sends)
      if (!h->test()) return false;
    sends.clear();
    return true;
  }
};

// A stage this rank holds, and its passes (as many as micro-batches in flight at once).
struct Pipeline::Stage {
  StageLayers layers;
  std::vector<std::unique_ptr<Slot>> slots;
  std::vector<Slot*> free;
};

StageLayers Pipeline::stage_layers(const ModelConfig& c, int P, int s) {
  const int64_t L = c.num_hidden_layers, base = L / P, extra = L % P;
  const int64_t begin = s * base + std::min<int64_t>(s, extra);
  return {begin, begin + base + (s < extra ? 1 : 0)};
}

Pipeline::Pipeline(const ModelConfig& c, const TrainingLoss& loss, dist::Communicator* pp, const std::string& schedule,
                   int micro_batches)
    : c_(c), loss_(loss), pp_(pp && pp->size() > 1 ? pp : nullptr), M_(micro_batches) {
  if (M_ < 1) fail("--micro-batches must be at least 1, not ", M_);
  P_ = pp_ ? pp_->size() : 1;
  rank_ = pp_ ? pp_->rank() : 0;
  if (P_ > c.num_hidden_layers)
    fail("--pp ", P_, " exceeds the model's ", c.num_hidden_layers, " layers (every stage needs one)");
  if (P_ > 1) {
    schedule_ = dist::make_schedule(schedule, P_, M_);
    if (schedule_.stages() > c.num_hidden_layers)
      fail(schedule, " splits the model into ", schedule_.stages(), " stages over --pp ", P_, "; the model has ",
           c.num_hidden_layers, " layers (every stage needs one)");
  } else {  // one process: each micro-batch's forward, then its backward (gradient accumulation)
    schedule_ = {"sequential", 1, M_, 1, false, {{}}};
    for (int j = 0; j < M_; ++j) {
      schedule_.ranks[0].push_back({dist::Chunk::F, 0, j});
      schedule_.ranks[0].push_back({dist::Chunk::B, 0, j});
    }
  }
  stages_.resize(size_t(schedule_.stages()));
  for (int dir = 0; dir < schedule_.stages_per_rank; ++dir) {
    auto& st = stages_[size_t(stage_of(dir))];
    if (st) continue;  // P = 1: one stage for both
    st = std::make_unique<Stage>();
    st->layers = stage_layers(c, schedule_.stages(), stage_of(dir));
  }
  inflight_.assign(size_t(2 * M_), nullptr);
  if (M_ > 1) second_ = allocate_weights(c, DType::f32, MtpTying::tied);
  if (loss.mtp_weight > 0 && c.num_nextn_predict_layers > 0)
    for (int h = 0; h < (M_ > 1 ? 2 : 1); ++h) mtp_embed_[h].assign(size_t(c.vocab_size * c.hidden_size), 0.0f);
  times_.resize(size_t(P_));
}

// A slot's sends end (their handles wait) before its buffers go: Slot declares them last.
Pipeline::~Pipeline() = default;

void Pipeline::set_expert_exchange(ExpertExchange* ex) {
  experts_ = ex;
  for (auto& st : stages_)
    if (st)
      for (auto& slot : st->slots) slot->pass->set_expert_exchange(ex);
}

Pipeline::Slot& Pipeline::acquire(Stage& st) {
  // A free pass whose buffers are no longer being sent, else a new one.
  for (size_t i = st.free.size(); i-- > 0;)
    if (st.free[i]->settled()) {
      Slot& slot = *st.free[i];
      st.free.erase(st.free.begin() + long(i));
      return slot;
    }
  st.slots.push_back(std::make_unique<Slot>());
  st.slots.back()->pass = std::make_unique<TrainingPass<float>>(c_, loss_, st.layers);
  st.slots.back()->pass->set_expert_exchange(experts_);
  return *st.slots.back();
}

void Pipeline::forward(const ModelWeights& w, int dir, int micro, std::span<const MicroBatch> batches) {
  const int j = global_micro(dir, micro), k = key(dir, j);
  Slot& slot = acquire(*stages_[size_t(stage_of(dir))]);
  inflight_[size_t(k)] = &slot;
  const MicroBatch& mb = batches[size_t(j)];
  TrainingPass<float>& pass = *slot.pass;
  const float* input = nullptr;
  if (!pass.first_stage()) {  // the previous stage's output
    if (!expected_[0][size_t(k)]) fail("pipeline: no input for micro-batch ", j, " at stage ", stage_of(dir), " (", schedule_.name, ")");
    if (received_[0][size_t(k)]) received_[0][size_t(k)]->wait();  // posted at the step's start
    input = inbox_[0][size_t(k)].data();
  }
  const auto t0 = Clock::now();
  const double total = pass.forward(w, mb.tokens, mb.targets, mb.B, mb.S, mb.lengths, input);
  const double t = seconds_since(t0);
  RankTimes& mine = times_[size_t(rank_)];
  mine.busy += t;
  mine.f += t;
  mine.f_count += 1;
  per_micro_[size_t(3 * j)] += total;  // the last stage's total, plus the balance loss of the others
  if (pass.last_stage()) {
    per_micro_[size_t(3 * j + 1)] = pass.main_loss();
    per_micro_[size_t(3 * j + 2)] = pass.mtp_loss();
  }
  const auto& loads = pass.expert_loads();
  result_.loads.resize(loads.size());
  for (size_t l = 0; l < loads.size(); ++l) {
    result_.loads[l].resize(loads[l].size());
    for (size_t e = 0; e < loads[l].size(); ++e) result_.loads[l][e] += loads[l][e];
  }
  slot.bytes = pass.activation_bytes();
  held_ += slot.bytes;
  result_.activation_bytes = std::max(result_.activation_bytes, held_);
  if (!pass.last_stage()) hand_over(0, dir, micro, stage_of(dir) + 1, pass.stage_output(), slot);
}

void Pipeline::hand_over(int kind, int dir, int micro, int to_stage, const std::vector<float>& data, Slot& slot) {
  const int to_dir = dir_of(to_stage, dir), to = rank_of(to_stage, to_dir);
  if (to == rank_) {  // DualPipeV's turn: the stage is this rank's other half
    const int k = key(to_dir, global_micro(dir, micro));
    inbox_[kind][size_t(k)].assign(data.begin(), data.end());
    expected_[kind][size_t(k)] = 1;
    return;
  }
  slot.sends.push_back(pp_->send_async(data, to, tag(kind, dir, micro)));
  result_.p2p_bytes += int64_t(data.size() * sizeof(float));
}

void Pipeline::backward(const ModelWeights& w, int dir, int micro, ModelWeights& grads) {
  const int j = global_micro(dir, micro), k = key(dir, j);
  Slot* held = inflight_[size_t(k)];
  if (!held) fail("pipeline: the backward of micro-batch ", j, " runs before its forward (schedule ", schedule_.name, ")");
  Slot& slot = *held;
  TrainingPass<float>& pass = *slot.pass;
  const float* output_grad = nullptr;
  if (!pass.last_stage()) {  // the next stage's gradient of this stage's output
    if (!expected_[1][size_t(k)])
      fail("pipeline: no output gradient for micro-batch ", j, " at stage ", stage_of(dir), " (", schedule_.name, ")");
    if (received_[1][size_t(k)]) received_[1][size_t(k)]->wait();
    output_grad = inbox_[1][size_t(k)].data();
  }
  const int h = half_of(j);
  Mat embed;  // E_h, the MTP modules' share of the embedding's gradient
  embed.rows = c_.vocab_size;
  embed.cols = c_.hidden_size;
  embed.data = reinterpret_cast<const uint8_t*>(mtp_embed_[h].data());
  const auto t0 = Clock::now();
  pass.backward(w, h == 0 ? grads : second_, output_grad, mtp_embed_[h].empty() ? nullptr : &embed);
  const double t = seconds_since(t0);
  RankTimes& mine = times_[size_t(rank_)];
  mine.busy += t;
  mine.b += t;
  mine.b_count += 1;
  if (!pass.first_stage()) hand_over(1, dir, micro, stage_of(dir) - 1, pass.input_grad(), slot);
  held_ -= slot.bytes;
  inflight_[size_t(k)] = nullptr;
  stages_[size_t(stage_of(dir))]->free.push_back(&slot);
}

void Pipeline::post_receives(std::span<const MicroBatch> micro) {
  // Every input this rank's ops will take, received as soon as its neighbour sends it, so
  // that the transfer overlaps the computation before the op (and a send never waits for
  // its receiver to reach the op).
  for (int kind = 0; kind < 2; ++kind) {
    received_[kind].resize(size_t(2 * M_));
    inbox_[kind].resize(size_t(2 * M_));
    expected_[kind].assign(size_t(2 * M_), 0);
    for (auto& h : received_[kind]) h.reset();
  }
  if (!pp_) return;
  auto post = [&](int kind, int dir, int mb) {  // kind 0: an F's input, 1: a B's output gradient
    const int stage = stage_of(dir), j = global_micro(dir, mb), k = key(dir, j);
    if (kind == 0 ? stage == 0 : stage == schedule_.stages() - 1) return;  // from the tokens / from the loss
    const int from_stage = kind == 0 ? stage - 1 : stage + 1, from = rank_of(from_stage, dir_of(from_stage, dir));
    if (from == rank_) return;  // DualPipeV's turn: handed over on this rank
    std::vector<float>& buf = inbox_[kind][size_t(k)];
    buf.resize(size_t(micro[size_t(j)].B * micro[size_t(j)].S * c_.hidden_size));
    received_[kind][size_t(k)] = pp_->recv_async(buf, from, tag(kind, dir, mb));
    expected_[kind][size_t(k)] = 1;
  };
  for (const dist::Op& op : schedule_.ranks[size_t(rank_)]) {
    if (op.kind == dist::Chunk::F || op.kind == dist::Chunk::FB) post(0, op.dir, op.micro);
    if (op.kind == dist::Chunk::B) post(1, op.dir, op.micro);
    if (op.kind == dist::Chunk::FB) post(1, op.dir2, op.micro2);
  }
}

const PipelineResult& Pipeline::run(const ModelWeights& w, std::span<const MicroBatch> micro, ModelWeights& grads) {
  if (int64_t(micro.size()) != M_) fail("pipeline: ", micro.size(), " micro-batches given, ", M_, " expected");
  if (pp_) pp_->barrier();  // one start for every rank: the measured bubble is the schedule's alone
  const auto t0 = Clock::now();
  if (M_ > 1) zero_grads(second_);
  for (auto& e : mtp_embed_) std::fill(e.begin(), e.end(), 0.0f);
  per_micro_.assign(size_t(3 * M_), 0.0);
  for (auto& layer : result_.loads) std::fill(layer.begin(), layer.end(), 0);
  std::fill(times_.begin(), times_.end(), RankTimes{});
  result_.activation_bytes = 0;
  result_.p2p_bytes = 0;
  held_ = 0;
  post_receives(micro);
  for (const dist::Op& op : schedule_.ranks[size_t(rank_)]) {
    switch (op.kind) {
      case dist::Chunk::F: forward(w, op.dir, op.micro, micro); break;
      case dist::Chunk::B: backward(w, op.dir, op.micro, grads); break;
      case dist::Chunk::W: break;  // folded into its B
      case dist::Chunk::FB:
        forward(w, op.dir, op.micro, micro);
        backward(w, op.dir2, op.micro2, grads);
        break;
    }
  }
  for (auto& st : stages_)
    if (st)
      for (auto& slot : st->slots) slot->settle();
  times_[size_t(rank_)].window = seconds_since(t0);

  // g = (G_0 + E_0) + (G_1 + E_1), each half's elements summed over the pipeline ranks (one
  // of which computed it), then the mean over the micro-batches.
  float* g0 = grads.flat.as<float>().data();
  for (int h = 0; h < 2; ++h)
    if (!mtp_embed_[h].empty()) {
      ModelWeights& g = h == 0 ? grads : second_;
      add_into(mutable_data<float>(g.embed_tokens), mtp_embed_[h].data(), int64_t(mtp_embed_[h].size()));
    }
  if (pp_) {
    pp_->all_reduce(grads.flat.as<float>());
    if (M_ > 1) pp_->all_reduce(second_.flat.as<float>());
  }
  if (M_ > 1) {
    add_into(g0, second_.flat.as<float>().data(), grads.flat.numel);
    const FloatSpan all{g0, grads.flat.numel};
    scale_spans(&all, 1, float(1.0 / M_));
  }
  // The losses, loads and timings of every pipeline rank (each held by one rank, zeros elsewhere).
  if (pp_) {
    for (const auto& layer : result_.loads)
      for (int64_t n : layer) per_micro_.push_back(double(n));  // exact in a double
    for (const RankTimes& r : times_) per_micro_.insert(per_micro_.end(), {r.busy, r.window, r.f, r.f_count, r.b, r.b_count});
    pp_->all_reduce(std::span<double>(per_micro_));
    size_t at = size_t(3 * M_);
    for (auto& layer : result_.loads)
      for (int64_t& n : layer) n = int64_t(per_micro_[at++]);
    for (RankTimes& r : times_) {
      r = {per_micro_[at], per_micro_[at + 1], per_micro_[at + 2], per_micro_[at + 3], per_micro_[at + 4], per_micro_[at + 5]};
      at += 6;
    }
  }
  result_.total = result_.loss = result_.mtp_loss = 0;
  for (int j = 0; j < M_; ++j) {  // in micro-batch order, as one process adds them
    result_.total += per_micro_[size_t(3 * j)];
    result_.loss += per_micro_[size_t(3 * j + 1)];
    result_.mtp_loss += per_micro_[size_t(3 * j + 2)];
  }
  result_.total /= M_;
  result_.loss /= M_;
  result_.mtp_loss /= M_;
  return result_;
}

const PipelineTiming& Pipeline::timing() {
  PipelineTiming& t = timing_;
  t.busy.assign(size_t(P_), 0);
  t.window.assign(size_t(P_), 0);
  t.f.assign(size_t(P_), 0);
  t.b.assign(size_t(P_), 0);
  std::vector<dist::Costs> costs(static_cast<size_t>(P_));
  double makespan = 0, busy = 0;
  bool measured = true;
  for (int r = 0; r < P_; ++r) {
    const RankTimes& x = times_[size_t(r)];
    t.busy[size_t(r)] = x.busy;
    t.window[size_t(r)] = x.window;
    t.f[size_t(r)] = x.f_count > 0 ? x.f / x.f_count : 0;
    t.b[size_t(r)] = x.b_count > 0 ? x.b / x.b_count : 0;
    measured = measured && t.f[size_t(r)] > 0 && t.b[size_t(r)] > 0;
    costs[size_t(r)] = {t.f[size_t(r)], t.b[size_t(r)], 0, t.f[size_t(r)] + t.b[size_t(r)]};  // W in B; FB = F then B
    makespan = std::max(makespan, x.window);
    busy += x.busy;
  }
  t.measured_bubble = makespan > 0 ? 1 - busy / (P_ * makespan) : 0;
  t.simulated_bubble = 0;
  if (P_ > 1 && measured) {
    const dist::Timeline sim = dist::simulate(schedule_, costs);
    double idle = 0;
    for (double x : sim.bubble) idle += x;
    t.simulated_bubble = idle / (P_ * sim.makespan);
  }
  return t;
}

}  // namespace dsv3
