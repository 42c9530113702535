// Element types of stored tensors and exact conversions between them and float32:
// bfloat16, float16, and FP8 E4M3 ("e4m3fn": bias 7, max 448, no infinities, S.1111.111 = NaN).
// Depends on std only.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace dsv3 {

enum class DType { f32, f16, bf16, f8_e4m3, f64, i8, u8, i16, i32, i64, boolean };

size_t dtype_size(DType t);
std::string_view dtype_name(DType t);  // safetensors spelling: "F32", "BF16", "F8_E4M3", ...
bool parse_dtype(std::string_view name, DType* out);

inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_f32(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }

// Round to nearest even, as torch's .to(bfloat16) does; NaN stays a quiet NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

float f16_to_f32(uint16_t h);

// E4M3 decode: normal (1 + m/8) * 2^(e-7), subnormal m/8 * 2^-6, 0x7f/0xff NaN.
float fp8_e4m3_to_f32(uint8_t code);
// E4M3 encode with round-to-nearest-even and saturation to +-448 (NaN -> 0x7f).
uint8_t f32_to_fp8_e4m3(float f);

}  // namespace dsv3
