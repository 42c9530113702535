// FP8 quantisation and the emulated FP8 GEMM of the CPU backend (see backend/fp8.h):
// quantize / dequantize / transpose, the generic element-wise GEMM (also the scalar twin),
// the portable blocked E4M3 kernel (the AVX-512 one is in fp8_avx512.cpp), and the three
// training GEMMs. OpenMP over rows.
#include "backend/fp8.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <string_view>
#include <type_traits>

#include "backend/cpu/fp8_kernels.h"
#include "backend/cpu/threads.h"
#include "backend/cpu/kernels.h"
#include "core/dtype.h"
#include "core/error.h"

namespace dsv3 {

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Decoded values of all 256 codes (constant tables, built once).
struct Fp8Tables {
  std::array<float, 256> e4m3, e5m2;
  Fp8Tables() {
    for (int c = 0; c < 256; ++c) e4m3[size_t(c)] = fp8_e4m3_to_f32(uint8_t(c));
    for (int c = 0; c < 256; ++c) e5m2[size_t(c)] = fp8_e5m2_to_f32(uint8_t(c));
  }
};
const Fp8Tables& tables() {
  static const Fp8Tables t;
  return t;
}
const float* decode_table(Fp8Format f) { return f == Fp8Format::e4m3 ? tables().e4m3.data() : tables().e5m2.data(); }

const char* tiling_name(Fp8Tiling t) {
  switch (t) {
    case Fp8Tiling::row_tiles_1x128: return "1x128 tiles";
    case Fp8Tiling::col_tiles_128x1: return "128x1 tiles";
    case Fp8Tiling::blocks_128x128: return "128x128 blocks";
  }
  return "?";
}

}  // namespace

float fp8_max(Fp8Format f) { return f == Fp8Format::e4m3 ? 448.0f : 57344.0f; }
float fp8_decode(Fp8Format f, uint8_t code) { return decode_table(f)[code]; }
uint8_t fp8_encode(Fp8Format f, float x) { return f == Fp8Format::e4m3 ? f32_to_fp8_e4m3(x) : f32_to_fp8_e5m2(x); }

int64_t Fp8Tensor::scale_rows() const { return tiling == Fp8Tiling::row_tiles_1x128 ? rows : ceil_div(rows, kFp8Tile); }
int64_t Fp8Tensor::scale_cols() const { return tiling == Fp8Tiling::col_tiles_128x1 ? cols : ceil_div(cols, kFp8Tile); }
float Fp8Tensor::scale(int64_t r, int64_t c) const {
  const int64_t sr = tiling == Fp8Tiling::row_tiles_1x128 ? r : r / kFp8Tile;
  const int64_t sc = tiling == Fp8Tiling::col_tiles_128x1 ? c : c / kFp8Tile;
  return scales[size_t(sr * scale_cols() + sc)];
}
float Fp8Tensor::value(int64_t r, int64_t c) const {
  return fp8_decode(format, codes[size_t(r * cols + c)]) * scale(r, c);
}

// ---- Quantisation ----------------------------------------------------------------------

Fp8Tensor quantize(const float* x, int64_t rows, int64_t cols, Fp8Tiling tiling, Fp8Format format,
                   Fp8Scaling scaling) {
  Fp8Tensor t;
  quantize_into(t, x, rows, cols, tiling, format, scaling);
  return t;
}

void quantize_into(Fp8Tensor& t, const float* x, int64_t rows, int64_t cols, Fp8Tiling tiling, Fp8Format format,
                   Fp8Scaling scaling) {
  if (rows < 0 || cols < 0) fail("fp8 quantize: negative shape [", rows, ", ", cols, "]");
  t.rows = rows, t.cols = cols, t.tiling = tiling, t.format = format;
  t.codes.resize(size_t(rows * cols));
  const int64_t sr = t.scale_rows(), sc = t.scale_cols();
  std::vector<float>& amax = t.scales;  // max|x| per tile first, then turned into the scale
  amax.assign(size_t(sr * sc), 0.0f);

  // Pass 1: max|x| per tile. Threads own blocks of 128 rows, whose tiles no other block touches.
  const int64_t row_blocks = ceil_div(rows, kFp8Tile);
  const bool threaded = rows * cols > 32768;
  const bool avx512 = std::string_view(cpu::active_kernels().name) == "avx512";  // DSV3_KERNELS=scalar: off
  bool finite = true;
#pragma omp parallel for schedule(static) reduction(&& : finite) if (threaded)
  for (int64_t rb = 0; rb < row_blocks; ++rb) {
    for (int64_t r = rb * kFp8Tile; r < std::min(rows, (rb + 1) * kFp8Tile); ++r) {
      const float* xr = x + r * cols;
      if (avx512) {  // non-finite values show as non-finite amax, checked below
        const bool per_column = tiling == Fp8Tiling::col_tiles_128x1;
        cpu::fp8_row_absmax_avx512(xr, cols, per_column,
                                   amax.data() + size_t((per_column || tiling == Fp8Tiling::blocks_128x128 ? rb : r) * sc));
        continue;
      }
      for (int64_t c = 0; c < cols; ++c) finite = finite && std::isfinite(xr[c]);
      for (int64_t cb = 0; cb * kFp8Tile < cols; ++cb) {
        const int64_t c0 = cb * kFp8Tile, c1 = std::min(cols, c0 + kFp8Tile);
        if (tiling == Fp8Tiling::col_tiles_128x1) {
          float* m = amax.data() + size_t(rb * sc);
          for (int64_t c = c0; c < c1; ++c) m[c] = std::max(m[c], std::fabs(xr[c]));
        } else {
          float m = 0;
          for (int64_t c = c0; c < c1; ++c) m = std::max(m, std::fabs(xr[c]));
          float& s = amax[size_t((tiling == Fp8Tiling::row_tiles_1x128 ? r : rb) * sc + cb)];
          s = std::max(s, m);
        }
      }
    }
  }
  for (float m : amax) finite = finite && std::isfinite(m);
  if (!finite)
    for (int64_t i = 0; i < rows * cols; ++i)
      if (!std::isfinite(x[i]))
        fail("fp8 quantize: non-finite value ", x[i], " at row ", i / cols, ", column ", i % cols, " of a [",
             rows, ", ", cols, "] tensor (", tiling_name(tiling), ")");

  if (scaling == Fp8Scaling::per_tensor) {
    const float m = t.scales.empty() ? 0.0f : *std::max_element(t.scales.begin(), t.scales.end());
    std::fill(t.scales.begin(), t.scales.end(), m);
  }
  const float fmax = fp8_max(format);
  for (float& s : t.scales) s = s == 0 ? 1.0f : std::max(s / fmax, FLT_MIN);

  // Pass 2: codes = RNE(x / scale), saturated.
  const bool e4m3_avx512 = avx512 && format == Fp8Format::e4m3;
#pragma omp parallel for schedule(static) if (threaded)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * cols;
    uint8_t* qr = t.codes.data() + size_t(r * cols);
    const float* srow = t.scales.data() + size_t((tiling == Fp8Tiling::row_tiles_1x128 ? r : r / kFp8Tile) * sc);
    if (e4m3_avx512) {
      cpu::fp8_encode_row_e4m3_avx512(xr, cols, srow, tiling == Fp8Tiling::col_tiles_128x1, qr);
    } else if (tiling == Fp8Tiling::col_tiles_128x1) {
      for (int64_t c = 0; c < cols; ++c) qr[c] = fp8_encode(format, xr[c] / srow[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) qr[c] = fp8_encode(format, xr[c] / srow[c / kFp8Tile]);
    }
  }
}

void dequantize(const Fp8Tensor& t, float* out) {
  const float* lut = decode_table(t.format);
  const int64_t sc = t.scale_cols();
#pragma omp parallel for schedule(static) if (t.rows * t.cols > 32768)
  for (int64_t r = 0; r < t.rows; ++r) {
    const uint8_t* q = t.codes.data() + size_t(r * t.cols);
    const float* srow = t.scales.data() + size_t((t.tiling == Fp8Tiling::row_tiles_1x128 ? r : r / kFp8Tile) * sc);
    float* o = out + r * t.cols;
    if (t.tiling == Fp8Tiling::col_tiles_128x1) {
      for (int64_t c = 0; c < t.cols; ++c) o[c] = lut[q[c]] * srow[c];
    } else {
      for (int64_t c = 0; c < t.cols; ++c) o[c] = lut[q[c]] * srow[c / kFp8Tile];
    }
  }
}

namespace {

// The 8x8 byte matrix in x (row i = x[i], column j = byte j) transposed in place: swap the
// off-diagonal 4x4 blocks, then the 2x2 blocks inside each, then the single bytes.
static_assert(std::endian::native == std::endian::little, "byte j of a row loaded by memcpy is bits 8j..8j+7");
inline void transpose_8x8_bytes(uint64_t x[8]) {
  for (int r = 0; r < 4; ++r) {
    const uint64_t t = ((x[r] >> 32) ^ x[r + 4]) & 0x00000000ffffffffull;
    x[r] ^= t << 32, x[r + 4] ^= t;
  }
  for (int r : {0, 1, 4, 5}) {
    const uint64_t t = ((x[r] >> 16) ^ x[r + 2]) & 0x0000ffff0000ffffull;
    x[r] ^= t << 16, x[r + 2] ^= t;
  }
  for (int r : {0, 2, 4, 6}) {
    const uint64_t t = ((x[r] >> 8) ^ x[r + 1]) & 0x00ff00ff00ff00ffull;
    x[r] ^= t << 8, x[r + 1] ^= t;
  }
}

}  // namespace

Fp8Tensor transpose(const Fp8Tensor& t) {
  Fp8Tensor o;
  transpose_into(t, o);
  return o;
}

void transpose_into(const Fp8Tensor& t, Fp8Tensor& o) {
  if (&t == &o) fail("fp8 transpose: the output must be another tensor");
  o.rows = t.cols, o.cols = t.rows, o.format = t.format;
  o.tiling = t.tiling == Fp8Tiling::row_tiles_1x128   ? Fp8Tiling::col_tiles_128x1
             : t.tiling == Fp8Tiling::col_tiles_128x1 ? Fp8Tiling::row_tiles_1x128
                                                      : Fp8Tiling::blocks_128x128;
  o.codes.resize(t.codes.size());
  // Blocks of 64 rows by 8 columns, moved as 8x8 byte squares: each block writes whole
  // 64-byte lines of the output (a byte at a time, strided by the row length, would keep
  // evicting lines that a power-of-two length maps to one cache set).
  const uint8_t* in = t.codes.data();
  uint8_t* out = o.codes.data();
  const int64_t R = t.rows, C = t.cols;
  constexpr int64_t kB = 64;
#pragma omp parallel for schedule(static) if (R * C > 65536)
  for (int64_t r0 = 0; r0 < R; r0 += kB)
    for (int64_t c0 = 0; c0 < C; c0 += 8) {
      const int64_t r1 = std::min(R, r0 + kB);
      int64_t r = r0;
      if (c0 + 8 <= C)
        for (; r + 8 <= r1; r += 8) {
          uint64_t x[8];
          for (int i = 0; i < 8; ++i) std::memcpy(&x[i], in + (r + i) * C + c0, 8);
          transpose_8x8_bytes(x);
          for (int j = 0; j < 8; ++j) std::memcpy(out + (c0 + j) * R + r, &x[j], 8);
        }
      for (; r < r1; ++r)  // the edges: rows past the last 8, or columns past the last 8
        for (int64_t c = c0; c < std::min(C, c0 + 8); ++c) out[c * R + r] = in[r * C + c];
    }
  const int64_t sr = t.scale_rows(), sc = t.scale_cols();
  o.scales.resize(t.scales.size());
  for (int64_t i = 0; i < sr; ++i)
    for (int64_t j = 0; j < sc; ++j) o.scales[size_t(j * sr + i)] = t.scales[size_t(i * sc + j)];
}

// ---- The emulated GEMM -----------------------------------------------------------------

namespace {

struct GemmShape {
  const Fp8Tensor& a;
  const Fp8Tensor& b;
  int64_t m, n, k, k_tiles;
  bool folded;  // N_C = 0 or a multiple of 128: scales folded into the products
  int64_t chunk;  // N_C when it divides 128; else the promotion interval (K for 0)
};

GemmShape check_gemm(const Fp8Tensor& a, const Fp8Tensor& b, const Fp8GemmOptions& opt) {
  for (const Fp8Tensor* t : {&a, &b}) {
    if (t->codes.size() != size_t(t->rows * t->cols) || t->scales.size() != size_t(t->scale_rows() * t->scale_cols()))
      fail("fp8_gemm: ", t == &a ? "A" : "B", " [", t->rows, ", ", t->cols, "] holds ", t->codes.size(), " codes and ",
           t->scales.size(), " scales");
    if (t->tiling == Fp8Tiling::col_tiles_128x1)
      fail("fp8_gemm: ", t == &a ? "A" : "B", " [", t->rows, ", ", t->cols,
           "] has 128x1 tiles (along M/N); the GEMM needs scales along K (1x128 tiles or 128x128 blocks): "
           "transpose() it");
  }
  if (a.cols != b.cols) fail("fp8_gemm: K differs: A [", a.rows, ", ", a.cols, "], B [", b.rows, ", ", b.cols, "]");
  const int nc = opt.promote_every;
  if (nc < 0 || (nc > 0 && kFp8Tile % nc != 0 && nc % kFp8Tile != 0))
    fail("fp8_gemm: promote_every = ", nc, ": must be 0, a divisor of 128 or a multiple of 128");
  if (opt.acc_mantissa_bits < 1 || opt.acc_mantissa_bits > 23)
    fail("fp8_gemm: acc_mantissa_bits = ", opt.acc_mantissa_bits, ": must be 1..23");
  const bool folded = nc == 0 || nc > kFp8Tile;
  const int64_t chunk = nc == 0 ? std::max<int64_t>(a.cols, 1) : nc;
  return {a, b, a.rows, b.rows, a.cols, ceil_div(a.cols, kFp8Tile), folded, chunk};
}

// The limited accumulator of the reference: round the exact sum acc + term to p explicit
// mantissa bits. TwoSum gives s + e == acc + term exactly; s is rounded, and e decides the
// cases where s alone lies exactly on the grid (truncate) or on a tie (nearest even).
double acc_add_reference(double acc, double term, int p, Fp8AccRounding mode) {
  const double s = acc + term;
  const double bb = s - acc;
  const double e = (acc - (s - bb)) + (term - bb);
  if (s == 0) return 0.0;
  int ex;
  std::frexp(s, &ex);                             // |s| in [2^(ex-1), 2^ex)
  const double ulp = std::ldexp(1.0, ex - 1 - p);  // the grid of p explicit bits in that binade
  const double q = s / ulp;                        // exact; |q| in [2^p, 2^(p+1))
  const double sign = s < 0 ? -1.0 : 1.0;
  const bool e_inward = e != 0 && ((e < 0) != (s < 0));  // the exact sum is a little nearer zero
  if (mode == Fp8AccRounding::truncate) {
    double r = std::trunc(q);
    if (r == q && e_inward) {
      if (std::fabs(q) == std::ldexp(1.0, p)) return sign * (std::ldexp(1.0, ex - 1) - ulp / 2);  // binade below
      r -= sign;
    }
    return r * ulp;
  }
  double r = std::nearbyint(q);
  if (std::fabs(q - std::trunc(q)) == 0.5 && e != 0) r = std::trunc(q) + (e_inward ? 0.0 : sign);
  return r * ulp;
}

// One element of c: the definition of the emulated machine, written plainly.
float gemm_element(const GemmShape& g, const Fp8GemmOptions& opt, int64_t i, int64_t j) {
  const float* lut_a = decode_table(g.a.format);
  const float* lut_b = decode_table(g.b.format);
  const uint8_t* qa = g.a.codes.data() + size_t(i * g.k);
  const uint8_t* qb = g.b.codes.data() + size_t(j * g.k);
  const float* sa = cpu::fp8_k_scales(g.a, i);
  const float* sb = cpu::fp8_k_scales(g.b, j);
  const int p = opt.acc_mantissa_bits;
  float c32 = 0;
  double acc = 0;  // the limited accumulator (a p-bit value)
  for (int64_t t = 0; t < g.k_tiles; ++t) {
    const float s = sa[t] * sb[t];
    const int64_t k0 = t * kFp8Tile, k1 = std::min(g.k, k0 + kFp8Tile);
    for (int64_t k = k0; k < k1; ++k) {
      const float prod = lut_a[qa[k]] * lut_b[qb[k]];  // exact
      const double term = g.folded ? double(prod * s) : double(prod);
      acc = acc_add_reference(acc, term, p, opt.acc_rounding);
      if ((k + 1) % g.chunk == 0 || (!g.folded && k + 1 == k1) || k + 1 == g.k) {  // promote
        c32 = g.folded ? c32 + float(acc) : cpu::fp8_promote(c32, float(acc), s);
        acc = 0;
      }
    }
  }
  return c32;
}

// The fast path: E4M3 x E4M3, N_C dividing 128. Codes decode to multiples of 2^-9 below 2^9,
// so products are multiples of 2^-18 below 2^18 and any sum of 128 of them (rounded or not)
// fits in 53 bits: the double sum acc + term is exact, and rounding it to p bits is a bit
// operation on the double: clear the low 52 - p mantissa bits (truncate), or add half an ulp
// minus one plus the kept lowest bit first (nearest even; a carry moves into the exponent).
template <bool kTruncate>
inline double acc_round(double s, int drop) {
  uint64_t u;
  std::memcpy(&u, &s, 8);
  const uint64_t mask = ~((uint64_t(1) << drop) - 1);
  if (!kTruncate) u += ((uint64_t(1) << (drop - 1)) - 1) + ((u >> drop) & 1);
  u &= mask;
  std::memcpy(&s, &u, 8);
  return s;
}

// c[i0 .. i0+R, j0 .. j0+S] from R rows of a and S rows of b.
template <bool kTruncate, int R, int S>
void e4m3_block(const GemmShape& g, const Fp8GemmOptions& opt, const double* lut, int64_t i0, int64_t j0,
                float* c) {
  const int drop = 52 - opt.acc_mantissa_bits;
  const uint8_t* qa[R];
  const uint8_t* qb[S];
  const float* sa[R];
  const float* sb[S];
  for (int r = 0; r < R; ++r) qa[r] = g.a.codes.data() + size_t((i0 + r) * g.k), sa[r] = cpu::fp8_k_scales(g.a, i0 + r);
  for (int s = 0; s < S; ++s) qb[s] = g.b.codes.data() + size_t((j0 + s) * g.k), sb[s] = cpu::fp8_k_scales(g.b, j0 + s);
  float c32[R][S] = {};
  for (int64_t t = 0; t < g.k_tiles; ++t) {
    const int64_t k1 = std::min(g.k, (t + 1) * kFp8Tile);
    for (int64_t kc = t * kFp8Tile; kc < k1; kc += g.chunk) {
      double acc[R][S] = {};
      for (int64_t k = kc; k < std::min(k1, kc + g.chunk); ++k) {
        double av[R], bv[S];
        for (int r = 0; r < R; ++r) av[r] = lut[qa[r][k]];
        for (int s = 0; s < S; ++s) bv[s] = lut[qb[s][k]];
        for (int r = 0; r < R; ++r)
          for (int s = 0; s < S; ++s) acc[r][s] = acc_round<kTruncate>(acc[r][s] + av[r] * bv[s], drop);
      }
      for (int r = 0; r < R; ++r)
        for (int s = 0; s < S; ++s) c32[r][s] = cpu::fp8_promote(c32[r][s], float(acc[r][s]), sa[r][t] * sb[s][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < S; ++s) c[(i0 + r) * g.n + j0 + s] = c32[r][s];
}

template <bool kTruncate>
void e4m3_gemm_portable(const GemmShape& g, const Fp8GemmOptions& opt, float* c) {
  std::array<double, 256> lut;
  for (int q = 0; q < 256; ++q) lut[size_t(q)] = fp8_e4m3_to_f32(uint8_t(q));
  constexpr int kR = 4, kS = 4;
  const int64_t row_blocks = ceil_div(g.m, kR);
#pragma omp parallel for schedule(dynamic, 1) if (g.m * g.n * g.k > (int64_t(1) << 18))
  for (int64_t ib = 0; ib < row_blocks; ++ib) {
    const int64_t i0 = ib * kR;
    const bool full_rows = i0 + kR <= g.m;
    int64_t j0 = 0;
    for (; full_rows && j0 + kS <= g.n; j0 += kS) e4m3_block<kTruncate, kR, kS>(g, opt, lut.data(), i0, j0, c);
    for (int64_t i = i0; i < std::min(g.m, i0 + kR); ++i)  // the edges, one element at a time
      for (int64_t j = j0; j < g.n; ++j) e4m3_block<kTruncate, 1, 1>(g, opt, lut.data(), i, j, c);
  }
}

}  // namespace

void cpu::fp8_gemm_e4m3_portable(const Fp8Tensor& a, const Fp8Tensor& b, float* c, const Fp8GemmOptions& opt) {
  const GemmShape g = check_gemm(a, b, opt);
  if (opt.acc_rounding == Fp8AccRounding::truncate)
    e4m3_gemm_portable<true>(g, opt, c);
  else
    e4m3_gemm_portable<false>(g, opt, c);
}

void fp8_gemm(const Fp8Tensor& a, const Fp8Tensor& b, float* c, const Fp8GemmOptions& opt) {
  const GemmShape g = check_gemm(a, b, opt);
  if (a.format == Fp8Format::e4m3 && b.format == Fp8Format::e4m3 && !g.folded) {
    // DSV3_KERNELS=scalar (read by active_kernels) forces the portable kernel here too.
    if (std::string_view(cpu::active_kernels().name) == "avx512")
      cpu::fp8_gemm_e4m3_avx512(a, b, c, opt);
    else
      cpu::fp8_gemm_e4m3_portable(a, b, c, opt);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) if (g.m * g.n * g.k > (int64_t(1) << 16))
  for (int64_t i = 0; i < g.m; ++i)
    for (int64_t j = 0; j < g.n; ++j) c[i * g.n + j] = gemm_element(g, opt, i, j);
}

void fp8_gemm_reference(const Fp8Tensor& a, const Fp8Tensor& b, float* c, const Fp8GemmOptions& opt) {
  const GemmShape g = check_gemm(a, b, opt);
  for (int64_t i = 0; i < g.m; ++i)
    for (int64_t j = 0; j < g.n; ++j) c[i * g.n + j] = gemm_element(g, opt, i, j);
}

// ---- The three GEMMs of a Linear -------------------------------------------------------

namespace {

// What the three GEMMs quantise into, kept per thread from one call to the next, so that a
// training step allocates nothing once every shape has been seen (the vectors keep their
// capacity): the two operands, their transposes, the FP32 product and float copies of
// double inputs.
struct Fp8Workspace {
  Fp8Tensor a, b, a_t, b_t;
  std::vector<float> c, a_f, b_f;
};
Fp8Workspace& workspace() {
  thread_local Fp8Workspace w;
  return w;
}

// A float view of T data: the data itself for float, a rounded copy in `copy` for double.
template <typename T>
const float* as_float(const T* x, int64_t count, std::vector<float>& copy) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    copy.assign(x, x + count);
    return copy.data();
  }
}

template <typename T>
void store(const std::vector<float>& c, int64_t count, T* out, bool accumulate) {
#pragma omp parallel for schedule(static) if (count > 65536)
  for (int64_t i = 0; i < count; ++i) out[i] = accumulate ? out[i] + T(c[size_t(i)]) : T(c[size_t(i)]);
}

}  // namespace

template <typename T>
void matmul_fp8(const T* x, const T* w, T* y, int64_t n, int64_t in, int64_t out, const Fp8GemmOptions& opt,
                Fp8Scaling scaling) {
  cpu::adapt_threads();
  constexpr Fp8Format e4m3 = Fp8Format::e4m3;
  Fp8Workspace& ws = workspace();
  quantize_into(ws.a, as_float(x, n * in, ws.a_f), n, in, Fp8Tiling::row_tiles_1x128, e4m3, scaling);
  quantize_into(ws.b, as_float(w, out * in, ws.b_f), out, in, Fp8Tiling::blocks_128x128, e4m3, scaling);
  ws.c.resize(size_t(n * out));
  fp8_gemm(ws.a, ws.b, ws.c.data(), opt);
  store(ws.c, n * out, y, false);
}

template <typename T>
void matmul_dx_fp8(const T* dy, const T* w, T* dx, int64_t n, int64_t in, int64_t out, bool accumulate,
                   const Fp8GemmOptions& opt, Fp8Scaling scaling) {
  cpu::adapt_threads();
  constexpr Fp8Format e4m3 = Fp8Format::e4m3;
  Fp8Workspace& ws = workspace();
  quantize_into(ws.a, as_float(dy, n * out, ws.a_f), n, out, Fp8Tiling::row_tiles_1x128, e4m3, scaling);
  quantize_into(ws.b, as_float(w, out * in, ws.b_f), out, in, Fp8Tiling::blocks_128x128, e4m3, scaling);
  transpose_into(ws.b, ws.b_t);
  ws.c.resize(size_t(n * in));
  fp8_gemm(ws.a, ws.b_t, ws.c.data(), opt);
  store(ws.c, n * in, dx, accumulate);
}

template <typename T>
void matmul_dw_fp8(const T* dy, const T* x, T* dw, int64_t n, int64_t in, int64_t out, const Fp8GemmOptions& opt,
                   Fp8Scaling scaling) {
  cpu::adapt_threads();
  // Tiles along n: 128x1 in the forward layout, 1x128 once transposed to [out, n] / [in, n].
  constexpr Fp8Format e4m3 = Fp8Format::e4m3;
  Fp8Workspace& ws = workspace();
  quantize_into(ws.a, as_float(dy, n * out, ws.a_f), n, out, Fp8Tiling::col_tiles_128x1, e4m3, scaling);
  transpose_into(ws.a, ws.a_t);
  quantize_into(ws.b, as_float(x, n * in, ws.b_f), n, in, Fp8Tiling::col_tiles_128x1, e4m3, scaling);
  transpose_into(ws.b, ws.b_t);
  ws.c.resize(size_t(out * in));
  fp8_gemm(ws.a_t, ws.b_t, ws.c.data(), opt);
  store(ws.c, out * in, dw, true);
}

#define DSV3_INSTANTIATE(T)                                                                                   \
  template void matmul_fp8<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, const Fp8GemmOptions&,      \
                              Fp8Scaling);                                                                    \
  template void matmul_dx_fp8<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, bool,                    \
                                 const Fp8GemmOptions&, Fp8Scaling);                                          \
  template void matmul_dw_fp8<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, const Fp8GemmOptions&,   \
                                 Fp8Scaling);
DSV3_INSTANTIATE(float)
DSV3_INSTANTIATE(double)

}  // namespace dsv3
