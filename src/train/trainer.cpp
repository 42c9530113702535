// The training loop (see trainer.h).
#include "train/trainer.h"

#include <chrono>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <set>

#include "core/error.h"
#include "io/checkpoint.h"
#include "train/balance.h"

namespace dsv3 {

void init_weights(const ModelConfig& c, ModelWeights& w, double std, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, float(std));
  tie_mtp_shared(w);
  std::set<const uint8_t*> done;
  for (const TensorSlot& s : list_tensors(c, w)) {
    if (!done.insert(s.mat->data).second) continue;
    float* p = mutable_data<float>(*s.mat);
    const bool vector = s.shape.size() == 1;
    for (int64_t i = 0; i < s.mat->numel(); ++i) p[i] = vector ? (s.trainable ? 1.0f : 0.0f) : normal(rng);
  }
}

Trainer::Trainer(const std::string& config_json, const TrainOptions& opt, std::unique_ptr<TrainingData> train,
                 std::unique_ptr<TrainingData> val, const std::string& run_dir)
    : config_json_(config_json),
      c_(ModelConfig::parse(config_json, run_dir + ": config")),
      opt_(opt),
      run_dir_(run_dir),
      params_(allocate_weights(c_, DType::f32, MtpTying::tied)),
      grads_(allocate_weights(c_, DType::f32, MtpTying::tied)),
      adamw_(c_, opt.adamw),
      grad_spans_(adamw_.trainable_spans(grads_)),
      pass_(c_, {opt.mtp_weight, opt.alpha, opt.linear}),
      pipe_(std::make_unique<Pipeline>(c_, pass_.loss(), nullptr, "1f1b", opt.micro_batches)),
      micro_(size_t(opt.micro_batches)),
      train_(std::move(train)),
      val_(std::move(val)) {
  if (!train_) fail("training needs data");
  if (opt_.batch <= 0 || opt_.seq <= 0 || opt_.steps < 0) fail("batch, seq and steps must be positive");
  if (opt_.seq > c_.max_position_embeddings) fail("seq ", opt_.seq, " exceeds max_position_embeddings");
  opt_.schedule.batch = opt_.batch;
  check_batches(1);
  init_weights(c_, params_, opt_.init_std, opt_.seed);
  state_.seed = opt_.seed, state_.seq = opt_.seq, state_.batch = opt_.batch, state_.data_windows = train_->size();
}

namespace {

std::unique_ptr<TrainingData> validation_windows(std::vector<std::span<const uint32_t>> val, const TrainOptions& opt) {
  if (opt.eval_every <= 0 || val.empty()) return nullptr;
  int64_t tokens = 0;
  for (const auto& v : val) tokens += int64_t(v.size());
  if (tokens < opt.seq + 1)
    fail("the validation data has ", tokens, " tokens, not enough for one sequence of ", opt.seq + 1,
         "; pass --eval-every 0 or hold out more (dsv3 data --val-fraction)");
  return std::make_unique<BatchSampler>(std::move(val), opt.seq, 0);
}

}  // namespace

Trainer::Trainer(const std::string& config_json, const TrainOptions& opt, std::vector<std::span<const uint32_t>> train,
                 std::vector<std::span<const uint32_t>> val, const std::string& run_dir)
    : Trainer(config_json, opt, std::make_unique<BatchSampler>(std::move(train), opt.seq, opt.seed),
              validation_windows(std::move(val), opt), run_dir) {}

void load_float_weights(const std::string& dir, const ModelConfig& c, ModelWeights& dst) {
  // Read with the checkpoint's own config (an FP8 release's quantization_config says how its
  // tensors are stored); the run's config, without it, must describe the same tensors.
  const ModelConfig theirs = ModelConfig::load(dir + "/config.json");
  const Checkpoint ckpt(dir);
  const ModelWeights stored = load_weights(theirs, ckpt);  // names, shapes, dtypes, FP8 scales
  const auto a = list_tensors(theirs, const_cast<ModelWeights&>(stored)), b = list_tensors(c, dst);
  if (a.size() != b.size()) fail(dir, ": the checkpoint has ", a.size(), " tensors, this run's model ", b.size());
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i].name != b[i].name || a[i].shape != b[i].shape) fail(dir, ": ", a[i].name, " does not fit this run's model");
  convert_weights(theirs, stored, dst);
}

void Trainer::init_from(const std::string& dir) { load_float_weights(dir, c_, params_); }

void Trainer::check_batches(int64_t ranks) const {
  // Every step's batch (a ramp's too) must split evenly: checked now, not hours in.
  const int64_t parts = ranks * opt_.micro_batches;
  for (int64_t step = 1; parts > 1 && step <= std::max<int64_t>(opt_.steps, 1); ++step)
    if (opt_.schedule.batch_at(step) % parts != 0) {
      const std::string over = ranks > 1 ? cat(ranks, " data-parallel processes") : "";
      const std::string micro =
          opt_.micro_batches > 1 ? cat(opt_.micro_batches, " micro-batches (--micro-batches; 2 x --pp unless given)") : "";
      fail("a batch split over ", over, ranks > 1 && opt_.micro_batches > 1 ? " x " : "", micro,
           " must be divisible by ", parts, "; step ", step, "'s batch is ", opt_.schedule.batch_at(step), " (--batch ",
           opt_.batch, ", or the batch ramp)");
    }
}

void Trainer::set_data_parallel(dist::Communicator* dp) {
  check_batches(dp ? dp->size() : 1);
  dp_ = dp && dp->size() > 1 ? dp : nullptr;
}

void Trainer::set_pipeline(dist::Communicator* pp, const std::string& schedule) {
  pipe_ = std::make_unique<Pipeline>(c_, pass_.loss(), pp, schedule, opt_.micro_batches);
  pipe_->set_expert_exchange(ep_.get());
  writer_ = !pp || pp->rank() == 0;
}

void Trainer::set_expert_parallel(dist::Communicator* ep, int64_t nodes) {
  if (!ep || ep->size() <= 1) {
    pass_.set_expert_exchange(nullptr);
    pipe_->set_expert_exchange(nullptr);
    ep_.reset();
    return;
  }
  if (c_.n_routed_experts == 0) fail("expert parallelism: the model has no routed experts");
  if (c_.n_routed_experts % ep->size() != 0)
    fail("--ep ", ep->size(), " must divide the model's ", c_.n_routed_experts, " routed experts");
  ep_ = std::make_unique<CommExpertExchange>(*ep, c_.n_routed_experts, nodes);
  pass_.set_expert_exchange(ep_.get());
  pipe_->set_expert_exchange(ep_.get());
}

bool Trainer::resume() {
  const auto dir = latest_checkpoint(run_dir_);
  if (!dir) return false;
  const TrainerState saved = load_checkpoint(*dir, config_json_, c_, params_, adamw_);
  // A resumed run must read the same batches: same seed, shapes and data.
  auto check = [&](const char* flag, int64_t was, int64_t now) {
    if (was != 0 && was != now)
      fail(*dir, ": the run used ", flag, " ", was, ", this one ", now, "; resume with the same ", flag);
  };
  check("--seed", int64_t(saved.seed), int64_t(opt_.seed));
  check("--seq", saved.seq, opt_.seq);
  check("--batch", saved.batch, opt_.batch);
  if (saved.data_windows != 0 && saved.data_windows != train_->size())
    fail(*dir, ": the run's training data had ", saved.data_windows, " items, the data now has ", train_->size(),
         "; resume with the same data");
  state_ = saved;
  train_->seek(state_.data);
  return true;
}

const StepMetrics& Trainer::step() {
  return step_with([&](StepMetrics& m) {
    const int64_t B = opt_.schedule.batch_at(state_.step + 1), S = opt_.seq;
    inputs_.resize(size_t(B * S)), targets_.resize(size_t(B * S)), lengths_.resize(size_t(B));
    train_->next_batch(B, inputs_.data(), targets_.data(), lengths_.data());
    // This rank's share of the sequences (all of them in one process), in micro-batches.
    const int64_t ranks = dp_ ? dp_->size() : 1, M = opt_.micro_batches, share = B / ranks, per = share / M;
    if (per * M * ranks != B)
      fail("step ", state_.step + 1, ": a batch of ", B, " sequences does not split over ", ranks, " data-parallel ranks x ",
           M, " micro-batches");
    const int64_t first = (dp_ ? dp_->rank() : 0) * share;
    for (int64_t j = 0; j < M; ++j) {
      const int64_t at = first + j * per;
      micro_[size_t(j)] = {inputs_.data() + at * S, targets_.data() + at * S, lengths_.data() + at, per, S};
    }
    const PipelineResult& r = pipe_->run(params_, micro_, grads_);
    m.loss = r.loss, m.mtp_loss = r.mtp_loss;
    m.activation_bytes = r.activation_bytes;
    m.p2p_bytes = r.p2p_bytes;
    m.batch = B, m.tokens = B * S;
    step_loads_ = &r.loads;
    if (pipe_->ranks() > 1) {
      const PipelineTiming& t = pipe_->timing();
      m.bubble = t.measured_bubble, m.bubble_sim = t.simulated_bubble;
    }
    return r.total;
  });
}

const StepMetrics& Trainer::step_with(const Objective& objective) {
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t step = state_.step + 1;
  zero_grads(grads_);
  StepMetrics& m = metrics_;
  m = StepMetrics{.max_vio_layers = std::move(m.max_vio_layers)};
  const int64_t sent_before = ep_ ? ep_->rows_sent_away() : 0, node_before = ep_ ? ep_->token_node_sends() : 0;
  step_loads_ = nullptr;
  double total = objective(m);
  const auto& step_loads = step_loads_ ? *step_loads_ : pass_.expert_loads();
  const int64_t step_tokens = m.tokens;
  if (ep_) {
    m.a2a_bytes = (ep_->rows_sent_away() - sent_before) * c_.hidden_size * int64_t(sizeof(float));
    m.node_bytes = (ep_->token_node_sends() - node_before) * c_.hidden_size * int64_t(sizeof(float));
  }
  const int64_t ranks = dp_ ? dp_->size() : 1;
  if (dp_) {
    // ZeRO-1 (§3.4's data parallelism): the gradients are reduce-scattered, each rank
    // receiving the sum over ranks of its shard of the flat buffer, averaged (the mean of
    // the ranks' means: the whole batch's gradient); it updates that shard only.
    zero_shard();
    float* g = grads_.flat.as<float>().data();
    std::copy_n(g, grads_.flat.numel, padded_.begin());
    dp_->reduce_scatter(padded_, own_);
    std::copy_n(own_.begin(), hi_ - lo_, g + lo_);
    const FloatSpan mine{g + lo_, hi_ - lo_};
    scale_spans(&mine, 1, 1.0f / float(ranks));
    reduced_.assign({total, m.loss, m.mtp_loss});
    for (const auto& layer : step_loads)
      for (int64_t n : layer) reduced_.push_back(double(n));  // exact in a double
    dp_->all_reduce(std::span<double>(reduced_));
    total = reduced_[0] / double(ranks), m.loss = reduced_[1] / double(ranks), m.mtp_loss = reduced_[2] / double(ranks);
  }
  m.grad_norm = dp_ ? clip_sharded() : clip_grad_norm(grad_spans_, opt_.clip);
  // Diverged: stop before the weights are touched, so nothing non-finite is ever saved.
  if (!std::isfinite(total) || !std::isfinite(m.grad_norm))
    fail("step ", step, ": the loss is ", total, " and the gradient norm ", m.grad_norm,
         "; stopping before the update (the last checkpoint is intact)");
  m.lr = opt_.schedule.lr_at(step);
  adamw_.update(params_, grads_, m.lr, step);
  if (dp_) {  // every rank's updated shard to every rank
    float* w = params_.flat.as<float>().data();
    std::copy(w + lo_, w + hi_, own_.begin());
    dp_->all_gather(std::span<const float>(own_.data(), size_t(hi_ - lo_)), std::span<float>(w, size_t(params_.flat.numel)), counts_);
  }
  if (dp_) {  // the loads of the whole batch
    loads_ = step_loads;
    size_t at = 3;
    for (auto& layer : loads_)
      for (int64_t& n : layer) n = int64_t(std::llround(reduced_[at++]));
  }
  update_balance_bias(c_, params_, dp_ ? loads_ : step_loads, opt_.gamma, m.max_vio_layers);
  for (double v : m.max_vio_layers) m.max_vio = std::max(m.max_vio, v);
  state_.step = step;
  state_.tokens += step_tokens;
  state_.data = train_->position();
  m.step = step, m.tokens = state_.tokens;
  m.tokens_per_s = double(step_tokens) / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return m;
}

double Trainer::validation_loss() {
  if (!val_) return -1;
  // eval_batches * batch sequences from the validation data's start: the same ones at
  // every evaluation. Always the plain next-token loss in float32 GEMMs, averaged over the
  // tokens that have a target.
  val_->seek({});
  const int64_t n = std::min(opt_.eval_batches * opt_.batch, val_->size());
  std::vector<int32_t> in(size_t(opt_.seq)), tg(size_t(opt_.seq));
  double total = 0, tokens = 0;
  TrainingPass<float> pass(c_);  // the next-token loss alone
  for (int64_t i = 0; i < n; ++i) {
    val_->next_batch(1, in.data(), tg.data(), nullptr);
    const double counted = double(std::count_if(tg.begin(), tg.end(), [](int32_t t) { return t >= 0; }));
    if (counted == 0) continue;
    total += pass.forward(params_, in.data(), tg.data(), 1, opt_.seq) * counted;
    tokens += counted;
  }
  return tokens > 0 ? total / tokens : -1;
}

void Trainer::zero_shard() {
  if (adamw_.sharded()) return;  // once, at the first step (a resume loads the whole state before)
  const int64_t n = grads_.flat.numel, ranks = dp_->size(), per = (n + ranks - 1) / ranks;
  lo_ = std::min(n, dp_->rank() * per), hi_ = std::min(n, lo_ + per);
  // The ranks must continue the same run: the same step and data position (a run folder
  // each ranks sees alike), else their shards would mix two states.
  std::vector<double> where(static_cast<size_t>(3 * ranks), 0.0);
  const size_t me = size_t(3 * dp_->rank());
  where[me] = double(state_.step), where[me + 1] = double(state_.data.epoch), where[me + 2] = double(state_.data.index);
  dp_->all_reduce(std::span<double>(where));
  for (int64_t r = 1; r < ranks; ++r)
    if (!std::equal(where.begin() + 3 * r, where.begin() + 3 * r + 3, where.begin()))
      fail("data-parallel rank ", r, " is at step ", int64_t(where[size_t(3 * r)]), " and rank 0 at step ", int64_t(where[0]),
           ": every process must resume from the same checkpoint (the same --out)");
  for (int64_t r = 0; r < ranks; ++r) counts_.push_back(std::min(n, std::min(n, r * per) + per) - std::min(n, r * per));
  padded_.assign(size_t(per * ranks), 0.0f), own_.assign(size_t(per), 0.0f);
  adamw_.shard(lo_, hi_);
  // The trainable spans' parts within the shard: what this rank's clip sums and scales.
  for (const FloatSpan& sp : grad_spans_) {
    const float* base = grads_.flat.as<float>().data();
    const int64_t a = std::max<int64_t>(sp.data - base, lo_), b = std::min<int64_t>(sp.data - base + sp.n, hi_);
    if (a < b) shard_spans_.push_back({const_cast<float*>(base) + a, b - a});
  }
}

double Trainer::clip_sharded() {
  // The global norm: every rank's sum of squares over its shard, summed in double.
  double sum = sum_of_squares(shard_spans_.data(), shard_spans_.size());
  dp_->all_reduce(std::span<double>(&sum, 1));
  const double norm = std::sqrt(sum);
  if (opt_.clip > 0 && norm > opt_.clip) scale_spans(shard_spans_.data(), shard_spans_.size(), float(opt_.clip / (norm + 1e-6)));
  return norm;
}

std::string Trainer::save() {
  if (!writer_) return "";  // pipeline ranks after the first hold the same weights and moments
  if (dp_ && adamw_.sharded()) {  // the shards' moments gathered (every rank of dp takes part), rank 0 writes
    AdamW whole = adamw_.gathered(*dp_, counts_);
    if (dp_->rank() != 0) return "";
    return save_checkpoint(run_dir_, config_json_, c_, params_, whole, state_, opt_.keep, opt_.extras);
  }
  if (dp_ && dp_->rank() != 0) return "";  // the ranks hold the same weights: rank 0 writes them
  return save_checkpoint(run_dir_, config_json_, c_, params_, adamw_, state_, opt_.keep, opt_.extras);
}

void Trainer::run(const std::function<void(const StepMetrics&)>& on_step, const Objective& objective) {
  while (state_.step < opt_.steps) {
    StepMetrics& m = metrics_;
    if (objective) step_with(objective);
    else step();
    if (opt_.eval_every > 0 && (m.step % opt_.eval_every == 0 || m.step == opt_.steps)) m.val_loss = validation_loss();
    // Report before saving: a crash in between repeats this step on resume (its metrics
    // line appears twice) rather than losing it.
    if (on_step) on_step(m);
    if (opt_.save_every > 0 && (m.step % opt_.save_every == 0 || m.step == opt_.steps)) save();
  }
}

}  // namespace dsv3
