// The operations the model calls. This header is the seam between model math and the
// machine: the model never sees BLAS, SIMD or threads. Implemented in backend/cpu/.
// Depends on core only.
#pragma once
#include <cstdint>
#include <string>

#include "core/dtype.h"

namespace dsv3 {

constexpr int64_t kFp8Block = 128;  // DeepSeek-V3 weight_block_size [128, 128]

// A weight matrix as stored, [rows = out_features, cols = in_features], row-major, in its
// checkpoint dtype (F32, BF16, F16 or F8_E4M3); a vector (a norm's weight) is one row. FP8 carries scale_inv (float32,
// [ceil(rows/128), ceil(cols/128)]): W[i, j] = e4m3(code[i, j]) * scale_inv[i/128, j/128].
struct Mat {
  DType dtype = DType::f32;
  int64_t rows = 0, cols = 0;
  const uint8_t* data = nullptr;     // points at stored row `row0`
  const float* scale_inv = nullptr;  // the whole matrix's scales (FP8 only)
  int64_t row0 = 0;                  // first stored row of this view (selects scale rows)
  int64_t scale_cols = 0;            // ceil(stored cols / 128)

  Mat row_slice(int64_t first, int64_t count) const;  // rows [first, first + count)
  // The elements of a float32 / float64 matrix (owned storage: norms, training tensors).
  template <typename T>
  const T* as() const {
    return reinterpret_cast<const T*>(data);
  }
  const float* f32() const { return as<float>(); }
  int64_t numel() const { return rows * cols; }
  size_t row_bytes() const { return size_t(cols) * dtype_size(dtype); }
  size_t bytes() const { return row_bytes() * size_t(rows); }
};

// y[n, w.rows] = x[n, w.cols] * W^T   (a Linear layer; y overwritten)
void linear(const float* x, int64_t n, const Mat& w, float* y);
// Several independent linear() products run as one parallel pass over all their rows (a
// grouped GEMM: the active experts of an MoE layer, or projections sharing an input), so
// that small products do not each pay for a fork and a join.
struct LinearJob {
  const float* x;
  int64_t n;
  Mat w;
  float* y;
};
void linear_batch(const LinearJob* jobs, size_t count);
// y[n, w.cols] = x[n, w.rows] * W     (the transposed product; y overwritten)
void linear_t(const float* x, int64_t n, const Mat& w, float* y);
// Products over column blocks of strided rows, one per job, all of n rows: for each job
// y[r, :] = x[r, :] W^T (or x[r, :] W if transposed), row r of x at x + r * ldx and of y at
// y + r * ldy. MLA's absorbed form (§2.1.1) runs one per head: the head's slice of q_nope
// times W_uk, and of the latent output times W_uv^T. Jobs run on threads of their own when
// n is small (decode); otherwise one after another, each threaded inside.
struct StridedLinearJob {
  const float* x;
  int64_t ldx;
  Mat w;
  float* y;
  int64_t ldy;
  bool transposed;
};
void linear_strided_batch(const StridedLinearJob* jobs, size_t count, int64_t n);
// The scalar double-precision twins of linear / linear_t: the numerical reference.
void linear_reference(const float* x, int64_t n, const Mat& w, float* y);
void linear_t_reference(const float* x, int64_t n, const Mat& w, float* y);
// W[first .. first+count) as float32 [count, cols].
void dequantize_rows(const Mat& w, int64_t first, int64_t count, float* out);

// out[i] = x[i] / sqrt(mean(x[i]^2) + eps) * weight, for n rows of dim (out may alias x).
void rmsnorm(const float* x, int64_t n, int64_t dim, const float* weight, float eps, float* out);
// Numerically stable softmax of one row in place.
void softmax(float* x, int64_t n);
// gate[i] = silu(gate[i]) * up[i]  (SwiGLU, §2 of the DeepSeek-V3 report uses SiLU gates)
void silu_mul(float* gate, const float* up, int64_t n);
// out[i, :] = table[ids[i], :] as float32.
void embedding(const Mat& table, const int32_t* ids, int64_t n, float* out);

// The threads the backend's operations use from now on (> 0).
void set_num_threads(int threads);

// A one-line description of the CPU kernels in use (SIMD level, BLAS core, threads).
std::string backend_info();

}  // namespace dsv3
