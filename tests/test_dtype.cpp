// Number formats: exhaustive FP8 E4M3 and E5M2 decode/encode over all 256 codes (values
// from the bit fields, round trips, every midpoint, saturation, NaN), random floats against
// a brute-force nearest-code search, BF16 rounding, dtype names.
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "core/dtype.h"

namespace dsv3 {
namespace {

TEST(Fp8E4m3, DecodesKnownCodes) {
  EXPECT_EQ(fp8_e4m3_to_f32(0x00), 0.0f);
  EXPECT_TRUE(std::signbit(fp8_e4m3_to_f32(0x80)));
  EXPECT_EQ(fp8_e4m3_to_f32(0x38), 1.0f);                  // exponent 7 = bias
  EXPECT_EQ(fp8_e4m3_to_f32(0x7e), 448.0f);                // largest finite
  EXPECT_EQ(fp8_e4m3_to_f32(0xfe), -448.0f);
  EXPECT_EQ(fp8_e4m3_to_f32(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_EQ(fp8_e4m3_to_f32(0x07), 7 * std::ldexp(1.0f, -9));
  EXPECT_EQ(fp8_e4m3_to_f32(0x08), std::ldexp(1.0f, -6));  // smallest normal
  EXPECT_TRUE(std::isnan(fp8_e4m3_to_f32(0x7f)));
  EXPECT_TRUE(std::isnan(fp8_e4m3_to_f32(0xff)));
}

TEST(Fp8E4m3, EveryCodeRoundTrips) {
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7f) == 0x7f) continue;  // NaN
    const float v = fp8_e4m3_to_f32(uint8_t(c));
    EXPECT_EQ(f32_to_fp8_e4m3(v), c == 0x80 ? 0x80 : c) << "code " << c;
  }
}

TEST(Fp8E4m3, RoundsToNearestEvenAndSaturates) {
  // Midpoints between neighbouring codes go to the code with an even mantissa.
  for (int c = 0; c < 0x7e; ++c) {
    const float lo = fp8_e4m3_to_f32(uint8_t(c)), hi = fp8_e4m3_to_f32(uint8_t(c + 1));
    const float mid = (lo + hi) / 2;
    EXPECT_EQ(f32_to_fp8_e4m3(mid), (c % 2 == 0) ? c : c + 1) << "between codes " << c << " and " << c + 1;
    EXPECT_EQ(f32_to_fp8_e4m3(std::nextafter(mid, 0.0f)), c);
    EXPECT_EQ(f32_to_fp8_e4m3(std::nextafter(mid, 1000.0f)), c + 1);
  }
  EXPECT_EQ(f32_to_fp8_e4m3(1e6f), 0x7e);
  EXPECT_EQ(f32_to_fp8_e4m3(-1e6f), 0xfe);
  EXPECT_EQ(f32_to_fp8_e4m3(INFINITY), 0x7e);
  EXPECT_EQ(f32_to_fp8_e4m3(NAN), 0x7f);
  EXPECT_EQ(f32_to_fp8_e4m3(std::ldexp(1.0f, -11)), 0x00);  // below half the smallest subnormal
}

// Both FP8 formats described by their fields, independently of core/dtype.cpp: the value of
// a code is computed here from sign, exponent and mantissa.
struct Fp8Spec {
  const char* name;
  int exp_bits, man_bits, bias;
  bool ieee_specials;  // E5M2: exponent all ones = inf (mantissa 0) or NaN; E4M3: only S.1111.111 = NaN
  uint8_t max_code;    // largest finite magnitude code
  float (*decode)(uint8_t);
  uint8_t (*encode)(float);
};
uint8_t encode_e5m2_saturating(float f) { return f32_to_fp8_e5m2(f); }
const Fp8Spec kE4m3{"E4M3", 4, 3, 7, false, 0x7e, fp8_e4m3_to_f32, f32_to_fp8_e4m3};
const Fp8Spec kE5m2{"E5M2", 5, 2, 15, true, 0x7b, fp8_e5m2_to_f32, encode_e5m2_saturating};

// The value of `code` from its fields, in double; NaN for NaN codes.
double field_value(const Fp8Spec& f, int code) {
  const int sign = code >> 7, e = (code >> f.man_bits) & ((1 << f.exp_bits) - 1), m = code & ((1 << f.man_bits) - 1);
  const int e_max = (1 << f.exp_bits) - 1;
  double v;
  if (f.ieee_specials && e == e_max) {
    if (m != 0) return NAN;
    v = INFINITY;
  } else if (!f.ieee_specials && e == e_max && m == (1 << f.man_bits) - 1) {
    return NAN;
  } else if (e == 0) {
    v = std::ldexp(double(m), 1 - f.bias - f.man_bits);  // subnormal: 0.m * 2^(1 - bias)
  } else {
    v = std::ldexp(double((1 << f.man_bits) + m), e - f.bias - f.man_bits);  // 1.m * 2^(e - bias)
  }
  return sign ? -v : v;
}

class Fp8Formats : public ::testing::TestWithParam<const Fp8Spec*> {};

TEST_P(Fp8Formats, EveryCodeDecodesToItsFields) {
  const Fp8Spec& f = *GetParam();
  int nans = 0, infs = 0;
  for (int c = 0; c < 256; ++c) {
    const double want = field_value(f, c);
    const float got = f.decode(uint8_t(c));
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << f.name << " code " << c;
      ++nans;
      continue;
    }
    infs += std::isinf(want);
    EXPECT_EQ(double(got), want) << f.name << " code " << c;
    EXPECT_EQ(std::signbit(got), c >= 128) << f.name << " code " << c;  // -0 is 0x80
  }
  EXPECT_EQ(nans, f.ieee_specials ? 6 : 2) << f.name;
  EXPECT_EQ(infs, f.ieee_specials ? 2 : 0) << f.name;
  EXPECT_EQ(double(f.decode(f.max_code)), f.ieee_specials ? 57344.0 : 448.0);
}

TEST_P(Fp8Formats, EveryFiniteCodeRoundTrips) {
  const Fp8Spec& f = *GetParam();
  for (int c = 0; c < 256; ++c) {
    const float v = f.decode(uint8_t(c));
    if (!std::isfinite(v)) continue;
    EXPECT_EQ(f.encode(v), c) << f.name << " code " << c;
  }
}

TEST_P(Fp8Formats, EveryMidpointRoundsToTheEvenCode) {
  const Fp8Spec& f = *GetParam();
  for (int sign : {0x00, 0x80})
    for (int m = 0; m < f.max_code; ++m) {  // magnitude codes m and m + 1 are neighbours
      const int lo = sign | m, hi = sign | (m + 1);
      const double mid = (field_value(f, lo) + field_value(f, hi)) / 2;
      const float midf = float(mid);
      ASSERT_EQ(double(midf), mid) << "midpoints have at most 6 significant bits";
      EXPECT_EQ(f.encode(midf), (m % 2 == 0) ? lo : hi) << f.name << " between codes " << lo << " and " << hi;
      EXPECT_EQ(f.encode(std::nextafter(midf, 0.0f)), lo) << f.name << " just below the midpoint " << mid;
      EXPECT_EQ(f.encode(std::nextafter(midf, sign ? -INFINITY : INFINITY)), hi) << f.name << " just above " << mid;
    }
}

TEST_P(Fp8Formats, SaturatesBeyondMaxAndEncodesNaN) {
  const Fp8Spec& f = *GetParam();
  const double max = field_value(f, f.max_code);
  const double next = max + std::ldexp(1.0, f.ieee_specials ? 13 : 5);  // one step past max: 2^16, 480
  const double beyond_mid = (max + next) / 2;                           // 61440, 464: would round up
  for (int sign : {1, -1}) {
    const int want = (sign < 0 ? 0x80 : 0) | f.max_code;
    EXPECT_EQ(f.encode(float(sign * max)), want);
    EXPECT_EQ(f.encode(std::nextafter(float(sign * beyond_mid), 0.0f)), want);
    EXPECT_EQ(f.encode(float(sign * beyond_mid)), want) << f.name << " " << sign * beyond_mid;
    EXPECT_EQ(f.encode(float(sign * 1e6)), want);
    EXPECT_EQ(f.encode(sign * FLT_MAX), want);
    EXPECT_EQ(f.encode(sign * INFINITY), want);
  }
  EXPECT_EQ(f.encode(NAN), 0x7f);
  EXPECT_EQ(f.encode(-NAN), 0x7f);
  EXPECT_TRUE(std::isnan(f.decode(f.encode(NAN))));
  // Underflow: half the smallest subnormal is a tie with 0 (even); just above it rounds up.
  const float half_min = float(field_value(f, 1) / 2);
  EXPECT_EQ(f.encode(half_min), 0x00);
  EXPECT_EQ(f.encode(-half_min), 0x80);
  EXPECT_EQ(f.encode(std::nextafter(half_min, 1.0f)), 0x01);
  EXPECT_EQ(f.encode(std::ldexp(1.0f, -140)), 0x00);  // a float subnormal
  EXPECT_EQ(f.encode(0.0f), 0x00);
  EXPECT_EQ(f.encode(-0.0f), 0x80);
}

// Random floats over the whole range against a brute-force search for the nearest finite
// code (ties: the even mantissa), saturating beyond max.
TEST_P(Fp8Formats, RandomFloatsEncodeToTheNearestCode) {
  const Fp8Spec& f = *GetParam();
  std::vector<std::pair<double, int>> codes;  // finite non-negative values and their codes
  for (int c = 0; c < 128; ++c)
    if (std::isfinite(field_value(f, c))) codes.push_back({field_value(f, c), c});
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> exponent(-30, 20);
  std::uniform_int_distribution<uint32_t> mantissa(0, (1u << 23) - 1);
  for (int i = 0; i < 200000; ++i) {
    const bool neg = rng() & 1;
    const float x = std::ldexp(1.0f + float(mantissa(rng)) / float(1 << 23), exponent(rng));
    const double a = x;
    int best = codes[0].second;
    double best_err = INFINITY;
    for (const auto& [v, c] : codes) {
      const double err = std::fabs(v - a);
      if (err < best_err || (err == best_err && c % 2 == 0)) best = c, best_err = err;
    }
    ASSERT_EQ(f.encode(neg ? -x : x), (neg ? 0x80 : 0) | best) << f.name << " x = " << (neg ? -a : a);
  }
}

INSTANTIATE_TEST_SUITE_P(Fp8, Fp8Formats, ::testing::Values(&kE4m3, &kE5m2),
                         [](const auto& info) { return std::string(info.param->name); });

TEST(Fp8E5m2, IeeeOverflowWithoutSaturation) {
  EXPECT_EQ(f32_to_fp8_e5m2(57344.0f, false), 0x7b);
  EXPECT_EQ(f32_to_fp8_e5m2(std::nextafter(61440.0f, 0.0f), false), 0x7b);
  EXPECT_EQ(f32_to_fp8_e5m2(61440.0f, false), 0x7c);  // tie with 2^16: even mantissa -> inf
  EXPECT_EQ(f32_to_fp8_e5m2(-1e6f, false), 0xfc);
  EXPECT_EQ(f32_to_fp8_e5m2(INFINITY, false), 0x7c);
  EXPECT_EQ(f32_to_fp8_e5m2(-INFINITY, false), 0xfc);
  EXPECT_EQ(f32_to_fp8_e5m2(NAN, false), 0x7f);
  EXPECT_TRUE(std::isinf(fp8_e5m2_to_f32(0x7c)));
  EXPECT_EQ(fp8_e5m2_to_f32(0xfc), -INFINITY);
  EXPECT_EQ(fp8_e5m2_to_f32(0x01), std::ldexp(1.0f, -16));  // smallest subnormal
  EXPECT_EQ(fp8_e5m2_to_f32(0x04), std::ldexp(1.0f, -14));  // smallest normal
  EXPECT_EQ(fp8_e5m2_to_f32(0x3c), 1.0f);                   // exponent 15 = bias
}

TEST(Bf16, RoundsToNearestEven) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(bf16_to_f32(0x3f80), 1.0f);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
  EXPECT_EQ(f32_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  EXPECT_EQ(f32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
}

TEST(F16, DecodesNormalsSubnormalsAndSpecials) {
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_f32(0xc000), -2.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(f16_to_f32(0x7bff), 65504.0f);
  EXPECT_TRUE(std::isinf(f16_to_f32(0x7c00)));
}

TEST(DType, NamesRoundTrip) {
  for (DType t : {DType::f32, DType::f16, DType::bf16, DType::f8_e4m3, DType::f8_e5m2, DType::i32, DType::i64}) {
    DType back;
    ASSERT_TRUE(parse_dtype(dtype_name(t), &back));
    EXPECT_EQ(back, t);
  }
  EXPECT_EQ(dtype_name(DType::f8_e5m2), "F8_E5M2");
  EXPECT_EQ(dtype_size(DType::f8_e5m2), 1u);
  DType x;
  EXPECT_FALSE(parse_dtype("F8_E5M2FNUZ", &x));
}

}  // namespace
}  // namespace dsv3
