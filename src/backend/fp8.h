// FP8 mixed precision as in DeepSeek-V3 (§3.3), emulated exactly on the CPU: fine-grained
// quantisation with online max-abs scales (1x128 activation tiles, 128x128 weight blocks),
// and the FP8 GEMM whose limited-precision tensor-core accumulation is promoted to FP32
// every N_C elements of K. Implemented in backend/cpu/fp8.cpp. Depends on core only.
#pragma once
#include <cstdint>
#include <vector>

namespace dsv3 {

constexpr int64_t kFp8Tile = 128;  // tile / block edge, and N_C (§3.3.2)

// E4M3 for every GEMM input (the paper's choice); E5M2 only for comparison.
enum class Fp8Format { e4m3, e5m2 };
float fp8_max(Fp8Format f);                   // 448, 57344
float fp8_decode(Fp8Format f, uint8_t code);  // core/dtype.h decoders
uint8_t fp8_encode(Fp8Format f, float x);     // RNE, saturating to +-max (E5M2 too); NaN -> 0x7f

// Where a tensor's scales live. Scales are online (§3.3.2): scale = max|x over the tile| / max
// of the format, so the tile's largest magnitude maps to 448; code = RNE(x / scale),
// saturated; x ~ decode(code) * scale.
enum class Fp8Tiling {
  row_tiles_1x128,  // one scale per row and 128 columns; scales [rows, ceil(cols/128)] (activations)
  col_tiles_128x1,  // one scale per column and 128 rows; scales [ceil(rows/128), cols] (the backward's
                    // transposed tiles: a 1x128 tile of the transposed tensor)
  blocks_128x128,   // one scale per 128x128 block; scales [ceil(rows/128), ceil(cols/128)] (weights)
};

// Where the scales come from: one per tile (the paper's fine-grained quantisation), or one
// for the whole tensor (per-tensor scaling, as FP8 recipes before DeepSeek-V3 did; kept for
// the comparison: one outlier anywhere coarsens every other value). Per-tensor scales are
// stored in the tiling's layout, every tile holding the tensor's scale, so the GEMM is the same.
enum class Fp8Scaling { fine_grained, per_tensor };

// A matrix in FP8: codes row-major [rows, cols], float32 scales laid out by `tiling`.
struct Fp8Tensor {
  int64_t rows = 0, cols = 0;
  std::vector<uint8_t> codes;  // [rows, cols]
  std::vector<float> scales;   // [scale_rows(), scale_cols()]
  Fp8Tiling tiling = Fp8Tiling::row_tiles_1x128;
  Fp8Format format = Fp8Format::e4m3;

  int64_t scale_rows() const;
  int64_t scale_cols() const;
  float scale(int64_t r, int64_t c) const;  // the scale of element (r, c)
  float value(int64_t r, int64_t c) const;  // decode(code) * scale, as dequantize() gives it
};

// x [rows, cols] quantised online, one scale per tile. An all-zero tile gets scale 1 and zero
// codes (so dequantisation gives exact zeros); a tile whose max|x| is below max * FLT_MIN
// (~5e-36 for E4M3) gets scale FLT_MIN, so that scales stay normal floats and x / scale
// never exceeds the format's range. A NaN or +-inf anywhere throws dsv3::Error naming the row
// and column of the first (row-major) non-finite value: the caller reports it as a divergence.
// With per_tensor scaling every tile gets the scale of the whole tensor's max|x|.
Fp8Tensor quantize(const float* x, int64_t rows, int64_t cols, Fp8Tiling tiling,
                   Fp8Format format = Fp8Format::e4m3, Fp8Scaling scaling = Fp8Scaling::fine_grained);
// The same into t, whose vectors keep their memory (no allocation once t is large enough).
void quantize_into(Fp8Tensor& t, const float* x, int64_t rows, int64_t cols, Fp8Tiling tiling,
                   Fp8Format format = Fp8Format::e4m3, Fp8Scaling scaling = Fp8Scaling::fine_grained);
// out [rows, cols] = decode(code) * scale (float32 product).
void dequantize(const Fp8Tensor& t, float* out);
// The transposed matrix [cols, rows], codes and scales moved, nothing requantised: 1x128
// tiles become 128x1 tiles and back; blocks stay blocks (their scales transposed).
Fp8Tensor transpose(const Fp8Tensor& t);
void transpose_into(const Fp8Tensor& t, Fp8Tensor& out);  // the same into out (another tensor)

// How the tensor cores accumulate (§3.3.2, "Increasing accumulation precision").
enum class Fp8AccRounding {
  truncate,      // drop the extra bits (round toward zero): what measurements of the tensor
                 // cores' accumulator report; the default
  nearest_even,  // round to nearest even; with 23 bits this is IEEE FP32 addition
};
struct Fp8GemmOptions {
  // N_C: every N_C products the limited partial sum is scaled and added into an FP32
  // accumulator, then reset. 0 = never (the whole K in the limited accumulator). Must be 0,
  // a divisor of 128, or a multiple of 128.
  int promote_every = 128;
  // Explicit mantissa bits of the limited accumulator (1..23): H800 keeps about 14; 23 with
  // nearest_even is FP32.
  int acc_mantissa_bits = 14;
  Fp8AccRounding acc_rounding = Fp8AccRounding::truncate;
};
constexpr Fp8GemmOptions kFp8DeepSeek{.promote_every = 128, .acc_mantissa_bits = 14};  // the paper's recipe
constexpr Fp8GemmOptions kFp8NoPromotion{.promote_every = 0, .acc_mantissa_bits = 14};  // the problem it solves
constexpr Fp8GemmOptions kFp8Fp32Accumulate{.promote_every = 128, .acc_mantissa_bits = 23,
                                            .acc_rounding = Fp8AccRounding::nearest_even};

// c [M, N] = a [M, K] b [N, K]^T (overwritten). a and b must be tiled along K (1x128 tiles
// or 128x128 blocks; transpose() a 128x1-tiled tensor first) and may be of either format.
// The emulated machine: every product of two codes is exact (FP8 x FP8 fits in FP32); the
// running sum is rounded to acc_mantissa_bits after every addition (the exact sum, rounded
// once, as acc_rounding says; the accumulator has FP32's exponent range).
//  - N_C dividing 128 (the recipe: 128): products of codes are summed unscaled; at each
//    promotion, within one scale tile of a and one of b, c32 = c32 + partial * (sa * sb) in
//    FP32 (the order of DeepGEMM's promotion), so dequantising at promotion is exact.
//  - N_C = 0 or a multiple of 128: one accumulation spans tiles of different scales, which a
//    tensor core cannot rescale mid-sum, so the scales are folded into the products instead:
//    each term is fl32(fl32(qa qb) * fl32(sa sb)), summed in the limited accumulator and
//    added into c32 every N_C (or once, at the end) — a per-tensor-scaled GEMM over all K.
// Threaded over rows of c; E4M3 x E4M3 with N_C dividing 128 runs a blocked kernel whose sums
// are exact in double before rounding; everything else runs the generic path. The result does
// not depend on the thread count.
void fp8_gemm(const Fp8Tensor& a, const Fp8Tensor& b, float* c, const Fp8GemmOptions& opt = kFp8DeepSeek);
// The scalar twin: one element at a time, the rounding done by an independent (TwoSum +
// frexp) routine; bit-identical to fp8_gemm.
void fp8_gemm_reference(const Fp8Tensor& a, const Fp8Tensor& b, float* c, const Fp8GemmOptions& opt = kFp8DeepSeek);

// The three GEMMs of a Linear layer in FP8 (§3.3, Figure 6), mirroring matmul / matmul_dx /
// matmul_dw of ops.h: each quantises its inputs online to E4M3 and calls fp8_gemm, the
// output in FP32 (double inputs are rounded to float first). Their FP8 copies live in a
// per-thread workspace that keeps its memory between calls.
//   Fprop:  y[n, out]  = x[n, in] w[out, in]^T            x: 1x128 tiles along in; w: 128x128 blocks
//   Dgrad:  dx[n, in] (+)= dy[n, out] w[out, in]          dy: 1x128 tiles along out; w: the same
//                                                         blocks, transposed
//   Wgrad:  dw[out, in] += dy[n, out]^T x[n, in]          dy and x: tiles along n, i.e. 128x1
//                                                         tiles in their forward layout
// y is overwritten; dx accumulated if `accumulate`; dw always accumulated (FP32 master grads).
// `scaling` applies to both inputs.
template <typename T>
void matmul_fp8(const T* x, const T* w, T* y, int64_t n, int64_t in, int64_t out,
                const Fp8GemmOptions& opt = kFp8DeepSeek, Fp8Scaling scaling = Fp8Scaling::fine_grained);
template <typename T>
void matmul_dx_fp8(const T* dy, const T* w, T* dx, int64_t n, int64_t in, int64_t out, bool accumulate,
                   const Fp8GemmOptions& opt = kFp8DeepSeek, Fp8Scaling scaling = Fp8Scaling::fine_grained);
template <typename T>
void matmul_dw_fp8(const T* dy, const T* x, T* dw, int64_t n, int64_t in, int64_t out,
                   const Fp8GemmOptions& opt = kFp8DeepSeek, Fp8Scaling scaling = Fp8Scaling::fine_grained);

}  // namespace dsv3
