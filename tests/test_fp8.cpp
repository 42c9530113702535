// FP8 (issue 5): tile/block quantisation and scales on edge cases (zeros, outliers, FP8 and
// float subnormals, exactly +-448 * scale, NaN/Inf -> error naming the position), the
// emulated FP8 GEMM against a float64 reference of its dequantised inputs within the bound
// each accumulator implies, the fast kernel against its scalar twin, promotion vs none at
// K = 4096 (the paper's motivation), and the three training GEMMs.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <tuple>
#include <vector>

#include "backend/cpu/fp8_kernels.h"
#include "backend/cpu/kernels.h"
#include "backend/fp8.h"
#include "backend/saved_activation.h"
#include "core/dtype.h"
#include "core/error.h"

namespace dsv3 {
namespace {

using ::testing::HasSubstr;

constexpr Fp8Tiling kTilings[] = {Fp8Tiling::row_tiles_1x128, Fp8Tiling::col_tiles_128x1, Fp8Tiling::blocks_128x128};

std::vector<float> random_normal(size_t count, uint32_t seed, float sigma = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, sigma);
  std::vector<float> v(count);
  for (float& x : v) x = d(rng);
  return v;
}

// Random values whose magnitude varies by orders of magnitude between rows and columns, so
// that every tile has its own scale.
std::vector<float> random_scaled(int64_t rows, int64_t cols, uint32_t seed) {
  std::vector<float> v = random_normal(size_t(rows * cols), seed);
  std::mt19937 rng(seed + 1);
  std::uniform_real_distribution<float> e(-8.0f, 8.0f);
  std::vector<float> row_f(static_cast<size_t>(rows)), col_f(static_cast<size_t>(cols));
  for (float& f : row_f) f = std::exp2(e(rng));
  for (float& f : col_f) f = std::exp2(e(rng));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) v[size_t(r * cols + c)] *= row_f[size_t(r)] * col_f[size_t(c)];
  return v;
}

// The scale index of element (r, c), written out independently of fp8.cpp.
std::pair<int64_t, int64_t> tile_of(Fp8Tiling t, int64_t r, int64_t c) {
  switch (t) {
    case Fp8Tiling::row_tiles_1x128: return {r, c / 128};
    case Fp8Tiling::col_tiles_128x1: return {r / 128, c};
    case Fp8Tiling::blocks_128x128: return {r / 128, c / 128};
  }
  return {0, 0};
}

// Half the spacing of the FP8 grid at magnitude v (in code units): the quantisation bound.
double half_ulp(Fp8Format f, double v) {
  const int man = f == Fp8Format::e4m3 ? 3 : 2, emin = f == Fp8Format::e4m3 ? -6 : -14;
  const int e = v > 0 ? std::max(std::ilogb(v), emin) : emin;
  return std::ldexp(1.0, e - man - 1);
}

// The dequantised tensor in float64: decode(code) * scale, exact.
std::vector<double> dequantized(const Fp8Tensor& t) {
  std::vector<double> v(size_t(t.rows * t.cols));
  for (int64_t r = 0; r < t.rows; ++r)
    for (int64_t c = 0; c < t.cols; ++c)
      v[size_t(r * t.cols + c)] = double(fp8_decode(t.format, t.codes[size_t(r * t.cols + c)])) * double(t.scale(r, c));
  return v;
}

// Every element of a quantised tensor is within half an FP8 ulp (of x / scale) times scale
// of x, up to the float rounding of x / scale and of the dequantised product.
void expect_within_half_ulp(const Fp8Tensor& q, const std::vector<float>& x, const char* what) {
  std::vector<float> deq(x.size());
  dequantize(q, deq.data());
  int bad = 0;
  for (int64_t r = 0; r < q.rows; ++r)
    for (int64_t c = 0; c < q.cols; ++c) {
      const size_t i = size_t(r * q.cols + c);
      const double s = q.scale(r, c), xv = x[i];
      const double bound = half_ulp(q.format, std::fabs(xv) / s) * s + std::ldexp(std::fabs(xv), -22) + 1e-45;
      if (!(std::fabs(double(deq[i]) - xv) <= bound) && ++bad < 5)
        ADD_FAILURE() << what << ": element (" << r << ", " << c << ") x = " << xv << " dequantised " << deq[i]
                      << " scale " << s << " bound " << bound;
      if (deq[i] != q.value(r, c)) ++bad;
    }
  EXPECT_EQ(bad, 0) << what;
}

// ---- Quantisation ----------------------------------------------------------------------

TEST(Fp8Quantize, ScalesAreMaxAbsOver448PerTile) {
  const int64_t rows = 300, cols = 260;  // partial tiles at both edges
  const std::vector<float> x = random_scaled(rows, cols, 1);
  for (Fp8Tiling tiling : kTilings)
    for (Fp8Format fmt : {Fp8Format::e4m3, Fp8Format::e5m2}) {
      const Fp8Tensor q = quantize(x.data(), rows, cols, tiling, fmt);
      const int64_t sr = tiling == Fp8Tiling::row_tiles_1x128 ? rows : 3;
      const int64_t sc = tiling == Fp8Tiling::col_tiles_128x1 ? cols : 3;
      ASSERT_EQ(q.scale_rows(), sr);
      ASSERT_EQ(q.scale_cols(), sc);
      ASSERT_EQ(q.scales.size(), size_t(sr * sc));
      std::vector<float> amax(size_t(sr * sc), 0.0f);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) {
          auto [i, j] = tile_of(tiling, r, c);
          amax[size_t(i * sc + j)] = std::max(amax[size_t(i * sc + j)], std::fabs(x[size_t(r * cols + c)]));
        }
      const float fmax = fmt == Fp8Format::e4m3 ? 448.0f : 57344.0f;
      for (size_t t = 0; t < amax.size(); ++t) ASSERT_EQ(q.scales[t], amax[t] / fmax) << "tile " << t;
      // The largest magnitude of every tile maps to the largest finite code.
      const uint8_t max_code = fmt == Fp8Format::e4m3 ? 0x7e : 0x7b;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) {
          auto [i, j] = tile_of(tiling, r, c);
          if (std::fabs(x[size_t(r * cols + c)]) == amax[size_t(i * sc + j)]) {
            EXPECT_EQ(q.codes[size_t(r * cols + c)] & 0x7f, max_code);
          }
        }
      expect_within_half_ulp(q, x, "random scaled");
    }
}

TEST(Fp8Quantize, ZeroTilesGetScaleOneAndExactZeros) {
  const int64_t rows = 130, cols = 200;
  std::vector<float> x(size_t(rows * cols), 0.0f);
  x[size_t(129 * cols + 199)] = -3.0f;  // one non-zero tile in each tiling (the last)
  x[5] = -0.0f;
  for (Fp8Tiling tiling : kTilings) {
    const Fp8Tensor q = quantize(x.data(), rows, cols, tiling);
    std::vector<float> deq(x.size());
    dequantize(q, deq.data());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const bool nonzero = r == 129 && c == 199;
        const size_t i = size_t(r * cols + c);
        ASSERT_EQ(deq[i], x[i]) << r << ", " << c;
        if (!nonzero) {
          ASSERT_EQ(q.codes[i] & 0x7f, 0);
        } else {
          EXPECT_EQ(q.codes[i], 0xfe);
          EXPECT_EQ(q.scale(r, c), 3.0f / 448.0f);
        }
      }
    for (size_t t = 0; t + 1 < q.scales.size(); ++t) EXPECT_EQ(q.scales[t], 1.0f) << "all-zero tile " << t;
  }
}

TEST(Fp8Quantize, OutlierCostsItsTilePrecisionButNothingOverflows) {
  // One row of 256: values ~1 with a 1e6 outlier in the first 1x128 tile. In that tile the
  // scale is 1e6/448, so the small values fall below E4M3's smallest subnormal times the
  // scale and flush to (near) zero; the second tile keeps its precision.
  std::vector<float> x = random_normal(256, 2);
  x[17] = 1e6f;
  const Fp8Tensor q = quantize(x.data(), 1, 256, Fp8Tiling::row_tiles_1x128);
  EXPECT_EQ(q.scales[0], 1e6f / 448.0f);
  EXPECT_EQ(q.codes[17], 0x7e);
  std::vector<float> deq(256);
  dequantize(q, deq.data());
  EXPECT_NEAR(deq[17], 1e6, 1e6 * 1e-6);
  const double s0 = q.scales[0];
  for (int c = 0; c < 128; ++c) {
    EXPECT_TRUE(std::isfinite(deq[size_t(c)]));
    if (c != 17) {
      EXPECT_LE(std::fabs(deq[size_t(c)] - x[size_t(c)]), std::ldexp(s0, -10) * 1.0001) << c;
    }
  }
  for (int c = 128; c < 256; ++c)  // the other tile: relative error <= 2^-4 (normals)
    if (std::fabs(x[size_t(c)]) / q.scales[1] >= std::ldexp(1.0, -6)) {
      EXPECT_LE(std::fabs(deq[size_t(c)] - x[size_t(c)]), std::ldexp(std::fabs(x[size_t(c)]), -4)) << c;
    }
  expect_within_half_ulp(q, x, "outlier");
}

TEST(Fp8Quantize, PerTensorScalingGivesEveryTileTheTensorScale) {
  const int64_t rows = 300, cols = 260;
  const std::vector<float> x = random_scaled(rows, cols, 3);
  float amax = 0;
  for (float v : x) amax = std::max(amax, std::fabs(v));
  for (Fp8Tiling tiling : kTilings) {
    const Fp8Tensor q = quantize(x.data(), rows, cols, tiling, Fp8Format::e4m3, Fp8Scaling::per_tensor);
    const Fp8Tensor fine = quantize(x.data(), rows, cols, tiling, Fp8Format::e4m3);
    ASSERT_EQ(q.scales.size(), fine.scales.size());  // the same layout
    for (float s : q.scales) ASSERT_EQ(s, amax / 448.0f);
    expect_within_half_ulp(q, x, "per-tensor");
  }
}

TEST(Fp8Quantize, Fp8SubnormalsAndFloatSubnormals) {
  // max 448 -> scale exactly 1: k * 2^-9 are E4M3's subnormals, exact; 2.5 * 2^-9 is a tie -> 2 * 2^-9.
  std::vector<float> x(128, 0.0f);
  x[0] = 448.0f;
  for (int k = 1; k <= 7; ++k) x[size_t(k)] = -std::ldexp(float(k), -9);
  x[8] = std::ldexp(2.5f, -9);
  x[9] = std::ldexp(0.5f, -9);               // half the smallest subnormal: tie with 0
  x[10] = std::ldexp(0.5f, -9) * 1.0001f;    // just above: the smallest subnormal
  const Fp8Tensor q = quantize(x.data(), 1, 128, Fp8Tiling::row_tiles_1x128);
  ASSERT_EQ(q.scales[0], 1.0f);
  for (int k = 1; k <= 7; ++k) EXPECT_EQ(q.codes[size_t(k)], 0x80 | k);
  EXPECT_EQ(q.codes[8], 0x02);
  EXPECT_EQ(q.codes[9], 0x00);
  EXPECT_EQ(q.codes[10], 0x01);

  // Tiles far down in float's range: 1e-30 (scale 1e-30/448 is a normal float) keeps full
  // precision; 1e-38 and float subnormals (max|x| < 448 * FLT_MIN) use scale FLT_MIN.
  for (float mag : {1e-30f, 1e-38f, 1e-42f}) {
    std::vector<float> y = random_normal(256, 3);
    for (float& v : y) v *= mag;
    for (Fp8Tiling tiling : kTilings) {
      const Fp8Tensor qy = quantize(y.data(), 2, 128, tiling);
      for (float s : qy.scales) {
        EXPECT_TRUE(std::isnormal(s)) << mag;
        EXPECT_GE(s, FLT_MIN);
      }
      expect_within_half_ulp(qy, y, "tiny");
    }
  }
}

TEST(Fp8Quantize, ValuesExactlyAtPlusMinus448TimesScale) {
  // max|x| = 448 * 2^-3: scale is exactly 2^-3 and +-max encode to +-448 (0x7e / 0xfe).
  std::vector<float> x = random_normal(2 * 128, 4, 0.1f);
  x[3] = 56.0f;
  x[100] = -56.0f;
  x[128 + 50] = -56.0f;  // second row: only the negative extreme
  for (Fp8Tiling tiling : {Fp8Tiling::row_tiles_1x128, Fp8Tiling::blocks_128x128}) {
    const Fp8Tensor q = quantize(x.data(), 2, 128, tiling);
    for (float s : q.scales) EXPECT_EQ(s, 0.125f);
    EXPECT_EQ(q.codes[3], 0x7e);
    EXPECT_EQ(q.codes[100], 0xfe);
    EXPECT_EQ(q.codes[128 + 50], 0xfe);
    EXPECT_EQ(q.value(0, 3), 56.0f);
    EXPECT_EQ(q.value(0, 100), -56.0f);
    EXPECT_EQ(q.value(1, 50), -56.0f);
  }
}

TEST(Fp8Quantize, NonFiniteInputIsAnErrorNamingItsPosition) {
  const int64_t rows = 200, cols = 300;
  for (float bad : {NAN, INFINITY, -INFINITY})
    for (Fp8Tiling tiling : kTilings) {
      std::vector<float> x = random_normal(size_t(rows * cols), 5);
      x[size_t(150 * cols + 7)] = bad;
      x[size_t(150 * cols + 290)] = bad;  // a later one: the first is named
      x[size_t(199 * cols + 0)] = bad;
      try {
        quantize(x.data(), rows, cols, tiling);
        ADD_FAILURE() << "no error for " << bad;
      } catch (const Error& e) {
        EXPECT_THAT(e.what(), HasSubstr("at row 150, column 7 of a [200, 300] tensor")) << e.what();
        EXPECT_THAT(e.what(), HasSubstr("non-finite value")) << e.what();
      }
    }
}

TEST(Fp8Quantize, TransposeMovesCodesAndScales) {
  const int64_t rows = 300, cols = 140;
  const std::vector<float> x = random_scaled(rows, cols, 6);
  std::vector<float> xt(x.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) xt[size_t(c * rows + r)] = x[size_t(r * cols + c)];
  for (Fp8Tiling tiling : kTilings) {
    const Fp8Tensor q = quantize(x.data(), rows, cols, tiling);
    const Fp8Tensor t = transpose(q);
    ASSERT_EQ(t.rows, cols);
    ASSERT_EQ(t.cols, rows);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) ASSERT_EQ(t.value(c, r), q.value(r, c));
    const Fp8Tensor back = transpose(t);
    EXPECT_EQ(back.codes, q.codes);
    EXPECT_EQ(back.scales, q.scales);
    EXPECT_EQ(back.tiling, q.tiling);
    // Quantising x with 128x1 tiles and transposing = quantising x^T with 1x128 tiles (Wgrad).
    const Fp8Tiling other = tiling == Fp8Tiling::row_tiles_1x128   ? Fp8Tiling::col_tiles_128x1
                            : tiling == Fp8Tiling::col_tiles_128x1 ? Fp8Tiling::row_tiles_1x128
                                                                   : Fp8Tiling::blocks_128x128;
    const Fp8Tensor direct = quantize(xt.data(), cols, rows, other);
    EXPECT_EQ(direct.codes, t.codes);
    EXPECT_EQ(direct.scales, t.scales);
    EXPECT_EQ(direct.tiling, t.tiling);
  }
}

TEST(Fp8Quantize, E5m2HasTwiceTheRelativeErrorOfE4m3) {
  const std::vector<float> x = random_normal(256 * 256, 7);
  double err[2] = {0, 0}, norm = 0;
  for (int f = 0; f < 2; ++f) {
    const Fp8Tensor q = quantize(x.data(), 256, 256, Fp8Tiling::row_tiles_1x128, f ? Fp8Format::e5m2 : Fp8Format::e4m3);
    const std::vector<double> d = dequantized(q);
    for (size_t i = 0; i < x.size(); ++i) err[f] += (d[i] - x[i]) * (d[i] - x[i]);
    expect_within_half_ulp(q, x, f ? "e5m2" : "e4m3");
  }
  for (float v : x) norm += double(v) * v;
  const double e4 = std::sqrt(err[0] / norm), e5 = std::sqrt(err[1] / norm);
  std::printf("relative RMS quantisation error on N(0,1), 1x128 tiles: E4M3 %.4f, E5M2 %.4f\n", e4, e5);
  EXPECT_GT(e5, 1.7 * e4);
  EXPECT_LT(e4, 0.04);
}

// ---- The emulated GEMM -----------------------------------------------------------------

// ref[i, j] = sum_k a[i, k] b[j, k] in float64 from the dequantised inputs, and the sum of
// |a||b| (the scale of every error bound).
struct Reference {
  std::vector<double> c, abs;
};
Reference reference(const Fp8Tensor& a, const Fp8Tensor& b) {
  const std::vector<double> da = dequantized(a), db = dequantized(b);
  Reference ref{std::vector<double>(size_t(a.rows * b.rows)), std::vector<double>(size_t(a.rows * b.rows))};
  for (int64_t i = 0; i < a.rows; ++i)
    for (int64_t j = 0; j < b.rows; ++j) {
      double s = 0, sa = 0;
      for (int64_t k = 0; k < a.cols; ++k) {
        const double p = da[size_t(i * a.cols + k)] * db[size_t(j * a.cols + k)];
        s += p;
        sa += std::fabs(p);
      }
      ref.c[size_t(i * b.rows + j)] = s, ref.abs[size_t(i * b.rows + j)] = sa;
    }
  return ref;
}

// The worst-case relative bound (times sum |a||b|) of the emulated accumulation with N_C
// dividing 128: within a chunk, n_c roundings of the p-bit accumulator (the first one, of a
// single product, is exact when p >= 7), each off by less than one ulp (truncate: < 2^-p
// relative) or half of one (nearest), compounded over the chunk; then fl(sa * sb), its
// product with the partial sum and ceil(K / n_c) additions in FP32, 2^-24 each.
double accumulation_bound(const Fp8GemmOptions& opt, int64_t k) {
  const double u_lim = std::ldexp(1.0, -opt.acc_mantissa_bits - (opt.acc_rounding == Fp8AccRounding::truncate ? 0 : 1));
  const int n_c = opt.promote_every;
  const double chunk = n_c * u_lim * std::pow(1 + u_lim, n_c);
  const double promotions = double((k + n_c - 1) / n_c);
  return (chunk + (2 + promotions) * std::ldexp(1.0, -24)) * 1.01;
}

// Max over elements of |c - ref| / sum|a||b|, and ||c - ref|| / ||ref||.
struct ErrorStats {
  double max_rel_abs = 0, rel_norm = 0, max_rel = 0;
};
ErrorStats errors(const std::vector<float>& c, const Reference& ref) {
  ErrorStats e;
  double num = 0, den = 0;
  for (size_t i = 0; i < c.size(); ++i) {
    const double d = std::fabs(double(c[i]) - ref.c[i]);
    e.max_rel_abs = std::max(e.max_rel_abs, d / ref.abs[i]);
    if (ref.c[i] != 0) e.max_rel = std::max(e.max_rel, d / std::fabs(ref.c[i]));
    num += d * d, den += ref.c[i] * ref.c[i];
  }
  e.rel_norm = std::sqrt(num / den);
  return e;
}

void expect_within_bound(const std::vector<float>& c, const Reference& ref, double bound, const char* what) {
  int bad = 0;
  for (size_t i = 0; i < c.size(); ++i)
    if (!(std::fabs(double(c[i]) - ref.c[i]) <= bound * ref.abs[i]) && ++bad <= 5)
      ADD_FAILURE() << what << ": element " << i << " = " << c[i] << ", reference " << ref.c[i] << ", bound "
                    << bound * ref.abs[i];
}

Fp8Tensor random_fp8(int64_t rows, int64_t cols, Fp8Tiling tiling, uint32_t seed, Fp8Format f = Fp8Format::e4m3) {
  const std::vector<float> x = random_scaled(rows, cols, seed);
  return quantize(x.data(), rows, cols, tiling, f);
}

TEST(Fp8Gemm, FastKernelsMatchTheirScalarTwin) {
  const Fp8GemmOptions options[] = {
      kFp8DeepSeek,
      kFp8Fp32Accumulate,
      {.promote_every = 128, .acc_mantissa_bits = 14, .acc_rounding = Fp8AccRounding::nearest_even},
      {.promote_every = 32, .acc_mantissa_bits = 10},
      {.promote_every = 1, .acc_mantissa_bits = 3},
      {.promote_every = 128, .acc_mantissa_bits = 23},
  };
  const std::pair<Fp8Tiling, Fp8Tiling> tilings[] = {{Fp8Tiling::row_tiles_1x128, Fp8Tiling::blocks_128x128},
                                                     {Fp8Tiling::blocks_128x128, Fp8Tiling::row_tiles_1x128}};
  // Odd shapes: partial row blocks, column panels and K tiles in every kernel; the second
  // spans several row tasks of the AVX-512 kernel.
  for (const auto& [m, n, k] : {std::tuple<int64_t, int64_t, int64_t>{37, 45, 300}, {150, 70, 256}})
    for (const auto& [ta, tb] : tilings) {
      const Fp8Tensor a = random_fp8(m, k, ta, uint32_t(10 + m)), b = random_fp8(n, k, tb, uint32_t(11 + n));
      for (const Fp8GemmOptions& opt : options) {
        std::vector<float> slow(size_t(m * n)), fast(size_t(m * n)), portable(size_t(m * n), NAN);
        fp8_gemm_reference(a, b, slow.data(), opt);
        fp8_gemm(a, b, fast.data(), opt);
        cpu::fp8_gemm_e4m3_portable(a, b, portable.data(), opt);
        ASSERT_EQ(std::memcmp(fast.data(), slow.data(), slow.size() * 4), 0)
            << "fp8_gemm: N_C " << opt.promote_every << " bits " << opt.acc_mantissa_bits;
        ASSERT_EQ(std::memcmp(portable.data(), slow.data(), slow.size() * 4), 0)
            << "portable kernel: N_C " << opt.promote_every << " bits " << opt.acc_mantissa_bits;
        if (cpu::avx512_available()) {
          std::vector<float> avx512(size_t(m * n), NAN);
          cpu::fp8_gemm_e4m3_avx512(a, b, avx512.data(), opt);
          ASSERT_EQ(std::memcmp(avx512.data(), slow.data(), slow.size() * 4), 0)
              << "AVX-512 kernel: N_C " << opt.promote_every << " bits " << opt.acc_mantissa_bits;
        }
        expect_within_bound(fast, reference(a, b), accumulation_bound(opt, k), "fast kernel");
      }
    }
}

// The AVX-512 kernel runs the truncating accumulator in FP32 (an FMA rounded toward zero, then
// the dropped bits cleared), which equals truncating the exact sum only if the two roundings
// nest. Checked against the scalar twin on every finite code, as products with every other
// code, in long same-sign runs (the accumulator climbs through binades) and in cancelling
// ones, for every accumulator width 1..23 and both promotion intervals.
TEST(Fp8Gemm, TruncatingKernelAgreesOnEveryCodeAndWidth) {
  if (!cpu::avx512_available()) GTEST_SKIP() << "no AVX-512 here";
  std::vector<uint8_t> finite;  // every E4M3 code but the two NaNs
  for (int q = 0; q < 256; ++q)
    if ((q & 0x7f) != 0x7f) finite.push_back(uint8_t(q));
  const int64_t k = int64_t(finite.size()), m = 12, n = 37;
  std::mt19937 rng(7);
  auto make = [&](int64_t rows, Fp8Tiling tiling, int same_sign_rows) {
    Fp8Tensor t;
    t.rows = rows, t.cols = k, t.tiling = tiling;
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<uint8_t> row = finite;
      std::shuffle(row.begin(), row.end(), rng);
      if (r < same_sign_rows)
        for (uint8_t& q : row) q &= 0x7f;  // all positive: the sum only grows
      t.codes.insert(t.codes.end(), row.begin(), row.end());
    }
    t.scales.resize(size_t(t.scale_rows() * t.scale_cols()));
    std::uniform_real_distribution<float> e(-6.0f, 6.0f);
    for (float& sc : t.scales) sc = std::exp2(e(rng));
    return t;
  };
  const Fp8Tensor a = make(m, Fp8Tiling::row_tiles_1x128, 4), b = make(n, Fp8Tiling::blocks_128x128, 9);
  for (int promote : {128, 16})
    for (int bits = 1; bits <= 23; ++bits) {
      const Fp8GemmOptions opt{.promote_every = promote, .acc_mantissa_bits = bits};
      std::vector<float> slow(size_t(m * n)), fast(size_t(m * n), NAN);
      fp8_gemm_reference(a, b, slow.data(), opt);
      cpu::fp8_gemm_e4m3_avx512(a, b, fast.data(), opt);
      ASSERT_EQ(std::memcmp(fast.data(), slow.data(), slow.size() * 4), 0) << "N_C " << promote << " bits " << bits;
    }
}

// quantize()'s AVX-512 encoder equals the scalar f32_to_fp8_e4m3 on every float it is shown:
// a sweep over all bit patterns (a stride prime to every field), every code, every midpoint
// between neighbouring codes and the floats either side of it (both signs), infinities and
// NaNs; in rows of 37 so that the masked tail runs too; then scaled, per tile and per column.
TEST(Fp8Quantize, Avx512EncoderEqualsTheScalarOneOnEveryFloatShown) {
  if (!cpu::avx512_available()) GTEST_SKIP() << "no AVX-512 here";
  std::vector<float> x;
  for (uint64_t u = 0; u < (uint64_t(1) << 32); u += 4099) x.push_back(std::bit_cast<float>(uint32_t(u)));
  for (int q = 0; q < 127; ++q) {
    const float v = fp8_decode(Fp8Format::e4m3, uint8_t(q)), next = fp8_decode(Fp8Format::e4m3, uint8_t(q + 1));
    const float mid = std::isnan(next) ? 464.0f : (v + next) / 2;  // 464: halfway to the next, non-existent code
    for (float y : {v, mid, std::nextafter(mid, 0.0f), std::nextafter(mid, INFINITY)}) x.push_back(y), x.push_back(-y);
  }
  for (float y : {INFINITY, -INFINITY, NAN, -NAN, FLT_MIN, FLT_MAX, FLT_TRUE_MIN, 0.0f, -0.0f}) x.push_back(y);
  const float one[kFp8Tile] = {1.0f};
  for (size_t r = 0; r < x.size(); r += 37) {
    const int64_t cols = int64_t(std::min<size_t>(37, x.size() - r));
    uint8_t fast[37];
    cpu::fp8_encode_row_e4m3_avx512(x.data() + r, cols, one, false, fast);
    for (int64_t c = 0; c < cols; ++c)
      ASSERT_EQ(int(fast[c]), int(f32_to_fp8_e4m3(x[r + size_t(c)])))
          << "x = " << x[r + size_t(c)] << " (bits " << std::hex << std::bit_cast<uint32_t>(x[r + size_t(c)]) << ")";
  }
  // Scaled: per 1x128 tile and per column, against the scalar division and encoding.
  const int64_t rows = 3, cols = 300;
  const std::vector<float> v = random_scaled(rows, cols, 5);
  std::vector<float> scales(static_cast<size_t>(cols));
  for (size_t c = 0; c < scales.size(); ++c) scales[c] = std::exp2(float(int(c % 23) - 11)) * 0.37f;
  for (bool per_column : {false, true})
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<uint8_t> fast(static_cast<size_t>(cols));
      cpu::fp8_encode_row_e4m3_avx512(v.data() + r * cols, cols, scales.data(), per_column, fast.data());
      for (int64_t c = 0; c < cols; ++c) {
        const float s = scales[size_t(per_column ? c : c / kFp8Tile)];
        ASSERT_EQ(int(fast[size_t(c)]), int(f32_to_fp8_e4m3(v[size_t(r * cols + c)] / s))) << r << ", " << c;
      }
    }
}

TEST(Fp8Gemm, Fp32AccumulationIsWithinFp32Rounding) {
  // bits = 23, nearest even: the accumulator is IEEE FP32. Bound: 127 roundings within a
  // tile + 2 for the scales + ceil(K/128) promotions, 2^-24 each, times sum |a||b|.
  const int64_t m = 33, n = 20, k = 1000;
  const Fp8Tensor a = random_fp8(m, k, Fp8Tiling::row_tiles_1x128, 12);
  const Fp8Tensor b = random_fp8(n, k, Fp8Tiling::blocks_128x128, 13);
  std::vector<float> c(size_t(m * n));
  fp8_gemm(a, b, c.data(), kFp8Fp32Accumulate);
  const Reference ref = reference(a, b);
  const double bound = accumulation_bound(kFp8Fp32Accumulate, k);
  EXPECT_LT(bound, (127 + 2 + 8 + 1) * std::ldexp(1.0, -24) * 1.02);
  expect_within_bound(c, ref, bound, "FP32 accumulation");
  std::printf("FP32 accumulation, K=%lld: max |err|/sum|ab| = %.3g (bound %.3g)\n", (long long)k,
              errors(c, ref).max_rel_abs, bound);
}

TEST(Fp8Gemm, DeepSeekRecipeIsWithinTheAccumulatorBound) {
  // N_C = 128, 14 bits, truncation: bound 127 * 2^-14 * (1 + 2^-14)^128 + FP32 promotions.
  for (int64_t k : {128, 300, 4096}) {
    const int64_t m = 16, n = 24;
    const Fp8Tensor a = random_fp8(m, k, Fp8Tiling::row_tiles_1x128, 14);
    const Fp8Tensor b = random_fp8(n, k, Fp8Tiling::blocks_128x128, 15);
    std::vector<float> c(size_t(m * n));
    fp8_gemm(a, b, c.data(), kFp8DeepSeek);
    const Reference ref = reference(a, b);
    expect_within_bound(c, ref, accumulation_bound(kFp8DeepSeek, k), "DeepSeek recipe");
  }
}

TEST(Fp8Gemm, GenericPathFormatsAndFoldedScales) {
  // E5M2 (and E4M3 x E5M2) run the generic path; so does N_C = 256 (scales folded into the
  // products). Every case against the float64 reference, with the bound of its accumulator.
  const int64_t m = 9, n = 11, k = 520;
  for (Fp8Format fa : {Fp8Format::e4m3, Fp8Format::e5m2})
    for (Fp8Format fb : {Fp8Format::e4m3, Fp8Format::e5m2}) {
      const Fp8Tensor a = random_fp8(m, k, Fp8Tiling::row_tiles_1x128, 16, fa);
      const Fp8Tensor b = random_fp8(n, k, Fp8Tiling::blocks_128x128, 17, fb);
      const Reference ref = reference(a, b);
      for (const Fp8GemmOptions& opt : {kFp8DeepSeek, kFp8Fp32Accumulate}) {
        std::vector<float> c(size_t(m * n)), twin(size_t(m * n));
        fp8_gemm(a, b, c.data(), opt);
        fp8_gemm_reference(a, b, twin.data(), opt);
        EXPECT_EQ(c, twin);
        expect_within_bound(c, ref, accumulation_bound(opt, k), "generic path");
      }
      // Folded, N_C = 256, FP32: each term rounded once more (the scale), then FP32 sums.
      const Fp8GemmOptions folded{.promote_every = 256, .acc_mantissa_bits = 23,
                                  .acc_rounding = Fp8AccRounding::nearest_even};
      std::vector<float> c(size_t(m * n));
      fp8_gemm(a, b, c.data(), folded);
      expect_within_bound(c, ref, (255 + 1 + 3 + 2) * std::ldexp(1.0, -24) * 1.01, "folded N_C = 256");
    }
}

TEST(Fp8Gemm, PromotionMattersAtK4096) {
  // §3.3.2: with ~14 bits of accumulator, a K = 4096 GEMM loses precision unless partial
  // sums are promoted to FP32 every N_C = 128. Measured on random data, against the float64
  // product of the same (dequantised) FP8 inputs.
  const int64_t m = 48, n = 48, k = 4096;
  struct Case {
    const char* name;
    std::vector<float> a, b;
  };
  std::mt19937 rng(20);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  std::vector<float> pa(size_t(m * k)), pb(size_t(n * k));
  for (float& v : pa) v = u(rng);
  for (float& v : pb) v = u(rng);
  const Case cases[] = {{"uniform(0,1)", pa, pb},
                        {"normal(0,1)", random_normal(size_t(m * k), 21), random_normal(size_t(n * k), 22)}};
  for (const Case& cs : cases) {
    const Fp8Tensor a = quantize(cs.a.data(), m, k, Fp8Tiling::row_tiles_1x128);
    const Fp8Tensor b = quantize(cs.b.data(), n, k, Fp8Tiling::blocks_128x128);
    const Reference ref = reference(a, b);
    std::vector<float> promoted(size_t(m * n)), unpromoted(size_t(m * n)), fp32(size_t(m * n));
    std::vector<float> unpromoted_rne(size_t(m * n));
    fp8_gemm(a, b, promoted.data(), kFp8DeepSeek);
    fp8_gemm(a, b, unpromoted.data(), kFp8NoPromotion);
    fp8_gemm(a, b, fp32.data(), kFp8Fp32Accumulate);
    fp8_gemm(a, b, unpromoted_rne.data(),
             {.promote_every = 0, .acc_mantissa_bits = 14, .acc_rounding = Fp8AccRounding::nearest_even});
    const ErrorStats ep = errors(promoted, ref), eu = errors(unpromoted, ref), ef = errors(fp32, ref);
    const ErrorStats er = errors(unpromoted_rne, ref);
    std::printf(
        "K=4096 %s, ||err||/||ref|| (max |err|/|ref|, max |err|/sum|ab|):\n"
        "  14-bit truncating, no promotion  %.3e (%.3e, %.3e)\n"
        "  14-bit truncating, N_C = 128     %.3e (%.3e, %.3e)\n"
        "  14-bit nearest, no promotion     %.3e (%.3e, %.3e)\n"
        "  FP32 (23-bit nearest), N_C = 128 %.3e (%.3e, %.3e)\n",
        cs.name, eu.rel_norm, eu.max_rel, eu.max_rel_abs, ep.rel_norm, ep.max_rel, ep.max_rel_abs, er.rel_norm,
        er.max_rel, er.max_rel_abs, ef.rel_norm, ef.max_rel, ef.max_rel_abs);
    EXPECT_GT(eu.rel_norm, 4 * ep.rel_norm) << cs.name;
    EXPECT_GT(eu.max_rel_abs, 4 * ep.max_rel_abs) << cs.name;
    EXPECT_GT(ep.rel_norm, 4 * ef.rel_norm) << cs.name;
    expect_within_bound(promoted, ref, accumulation_bound(kFp8DeepSeek, k), "promoted");
  }
}

TEST(Fp8Gemm, RejectsWrongTilingShapesAndOptions) {
  const Fp8Tensor a = random_fp8(4, 256, Fp8Tiling::row_tiles_1x128, 30);
  const Fp8Tensor b = random_fp8(5, 256, Fp8Tiling::blocks_128x128, 31);
  const Fp8Tensor col = random_fp8(5, 256, Fp8Tiling::col_tiles_128x1, 32);
  const Fp8Tensor short_k = random_fp8(5, 200, Fp8Tiling::blocks_128x128, 33);
  std::vector<float> c(64);
  auto message = [&](const Fp8Tensor& x, const Fp8Tensor& y, Fp8GemmOptions opt) {
    try {
      fp8_gemm(x, y, c.data(), opt);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_THAT(message(a, col, kFp8DeepSeek), HasSubstr("B [5, 256] has 128x1 tiles"));
  EXPECT_THAT(message(a, short_k, kFp8DeepSeek), HasSubstr("K differs"));
  EXPECT_THAT(message(a, b, {.promote_every = 100}), HasSubstr("promote_every = 100"));
  EXPECT_THAT(message(a, b, {.promote_every = -1}), HasSubstr("promote_every = -1"));
  EXPECT_THAT(message(a, b, {.acc_mantissa_bits = 24}), HasSubstr("acc_mantissa_bits = 24"));
  EXPECT_THAT(message(a, b, {.acc_mantissa_bits = 0}), HasSubstr("acc_mantissa_bits = 0"));
  EXPECT_EQ(message(a, b, {.promote_every = 512}), "no error");
}

// ---- The three GEMMs of a Linear -------------------------------------------------------

// The float64 product of the original inputs, and the per-element bound of E4M3
// quantisation: each input off by <= 2^-4 |x| (normals) + 2^-10 * scale (subnormals).
struct LinearCase {
  int64_t n = 200, in = 300, out = 260;
  std::vector<float> x, w, dy;
  LinearCase() : x(random_normal(size_t(n * in), 40)), w(random_normal(size_t(out * in), 41, 0.05f)),
                 dy(random_normal(size_t(n * out), 42, 1e-3f)) {}
};

// c[i, j] = sum_k A(i, k) B(j, k) over float64 of the given accessors, with the quantisation
// bound sum_k (|A| eb + |B| ea + ea eb), where e = 2^-4 |x| + 2^-10 scale.
template <typename FA, typename FB>
void expect_near_original(const std::vector<float>& c, int64_t m, int64_t n, int64_t k, FA a, FB b,
                          const Fp8Tensor& qa, const Fp8Tensor& qb, const char* what) {
  // qa / qb are the FP8 operands laid out as [m, k] / [n, k] (after any transpose).
  int bad = 0;
  double num = 0, den = 0;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0, bound = 0;
      for (int64_t t = 0; t < k; ++t) {
        const double av = a(i, t), bv = b(j, t);
        const double ea = std::ldexp(std::fabs(av), -4) + std::ldexp(double(qa.scale(i, t)), -10);
        const double eb = std::ldexp(std::fabs(bv), -4) + std::ldexp(double(qb.scale(j, t)), -10);
        s += av * bv;
        bound += std::fabs(av) * eb + std::fabs(bv) * ea + ea * eb + std::fabs(av * bv) * 8e-3;  // + accumulation
      }
      const double d = double(c[size_t(i * n + j)]) - s;
      num += d * d, den += s * s;
      if (!(std::fabs(d) <= bound) && ++bad <= 5) ADD_FAILURE() << what << " (" << i << ", " << j << "): " << d << " > " << bound;
    }
  const double rel = std::sqrt(num / den);
  std::printf("%s: ||fp8 - exact|| / ||exact|| = %.4f\n", what, rel);
  EXPECT_LT(rel, 0.05) << what;  // statistically ~0.03 for E4M3 inputs
}

TEST(MatmulFp8, ForwardDgradWgradMatchTheirReferences) {
  const LinearCase lc;
  const int64_t n = lc.n, in = lc.in, out = lc.out;
  const double bound = accumulation_bound(kFp8DeepSeek, 300);

  // Fprop: y = x w^T.
  std::vector<float> y(size_t(n * out), 7.0f);
  matmul_fp8(lc.x.data(), lc.w.data(), y.data(), n, in, out);
  const Fp8Tensor xq = quantize(lc.x.data(), n, in, Fp8Tiling::row_tiles_1x128);
  const Fp8Tensor wq = quantize(lc.w.data(), out, in, Fp8Tiling::blocks_128x128);
  expect_within_bound(y, reference(xq, wq), bound, "fprop vs dequantised");
  expect_near_original(
      y, n, out, in, [&](int64_t i, int64_t t) { return double(lc.x[size_t(i * in + t)]); },
      [&](int64_t j, int64_t t) { return double(lc.w[size_t(j * in + t)]); }, xq, wq, "fprop");

  // Dgrad: dx = dy w, accumulated onto 1.
  std::vector<float> dx(size_t(n * in), 1.0f), dx_over(size_t(n * in), 1.0f);
  matmul_dx_fp8(lc.dy.data(), lc.w.data(), dx.data(), n, in, out, true);
  matmul_dx_fp8(lc.dy.data(), lc.w.data(), dx_over.data(), n, in, out, false);
  const Fp8Tensor dyq = quantize(lc.dy.data(), n, out, Fp8Tiling::row_tiles_1x128);
  const Fp8Tensor wqt = transpose(wq);  // the forward's blocks
  for (size_t i = 0; i < dx.size(); ++i) ASSERT_EQ(dx[i], 1.0f + dx_over[i]);
  expect_within_bound(dx_over, reference(dyq, wqt), accumulation_bound(kFp8DeepSeek, out), "dgrad vs dequantised");
  expect_near_original(
      dx_over, n, in, out, [&](int64_t i, int64_t t) { return double(lc.dy[size_t(i * out + t)]); },
      [&](int64_t j, int64_t t) { return double(lc.w[size_t(t * in + j)]); }, dyq, wqt, "dgrad");

  // Wgrad: dw += dy^T x, tiles along n.
  std::vector<float> dw(size_t(out * in), 0.5f);
  matmul_dw_fp8(lc.dy.data(), lc.x.data(), dw.data(), n, in, out);
  const Fp8Tensor dyt = transpose(quantize(lc.dy.data(), n, out, Fp8Tiling::col_tiles_128x1));
  const Fp8Tensor xt = transpose(quantize(lc.x.data(), n, in, Fp8Tiling::col_tiles_128x1));
  std::vector<float> dw_direct(size_t(out * in));
  fp8_gemm(dyt, xt, dw_direct.data());
  for (size_t i = 0; i < dw.size(); ++i) ASSERT_EQ(dw[i], 0.5f + dw_direct[i]);
  expect_within_bound(dw_direct, reference(dyt, xt), accumulation_bound(kFp8DeepSeek, n), "wgrad vs dequantised");
  expect_near_original(
      dw_direct, out, in, n, [&](int64_t o, int64_t t) { return double(lc.dy[size_t(t * out + o)]); },
      [&](int64_t j, int64_t t) { return double(lc.x[size_t(t * in + j)]); }, dyt, xt, "wgrad");
}

TEST(MatmulFp8, DoubleInstantiationRoundsInputsToFloat) {
  const LinearCase lc;
  const std::vector<double> x(lc.x.begin(), lc.x.end()), w(lc.w.begin(), lc.w.end());
  std::vector<float> yf(size_t(lc.n * lc.out));
  std::vector<double> yd(yf.size());
  matmul_fp8(lc.x.data(), lc.w.data(), yf.data(), lc.n, lc.in, lc.out);
  matmul_fp8(x.data(), w.data(), yd.data(), lc.n, lc.in, lc.out);
  for (size_t i = 0; i < yf.size(); ++i) ASSERT_EQ(yd[i], double(yf[i]));
}

// The outlier problem (§3.3.2): a few tokens with one channel 10^6 times larger than the
// rest. With one scale per tensor every other value sits 10^6 below the largest code, beyond
// E4M3's range (448 / 2^-9 = 229376 with subnormals), so it flushes to zero or nearly;
// 1x128 tiles confine the damage to the outlier's own tile. Measured on the tokens without
// the outlier.
TEST(MatmulFp8, FineGrainedScalingSurvivesAnOutlierPerTensorDoesNot) {
  const int64_t n = 256, in = 512, out = 128;
  std::vector<float> x = random_normal(size_t(n * in), 50);
  const std::vector<float> w = random_normal(size_t(out * in), 51, 0.05f);
  for (int64_t t = 0; t < n; t += 64) x[size_t(t * in + 300)] = 1e6f;
  auto rel_error = [&](Fp8Scaling scaling) {
    std::vector<float> y(size_t(n * out));
    matmul_fp8(x.data(), w.data(), y.data(), n, in, out, kFp8DeepSeek, scaling);
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (i % 64 == 0) continue;  // the outlier tokens
      for (int64_t j = 0; j < out; ++j) {
        double exact = 0;
        for (int64_t k = 0; k < in; ++k) exact += double(x[size_t(i * in + k)]) * w[size_t(j * in + k)];
        const double d = y[size_t(i * out + j)] - exact;
        num += d * d, den += exact * exact;
      }
    }
    return std::sqrt(num / den);
  };
  const double fine = rel_error(Fp8Scaling::fine_grained), tensor = rel_error(Fp8Scaling::per_tensor);
  std::printf("relative error beside a 1e6 outlier: fine-grained %.4f, per-tensor %.4f\n", fine, tensor);
  EXPECT_LT(fine, 0.05);
  EXPECT_GT(tensor, 0.5);  // most of the signal is gone
}

// ---- Saved activations (§3.3.3) -------------------------------------------------------------

// Every E5M6 value: 2 signs x 31 exponents x 64 mantissas, as FP16 patterns with the low 4
// mantissa bits clear; exponent 31 (inf/NaN) is not part of the format.
std::vector<uint16_t> all_e5m6_codes() {
  std::vector<uint16_t> codes;
  for (uint32_t sign : {0u, 0x8000u})
    for (uint32_t e = 0; e < 31; ++e)
      for (uint32_t m = 0; m < 64; ++m) codes.push_back(uint16_t(sign | (e << 10) | (m << 4)));
  return codes;
}

TEST(E5m6, EveryCodeRoundTripsAndMidpointsRoundToEven) {
  const std::vector<uint16_t> codes = all_e5m6_codes();
  ASSERT_EQ(codes.size(), 2u * 31 * 64);
  for (uint16_t c : codes) {
    const float v = e5m6_decode(c);
    ASSERT_TRUE(std::isfinite(v));
    if (v == 0) continue;  // +0 and -0
    ASSERT_EQ(e5m6_encode(v), c) << std::hex << c;
  }
  EXPECT_EQ(e5m6_encode(0.0f), 0);
  EXPECT_EQ(e5m6_encode(-0.0f), 0x8000);
  // Between consecutive positive codes: the midpoint goes to the even one (mantissa bit 4
  // clear), anything off the midpoint to the nearer one.
  for (uint32_t i = 0; i + 1 < 31 * 64; ++i) {
    const uint16_t lo = codes[i], hi = codes[i + 1];
    const double a = e5m6_decode(lo), b = e5m6_decode(hi), mid = (a + b) / 2;
    const uint16_t even = (lo & 0x10) == 0 ? lo : hi;
    ASSERT_EQ(e5m6_encode(float(mid)), even) << a << " .. " << b;
    ASSERT_EQ(e5m6_encode(std::nextafter(float(mid), 0.0f)), lo) << a;
    ASSERT_EQ(e5m6_encode(std::nextafter(float(mid), 1e9f)), hi) << b;
    ASSERT_EQ(e5m6_encode(-float(mid)), uint16_t(even | 0x8000));
  }
  // Saturation at 65024 = (2 - 2^-6) 2^15, and below the smallest subnormal 2^-20 / 2: zero.
  EXPECT_EQ(e5m6_decode(e5m6_encode(kE5m6Max)), kE5m6Max);
  EXPECT_EQ(e5m6_encode(1e6f), e5m6_encode(kE5m6Max));
  EXPECT_EQ(e5m6_encode(-1e30f), uint16_t(e5m6_encode(kE5m6Max) | 0x8000));
  EXPECT_EQ(e5m6_encode(std::ldexp(1.0f, -21)), 0);  // the tie to 0 (even)
  EXPECT_EQ(e5m6_decode(e5m6_encode(std::ldexp(1.0f, -20))), std::ldexp(1.0f, -20));
}

TEST(SavedActivation, FormatsRoundTripWithinTheirPrecisionAndReportTheirSize) {
  const int64_t rows = 70, cols = 300, tiles = 3, count = rows * cols;
  const std::vector<float> x = random_scaled(rows, cols, 60);
  SavedActivation<float> full, e4m3, e5m6;
  full.save(x.data(), rows, cols, SavedFormat::full);
  e4m3.save(x.data(), rows, cols, SavedFormat::e4m3_1x128);
  e5m6.save(x.data(), rows, cols, SavedFormat::e5m6_1x128_pow2);
  EXPECT_EQ(full.load(), x);
  EXPECT_EQ(full.bytes(), count * 4);
  EXPECT_EQ(e4m3.bytes(), count + rows * tiles * 4);
  EXPECT_EQ(e5m6.bytes(), count * 2 + rows * tiles * 4);

  std::vector<float> expected(x.size());
  dequantize(quantize(x.data(), rows, cols, Fp8Tiling::row_tiles_1x128), expected.data());
  EXPECT_EQ(e4m3.load(), expected);  // exactly the E4M3 tiles the GEMMs use

  // E5M6: relative error <= 2^-7 (half an ulp of 6 mantissa bits) for every value within
  // 2^-14 of its tile's max (FP16's normal range below a tile max near 2^15..2^16).
  const std::vector<float> y = e5m6.load();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t t = 0; t < tiles; ++t) {
      float amax = 0;
      for (int64_t c = t * 128; c < std::min(cols, (t + 1) * 128); ++c) amax = std::max(amax, std::fabs(x[size_t(r * cols + c)]));
      for (int64_t c = t * 128; c < std::min(cols, (t + 1) * 128); ++c) {
        const float v = x[size_t(r * cols + c)];
        if (std::fabs(v) < std::ldexp(amax, -14)) continue;
        ASSERT_LE(std::fabs(y[size_t(r * cols + c)] - v), std::ldexp(std::fabs(v), -7)) << r << ", " << c;
      }
    }
  // The double instantiation stores the same formats.
  const std::vector<double> xd(x.begin(), x.end());
  SavedActivation<double> d;
  d.save(xd.data(), rows, cols, SavedFormat::e5m6_1x128_pow2);
  const std::vector<double> yd = d.load();
  for (size_t i = 0; i < y.size(); ++i) ASSERT_EQ(yd[i], double(y[i]));
}

// Tiles of tiny values (float subnormals) still get a positive power-of-2 scale.
TEST(SavedActivation, E5m6TilesOfTinyValues) {
  std::vector<float> x(256, 0.0f);
  x[3] = 1e-42f, x[7] = -3e-43f, x[200] = 1e-39f, x[201] = std::numeric_limits<float>::denorm_min();
  SavedActivation<float> s;
  s.save(x.data(), 2, 128, SavedFormat::e5m6_1x128_pow2);
  const std::vector<float> y = s.load();
  for (int i : {3, 7, 200, 201}) EXPECT_NEAR(y[size_t(i)], x[size_t(i)], std::fabs(x[size_t(i)]) * 0.01) << i;
}

TEST(SavedActivation, NonFiniteValuesAreAnError) {
  std::vector<float> x(256, 1.0f);
  x[130] = NAN;
  for (SavedFormat f : {SavedFormat::e4m3_1x128, SavedFormat::e5m6_1x128_pow2}) {
    SavedActivation<float> s;
    try {
      s.save(x.data(), 2, 128, f);
      ADD_FAILURE() << "no error";
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("non-finite value nan at row 1, column 2"));
    }
  }
}

}  // namespace
}  // namespace dsv3
