// The operations the model calls, one family for inference and training: products over
// weights as stored (Mat: BF16, FP8 with block scales, F32) and over dense float/double
// arrays, the precision seam of Linear layers (LinearGemm), and the element-wise and row
// forward/backward pairs. T is float (inference, training) or double (the gradient checks).
// This header is the seam between model math and the machine: the model never sees BLAS,
// SIMD or threads. Backward functions say which outputs they overwrite and which they
// accumulate. Implemented in backend/cpu/. Depends on core only.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "backend/fp8.h"
#include "backend/saved_activation.h"
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

// out[i, :] = table[ids[i], :] as float32.
void embedding(const Mat& table, const int32_t* ids, int64_t n, float* out);

// The threads the backend's operations use from now on (> 0).
void set_num_threads(int threads);
// First thing in a program's main(): settles how the backend's idle threads wait, which the
// thread runtime reads only as it starts, so this may execute the program again (argv as
// given) with that setting in its environment. A setting the user made is kept.
void prepare_threads(char** argv);

// A one-line description of the CPU kernels in use (SIMD level, BLAS core, threads).
std::string backend_info();

// ---- Dense products and the forward/backward pairs of training (T = float or double) ----
// The precision of the GEMMs of Linear layers in training (§3.3): fp32; bf16 (inputs
// rounded to BF16, FP32 accumulation); fp8 (E4M3 inputs with 1x128 activation tiles and
// 128x128 weight blocks, the tensor-core accumulator emulated with promotion to FP32 every
// 128 elements of K); fp8_tensor (the same with one scale per tensor instead of per tile
// for the GEMM inputs, the activation caches unchanged: the comparison that shows what
// fine-grained scaling buys). Attention, the router gate,
// embedding and output head are not Linear GEMMs here and stay in higher precision, as the
// paper keeps them.
enum class GemmPrecision { fp32, bf16, fp8, fp8_tensor };
GemmPrecision parse_gemm_precision(const char* name);  // "fp32" | "bf16" | "fp8" | "fp8-tensor"
const char* gemm_precision_name(GemmPrecision p);

// The three GEMMs of a Linear layer (forward, activation gradient, weight gradient) at one
// precision; the same contracts as matmul / matmul_dx / matmul_dw below. This is the seam
// through which precision reaches the model: its math calls these, never a format.
struct LinearGemm {
  GemmPrecision precision = GemmPrecision::fp32;
  Fp8GemmOptions fp8 = kFp8DeepSeek;  // the accumulator of the fp8 GEMMs
  // In fp8 training, cache the activations below in low precision (the paper's recipe);
  // false keeps them in full (an ablation: the cost of the caches apart from the GEMMs').
  bool low_precision_caches = true;

  template <typename T>
  void forward(const T* x, const T* w, T* y, int64_t n, int64_t in, int64_t out) const;
  template <typename T>
  void dx(const T* dy, const T* w, T* dx, int64_t n, int64_t in, int64_t out, bool accumulate) const;
  template <typename T>
  void dw(const T* dy, const T* x, T* dw, int64_t n, int64_t in, int64_t out) const;
  // y[n, w.rows] = x w^T with w as stored, the forward of every projection of the model: a
  // float pass in fp32 reads any checkpoint dtype (BF16, FP8 with block scales) through
  // linear() (inference and fp32 training share it); otherwise w must hold T.
  template <typename T>
  void forward(const T* x, const Mat& w, T* y, int64_t n) const;
  // Several independent products (projections sharing an input, the active experts of an
  // MoE layer), as one grouped pass (linear_batch) where the kernels allow.
  template <typename T>
  struct Job {
    const T* x;
    int64_t n;
    Mat w;
    T* y;
  };
  template <typename T>
  void forward_batch(const Job<T>* jobs, size_t count) const;

  // The activations the paper caches in low precision for the backward pass (§3.3.3), in FP8
  // training: the input of the Linear after attention (E5M6, power-of-2 scales) and the inputs
  // of the SwiGLU in MoE (E4M3, 1x128 tiles). In the other precisions, or without
  // low_precision_caches, both are kept in full.
  SavedFormat attention_output_format() const;
  SavedFormat moe_swiglu_input_format() const;
};

// y[n, out] = x[n, in] w[out, in]^T                       (y overwritten)
template <typename T>
void matmul(const T* x, const T* w, T* y, int64_t n, int64_t in, int64_t out);
// dx[n, in] (+)= dy[n, out] w[out, in]                     (accumulated if accumulate)
template <typename T>
void matmul_dx(const T* dy, const T* w, T* dx, int64_t n, int64_t in, int64_t out, bool accumulate);
// dw[out, in] += dy[n, out]^T x[n, in]                     (accumulated)
template <typename T>
void matmul_dw(const T* dy, const T* x, T* dw, int64_t n, int64_t in, int64_t out);

// dst row index[i] (row stride ld_dst) = src row i (ld_src), width values, i < n: a strided
// gather / scatter (index null: row i to row i).
template <typename T>
void copy_rows(const T* src, int64_t ld_src, int64_t n, int64_t width, T* dst, int64_t ld_dst,
               const int64_t* index = nullptr);

// dst row i (ld_dst) = scale[i] * src row index[i] (ld_src), width values, i < n (scale
// null: 1): gathering tokens' rows, e.g. an expert's inputs.
template <typename T>
void gather_rows(const T* src, int64_t ld_src, const int64_t* index, const T* scale, int64_t n, int64_t width, T* dst,
                 int64_t ld_dst);
// dst row index[i] += scale[i] * src row i, for i = 0, 1, .. n-1 in that order (deterministic;
// scale null: 1): combining experts' outputs into their tokens' rows. Rows width apart.
template <typename T>
void scatter_add_rows(const T* src, const int64_t* index, const T* scale, int64_t n, int64_t width, T* dst);
// out[i] = a row index[i] . b row i (rows width apart).
template <typename T>
void row_dots(const T* a, const int64_t* index, const T* b, int64_t n, int64_t width, T* out);

// RoPE's rotation (§2.1.1) of `heads` vectors of `width` values per row: vector h of row r at
// x + r * row_stride + h * head_stride has its pairs (2i, 2i+1) rotated by the angle whose
// cos and sin are cos[r * width/2 + i], sin[...] (Rope::angles). inverse rotates back (the
// transpose: RoPE's backward).
template <typename T>
void rope_rotate(T* x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_stride, int64_t width,
                 const double* cos, const double* sin, bool inverse);

// y[i] += x[i] (residual adds), threaded.
template <typename T>
void add_to(T* y, const T* x, int64_t n);

// y = x / rms(x) * w per row; inv_rms[i] = 1 / sqrt(mean(x_i^2) + eps) saved for backward.
template <typename T>
void rmsnorm_forward(const T* x, const T* w, T* y, T* inv_rms, int64_t n, int64_t dim, double eps);
// dx (accumulated) and dw (accumulated) from dy.
template <typename T>
void rmsnorm_backward(const T* dy, const T* x, const T* w, const T* inv_rms, T* dx, T* dw, int64_t n, int64_t dim);

// h = silu(a) * b
template <typename T>
void swiglu_forward(const T* a, const T* b, T* h, int64_t count);
// da, db (overwritten) from dh.
template <typename T>
void swiglu_backward(const T* dh, const T* a, const T* b, T* da, T* db, int64_t count);

// Row-wise softmax in place over the first `len` entries of a row.
template <typename T>
void softmax_forward(T* p, int64_t len);
// ds (overwritten) = p * (dp - sum(p * dp)), over len entries.
template <typename T>
void softmax_backward(const T* p, const T* dp, T* ds, int64_t len);

// Mean cross-entropy of rows whose target >= 0 (target < 0: ignored). Writes dlogits =
// (softmax - onehot) * scale / count into dlogits (overwritten; ignored rows get 0) when
// dlogits is given; returns the mean loss.
template <typename T>
double cross_entropy(const T* logits, const int32_t* targets, int64_t n, int64_t vocab, T* dlogits, double scale = 1);

// Each row's log-probability of its target (row_logp[i]; 0 where the target is < 0) and,
// when dlogits is given, the gradient of scale * sum_i weights[i] * -row_logp[i]: dlogits =
// (softmax - onehot) * weights[i] * scale, 0 for ignored rows (weights null: 1). A per-token
// objective (GRPO's) weighs each token's log-probability by its own factor (of either sign);
// cross_entropy is the uniform case.
template <typename T>
void target_logprobs(const T* logits, const int32_t* targets, int64_t n, int64_t vocab, double* row_logp,
                     const double* weights = nullptr, T* dlogits = nullptr, double scale = 1);

}  // namespace dsv3
