// 32 FP8 E4M3 codes -> their values / 256 as float32, for the AVX-512 kernels (the row
// kernels and the AMX strips). Moving the code's sign to bit 15 and its 7 magnitude bits up
// by 7 gives an FP16 whose value is exactly code_value / 2^8, normal and subnormal codes
// alike (exponent bias 15 vs 7), so one vcvtph2ps per 16 codes decodes them. NaN codes
// (0x7f/0xff) are not special-cased: checkpoints have none. Internal to backend/cpu.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace dsv3::cpu {

__attribute__((target("avx512f,avx512bw,f16c"))) inline void decode32_fp8(const uint8_t* p, __m512& lo, __m512& hi) {
  // fp16 = (c + (c & 0x80)) << 7: the sign to bit 15, the magnitude to bits 14..7.
  const __m512i c = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  const __m512i h = _mm512_slli_epi16(_mm512_add_epi16(c, _mm512_and_si512(c, _mm512_set1_epi16(0x80))), 7);
  lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
  hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
}

}  // namespace dsv3::cpu
