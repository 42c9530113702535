// The fast linear kernels (AVX-512 row kernels, dequantize + sgemm panels) against the
// scalar double-precision reference, on random weights in every stored dtype, with
// shapes that are not multiples of 16 or of the 128x128 FP8 block.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "backend/cpu/kernels.h"
#include "backend/ops.h"
#include "core/error.h"

namespace dsv3 {
namespace {

struct RandomMat {
  std::vector<uint8_t> bytes;
  std::vector<float> scales;
  Mat mat;
};

// Random weights of the given dtype; FP8 blocks get scales over four orders of magnitude,
// so a wrong block index shows.
RandomMat random_mat(DType dtype, int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  RandomMat m;
  m.bytes.resize(size_t(rows * cols) * dtype_size(dtype));
  for (int64_t i = 0; i < rows * cols; ++i) {
    const float v = normal(rng);
    switch (dtype) {
      case DType::f32: std::memcpy(&m.bytes[size_t(i) * 4], &v, 4); break;
      case DType::bf16: {
        uint16_t h = f32_to_bf16(v);
        std::memcpy(&m.bytes[size_t(i) * 2], &h, 2);
        break;
      }
      case DType::f16: {  // a random finite half: sign, exponent 1..29, mantissa
        uint16_t h = uint16_t((rng() & 0x8000) | ((1 + rng() % 29) << 10) | (rng() & 0x3ff));
        std::memcpy(&m.bytes[size_t(i) * 2], &h, 2);
        break;
      }
      case DType::f8_e4m3: {
        uint8_t code = uint8_t(rng() & 0xff);
        if ((code & 0x7f) == 0x7f) code = 0;  // no NaN codes in checkpoints
        m.bytes[size_t(i)] = code;
        break;
      }
      default: break;
    }
  }
  const int64_t sr = (rows + 127) / 128, sc = (cols + 127) / 128;
  if (dtype == DType::f8_e4m3) {
    m.scales.resize(size_t(std::max<int64_t>(1, sr * sc)));  // never empty: no columns still has scales
    for (auto& s : m.scales) s = std::ldexp(1.0f, int(rng() % 14) - 10);
  }
  m.mat = Mat{dtype, rows, cols, m.bytes.data(), m.scales.empty() ? nullptr : m.scales.data(), 0, sc};
  return m;
}

std::vector<float> random_vec(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

// Error bound for float32 accumulation: relative to the sum of |terms|.
void expect_close(const std::vector<float>& got, const std::vector<float>& want, float scale, const std::string& what) {
  float worst = 0;
  for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::abs(got[i] - want[i]));
  EXPECT_LE(worst, 2e-5f * scale) << what;
}

float max_abs(const std::vector<float>& v) {
  float m = 0;
  for (float x : v) m = std::max(m, std::abs(x));
  return m;
}

struct Shape {
  int64_t rows, cols, n;
};

class LinearVsReference : public testing::TestWithParam<std::tuple<DType, Shape>> {};

TEST_P(LinearVsReference, ForwardAndTransposed) {
  const auto [dtype, s] = GetParam();
  RandomMat w = random_mat(dtype, s.rows, s.cols, 7);
  const auto x = random_vec(size_t(s.n * s.cols), 11);
  std::vector<float> y(size_t(s.n * s.rows)), ref(y.size());
  linear(x.data(), s.n, w.mat, y.data());
  linear_reference(x.data(), s.n, w.mat, ref.data());
  expect_close(y, ref, max_abs(ref) + 1, "linear");

  const auto xt = random_vec(size_t(s.n * s.rows), 13);
  std::vector<float> yt(size_t(s.n * s.cols)), reft(yt.size());
  linear_t(xt.data(), s.n, w.mat, yt.data());
  linear_t_reference(xt.data(), s.n, w.mat, reft.data());
  expect_close(yt, reft, max_abs(reft) + 1, "linear_t");
}

// A row slice that starts inside an FP8 block must pick that block's scales.
TEST_P(LinearVsReference, RowSlice) {
  const auto [dtype, shape] = GetParam();
  const Shape s{std::max<int64_t>(shape.rows, 200), shape.cols, shape.n};  // room for a slice inside a block
  RandomMat w = random_mat(dtype, s.rows, s.cols, 3);
  const Mat slice = w.mat.row_slice(s.rows / 3, s.rows / 2);
  const auto x = random_vec(size_t(s.n * s.cols), 5);
  std::vector<float> y(size_t(s.n * slice.rows)), ref(y.size());
  linear(x.data(), s.n, slice, y.data());
  linear_reference(x.data(), s.n, slice, ref.data());
  expect_close(y, ref, max_abs(ref) + 1, "slice");
}

std::string param_name(const testing::TestParamInfo<std::tuple<DType, Shape>>& info) {
  const auto [dtype, s] = info.param;
  return std::string(dtype_name(dtype)) + "_" + std::to_string(s.rows) + "x" + std::to_string(s.cols) + "_n" +
         std::to_string(s.n);
}

INSTANTIATE_TEST_SUITE_P(
    Kernels, LinearVsReference,
    testing::Combine(testing::Values(DType::f32, DType::bf16, DType::f16, DType::f8_e4m3),
                     testing::Values(Shape{1, 1, 1}, Shape{37, 19, 1}, Shape{130, 200, 1}, Shape{300, 257, 3},
                                     Shape{129, 385, 8}, Shape{260, 140, 9}, Shape{700, 300, 33})),
    param_name);

// The AVX-512 row kernels against their scalar twins, directly.
TEST(RowKernels, Avx512MatchesScalar) {
  if (!cpu::avx512_available()) GTEST_SKIP() << "no AVX-512 on this CPU";
  const auto& fast = cpu::avx512_kernels();
  const auto& slow = cpu::scalar_kernels();
  for (DType dtype : {DType::bf16, DType::f8_e4m3}) {
    for (int64_t len : {1, 15, 16, 17, 100, 128, 1000}) {
      RandomMat w = random_mat(dtype, 1, len, uint32_t(len));
      const auto x = random_vec(size_t(len * 5), 9);
      float a[5] = {}, b[5] = {};
      const bool fp8 = dtype == DType::f8_e4m3;
      (fp8 ? fast.dot_fp8 : fast.dot_bf16)(w.bytes.data(), x.data(), len, 5, len, a);
      (fp8 ? slow.dot_fp8 : slow.dot_bf16)(w.bytes.data(), x.data(), len, 5, len, b);
      for (int j = 0; j < 5; ++j) EXPECT_NEAR(a[j], b[j], 1e-4f * (std::abs(b[j]) + 1)) << len;
      std::vector<float> ya(static_cast<size_t>(len), 1.0f), yb(ya), ca(static_cast<size_t>(len)), cb(ca);
      (fp8 ? fast.axpy_fp8 : fast.axpy_bf16)(0.5f, w.bytes.data(), ya.data(), len);
      (fp8 ? slow.axpy_fp8 : slow.axpy_bf16)(0.5f, w.bytes.data(), yb.data(), len);
      (fp8 ? fast.convert_fp8 : fast.convert_bf16)(w.bytes.data(), ca.data(), len);
      (fp8 ? slow.convert_fp8 : slow.convert_bf16)(w.bytes.data(), cb.data(), len);
      for (int64_t k = 0; k < len; ++k) {
        EXPECT_FLOAT_EQ(ya[size_t(k)], yb[size_t(k)]);
        EXPECT_EQ(ca[size_t(k)], cb[size_t(k)]);  // decoding is exact
      }
    }
  }
}

TEST(Ops, RmsnormSoftmaxSwigluByHand) {
  std::vector<float> x = {1, -2, 3, -4}, w = {1, 1, 2, 0.5f}, out(4), inv(1);
  rmsnorm_forward(x.data(), w.data(), out.data(), inv.data(), 1, 4, 0.0);
  const float expect_inv = 1.0f / std::sqrt(30.0f / 4);
  EXPECT_FLOAT_EQ(inv[0], expect_inv);
  EXPECT_FLOAT_EQ(out[2], 3 * expect_inv * 2);
  std::vector<float> s = {1000, 1000, -1000};
  softmax_forward(s.data(), 3);
  EXPECT_FLOAT_EQ(s[0], 0.5f);
  EXPECT_EQ(s[2], 0.0f);
  std::vector<float> a = {0.0f, 2.0f}, b = {3.0f, 1.0f}, h(2);
  swiglu_forward(a.data(), b.data(), h.data(), 2);
  EXPECT_EQ(h[0], 0.0f);
  EXPECT_FLOAT_EQ(h[1], 2.0f / (1.0f + std::exp(-2.0f)));
}


// The AMX products (many rows, BF16 and FP8 weights) against their scalar twin and the
// double reference, at shapes that are not multiples of the tile sizes (16 rows, 16 tokens,
// 32 features) or of the 128x128 FP8 block, on slices that start inside a block, and as
// one grouped call over jobs of different shapes.
TEST(AmxKernels, MatchScalarTwinAndReference) {
  // Without AMX (another CPU, or DSV3_AMX=0) only the twin is checked against the reference.
  const bool amx = cpu::amx_available();
  struct Case {
    int64_t rows, cols, n, first;
  };
  const Case cases[] = {{37, 19, 9, 0}, {130, 200, 17, 0}, {300, 257, 33, 0}, {129, 385, 40, 0},
                        {260, 140, 2, 0}, {1, 32, 16, 0},  {200, 300, 31, 50}, {64, 640, 48, 0},
                        {150, 256, 40, 70}, {20, 0, 7, 0}};  // the last: no input features, y = 0
  for (DType dtype : {DType::bf16, DType::f8_e4m3}) {
    std::vector<RandomMat> mats;
    std::vector<std::vector<float>> xs, ys;
    std::vector<LinearJob> jobs;
    for (const Case& c : cases) mats.push_back(random_mat(dtype, c.rows + c.first, c.cols, uint32_t(c.rows * 7 + c.cols)));
    for (size_t i = 0; i < std::size(cases); ++i) {
      const Case& c = cases[i];
      xs.push_back(random_vec(size_t(c.n * c.cols), uint32_t(i + 1)));
      ys.emplace_back(size_t(c.n * c.rows), -1.0f);
    }
    for (size_t i = 0; i < std::size(cases); ++i)
      jobs.push_back({xs[i].data(), cases[i].n, mats[i].mat.row_slice(cases[i].first, cases[i].rows), ys[i].data()});
    if (amx) cpu::linear_amx(jobs.data(), jobs.size());  // all at once, as linear_batch groups them
    for (size_t i = 0; i < std::size(cases); ++i) {
      const Case& c = cases[i];
      const std::string what = cat(dtype_name(dtype), " ", c.rows, "x", c.cols, " n=", c.n, " from row ", c.first);
      std::vector<float> twin(ys[i].size()), ref(ys[i].size()), alone(ys[i].size());
      cpu::linear_amx_scalar(xs[i].data(), c.n, jobs[i].w, twin.data());
      linear_reference(xs[i].data(), c.n, jobs[i].w, ref.data());
      // Float32 sums in other orders: the split into three BF16 parts loses nothing.
      const float scale = max_abs(ref) + 1;
      auto worst = [](const std::vector<float>& a, const std::vector<float>& b) {
        float w = 0;
        for (size_t e = 0; e < a.size(); ++e) w = std::max(w, std::abs(a[e] - b[e]));
        return w;
      };
      EXPECT_LE(worst(twin, ref), 2e-6f * scale) << what;
      if (!amx) continue;
      EXPECT_LE(worst(ys[i], twin), 2e-6f * scale) << what;
      EXPECT_LE(worst(ys[i], ref), 2e-6f * scale) << what;
      LinearJob single = jobs[i];
      single.y = alone.data();
      cpu::linear_amx(&single, 1);
      EXPECT_EQ(alone, ys[i]) << what << ": grouped and alone differ";
    }
  }
}

}  // namespace
}  // namespace dsv3
