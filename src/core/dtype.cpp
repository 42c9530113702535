// Number-format conversions (see dtype.h).
#include "core/dtype.h"

#include <cmath>

namespace dsv3 {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::f64: case DType::i64: return 8;
    case DType::f32: case DType::i32: return 4;
    case DType::f16: case DType::bf16: case DType::i16: return 2;
    case DType::f8_e4m3: case DType::i8: case DType::u8: case DType::boolean: return 1;
  }
  return 0;
}

namespace {
struct DTypeName {
  DType type;
  std::string_view name;
};
constexpr DTypeName kNames[] = {
    {DType::f32, "F32"}, {DType::f16, "F16"},  {DType::bf16, "BF16"}, {DType::f8_e4m3, "F8_E4M3"},
    {DType::f64, "F64"}, {DType::i8, "I8"},    {DType::u8, "U8"},     {DType::i16, "I16"},
    {DType::i32, "I32"}, {DType::i64, "I64"},  {DType::boolean, "BOOL"}};
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

uint8_t f32_to_fp8_e4m3(float f) {
  if (std::isnan(f)) return 0x7f;
  const uint8_t sign = std::signbit(f) ? 0x80 : 0x00;
  double a = std::fabs(double(f));
  if (a >= 448.0) return sign | 0x7e;  // saturate (e4m3fn has no infinity)
  // Quantum of the binade holding a: subnormals (a < 2^-6) share the quantum 2^-9.
  int e = a > 0 ? int(std::floor(std::log2(a))) : -7;
  if (e < -6) e = -6;
  const double quantum = std::ldexp(1.0, e - 3);
  double q = std::nearbyint(a / quantum);  // ties to even under the default rounding mode
  double v = q * quantum;
  if (v >= 448.0) return sign | 0x7e;
  if (v == 0) return sign;
  int ve = int(std::floor(std::log2(v)));
  if (ve < -6) return sign | uint8_t(std::lround(v / std::ldexp(1.0, -9)));  // subnormal code
  int man = int(std::lround((v / std::ldexp(1.0, ve) - 1.0) * 8.0));
  return sign | uint8_t((ve + 7) << 3) | uint8_t(man);
}

}  // namespace dsv3
