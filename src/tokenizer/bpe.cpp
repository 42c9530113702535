// Byte-level BPE merging (see bpe.h).
#include "tokenizer/bpe.h"

#include <algorithm>
#include <climits>
#include <cstring>

namespace dsv3 {

Bpe::Bpe(const std::array<int32_t, 256>& byte_ids, const std::vector<BpeMerge>& merges,
         std::unordered_map<std::string, int32_t> whole_pieces)
    : byte_ids_(byte_ids), n_merges_(merges.size()), whole_pieces_(std::move(whole_pieces)) {
  size_t cap = 16;
  while (cap < merges.size() * 2) cap *= 2;
  table_.assign(cap, Slot{kEmpty, 0, 0});
  mask_ = cap - 1;
  shift_ = 64 - std::countr_zero(cap);
  for (size_t r = 0; r < merges.size(); ++r) {
    const BpeMerge& m = merges[r];
    const uint64_t key = uint64_t(uint32_t(m.left)) << 32 | uint32_t(m.right);
    size_t i = size_t((key * 0x9E3779B97F4A7C15ull) >> shift_);
    while (table_[i].key != kEmpty && table_[i].key != key) i = (i + 1) & mask_;
    if (table_[i].key == key) continue;  // a repeated pair keeps its first (lowest) rank
    table_[i] = Slot{key, int32_t(r), m.merged};
  }
}

void Bpe::encode(std::string_view piece, BpeScratch& scratch, std::vector<int32_t>& out) const {
  if (piece.empty()) return;
  if (!whole_pieces_.empty()) {
    auto it = whole_pieces_.find(std::string(piece));
    if (it != whole_pieces_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  if (piece.size() <= kLinearMax)
    encode_linear(piece, scratch, out);
  else
    encode_heap(piece, scratch, out);
}

// Scan for the lowest rank, merge it, update the two neighbouring ranks; O(n^2) worst case
// but fast for the short pieces that make up most text.
void Bpe::encode_linear(std::string_view piece, BpeScratch& s, std::vector<int32_t>& out) const {
  const size_t n = piece.size();
  s.ids.resize(n);
  s.ranks.resize(n);
  for (size_t i = 0; i < n; ++i) s.ids[i] = byte_ids_[uint8_t(piece[i])];
  auto rank_at = [&](size_t i, size_t len) -> int32_t {
    if (i + 1 >= len) return INT_MAX;
    const Slot* m = find(s.ids[i], s.ids[i + 1]);
    return m ? m->rank : INT_MAX;
  };
  size_t len = n;
  for (size_t i = 0; i < len; ++i) s.ranks[i] = rank_at(i, len);
  int32_t* ids = s.ids.data();
  int32_t* ranks = s.ranks.data();
  while (len > 1) {
    size_t best = 0;
    int32_t best_rank = ranks[0];
    for (size_t i = 1; i + 1 < len; ++i)
      if (ranks[i] < best_rank) best_rank = ranks[i], best = i;
    if (best_rank == INT_MAX) break;
    ids[best] = find(ids[best], ids[best + 1])->merged;
    std::copy(ids + best + 2, ids + len, ids + best + 1);
    std::copy(ranks + best + 2, ranks + len, ranks + best + 1);
    --len;
    ranks[best] = rank_at(best, len);
    if (best > 0) ranks[best - 1] = rank_at(best - 1, len);
  }
  out.insert(out.end(), ids, ids + len);
}

// A linked list of symbols and a min-heap of candidate merges ordered by (rank, position);
// stale candidates (a side already merged away) are skipped when popped. O(n log n).
void Bpe::encode_heap(std::string_view piece, BpeScratch& s, std::vector<int32_t>& out) const {
  const int32_t n = int32_t(piece.size());
  s.ids.resize(size_t(n));
  s.prev.resize(size_t(n));
  s.next.resize(size_t(n));
  for (int32_t i = 0; i < n; ++i) {
    s.ids[size_t(i)] = byte_ids_[uint8_t(piece[size_t(i)])];
    s.prev[size_t(i)] = i - 1;
    s.next[size_t(i)] = i + 1 < n ? i + 1 : -1;
  }
  using Candidate = BpeScratch::Candidate;
  auto later = [](const Candidate& a, const Candidate& b) { return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos; };
  std::vector<Candidate>& heap = s.heap;
  heap.clear();
  auto push = [&](int32_t pos) {
    const int32_t nx = s.next[size_t(pos)];
    if (nx < 0) return;
    const Slot* m = find(s.ids[size_t(pos)], s.ids[size_t(nx)]);
    if (!m) return;
    heap.push_back({m->rank, pos, s.ids[size_t(pos)], s.ids[size_t(nx)]});
    std::push_heap(heap.begin(), heap.end(), later);
  };
  for (int32_t i = 0; i + 1 < n; ++i) {
    const Slot* m = find(s.ids[size_t(i)], s.ids[size_t(i + 1)]);
    if (m) heap.push_back({m->rank, i, s.ids[size_t(i)], s.ids[size_t(i + 1)]});
  }
  std::make_heap(heap.begin(), heap.end(), later);
  std::vector<int32_t>& ids = s.ids;
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), later);
    const Candidate c = heap.back();
    heap.pop_back();
    // Valid only if the left symbol is still alive with the same id and its right neighbour
    // is unchanged (merged-away symbols get id -1).
    if (ids[size_t(c.pos)] != c.left) continue;
    const int32_t nx = s.next[size_t(c.pos)];
    if (nx < 0 || ids[size_t(nx)] != c.right) continue;
    ids[size_t(c.pos)] = find(c.left, c.right)->merged;
    ids[size_t(nx)] = -1;
    const int32_t nn = s.next[size_t(nx)];
    s.next[size_t(c.pos)] = nn;
    if (nn >= 0) s.prev[size_t(nn)] = c.pos;
    if (s.prev[size_t(c.pos)] >= 0) push(s.prev[size_t(c.pos)]);
    push(c.pos);
  }
  for (int32_t i = 0; i >= 0; i = s.next[size_t(i)]) out.push_back(ids[size_t(i)]);
}

uint64_t BpeCache::hash_of(std::string_view s) {
  uint64_t h = 0x9E3779B97F4A7C15ull ^ s.size();
  size_t i = 0;
  for (; i + 8 <= s.size(); i += 8) {
    uint64_t v;
    std::memcpy(&v, s.data() + i, 8);
    h = (h ^ v) * 0xFF51AFD7ED558CCDull;
    h ^= h >> 32;
  }
  uint64_t v = 0;
  std::memcpy(&v, s.data() + i, s.size() - i);
  h = (h ^ v) * 0xC4CEB9FE1A85EC53ull;
  h ^= h >> 29;
  return h | 1;  // never 0, the empty mark
}

bool BpeCache::find(std::string_view piece, std::vector<int32_t>& out) const {
  if (piece.size() > kMaxPieceBytes || slots_.empty()) return false;
  const uint64_t h = hash_of(piece);
  const size_t mask = slots_.size() - 1;
  for (size_t i = h & mask;; i = (i + 1) & mask) {
    const Slot& s = slots_[i];
    if (s.hash == 0) return false;
    if (s.hash == h && s.key_size == piece.size() && std::memcmp(keys_.data() + s.key_offset, piece.data(), piece.size()) == 0) {
      out.insert(out.end(), ids_.begin() + s.ids_offset, ids_.begin() + s.ids_offset + s.n_ids);
      return true;
    }
  }
}

void BpeCache::insert(std::string_view piece, const int32_t* ids, size_t n) {
  if (piece.size() > kMaxPieceBytes || n > 255) return;
  if (slots_.empty() || n_entries_ >= kMaxEntries) reset(owner_);
  const uint64_t h = hash_of(piece);
  const size_t mask = slots_.size() - 1;
  size_t i = h & mask;
  while (slots_[i].hash != 0) {
    if (slots_[i].hash == h && slots_[i].key_size == piece.size() &&
        std::memcmp(keys_.data() + slots_[i].key_offset, piece.data(), piece.size()) == 0)
      return;  // already there
    i = (i + 1) & mask;
  }
  slots_[i] = Slot{h, uint32_t(keys_.size()), uint32_t(ids_.size()), uint8_t(piece.size()), uint8_t(n)};
  keys_.append(piece);
  ids_.insert(ids_.end(), ids, ids + n);
  ++n_entries_;
}

void BpeCache::reset(const void* owner) {
  owner_ = owner;
  slots_.assign(2 * kMaxEntries, Slot{});
  keys_.clear();
  ids_.clear();
  n_entries_ = 0;
}

}  // namespace dsv3
