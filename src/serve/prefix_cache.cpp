// The context cache (see prefix_cache.h).
#include "serve/prefix_cache.h"

#include <algorithm>
#include <limits>

namespace dsv3::serve {

namespace {

uint64_t mix(uint64_t h, uint64_t x) {  // splitmix64's finaliser over h ^ x
  h ^= x + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
  h ^= h >> 30, h *= 0xbf58476d1ce4e5b9ULL;
  h ^= h >> 27, h *= 0x94d049bb133111ebULL;
  return h ^ (h >> 31);
}

}  // namespace

uint64_t PrefixCache::chain(uint64_t parent, const int32_t* tokens) const {
  uint64_t h = mix(parent, 0x64737633);
  for (int64_t i = 0; i < kBlock; ++i) h = mix(h, uint64_t(uint32_t(tokens[i])));
  return h;
}

const PrefixCache::Block* PrefixCache::find(uint64_t h, uint64_t parent, const int32_t* tokens) const {
  const auto it = blocks_.find(h);
  if (it == blocks_.end() || it->second.parent != parent || !std::equal(it->second.tokens.begin(), it->second.tokens.end(), tokens))
    return nullptr;
  return &it->second;
}

PageTable PrefixCache::lookup(const std::vector<int32_t>& tokens, int64_t max_tokens, bool from_disk) {
  PageTable t;
  std::vector<uint64_t> hit;
  uint64_t parent = model_id_;
  const int64_t n = std::min<int64_t>(int64_t(tokens.size()), max_tokens) / kBlock;
  for (int64_t b = 0; b < n; ++b) {
    const uint64_t h = chain(parent, tokens.data() + b * kBlock);
    const Block* block = find(h, parent, tokens.data() + b * kBlock);
    if (!block && from_disk && disk_ && pool_.free_pages() > 0 && !blocks_.count(h)) {  // from disk, into a free page
      const int32_t page = pool_.allocate();
      if (disk_->load(h, parent, tokens.data() + b * kBlock, pool_, page)) {
        const int32_t* ids = tokens.data() + b * kBlock;
        block = &blocks_.emplace(h, Block{parent, std::vector<int32_t>(ids, ids + kBlock), page, 0}).first->second;
      } else {
        pool_.release(page);
      }
    }
    if (!block) break;
    t.pages.push_back(block->page);
    hit.push_back(h), parent = h;
  }
  // The chain's last block gets the oldest stamp, so that it is evicted before its parents.
  for (auto it = hit.rbegin(); it != hit.rend(); ++it) blocks_[*it].used = ++clock_;
  t.length = int64_t(t.pages.size()) * kBlock;
  return t;
}

void PrefixCache::insert(const std::vector<int32_t>& tokens, const PageTable& table, int64_t valid) {
  const int64_t n = std::min<int64_t>(valid, int64_t(tokens.size())) / kBlock;
  std::vector<uint64_t> chain_hashes;
  uint64_t parent = model_id_;
  for (int64_t b = 0; b < n; ++b) {
    const int32_t* block_tokens = tokens.data() + b * kBlock;
    const uint64_t h = chain(parent, block_tokens);
    const auto it = blocks_.find(h);
    if (it == blocks_.end()) {
      pool_.retain(table.pages[size_t(b)]);
      blocks_.emplace(h, Block{parent, std::vector<int32_t>(block_tokens, block_tokens + kBlock), table.pages[size_t(b)], 0});
      if (disk_) disk_->save(h, parent, block_tokens, pool_, table.pages[size_t(b)]);
    } else if (it->second.parent != parent || !std::equal(it->second.tokens.begin(), it->second.tokens.end(), block_tokens)) {
      break;  // a collision: the block already there stays, and nothing after it is kept
    }
    chain_hashes.push_back(h), parent = h;
  }
  for (auto it = chain_hashes.rbegin(); it != chain_hashes.rend(); ++it) blocks_[*it].used = ++clock_;
}

bool PrefixCache::evict() {
  auto victim = blocks_.end();
  uint64_t oldest = std::numeric_limits<uint64_t>::max();
  for (auto it = blocks_.begin(); it != blocks_.end(); ++it)
    if (it->second.used < oldest && pool_.refs(it->second.page) == 1) oldest = it->second.used, victim = it;
  if (victim == blocks_.end()) return false;
  pool_.release(victim->second.page);
  blocks_.erase(victim);
  return true;
}

int64_t PrefixCache::evictable() const {
  int64_t n = 0;
  for (const auto& [h, block] : blocks_) n += pool_.refs(block.page) == 1;
  return n;
}

void PrefixCache::clear() {
  for (auto& [h, block] : blocks_) pool_.release(block.page);
  blocks_.clear();
}

}  // namespace dsv3::serve
