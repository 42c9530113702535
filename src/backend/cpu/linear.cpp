// linear() and linear_t(): products with weights kept in their stored dtype.
// Small batches (decode, at most kMaxBatch rows of x) stream each stored row once through
// the row kernels, threads splitting the rows (linear) or the columns (linear_t): these
// are memory-bound, and the weights are read exactly once. Larger batches (prefill,
// experts with many tokens) dequantize a panel of rows to float32 and hand it to sgemm.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "backend/cpu/kernels.h"
#include "backend/ops.h"
#include "core/error.h"

namespace dsv3 {

using cpu::kMaxBatch;

Mat Mat::row_slice(int64_t first, int64_t count) const {
  Mat m = *this;
  m.data = data + size_t(first) * row_bytes();
  m.rows = count;
  m.row0 = row0 + first;
  return m;
}

namespace cpu {

namespace {

float fp8_table[256];
const bool fp8_table_ready = [] {
  for (int c = 0; c < 256; ++c) fp8_table[c] = fp8_e4m3_to_f32(uint8_t(c));
  return true;
}();

inline float load_bf16(const uint8_t* p, int64_t k) {
  uint16_t h;
  std::memcpy(&h, p + 2 * k, 2);
  return bf16_to_f32(h);
}

void dot_bf16_scalar(const void* wv, const float*, const float* x, int64_t ldx, int nb, int64_t len, float* acc) {
  const uint8_t* w = static_cast<const uint8_t*>(wv);
  for (int j = 0; j < nb; ++j) {
    float s = 0;
    for (int64_t k = 0; k < len; ++k) s += load_bf16(w, k) * x[j * ldx + k];
    acc[j] += s;
  }
}
void dot_fp8_scalar(const void* wv, const float* scales, const float* x, int64_t ldx, int nb, int64_t len,
                    float* acc) {
  const uint8_t* w = static_cast<const uint8_t*>(wv);
  for (int j = 0; j < nb; ++j) {
    float total = 0;
    for (int64_t c0 = 0; c0 < len; c0 += kFp8Block) {
      float s = 0;
      for (int64_t k = c0; k < std::min(len, c0 + kFp8Block); ++k) s += fp8_table[w[k]] * x[j * ldx + k];
      total += s * scales[c0 / kFp8Block];
    }
    acc[j] += total;
  }
}
void axpy_bf16_scalar(float a, const void* wv, float* y, int64_t len) {
  for (int64_t k = 0; k < len; ++k) y[k] += a * load_bf16(static_cast<const uint8_t*>(wv), k);
}
void axpy_fp8_scalar(float a, const void* wv, float* y, int64_t len) {
  for (int64_t k = 0; k < len; ++k) y[k] += a * fp8_table[static_cast<const uint8_t*>(wv)[k]];
}
void convert_bf16_scalar(const void* wv, float* out, int64_t len) {
  for (int64_t k = 0; k < len; ++k) out[k] = load_bf16(static_cast<const uint8_t*>(wv), k);
}
void convert_fp8_scalar(const void* wv, float* out, int64_t len) {
  for (int64_t k = 0; k < len; ++k) out[k] = fp8_table[static_cast<const uint8_t*>(wv)[k]];
}

}  // namespace

const RowKernels& scalar_kernels() {
  static const RowKernels k{dot_bf16_scalar,  dot_fp8_scalar,      axpy_bf16_scalar, axpy_fp8_scalar,
                            convert_bf16_scalar, convert_fp8_scalar, "scalar"};
  return k;
}

// DSV3_KERNELS=scalar forces the portable path (for checking it on an AVX-512 machine).
const RowKernels& active_kernels() {
  static const RowKernels& k = [] () -> const RowKernels& {
    const char* force = std::getenv("DSV3_KERNELS");
    if (force && std::string(force) == "scalar") return scalar_kernels();
    return avx512_available() ? avx512_kernels() : scalar_kernels();
  }();
  return k;
}

}  // namespace cpu

namespace {

void check_dtype(const Mat& w) {
  switch (w.dtype) {
    case DType::f32: case DType::bf16: case DType::f16: return;
    case DType::f8_e4m3:
      if (!w.scale_inv) fail("FP8 matrix without scale_inv");
      return;
    default: fail("linear: unsupported weight dtype ", dtype_name(w.dtype));
  }
}

inline float scale_at(const Mat& w, int64_t r, int64_t block) {
  return w.scale_inv[((w.row0 + r) / kFp8Block) * w.scale_cols + block];
}

// Element (r, c) of w as float, for the reference path.
double element(const Mat& w, int64_t r, int64_t c) {
  const uint8_t* row = w.data + size_t(r) * w.row_bytes();
  switch (w.dtype) {
    case DType::f32: {
      float f;
      std::memcpy(&f, row + 4 * c, 4);
      return f;
    }
    case DType::bf16: {
      uint16_t h;
      std::memcpy(&h, row + 2 * c, 2);
      return bf16_to_f32(h);
    }
    case DType::f16: {
      uint16_t h;
      std::memcpy(&h, row + 2 * c, 2);
      return f16_to_f32(h);
    }
    case DType::f8_e4m3:
      return double(fp8_e4m3_to_f32(row[c])) * scale_at(w, r, c / kFp8Block);
    default: return 0;
  }
}

// One stored row r against nb rows of x: acc[j] = sum_k W[r, k] x[j, k].
void row_dot(const cpu::RowKernels& k, const Mat& w, int64_t r, const float* x, int nb, float* acc) {
  const uint8_t* row = w.data + size_t(r) * w.row_bytes();
  for (int j = 0; j < nb; ++j) acc[j] = 0;
  switch (w.dtype) {
    case DType::bf16: k.dot_bf16(row, nullptr, x, w.cols, nb, w.cols, acc); return;
    case DType::f8_e4m3:
      k.dot_fp8(row, w.scale_inv + ((w.row0 + r) / kFp8Block) * w.scale_cols, x, w.cols, nb, w.cols, acc);
      return;
    default:
      for (int j = 0; j < nb; ++j) {
        double s = 0;
        for (int64_t c = 0; c < w.cols; ++c) s += element(w, r, c) * x[j * w.cols + c];
        acc[j] = float(s);
      }
  }
}

// Rows of a float32 panel for sgemm: enough that sgemm runs efficiently, few enough that
// the panel stays in cache (about 2 MiB), a multiple of the FP8 block.
int64_t panel_rows(const Mat& w) {
  int64_t r = (int64_t(2) << 20) / std::max<int64_t>(1, w.cols * 4);
  r = std::max<int64_t>(kFp8Block, r / kFp8Block * kFp8Block);
  return std::min(r, w.rows);
}

}  // namespace

void dequantize_rows(const Mat& w, int64_t first, int64_t count, float* out) {
  check_dtype(w);
  const cpu::RowKernels& k = cpu::active_kernels();
#pragma omp parallel for schedule(static) if (count * w.cols > 65536)
  for (int64_t i = 0; i < count; ++i) {
    const int64_t r = first + i;
    const uint8_t* row = w.data + size_t(r) * w.row_bytes();
    float* o = out + i * w.cols;
    switch (w.dtype) {
      case DType::f32: std::memcpy(o, row, size_t(w.cols) * 4); break;
      case DType::bf16: k.convert_bf16(row, o, w.cols); break;
      case DType::f8_e4m3:
        k.convert_fp8(row, o, w.cols);
        for (int64_t c0 = 0, b = 0; c0 < w.cols; c0 += kFp8Block, ++b) {
          const float s = scale_at(w, r, b);
          for (int64_t c = c0; c < std::min(w.cols, c0 + kFp8Block); ++c) o[c] *= s;
        }
        break;
      default:
        for (int64_t c = 0; c < w.cols; ++c) o[c] = float(element(w, r, c));
    }
  }
}

void linear(const float* x, int64_t n, const Mat& w, float* y) {
  check_dtype(w);
  if (n == 0 || w.rows == 0) return;
  if (n > kMaxBatch) {
    if (w.dtype == DType::f32) {
      cpu::sgemm(n, w.rows, w.cols, x, w.cols, reinterpret_cast<const float*>(w.data), w.cols, true, y, w.rows);
      return;
    }
    const int64_t panel = panel_rows(w);
    std::vector<float> buf(static_cast<size_t>(panel * w.cols));
    for (int64_t r0 = 0; r0 < w.rows; r0 += panel) {
      const int64_t nr = std::min(panel, w.rows - r0);
      dequantize_rows(w, r0, nr, buf.data());
      cpu::sgemm(n, nr, w.cols, x, w.cols, buf.data(), w.cols, true, y + r0, w.rows);
    }
    return;
  }
  const cpu::RowKernels& k = cpu::active_kernels();
  const int nb = int(n);
#pragma omp parallel for schedule(static) if (w.rows * w.cols > 32768)
  for (int64_t r = 0; r < w.rows; ++r) {
    float acc[kMaxBatch];
    row_dot(k, w, r, x, nb, acc);
    for (int j = 0; j < nb; ++j) y[j * w.rows + r] = acc[j];
  }
}

void linear_t(const float* x, int64_t n, const Mat& w, float* y) {
  check_dtype(w);
  if (n == 0 || w.cols == 0) return;
  if (n > kMaxBatch || (w.dtype != DType::bf16 && w.dtype != DType::f8_e4m3)) {
    const int64_t panel = panel_rows(w);
    std::vector<float> buf(static_cast<size_t>(std::min(panel, std::max<int64_t>(w.rows, 1)) * w.cols));
    if (w.rows == 0) std::fill(y, y + n * w.cols, 0.0f);
    for (int64_t r0 = 0; r0 < w.rows; r0 += panel) {
      const int64_t nr = std::min(panel, w.rows - r0);
      dequantize_rows(w, r0, nr, buf.data());
      cpu::sgemm(n, w.cols, nr, x + r0, w.rows, buf.data(), w.cols, false, y, w.cols, r0 > 0);
    }
    return;
  }
  const cpu::RowKernels& k = cpu::active_kernels();
  std::fill(y, y + n * w.cols, 0.0f);
  // Threads split the columns into FP8-block-aligned ranges; each walks every row.
  const int64_t n_blocks = (w.cols + kFp8Block - 1) / kFp8Block;
#pragma omp parallel for schedule(static) if (w.rows * w.cols > 32768)
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t c0 = b * kFp8Block, len = std::min(kFp8Block, w.cols - c0);
    for (int64_t r = 0; r < w.rows; ++r) {
      const uint8_t* row = w.data + size_t(r) * w.row_bytes();
      for (int64_t j = 0; j < n; ++j) {
        const float a = x[j * w.rows + r];
        if (w.dtype == DType::bf16)
          k.axpy_bf16(a, row + 2 * c0, y + j * w.cols + c0, len);
        else
          k.axpy_fp8(a * scale_at(w, r, b), row + c0, y + j * w.cols + c0, len);
      }
    }
  }
}

void linear_reference(const float* x, int64_t n, const Mat& w, float* y) {
  check_dtype(w);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t r = 0; r < w.rows; ++r) {
      double s = 0;
      for (int64_t c = 0; c < w.cols; ++c) s += element(w, r, c) * x[j * w.cols + c];
      y[j * w.rows + r] = float(s);
    }
}

void linear_t_reference(const float* x, int64_t n, const Mat& w, float* y) {
  check_dtype(w);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < w.cols; ++c) {
      double s = 0;
      for (int64_t r = 0; r < w.rows; ++r) s += element(w, r, c) * x[j * w.rows + r];
      y[j * w.cols + c] = float(s);
    }
}

std::string backend_info() {
  return cat("cpu: ", cpu::active_kernels().name, " row kernels, ", omp_get_max_threads(), " threads, ",
             cpu::blas_info());
}

}  // namespace dsv3
