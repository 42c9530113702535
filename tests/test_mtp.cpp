// The MTP module as an inference module (§2.2; the speculative-decoding issue drafts with
// it): run over a latent cache of its own, prefill then one token at a time, in the
// absorbed form, it gives the states and logits of the same module run over the whole
// window at once in the naive form (the form training runs it in), on the golden
// checkpoints' MTP layers. The official inference code never runs the MTP module, so no
// golden covers its values; its training gradients are checked by test_gradcheck.
#include <gtest/gtest.h>

#include <algorithm>

#include "golden_util.h"
#include "model/head.h"
#include "model/mtp.h"
#include "model/transformer.h"

namespace dsv3 {
namespace {

class MtpModule : public testing::TestWithParam<const char*> {};

TEST_P(MtpModule, IncrementalWithCacheEqualsWholeWindow) {
  Transformer model(test::golden_dir(GetParam()));
  const ModelConfig& c = model.config();
  const MtpWeights& w = model.weights().mtp.at(0);
  SafetensorsFile golden(test::golden_dir(GetParam()) + "/golden.safetensors");
  const auto all = test::read_i32(golden, "tokens_3");
  const int64_t n = 40, dim = c.hidden_size, vocab = c.vocab_size;
  ASSERT_GT(int64_t(all.size()), n);

  // h^0: the main model's residual stream after its last block, before the final norm.
  const std::vector<int32_t> tokens(all.begin(), all.begin() + n);
  KvCache main_cache(c, n);
  ForwardTrace trace;
  std::vector<float> main_logits(static_cast<size_t>(vocab));
  model.forward(tokens.data(), n, main_cache, main_logits.data(), false, &trace);
  const std::vector<float>& h0 = trace.prenorm_hidden;
  // Depth 1 at positions 0 .. m-1 takes token i+1 and predicts token i+2.
  const int64_t m = n - 1;
  const std::vector<int32_t> next(tokens.begin() + 1, tokens.end());
  const Rope rope = Rope::from_config(c);
  Arena arena;

  // The whole window at once, attending within itself (naive form, no cache).
  RopeAngles angles;
  const TokenRows window = TokenRows::sequence(0, m);
  rope.angles(window.pos, angles);
  std::vector<float> h_ref(size_t(m * dim)), logits_ref(size_t(m * vocab));
  mtp_forward<float>({{c, angles, AttnForm::naive}}, w, next.data(), h0.data(), window, {}, h_ref.data(), arena);
  head_forward<float>(c, w.shared_head_norm, w.shared_head_head, h_ref.data(), m, logits_ref.data(), arena);

  // Prefill 10 positions, then one at a time, over the module's own latent cache.
  std::vector<float> latent(size_t(m * c.kv_lora_rank)), k_pe(size_t(m * c.qk_rope_head_dim));
  const LayerCache<float> cache{latent.data(), k_pe.data()};
  std::vector<float> h(size_t(m * dim)), logits(size_t(m * vocab));
  for (int64_t start = 0; start < m;) {
    const int64_t len = start == 0 ? 10 : 1;
    const TokenRows step = TokenRows::sequence(start, len);
    rope.angles(step.pos, angles);
    mtp_forward<float>({{c, angles, AttnForm::absorbed}}, w, next.data() + start, h0.data() + start * dim, step, cache,
                       h.data() + start * dim, arena);
    head_forward<float>(c, w.shared_head_norm, w.shared_head_head, h.data() + start * dim, len,
                        logits.data() + start * vocab, arena);
    start += len;
  }
  const float tol_h = 1e-4f * test::max_abs(h_ref), tol_l = 1e-4f * test::max_abs(logits_ref);
  for (int64_t i = 0; i < m; ++i) {
    ASSERT_LE(test::max_abs_diff(&h[size_t(i * dim)], &h_ref[size_t(i * dim)], size_t(dim)), tol_h) << "position " << i;
    ASSERT_LE(test::max_abs_diff(&logits[size_t(i * vocab)], &logits_ref[size_t(i * vocab)], size_t(vocab)), tol_l)
        << "position " << i;
  }
  // Not a constant: the module's prediction depends on the position.
  EXPECT_GT(test::max_abs_diff(&logits[0], &logits[size_t((m - 1) * vocab)], size_t(vocab)), tol_l);
}

INSTANTIATE_TEST_SUITE_P(Checkpoints, MtpModule, testing::Values("tiny-v3-bf16", "tiny-v3-fp8", "tiny-v2lite-bf16"),
                         [](const testing::TestParamInfo<const char*>& i) {
                           std::string s = i.param;
                           std::replace(s.begin(), s.end(), '-', '_');
                           return s;
                         });

}  // namespace
}  // namespace dsv3
