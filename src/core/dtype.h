// Element types of stored tensors and exact conversions between them and float32:
// bfloat16, float16, and the two FP8 formats: E4M3 ("e4m3fn": bias 7, max 448, no
// infinities, S.1111.111 = NaN), the format of every GEMM input in DeepSeek-V3 (§3.3), and
// E5M2 (bias 15, max 57344, IEEE-like: S.11111.00 = inf, S.11111.xx = NaN, the top byte of an
// IEEE half), kept for comparison. Depends on std only.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace dsv3 {

enum class DType { f32, f16, bf16, f8_e4m3, f8_e5m2, f64, i8, u8, i16, i32, i64, boolean };

size_t dtype_size(DType t);
std::string_view dtype_name(DType t);  // safetensors spelling: "F32", "BF16", "F8_E4M3", "F8_E5M2", ...
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
// E4M3 encode with round-to-nearest-even and saturation to +-448 (+-inf too; e4m3fn has no
// infinity); NaN -> 0x7f. Exact for every float, float subnormals included.
uint8_t f32_to_fp8_e4m3(float f);

// E5M2 decode: normal (1 + m/4) * 2^(e-15), subnormal m/4 * 2^-14, exponent 31: m = 0 is
// +-inf, else NaN.
float fp8_e5m2_to_f32(uint8_t code);
// E5M2 encode with round-to-nearest-even. By default it saturates, as NVIDIA's
// __nv_cvt_float_to_fp8(..., __NV_SATFINITE, ...) does (what scaled FP8 expects): anything that
// rounds beyond 57344, +-inf included, becomes +-57344 (0x7b / 0xfb). With saturate = false
// it follows IEEE: magnitudes from 61440 (the midpoint to 2^16) up and +-inf give +-inf
// (0x7c / 0xfc). NaN -> 0x7f either way.
uint8_t f32_to_fp8_e5m2(float f, bool saturate = true);

}  // namespace dsv3
