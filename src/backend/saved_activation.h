// Activations saved for the backward pass, in full or in the low-precision formats where
// DeepSeek-V3 caches them (§3.3.3, "Low-precision activation"). Implemented in
// backend/cpu/saved_activation.cpp. Depends on core only.
#pragma once
#include <cstdint>
#include <vector>

#include "backend/fp8.h"
#include "core/arena.h"

namespace dsv3 {

// How an activation saved for the backward pass is kept (§3.3.3, "Low-precision activation").
enum class SavedFormat {
  full,             // as computed, in T
  e4m3_1x128,       // E4M3 codes with online scales per 1x128 tile
  e5m6_1x128_pow2,  // E5M6 (1 sign, 5 exponent, 6 mantissa bits, FP16's exponent range; held
                    // as FP16 bit patterns) with per-1x128-tile scales rounded up to powers of 2,
                    // so that re-tiling in the backward adds no error from the scales
};

// E5M6 as FP16 bit patterns: encode rounds to nearest even on the 6-bit mantissa grid
// (subnormals below 2^-14 on the grid of 2^-20), saturating to +-65024; decode is exact.
constexpr float kE5m6Max = 65024.0f;
uint16_t e5m6_encode(float x);  // x finite
float e5m6_decode(uint16_t bits);

// One activation saved for the backward pass, in a SavedFormat. Saving a non-finite value
// in a low-precision format throws dsv3::Error naming its position (a divergence).
template <typename T>
class SavedActivation {
 public:
  // Keeps x [rows, cols]; the storage keeps its memory from one save to the next.
  void save(const T* x, int64_t rows, int64_t cols, SavedFormat format);
  // The values [rows, cols]: in place for full, else decoded into memory from arena.
  const T* read(Arena& arena) const;
  std::vector<T> load() const;  // a decoded copy
  int64_t bytes() const;        // the bytes of the saved values (capacity kept for later saves not counted)
  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }

 private:
  int64_t rows_ = 0, cols_ = 0;
  SavedFormat format_ = SavedFormat::full;
  std::vector<T> full_;
  Fp8Tensor e4m3_;
  std::vector<uint16_t> e5m6_;  // FP16 bit patterns whose low 4 mantissa bits are 0
  std::vector<float> scales_;   // e5m6: [rows, ceil(cols / 128)]
};

}  // namespace dsv3
