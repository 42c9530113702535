// AdamW over flat buffers against a per-tensor reference written here in double (random
// parameters, gradients and three steps; float32 and BF16 moments), the gradient norm and
// clipping over the listed spans, zeroing, and the moments' names for checkpoints.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <set>
#include <string>

#include "core/dtype.h"
#include "core/error.h"
#include "train/adamw.h"

namespace dsv3 {
namespace {

// One dense and one MoE layer (with the noaux_tc bias, not trained), one MTP depth.
ModelConfig config() {
  return ModelConfig::parse(R"({"vocab_size": 37, "hidden_size": 24, "intermediate_size": 40,
  "moe_intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 2, "qk_nope_head_dim": 8,
  "qk_rope_head_dim": 4, "v_head_dim": 6, "kv_lora_rank": 10, "q_lora_rank": 14, "max_position_embeddings": 64,
  "rope_theta": 10000, "first_k_dense_replace": 1, "n_routed_experts": 4, "num_experts_per_tok": 2,
  "n_shared_experts": 1, "n_group": 2, "topk_group": 1, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
  "norm_topk_prob": true, "routed_scaling_factor": 2.5, "rms_norm_eps": 1e-6, "bos_token_id": 0,
  "eos_token_id": 1, "num_nextn_predict_layers": 1})",
                            "adamw test config");
}

// The whole allocation random, padding included (the update must leave the padding alone).
void fill(ModelWeights& w, std::mt19937& rng, float scale) {
  std::normal_distribution<float> normal(0.0f, scale);
  for (float& x : w.flat.as<float>()) x = normal(rng);
}

// The trainable tensors, each once (the tied MTP copies share the main model's storage).
std::vector<TensorSlot> unique_trainable(const ModelConfig& c, ModelWeights& w) {
  std::vector<TensorSlot> out;
  std::set<const uint8_t*> seen;
  for (const TensorSlot& s : list_tensors(c, w))
    if (s.trainable && seen.insert(s.mat->data).second) out.push_back(s);
  return out;
}

void check_against_reference(bool bf16_moments) {
  const ModelConfig c = config();
  const AdamWConfig cfg{.beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1, .bf16_moments = bf16_moments};
  const double lr = 1e-2;
  ModelWeights params = allocate_weights(c, DType::f32, MtpTying::tied);
  ModelWeights grads = allocate_weights(c, DType::f32, MtpTying::tied);
  std::mt19937 rng(7);
  fill(params, rng, 1.0f);
  const std::vector<float> before(params.flat.as<float>().begin(), params.flat.as<float>().end());

  // The reference: per tensor, in double, from the tensor list.
  struct Ref {
    std::vector<double> w, m, v;
  };
  const auto slots = unique_trainable(c, params);
  const auto gslots = unique_trainable(c, grads);
  ASSERT_EQ(slots.size(), gslots.size());
  std::vector<Ref> ref(slots.size());
  for (size_t t = 0; t < slots.size(); ++t) {
    const float* p = slots[t].mat->as<float>();
    ref[t].w.assign(p, p + slots[t].mat->numel());
    ref[t].m.assign(ref[t].w.size(), 0.0), ref[t].v.assign(ref[t].w.size(), 0.0);
  }
  auto round = [&](double x) { return bf16_moments ? double(bf16_to_f32(f32_to_bf16(float(x)))) : double(float(x)); };

  AdamW opt(c, cfg);
  for (int64_t step = 1; step <= 3; ++step) {
    fill(grads, rng, 0.5f);
    const double bc1 = 1 - std::pow(cfg.beta1, double(step)), bc2 = 1 - std::pow(cfg.beta2, double(step));
    for (size_t t = 0; t < slots.size(); ++t) {
      const float* g = gslots[t].mat->as<float>();
      const double decay = slots[t].shape.size() == 2 ? 1 - lr * cfg.weight_decay : 1;  // matrices only
      Ref& r = ref[t];
      for (size_t i = 0; i < r.w.size(); ++i) {
        // The step uses the new moments before they are stored (rounded) for the next.
        const double m = cfg.beta1 * r.m[i] + (1 - cfg.beta1) * g[i];
        const double v = cfg.beta2 * r.v[i] + (1 - cfg.beta2) * double(g[i]) * g[i];
        r.w[i] = r.w[i] * decay - lr * (m / bc1) / (std::sqrt(v / bc2) + cfg.eps);
        r.m[i] = round(m), r.v[i] = round(v);
      }
    }
    opt.update(params, grads, lr, step);
  }

  // BF16 moments: the float and double sums can round to neighbouring BF16 values.
  const double tol = bf16_moments ? 0.02 * lr : 1e-6;
  for (size_t t = 0; t < slots.size(); ++t) {
    const float* p = slots[t].mat->as<float>();
    double worst = 0;
    for (size_t i = 0; i < ref[t].w.size(); ++i) worst = std::max(worst, std::abs(double(p[i]) - ref[t].w[i]));
    EXPECT_LE(worst, tol) << slots[t].name;
  }
  // Untouched: the router bias (moved by balancing, not gradients) and the padding.
  std::vector<bool> trained(before.size(), false);
  for (const TensorSlot& s : slots)
    for (int64_t i = 0; i < s.mat->numel(); ++i) trained[size_t(params.flat.offset_of(*s.mat) + i)] = true;
  int64_t untouched = 0;
  for (size_t i = 0; i < before.size(); ++i)
    if (!trained[i]) {
      EXPECT_EQ(params.flat.as<float>()[i], before[i]) << "element " << i;
      ++untouched;
    }
  EXPECT_GE(untouched, c.n_routed_experts * 2);  // the biases of the main and the MTP MoE layers

  // The moments for checkpoints: exp_avg / exp_avg_sq of each trained tensor, in list order.
  const auto state = opt.state(c);
  ASSERT_EQ(state.size(), 2 * slots.size());
  for (size_t t = 0; t < slots.size(); ++t) {
    EXPECT_EQ(state[2 * t].name, "exp_avg." + slots[t].name);
    EXPECT_EQ(state[2 * t + 1].name, "exp_avg_sq." + slots[t].name);
    EXPECT_EQ(state[2 * t].shape, slots[t].shape);
    for (size_t i = 0; i < ref[t].m.size(); i += 7)
      EXPECT_NEAR(state[2 * t].values[i], ref[t].m[i], bf16_moments ? 1e-2 * std::abs(ref[t].m[i]) + 1e-6 : 1e-6);
  }
}

TEST(AdamW, FlatUpdateEqualsPerTensorReferenceFp32Moments) { check_against_reference(false); }
TEST(AdamW, FlatUpdateEqualsPerTensorReferenceBf16Moments) { check_against_reference(true); }

TEST(AdamW, ClipAndZeroOverTheListedSpans) {
  const ModelConfig c = config();
  ModelWeights grads = allocate_weights(c, DType::f32, MtpTying::tied);
  std::mt19937 rng(11);
  fill(grads, rng, 1.0f);
  AdamW opt(c, {});
  const std::vector<FloatSpan> spans = opt.trainable_spans(grads);
  double ss = 0;
  int64_t n = 0;
  for (const TensorSlot& s : unique_trainable(c, grads))
    for (int64_t i = 0; i < s.mat->numel(); ++i) ss += double(s.mat->as<float>()[i]) * s.mat->as<float>()[i], ++n;
  int64_t listed = 0;
  for (const FloatSpan& s : spans) listed += s.n;
  EXPECT_EQ(listed, n);  // each trainable element once
  const double norm = clip_grad_norm(spans, 1.0);
  EXPECT_NEAR(norm, std::sqrt(ss), 1e-9 * std::sqrt(ss));
  EXPECT_NEAR(clip_grad_norm(spans, 0), 1.0, 1e-5);  // clipped to 1, and 0 = no clip
  zero_grads(grads);
  for (float x : grads.flat.as<float>()) ASSERT_EQ(x, 0.0f);
}

TEST(AdamW, RefusesWeightsLaidOutOtherwise) {
  const ModelConfig c = config();
  AdamW opt(c, {});
  ModelWeights copies = allocate_weights(c, DType::f32);  // the MTP copies laid out too
  ModelWeights tied = allocate_weights(c, DType::f32, MtpTying::tied);
  EXPECT_THROW(opt.update(copies, tied, 1e-3, 1), Error);
  EXPECT_THROW(opt.trainable_spans(copies), Error);
  ModelWeights unallocated(c);
  EXPECT_THROW(zero_grads(unallocated), Error);
}

}  // namespace
}  // namespace dsv3
