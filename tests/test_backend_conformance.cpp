// Conformance of the backend's element-wise, row and product ops (backend/ops.h,
// backend/attention.h, backend/optimizer.h, backend/top_k.h) against scalar double-precision references
// written here, on random inputs at edge shapes: one element, sizes that are not multiples
// of 16 or 128, and sizes past the ops' threading thresholds; forward and backward, float
// and double. The attention op has its own suite (test_backend_ops.cpp). A new backend runs
// these unchanged.
// Tolerances: double ops within 1e-12 (relative to the sums' magnitude), float ops within a
// few float roundings of the reference per summed term (stated per check).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "backend/ops.h"
#include "backend/optimizer.h"
#include "backend/top_k.h"
#include "core/dtype.h"

namespace dsv3 {
namespace {

std::vector<double> normal(size_t n, uint64_t seed, double sd = 1) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> d(0, sd);
  std::vector<double> v(n);
  for (double& x : v) x = d(rng);
  return v;
}
template <typename T>
std::vector<T> as(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}
template <typename T>
double max_diff(const std::vector<T>& got, const std::vector<double>& want) {
  EXPECT_EQ(got.size(), want.size());
  double m = 0;
  for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) m = std::max(m, std::abs(double(got[i]) - want[i]));
  return m;
}
template <typename T>
constexpr double kEps = std::is_same_v<T, float> ? 6e-8 : 1.2e-16;  // unit roundoff

// Shapes (rows, width): one element, odd small, odd wide, past the 65536-element threading
// thresholds.
struct Shape {
  int64_t n, dim;
};
const Shape kShapes[] = {{1, 1}, {3, 7}, {5, 129}, {37, 2049}};

// --- products ------------------------------------------------------------------------

struct ProductShape {
  int64_t n, in, out;
};
const ProductShape kProducts[] = {{1, 1, 1}, {3, 7, 5}, {17, 129, 33}, {65, 300, 257}};

template <typename T>
void check_products() {
  for (const ProductShape& s : kProducts) {
    const auto x = normal(static_cast<size_t>(s.n * s.in), 1), w = normal(static_cast<size_t>(s.out * s.in), 2), dy = normal(static_cast<size_t>(s.n * s.out), 3);
    const auto dx0 = normal(static_cast<size_t>(s.n * s.in), 4), dw0 = normal(static_cast<size_t>(s.out * s.in), 5);
    std::vector<double> y(static_cast<size_t>(s.n * s.out)), dx = dx0, dw = dw0;
    for (int64_t i = 0; i < s.n; ++i)
      for (int64_t o = 0; o < s.out; ++o) {
        double sum = 0;
        for (int64_t k = 0; k < s.in; ++k) sum += x[size_t(i * s.in + k)] * w[size_t(o * s.in + k)];
        y[size_t(i * s.out + o)] = sum;
        for (int64_t k = 0; k < s.in; ++k) {
          dx[size_t(i * s.in + k)] += dy[size_t(i * s.out + o)] * w[size_t(o * s.in + k)];
          dw[size_t(o * s.in + k)] += dy[size_t(i * s.out + o)] * x[size_t(i * s.in + k)];
        }
      }
    // |error| of a sum of K products of N(0,1) values: a few roundings times K.
    const double tol_y = 8 * kEps<T> * double(s.in) + 1e-300, tol_dx = 8 * kEps<T> * double(s.out) + 1e-300,
                 tol_dw = 8 * kEps<T> * double(s.n) + 1e-300;
    std::vector<T> yt(y.size()), dxt = as<T>(dx0), dwt = as<T>(dw0), dx_over(dx.size(), T(7));
    const std::vector<T> xt = as<T>(x), wt = as<T>(w), dyt = as<T>(dy);
    matmul(xt.data(), wt.data(), yt.data(), s.n, s.in, s.out);
    matmul_dx(dyt.data(), wt.data(), dxt.data(), s.n, s.in, s.out, true);
    matmul_dx(dyt.data(), wt.data(), dx_over.data(), s.n, s.in, s.out, false);
    matmul_dw(dyt.data(), xt.data(), dwt.data(), s.n, s.in, s.out);
    const std::string at = std::to_string(s.n) + "x" + std::to_string(s.in) + "x" + std::to_string(s.out);
    EXPECT_LT(max_diff(yt, y), tol_y * 4) << "matmul " << at;
    EXPECT_LT(max_diff(dxt, dx), tol_dx * 4 + 4 * kEps<T>) << "matmul_dx accumulate " << at;
    for (size_t i = 0; i < dx.size(); ++i) dx[i] -= dx0[i];
    EXPECT_LT(max_diff(dx_over, dx), tol_dx * 4) << "matmul_dx overwrite " << at;
    EXPECT_LT(max_diff(dwt, dw), tol_dw * 4 + 4 * kEps<T>) << "matmul_dw " << at;
  }
}

TEST(BackendConformance, Products) {
  check_products<float>();
  check_products<double>();
}

// LinearGemm at fp32 over a stored Mat is the same product (the inference and training path).
TEST(BackendConformance, LinearGemmOverMatEqualsMatmul) {
  for (const ProductShape& s : kProducts) {
    const auto x = as<float>(normal(static_cast<size_t>(s.n * s.in), 1)), w = as<float>(normal(static_cast<size_t>(s.out * s.in), 2));
    Mat m;
    m.dtype = DType::f32, m.rows = s.out, m.cols = s.in, m.data = reinterpret_cast<const uint8_t*>(w.data());
    std::vector<float> a(static_cast<size_t>(s.n * s.out)), b(a.size());
    LinearGemm{}.forward(x.data(), m, a.data(), s.n);
    matmul(x.data(), w.data(), b.data(), s.n, s.in, s.out);
    std::vector<double> bd(b.begin(), b.end());
    EXPECT_LT(max_diff(a, bd), 32 * kEps<float> * double(s.in)) << s.n << "x" << s.in << "x" << s.out;
  }
}

// --- rows ------------------------------------------------------------------------------

template <typename T>
void check_rows() {
  const int64_t n = 11, width = 13, ld_src = 17, ld_dst = 19, rows = 23;
  const auto src = normal(static_cast<size_t>(rows * ld_src), 1), scale = normal(static_cast<size_t>(n), 2), dst0 = normal(static_cast<size_t>(rows * ld_dst), 3);
  std::vector<int64_t> index(static_cast<size_t>(n));
  std::mt19937_64 rng(4);
  for (int64_t& i : index) i = int64_t(rng() % uint64_t(rows));
  index[3] = index[7];  // a repeated row: scatter adds both, in order

  // copy_rows: dst row index[i] = src row i (a permutation here: distinct targets)
  std::vector<int64_t> perm(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) perm[size_t(i)] = (i * 5 + 2) % rows;
  std::vector<double> want = dst0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t w = 0; w < width; ++w) want[size_t(perm[size_t(i)] * ld_dst + w)] = src[size_t(i * ld_src + w)];
  std::vector<T> got = as<T>(dst0);
  const std::vector<T> st = as<T>(src), sc = as<T>(scale);
  copy_rows(st.data(), ld_src, n, width, got.data(), ld_dst, perm.data());
  EXPECT_LT(max_diff(got, want), kEps<T> * 4) << "copy_rows";

  // gather_rows: dst row i = scale[i] * src row index[i]
  want = dst0, got = as<T>(dst0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t w = 0; w < width; ++w)
      want[size_t(i * ld_dst + w)] = scale[size_t(i)] * src[size_t(index[size_t(i)] * ld_src + w)];
  gather_rows(st.data(), ld_src, index.data(), sc.data(), n, width, got.data(), ld_dst);
  EXPECT_LT(max_diff(got, want), kEps<T> * 16) << "gather_rows";

  // scatter_add_rows: dst row index[i] += scale[i] * src row i (src rows width apart)
  const auto packed = normal(static_cast<size_t>(n * width), 5), dense0 = normal(static_cast<size_t>(rows * width), 6);
  want = dense0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t w = 0; w < width; ++w)
      want[size_t(index[size_t(i)] * width + w)] += scale[size_t(i)] * packed[size_t(i * width + w)];
  got = as<T>(dense0);
  const std::vector<T> pt = as<T>(packed);
  scatter_add_rows(pt.data(), index.data(), sc.data(), n, width, got.data());
  EXPECT_LT(max_diff(got, want), kEps<T> * 64) << "scatter_add_rows";
  got = as<T>(dense0);
  scatter_add_rows(pt.data(), index.data(), static_cast<const T*>(nullptr), n, width, got.data());
  want = dense0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t w = 0; w < width; ++w) want[size_t(index[size_t(i)] * width + w)] += packed[size_t(i * width + w)];
  EXPECT_LT(max_diff(got, want), kEps<T> * 64) << "scatter_add_rows without scale";

  // row_dots: out[i] = a row index[i] . b row i
  const auto a = normal(static_cast<size_t>(rows * width), 7);
  std::vector<double> dots(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t w = 0; w < width; ++w)
      dots[size_t(i)] += a[size_t(index[size_t(i)] * width + w)] * packed[size_t(i * width + w)];
  std::vector<T> dt(static_cast<size_t>(n));
  const std::vector<T> at = as<T>(a);
  row_dots(at.data(), index.data(), pt.data(), n, width, dt.data());
  EXPECT_LT(max_diff(dt, dots), kEps<T> * 16 * width) << "row_dots";
}

TEST(BackendConformance, RowGatherScatterDots) {
  check_rows<float>();
  check_rows<double>();
}

template <typename T>
void check_rope() {
  // 3 heads of width 10 per row (pairs rotated), heads 12 apart, rows 40 apart.
  const int64_t rows = 5, heads = 3, width = 10, head_stride = 12, row_stride = 40;
  const auto x0 = normal(static_cast<size_t>(rows * row_stride), 1);
  const auto angle = normal(static_cast<size_t>(rows * width / 2), 2, 3.0);
  std::vector<double> cos(angle.size()), sin(angle.size());
  for (size_t i = 0; i < angle.size(); ++i) cos[i] = std::cos(angle[i]), sin[i] = std::sin(angle[i]);
  std::vector<double> want = x0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < width / 2; ++i) {
        double* p = &want[size_t(r * row_stride + h * head_stride + 2 * i)];
        const double c = cos[size_t(r * width / 2 + i)], s = sin[size_t(r * width / 2 + i)], a = p[0], b = p[1];
        p[0] = a * c - b * s, p[1] = a * s + b * c;
      }
  std::vector<T> x = as<T>(x0);
  rope_rotate(x.data(), rows, row_stride, heads, head_stride, width, cos.data(), sin.data(), false);
  EXPECT_LT(max_diff(x, want), kEps<T> * 16) << "rope_rotate";
  rope_rotate(x.data(), rows, row_stride, heads, head_stride, width, cos.data(), sin.data(), true);
  EXPECT_LT(max_diff(x, x0), kEps<T> * 32) << "rope_rotate inverse";
}

TEST(BackendConformance, RopeRotateAndItsInverse) {
  check_rope<float>();
  check_rope<double>();
}

// --- element-wise pairs ------------------------------------------------------------------

template <typename T>
void check_elementwise() {
  for (const Shape& s : kShapes) {
    const int64_t n = s.n, dim = s.dim, count = n * dim;
    const std::string at = std::to_string(n) + "x" + std::to_string(dim);
    const auto x = normal(static_cast<size_t>(count), 1), w = normal(static_cast<size_t>(dim), 2), dy = normal(static_cast<size_t>(count), 3);
    const auto dx0 = normal(static_cast<size_t>(count), 4), dw0 = normal(static_cast<size_t>(dim), 5);
    const double eps = 1e-6;

    // add_to
    std::vector<T> y = as<T>(dx0);
    const std::vector<T> xt = as<T>(x);
    add_to(y.data(), xt.data(), count);
    std::vector<double> sum(static_cast<size_t>(count));
    for (int64_t i = 0; i < count; ++i) sum[size_t(i)] = dx0[size_t(i)] + x[size_t(i)];
    EXPECT_LT(max_diff(y, sum), kEps<T> * 16) << "add_to " << at;

    // rmsnorm forward and backward: y = x r w, r = (mean x^2 + eps)^-1/2
    std::vector<double> ry(static_cast<size_t>(count)), rinv(static_cast<size_t>(n)), rdx = dx0, rdw = dw0;
    for (int64_t i = 0; i < n; ++i) {
      double ss = 0, dot = 0;
      for (int64_t k = 0; k < dim; ++k) ss += x[size_t(i * dim + k)] * x[size_t(i * dim + k)];
      const double r = 1 / std::sqrt(ss / double(dim) + eps);
      rinv[size_t(i)] = r;
      for (int64_t k = 0; k < dim; ++k) {
        ry[size_t(i * dim + k)] = x[size_t(i * dim + k)] * r * w[size_t(k)];
        dot += dy[size_t(i * dim + k)] * w[size_t(k)] * x[size_t(i * dim + k)];
      }
      for (int64_t k = 0; k < dim; ++k) {
        const size_t j = size_t(i * dim + k);
        rdx[j] += r * dy[j] * w[size_t(k)] - x[j] * r * r * r * dot / double(dim);
        rdw[size_t(k)] += dy[j] * x[j] * r;
      }
    }
    std::vector<T> yt(static_cast<size_t>(count)), inv(static_cast<size_t>(n)), dxt = as<T>(dx0), dwt = as<T>(dw0);
    const std::vector<T> wt = as<T>(w), dyt = as<T>(dy);
    rmsnorm_forward(xt.data(), wt.data(), yt.data(), inv.data(), n, dim, eps);
    EXPECT_LT(max_diff(yt, ry), kEps<T> * 64) << "rmsnorm_forward " << at;
    EXPECT_LT(max_diff(inv, rinv), kEps<T> * 64 * (1 + rinv[0])) << "rmsnorm_forward 1/rms " << at;
    rmsnorm_backward(dyt.data(), xt.data(), wt.data(), inv.data(), dxt.data(), dwt.data(), n, dim);
    EXPECT_LT(max_diff(dxt, rdx), kEps<T> * 64 * double(dim)) << "rmsnorm_backward dx " << at;
    EXPECT_LT(max_diff(dwt, rdw), kEps<T> * 64 * double(n) + kEps<T> * 16) << "rmsnorm_backward dw " << at;

    // swiglu: h = silu(a) b, silu(a) = a sigmoid(a)
    const auto b = normal(static_cast<size_t>(count), 6);
    std::vector<double> rh(static_cast<size_t>(count)), rda(static_cast<size_t>(count)), rdb(static_cast<size_t>(count));
    for (int64_t i = 0; i < count; ++i) {
      const double a = x[size_t(i)], sg = 1 / (1 + std::exp(-a)), silu = a * sg;
      rh[size_t(i)] = silu * b[size_t(i)];
      rdb[size_t(i)] = dy[size_t(i)] * silu;
      rda[size_t(i)] = dy[size_t(i)] * b[size_t(i)] * (sg + a * sg * (1 - sg));
    }
    std::vector<T> h(static_cast<size_t>(count)), da(static_cast<size_t>(count)), db(static_cast<size_t>(count));
    const std::vector<T> bt = as<T>(b);
    swiglu_forward(xt.data(), bt.data(), h.data(), count);
    swiglu_backward(dyt.data(), xt.data(), bt.data(), da.data(), db.data(), count);
    EXPECT_LT(max_diff(h, rh), kEps<T> * 64) << "swiglu_forward " << at;
    EXPECT_LT(max_diff(da, rda), kEps<T> * 128) << "swiglu_backward da " << at;
    EXPECT_LT(max_diff(db, rdb), kEps<T> * 64) << "swiglu_backward db " << at;
  }
}

TEST(BackendConformance, AddRmsnormSwiglu) {
  check_elementwise<float>();
  check_elementwise<double>();
}

template <typename T>
void check_softmax_and_loss() {
  for (const int64_t len : {1, 7, 1000}) {
    const auto z = normal(static_cast<size_t>(len), 1, 4.0), dp = normal(static_cast<size_t>(len), 2);
    double mx = *std::max_element(z.begin(), z.end()), total = 0;
    std::vector<double> p(static_cast<size_t>(len)), ds(static_cast<size_t>(len));
    for (int64_t i = 0; i < len; ++i) total += p[size_t(i)] = std::exp(z[size_t(i)] - mx);
    double dot = 0;
    for (int64_t i = 0; i < len; ++i) p[size_t(i)] /= total, dot += p[size_t(i)] * dp[size_t(i)];
    for (int64_t i = 0; i < len; ++i) ds[size_t(i)] = p[size_t(i)] * (dp[size_t(i)] - dot);
    std::vector<T> pt = as<T>(z), dst(static_cast<size_t>(len));
    const std::vector<T> dpt = as<T>(dp);
    softmax_forward(pt.data(), len);
    EXPECT_LT(max_diff(pt, p), kEps<T> * 64) << "softmax_forward " << len;
    softmax_backward(pt.data(), dpt.data(), dst.data(), len);
    EXPECT_LT(max_diff(dst, ds), kEps<T> * 64 * 8) << "softmax_backward " << len;
  }
  // cross_entropy over rows with ignored targets, scaled gradient.
  const int64_t n = 9, vocab = 1031;
  const double scale = 0.3;
  const auto logits = normal(static_cast<size_t>(n * vocab), 3, 3.0);
  std::vector<int32_t> targets(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) targets[size_t(i)] = i % 4 == 1 ? -1 : int32_t((i * 397) % vocab);
  double loss = 0;
  int64_t counted = 0;
  std::vector<double> dl(static_cast<size_t>(n * vocab), 0);
  for (int64_t i = 0; i < n; ++i) {
    if (targets[size_t(i)] < 0) continue;
    ++counted;
  }
  for (int64_t i = 0; i < n; ++i) {
    if (targets[size_t(i)] < 0) continue;
    const double* row = &logits[size_t(i * vocab)];
    const double mx = *std::max_element(row, row + vocab);
    double s = 0;
    for (int64_t v = 0; v < vocab; ++v) s += std::exp(row[v] - mx);
    loss += mx + std::log(s) - row[targets[size_t(i)]];
    for (int64_t v = 0; v < vocab; ++v)
      dl[size_t(i * vocab + v)] = (std::exp(row[v] - mx) / s - (v == targets[size_t(i)])) * scale / double(counted);
  }
  loss /= double(counted);
  const std::vector<T> lt = as<T>(logits);
  std::vector<T> dlt(dl.size(), T(5));
  EXPECT_NEAR(cross_entropy(lt.data(), targets.data(), n, vocab, dlt.data(), scale), loss, kEps<T> * 64 * loss)
      << "cross_entropy";
  EXPECT_LT(max_diff(dlt, dl), kEps<T> * 64) << "cross_entropy dlogits (ignored rows zero)";
  EXPECT_NEAR(cross_entropy<T>(lt.data(), targets.data(), n, vocab, nullptr), loss, kEps<T> * 64 * loss)
      << "cross_entropy without gradient";
}

TEST(BackendConformance, SoftmaxAndCrossEntropy) {
  check_softmax_and_loss<float>();
  check_softmax_and_loss<double>();
}

TEST(BackendConformance, EmbeddingOfF32AndBf16Tables) {
  const int64_t rows = 37, cols = 129;
  const auto t = normal(static_cast<size_t>(rows * cols), 1);
  const std::vector<float> f32 = as<float>(t);
  std::vector<uint16_t> bf16(f32.size());
  for (size_t i = 0; i < f32.size(); ++i) bf16[i] = f32_to_bf16(f32[i]);
  const int32_t ids[] = {0, 36, 5, 5, 17};
  for (const bool is_bf16 : {false, true}) {
    Mat m;
    m.dtype = is_bf16 ? DType::bf16 : DType::f32, m.rows = rows, m.cols = cols;
    m.data = is_bf16 ? reinterpret_cast<const uint8_t*>(bf16.data()) : reinterpret_cast<const uint8_t*>(f32.data());
    std::vector<float> out(5 * size_t(cols));
    embedding(m, ids, 5, out.data());
    for (int64_t i = 0; i < 5; ++i)
      for (int64_t k = 0; k < cols; ++k) {
        const size_t j = size_t(ids[i] * cols + k);
        ASSERT_EQ(out[size_t(i * cols + k)], is_bf16 ? bf16_to_f32(bf16[j]) : f32[j]) << i << " " << k;
      }
    const int32_t bad = int32_t(rows);
    EXPECT_ANY_THROW(embedding(m, &bad, 1, out.data()));
  }
}

// --- router top-k ------------------------------------------------------------------------

// The reference: nodes, then groups, ranked by a full stable sort, then every column sorted
// by (score descending, index ascending), the first k taken.
std::vector<int32_t> reference_top_k(const std::vector<double>& scores, int64_t n, int64_t columns, const TopK& t) {
  std::vector<int32_t> out;
  const int64_t per = columns / t.groups, per_node = columns / t.nodes;
  for (int64_t r = 0; r < n; ++r) {
    std::vector<double> row(scores.begin() + r * columns, scores.begin() + (r + 1) * columns);
    if (t.nodes > 1) {
      std::vector<std::pair<double, int64_t>> d;
      for (int64_t i = 0; i < t.nodes; ++i) {
        std::vector<double> members(row.begin() + i * per_node, row.begin() + (i + 1) * per_node);
        std::sort(members.rbegin(), members.rend());
        double score = 0;
        for (int64_t j = 0; j < t.node_best; ++j) score += members[size_t(j)];
        d.push_back({-score, i});
      }
      std::sort(d.begin(), d.end());  // best first, ties to the lower node
      for (int64_t i = t.top_nodes; i < t.nodes; ++i)
        for (int64_t j = 0; j < per_node; ++j) row[size_t(d[size_t(i)].second * per_node + j)] = -1e300;
    }
    if (t.groups > 1) {
      std::vector<std::pair<double, int64_t>> g;
      for (int64_t i = 0; i < t.groups; ++i) {
        std::vector<double> members(row.begin() + i * per, row.begin() + (i + 1) * per);
        std::sort(members.rbegin(), members.rend());
        const double score = t.group_score == GroupScore::best_two && per >= 2 ? members[0] + members[1] : members[0];
        g.push_back({-score, i});
      }
      std::sort(g.begin(), g.end());  // best first, ties to the lower group
      for (int64_t i = t.top_groups; i < t.groups; ++i)
        for (int64_t j = 0; j < per; ++j) row[size_t(g[size_t(i)].second * per + j)] = -1e300;
    }
    std::vector<int32_t> idx(static_cast<size_t>(columns));
    for (int64_t j = 0; j < columns; ++j) idx[size_t(j)] = int32_t(j);
    std::stable_sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) { return row[size_t(a)] > row[size_t(b)]; });
    out.insert(out.end(), idx.begin(), idx.begin() + t.k);
  }
  return out;
}

template <typename T>
void check_top_k() {
  const int64_t n = 70, columns = 24;  // past the rows' parallel threshold
  std::vector<double> scores = normal(static_cast<size_t>(n * columns), 1);
  for (size_t i = 0; i < scores.size(); i += 5) scores[i] = std::round(scores[i]);  // ties
  for (double& x : scores) x = double(T(x));
  const std::vector<T> st = as<T>(scores);
  const TopK cases[] = {{1, 1, 1, GroupScore::best},  {6, 1, 1, GroupScore::best},     {24, 1, 1, GroupScore::best},
                        {4, 4, 2, GroupScore::best_two}, {3, 8, 3, GroupScore::best}, {5, 24, 5, GroupScore::best_two},
                        // node-limited routing: alone, before groups, and covering every node (no limit)
                        {3, 1, 1, GroupScore::best, 4, 2, 1},   {4, 4, 2, GroupScore::best_two, 2, 1, 4},
                        {6, 8, 4, GroupScore::best, 4, 2, 3},   {4, 4, 2, GroupScore::best_two, 2, 2, 2}};
  for (const TopK& t : cases) {
    std::vector<int32_t> got(static_cast<size_t>(n * t.k));
    top_k_rows(st.data(), n, columns, t, got.data());
    EXPECT_EQ(got, reference_top_k(scores, n, columns, t))
        << "k " << t.k << " groups " << t.groups << " top " << t.top_groups << " nodes " << t.top_nodes << "/" << t.nodes;
    // Every token's experts on at most top_nodes nodes.
    for (int64_t r = 0; r < n; ++r) {
      std::vector<bool> used(static_cast<size_t>(t.nodes), false);
      for (int64_t j = 0; j < t.k; ++j) used[size_t(got[size_t(r * t.k + j)] / (columns / t.nodes))] = true;
      EXPECT_LE(std::count(used.begin(), used.end(), true), t.top_nodes);
    }
  }
  // Covering every node is today's routing exactly.
  std::vector<int32_t> all(static_cast<size_t>(n * 4)), plain(all.size());
  top_k_rows(st.data(), n, columns, TopK{4, 4, 2, GroupScore::best_two, 2, 2, 2}, all.data());
  top_k_rows(st.data(), n, columns, TopK{4, 4, 2, GroupScore::best_two}, plain.data());
  EXPECT_EQ(all, plain);
  std::vector<int32_t> out(64);
  EXPECT_ANY_THROW(top_k_rows(st.data(), 1, columns, TopK{25, 1, 1, GroupScore::best}, out.data()));  // k > columns
  EXPECT_ANY_THROW(top_k_rows(st.data(), 1, columns, TopK{2, 5, 1, GroupScore::best}, out.data()));   // uneven groups
  EXPECT_ANY_THROW(top_k_rows(st.data(), 1, columns, TopK{7, 4, 1, GroupScore::best}, out.data()));   // 7 > 1 group of 6
  EXPECT_ANY_THROW(top_k_rows(st.data(), 1, columns, TopK{7, 1, 1, GroupScore::best, 4, 1, 1}, out.data()));  // 7 > 1 node of 6
  EXPECT_ANY_THROW(top_k_rows(st.data(), 1, columns, TopK{2, 1, 1, GroupScore::best, 5, 1, 1}, out.data()));  // uneven nodes
  EXPECT_ANY_THROW(top_k_rows(st.data(), 1, columns, TopK{2, 6, 2, GroupScore::best, 4, 1, 1}, out.data()));  // groups across nodes
}

TEST(BackendConformance, RouterTopKWithAndWithoutGroupAndNodeLimits) {
  check_top_k<float>();
  check_top_k<double>();
}

// --- the optimiser step ------------------------------------------------------------------

TEST(BackendConformance, AdamWStepNormScaleZero) {
  // Tensors of 1, 7 and 70001 elements (past the parallel split), float32 moments.
  const int64_t sizes[] = {1, 7, 70001};
  const AdamWStep s{0.9f, 0.95f, 1e-8f, 3e-3f, 1 / (1 - 0.9f * 0.9f), 1 / std::sqrt(1 - 0.95f * 0.95f)};
  std::vector<std::vector<float>> w, g, m, v;
  std::vector<AdamWTensor> tensors;
  for (size_t t = 0; t < 3; ++t) {
    const size_t n = size_t(sizes[t]);
    w.push_back(as<float>(normal(n, 10 + t))), g.push_back(as<float>(normal(n, 20 + t)));
    m.push_back(as<float>(normal(n, 30 + t, 0.1)));
    std::vector<double> vv = normal(n, 40 + t, 0.1);
    for (double& x : vv) x = x * x;
    v.push_back(as<float>(vv));
  }
  const auto w0 = w, m0 = m, v0 = v;
  for (size_t t = 0; t < 3; ++t) {
    AdamWTensor a{w[t].data(), g[t].data(), sizes[t], t == 1 ? 1.0f : 1 - 3e-3f * 0.1f};
    a.m32 = m[t].data(), a.v32 = v[t].data();
    tensors.push_back(a);
  }
  adamw_step(tensors.data(), tensors.size(), s);
  for (size_t t = 0; t < 3; ++t) {
    const float decay = tensors[t].decay_factor;
    double worst = 0;
    for (size_t i = 0; i < w[t].size(); ++i) {
      const double gi = g[t][i];
      const double mi = double(s.beta1) * m0[t][i] + (1 - double(s.beta1)) * gi;
      const double vi = double(s.beta2) * v0[t][i] + (1 - double(s.beta2)) * gi * gi;
      const double wi =
          w0[t][i] * double(decay) - double(s.lr) * (mi * double(s.inv_bc1)) / (std::sqrt(vi) * double(s.inv_sqrt_bc2) + double(s.eps));
      EXPECT_NEAR(m[t][i], mi, 1e-6 * (1 + std::abs(mi)));
      EXPECT_NEAR(v[t][i], vi, 1e-6 * (1 + vi));
      worst = std::max(worst, std::abs(double(w[t][i]) - wi));
    }
    EXPECT_LT(worst, 1e-5) << "adamw_step tensor " << t;
  }

  // Gradient norm, scaling, zeroing over the same spans; the sum does not depend on threads.
  std::vector<FloatSpan> spans;
  double want = 0;
  for (auto& x : g) {
    spans.push_back({x.data(), int64_t(x.size())});
    for (float e : x) want += double(e) * double(e);
  }
  const double two = sum_of_squares(spans.data(), spans.size());
  set_num_threads(1);
  const double one = sum_of_squares(spans.data(), spans.size());
  set_num_threads(2);
  EXPECT_NEAR(two, want, 1e-9 * want);
  EXPECT_EQ(one, two);
  scale_spans(spans.data(), spans.size(), 0.5f);
  EXPECT_NEAR(sum_of_squares(spans.data(), spans.size()), want / 4, 1e-9 * want);
  zero_spans(spans.data(), spans.size());
  EXPECT_EQ(sum_of_squares(spans.data(), spans.size()), 0.0);
}

// The threaded reductions add their per-thread parts in a fixed order: the same inputs on
// the same threads give the same bits every time (training resumes bit-exactly).
TEST(BackendConformance, ThreadedReductionsAreDeterministic) {
  const int64_t n = 37, dim = 2049;
  const auto x = as<float>(normal(static_cast<size_t>(n * dim), 1)), w = as<float>(normal(static_cast<size_t>(dim), 2)),
             dy = as<float>(normal(static_cast<size_t>(n * dim), 3));
  std::vector<float> y(x.size()), inv(static_cast<size_t>(n));
  rmsnorm_forward(x.data(), w.data(), y.data(), inv.data(), n, dim, 1e-6);
  std::vector<std::vector<float>> dx(3, std::vector<float>(x.size(), 0)), dw(3, std::vector<float>(static_cast<size_t>(dim), 0));
  for (size_t r = 0; r < 3; ++r)
    rmsnorm_backward(dy.data(), x.data(), w.data(), inv.data(), dx[r].data(), dw[r].data(), n, dim);
  EXPECT_EQ(dx[0], dx[1]);
  EXPECT_EQ(dx[0], dx[2]);
  EXPECT_EQ(dw[0], dw[1]);
  EXPECT_EQ(dw[0], dw[2]);
}

}  // namespace
}  // namespace dsv3
