// Row kernels behind linear(): one stored row against up to kMaxBatch activation rows,
// and the transposed accumulate. A scalar version (kernels.cpp side) and an AVX-512 one
// (linear_avx512.cpp), chosen at run time. Internal to backend/cpu.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace dsv3 {
struct LinearJob;
struct Mat;
}

namespace dsv3::cpu {

constexpr int kMaxBatch = 8;

// acc[j] += sum_k W[k] * x[j * ldx + k] for j < nb, k < len, with W one stored row of
// BF16 values, float32 values, or FP8 codes (their values: the caller folds the block
// scales into x).
using RowDotFn = void (*)(const void* w, const float* x, int64_t ldx, int nb, int64_t len, float* acc);
// One activation row against `rows` consecutive stored rows (decode): y[r] = W[r, :] . x,
// rows row_bytes apart (FP8: code values; the caller folds the block scales into x). A
// tile of rows per call keeps per-row overhead out of short rows.
using RowsDotFn = void (*)(const void* w, size_t row_bytes, int64_t rows, const float* x, int64_t len, float* y);
// y[k] += a * w[k] for k < len.
using AxpyFn = void (*)(float a, const void* w, float* y, int64_t len);
// out[k] = w[k] as float (FP8: the code's value, unscaled).
using ConvertFn = void (*)(const void* w, float* out, int64_t len);

struct RowKernels {
  RowDotFn dot_bf16, dot_fp8, dot_f32;
  RowsDotFn rows_bf16, rows_fp8;
  AxpyFn axpy_bf16, axpy_fp8;
  ConvertFn convert_bf16, convert_fp8;
  const char* name;
};

const RowKernels& scalar_kernels();
bool avx512_available();
const RowKernels& avx512_kernels();  // only valid if avx512_available()
const RowKernels& active_kernels();

// AMX-BF16 products for many activation rows (linear_amx.cpp): true where the CPU has
// AMX-BF16 and AVX512-BF16 and Linux granted the tile state (DSV3_AMX=0 turns it off).
bool amx_available();
// linear() over BF16 / FP8 weights for every job, as one parallel pass over 32-row strips of
// all the jobs' weights (activations split into three BF16 parts: see linear_amx.cpp).
void linear_amx(const LinearJob* jobs, size_t count);
// Its scalar twin: the same split products summed in float, for tests.
void linear_amx_scalar(const float* x, int64_t n, const Mat& w, float* y);

// C[m, n] (ldc) (+)= A[m, k] * op(B) with op(B) = B^T ([n, k], ldb) if trans_b, else B ([k, n]).
void sgemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
           bool trans_b, float* c, int64_t ldc, bool accumulate = false);
std::string blas_info();
// C[m, n] = alpha-free op(A) op(B) + beta C, row-major; op transposes when asked. float or double.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc);

}  // namespace dsv3::cpu
