// Finite-difference gradient checks in double precision for every module with a backward
// pass (RMSNorm, SwiGLU, softmax, cross-entropy, the MLP, MLA with and without the query
// low-rank path and with YaRN, MoE with sigmoid group-limited routing and with softmax
// routing) and for the whole model. Each module's loss is sum(out * R) for a fixed random
// R, so its backward is called with dout = R.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <numeric>
#include <random>

#include "backend/ops.h"
#include "model/training.h"

namespace dsv3 {
namespace {

std::mt19937 rng(1234);

std::vector<double> random_vec(size_t n, double scale = 1.0) {
  std::normal_distribution<double> d(0.0, scale);
  std::vector<double> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Compares grad[i] with the central difference of loss() for the entry of largest |grad|
// and `samples` random entries of the n values at p.
void check(const std::string& what, double* p, const double* grad, int64_t n, const std::function<double()>& loss,
           int samples = 4) {
  std::vector<int64_t> entries;
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (std::abs(grad[i]) > std::abs(grad[best])) best = i;
  entries.push_back(best);
  for (int s = 0; s < samples; ++s) entries.push_back(int64_t(rng() % uint64_t(n)));
  for (int64_t i : entries) {
    const double h = 1e-6 * std::max(1.0, std::abs(p[i])), keep = p[i];
    p[i] = keep + h;
    const double up = loss();
    p[i] = keep - h;
    const double down = loss();
    p[i] = keep;
    const double fd = (up - down) / (2 * h);
    EXPECT_NEAR(grad[i], fd, 1e-6 * std::max(1.0, std::abs(fd))) << what << " entry " << i;
  }
}

// The routing variants the gradient checks cover: DeepSeek-V3's (sigmoid, noaux_tc groups,
// normalised top-k), V2's (softmax, greedy or group-limited), and the two other
// combinations of score function and normalisation.
enum class Routing { sigmoid_grouped_norm, softmax_greedy, sigmoid_plain, softmax_group_limited_norm };

// mtp_depths: num_nextn_predict_layers.
ModelConfig tiny_config(bool q_lora, Routing routing, int mtp_depths = 1) {
  std::string j = R"({"vocab_size": 37, "hidden_size": 24, "intermediate_size": 40, "moe_intermediate_size": 12,
    "num_hidden_layers": 2, "num_attention_heads": 2, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
    "v_head_dim": 6, "kv_lora_rank": 10, "max_position_embeddings": 64, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 4, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 0.8, "mscale_all_dim": 0.8},
    "first_k_dense_replace": 1, "n_routed_experts": 8, "num_experts_per_tok": 3, "n_shared_experts": 1,
    "rms_norm_eps": 1e-6, )";
  j += R"("num_nextn_predict_layers": )" + std::to_string(mtp_depths) + ", ";
  j += q_lora ? R"("q_lora_rank": 14, )" : R"("q_lora_rank": null, )";
  switch (routing) {
    case Routing::sigmoid_grouped_norm:
      j += R"("scoring_func": "sigmoid", "topk_method": "noaux_tc", "n_group": 4, "topk_group": 2,
              "norm_topk_prob": true, "routed_scaling_factor": 2.5})";
      break;
    case Routing::softmax_greedy:
      j += R"("scoring_func": "softmax", "topk_method": "greedy", "n_group": 1, "topk_group": 1,
              "norm_topk_prob": false, "routed_scaling_factor": 1.0})";
      break;
    case Routing::sigmoid_plain:
      j += R"("scoring_func": "sigmoid", "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1,
              "norm_topk_prob": false, "routed_scaling_factor": 1.5})";
      break;
    case Routing::softmax_group_limited_norm:
      j += R"("scoring_func": "softmax", "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
              "norm_topk_prob": true, "routed_scaling_factor": 1.0})";
      break;
  }
  return ModelConfig::parse(j, "tiny config");
}

// Random double weights: matrices ~ N(0, 0.2), norms ~ 1 + N(0, 0.1), router bias ~ N(0, 0.1).
ModelWeights random_weights(const ModelConfig& c) {
  ModelWeights w = allocate_weights(c, DType::f64);
  for (const TensorSlot& s : list_tensors(c, w)) {
    double* p = mutable_data<double>(*s.mat);
    const bool vector = s.shape.size() == 1;
    const auto v = random_vec(size_t(s.mat->numel()), vector ? 0.1 : 0.2);
    for (int64_t i = 0; i < s.mat->numel(); ++i) p[i] = v[size_t(i)] + (vector && s.trainable ? 1.0 : 0.0);
  }
  return w;
}

// MoE step 2: slots grouped by expert, in token order within each, and a refill of the same
// Dispatch keeps nothing of the last one.
TEST(MoeDispatch, GroupsSlotsByExpertInTokenOrder) {
  Dispatch d;
  dispatch({2, 0, 0, 1, 2, 1}, 3, 2, d);  // tokens 0, 1, 2 choose {2, 0}, {0, 1}, {2, 1}
  EXPECT_EQ(d.offset, (std::vector<int64_t>{0, 2, 4, 6}));
  EXPECT_EQ(d.slot, (std::vector<int64_t>{1, 2, 3, 5, 0, 4}));
  EXPECT_EQ(d.token, (std::vector<int64_t>{0, 1, 1, 2, 0, 2}));
  dispatch({1, 2}, 3, 2, d);
  EXPECT_EQ(d.offset, (std::vector<int64_t>{0, 0, 1, 2}));
  EXPECT_EQ(d.slot, (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(d.token, (std::vector<int64_t>{0, 0}));
}

TEST(GradCheck, Ops) {
  const int64_t n = 3, dim = 7;
  auto x = random_vec(n * dim), w = random_vec(dim), r = random_vec(n * dim);
  std::vector<double> y(x.size()), inv(n), dx(x.size(), 0), dw(dim, 0);
  auto rms_loss = [&] {
    rmsnorm_forward(x.data(), w.data(), y.data(), inv.data(), n, dim, 1e-6);
    return dot(y, r);
  };
  rms_loss();
  rmsnorm_backward(r.data(), x.data(), w.data(), inv.data(), dx.data(), dw.data(), n, dim);
  check("rmsnorm dx", x.data(), dx.data(), n * dim, rms_loss);
  check("rmsnorm dw", w.data(), dw.data(), dim, rms_loss);

  auto a = random_vec(n * dim), b = random_vec(n * dim);
  std::vector<double> da(a.size()), db(b.size());
  auto swiglu_loss = [&] {
    swiglu_forward(a.data(), b.data(), y.data(), n * dim);
    return dot(y, r);
  };
  swiglu_backward(r.data(), a.data(), b.data(), da.data(), db.data(), n * dim);
  check("swiglu da", a.data(), da.data(), n * dim, swiglu_loss);
  check("swiglu db", b.data(), db.data(), n * dim, swiglu_loss);

  auto z = random_vec(dim);
  std::vector<double> p(dim), ds(dim);
  auto softmax_loss = [&] {
    p = z;
    softmax_forward(p.data(), dim);
    return dot(p, std::vector<double>(r.begin(), r.begin() + dim));
  };
  softmax_loss();
  softmax_backward(p.data(), r.data(), ds.data(), dim);
  check("softmax", z.data(), ds.data(), dim, softmax_loss);

  const int64_t vocab = 5;
  auto logits = random_vec(n * vocab);
  const int32_t targets[n] = {2, -1, 4};
  std::vector<double> dlogits(logits.size());
  cross_entropy(logits.data(), targets, n, vocab, dlogits.data());
  check("cross_entropy", logits.data(), dlogits.data(), n * vocab,
        [&] { return cross_entropy<double>(logits.data(), targets, n, vocab, nullptr); });
}

// Checks every parameter of `tensors` (samples per tensor) and the input x.
void check_module(const std::string& what, const ModelConfig& c, ModelWeights& w, ModelWeights& g,
                  const std::vector<TensorSlot>& params, const std::vector<TensorSlot>& grads, std::vector<double>& x,
                  const std::vector<double>& dx, const std::function<double()>& loss) {
  check(what + " input", x.data(), dx.data(), int64_t(x.size()), loss);
  for (size_t i = 0; i < params.size(); ++i) {
    if (!params[i].trainable) continue;
    check(what + " " + params[i].name, mutable_data<double>(*params[i].mat), grads[i].mat->as<double>(),
          params[i].mat->numel(), loss, 2);
  }
}

// The slots of one layer's tensors (names contain "layers.<l>.<part>").
std::vector<TensorSlot> part_of(const ModelConfig& c, ModelWeights& w, const std::string& prefix) {
  std::vector<TensorSlot> out;
  for (const TensorSlot& s : list_tensors(c, w))
    if (s.name.rfind(prefix, 0) == 0) out.push_back(s);
  return out;
}

class ModuleGradCheck : public testing::TestWithParam<std::tuple<bool, Routing>> {};

TEST_P(ModuleGradCheck, MlaMlpMoe) {
  const auto [q_lora, routing] = GetParam();
  const ModelConfig c = tiny_config(q_lora, routing);
  ModelWeights w = random_weights(c), g = allocate_weights(c, DType::f64);
  const Rope rope = Rope::from_config(c);
  const int64_t B = 2, S = 6, N = B * S, dim = c.hidden_size;  // S > original context: YaRN active
  auto x = random_vec(size_t(N * dim)), r = random_vec(size_t(N * dim));
  std::vector<double> out(x.size()), dx(x.size());

  {  // MLA of layer 0
    const TokenRows rows = TokenRows::windows(B, S);
    RopeAngles angles;
    rope.angles(rows.pos, angles);
    const MlaContext ctx{c, angles, AttnForm::naive};
    MlaRecord<double> a;
    Arena arena;
    auto loss = [&] {
      mla_forward<double>(ctx, w.layers[0].self_attn, x.data(), rows, {}, arena, out.data(), &a);
      return dot(out, r);
    };
    loss();
    std::fill(dx.begin(), dx.end(), 0.0);
    mla_backward<double>(ctx, w.layers[0].self_attn, x.data(), rows, a, r.data(), g.layers[0].self_attn, dx.data(),
                         arena);
    check_module("mla", c, w, g, part_of(c, w, "model.layers.0.self_attn."), part_of(c, g, "model.layers.0.self_attn."),
                 x, dx, loss);
  }
  {  // dense MLP of layer 0
    MlpRecord<double> a;
    Arena arena;
    auto loss = [&] {
      mlp_forward<double>(w.layers[0].mlp, x.data(), N, arena, out.data(), {}, &a);
      return dot(out, r);
    };
    loss();
    std::fill(dx.begin(), dx.end(), 0.0);
    mlp_backward<double>(w.layers[0].mlp, x.data(), N, a, r.data(), g.layers[0].mlp, dx.data(), arena);
    check_module("mlp", c, w, g, part_of(c, w, "model.layers.0.mlp."), part_of(c, g, "model.layers.0.mlp."), x, dx, loss);
  }
  {  // MoE of layer 1, with the balance loss over sequences of 4 tokens whose last one is an
     // MTP placeholder (counted neither in the loss nor in the loads)
    MoeRecord<double> a;
    Arena arena;
    const BalanceLoss balance{.seq_len = 4, .alpha = 0.05, .ignored_tail = 1};
    double balance_loss = 0;
    auto loss = [&] {
      balance_loss = moe_forward<double>(c, w.layers[1].moe, x.data(), N, arena, out.data(), {}, &a, balance);
      return dot(out, r) + balance_loss;
    };
    loss();
    EXPECT_GT(balance_loss, 0);
    std::vector<int64_t> load(size_t(c.n_routed_experts), 0);
    for (int64_t t = 0; t < N; ++t)
      if (t % 4 != 3)
        for (int64_t j = 0; j < c.num_experts_per_tok; ++j) ++load[size_t(a.state.routing.experts[size_t(t * c.num_experts_per_tok + j)])];
    EXPECT_EQ(a.load, load);
    std::fill(dx.begin(), dx.end(), 0.0);
    moe_backward<double>(c, w.layers[1].moe, x.data(), N, a, r.data(), g.layers[1].moe, dx.data(), arena);
    check_module("moe", c, w, g, part_of(c, w, "model.layers.1.mlp."), part_of(c, g, "model.layers.1.mlp."), x, dx, loss);
    // The placeholders' routing does not reach the balance loss.
    const double before = balance_loss;
    for (int64_t t = 3; t < N; t += 4)
      for (int64_t d = 0; d < dim; ++d) x[size_t(t * dim + d)] = -x[size_t(t * dim + d)] * 3;
    loss();
    EXPECT_EQ(balance_loss, before);
  }
}

// The whole model with DeepSeek-V3's full objective: next-token loss, the MTP module (its
// embedding and head shared with the main model) and the sequence-wise balance loss.
TEST_P(ModuleGradCheck, WholeModel) {
  const auto [q_lora, routing] = GetParam();
  // Two MTP depths in two of the variants: depth 2 takes depth 1's output.
  const int depths = routing == Routing::sigmoid_plain || routing == Routing::softmax_group_limited_norm ? 2 : 1;
  const ModelConfig c = tiny_config(q_lora, routing, depths);
  ModelWeights w = random_weights(c), g = allocate_weights(c, DType::f64);
  tie_mtp_shared(w);
  tie_mtp_shared(g);
  const int64_t B = 2, S = 7;
  std::vector<int32_t> tokens(B * S), targets(B * S);
  for (auto& t : tokens) t = int32_t(rng() % uint32_t(c.vocab_size));
  for (int64_t i = 0; i < B * S; ++i) targets[size_t(i)] = (i % S == S - 1) ? -1 : tokens[size_t(i + 1)];
  TrainingPass<double> pass(c, {.mtp_weight = 0.3, .alpha = 0.05, .linear = {}});
  auto loss = [&] { return pass.forward(w, tokens.data(), targets.data(), B, S); };
  loss();
  EXPECT_GT(pass.mtp_loss(), 0);
  EXPECT_GT(pass.balance_loss(), 0);
  // Expert loads: every token of the MoE layer; at MTP depth d all but the d placeholders.
  const auto loads = pass.expert_loads();
  ASSERT_EQ(loads.size(), size_t(c.num_hidden_layers + depths));
  auto total = [](const std::vector<int64_t>& l) { return std::accumulate(l.begin(), l.end(), int64_t(0)); };
  EXPECT_EQ(total(loads[1]), B * S * c.num_experts_per_tok);
  for (int d = 1; d <= depths; ++d) EXPECT_EQ(total(loads[size_t(c.num_hidden_layers + d - 1)]), B * (S - d) * c.num_experts_per_tok);
  pass.backward(w, g);
  const auto params = list_tensors(c, w), grads = list_tensors(c, g);
  for (size_t i = 0; i < params.size(); ++i) {
    if (!params[i].trainable) continue;
    check(params[i].name, mutable_data<double>(*params[i].mat), grads[i].mat->as<double>(), params[i].mat->numel(),
          loss, 2);
  }
}

std::string variant_name(const testing::TestParamInfo<std::tuple<bool, Routing>>& info) {
  static const char* kNames[] = {"_sigmoid_grouped_norm", "_softmax_greedy", "_sigmoid_plain",
                                 "_softmax_group_limited_norm"};
  return std::string(std::get<0>(info.param) ? "q_lora" : "q_proj") + kNames[int(std::get<1>(info.param))];
}

INSTANTIATE_TEST_SUITE_P(Variants, ModuleGradCheck,
                         testing::Combine(testing::Bool(),
                                          testing::Values(Routing::sigmoid_grouped_norm, Routing::softmax_greedy,
                                                          Routing::sigmoid_plain, Routing::softmax_group_limited_norm)),
                         variant_name);

}  // namespace
}  // namespace dsv3
