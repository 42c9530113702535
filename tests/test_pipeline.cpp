// Pipeline stages and micro-batches in one process (train/pipeline.h): the stages of a
// split model compose to the whole training pass bit for bit (the stage boundary is the
// residual stream, sent unchanged), and micro-batches accumulate to the whole batch's
// gradient up to the order of float sums. The pipeline over several processes is checked
// under mpirun (tests/dist/train_pipeline.sh).
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "core/error.h"
#include "model/training.h"
#include "train/adamw.h"
#include "train/pipeline.h"
#include "train/trainer.h"

namespace dsv3 {
namespace {

const char* kConfig = R"({"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
  "num_hidden_layers": 4, "num_attention_heads": 2, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
  "kv_lora_rank": 16, "q_lora_rank": 16, "max_position_embeddings": 128, "rope_theta": 10000,
  "first_k_dense_replace": 1, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1,
  "n_group": 2, "topk_group": 1, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": true,
  "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 1, "rms_norm_eps": 1e-6, "bos_token_id": 0,
  "eos_token_id": 1})";

struct Batch {
  std::vector<int32_t> tokens, targets;
  std::vector<int64_t> lengths;
};

Batch random_batch(int64_t B, int64_t S, uint32_t seed) {
  std::mt19937 rng(seed);
  Batch b;
  for (int64_t i = 0; i < B * S; ++i) b.tokens.push_back(int32_t(2 + rng() % 62)), b.targets.push_back(int32_t(2 + rng() % 62));
  b.lengths.assign(size_t(B), S);
  return b;
}

std::vector<float> flat(const ModelWeights& w) {
  const auto s = w.flat.as<float>();
  return {s.begin(), s.end()};
}

class PipelineTest : public testing::Test {
 protected:
  PipelineTest() : c_(ModelConfig::parse(kConfig, "test")), w_(allocate_weights(c_, DType::f32, MtpTying::tied)) {
    init_weights(c_, w_, 0.05, 7);
  }
  ModelConfig c_;
  ModelWeights w_;
  TrainingLoss loss_{0.3, 0.01, {}};
};

TEST_F(PipelineTest, StagesComposeToTheWholePassBitForBit) {
  const int64_t B = 2, S = 12;
  const Batch b = random_batch(B, S, 3);
  // The whole model, the MTP modules' embedding gradient kept apart.
  TrainingPass<float> whole(c_, loss_);
  ModelWeights g = allocate_weights(c_, DType::f32, MtpTying::tied);
  std::vector<float> e(size_t(c_.vocab_size * c_.hidden_size), 0.0f);
  Mat e_mat;
  e_mat.rows = c_.vocab_size, e_mat.cols = c_.hidden_size, e_mat.data = reinterpret_cast<const uint8_t*>(e.data());
  const double loss = whole.forward(w_, b.tokens.data(), b.targets.data(), B, S, b.lengths.data());
  whole.backward(w_, g, nullptr, &e_mat);

  for (int P : {2, 3, 4}) {
    std::vector<std::unique_ptr<TrainingPass<float>>> stages;
    std::vector<ModelWeights> grads;
    for (int s = 0; s < P; ++s) {
      stages.push_back(std::make_unique<TrainingPass<float>>(c_, loss_, Pipeline::stage_layers(c_, P, s)));
      grads.push_back(allocate_weights(c_, DType::f32, MtpTying::tied));
    }
    double balance = 0, staged = 0;
    for (int s = 0; s < P; ++s) {
      const float* in = s == 0 ? nullptr : stages[size_t(s - 1)]->stage_output().data();
      const double r = stages[size_t(s)]->forward(w_, b.tokens.data(), b.targets.data(), B, S, b.lengths.data(), in);
      (s + 1 < P ? balance : staged) += r;
    }
    EXPECT_EQ(stages.back()->main_loss(), whole.main_loss()) << P << " stages";
    EXPECT_EQ(stages.back()->mtp_loss(), whole.mtp_loss()) << P << " stages";
    EXPECT_NEAR(staged + balance, loss, 1e-12) << P << " stages";
    // Expert loads: each stage's layers, zeros elsewhere, adding up to the whole pass's.
    for (size_t l = 0; l < whole.expert_loads().size(); ++l)
      for (size_t x = 0; x < whole.expert_loads()[l].size(); ++x) {
        int64_t sum = 0;
        for (const auto& st : stages) sum += st->expert_loads()[l][x];
        EXPECT_EQ(sum, whole.expert_loads()[l][x]) << "layer " << l;
      }
    std::vector<float> e_staged(e.size(), 0.0f);
    Mat es = e_mat;
    es.data = reinterpret_cast<const uint8_t*>(e_staged.data());
    for (int s = P - 1; s >= 0; --s) {
      const float* out_grad = s + 1 < P ? stages[size_t(s + 1)]->input_grad().data() : nullptr;
      stages[size_t(s)]->backward(w_, grads[size_t(s)], out_grad, &es);
    }
    // Every element has one stage computing it: the sum over stages is the whole gradient.
    std::vector<float> sum(size_t(g.flat.numel), 0.0f);
    for (const ModelWeights& gs : grads) {
      const auto x = gs.flat.as<float>();
      for (size_t i = 0; i < sum.size(); ++i) sum[i] += x[i];
    }
    EXPECT_EQ(sum, flat(g)) << P << " stages";
    EXPECT_EQ(e_staged, e) << P << " stages";
  }
}

TEST_F(PipelineTest, StagesAreChecked) {
  EXPECT_THROW(TrainingPass<float>(c_, loss_, {2, 2}), Error);
  EXPECT_THROW(TrainingPass<float>(c_, loss_, {0, 5}), Error);
  TrainingPass<float> middle(c_, loss_, {1, 3});
  const Batch b = random_batch(1, 4, 1);
  EXPECT_THROW(middle.forward(w_, b.tokens.data(), b.targets.data(), 1, 4), Error);  // no input
  EXPECT_THROW(Pipeline(c_, loss_, nullptr, "1f1b", 0), Error);
  // Stages of 4 layers: as even as can be, the first ones one more.
  EXPECT_EQ(Pipeline::stage_layers(c_, 3, 0).begin, 0);
  EXPECT_EQ(Pipeline::stage_layers(c_, 3, 0).end, 2);
  EXPECT_EQ(Pipeline::stage_layers(c_, 3, 1).end, 3);
  EXPECT_EQ(Pipeline::stage_layers(c_, 3, 2).end, 4);
}

TEST_F(PipelineTest, MicroBatchesAccumulateTheBatchGradient) {
  const int64_t B = 4, S = 10;
  const Batch b = random_batch(B, S, 5);
  auto run = [&](int M, ModelWeights& g) {
    Pipeline pipe(c_, loss_, nullptr, "1f1b", M);
    std::vector<MicroBatch> micro;
    const int64_t per = B / M;
    for (int j = 0; j < M; ++j)
      micro.push_back({b.tokens.data() + j * per * S, b.targets.data() + j * per * S, b.lengths.data() + j * per, per, S});
    PipelineResult r = pipe.run(w_, micro, g);
    return r;
  };
  ModelWeights g1 = allocate_weights(c_, DType::f32, MtpTying::tied), g4 = allocate_weights(c_, DType::f32, MtpTying::tied);
  const PipelineResult one = run(1, g1), four = run(4, g4);
  // The mean over micro-batches of their mean losses: the batch's mean (all targets counted).
  EXPECT_NEAR(four.loss, one.loss, 1e-6 * one.loss);
  EXPECT_NEAR(four.mtp_loss, one.mtp_loss, 1e-6 * one.mtp_loss);
  for (size_t l = 0; l < one.loads.size(); ++l) EXPECT_EQ(four.loads[l], one.loads[l]) << "layer " << l;
  const std::vector<float> a = flat(g1), c = flat(g4);
  double diff = 0, norm = 0;
  for (size_t i = 0; i < a.size(); ++i) diff += (a[i] - c[i]) * double(a[i] - c[i]), norm += double(a[i]) * a[i];
  // The balance loss is per sequence and every micro-batch has whole sequences: the same
  // objective, summed in another order.
  EXPECT_LT(std::sqrt(diff / norm), 1e-5);
  EXPECT_GT(norm, 0);
  EXPECT_LT(four.activation_bytes, one.activation_bytes);  // a quarter of the batch at a time
}

}  // namespace
}  // namespace dsv3
