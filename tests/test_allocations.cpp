// No allocation inside a step (issue 11, "allocate once"): once a pass of a given shape has
// run, the next one takes every activation, record and scratch buffer from memory it already
// holds — the model's arena and records, and the backend's per-thread workspaces. This
// program replaces the global operator new to count allocations, so it is a test binary of
// its own.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <new>
#include <random>
#include <vector>

#include "golden_util.h"
#include "infer/batch.h"
#include "model/training.h"
#include "model/transformer.h"
#include "train/trainer.h"

namespace {
std::atomic<int64_t> g_allocations{0};
// A thread the backend starts using only later (its count follows the machine's load, see
// backend/cpu/threads.h) sizes its own workspaces on first use: that is not a step's
// allocation, so the count stays fixed here.
const bool g_fixed_threads = setenv("DSV3_ADAPT_THREADS", "0", 1) == 0;
}  // namespace

// The replacements below pair malloc / aligned_alloc with free, which GCC cannot see.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"

// Every form of operator new goes through these two (the others forward to them in
// libstdc++; the aligned and nothrow forms are replaced too, to be sure).
// DSV3_ALLOC_TRAP=1: stop at the first allocation inside a counted region (for a debugger).
std::atomic<bool> g_trap{false};

void* operator new(size_t n) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (g_trap.load(std::memory_order_relaxed)) __builtin_trap();
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new[](size_t n) { return operator new(n); }
void* operator new(size_t n, const std::nothrow_t&) noexcept {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  return std::malloc(n ? n : 1);
}
void* operator new[](size_t n, const std::nothrow_t& t) noexcept { return operator new(n, t); }
void* operator new(size_t n, std::align_val_t a) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  const size_t align = std::max(size_t(a), sizeof(void*));
  if (void* p = std::aligned_alloc(align, (std::max<size_t>(n, 1) + align - 1) / align * align)) return p;
  throw std::bad_alloc();
}
void* operator new[](size_t n, std::align_val_t a) { return operator new(n, a); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t, std::align_val_t) noexcept { std::free(p); }

namespace dsv3 {
namespace {

// Allocations made by f().
template <typename F>
int64_t allocations_in(F&& f) {
  const int64_t before = g_allocations.load();
  g_trap = std::getenv("DSV3_ALLOC_TRAP") != nullptr;
  f();
  g_trap = false;
  return g_allocations.load() - before;
}

TEST(Allocations, CounterSeesAVector) {  // the hook works: a test that can fail
  if (std::getenv("DSV3_ALLOC_TRAP")) GTEST_SKIP();
  EXPECT_GE(allocations_in([] { std::vector<int> v(1000); }), 1);
}

// Decoding: after a prompt, each one-token step (MoE routing, absorbed or naive attention
// over a growing cache, BF16 or FP8 weights) allocates nothing.
TEST(Allocations, DecodeStepsAllocateNothing) {
  for (const char* name : {"tiny-v3-bf16", "tiny-v3-fp8", "tiny-v2lite-bf16"})
    for (AttnForm form : {AttnForm::absorbed, AttnForm::naive, AttnForm::automatic}) {
      Transformer model(test::golden_dir(name));
      model.attn_form = form;
      const ModelConfig& c = model.config();
      KvCache cache(c, 64);
      std::vector<int32_t> prompt(40);
      for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = int32_t(2 + (7 * i) % (c.vocab_size - 2));
      std::vector<float> logits(size_t(prompt.size() * c.vocab_size));
      model.forward(prompt.data(), int64_t(prompt.size()), cache, logits.data(), true);  // sizes every buffer
      cache.truncate(8);  // decode from position 8: the prompt's buffers cover every later step
      int32_t token = 5;
      model.forward(&token, 1, cache, logits.data(), false);
      const int64_t n = allocations_in([&] {
        for (int step = 0; step < 16; ++step) {
          model.forward(&token, 1, cache, logits.data(), false);
          token = int32_t(2 + (token * 13 + step) % (c.vocab_size - 2));
        }
      });
      EXPECT_EQ(n, 0) << name << (form == AttnForm::absorbed ? " absorbed" : form == AttnForm::naive ? " naive" : " auto");
    }
}

// Batched decoding: once its sequences are reading no prompt, a BatchEngine step (one
// forward over every sequence's next token, sampling each) allocates nothing.
TEST(Allocations, BatchStepsAllocateNothing) {
  Transformer model(test::golden_dir("tiny-v3-bf16"));
  GenerateOptions opt;
  opt.max_tokens = 40;
  opt.stop_at_eos = false;
  BatchEngine engine(model, 3, 64, 64);
  for (int s = 0; s < 3; ++s) {
    std::vector<int32_t> prompt(size_t(6 + 5 * s));
    for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = int32_t(2 + (7 * i + s) % 400);
    engine.add(prompt, opt);
  }
  for (int i = 0; i < 4; ++i) engine.step();  // prompts read, buffers sized
  const int64_t n = allocations_in([&] {
    for (int i = 0; i < 16; ++i) engine.step();
  });
  EXPECT_EQ(n, 0);
}

// Speculative sequences in the batch (drafts chained by the MTP module, checks, rollbacks)
// allocate nothing either once running.
TEST(Allocations, SpeculativeBatchStepsAllocateNothing) {
  Transformer model(test::golden_dir("tiny-v3-bf16"));
  GenerateOptions opt;
  opt.max_tokens = 40;
  opt.stop_at_eos = false;
  opt.speculative_mtp = true;
  opt.draft = 3;
  BatchEngine engine(model, 3, 64, 64);
  for (int s = 0; s < 3; ++s) {
    std::vector<int32_t> prompt(size_t(6 + 5 * s));
    for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = int32_t(2 + (7 * i + s) % 400);
    engine.add(prompt, opt);
  }
  for (int i = 0; i < 4; ++i) engine.step();  // prompts read, buffers sized
  const int64_t n = allocations_in([&] {
    for (int i = 0; i < 8; ++i) engine.step();
  });
  EXPECT_EQ(n, 0);
}

// A prefill of the same length again allocates nothing either.
TEST(Allocations, RepeatedPrefillAllocatesNothing) {
  Transformer model(test::golden_dir("tiny-v3-fp8"));
  const ModelConfig& c = model.config();
  KvCache cache(c, 64);
  std::vector<int32_t> prompt(24, 7);
  std::vector<float> logits(size_t(prompt.size() * c.vocab_size));
  model.forward(prompt.data(), int64_t(prompt.size()), cache, logits.data(), true);
  cache.clear();
  EXPECT_EQ(allocations_in([&] {
              model.forward(prompt.data(), int64_t(prompt.size()), cache, logits.data(), true);
            }),
            0);
}

// Training: from the third forward and backward of a batch shape on (MoE with the balance loss, MTP,
// every precision's GEMMs and activation caches) allocate nothing.
TEST(Allocations, TrainingStepAllocatesNothing) {
  Transformer loaded(test::golden_dir("tiny-v3-bf16"));
  const ModelConfig& c = loaded.config();
  ModelWeights w = allocate_weights(c, DType::f32), g = allocate_weights(c, DType::f32);
  convert_weights(c, loaded.weights(), w);
  tie_mtp_shared(w), tie_mtp_shared(g);
  const int64_t B = 2, S = 24;
  std::mt19937 rng(7);
  std::vector<int32_t> tokens(size_t(B * S)), targets(size_t(B * S));
  for (auto& t : tokens) t = int32_t(rng() % uint32_t(c.vocab_size));
  for (size_t i = 0; i < tokens.size(); ++i) targets[i] = i + 1 < tokens.size() ? tokens[i + 1] : -1;
  for (GemmPrecision p : {GemmPrecision::fp32, GemmPrecision::bf16, GemmPrecision::fp8}) {
    TrainingLoss loss{.mtp_weight = 0.3, .alpha = 1e-4, .linear = {}};
    loss.linear.precision = p;
    TrainingPass<float> pass(c, loss);
    auto step = [&] {
      pass.forward(w, tokens.data(), targets.data(), B, S);
      pass.backward(w, g);
    };
    step();  // sizes the records, workspaces and the arena's blocks
    step();  // the arena merges its blocks into one (Arena::reset)
    EXPECT_EQ(allocations_in(step), 0) << gemm_precision_name(p);
  }
}

// The whole optimizer step of the trainer: batch, forward, backward, clipping, AdamW (BF16
// moments), the bias update and the metrics.
TEST(Allocations, TrainerStepAllocatesNothing) {
  const char* config = R"({"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
    "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4, "v_head_dim": 8, "kv_lora_rank": 16, "q_lora_rank": 16, "max_position_embeddings": 128,
    "rope_theta": 10000, "first_k_dense_replace": 1, "n_routed_experts": 8, "num_experts_per_tok": 2,
    "n_shared_experts": 1, "n_group": 2, "topk_group": 1, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
    "norm_topk_prob": true, "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 1, "rms_norm_eps": 1e-6,
    "bos_token_id": 0, "eos_token_id": 1})";
  std::vector<uint32_t> tokens(4096);
  std::mt19937 rng(3);
  for (auto& t : tokens) t = 2 + rng() % 62;
  for (GemmPrecision p : {GemmPrecision::fp32, GemmPrecision::fp8}) {
    TrainOptions opt;
    opt.steps = 100, opt.batch = 4, opt.seq = 32, opt.eval_every = 0, opt.save_every = 0;
    opt.linear.precision = p;
    Trainer t(config, opt, {std::span<const uint32_t>(tokens)}, {}, ::testing::TempDir() + "/alloc-run");
    t.step(), t.step();  // the first step sizes every buffer, the second merges the arena's blocks
    // Then 20 steps over other batches, routed differently: what a step holds is sized by
    // (B, S) and the config, not by where the router sends the tokens.
    EXPECT_EQ(allocations_in([&] {
                for (int i = 0; i < 20; ++i) t.step();
              }),
              0)
        << gemm_precision_name(p);
  }
}

}  // namespace
}  // namespace dsv3
