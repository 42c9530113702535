// Number-format conversions (see dtype.h).
#include "core/dtype.h"

#include <cmath>

namespace dsv3 {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::f64: case DType::i64: return 8;
    case DType::f32: case DType::i32: return 4;
    case DType::f16: case DType::bf16: case DType::i16: return 2;
    case DType::f8_e4m3: case DType::f8_e5m2: case DType::i8: case DType::u8: case DType::boolean: return 1;
  }
  return 0;
}

namespace {
struct DTypeName {
  DType type;
  std::string_view name;
};
constexpr DTypeName kNames[] = {
    {DType::f32, "F32"}, {DType::f16, "F16"}, {DType::bf16, "BF16"}, {DType::f8_e4m3, "F8_E4M3"},
    {DType::f8_e5m2, "F8_E5M2"}, {DType::f64, "F64"}, {DType::i8, "I8"}, {DType::u8, "U8"},
    {DType::i16, "I16"}, {DType::i32, "I32"}, {DType::i64, "I64"}, {DType::boolean, "BOOL"}};
}  // namespace

std::string_view dtype_name(DType t) {
  for (const auto& n : kNames)
    if (n.type == t) return n.name;
  return "?";
}

bool parse_dtype(std::string_view name, DType* out) {
  for (const auto& n : kNames)
    if (n.name == name) {
      *out = n.type;
      return true;
    }
  return false;
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h >> 15) << 31;
  const uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  if (exp == 0) {  // zero or subnormal: man * 2^-24
    float v = std::ldexp(float(man), -24);
    return sign ? -v : v;
  }
  if (exp == 31) return bits_to_f32(sign | 0x7f800000u | (man << 13));
  return bits_to_f32(sign | ((exp + 112) << 23) | (man << 13));
}

float fp8_e4m3_to_f32(uint8_t code) {
  const bool neg = code & 0x80;
  const int exp = (code >> 3) & 0xf, man = code & 0x7;
  if (exp == 15 && man == 7) return NAN;
  float v = exp == 0 ? std::ldexp(float(man), -9) : std::ldexp(1.0f + man / 8.0f, exp - 7);
  return neg ? -v : v;
}

float fp8_e5m2_to_f32(uint8_t code) {
  const bool neg = code & 0x80;
  const int exp = (code >> 2) & 0x1f, man = code & 0x3;
  if (exp == 31) return man ? NAN : (neg ? -INFINITY : INFINITY);
  float v = exp == 0 ? std::ldexp(float(man), -16) : std::ldexp(1.0f + man / 4.0f, exp - 15);
  return neg ? -v : v;
}

namespace {

// Round-to-nearest-even of a float into an FP8 format with `man_bits` mantissa bits and
// exponent bias `bias`, on the float's bits. Returns the magnitude code (exponent field <<
// man_bits | mantissa), which may exceed the largest finite code: the caller saturates.
// Normal range: the float's 23-bit mantissa is rounded to man_bits in place (a carry moves
// into the exponent, as it should), then the exponent is rebiased. Below the smallest
// normal: the magnitude scaled by 2^(man_bits - emin) (exact: a power of two) is the
// subnormal code, rounded by nearbyint (ties to even); 2^man_bits is the smallest normal.
uint32_t fp8_magnitude(uint32_t a, int man_bits, int bias) {
  const int emin = 1 - bias;
  if (int(a >> 23) - 127 >= emin) {
    const int shift = 23 - man_bits;
    const uint32_t r = (a + ((1u << (shift - 1)) - 1) + ((a >> shift) & 1u)) >> shift;
    return r - (uint32_t(127 - bias) << man_bits);
  }
  return uint32_t(std::nearbyint(std::ldexp(bits_to_f32(a), man_bits - emin)));
}

}  // namespace

uint8_t f32_to_fp8_e4m3(float f) {
  const uint32_t u = f32_to_bits(f), a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7f;
  const uint8_t sign = uint8_t((u >> 24) & 0x80);
  if (a == 0x7f800000u) return sign | 0x7e;
  const uint32_t m = fp8_magnitude(a, 3, 7);
  return sign | uint8_t(m > 0x7e ? 0x7e : m);  // 0x7f would be NaN: saturate to 448
}

uint8_t f32_to_fp8_e5m2(float f, bool saturate) {
  const uint32_t u = f32_to_bits(f), a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7f;
  const uint8_t sign = uint8_t((u >> 24) & 0x80);
  const uint8_t overflow = saturate ? 0x7b : 0x7c;
  if (a == 0x7f800000u) return sign | overflow;
  const uint32_t m = fp8_magnitude(a, 2, 15);
  return sign | uint8_t(m > 0x7b ? overflow : m);
}

}  // namespace dsv3
