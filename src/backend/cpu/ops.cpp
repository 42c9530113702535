// The dense and element-wise operations of the CPU backend (see backend/ops.h): products
// through OpenBLAS (sgemm / dgemm), element-wise and row loops with OpenMP. The products
// over stored weights (linear, linear_batch, ...) are in linear.cpp.
#include "backend/ops.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <string>
#include <vector>

#include "backend/cpu/kernels.h"
#include "backend/cpu/threads.h"
#include "core/dtype.h"
#include "core/error.h"

namespace dsv3 {

void set_num_threads(int threads) { cpu::set_thread_limit(threads); }
void prepare_threads(char** argv) { cpu::prepare_wait_policy(argv); }

void embedding(const Mat& table, const int32_t* ids, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= table.rows)
      fail("token id ", ids[i], " is out of range [0, ", table.rows, ")");
    dequantize_rows(table, ids[i], 1, out + i * table.cols);
  }
}

template <typename T>
void matmul(const T* x, const T* w, T* y, int64_t n, int64_t in, int64_t out) {
  cpu::adapt_threads();
  cpu::gemm<T>(false, true, n, out, in, x, in, w, in, T(0), y, out);
}
template <typename T>
void matmul_dx(const T* dy, const T* w, T* dx, int64_t n, int64_t in, int64_t out, bool accumulate) {
  cpu::adapt_threads();
  cpu::gemm<T>(false, false, n, in, out, dy, out, w, in, accumulate ? T(1) : T(0), dx, in);
}
template <typename T>
void matmul_dw(const T* dy, const T* x, T* dw, int64_t n, int64_t in, int64_t out) {
  cpu::adapt_threads();
  cpu::gemm<T>(true, false, out, in, n, dy, out, x, in, T(1), dw, in);
}

GemmPrecision parse_gemm_precision(const char* name) {
  const std::string s = name;
  for (GemmPrecision p : {GemmPrecision::fp32, GemmPrecision::bf16, GemmPrecision::fp8, GemmPrecision::fp8_tensor})
    if (s == gemm_precision_name(p)) return p;
  fail("unknown precision '", s, "' (fp32, bf16, fp8 or fp8-tensor)");
}

const char* gemm_precision_name(GemmPrecision p) {
  switch (p) {
    case GemmPrecision::fp32: return "fp32";
    case GemmPrecision::bf16: return "bf16";
    case GemmPrecision::fp8: return "fp8";
    case GemmPrecision::fp8_tensor: return "fp8-tensor";
  }
  return "?";
}

namespace {

// x rounded to BF16 (round to nearest even), kept as T: what a BF16 tensor core reads. Into
// the calling thread's buffer for operand `slot` (0 or 1), kept between calls so that a
// step allocates nothing.
template <typename T>
const T* to_bf16(const T* x, int64_t n, int slot) {
  thread_local std::vector<T> buffers[2];
  std::vector<T>& out = buffers[slot];
  out.resize(size_t(n));
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) out[size_t(i)] = T(bf16_to_f32(f32_to_bf16(float(x[i]))));
  return out.data();
}

}  // namespace

template <typename T>
void LinearGemm::forward(const T* x, const T* w, T* y, int64_t n, int64_t in, int64_t out) const {
  switch (precision) {
    case GemmPrecision::fp32: matmul(x, w, y, n, in, out); return;
    case GemmPrecision::bf16: matmul(to_bf16(x, n * in, 0), to_bf16(w, out * in, 1), y, n, in, out); return;
    case GemmPrecision::fp8: matmul_fp8(x, w, y, n, in, out, fp8); return;
    case GemmPrecision::fp8_tensor: matmul_fp8(x, w, y, n, in, out, fp8, Fp8Scaling::per_tensor); return;
  }
}

template <typename T>
void LinearGemm::dx(const T* dy, const T* w, T* dx, int64_t n, int64_t in, int64_t out, bool accumulate) const {
  switch (precision) {
    case GemmPrecision::fp32: matmul_dx(dy, w, dx, n, in, out, accumulate); return;
    case GemmPrecision::bf16:
      matmul_dx(to_bf16(dy, n * out, 0), to_bf16(w, out * in, 1), dx, n, in, out, accumulate);
      return;
    case GemmPrecision::fp8: matmul_dx_fp8(dy, w, dx, n, in, out, accumulate, fp8); return;
    case GemmPrecision::fp8_tensor:
      matmul_dx_fp8(dy, w, dx, n, in, out, accumulate, fp8, Fp8Scaling::per_tensor);
      return;
  }
}

template <typename T>
void LinearGemm::dw(const T* dy, const T* x, T* dw, int64_t n, int64_t in, int64_t out) const {
  switch (precision) {
    case GemmPrecision::fp32: matmul_dw(dy, x, dw, n, in, out); return;
    case GemmPrecision::bf16: matmul_dw(to_bf16(dy, n * out, 0), to_bf16(x, n * in, 1), dw, n, in, out); return;
    case GemmPrecision::fp8: matmul_dw_fp8(dy, x, dw, n, in, out, fp8); return;
    case GemmPrecision::fp8_tensor: matmul_dw_fp8(dy, x, dw, n, in, out, fp8, Fp8Scaling::per_tensor); return;
  }
}

namespace {

template <typename T>
constexpr DType dtype_of() {
  return sizeof(T) == 4 ? DType::f32 : DType::f64;
}

}  // namespace

template <typename T>
void LinearGemm::forward(const T* x, const Mat& w, T* y, int64_t n) const {
  if constexpr (std::is_same_v<T, float>)
    if (precision == GemmPrecision::fp32) return linear(x, n, w, y);
  if (w.dtype != dtype_of<T>())
    fail("a ", gemm_precision_name(precision), " projection in ", sizeof(T) == 4 ? "float" : "double",
         " needs weights of that type, not ", dtype_name(w.dtype));
  forward(x, w.as<T>(), y, n, w.cols, w.rows);
}

template <typename T>
void LinearGemm::forward_batch(const Job<T>* jobs, size_t count) const {
  if constexpr (std::is_same_v<T, float>)
    if (precision == GemmPrecision::fp32) {
      thread_local std::vector<LinearJob> grouped;  // kept between calls
      grouped.clear();
      for (size_t i = 0; i < count; ++i) grouped.push_back({jobs[i].x, jobs[i].n, jobs[i].w, jobs[i].y});
      return linear_batch(grouped.data(), grouped.size());
    }
  for (size_t i = 0; i < count; ++i) forward(jobs[i].x, jobs[i].w, jobs[i].y, jobs[i].n);
}

SavedFormat LinearGemm::attention_output_format() const {
  const bool fp8 = precision == GemmPrecision::fp8 || precision == GemmPrecision::fp8_tensor;
  return fp8 && low_precision_caches ? SavedFormat::e5m6_1x128_pow2 : SavedFormat::full;
}
SavedFormat LinearGemm::moe_swiglu_input_format() const {
  const bool fp8 = precision == GemmPrecision::fp8 || precision == GemmPrecision::fp8_tensor;
  return fp8 && low_precision_caches ? SavedFormat::e4m3_1x128 : SavedFormat::full;
}

template <typename T>
void copy_rows(const T* src, int64_t ld_src, int64_t n, int64_t width, T* dst, int64_t ld_dst, const int64_t* index) {
  for (int64_t i = 0; i < n; ++i)
    std::memcpy(dst + (index ? index[i] : i) * ld_dst, src + i * ld_src, size_t(width) * sizeof(T));
}

template <typename T>
void gather_rows(const T* src, int64_t ld_src, const int64_t* index, const T* scale, int64_t n, int64_t width, T* dst,
                 int64_t ld_dst) {
#pragma omp parallel for schedule(static) if (n * width > 65536)
  for (int64_t i = 0; i < n; ++i) {
    const T* s = src + index[i] * ld_src;
    T* d = dst + i * ld_dst;
    if (scale)
      for (int64_t j = 0; j < width; ++j) d[j] = scale[i] * s[j];
    else
      std::memcpy(d, s, size_t(width) * sizeof(T));
  }
}

template <typename T>
void scatter_add_rows(const T* src, const int64_t* index, const T* scale, int64_t n, int64_t width, T* dst) {
  for (int64_t i = 0; i < n; ++i) {
    T* d = dst + index[i] * width;
    const T* s = src + i * width;
    const T k = scale ? scale[i] : T(1);
    for (int64_t j = 0; j < width; ++j) d[j] += k * s[j];
  }
}

template <typename T>
void row_dots(const T* a, const int64_t* index, const T* b, int64_t n, int64_t width, T* out) {
#pragma omp parallel for schedule(static) if (n * width > 65536)
  for (int64_t i = 0; i < n; ++i) {
    const T* x = a + index[i] * width;
    const T* y = b + i * width;
    T dot = 0;
    for (int64_t j = 0; j < width; ++j) dot += x[j] * y[j];
    out[i] = dot;
  }
}

template <typename T>
void rope_rotate(T* x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_stride, int64_t width,
                 const double* cos, const double* sin, bool inverse) {
  const int64_t half = width / 2;
#pragma omp parallel for schedule(static) if (rows * heads * width > 32768)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < heads; ++h) {
      T* v = x + r * row_stride + h * head_stride;
      for (int64_t i = 0; i < half; ++i) {
        const T c = T(cos[r * half + i]), s = T(inverse ? -sin[r * half + i] : sin[r * half + i]);
        const T a = v[2 * i], b = v[2 * i + 1];
        v[2 * i] = a * c - b * s;
        v[2 * i + 1] = a * s + b * c;
      }
    }
}

template <typename T>
void add_to(T* y, const T* x, int64_t n) {
#pragma omp parallel for schedule(static) if (n > 32768)
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

template <typename T>
void rmsnorm_forward(const T* x, const T* w, T* y, T* inv_rms, int64_t n, int64_t dim, double eps) {
#pragma omp parallel for schedule(static) if (n * dim > 65536)
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * dim;
    double ss = 0;
    for (int64_t k = 0; k < dim; ++k) ss += double(xi[k]) * double(xi[k]);
    const T r = T(1.0 / std::sqrt(ss / double(dim) + eps));
    inv_rms[i] = r;
    for (int64_t k = 0; k < dim; ++k) y[i * dim + k] = xi[k] * r * w[k];
  }
}

// y = x r w with r = (mean(x^2) + eps)^-1/2:  dx = r (dy w) - x r^3 mean((dy w) x),  dw = sum dy x r.
template <typename T>
void rmsnorm_backward(const T* dy, const T* x, const T* w, const T* inv_rms, T* dx, T* dw, int64_t n, int64_t dim) {
  // Rows are independent except for dw: each chunk of kRows rows sums its share, and the
  // shares are added in chunk order, so the result depends neither on timing nor on the
  // number of threads (training resumes bit-exactly, whatever threads the backend runs).
  constexpr int64_t kRows = 64;
  const int64_t chunks = (n + kRows - 1) / kRows;
  thread_local std::vector<T> parts_kept;  // kept between calls; shared by reference
  std::vector<T>& parts = parts_kept;
  parts.assign(static_cast<size_t>(chunks * dim), T(0));
#pragma omp parallel for schedule(static) if (n * dim > 32768)
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    T* dw_part = &parts[size_t(chunk * dim)];
    for (int64_t i = chunk * kRows; i < std::min(n, (chunk + 1) * kRows); ++i) {
      const T* xi = x + i * dim;
      const T* gi = dy + i * dim;
      const T r = inv_rms[i];
      double dot = 0;
      for (int64_t k = 0; k < dim; ++k) dot += double(gi[k] * w[k]) * double(xi[k]);
      const T c = T(dot / double(dim)) * r * r * r;
      for (int64_t k = 0; k < dim; ++k) {
        dx[i * dim + k] += r * gi[k] * w[k] - xi[k] * c;
        dw_part[k] += gi[k] * xi[k] * r;
      }
    }
  }
  for (int64_t chunk = 0; chunk < chunks; ++chunk)
    for (int64_t k = 0; k < dim; ++k) dw[k] += parts[size_t(chunk * dim + k)];
}

template <typename T>
void swiglu_forward(const T* a, const T* b, T* h, int64_t count) {
#pragma omp parallel for schedule(static) if (count > 65536)
  for (int64_t i = 0; i < count; ++i) h[i] = a[i] / (T(1) + std::exp(-a[i])) * b[i];
}

// silu(a) = a s(a);  silu'(a) = s(a) (1 + a (1 - s(a))).
template <typename T>
void swiglu_backward(const T* dh, const T* a, const T* b, T* da, T* db, int64_t count) {
#pragma omp parallel for schedule(static) if (count > 65536)
  for (int64_t i = 0; i < count; ++i) {
    const T s = T(1) / (T(1) + std::exp(-a[i]));
    da[i] = dh[i] * b[i] * s * (T(1) + a[i] * (T(1) - s));
    db[i] = dh[i] * a[i] * s;
  }
}

template <typename T>
void softmax_forward(T* p, int64_t len) {
  if (len <= 0) return;
  const T mx = *std::max_element(p, p + len);
  T sum = 0;
  for (int64_t j = 0; j < len; ++j) sum += (p[j] = std::exp(p[j] - mx));
  for (int64_t j = 0; j < len; ++j) p[j] /= sum;
}

template <typename T>
void softmax_backward(const T* p, const T* dp, T* ds, int64_t len) {
  T dot = 0;
  for (int64_t j = 0; j < len; ++j) dot += p[j] * dp[j];
  for (int64_t j = 0; j < len; ++j) ds[j] = p[j] * (dp[j] - dot);
}

template <typename T>
void target_logprobs(const T* logits, const int32_t* targets, int64_t n, int64_t vocab, double* row_logp,
                     const double* weights, T* dlogits, double scale) {
#pragma omp parallel for schedule(static) if (n * vocab > 65536)
  for (int64_t i = 0; i < n; ++i) {
    const T* z = logits + i * vocab;
    T* dz = dlogits ? dlogits + i * vocab : nullptr;
    row_logp[i] = 0;
    if (targets[i] < 0) {
      if (dz) std::fill(dz, dz + vocab, T(0));
      continue;
    }
    const T mx = *std::max_element(z, z + vocab);
    double sum = 0;
    for (int64_t v = 0; v < vocab; ++v) sum += std::exp(double(z[v] - mx));
    row_logp[i] = -(std::log(sum) + double(mx) - double(z[targets[i]]));  // minus the row's cross-entropy, exactly
    if (dz) {
      const double k = (weights ? weights[i] : 1.0) * scale;
      for (int64_t v = 0; v < vocab; ++v) dz[v] = T(std::exp(double(z[v] - mx)) / sum * k);
      dz[targets[i]] -= T(k);
    }
  }
}

template <typename T>
double cross_entropy(const T* logits, const int32_t* targets, int64_t n, int64_t vocab, T* dlogits, double scale) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += targets[i] >= 0;
  // Each row's loss in its own slot, summed in row order after: the loss does not depend on
  // the number of threads.
  thread_local std::vector<double> row_logp_kept;
  std::vector<double>& row_logp = row_logp_kept;
  row_logp.resize(size_t(n));
  target_logprobs(logits, targets, n, vocab, row_logp.data(), nullptr, dlogits, scale / double(std::max<int64_t>(count, 1)));
  double total = 0;
  for (double l : row_logp) total += -l;
  return count ? total / double(count) : 0.0;
}

#define DSV3_INSTANTIATE(T)                                                                                   \
  template void add_to<T>(T*, const T*, int64_t);                                                             \
  template void copy_rows<T>(const T*, int64_t, int64_t, int64_t, T*, int64_t, const int64_t*);               \
  template void rope_rotate<T>(T*, int64_t, int64_t, int64_t, int64_t, int64_t, const double*, const double*, bool); \
  template void LinearGemm::forward<T>(const T*, const Mat&, T*, int64_t) const;                             \
  template void LinearGemm::forward_batch<T>(const LinearGemm::Job<T>*, size_t) const;                       \
  template void gather_rows<T>(const T*, int64_t, const int64_t*, const T*, int64_t, int64_t, T*, int64_t);   \
  template void scatter_add_rows<T>(const T*, const int64_t*, const T*, int64_t, int64_t, T*);                \
  template void row_dots<T>(const T*, const int64_t*, const T*, int64_t, int64_t, T*);                         \
  template void matmul<T>(const T*, const T*, T*, int64_t, int64_t, int64_t);                                 \
  template void matmul_dx<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, bool);                        \
  template void matmul_dw<T>(const T*, const T*, T*, int64_t, int64_t, int64_t);                              \
  template void rmsnorm_forward<T>(const T*, const T*, T*, T*, int64_t, int64_t, double);                     \
  template void rmsnorm_backward<T>(const T*, const T*, const T*, const T*, T*, T*, int64_t, int64_t);        \
  template void swiglu_forward<T>(const T*, const T*, T*, int64_t);                                           \
  template void swiglu_backward<T>(const T*, const T*, const T*, T*, T*, int64_t);                            \
  template void softmax_forward<T>(T*, int64_t);                                                              \
  template void softmax_backward<T>(const T*, const T*, T*, int64_t);                                         \
  template double cross_entropy<T>(const T*, const int32_t*, int64_t, int64_t, T*, double);              \
  template void target_logprobs<T>(const T*, const int32_t*, int64_t, int64_t, double*, const double*, T*, double);  \
  template void LinearGemm::forward<T>(const T*, const T*, T*, int64_t, int64_t, int64_t) const;             \
  template void LinearGemm::dx<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, bool) const;            \
  template void LinearGemm::dw<T>(const T*, const T*, T*, int64_t, int64_t, int64_t) const;
DSV3_INSTANTIATE(float)
DSV3_INSTANTIATE(double)

}  // namespace dsv3
