// Byte-level BPE: a piece of bytes becomes token ids by repeatedly merging the adjacent
// pair with the lowest merge rank (leftmost first on ties), as Hugging Face tokenizers does.
// Two implementations give identical ids: a linear scan for short pieces and a heap for
// long ones (a 20 MB run of one letter is one piece). BpeCache remembers frequent pieces.
// Depends on std only.
#pragma once
#include <array>
#include <bit>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace dsv3 {

struct BpeMerge {
  int32_t left = 0, right = 0;  // the pair's token ids
  int32_t merged = 0;           // the id of their concatenation
};

// Scratch buffers reused across calls so encoding allocates nothing per piece.
struct BpeScratch {
  std::vector<int32_t> ids;
  std::vector<int32_t> ranks;
  std::vector<int32_t> prev, next;
  struct Candidate {
    int32_t rank, pos, left, right;
  };
  std::vector<Candidate> heap;
};

class Bpe {
 public:
  Bpe() = default;
  // byte_ids[b]: the id of the one-byte token for byte b. merges[r] has rank r.
  // whole_pieces (ignore_merges): a piece that is itself in the vocabulary maps to that id.
  Bpe(const std::array<int32_t, 256>& byte_ids, const std::vector<BpeMerge>& merges,
      std::unordered_map<std::string, int32_t> whole_pieces = {});

  // Appends the ids of `piece` (raw bytes) to out.
  void encode(std::string_view piece, BpeScratch& scratch, std::vector<int32_t>& out) const;

  // The two algorithms, exposed for the test that compares them.
  void encode_linear(std::string_view piece, BpeScratch& scratch, std::vector<int32_t>& out) const;
  void encode_heap(std::string_view piece, BpeScratch& scratch, std::vector<int32_t>& out) const;

  size_t n_merges() const { return n_merges_; }

  static constexpr size_t kLinearMax = 48;  // pieces up to this many bytes use the linear scan

 private:
  struct Slot {
    uint64_t key;  // left << 32 | right; kEmpty when free
    int32_t rank, merged;
  };
  static constexpr uint64_t kEmpty = ~uint64_t(0);
  // The merge of (left, right), or nullptr.
  const Slot* find(int32_t left, int32_t right) const {
    const uint64_t key = uint64_t(uint32_t(left)) << 32 | uint32_t(right);
    size_t i = size_t((key * 0x9E3779B97F4A7C15ull) >> shift_);
    for (;;) {
      const Slot& s = table_[i];
      if (s.key == key) return &s;
      if (s.key == kEmpty) return nullptr;
      i = (i + 1) & mask_;
    }
  }

  std::array<int32_t, 256> byte_ids_{};
  std::vector<Slot> table_;
  size_t mask_ = 0;
  int shift_ = 64;
  size_t n_merges_ = 0;
  std::unordered_map<std::string, int32_t> whole_pieces_;
};

// Remembers the ids of recently seen pieces (words repeat: most of a text's pieces are hits).
// A flat open-addressing table over two pools (piece bytes, ids); bounded: emptied when it
// holds kMaxEntries pieces. Pieces longer than kMaxPieceBytes are not cached.
class BpeCache {
 public:
  // Appends the cached ids of piece to out and returns true, or returns false.
  bool find(std::string_view piece, std::vector<int32_t>& out) const;
  void insert(std::string_view piece, const int32_t* ids, size_t n);
  // The tokenizer whose pieces these are; reset() empties the cache for another one.
  const void* owner() const { return owner_; }
  void reset(const void* owner);

  static constexpr size_t kMaxEntries = 1 << 16;
  static constexpr size_t kMaxPieceBytes = 24;  // longer pieces rarely repeat

 private:
  struct Slot {
    uint64_t hash = 0;  // 0: empty
    uint32_t key_offset = 0, ids_offset = 0;
    uint8_t key_size = 0, n_ids = 0;
  };
  static uint64_t hash_of(std::string_view s);
  std::vector<Slot> slots_;  // 2 * kMaxEntries once used
  std::string keys_;
  std::vector<int32_t> ids_;
  size_t n_entries_ = 0;
  const void* owner_ = nullptr;
};

}  // namespace dsv3
