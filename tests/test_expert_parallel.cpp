// Expert parallelism under mpirun (2 and 4 processes): each process runs its share of the
// tokens, its range of the routed experts receiving every process's rows for them by
// all-to-all; against one process over all the tokens with every expert: an MoE layer's
// outputs and input gradients row by row, its weight gradients (the experts' on their
// process, the gate's and shared experts' summed over processes), and a whole training
// pass's loss and gradients (summed over processes). Only the order of float sums differs.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "core/error.h"
#include "dist/communicator.h"
#include "model/moe.h"
#include "model/training.h"
#include "train/expert_parallel.h"

namespace dsv3 {
namespace {

ModelConfig small_config(int64_t experts) {
  return ModelConfig::parse(R"({"vocab_size": 31, "hidden_size": 16, "intermediate_size": 24, "moe_intermediate_size": 8,
    "num_hidden_layers": 3, "num_attention_heads": 2, "qk_nope_head_dim": 4, "qk_rope_head_dim": 4, "v_head_dim": 4,
    "kv_lora_rank": 6, "q_lora_rank": null, "max_position_embeddings": 32, "rope_theta": 10000, "rope_scaling": null,
    "first_k_dense_replace": 1, "n_routed_experts": )" + std::to_string(experts) + R"(, "num_experts_per_tok": 3,
    "n_shared_experts": 1, "rms_norm_eps": 1e-6, "num_nextn_predict_layers": 1, "scoring_func": "sigmoid",
    "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1, "norm_topk_prob": true, "routed_scaling_factor": 1.5})",
                            "small config");
}

ModelWeights random_weights(const ModelConfig& c, uint64_t seed) {
  ModelWeights w = allocate_weights(c, DType::f32, MtpTying::tied);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.3f);
  for (const TensorSlot& s : list_tensors(c, w)) {
    float* p = mutable_data<float>(*s.mat);
    for (int64_t i = 0; i < s.mat->numel(); ++i) p[i] = s.shape.size() == 1 ? (s.trainable ? 1 + 0.1f * normal(rng) : 0.1f * normal(rng)) : normal(rng);
  }
  return w;
}

void expect_close(const float* got, const float* want, int64_t n, double tol, const std::string& what) {
  for (int64_t i = 0; i < n; ++i)
    ASSERT_NEAR(got[i], want[i], tol * std::max(1.0, double(std::fabs(want[i])))) << what << " [" << i << "]";
}

std::vector<float> sum_over(dist::Communicator& comm, const float* p, int64_t n) {
  std::vector<double> d(p, p + n);
  comm.all_reduce(std::span<double>(d));
  return std::vector<float>(d.begin(), d.end());
}

TEST(ExpertParallel, MoeLayerEqualsOneProcess) {
  dist::Communicator& world = dist::world();
  const int64_t P = world.size(), me = world.rank();
  const ModelConfig c = small_config(4 * P);
  const ModelWeights w = random_weights(c, 7);
  const MoeWeights& moe = w.layers[1].moe;
  const int64_t n = 12, N = n * P, dim = c.hidden_size;
  std::mt19937_64 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(size_t(N * dim)), dout(size_t(N * dim));
  for (float& v : x) v = normal(rng);
  for (float& v : dout) v = normal(rng);
  // No balance loss here: its gradient weighs each sequence by 1 / (the process's sequences),
  // which the training pass test below covers (gradients summed / P).
  const BalanceLoss balance{4, 0.0, 0};
  // One process, every expert, all the tokens.
  Arena arena;
  std::vector<float> out(x.size()), dx(x.size(), 0.0f);
  ModelWeights g = allocate_weights(c, DType::f32, MtpTying::tied);
  MoeRecord<float> rec;
  const double loss = moe_forward<float>(c, moe, x.data(), N, arena, out.data(), {}, &rec, balance);
  moe_backward<float>(c, moe, x.data(), N, rec, dout.data(), g.layers[1].moe, dx.data(), arena);
  // This process's share, the experts exchanged.
  CommExpertExchange ex(world, c.n_routed_experts);
  EXPECT_EQ(ex.experts_here(), 4);
  EXPECT_EQ(ex.first_expert(), 4 * me);
  std::vector<float> out_p(size_t(n * dim)), dx_p(size_t(n * dim), 0.0f);
  ModelWeights g_p = allocate_weights(c, DType::f32, MtpTying::tied);
  MoeRecord<float> rec_p;
  const float* x_p = x.data() + me * n * dim;
  const double loss_p = moe_forward<float>(c, moe, x_p, n, arena, out_p.data(), {}, &rec_p, balance, nullptr, &ex);
  moe_backward<float>(c, moe, x_p, n, rec_p, dout.data() + me * n * dim, g_p.layers[1].moe, dx_p.data(), arena, {}, &ex);
  expect_close(out_p.data(), out.data() + me * n * dim, n * dim, 1e-5, "output");
  expect_close(dx_p.data(), dx.data() + me * n * dim, n * dim, 1e-5, "input gradient");
  EXPECT_EQ(loss, 0.0);
  EXPECT_EQ(loss_p, 0.0);
  // Weight gradients: each expert's on its process; gate and shared experts summed.
  const MoeWeights& want = g.layers[1].moe;
  const MoeWeights& got = g_p.layers[1].moe;
  for (int64_t e = 0; e < c.n_routed_experts; ++e) {
    const Mat* pairs[][2] = {{&got.experts[size_t(e)].gate_proj, &want.experts[size_t(e)].gate_proj},
                             {&got.experts[size_t(e)].up_proj, &want.experts[size_t(e)].up_proj},
                             {&got.experts[size_t(e)].down_proj, &want.experts[size_t(e)].down_proj}};
    for (auto& [a, b] : pairs) {
      const bool here = e >= ex.first_expert() && e < ex.first_expert() + ex.experts_here();
      if (here) expect_close(a->as<float>(), b->as<float>(), a->numel(), 1e-5, "expert " + std::to_string(e));
      else
        for (int64_t i = 0; i < a->numel(); ++i) ASSERT_EQ(a->as<float>()[i], 0.0f) << "expert " << e << " is not here";
    }
  }
  for (const auto& [a, b] : {std::pair{&got.gate, &want.gate}, std::pair{&got.shared_experts.down_proj, &want.shared_experts.down_proj}}) {
    const auto summed = sum_over(world, a->as<float>(), a->numel());
    expect_close(summed.data(), b->as<float>(), a->numel(), 1e-5, "gate / shared expert");
  }
  if (P > 1) {
    EXPECT_GT(ex.rows_sent_away(), 0);
  }
}

// A whole training pass (MTP module included) over each process's sequences = one pass
// over all of them: the mean of the processes' losses, and their gradients summed / P.
TEST(ExpertParallel, TrainingPassEqualsOneProcess) {
  dist::Communicator& world = dist::world();
  const int64_t P = world.size(), me = world.rank();
  const ModelConfig c = small_config(4 * P);
  const ModelWeights w = random_weights(c, 11);
  const int64_t B = 2, S = 8;  // per process
  std::mt19937_64 rng(5);
  std::vector<int32_t> tokens(size_t(P * B * S)), targets(tokens.size());
  for (auto& t : tokens) t = int32_t(rng() % uint64_t(c.vocab_size));
  for (auto& t : targets) t = int32_t(rng() % uint64_t(c.vocab_size));
  TrainingPass<float> whole(c, {0.3, 0.001, {}});
  const double loss = whole.forward(w, tokens.data(), targets.data(), P * B, S);
  ModelWeights g = allocate_weights(c, DType::f32, MtpTying::tied);
  whole.backward(w, g);
  CommExpertExchange ex(world, c.n_routed_experts);
  TrainingPass<float> part(c, {0.3, 0.001, {}});
  part.set_expert_exchange(&ex);
  const double loss_p = part.forward(w, tokens.data() + me * B * S, targets.data() + me * B * S, B, S);
  ModelWeights g_p = allocate_weights(c, DType::f32, MtpTying::tied);
  part.backward(w, g_p);
  std::vector<double> l{loss_p};
  world.all_reduce(std::span<double>(l));
  EXPECT_NEAR(l[0] / double(P), loss, 1e-5 * std::max(1.0, std::fabs(loss)));
  const auto summed = sum_over(world, g_p.flat.as<float>().data(), g_p.flat.numel);
  std::vector<float> mean(summed.size());
  for (size_t i = 0; i < mean.size(); ++i) mean[i] = summed[i] / float(P);
  expect_close(mean.data(), g.flat.as<float>().data(), g.flat.numel, 2e-5, "gradient");
}

TEST(ExpertParallel, ExpertsMustSplitEvenly) {
  dist::Communicator& world = dist::world();
  if (world.size() == 1) GTEST_SKIP() << "one process: every count divides";
  EXPECT_THROW(CommExpertExchange(world, 2 * world.size() + 1), Error);
}

TEST(ExpertParallel, RegroupingIsAPermutation) {
  ExpertRoute r;
  r.recv = {2, 0, 1, 1, 3, 0};  // 3 processes x 2 experts
  order_by_expert(r, 3, 2);
  // Source-major rows: p0 e0 {0,1}; p1 e0 {2}, e1 {3}; p2 e0 {4,5,6}. Expert-major: e0 from
  // p0, p1, p2, then e1 from p1.
  EXPECT_EQ(r.to_expert, (std::vector<int64_t>{0, 1, 2, 4, 5, 6, 3}));
  EXPECT_EQ(r.offset, (std::vector<int64_t>{0, 6, 7}));
  for (size_t i = 0; i < r.to_expert.size(); ++i) EXPECT_EQ(r.to_source[size_t(r.to_expert[i])], int64_t(i));
}

}  // namespace
}  // namespace dsv3
