// A bump allocator for scratch (float or double): activations of one forward pass are
// carved out of it and released together by reset(). After the first pass of a given shape no further
// heap allocation happens. Depends on std only.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

namespace dsv3 {

class Arena {
 public:
  // n values of T (float or double), 64-byte aligned, uninitialised; valid until reset().
  template <typename T = float>
  T* alloc(size_t count) {
    static_assert(sizeof(T) % sizeof(float) == 0);
    size_t n = (count * (sizeof(T) / sizeof(float)) + 15) & ~size_t(15);
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
    return reinterpret_cast<T*>(p);
  }
  // n objects of a trivially destructible type (job lists, index arrays), value-initialised.
  template <typename T>
  T* alloc_objects(size_t n) {
    static_assert(std::is_trivially_destructible_v<T> && alignof(T) <= 64);
    T* p = reinterpret_cast<T*>(alloc<float>((n * sizeof(T) + sizeof(float) - 1) / sizeof(float)));
    std::uninitialized_value_construct_n(p, n);
    return p;
  }
  // What is allocated now; rewind(mark) frees everything allocated after it, so a module
  // can take scratch for one call without holding it for the rest of the pass.
  struct Mark {
    size_t blocks, used, total;
  };
  Mark mark() const { return {blocks_.size(), used_, total_}; }
  void rewind(const Mark& m) {
    peak_ = std::max(peak_, total_);
    if (blocks_.size() > std::max<size_t>(m.blocks, 1)) blocks_.resize(std::max<size_t>(m.blocks, 1));
    used_ = m.blocks ? m.used : 0;
    total_ = m.total;
  }
  // Frees everything; if the last pass needed several blocks, the next gets one big one
  // (as large as the most the pass held at once).
  void reset() {
    peak_ = std::max(peak_, total_);
    if (blocks_.size() > 1 || (!blocks_.empty() && blocks_.back().size < peak_)) {
      size_t size = peak_;
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
  size_t used_ = 0, total_ = 0, peak_ = 0;
};

// Scratch for one scope: what is allocated from the arena inside it is freed at its end.
class ArenaScope {
 public:
  explicit ArenaScope(Arena& arena) : arena_(arena), mark_(arena.mark()) {}
  ~ArenaScope() { arena_.rewind(mark_); }
  ArenaScope(const ArenaScope&) = delete;
  ArenaScope& operator=(const ArenaScope&) = delete;

 private:
  Arena& arena_;
  Arena::Mark mark_;
};

}  // namespace dsv3
