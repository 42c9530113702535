// The AVX-512 E4M3 x E4M3 FP8 GEMM kernels (see fp8_kernels.h), compiled for AVX-512 with a
// function attribute and chosen at run time. The same machine as the portable kernel and
// fp8_gemm_reference: per 128-wide K tile, a panel of b's rows is decoded once ([k][columns]);
// then every row of a runs its chunks of N_C products through the p-bit accumulator, and
// promotion converts to float and adds partial * (sa * sb) with two FP32 roundings.
//  - Truncating accumulator (the tensor cores', the default): in FP32, 16 columns a vector.
//    fma(a, b, acc) rounded toward zero to FP32's 23 bits, then the low 23 - p mantissa bits
//    cleared, is the exact sum truncated to p bits: both roundings go toward zero and every
//    p-bit value is an FP32 value, so truncating twice is truncating once (the FP32 result
//    never leaves the exact sum's binade). Codes decode to multiples of 2^-9, so nothing
//    underflows.
//  - Nearest-even accumulator: in double, 8 columns a vector. fma(a, b, acc) is exact
//    (products of codes are multiples of 2^-18 below 2^18, so every partial sum of 128 fits
//    in 53 bits) and the rounding to p bits is an add-and-AND on the double's bits.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "backend/cpu/fp8_kernels.h"
#include "core/dtype.h"

// GCC 12 warns inside its own intrinsics headers (_mm512_undefined_*): false positives.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#define DSV3_AVX512 __attribute__((target("avx512f,avx512vl")))

namespace dsv3::cpu {

namespace {

constexpr int kRows = 4;  // rows of a in flight: 4 x 2 independent accumulator chains

// c[j0 .. j0+16) of one row += partial * (sa * sb), two roundings (no FMA).
DSV3_AVX512 inline void promote16(float* c, __m512 partial, float sa, const float* sb, __mmask16 m) {
  const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(sa), _mm512_maskz_loadu_ps(m, sb));
  __m512 p = _mm512_mul_ps(partial, scale);
  asm("" : "+v"(p));  // keep the product from being fused into the add
  _mm512_mask_storeu_ps(c, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, c), p));
}

// The first `left` lanes of 16 (all of them for 16 or more).
inline __mmask16 first_lanes(int64_t left) { return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1); }

// ---- Truncating accumulator, in FP32: panels of 32 columns, two vectors of 16 floats --------

struct TruncatingAcc {
  using Elem = float;
  static constexpr int kCols = 32;
  alignas(64) float lut[256];  // E4M3 code -> value
  __m512i keep;                // the mantissa bits kept

  DSV3_AVX512 explicit TruncatingAcc(const Fp8GemmOptions& opt)
      : keep(_mm512_set1_epi32(int32_t(~((uint32_t(1) << (23 - opt.acc_mantissa_bits)) - 1)))) {
    for (int q = 0; q < 256; ++q) lut[q] = fp8_e4m3_to_f32(uint8_t(q));
  }

  // Rows [i0, i0 + R) of c's first `cols` columns for the panel: one tile's chunks.
  template <int R>
  DSV3_AVX512 void rows_tile(const Fp8Tensor& a, int64_t i0, int64_t k0, int64_t k1, int64_t chunk, int64_t t,
                             const float* panel, const float* sb, float* c, int64_t ldc, int64_t cols) const {
    const __mmask16 m0 = first_lanes(cols), m1 = cols > 16 ? first_lanes(cols - 16) : __mmask16(0);
    const uint8_t* qa[R];
    for (int r = 0; r < R; ++r) qa[r] = a.codes.data() + size_t((i0 + r) * a.cols);
    for (int64_t kc = k0; kc < k1; kc += chunk) {
      __m512 acc[R][2];
      for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
      const int64_t kce = std::min(k1, kc + chunk);
      for (int64_t k = kc; k < kce; ++k) {
        const __m512 b0 = _mm512_load_ps(panel + (k - k0) * kCols), b1 = _mm512_load_ps(panel + (k - k0) * kCols + 16);
        for (int r = 0; r < R; ++r) {
          const __m512 av = _mm512_set1_ps(lut[qa[r][k]]);
          for (int h = 0; h < 2; ++h) {
            const __m512 sum = _mm512_fmadd_round_ps(av, h ? b1 : b0, acc[r][h], _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            acc[r][h] = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(sum), keep));  // to p bits
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        const float sa = fp8_k_scales(a, i0 + r)[t];
        promote16(c + (i0 + r) * ldc, acc[r][0], sa, sb, m0);
        if (m1) promote16(c + (i0 + r) * ldc + 16, acc[r][1], sa, sb + 16, m1);
      }
    }
  }
};

// ---- Nearest-even accumulator, in double: panels of 16 columns, two vectors of 8 doubles ---

// The two double vectors of 8 partial sums as one vector of 16 floats.
DSV3_AVX512 inline __m512 to_floats(__m512d lo, __m512d hi) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(_mm512_cvtpd_ps(lo))),
                                             _mm256_castps_pd(_mm512_cvtpd_ps(hi)), 1));
}

struct NearestEvenAcc {
  using Elem = double;
  static constexpr int kCols = 16;
  alignas(64) double lut[256];  // E4M3 code -> value
  __m512i mask, half_minus_one, one;
  __m128i drop;

  DSV3_AVX512 explicit NearestEvenAcc(const Fp8GemmOptions& opt) {
    const int d = 52 - opt.acc_mantissa_bits;
    mask = _mm512_set1_epi64(int64_t(~((uint64_t(1) << d) - 1)));
    half_minus_one = _mm512_set1_epi64(int64_t((uint64_t(1) << (d - 1)) - 1));
    one = _mm512_set1_epi64(1);
    drop = _mm_cvtsi32_si128(d);
    for (int q = 0; q < 256; ++q) lut[q] = fp8_e4m3_to_f32(uint8_t(q));
  }

  // Round the double s to p bits, to nearest even: add half an ulp minus one plus the kept
  // lowest bit, then clear the dropped bits (a carry moves into the exponent).
  DSV3_AVX512 __m512d round(__m512d s) const {
    __m512i u = _mm512_castpd_si512(s);
    u = _mm512_add_epi64(u, _mm512_add_epi64(half_minus_one, _mm512_and_si512(_mm512_srl_epi64(u, drop), one)));
    return _mm512_castsi512_pd(_mm512_and_si512(u, mask));
  }

  template <int R>
  DSV3_AVX512 void rows_tile(const Fp8Tensor& a, int64_t i0, int64_t k0, int64_t k1, int64_t chunk, int64_t t,
                             const double* panel, const float* sb, float* c, int64_t ldc, int64_t cols) const {
    const __mmask16 m = first_lanes(cols);
    const uint8_t* qa[R];
    for (int r = 0; r < R; ++r) qa[r] = a.codes.data() + size_t((i0 + r) * a.cols);
    for (int64_t kc = k0; kc < k1; kc += chunk) {
      __m512d acc[R][2];
      for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_pd();
      const int64_t kce = std::min(k1, kc + chunk);
      for (int64_t k = kc; k < kce; ++k) {
        const __m512d b0 = _mm512_load_pd(panel + (k - k0) * kCols), b1 = _mm512_load_pd(panel + (k - k0) * kCols + 8);
        for (int r = 0; r < R; ++r) {
          const __m512d av = _mm512_set1_pd(lut[qa[r][k]]);
          acc[r][0] = round(_mm512_fmadd_pd(av, b0, acc[r][0]));  // exact, then rounded
          acc[r][1] = round(_mm512_fmadd_pd(av, b1, acc[r][1]));
        }
      }
      for (int r = 0; r < R; ++r)
        promote16(c + (i0 + r) * ldc, to_floats(acc[r][0], acc[r][1]), fp8_k_scales(a, i0 + r)[t], sb, m);
    }
  }
};

// ---- The blocked driver both accumulators share ---------------------------------------------

// c [m, n] in tasks of 64 rows x panels of Acc::kCols columns, threaded. Per 128-wide K tile
// the panel holds b's codes decoded, [k - k0][j] (zeros past n), and their scales; then the
// accumulator runs the task's rows through it, kRows at a time.
template <typename Acc>
DSV3_AVX512 void gemm_panels(const Fp8Tensor& a, const Fp8Tensor& b, float* c, int64_t chunk, const Acc& acc) {
  using Elem = typename Acc::Elem;
  constexpr int kCols = Acc::kCols;
  const int64_t m = a.rows, n = b.rows, k = a.cols, k_tiles = (k + kFp8Tile - 1) / kFp8Tile;
  const int64_t panels = (n + kCols - 1) / kCols;
  constexpr int64_t kRowsPerTask = 64;
  const int64_t row_tasks = (m + kRowsPerTask - 1) / kRowsPerTask;
#pragma omp parallel if (m * n * k > (int64_t(1) << 18))
  {
    alignas(64) Elem panel[kFp8Tile * kCols];  // on the thread's stack (at most 16 KiB): no allocation
    alignas(64) float sb[kCols];
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int64_t task = 0; task < row_tasks; ++task)
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t i0 = task * kRowsPerTask, i1 = std::min(m, i0 + kRowsPerTask);
        const int64_t j0 = p * kCols, cols = std::min<int64_t>(kCols, n - j0);
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = 0; j < cols; j += 16)
            _mm512_mask_storeu_ps(c + i * n + j0 + j, first_lanes(cols - j), _mm512_setzero_ps());
        for (int64_t t = 0; t < k_tiles; ++t) {
          const int64_t k0 = t * kFp8Tile, k1 = std::min(k, k0 + kFp8Tile);
          for (int j = 0; j < kCols; ++j) {
            const uint8_t* qb = j < cols ? b.codes.data() + size_t((j0 + j) * k) : nullptr;
            for (int64_t kk = k0; kk < k1; ++kk) panel[(kk - k0) * kCols + j] = qb ? acc.lut[qb[kk]] : Elem(0);
            sb[j] = j < cols ? fp8_k_scales(b, j0 + j)[t] : 0.0f;
          }
          int64_t i = i0;
          for (; i + kRows <= i1; i += kRows)
            acc.template rows_tile<kRows>(a, i, k0, k1, chunk, t, panel, sb, c + j0, n, cols);
          for (; i < i1; ++i) acc.template rows_tile<1>(a, i, k0, k1, chunk, t, panel, sb, c + j0, n, cols);
        }
      }
  }
}

// ---- Quantisation: E4M3 codes of x / scale, 16 at a time --------------------------------

#define DSV3_AVX512BW __attribute__((target("avx512f,avx512vl,avx512bw")))

// The bit recipe of f32_to_fp8_e4m3 (core/dtype.cpp) in lanes: round to nearest even on the
// float's bits (normal range), or nearbyint(|v| * 2^9) below 2^-6 (subnormal codes);
// saturate to 448 (infinities too), NaN -> 0x7f, the sign bit copied (-0 -> 0x80).
DSV3_AVX512BW inline __m128i e4m3_codes(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i a = _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff));
  const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(u, 24), _mm512_set1_epi32(0x80));
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(a, 20), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(a, _mm512_add_epi32(_mm512_set1_epi32((1 << 19) - 1), lsb)), 20);
  const __m512i normal = _mm512_sub_epi32(rounded, _mm512_set1_epi32(120 << 3));  // exponent rebiased 127 -> 7
  const __m512i subnormal = _mm512_cvt_roundps_epi32(_mm512_mul_ps(_mm512_castsi512_ps(a), _mm512_set1_ps(512.0f)),
                                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __mmask16 below = _mm512_cmplt_epi32_mask(a, _mm512_set1_epi32(0x3c800000));  // |v| < 2^-6
  __m512i m = _mm512_min_epi32(_mm512_mask_blend_epi32(below, normal, subnormal), _mm512_set1_epi32(0x7e));
  m = _mm512_or_si512(m, sign);
  m = _mm512_mask_mov_epi32(m, _mm512_cmpgt_epi32_mask(a, _mm512_set1_epi32(0x7f800000)), _mm512_set1_epi32(0x7f));
  return _mm512_cvtepi32_epi8(m);
}

}  // namespace

DSV3_AVX512BW void fp8_encode_row_e4m3_avx512(const float* x, int64_t cols, const float* scales, bool per_column,
                                              uint8_t* q) {
  int64_t c = 0;
  for (; c + 16 <= cols; c += 16) {  // 16 divides 128: a vector never straddles two tiles
    const __m512 s = per_column ? _mm512_loadu_ps(scales + c) : _mm512_set1_ps(scales[c / kFp8Tile]);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + c), e4m3_codes(_mm512_div_ps(_mm512_loadu_ps(x + c), s)));
  }
  if (c < cols) {
    const __mmask16 m = __mmask16((1u << (cols - c)) - 1);
    const __m512 s = per_column ? _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), m, scales + c)
                                : _mm512_set1_ps(scales[c / kFp8Tile]);
    _mm_mask_storeu_epi8(q + c, m, e4m3_codes(_mm512_div_ps(_mm512_maskz_loadu_ps(m, x + c), s)));
  }
}

DSV3_AVX512BW void fp8_row_absmax_avx512(const float* x, int64_t cols, bool per_column, float* amax) {
  // On the bits: |x| as an integer orders non-negative floats, and puts inf and NaN
  // (>= 0x7f800000) above every finite value, so they reach amax and quantize() finds them.
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  for (int64_t c0 = 0; c0 < cols; c0 += kFp8Tile) {
    const int64_t c1 = std::min(cols, c0 + kFp8Tile);
    __m512i tile = _mm512_setzero_si512();
    for (int64_t c = c0; c < c1; c += 16) {
      const __mmask16 m = c + 16 <= c1 ? __mmask16(0xffff) : __mmask16((1u << (c1 - c)) - 1);
      const __m512i a = _mm512_and_si512(_mm512_maskz_loadu_epi32(m, x + c), abs_mask);
      if (per_column)
        _mm512_mask_storeu_epi32(amax + c, m, _mm512_max_epu32(_mm512_maskz_loadu_epi32(m, amax + c), a));
      else
        tile = _mm512_max_epu32(tile, a);
    }
    if (!per_column) {
      const uint32_t t = _mm512_reduce_max_epu32(tile);
      float& s = amax[c0 / kFp8Tile];
      uint32_t cur;
      std::memcpy(&cur, &s, 4);
      cur = std::max(cur, t);
      std::memcpy(&s, &cur, 4);
    }
  }
}

void fp8_gemm_e4m3_avx512(const Fp8Tensor& a, const Fp8Tensor& b, float* c, const Fp8GemmOptions& opt) {
  if (opt.acc_rounding == Fp8AccRounding::truncate)
    gemm_panels(a, b, c, opt.promote_every, TruncatingAcc(opt));
  else
    gemm_panels(a, b, c, opt.promote_every, NearestEvenAcc(opt));
}

}  // namespace dsv3::cpu
