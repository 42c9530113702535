// linear() and linear_t(): products with weights kept in their stored dtype.
// Small batches (decode, at most kMaxBatch rows of x) stream each stored row once through
// the row kernels, threads splitting the rows (linear) or the columns (linear_t): these
// are memory-bound, and the weights are read exactly once. Where the CPU has AMX, products
// of more rows (prefill, experts with several tokens, batched decoding) run on the tile
// unit (linear_amx.cpp: float32 accuracy through three-part BF16 activations). Otherwise
// batches beyond kMaxBatch dequantize a panel of rows to float32 and hand it to sgemm.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "backend/cpu/kernels.h"
#include "backend/ops.h"
#include "backend/cpu/threads.h"
#include "core/error.h"

namespace dsv3 {

using cpu::kMaxBatch;

// The fewest activation rows that go to the AMX tiles (where the CPU has them) rather than
// the row kernels. bench_linear on the bench model's shapes (2026-12-06, fraction of the
// read bandwidth), row kernels against AMX: BF16 66-77 % vs 38-64 % at 2 rows, 45-63 % vs
// 37-63 % at 4, 24-34 % vs 30-73 % at 8; FP8 37-52 % vs ~22 % at 2, 24-34 % vs ~22 % at 4,
// 8-16 % vs 18-33 % at 8 (decoding FP8 into BF16 bounds its strips; the 2- and 4-row AMX
// figures predate inlining that decoder). So the row kernels keep up to four rows.
constexpr int64_t kAmxMinRows = 5;

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

void dot_bf16_scalar(const void* wv, const float* x, int64_t ldx, int nb, int64_t len, float* acc) {
  const uint8_t* w = static_cast<const uint8_t*>(wv);
  for (int j = 0; j < nb; ++j) {
    float s = 0;
    for (int64_t k = 0; k < len; ++k) s += load_bf16(w, k) * x[j * ldx + k];
    acc[j] += s;
  }
}
void dot_fp8_scalar(const void* wv, const float* x, int64_t ldx, int nb, int64_t len, float* acc) {
  const uint8_t* w = static_cast<const uint8_t*>(wv);
  for (int j = 0; j < nb; ++j) {
    float s = 0;
    for (int64_t k = 0; k < len; ++k) s += fp8_table[w[k]] * x[j * ldx + k];
    acc[j] += s;
  }
}
void dot_f32_scalar(const void* wv, const float* x, int64_t ldx, int nb, int64_t len, float* acc) {
  const uint8_t* w = static_cast<const uint8_t*>(wv);
  for (int j = 0; j < nb; ++j) {
    float s = 0;
    for (int64_t k = 0; k < len; ++k) {
      float v;
      std::memcpy(&v, w + 4 * k, 4);
      s += v * x[j * ldx + k];
    }
    acc[j] += s;
  }
}
template <RowDotFn kDot>
void rows_scalar(const void* w, size_t row_bytes, int64_t rows, const float* x, int64_t len, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    y[r] = 0;
    kDot(static_cast<const uint8_t*>(w) + size_t(r) * row_bytes, x, len, 1, len, &y[r]);
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
  static const RowKernels k{dot_bf16_scalar,
                            dot_fp8_scalar,
                            dot_f32_scalar,
                            rows_scalar<dot_bf16_scalar>,
                            rows_scalar<dot_fp8_scalar>,
                            axpy_bf16_scalar,
                            axpy_fp8_scalar,
                            convert_bf16_scalar,
                            convert_fp8_scalar,
                            "scalar"};
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

// x with an FP8 matrix's column-block scales folded in: x'[j, c] = x[j, c] * scale[rb, c/128]
// for the 128-row block rb. Rows of one block share their scales, so each thread rescales
// its copy of x once per 128 rows, and the row kernel accumulates a whole row without
// stopping at block boundaries.
struct ScaledX {
  const Mat* w = nullptr;
  const float* x = nullptr;
  int64_t block = -1;
  std::vector<float> values;

  const float* get(const Mat& m, const float* xin, int nb, int64_t r) {
    const int64_t rb = (m.row0 + r) / kFp8Block;
    if (w == &m && x == xin && block == rb) return values.data();
    w = &m, x = xin, block = rb;
    values.resize(size_t(nb * m.cols));
    const float* s = m.scale_inv + rb * m.scale_cols;
    for (int j = 0; j < nb; ++j)
      for (int64_t c = 0; c < m.cols; ++c) values[size_t(j * m.cols + c)] = xin[j * m.cols + c] * s[c / kFp8Block];
    return values.data();
  }
};

// One stored row r against nb rows of x: acc[j] = sum_k W[r, k] x[j, k].
void row_dot(const cpu::RowKernels& k, const Mat& w, int64_t r, const float* x, int nb, ScaledX& scaled,
             float* acc) {
  const uint8_t* row = w.data + size_t(r) * w.row_bytes();
  for (int j = 0; j < nb; ++j) acc[j] = 0;
  switch (w.dtype) {
    case DType::bf16: k.dot_bf16(row, x, w.cols, nb, w.cols, acc); return;
    case DType::f32: k.dot_f32(row, x, w.cols, nb, w.cols, acc); return;
    case DType::f8_e4m3: k.dot_fp8(row, scaled.get(w, x, nb, r), w.cols, nb, w.cols, acc); return;
    default:
      for (int j = 0; j < nb; ++j) {
        double s = 0;
        for (int64_t c = 0; c < w.cols; ++c) s += element(w, r, c) * x[j * w.cols + c];
        acc[j] = float(s);
      }
  }
}

// This thread's float32 panel for dequantized rows: grown as needed, never freed or zeroed,
// so that prefill does not map, zero and unmap fresh pages for every product.
float* panel_buffer(size_t n) {
  thread_local std::unique_ptr<float[]> buf;
  thread_local size_t capacity = 0;
  if (n > capacity) {
    buf.reset(new float[n]);
    capacity = n;
  }
  return buf.get();
}

// Rows of a float32 panel for sgemm: enough that sgemm runs efficiently, few enough that
// the panel stays in cache (about 2 MiB), a multiple of the FP8 block.
int64_t panel_rows(const Mat& w) {
  int64_t r = (int64_t(2) << 20) / std::max<int64_t>(1, w.cols * 4);
  r = std::max<int64_t>(kFp8Block, r / kFp8Block * kFp8Block);
  return std::min(r, w.rows);
}

// The small-batch path of linear() and linear_batch(): every job's rows are cut into
// tiles of at most 16 rows that never cross a 128-row FP8 block (so a tile needs one
// rescaled x), and threads share out the tiles of all jobs.
void linear_rowwise(const LinearJob* jobs, size_t count) {
  struct Tile {
    const LinearJob* job;
    int64_t first, rows;
  };
  // Kept between calls (no allocation per product); shared with the threads by reference.
  thread_local std::vector<Tile> tiles_kept;
  std::vector<Tile>& tiles = tiles_kept;
  tiles.clear();
  int64_t work = 0;
  for (size_t i = 0; i < count; ++i) {
    const Mat& w = jobs[i].w;
    work += w.rows * w.cols;
    for (int64_t r = 0; r < w.rows;) {
      int64_t end = std::min(w.rows, r + 16);
      if (w.dtype == DType::f8_e4m3) end = std::min(end, (w.row0 + r) / kFp8Block * kFp8Block + kFp8Block - w.row0);
      tiles.push_back({&jobs[i], r, end - r});
      r = end;
    }
  }
  const cpu::RowKernels& k = cpu::active_kernels();
#pragma omp parallel if (work > 32768)
  {
    thread_local ScaledX scaled_kept;  // this thread's: its buffer keeps its memory
    ScaledX& scaled = scaled_kept;
    scaled.w = nullptr, scaled.x = nullptr, scaled.block = -1;  // nothing cached from an earlier call
    float acc[kMaxBatch];
#pragma omp for schedule(static)
    for (size_t t = 0; t < tiles.size(); ++t) {
      const Tile& tile = tiles[t];
      const LinearJob& j = *tile.job;
      const Mat& w = j.w;
      const uint8_t* rows = w.data + size_t(tile.first) * w.row_bytes();
      if (j.n == 1 && w.dtype == DType::bf16) {
        k.rows_bf16(rows, w.row_bytes(), tile.rows, j.x, w.cols, j.y + tile.first);
      } else if (j.n == 1 && w.dtype == DType::f8_e4m3) {
        k.rows_fp8(rows, w.row_bytes(), tile.rows, scaled.get(w, j.x, 1, tile.first), w.cols, j.y + tile.first);
      } else {
        for (int64_t r = tile.first; r < tile.first + tile.rows; ++r) {
          row_dot(k, w, r, j.x, int(j.n), scaled, acc);
          for (int64_t b = 0; b < j.n; ++b) j.y[b * w.rows + r] = acc[b];
        }
      }
    }
  }
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
  cpu::adapt_threads();
  check_dtype(w);
  if (n == 0 || w.rows == 0) return;
  if (w.dtype == DType::f32 && (n > kMaxBatch || w.cols < 64)) {  // BLAS as is (e.g. the attention cache)
    cpu::sgemm(n, w.rows, w.cols, x, w.cols, reinterpret_cast<const float*>(w.data), w.cols, true, y, w.rows);
    return;
  }
  if ((w.dtype == DType::bf16 || w.dtype == DType::f8_e4m3) && n >= kAmxMinRows && cpu::amx_available()) {
    const LinearJob job{x, n, w, y};
    cpu::linear_amx(&job, 1);
    return;
  }
  if (n > kMaxBatch) {
    const int64_t panel = panel_rows(w);
    float* buf = panel_buffer(size_t(panel * w.cols));
    for (int64_t r0 = 0; r0 < w.rows; r0 += panel) {
      const int64_t nr = std::min(panel, w.rows - r0);
      dequantize_rows(w, r0, nr, buf);
      cpu::sgemm(n, nr, w.cols, x, w.cols, buf, w.cols, true, y + r0, w.rows);
    }
    return;
  }
  const LinearJob job{x, n, w, y};
  linear_rowwise(&job, 1);
}

void linear_batch(const LinearJob* jobs, size_t count) {
  cpu::adapt_threads();
  // Jobs the row kernels take (few activation rows, BF16 / FP8) share one parallel pass;
  // the others run one by one.
  // Jobs with many rows over BF16 / FP8 weights share one AMX pass where the CPU has it.
  thread_local std::vector<LinearJob> rowwise, tiled;  // kept between calls
  rowwise.clear(), tiled.clear();
  const bool amx = cpu::amx_available();
  for (size_t i = 0; i < count; ++i) {
    const LinearJob& j = jobs[i];
    check_dtype(j.w);
    const bool stored_low = j.w.dtype == DType::bf16 || j.w.dtype == DType::f8_e4m3;
    if (j.n == 0 || j.w.rows == 0) continue;
    if (amx && stored_low && j.n >= kAmxMinRows)
      tiled.push_back(j);
    else if (j.n <= kMaxBatch && (stored_low || (j.w.dtype == DType::f32 && j.w.cols >= 64)))
      rowwise.push_back(j);
    else
      linear(j.x, j.n, j.w, j.y);
  }
  if (!rowwise.empty()) linear_rowwise(rowwise.data(), rowwise.size());
  if (!tiled.empty()) cpu::linear_amx(tiled.data(), tiled.size());
}

void linear_t(const float* x, int64_t n, const Mat& w, float* y) {
  cpu::adapt_threads();
  check_dtype(w);
  if (n == 0 || w.cols == 0) return;
  if (w.dtype == DType::f32) {
    if (w.rows == 0) std::fill(y, y + n * w.cols, 0.0f);
    else cpu::sgemm(n, w.cols, w.rows, x, w.rows, reinterpret_cast<const float*>(w.data), w.cols, false, y, w.cols);
    return;
  }
  if (n > kMaxBatch || (w.dtype != DType::bf16 && w.dtype != DType::f8_e4m3)) {
    const int64_t panel = panel_rows(w);
    float* buf = panel_buffer(size_t(std::min(panel, std::max<int64_t>(w.rows, 1)) * w.cols));
    if (w.rows == 0) std::fill(y, y + n * w.cols, 0.0f);
    for (int64_t r0 = 0; r0 < w.rows; r0 += panel) {
      const int64_t nr = std::min(panel, w.rows - r0);
      dequantize_rows(w, r0, nr, buf);
      cpu::sgemm(n, w.cols, nr, x + r0, w.rows, buf, w.cols, false, y, w.cols, r0 > 0);
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

void linear_strided_batch(const StridedLinearJob* jobs, size_t count, int64_t n) {
  cpu::adapt_threads();
  if (n <= 0) return;
  auto run = [&](const StridedLinearJob& j, std::vector<float>& xs, std::vector<float>& ys) {
    const int64_t in = j.transposed ? j.w.rows : j.w.cols, out = j.transposed ? j.w.cols : j.w.rows;
    xs.resize(size_t(n * in)), ys.resize(size_t(n * out));
    for (int64_t r = 0; r < n; ++r) std::memcpy(&xs[size_t(r * in)], j.x + r * j.ldx, size_t(in) * sizeof(float));
    if (j.transposed) linear_t(xs.data(), n, j.w, ys.data());
    else linear(xs.data(), n, j.w, ys.data());
    for (int64_t r = 0; r < n; ++r) std::memcpy(j.y + r * j.ldy, &ys[size_t(r * out)], size_t(out) * sizeof(float));
  };
  const int64_t n_jobs = int64_t(count);
  // Few rows: the products are memory-bound and small, one per thread (the row-kernel path,
  // which keeps no shared buffers). Many rows: threads inside each product.
#pragma omp parallel if (n <= kMaxBatch && n_jobs > 1)
  {
    thread_local std::vector<float> xs, ys;  // this thread's, kept between calls
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n_jobs; ++i) run(jobs[size_t(i)], xs, ys);
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
