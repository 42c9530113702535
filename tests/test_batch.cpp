// A batch step (Transformer::forward_rows): tokens of several sequences at different
// positions in one pass, some reading their prompt in chunks while others decode, give each
// sequence the logits it gets alone (within the golden tolerance, 1e-4 of the largest
// logit), on every golden checkpoint and in each MLA form.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "golden_util.h"
#include "core/error.h"
#include "infer/batch.h"
#include "infer/generate.h"
#include "model/paged_cache.h"
#include "model/transformer.h"

namespace dsv3 {
namespace {

struct Case {
  const char* checkpoint;
  AttnForm form;
};

class BatchStep : public testing::TestWithParam<Case> {};

TEST_P(BatchStep, EachSequenceGetsItsLogitsAlone) {
  Transformer model(test::golden_dir(GetParam().checkpoint));
  model.attn_form = GetParam().form;
  const ModelConfig& c = model.config();
  const int64_t vocab = c.vocab_size;
  SafetensorsFile golden(test::golden_dir(GetParam().checkpoint) + "/golden.safetensors");
  const auto all = test::read_i32(golden, "tokens_3");
  // Three sequences: prompts of 7, 12 and 5 tokens, then 6 tokens each decoded one by one.
  const std::vector<std::vector<int32_t>> seqs = {{all.begin(), all.begin() + 13},
                                                 {all.begin() + 3, all.begin() + 21},
                                                 {all.begin() + 9, all.begin() + 20}};
  const int64_t prompt_len[3] = {7, 12, 5}, S = 3, cap = 32;

  // Alone: every position's logits of each sequence, prompt at once then one token a step.
  std::vector<std::vector<float>> alone(S);
  for (int64_t s = 0; s < S; ++s) {
    const auto& seq = seqs[size_t(s)];
    KvCache cache(c, cap);
    alone[size_t(s)].resize(seq.size() * size_t(vocab));
    model.forward(seq.data(), prompt_len[s], cache, alone[size_t(s)].data(), true);
    for (size_t p = size_t(prompt_len[s]); p < seq.size(); ++p)
      model.forward(&seq[p], 1, cache, alone[size_t(s)].data() + p * size_t(vocab), false);
  }

  // Batched, one shared cache (sequence s in rows [s * cap, s * cap + cap)): sequence 2
  // joins late and reads its prompt in two chunks while the others decode.
  KvCache cache(c, S * cap);
  int64_t done[3] = {0, 0, 0};  // positions already run
  auto step = [&](const std::vector<std::pair<int64_t, int64_t>>& work) {  // (sequence, tokens)
    std::vector<int32_t> ids;
    TokenRows rows;
    std::vector<int64_t> want, which;
    for (auto [s, len] : work)
      for (int64_t i = 0; i < len; ++i) {
        const int64_t p = done[s] + i;
        ids.push_back(seqs[size_t(s)][size_t(p)]);
        rows.pos.push_back(p), rows.row.push_back(s * cap + p);
        want.push_back(int64_t(ids.size()) - 1), which.push_back(s * 1000 + p);
      }
    std::vector<float> logits(want.size() * size_t(vocab));
    model.forward_rows(ids.data(), rows, cache, want.data(), int64_t(want.size()), logits.data());
    for (size_t j = 0; j < want.size(); ++j) {
      const int64_t s = which[j] / 1000, p = which[j] % 1000;
      const float* ref = alone[size_t(s)].data() + size_t(p * vocab);
      const float tol = 1e-4f * test::max_abs(std::vector<float>(ref, ref + vocab));
      EXPECT_LE(test::max_abs_diff(logits.data() + j * size_t(vocab), ref, size_t(vocab)), tol)
          << "sequence " << s << " position " << p;
    }
    for (auto [s, len] : work) done[s] += len;
  };
  step({{0, 7}, {1, 12}});          // two prompts at once
  step({{0, 1}, {1, 1}, {2, 3}});   // decoding, and the third prompt's first chunk
  step({{2, 2}, {0, 1}, {1, 1}});   // its second chunk, in another order
  while (done[0] < 13 || done[1] < 18 || done[2] < 11) {
    std::vector<std::pair<int64_t, int64_t>> work;
    for (int64_t s = 0; s < S; ++s)
      if (done[s] < int64_t(seqs[size_t(s)].size())) work.push_back({s, 1});
    step(work);  // sequences leave as they finish
  }
}

INSTANTIATE_TEST_SUITE_P(Checkpoints, BatchStep,
                         testing::Values(Case{"tiny-v3-bf16", AttnForm::automatic}, Case{"tiny-v3-bf16", AttnForm::absorbed},
                                         Case{"tiny-v3-bf16", AttnForm::naive}, Case{"tiny-v3-fp8", AttnForm::automatic},
                                         Case{"tiny-v2lite-bf16", AttnForm::automatic}),
                         [](const testing::TestParamInfo<Case>& i) {
                           std::string s = i.param.checkpoint;
                           std::replace(s.begin(), s.end(), '-', '_');
                           return s + (i.param.form == AttnForm::absorbed ? "_absorbed"
                                       : i.param.form == AttnForm::naive  ? "_naive"
                                                                          : "_auto");
                         });

// The same batch steps over a paged cache: sequences' positions in 64-position pages drawn
// from one pool (in an order that interleaves the sequences' pages), keys read through the
// gather; and a fork that shares its parent's pages, copying only the page it writes into.
TEST_P(BatchStep, PagedCacheGivesTheSameLogits) {
  Transformer model(test::golden_dir(GetParam().checkpoint));
  model.attn_form = GetParam().form;
  const ModelConfig& c = model.config();
  const int64_t vocab = c.vocab_size;
  SafetensorsFile golden(test::golden_dir(GetParam().checkpoint) + "/golden.safetensors");
  const auto all = test::read_i32(golden, "tokens_3");
  ASSERT_GE(all.size(), 100u);
  // Sequence 0: 70 tokens (a full page and a partial one); sequence 1 forks it after 70 and
  // continues differently; sequence 2: 30 tokens of its own.
  std::vector<int32_t> s0(all.begin(), all.begin() + 76), s1(all.begin(), all.begin() + 70), s2(all.begin() + 40, all.begin() + 70);
  for (int i = 0; i < 6; ++i) s1.push_back(all[size_t(80 + i)]);
  auto alone = [&](const std::vector<int32_t>& seq) {
    KvCache cache(c, 128);
    std::vector<float> logits(seq.size() * size_t(vocab));
    model.forward(seq.data(), int64_t(seq.size()), cache, logits.data(), true);
    return logits;
  };
  const auto want0 = alone(s0), want1 = alone(s1), want2 = alone(s2);

  PagedKvCache cache(c, 6);
  PageTable t0, t2, t1;
  auto step = [&](std::vector<std::tuple<PageTable*, const std::vector<int32_t>*, int64_t, const std::vector<float>*>> work) {
    std::vector<int32_t> ids;
    std::vector<const PageTable*> tables;
    std::vector<int64_t> pos, want;
    std::vector<const float*> ref;
    for (auto& [t, seq, len, w] : work) {
      const int64_t from = t->length;
      extend(cache, *t, len);
      for (int64_t i = 0; i < len; ++i) {
        ids.push_back((*seq)[size_t(from + i)]), tables.push_back(t), pos.push_back(from + i);
        want.push_back(int64_t(ids.size()) - 1), ref.push_back(w->data() + (from + i) * vocab);
      }
    }
    TokenRows rows;
    KeyGather keys;
    paged_rows(tables.data(), pos.data(), int64_t(ids.size()), rows, keys);
    std::vector<float> logits(want.size() * size_t(vocab));
    model.forward_rows(ids.data(), rows, cache, keys, want.data(), int64_t(want.size()), logits.data());
    for (size_t j = 0; j < want.size(); ++j) {
      const float tol = 1e-4f * test::max_abs(std::vector<float>(ref[j], ref[j] + vocab));
      EXPECT_LE(test::max_abs_diff(logits.data() + j * size_t(vocab), ref[j], size_t(vocab)), tol) << "token " << j;
    }
  };
  step({{&t0, &s0, 40, &want0}, {&t2, &s2, 20, &want2}});  // pages: t0 gets 0, t2 gets 1
  step({{&t2, &s2, 10, &want2}, {&t0, &s0, 30, &want0}});  // t0's second page comes after t2's
  EXPECT_EQ(t0.pages.size(), 2u);
  t1 = fork(cache, t0);  // shares both pages, the second one partial (70 of 128 positions)
  EXPECT_EQ(cache.refs(t0.pages[0]), 2);
  EXPECT_EQ(cache.refs(t0.pages[1]), 2);
  for (int i = 0; i < 6; ++i) step({{&t0, &s0, 1, &want0}, {&t1, &s1, 1, &want1}});  // each writes its own copy
  EXPECT_EQ(cache.refs(t0.pages[0]), 2);  // the full page stays shared
  EXPECT_NE(t0.pages[1], t1.pages[1]);    // the written one was copied
  EXPECT_EQ(cache.refs(t0.pages[1]), 1);
  release(cache, t0), release(cache, t1), release(cache, t2);
  EXPECT_EQ(cache.free_pages(), cache.pages());
}

// A fork at a page boundary shares only full pages: each side's next write takes a page of
// its own, nothing is copied.
TEST(PagedKvCache, ForkAtAPageBoundaryCopiesNothing) {
  Transformer model(test::golden_dir("tiny-v3-bf16"));
  PagedKvCache cache(model.config(), 4);
  PageTable a;
  extend(cache, a, 64);
  PageTable b = fork(cache, a);
  EXPECT_EQ(cache.refs(a.pages[0]), 2);
  extend(cache, a, 1), extend(cache, b, 1);
  EXPECT_EQ(a.pages[0], b.pages[0]);
  EXPECT_NE(a.pages[1], b.pages[1]);
  EXPECT_EQ(cache.free_pages(), 1);  // 3 taken: the shared one and one each
  release(cache, a), release(cache, b);
  EXPECT_EQ(cache.free_pages(), 4);
}

TEST(PagedKvCache, AFullPoolNamesItsSize) {
  Transformer model(test::golden_dir("tiny-v3-bf16"));
  PagedKvCache cache(model.config(), 2);
  PageTable t;
  extend(cache, t, 128);
  try {
    extend(cache, t, 1);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(std::string(e.what()), testing::HasSubstr("KV cache full: all 2 pages (128 positions)"));
  }
}

// The batch engine: greedy sequences added at different steps (one while others decode,
// one into the slot a cancelled sequence left), with a step budget that makes long prompts
// take several steps, each produce the tokens generate() gives it alone.
TEST(BatchEngine, SequencesGetTheirTokensAlone) {
  Transformer model(test::golden_dir("tiny-v3-bf16"));
  SafetensorsFile golden(test::golden_dir("tiny-v3-bf16") + "/golden.safetensors");
  const auto all = test::read_i32(golden, "tokens_3");
  const std::vector<std::vector<int32_t>> prompts = {{all.begin(), all.begin() + 9},
                                                    {all.begin() + 4, all.begin() + 30},
                                                    {all.begin() + 11, all.begin() + 14},
                                                    {all.begin() + 20, all.begin() + 27}};
  GenerateOptions opt;
  opt.max_tokens = 12;
  opt.stop_at_eos = false;
  std::vector<std::vector<int32_t>> alone;
  for (const auto& p : prompts) alone.push_back(generate(model, p, opt).tokens);

  BatchEngine engine(model, 3, 64, 16);  // 3 slots; at most 16 tokens a step
  std::vector<int64_t> id(prompts.size(), -1);
  id[0] = engine.add(prompts[0], opt);
  id[1] = engine.add(prompts[1], opt);
  const int64_t doomed = engine.add(prompts[2], opt);
  EXPECT_EQ(engine.add(prompts[3], opt), -1);  // all three slots busy
  ASSERT_TRUE(engine.step());
  engine.cancel(doomed);
  EXPECT_TRUE(engine.sequence(doomed).cancelled);
  id[2] = engine.add(prompts[2], opt);  // into the freed slot, while the others run
  ASSERT_GE(id[2], 0);
  int steps = 0;
  while (engine.step()) {
    if (++steps == 3) id[3] = engine.add(prompts[3], opt);  // waits for a slot: -1 until one frees
    if (id[3] < 0 && engine.running() < 3) id[3] = engine.add(prompts[3], opt);
  }
  ASSERT_GE(id[3], 0);
  for (size_t i = 0; i < prompts.size(); ++i) {
    const auto& s = engine.sequence(id[i]);
    EXPECT_TRUE(s.finished);
    EXPECT_EQ(s.tokens, alone[i]) << "sequence " << i;
  }
}

// Fork: a sequence copied mid-generation continues exactly as the original (greedy), with
// its prompt not run again, and a sampled fork differs.
TEST(BatchEngine, ForkContinuesFromTheParent) {
  Transformer model(test::golden_dir("tiny-v2lite-bf16"));
  SafetensorsFile golden(test::golden_dir("tiny-v2lite-bf16") + "/golden.safetensors");
  const auto all = test::read_i32(golden, "tokens_3");
  const std::vector<int32_t> prompt(all.begin() + 2, all.begin() + 12);
  GenerateOptions opt;
  opt.max_tokens = 14;
  opt.stop_at_eos = false;
  const auto alone = generate(model, prompt, opt).tokens;
  BatchEngine engine(model, 3, 32, 64);
  const int64_t all_free = engine.free_pages();
  const int64_t parent = engine.add(prompt, opt);
  for (int i = 0; i < 5; ++i) engine.step();  // prompt read, 5 tokens out
  EXPECT_THROW(engine.fork(parent, GenerateOptions{}), Error);  // max_tokens 128 > 32 positions: refused by add()
  const int64_t before = engine.free_pages();
  const int64_t greedy = engine.fork(parent, opt);
  GenerateOptions hot = opt;
  hot.sampling.temperature = 2.0f, hot.sampling.seed = 3;
  const int64_t sampled = engine.fork(parent, hot);
  ASSERT_GE(greedy, 0);
  ASSERT_GE(sampled, 0);
  EXPECT_EQ(engine.free_pages(), before);  // the forks share the parent's page: nothing copied yet
  EXPECT_EQ(engine.sequence(greedy).tokens.size(), 5u);
  while (engine.step()) {
  }
  EXPECT_EQ(engine.sequence(parent).tokens, alone);
  EXPECT_EQ(engine.sequence(greedy).tokens, alone);
  EXPECT_NE(engine.sequence(sampled).tokens, alone);
  EXPECT_TRUE(std::equal(alone.begin(), alone.begin() + 5, engine.sequence(sampled).tokens.begin()));
  EXPECT_EQ(engine.free_pages(), all_free);  // every page back in the pool
}

// n > 1 completions of one prompt: siblings wait for the first sequence to read the prompt,
// then share its pages and sample their own first tokens from the same logits row. Greedy
// siblings equal the sequence alone, a sampled one differs from its first token on (for
// some seed), a speculative parent's siblings check drafts too, and every page comes back.
TEST(BatchEngine, SiblingsShareTheirPromptRunOnce) {
  Transformer model(test::golden_dir("tiny-v3-bf16"));
  SafetensorsFile golden(test::golden_dir("tiny-v3-bf16") + "/golden.safetensors");
  const auto all = test::read_i32(golden, "tokens_3");
  const std::vector<int32_t> prompt(all.begin(), all.begin() + 70);  // more than a page
  GenerateOptions opt;
  opt.max_tokens = 10;
  opt.stop_at_eos = false;
  const auto alone = generate(model, prompt, opt).tokens;
  for (bool speculative : {false, true}) {
    GenerateOptions o = opt;
    o.speculative_mtp = speculative, o.draft = 2;
    BatchEngine engine(model, 4, 96, 32);  // the prompt is read over 3 steps
    const int64_t all_free = engine.free_pages();
    const int64_t first = engine.add(prompt, o);
    const int64_t greedy = engine.add_sibling(first, o);
    ASSERT_GE(greedy, 0);
    engine.step();
    std::vector<int64_t> hot;
    for (uint64_t seed = 1; seed <= 2; ++seed) {  // joining while the prompt is being read
      GenerateOptions h = o;
      h.sampling.temperature = 1.5f, h.sampling.seed = seed;
      hot.push_back(engine.add_sibling(first, h));
      ASSERT_GE(hot.back(), 0);
    }
    int64_t before = engine.free_pages();
    while (engine.sequence(first).read < int64_t(prompt.size())) engine.step();
    EXPECT_EQ(engine.sequence(greedy).read, int64_t(prompt.size()));
    EXPECT_EQ(engine.sequence(greedy).tokens.size(), 1u);
    // The siblings took no page of their own: only the first copy of the shared partial one
    // comes when each writes its second position.
    EXPECT_GE(engine.free_pages(), before - 1);
    while (engine.step()) {
    }
    EXPECT_EQ(engine.sequence(first).tokens, alone) << "speculative " << speculative;
    EXPECT_EQ(engine.sequence(greedy).tokens, alone) << "speculative " << speculative;
    EXPECT_TRUE(engine.sequence(hot[0]).tokens != alone || engine.sequence(hot[1]).tokens != alone);
    EXPECT_EQ(engine.free_pages(), all_free);
    EXPECT_THROW(engine.add_sibling(first, o), Error);  // finished
  }
  // A cancelled first sequence leaves its first sibling to read the prompt, and the others
  // share it from that one.
  BatchEngine engine(model, 3, 96, 16);
  const int64_t all_free = engine.free_pages();
  const int64_t first = engine.add(prompt, opt), sibling = engine.add_sibling(first, opt), third = engine.add_sibling(first, opt);
  engine.step();
  engine.cancel(first);
  engine.step();
  EXPECT_EQ(engine.last_step_tokens(), 16);  // one prompt being read, not two
  while (engine.step()) {
  }
  EXPECT_EQ(engine.sequence(sibling).tokens, alone);
  EXPECT_EQ(engine.sequence(third).tokens, alone);
  EXPECT_EQ(engine.free_pages(), all_free);
}

// A prefix cache's use of the engine: a finished sequence's pages, kept through on_release,
// start a later sequence whose prompt begins with the same tokens; it reads only the rest
// and gets the tokens it gets alone. Log-probabilities: the softmax of the logits alone.
TEST(BatchEngine, SharedPrefixPagesAndLogprobs) {
  Transformer model(test::golden_dir("tiny-v3-bf16"));
  const ModelConfig& c = model.config();
  SafetensorsFile golden(test::golden_dir("tiny-v3-bf16") + "/golden.safetensors");
  const auto all = test::read_i32(golden, "tokens_3");
  std::vector<int32_t> first_prompt(all.begin(), all.begin() + 70), second_prompt(all.begin(), all.begin() + 66);
  second_prompt.push_back(7), second_prompt.push_back(9);
  GenerateOptions opt;
  opt.max_tokens = 6;
  opt.stop_at_eos = false;
  opt.logprobs = 3;
  const auto alone = generate(model, second_prompt, opt).tokens;
  BatchEngine engine(model, 2, 128, 64);
  const int64_t all_free = engine.free_pages();
  PageTable kept;
  engine.on_release = [&](int64_t, const PageTable& t, int64_t valid) {
    EXPECT_EQ(valid, 70 + 6 - 1);
    kept.pages.assign(t.pages.begin(), t.pages.begin() + valid / PagedKvCache::kPageTokens);
    kept.length = int64_t(kept.pages.size()) * PagedKvCache::kPageTokens;
    for (int32_t p : kept.pages) engine.pages().retain(p);
  };
  const int64_t a = engine.add(first_prompt, opt);
  while (engine.step()) {
  }
  ASSERT_EQ(kept.length, 64);
  EXPECT_EQ(engine.free_pages(), all_free - 1);  // the kept page
  engine.on_release = nullptr;
  const int64_t b = engine.add(second_prompt, opt, kept);
  ASSERT_GE(b, 0);
  EXPECT_EQ(engine.sequence(b).read, 64);
  engine.step();
  EXPECT_EQ(engine.last_step_tokens(), 4);  // only the 4 tokens past the shared page
  while (engine.step()) {
  }
  EXPECT_EQ(engine.sequence(b).tokens, alone);
  // A prefix as long as the prompt is refused: the last prompt token must be run for logits.
  EXPECT_THROW(engine.add(std::vector<int32_t>(all.begin(), all.begin() + 64), opt, kept), Error);
  release(engine.pages(), kept);
  EXPECT_EQ(engine.free_pages(), all_free);
  // Log-probabilities of sequence a: those of the logits of its prompt + tokens alone.
  const auto& s = engine.sequence(a);
  ASSERT_EQ(s.logprobs.size(), s.tokens.size());
  std::vector<int32_t> ids = first_prompt;
  ids.insert(ids.end(), s.tokens.begin(), s.tokens.end() - 1);
  KvCache cache(c, int64_t(ids.size()));
  std::vector<float> logits(ids.size() * size_t(c.vocab_size));
  model.forward(ids.data(), int64_t(ids.size()), cache, logits.data(), true);
  for (size_t i = 0; i < s.tokens.size(); ++i) {
    const float* row = logits.data() + (first_prompt.size() - 1 + i) * size_t(c.vocab_size);
    double z = 0;
    for (int64_t v = 0; v < c.vocab_size; ++v) z += std::exp(double(row[v]));
    const auto& lp = s.logprobs[i];
    EXPECT_NEAR(lp.logprob, row[s.tokens[i]] - std::log(z), 1e-3);
    ASSERT_EQ(lp.top.size(), 3u);
    EXPECT_EQ(lp.top[0].first, s.tokens[i]);  // greedy: the chosen token is the most likely
    EXPECT_GE(lp.top[0].second, lp.top[1].second);
    EXPECT_GE(lp.top[1].second, lp.top[2].second);
    EXPECT_NEAR(lp.top[2].second, row[lp.top[2].first] - std::log(z), 1e-3);
  }
}

// Speculative decoding inside the batch: 32 sequences at once, every fourth plain and the
// others checking 1..4 MTP drafts a step, prompts of different lengths read in chunks, each
// greedy sequence ending with the tokens of plain decoding alone; on every golden checkpoint.
class BatchSpeculation : public testing::TestWithParam<const char*> {};

TEST_P(BatchSpeculation, ThirtyTwoSequencesGetTheirPlainTokens) {
  Transformer model(test::golden_dir(GetParam()));
  SafetensorsFile golden(test::golden_dir(GetParam()) + "/golden.safetensors");
  const auto all = test::read_i32(golden, "tokens_3");
  GenerateOptions plain;
  plain.max_tokens = 10;
  plain.stop_at_eos = false;
  std::vector<std::vector<int32_t>> prompts, alone, alone_drafts;
  for (int i = 0; i < 32; ++i) {
    prompts.emplace_back(all.begin() + i, all.begin() + i + 3 + (i * 7) % 23);
    alone.push_back(generate(model, prompts.back(), plain).tokens);
    GenerateOptions spec = plain;
    spec.speculative_mtp = true, spec.draft = 1 + i % 4;
    alone_drafts.push_back(generate(model, prompts.back(), spec).drafts);  // the drafts alone
  }
  // Steps of 160 tokens: every decoder's drafts fit (32 + 24 checks of up to 4), prompts
  // (about 450 tokens) are read in chunks over several steps.
  BatchEngine engine(model, 32, 40, 160);
  std::vector<int64_t> ids;
  for (int i = 0; i < 32; ++i) {
    GenerateOptions opt = plain;
    opt.speculative_mtp = i % 4 != 0;
    opt.draft = 1 + i % 4;
    ids.push_back(engine.add(prompts[size_t(i)], opt));
    ASSERT_GE(ids.back(), 0);
  }
  while (engine.step()) {
  }
  for (int i = 0; i < 32; ++i) {
    EXPECT_EQ(engine.sequence(ids[size_t(i)]).tokens, alone[size_t(i)]) << "sequence " << i;
    // The same drafts as alone: the module sees the same states at the same positions.
    if (i % 4 != 0) {
      EXPECT_EQ(engine.sequence(ids[size_t(i)]).drafts, alone_drafts[size_t(i)]) << "sequence " << i;
    }
  }
  EXPECT_EQ(engine.free_pages(), BatchEngine(model, 32, 40, 160).free_pages());  // every page back
}


// Small steps (3 tokens): prompts read in chunks of 1-3 tokens beside speculative decoding.
TEST_P(BatchSpeculation, TwoTokenSteps) {
  Transformer model(test::golden_dir(GetParam()));
  SafetensorsFile golden(test::golden_dir(GetParam()) + "/golden.safetensors");
  const auto all = test::read_i32(golden, "tokens_3");
  GenerateOptions opt;
  opt.max_tokens = 12;
  opt.stop_at_eos = false;
  const std::vector<int32_t> a(all.begin(), all.begin() + 9), b(all.begin() + 20, all.begin() + 33);
  const auto alone_a = generate(model, a, opt).tokens, alone_b = generate(model, b, opt).tokens;
  opt.speculative_mtp = true;
  opt.draft = 3;
  BatchEngine engine(model, 2, 32, 3);  // prompt chunks of 1-3 tokens, a draft when a token is spare
  const int64_t ia = engine.add(a, opt), ib = engine.add(b, opt);
  while (engine.step()) EXPECT_LE(engine.last_step_tokens(), 3);  // drafts only in what the budget leaves
  EXPECT_EQ(engine.sequence(ia).tokens, alone_a);
  EXPECT_EQ(engine.sequence(ib).tokens, alone_b);
  EXPECT_GT(engine.sequence(ia).drafts.size() + engine.sequence(ib).drafts.size(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Checkpoints, BatchSpeculation, testing::Values("tiny-v3-bf16", "tiny-v3-fp8", "tiny-v2lite-bf16"),
                         [](const testing::TestParamInfo<const char*>& i) {
                           std::string s = i.param;
                           std::replace(s.begin(), s.end(), '-', '_');
                           return s;
                         });

// A lone prompt longer than a step's budget: steps that only read prompt (no logits) first.
TEST(BatchEngine, LongPromptReadOverSeveralSteps) {
  Transformer model(test::golden_dir("tiny-v3-fp8"));
  SafetensorsFile golden(test::golden_dir("tiny-v3-fp8") + "/golden.safetensors");
  const auto all = test::read_i32(golden, "tokens_3");
  const std::vector<int32_t> prompt(all.begin(), all.begin() + 21);
  GenerateOptions opt;
  opt.max_tokens = 6;
  opt.stop_at_eos = false;
  const auto alone = generate(model, prompt, opt).tokens;
  BatchEngine engine(model, 1, 32, 8);  // 21 prompt tokens at 8 a step
  const int64_t id = engine.add(prompt, opt);
  int steps = 0;
  while (engine.step()) ++steps;
  EXPECT_EQ(steps, 3 + 5);  // 8 + 8 + 5 prompt tokens (the last with the first token), then 5 more
  EXPECT_EQ(engine.sequence(id).tokens, alone);
}

TEST(BatchEngine, BadRequestsNameTheProblem) {
  Transformer model(test::golden_dir("tiny-v3-bf16"));
  GenerateOptions opt;
  opt.max_tokens = 8;
  BatchEngine engine(model, 2, 16, 32);
  EXPECT_THROW(engine.add({}, opt), Error);
  EXPECT_THROW(engine.add({1, 2, 100000}, opt), Error);
  EXPECT_THROW(engine.add(std::vector<int32_t>(12, 1), opt), Error);  // 12 + 8 > 16 positions
  EXPECT_THROW(BatchEngine(model, 0, 16), Error);
  EXPECT_FALSE(engine.step());  // nothing running
}

}  // namespace
}  // namespace dsv3
