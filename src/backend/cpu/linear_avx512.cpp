// AVX-512 row kernels (see kernels.h), compiled for AVX-512 with a function attribute
// and chosen at run time, so the binary still runs on CPUs without it.
// BF16 -> FP32 is a 16-bit shift. FP8 E4M3 -> FP32 goes through FP16: moving the 7 low
// bits of the code up by 7 gives an FP16 whose value is exactly code_value / 2^8 for
// normal and subnormal codes alike (bias 15 vs 7), so one vcvtph2ps and a factor 256
// decode 16 codes. NaN codes (0x7f/0xff) are not special-cased: checkpoints have none.
#include <immintrin.h>

#include <algorithm>

#include "backend/cpu/kernels.h"

#define DSV3_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma")))

namespace dsv3::cpu {

namespace {

DSV3_AVX512 inline __m512 load_bf16(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
DSV3_AVX512 inline __m512 load_bf16_masked(const uint16_t* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// 16 FP8 codes -> their values / 256.
DSV3_AVX512 inline __m512 fp8_to_f32_div256(__m128i codes) {
  __m256i c = _mm256_cvtepu8_epi16(codes);
  __m256i sign = _mm256_slli_epi16(_mm256_and_si256(c, _mm256_set1_epi16(0x80)), 8);
  __m256i mag = _mm256_slli_epi16(_mm256_and_si256(c, _mm256_set1_epi16(0x7f)), 7);
  return _mm512_cvtph_ps(_mm256_or_si256(sign, mag));
}
DSV3_AVX512 inline __m512 load_fp8(const uint8_t* p) {
  return fp8_to_f32_div256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
DSV3_AVX512 inline __m512 load_fp8_masked(const uint8_t* p, __mmask16 m) {
  return fp8_to_f32_div256(_mm_maskz_loadu_epi8(m, p));
}

// Loads 16 weights of a row as float: BF16 values, or FP8 values / 256.
template <bool kFp8>
DSV3_AVX512 inline __m512 load_w(const uint8_t* w, int64_t k) {
  if constexpr (kFp8) return load_fp8(w + k);
  else return load_bf16(reinterpret_cast<const uint16_t*>(w) + k);
}
template <bool kFp8>
DSV3_AVX512 inline __m512 load_w_masked(const uint8_t* w, int64_t k, __mmask16 m) {
  if constexpr (kFp8) return load_fp8_masked(w + k, m);
  else return load_bf16_masked(reinterpret_cast<const uint16_t*>(w) + k, m);
}

template <int NB>
DSV3_AVX512 inline void dot_rows_bf16(const uint8_t* w, const float* x, int64_t ldx, int64_t len, float* acc) {
  __m512 s[NB];
  for (int j = 0; j < NB; ++j) s[j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= len; k += 16) {
    __m512 wv = load_w<false>(w, k);
    for (int j = 0; j < NB; ++j) s[j] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + j * ldx + k), s[j]);
  }
  if (k < len) {
    __mmask16 m = __mmask16((1u << (len - k)) - 1);
    __m512 wv = load_w_masked<false>(w, k, m);
    for (int j = 0; j < NB; ++j) s[j] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + j * ldx + k), s[j]);
  }
  for (int j = 0; j < NB; ++j) acc[j] += _mm512_reduce_add_ps(s[j]);
}

// FP8: 32 codes per step decoded in 16-bit lanes, fp16 = (c + (c & 0x80)) << 7, i.e. the
// sign moves to bit 15 and the magnitude to bits 14..7; each 128-column block's partial
// sums stay in vectors and are scaled once, so no horizontal sum per block.
template <int NB>
DSV3_AVX512 inline void dot_rows_fp8(const uint8_t* w, const float* scales, const float* x, int64_t ldx,
                                     int64_t len, float* acc) {
  __m512 total[NB];
  for (int j = 0; j < NB; ++j) total[j] = _mm512_setzero_ps();
  const __m512i sign = _mm512_set1_epi16(0x80);
  for (int64_t c0 = 0; c0 < len; c0 += 128) {
    const int64_t end = std::min<int64_t>(len, c0 + 128);
    __m512 part[NB];
    for (int j = 0; j < NB; ++j) part[j] = _mm512_setzero_ps();
    int64_t k = c0;
    for (; k + 32 <= end; k += 32) {
      __m512i c = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k)));
      __m512i h = _mm512_slli_epi16(_mm512_add_epi16(c, _mm512_and_si512(c, sign)), 7);
      __m512 lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
      __m512 hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
      for (int j = 0; j < NB; ++j) {
        part[j] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + j * ldx + k), part[j]);
        part[j] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + j * ldx + k + 16), part[j]);
      }
    }
    for (; k < end; k += 16) {
      const int64_t left = std::min<int64_t>(16, end - k);
      __mmask16 m = __mmask16((1u << left) - 1);
      __m512 wv = load_fp8_masked(w + k, m);
      for (int j = 0; j < NB; ++j) part[j] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + j * ldx + k), part[j]);
    }
    const __m512 scale = _mm512_set1_ps(scales[c0 / 128] * 256.0f);
    for (int j = 0; j < NB; ++j) total[j] = _mm512_fmadd_ps(part[j], scale, total[j]);
  }
  for (int j = 0; j < NB; ++j) acc[j] += _mm512_reduce_add_ps(total[j]);
}

template <bool kFp8>
DSV3_AVX512 void dot(const void* wv, const float* scales, const float* x, int64_t ldx, int nb, int64_t len,
                     float* acc) {
  const uint8_t* w = static_cast<const uint8_t*>(wv);
  while (nb > 0) {  // batches of up to 4 activation rows keep the accumulators in registers
    int b = nb >= 4 ? 4 : nb;
    switch (b) {
#define DSV3_CASE(B)                                                              \
  case B:                                                                         \
    if constexpr (kFp8) dot_rows_fp8<B>(w, scales, x, ldx, len, acc);             \
    else dot_rows_bf16<B>(w, x, ldx, len, acc);                                   \
    break;
      DSV3_CASE(4)
      DSV3_CASE(3)
      DSV3_CASE(2)
      DSV3_CASE(1)
#undef DSV3_CASE
    }
    x += b * ldx;
    acc += b;
    nb -= b;
  }
}

DSV3_AVX512 void axpy_bf16(float a, const void* wv, float* y, int64_t len) {
  const uint16_t* w = static_cast<const uint16_t*>(wv);
  __m512 va = _mm512_set1_ps(a);
  int64_t k = 0;
  for (; k + 16 <= len; k += 16)
    _mm512_storeu_ps(y + k, _mm512_fmadd_ps(va, load_bf16(w + k), _mm512_loadu_ps(y + k)));
  if (k < len) {
    __mmask16 m = __mmask16((1u << (len - k)) - 1);
    _mm512_mask_storeu_ps(y + k, m, _mm512_fmadd_ps(va, load_bf16_masked(w + k, m), _mm512_maskz_loadu_ps(m, y + k)));
  }
}

DSV3_AVX512 void axpy_fp8(float a, const void* wv, float* y, int64_t len) {
  const uint8_t* w = static_cast<const uint8_t*>(wv);
  __m512 va = _mm512_set1_ps(a * 256.0f);
  int64_t k = 0;
  for (; k + 16 <= len; k += 16)
    _mm512_storeu_ps(y + k, _mm512_fmadd_ps(va, load_fp8(w + k), _mm512_loadu_ps(y + k)));
  if (k < len) {
    __mmask16 m = __mmask16((1u << (len - k)) - 1);
    _mm512_mask_storeu_ps(y + k, m, _mm512_fmadd_ps(va, load_fp8_masked(w + k, m), _mm512_maskz_loadu_ps(m, y + k)));
  }
}

DSV3_AVX512 void convert_bf16(const void* wv, float* out, int64_t len) {
  const uint16_t* w = static_cast<const uint16_t*>(wv);
  int64_t k = 0;
  for (; k + 16 <= len; k += 16) _mm512_storeu_ps(out + k, load_bf16(w + k));
  if (k < len) {
    __mmask16 m = __mmask16((1u << (len - k)) - 1);
    _mm512_mask_storeu_ps(out + k, m, load_bf16_masked(w + k, m));
  }
}

DSV3_AVX512 void convert_fp8(const void* wv, float* out, int64_t len) {
  const uint8_t* w = static_cast<const uint8_t*>(wv);
  const __m512 unit = _mm512_set1_ps(256.0f);
  int64_t k = 0;
  for (; k + 16 <= len; k += 16) _mm512_storeu_ps(out + k, _mm512_mul_ps(unit, load_fp8(w + k)));
  if (k < len) {
    __mmask16 m = __mmask16((1u << (len - k)) - 1);
    _mm512_mask_storeu_ps(out + k, m, _mm512_mul_ps(unit, load_fp8_masked(w + k, m)));
  }
}

}  // namespace

bool avx512_available() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

const RowKernels& avx512_kernels() {
  static const RowKernels k{dot<false>, dot<true>, axpy_bf16, axpy_fp8, convert_bf16, convert_fp8, "avx512"};
  return k;
}

}  // namespace dsv3::cpu
