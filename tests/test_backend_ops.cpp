// Conformance of the backend's attention op (backend/attention.h) against its scalar
// double-precision reference, at the shapes MLA gives it: the naive form (per-head keys and
// values, a shared RoPE key), the absorbed form (every key and value vector shared, all
// heads as the rows of one product), several sequences at different positions in one call,
// one head, no second product; forward and backward, float and double.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "backend/attention.h"
#include "backend/cpu/threads.h"
#include "backend/ops.h"
#include "core/error.h"

namespace dsv3 {
namespace {

// One layout: heads, widths, and which key-side views are shared by all heads.
struct Layout {
  const char* name;
  int64_t heads, w1, w2, wv;
  bool shared_k1, shared_v;
  std::vector<int64_t> seq_len;  // query tokens per sequence
  std::vector<int64_t> seq_past;  // positions already cached before them
};

template <typename T>
struct Problem {
  Layout l;
  int64_t n = 0, keys = 0;  // query tokens; key rows (all sequences)
  std::vector<T> q1, q2, k1, k2, v;
  std::vector<int64_t> first, count;
  std::vector<int64_t> seq_keys;  // per query token: the key rows its sequence reads
  AttentionArgs<T> args;

  explicit Problem(const Layout& layout, uint64_t seed) : l(layout) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> normal(0, 1);
    auto fill = [&](std::vector<T>& x, int64_t size) {
      x.resize(size_t(size));
      for (T& e : x) e = T(normal(rng));
    };
    for (size_t s = 0; s < l.seq_len.size(); ++s) {
      for (int64_t i = 0; i < l.seq_len[s]; ++i) {
        first.push_back(keys);
        count.push_back(l.seq_past[s] + i + 1);
        seq_keys.push_back(l.seq_past[s] + l.seq_len[s]);
      }
      n += l.seq_len[s];
      keys += l.seq_past[s] + l.seq_len[s];
    }
    const int64_t H = l.heads, k1_heads = l.shared_k1 ? 1 : H, v_heads = l.shared_v ? 1 : H;
    fill(q1, n * H * l.w1), fill(q2, n * H * l.w2);
    fill(k1, keys * k1_heads * l.w1), fill(k2, keys * l.w2), fill(v, keys * v_heads * l.wv);
    args.n = n, args.heads = H;
    args.q1 = {q1.data(), H * l.w1, l.w1, l.w1};
    args.q2 = {q2.data(), H * l.w2, l.w2, l.w2};
    args.k1 = {k1.data(), k1_heads * l.w1, l.shared_k1 ? 0 : l.w1, l.w1};
    args.k2 = {k2.data(), l.w2, 0, l.w2};
    args.v = {v.data(), v_heads * l.wv, l.shared_v ? 0 : l.wv, l.wv};
    args.key_first = first.data(), args.key_count = count.data();
    args.scale = 1 / std::sqrt(double(l.w1 + l.w2));
  }
  int64_t max_count() const { return *std::max_element(count.begin(), count.end()); }
};

const std::vector<Layout>& layouts() {
  static const std::vector<Layout> all = {
      // name, heads, w1, w2, wv, shared k1, shared v, sequences (tokens, past)
      {"naive_prefill", 4, 16, 8, 12, false, false, {7}, {0}},
      {"naive_two_sequences", 3, 16, 8, 16, false, false, {5, 3}, {0, 4}},
      {"naive_decode_batch", 2, 8, 4, 8, false, false, {1, 1, 1}, {9, 0, 3}},
      {"absorbed_prefill", 4, 32, 8, 32, true, true, {9}, {0}},
      {"absorbed_decode_batch", 8, 32, 8, 32, true, true, {1, 1, 2}, {12, 0, 5}},
      {"one_head", 1, 16, 8, 8, false, false, {6}, {2}},
      {"no_rope_product", 2, 16, 0, 8, true, true, {4, 4}, {0, 1}},
      // Long enough (queries x keys x heads-as-rows over 2^22) that a sequence's tokens are
      // cut into several forward tasks, while the backward takes each sequence whole.
      {"absorbed_long_chunked", 4, 8, 4, 8, true, true, {1100, 3}, {0, 2}},
      {"naive_long_chunked", 1, 8, 4, 8, false, false, {2100}, {0}},
      // Training windows over several causal blocks of 64 queries, with a partial last block.
      {"naive_windows_causal_blocks", 2, 16, 8, 16, false, false, {130, 70}, {0, 0}},
      {"absorbed_prefill_causal_blocks", 4, 16, 8, 16, true, true, {150}, {20}},
  };
  return all;
}

template <typename T>
double max_abs_diff(const std::vector<T>& a, const std::vector<T>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(double(a[i]) - double(b[i])));
  return m;
}

class AttentionOp : public testing::TestWithParam<size_t> {};

template <typename T>
void check_forward(const Layout& l, double tol) {
  Problem<T> p(l, 11);
  const int64_t out_size = p.n * l.heads * l.wv, ld = p.max_count() + 3;
  std::vector<T> out(static_cast<size_t>(out_size)), ref(out.size()), out_p(out.size());
  std::vector<T> probs(size_t(p.n * l.heads * ld), T(-1)), probs_ref(probs.size(), T(0));
  attention_forward(p.args, out.data());
  attention_forward(p.args, out_p.data(), probs.data(), ld);
  attention_forward_reference(p.args, ref.data(), probs_ref.data(), ld);
  EXPECT_LT(max_abs_diff(out, ref), tol) << l.name;
  EXPECT_LT(max_abs_diff(out_p, ref), tol) << l.name;
  for (int64_t t = 0; t < p.n; ++t)
    for (int64_t h = 0; h < l.heads; ++h) {
      const T* row = &probs[size_t((t * l.heads + h) * ld)];
      const T* ref_row = &probs_ref[size_t((t * l.heads + h) * ld)];
      double sum = 0;
      for (int64_t j = 0; j < p.count[size_t(t)]; ++j) {
        EXPECT_NEAR(double(row[j]), double(ref_row[j]), tol) << l.name << " t " << t << " h " << h << " j " << j;
        sum += double(row[j]);
      }
      EXPECT_NEAR(sum, 1.0, tol) << l.name;
      // Zeros after the visible keys, as far as the backward reads (the sequence's keys).
      for (int64_t j = p.count[size_t(t)]; j < p.seq_keys[size_t(t)]; ++j)
        ASSERT_EQ(double(row[j]), 0.0) << l.name << " t " << t << " h " << h << " j " << j;
    }
}

TEST_P(AttentionOp, ForwardMatchesReference) {
  const Layout& l = layouts()[GetParam()];
  check_forward<float>(l, 1e-5);
  check_forward<double>(l, 1e-12);
}

template <typename T>
void check_backward(const Layout& l, double tol) {
  Problem<T> p(l, 23);
  const int64_t ld = p.max_count();
  // Garbage before the forward: the backward must read only what the forward wrote.
  std::vector<T> out(size_t(p.n * l.heads * l.wv)), probs(size_t(p.n * l.heads * ld), T(7));
  attention_forward(p.args, out.data(), probs.data(), ld);
  std::mt19937_64 rng(5);
  std::normal_distribution<double> normal(0, 1);
  std::vector<T> d_out(out.size());
  for (T& e : d_out) e = T(normal(rng));
  // Both start from the same nonzero values: the op accumulates.
  auto grads = [&](std::vector<std::vector<T>>& g) {
    g = {p.q1, p.q2, p.k1, p.k2, p.v};
    AttentionGrads<T> v;
    v.q1 = {g[0].data(), p.args.q1.row_stride, p.args.q1.head_stride, p.args.q1.width};
    v.q2 = {g[1].data(), p.args.q2.row_stride, p.args.q2.head_stride, p.args.q2.width};
    v.k1 = {g[2].data(), p.args.k1.row_stride, p.args.k1.head_stride, p.args.k1.width};
    v.k2 = {g[3].data(), p.args.k2.row_stride, p.args.k2.head_stride, p.args.k2.width};
    v.v = {g[4].data(), p.args.v.row_stride, p.args.v.head_stride, p.args.v.width};
    return v;
  };
  std::vector<std::vector<T>> g, g_ref, g_lse;
  attention_backward(p.args, probs.data(), ld, d_out.data(), grads(g));
  attention_backward_reference(p.args, probs.data(), ld, d_out.data(), grads(g_ref));
  // Without the probabilities: the forward keeps each row's log-sum-exp, the backward
  // recomputes them block by block.
  std::vector<T> out_lse(out.size()), lse(size_t(p.n * l.heads), T(7));
  attention_forward(p.args, out_lse.data(), static_cast<T*>(nullptr), 0, lse.data());
  EXPECT_LT(max_abs_diff(out_lse, out), tol) << l.name << " out (lse)";
  attention_backward(p.args, static_cast<const T*>(nullptr), 0, d_out.data(), grads(g_lse), lse.data());
  const char* names[] = {"q1", "q2", "k1", "k2", "v"};
  for (size_t i = 0; i < g.size(); ++i) {
    EXPECT_LT(max_abs_diff(g[i], g_ref[i]), tol) << l.name << " d" << names[i];
    EXPECT_LT(max_abs_diff(g_lse[i], g_ref[i]), tol) << l.name << " d" << names[i] << " (recomputed probabilities)";
  }
}

TEST_P(AttentionOp, BackwardMatchesReference) {
  const Layout& l = layouts()[GetParam()];
  check_backward<float>(l, 1e-4);
  check_backward<double>(l, 1e-11);
}

INSTANTIATE_TEST_SUITE_P(Layouts, AttentionOp, testing::Range(size_t(0), layouts().size()),
                         [](const testing::TestParamInfo<size_t>& i) { return std::string(layouts()[i.param].name); });

// Threads that never stall: as many threads as the cores other work leaves free, at least
// one, at most the user's limit.
TEST(Threads, ForTheFreeCores) {
  EXPECT_EQ(cpu::threads_for(2, 0, 2), 2);  // idle
  EXPECT_EQ(cpu::threads_for(2, 1, 2), 1);  // a busy loop holds one core
  EXPECT_EQ(cpu::threads_for(2, 5, 2), 1);  // never none
  EXPECT_EQ(cpu::threads_for(16, 3, 8), 8);  // never more than --threads
  EXPECT_EQ(cpu::threads_for(16, 10, 8), 6);
}

// The thread count the backend picks must not change a result: the reductions of training
// (RMSNorm's weight gradient, the cross-entropy) sum fixed chunks in a fixed order.
TEST(Threads, ReductionsDoNotDependOnTheThreadCount) {
  const int64_t n = 300, dim = 256, vocab = 700;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  std::vector<float> x(static_cast<size_t>(n * dim)), dy(static_cast<size_t>(n * dim)), w(static_cast<size_t>(dim)),
      logits(static_cast<size_t>(n * vocab));
  for (auto* v : {&x, &dy, &w, &logits})
    for (float& f : *v) f = normal(rng);
  std::vector<int32_t> targets(static_cast<size_t>(n));
  for (auto& t : targets) t = int32_t(rng() % vocab);
  targets[3] = -1;
  auto run = [&](int threads, std::vector<float>& dw, std::vector<float>& dlogits) {
    cpu::pin_threads(threads);
    std::vector<float> y(x.size()), inv(static_cast<size_t>(n)), dx(x.size(), 0.0f);
    dw.assign(size_t(dim), 0.0f), dlogits.assign(logits.size(), 0.0f);
    rmsnorm_forward(x.data(), w.data(), y.data(), inv.data(), n, dim, 1e-6);
    rmsnorm_backward(dy.data(), x.data(), w.data(), inv.data(), dx.data(), dw.data(), n, dim);
    return cross_entropy(logits.data(), targets.data(), n, vocab, dlogits.data());
  };
  std::vector<float> dw1, dw2, dl1, dl2;
  const double loss1 = run(1, dw1, dl1), loss2 = run(2, dw2, dl2);
  cpu::pin_threads(0);
  EXPECT_EQ(loss1, loss2);
  EXPECT_EQ(dw1, dw2);
  EXPECT_EQ(dl1, dl2);
}

TEST(AttentionOpErrors, ProbabilityRowsTooShortAndQueriesWithoutKeys) {
  Problem<float> p(layouts()[0], 1);
  std::vector<float> out(size_t(p.n * 4 * 12)), probs(size_t(p.n * 4 * 3));
  EXPECT_THROW(attention_forward(p.args, out.data(), probs.data(), 3), Error);
  p.count[2] = 0;
  EXPECT_THROW(attention_forward(p.args, out.data()), Error);
}

TEST(AttentionOpErrors, BackwardRefusesSequencesSharingKeyRows) {
  Problem<double> p(layouts()[1], 1);  // sequences of 5 and 3 tokens, keys rows [0, 5) and [5, 12)
  for (int64_t t = 5; t < 8; ++t) p.first[size_t(t)] = 2;  // the second now reads rows [2, 9)
  const int64_t ld = p.max_count();
  std::vector<double> out(size_t(p.n * 3 * 16)), probs(size_t(p.n * 3 * ld));
  attention_forward(p.args, out.data(), probs.data(), ld);  // reading shared keys is fine
  std::vector<std::vector<double>> g = {p.q1, p.q2, p.k1, p.k2, p.v};
  AttentionGrads<double> v;
  v.q1 = {g[0].data(), p.args.q1.row_stride, p.args.q1.head_stride, p.args.q1.width};
  v.q2 = {g[1].data(), p.args.q2.row_stride, p.args.q2.head_stride, p.args.q2.width};
  v.k1 = {g[2].data(), p.args.k1.row_stride, p.args.k1.head_stride, p.args.k1.width};
  v.k2 = {g[3].data(), p.args.k2.row_stride, p.args.k2.head_stride, p.args.k2.width};
  v.v = {g[4].data(), p.args.v.row_stride, p.args.v.head_stride, p.args.v.width};
  EXPECT_THROW(attention_backward(p.args, probs.data(), ld, out.data(), v), Error);
}

}  // namespace
}  // namespace dsv3
