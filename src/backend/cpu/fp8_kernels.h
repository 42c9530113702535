// Internal to backend/cpu: the blocked E4M3 x E4M3 kernels behind fp8_gemm (N_C dividing 128,
// both inputs tiled along K: fp8_gemm checks this first), portable (fp8.cpp) and AVX-512
// (fp8_avx512.cpp), and the helpers they share with the generic path. Both are tested
// bit-exactly against fp8_gemm_reference.
#pragma once
#include <cstdint>

#include "backend/fp8.h"

namespace dsv3::cpu {

void fp8_gemm_e4m3_portable(const Fp8Tensor& a, const Fp8Tensor& b, float* c, const Fp8GemmOptions& opt);
void fp8_gemm_e4m3_avx512(const Fp8Tensor& a, const Fp8Tensor& b, float* c, const Fp8GemmOptions& opt);  // needs AVX-512
// One row of quantize()'s first pass: amax[c] = max(amax[c], |x[c]|) (per_column: 128x1
// tiles), else amax[t] = max(amax[t], max |x| over tile t of 128 columns). Needs AVX-512. An
// inf or NaN in x makes its amax entry non-finite.
void fp8_row_absmax_avx512(const float* x, int64_t cols, bool per_column, float* amax);
// One row of quantize()'s codes in E4M3: q[c] = f32_to_fp8_e4m3(x[c] / scale), the scale
// scales[c / 128] (1x128 tiles, blocks) or scales[c] (per_column: 128x1 tiles). Needs AVX-512;
// equal to the scalar encoder on every float.
void fp8_encode_row_e4m3_avx512(const float* x, int64_t cols, const float* scales, bool per_column, uint8_t* q);

// The K-tile scales of row r of a tensor tiled along K (ceil(K/128) of them).
inline const float* fp8_k_scales(const Fp8Tensor& t, int64_t r) {
  return t.scales.data() + size_t((t.tiling == Fp8Tiling::row_tiles_1x128 ? r : r / kFp8Tile) * t.scale_cols());
}

// Promotion: c32 + partial * scale in FP32 with two roundings, as on the CUDA cores. The empty
// asm hides the product from the compiler, which would otherwise fuse the two into an FMA
// where the target has one (GCC contracts by default), and the kernels would differ.
inline float fp8_promote(float c32, float partial, float scale) {
  float p = partial * scale;
  asm("" : "+x"(p));
  return c32 + p;
}

}  // namespace dsv3::cpu
