// AVX-512 row kernels (see kernels.h), compiled for AVX-512 with a function attribute
// and chosen at run time, so the binary still runs on CPUs without it.
// BF16 -> FP32 is a 16-bit shift. FP8 E4M3 -> FP32 goes through FP16: moving the 7 low
// bits of the code up by 7 gives an FP16 whose value is exactly code_value / 2^8 for
// normal and subnormal codes alike (bias 15 vs 7), so one vcvtph2ps and a factor 256
// decode 16 codes. NaN codes (0x7f/0xff) are not special-cased: checkpoints have none.
#include <immintrin.h>

#include <algorithm>

#include "backend/cpu/fp8_decode.h"
#include "backend/cpu/kernels.h"

// GCC 12 warns inside its own intrinsics headers (_mm512_undefined_*): false positives.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#define DSV3_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma")))

namespace dsv3::cpu {

namespace {

// Software prefetch distance, in bytes of a weight row ahead of the one being read: the
// hardware prefetcher alone left the row kernels waiting on memory (BF16 at ~75 % and FP8
// at ~45 % of the read bandwidth in bench_linear, one activation row); these distances,
// measured there on this machine, give ~90 % and ~70 %. FP8 spends more time per byte
// decoding, so it looks further ahead.
#ifndef DSV3_PREFETCH_BF16
#define DSV3_PREFETCH_BF16 1024
#endif
#ifndef DSV3_PREFETCH_FP8
#define DSV3_PREFETCH_FP8 8192
#endif
constexpr int64_t kPrefetchBf16 = DSV3_PREFETCH_BF16, kPrefetchFp8 = DSV3_PREFETCH_FP8;

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
  __m512 s[NB], s2[NB];  // two accumulators per row: FMA latency must not bound the loop
  for (int j = 0; j < NB; ++j) s[j] = s2[j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= len; k += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(w + 2 * k + kPrefetchBf16), _MM_HINT_T0);
    const __m512 w0 = load_w<false>(w, k), w1 = load_w<false>(w, k + 16);
    for (int j = 0; j < NB; ++j) {
      s[j] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + j * ldx + k), s[j]);
      s2[j] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + j * ldx + k + 16), s2[j]);
    }
  }
  for (; k < len; k += 16) {
    __mmask16 m = __mmask16(len - k >= 16 ? 0xffff : (1u << (len - k)) - 1);
    __m512 wv = load_w_masked<false>(w, k, m);
    for (int j = 0; j < NB; ++j) s[j] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + j * ldx + k), s[j]);
  }
  for (int j = 0; j < NB; ++j) acc[j] += _mm512_reduce_add_ps(_mm512_add_ps(s[j], s2[j]));
}

// FP8: 32 codes per step decoded to their values / 256 (decode32_fp8). The block scales are
// already in x, so a row is one accumulation; the low and high 16 codes feed separate
// accumulators, and a single activation row (decode) unrolls to 64 codes, so that FMA
// latency does not bound the loop (with one accumulator it ran at half the bandwidth).
template <int NB>
DSV3_AVX512 inline void dot_rows_fp8(const uint8_t* w, const float* x, int64_t ldx, int64_t len, float* acc) {
  __m512 a[NB], b[NB], a2[NB], b2[NB];
  for (int j = 0; j < NB; ++j) a[j] = b[j] = a2[j] = b2[j] = _mm512_setzero_ps();
  int64_t k = 0;
  if constexpr (NB == 1) {
    for (; k + 64 <= len; k += 64) {
      __m512 lo, hi, lo2, hi2;
      _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetchFp8), _MM_HINT_T0);
      decode32_fp8(w + k, lo, hi);
      decode32_fp8(w + k + 32, lo2, hi2);
      a[0] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + k), a[0]);
      b[0] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + k + 16), b[0]);
      a2[0] = _mm512_fmadd_ps(lo2, _mm512_loadu_ps(x + k + 32), a2[0]);
      b2[0] = _mm512_fmadd_ps(hi2, _mm512_loadu_ps(x + k + 48), b2[0]);
    }
  }
  for (; k + 32 <= len; k += 32) {
    __m512 lo, hi;
    if (k % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetchFp8), _MM_HINT_T0);
    decode32_fp8(w + k, lo, hi);
    for (int j = 0; j < NB; ++j) {
      a[j] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + j * ldx + k), a[j]);
      b[j] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + j * ldx + k + 16), b[j]);
    }
  }
  for (; k < len; k += 16) {
    const __mmask16 m = __mmask16(len - k >= 16 ? 0xffff : (1u << (len - k)) - 1);
    const __m512 wv = load_fp8_masked(w + k, m);
    for (int j = 0; j < NB; ++j) a[j] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + j * ldx + k), a[j]);
  }
  for (int j = 0; j < NB; ++j)
    acc[j] += 256.0f * _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[j], b[j]), _mm512_add_ps(a2[j], b2[j])));
}

// A tile of rows against one activation row, each row one accumulation as above; the
// loop over rows stays inside, so short rows pay no call or dispatch per row.
template <bool kFp8>
DSV3_AVX512 void rows(const void* wv, size_t row_bytes, int64_t nrows, const float* x, int64_t len, float* y) {
  const uint8_t* w = static_cast<const uint8_t*>(wv);
  for (int64_t r = 0; r < nrows; ++r) {
    float acc = 0;
    if constexpr (kFp8) dot_rows_fp8<1>(w + size_t(r) * row_bytes, x, len, len, &acc);
    else dot_rows_bf16<1>(w + size_t(r) * row_bytes, x, len, len, &acc);
    y[r] = acc;
  }
}

// Float32 rows: like BF16 without the conversion.
DSV3_AVX512 void dot_f32(const void* wv, const float* x, int64_t ldx, int nb, int64_t len, float* acc) {
  const float* w = static_cast<const float*>(wv);
  for (int j = 0; j < nb; ++j) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0;
    int64_t k = 0;
    for (; k + 32 <= len; k += 32) {
      s0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + j * ldx + k), s0);
      s1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16), _mm512_loadu_ps(x + j * ldx + k + 16), s1);
    }
    for (; k < len; k += 16) {
      const __mmask16 m = __mmask16(len - k >= 16 ? 0xffff : (1u << (len - k)) - 1);
      s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + k), _mm512_maskz_loadu_ps(m, x + j * ldx + k), s0);
    }
    acc[j] += _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
  }
}

template <bool kFp8>
DSV3_AVX512 void dot(const void* wv, const float* x, int64_t ldx, int nb, int64_t len, float* acc) {
  const uint8_t* w = static_cast<const uint8_t*>(wv);
  while (nb > 0) {  // batches of up to 4 activation rows keep the accumulators in registers
    int b = nb >= 4 ? 4 : nb;
    switch (b) {
#define DSV3_CASE(B)                                                              \
  case B:                                                                         \
    if constexpr (kFp8) dot_rows_fp8<B>(w, x, ldx, len, acc);             \
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
  static const RowKernels k{dot<false>, dot<true>, dot_f32, rows<false>, rows<true>, axpy_bf16, axpy_fp8, convert_bf16, convert_fp8, "avx512"};
  return k;
}

}  // namespace dsv3::cpu
