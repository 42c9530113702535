// The flat layout of allocated weights: one 64-byte-aligned allocation holding every tensor
// of the list in its order, no overlap, the MTP module's tied embedding and head laid out
// once; for_each_tensor only visits and refuses weights not shaped for the config.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>

#include "core/error.h"
#include "model/weights.h"

namespace dsv3 {
namespace {

// Two layers (one dense, one MoE with a noaux_tc bias), one or two MTP depths.
ModelConfig config(int64_t mtp_depths, bool tie_word_embeddings = false) {
  return ModelConfig::parse(
      cat(R"({"vocab_size": 37, "hidden_size": 24, "intermediate_size": 40, "moe_intermediate_size": 12,
  "num_hidden_layers": 2, "num_attention_heads": 2, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 6,
  "kv_lora_rank": 10, "q_lora_rank": 14, "max_position_embeddings": 64, "rope_theta": 10000,
  "first_k_dense_replace": 1, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
  "n_group": 2, "topk_group": 1, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": true,
  "routed_scaling_factor": 2.5, "rms_norm_eps": 1e-6, "bos_token_id": 0, "eos_token_id": 1,
  "num_nextn_predict_layers": )",
          mtp_depths, R"(, "tie_word_embeddings": )", tie_word_embeddings ? "true" : "false", "}"),
      "test config");
}

// Every tensor in the one range, in list order, each 64-byte aligned, none overlapping
// another; a tied copy is the main tensor (same bytes), and nothing else shares.
void expect_flat(const ModelConfig& c, ModelWeights& w, const FlatLayout& layout) {
  const FlatWeights& f = w.flat;
  ASSERT_NE(f.data, nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(f.data) % kFlatAlignment, 0u);
  EXPECT_EQ(f.numel, layout.numel);
  const auto slots = list_tensors(c, w);
  ASSERT_EQ(slots.size(), layout.tensors.size());
  int64_t end = 0;  // of the last tensor laid out
  for (size_t i = 0; i < slots.size(); ++i) {
    const TensorSlot& s = slots[i];
    const FlatTensor& t = layout.tensors[i];
    SCOPED_TRACE(s.name);
    EXPECT_EQ(t.name, s.name);
    EXPECT_EQ(t.numel, s.mat->numel());
    EXPECT_EQ(s.mat->dtype, f.dtype);
    EXPECT_EQ(f.offset_of(*s.mat), t.offset);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(s.mat->data) % kFlatAlignment, 0u);
    EXPECT_GE(t.offset, 0);
    EXPECT_LE(t.offset + t.numel, f.numel);
    if (t.tied) {
      EXPECT_EQ(s.mat->data, s.copy_of->data);
      EXPECT_LT(t.offset, end);
      continue;
    }
    EXPECT_GE(t.offset, end);  // after the one before: in list order, no overlap
    EXPECT_LT(t.offset - end, int64_t(kFlatAlignment / dtype_size(f.dtype)));  // only alignment padding
    end = t.offset + t.numel;
  }
  EXPECT_LE(f.numel - end, int64_t(kFlatAlignment / dtype_size(f.dtype)));
}

TEST(FlatWeights, EveryTensorInOneRangeInListOrder) {
  for (int64_t depths : {0, 1, 2})
    for (DType dtype : {DType::f32, DType::f64}) {
      SCOPED_TRACE(cat(depths, " MTP depths, ", dtype_name(dtype)));
      const ModelConfig c = config(depths);
      ModelWeights w = allocate_weights(c, dtype);
      const FlatLayout layout = flat_layout(c, dtype);
      expect_flat(c, w, layout);
      for (const FlatTensor& t : layout.tensors) EXPECT_FALSE(t.tied);  // copies: each its own
      // Zeroed, the padding too.
      int64_t nonzero = 0;
      for (uint8_t b : std::span<const uint8_t>(w.flat.data, w.flat.bytes())) nonzero += b != 0;
      EXPECT_EQ(nonzero, 0);
    }
}

TEST(FlatWeights, TiedMtpCopiesAreLaidOutOnce) {
  for (bool tie_word_embeddings : {false, true}) {
    SCOPED_TRACE(tie_word_embeddings ? "tie_word_embeddings" : "own lm_head");
    const ModelConfig c = config(2, tie_word_embeddings);
    ModelWeights w = allocate_weights(c, DType::f32, MtpTying::tied);
    const FlatLayout layout = flat_layout(c, DType::f32, MtpTying::tied);
    expect_flat(c, w, layout);
    const Mat& head = tie_word_embeddings ? w.embed_tokens : w.lm_head;
    for (const MtpWeights& m : w.mtp) {
      EXPECT_EQ(m.embed_tokens.data, w.embed_tokens.data);
      EXPECT_EQ(m.shared_head_head.data, head.data);
    }
    EXPECT_EQ(w.lm_head.data, head.data);
    // Exactly the copies' space less than the untied layout: no dead copies.
    const FlatLayout copies = flat_layout(c, DType::f32);
    int64_t tied = 0, copy_space = 0;
    for (size_t i = 0; i < layout.tensors.size(); ++i)
      if (layout.tensors[i].tied) {
        ++tied;
        const int64_t next = i + 1 < copies.tensors.size() ? copies.tensors[i + 1].offset : copies.numel;
        copy_space += next - copies.tensors[i].offset;
      }
    EXPECT_EQ(tied, 4);  // two depths, embedding and head each
    EXPECT_EQ(layout.numel, copies.numel - copy_space);
  }
}

TEST(FlatWeights, ForEachTensorRefusesUnshapedWeights) {
  const ModelConfig c = config(1);
  ModelWeights unshaped;
  int visited = 0;
  try {
    for_each_tensor(c, unshaped, [&](const TensorSlot&) { ++visited; });
    FAIL() << "unshaped weights were visited";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), testing::HasSubstr("for_each_tensor: the weights are not shaped for this config (0 layers, "
                                             "config.json has 2); construct them with ModelWeights(config)"));
  }
  EXPECT_EQ(visited, 0);
  // Shaped for another config: the first difference is named.
  ModelWeights other(config(2));
  EXPECT_THROW(for_each_tensor(c, other, [](const TensorSlot&) {}), Error);
  ModelWeights moe_differs(c);
  moe_differs.layers[1].moe.experts.pop_back();
  try {
    for_each_tensor(c, moe_differs, [](const TensorSlot&) {});
    FAIL();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), testing::HasSubstr("layer 1 MoE with 3 routed experts, config.json has MoE with 4"));
  }
  // Visiting changes nothing: the shape comes from the constructor alone.
  ModelWeights w(c);
  const size_t n = list_tensors(c, w).size();
  EXPECT_EQ(list_tensors(c, w).size(), n);
  EXPECT_EQ(w.layers.size(), 2u);
  EXPECT_EQ(w.layers[1].moe.experts.size(), 4u);
  EXPECT_EQ(w.mtp.size(), 1u);
  EXPECT_EQ(w.embed_tokens.data, nullptr);
}

}  // namespace
}  // namespace dsv3
