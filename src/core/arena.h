// A bump allocator for float scratch: activations of one forward pass are carved out of
// it and released together by reset(). After the first pass of a given shape no further
// heap allocation happens. Depends on std only.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace dsv3 {

class Arena {
 public:
  // n floats, 64-byte aligned, uninitialised; valid until reset().
  float* alloc(size_t n) {
    n = (n + 15) & ~size_t(15);
    if (blocks_.empty() || used_ + n > blocks_.back().size) {
      size_t size = std::max(n, blocks_.empty() ? size_t(1) << 16 : blocks_.back().size * 2);
      blocks_.push_back({std::unique_ptr<float[]>(new float[size + 16]), size});  // uninitialised
      used_ = 0;
    }
    float* base = blocks_.back().data.get();
    base += (16 - (reinterpret_cast<uintptr_t>(base) / sizeof(float)) % 16) % 16;
    float* p = base + used_;
    used_ += n;
    total_ += n;
    return p;
  }
  // Frees everything; if the last pass needed several blocks, the next gets one big one.
  void reset() {
    if (blocks_.size() > 1) {
      size_t size = total_;
      blocks_.clear();
      blocks_.push_back({std::unique_ptr<float[]>(new float[size + 16]), size});
    }
    used_ = 0;
    total_ = 0;
  }

 private:
  struct Block {
    std::unique_ptr<float[]> data;
    size_t size;
  };
  std::vector<Block> blocks_;
  size_t used_ = 0, total_ = 0;
};

}  // namespace dsv3
