// Saved activations (see backend/saved_activation.h): full copies, E4M3 tiles through
// quantize(), and E5M6 with power-of-2 tile scales.
#include "backend/saved_activation.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "core/dtype.h"
#include "core/error.h"

namespace dsv3 {

uint16_t e5m6_encode(float x) {
  const uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  const float a = std::min(std::fabs(x), kE5m6Max);  // saturate: nothing above the largest value
  if (a == 0) return sign;
  int e = std::ilogb(a);               // a in [2^e, 2^(e+1))
  const int grid = std::max(e, -14) - 6;  // 6 mantissa bits; subnormals share 2^-14's grid
  float r = std::nearbyint(std::ldexp(a, -grid));  // RNE (the default rounding mode)
  if (r == 0) return sign;
  // r * 2^grid may have carried into the next binade (r = 128): re-read its exponent.
  const float v = std::ldexp(r, grid);
  e = std::ilogb(v);
  if (e < -14) return uint16_t(sign | uint16_t(std::ldexp(v, 24)));  // FP16 subnormal: v / 2^-24
  const uint16_t mant = uint16_t(std::ldexp(v, -e) * 1024.0f - 1024.0f);
  return uint16_t(sign | uint16_t((e + 15) << 10) | mant);
}

float e5m6_decode(uint16_t bits) { return f16_to_f32(bits); }

namespace {

void check_finite(const float* x, int64_t rows, int64_t cols, const char* what) {
  for (int64_t i = 0; i < rows * cols; ++i)
    if (!std::isfinite(x[i]))
      fail("saving an activation in ", what, ": non-finite value ", x[i], " at row ", i / cols, ", column ", i % cols,
           " of a [", rows, ", ", cols, "] tensor");
}

}  // namespace

template <typename T>
void SavedActivation<T>::save(const T* x, int64_t rows, int64_t cols, SavedFormat format) {
  rows_ = rows, cols_ = cols, format_ = format;
  // clear(), not a fresh object: the vectors keep their capacity, so steps allocate nothing.
  full_.clear(), e4m3_.codes.clear(), e4m3_.scales.clear(), e5m6_.clear(), scales_.clear();
  const size_t count = size_t(rows * cols);
  if (format == SavedFormat::full) {
    full_.assign(x, x + count);
    return;
  }
  // The formats start from float, as the GEMMs do (a rounded copy for double).
  thread_local std::vector<float> copy;
  const float* xf = nullptr;
  if constexpr (std::is_same_v<T, float>) {
    xf = x;
  } else {
    copy.assign(x, x + count);
    xf = copy.data();
  }
  if (format == SavedFormat::e4m3_1x128) {
    quantize_into(e4m3_, xf, rows, cols, Fp8Tiling::row_tiles_1x128);
    return;
  }
  check_finite(xf, rows, cols, "E5M6");
  const int64_t tiles = (cols + kFp8Tile - 1) / kFp8Tile;
  scales_.resize(size_t(rows * tiles));
  e5m6_.resize(count);
#pragma omp parallel for schedule(static) if (rows * cols > 65536)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t c0 = t * kFp8Tile, c1 = std::min(cols, c0 + kFp8Tile);
      float amax = 0;
      for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(xf[r * cols + c]));
      // The smallest power of 2 that brings max|x| within range (dividing by it is exact):
      // from max|x|'s exponent, 2^-15 below, then doubled while needed (at most once), and
      // never below the smallest float, so that tiles of subnormals get a usable scale too.
      float scale = 1.0f;
      if (amax > 0) {
        scale = std::max(std::ldexp(1.0f, std::ilogb(amax) - 15), std::numeric_limits<float>::denorm_min());
        while (amax / scale > kE5m6Max) scale *= 2;
      }
      scales_[size_t(r * tiles + t)] = scale;
      for (int64_t c = c0; c < c1; ++c) e5m6_[size_t(r * cols + c)] = e5m6_encode(xf[r * cols + c] / scale);
    }
  }
}

template <typename T>
const T* SavedActivation<T>::read(Arena& arena) const {
  if (format_ == SavedFormat::full) return full_.data();
  const size_t count = size_t(rows_ * cols_);
  T* out = arena.alloc<T>(count);
  if (format_ == SavedFormat::e4m3_1x128) {
    if constexpr (std::is_same_v<T, float>) {
      dequantize(e4m3_, out);
    } else {
      ArenaScope scope(arena);
      float* f = arena.alloc<float>(count);
      dequantize(e4m3_, f);
      std::copy(f, f + count, out);
    }
    return out;
  }
  const int64_t tiles = (cols_ + kFp8Tile - 1) / kFp8Tile;
#pragma omp parallel for schedule(static) if (rows_ * cols_ > 65536)
  for (int64_t r = 0; r < rows_; ++r)
    for (int64_t c = 0; c < cols_; ++c)
      out[r * cols_ + c] = T(e5m6_decode(e5m6_[size_t(r * cols_ + c)]) * scales_[size_t(r * tiles + c / kFp8Tile)]);
  return out;
}

template <typename T>
std::vector<T> SavedActivation<T>::load() const {
  Arena arena;
  const T* p = read(arena);
  return std::vector<T>(p, p + rows_ * cols_);
}

template <typename T>
int64_t SavedActivation<T>::bytes() const {
  return int64_t(full_.size() * sizeof(T) + e4m3_.codes.size() + e4m3_.scales.size() * sizeof(float) +
                 e5m6_.size() * sizeof(uint16_t) + scales_.size() * sizeof(float));
}

template class SavedActivation<float>;
template class SavedActivation<double>;

}  // namespace dsv3
