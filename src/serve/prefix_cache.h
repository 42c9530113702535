// DeepSeek-style context caching (the API bills a prompt's cached prefix at a tenth): the
// keys of prompt prefixes, kept by 64-token block in the batch's page pool so that a later
// request starting with the same tokens shares those pages and runs only the rest. A block
// is found by a chained hash, h(b) = hash(h(b - 1), tokens of block b) from the model's
// identity, so a block matches only with everything before it; the tokens are compared too,
// so a hash collision is a miss, never a wrong answer. Blocks are evicted least recently used
// first (a chain's later blocks before its earlier ones) when the engine needs pages; with a
// DiskCache they also live on disk. Lives on the engine's thread. Uses model (the page pool).
#pragma once
#include <cstdint>
#include <unordered_map>
#include <vector>

#include "model/paged_cache.h"
#include "serve/disk_cache.h"

namespace dsv3::serve {

class PrefixCache {
 public:
  static constexpr int64_t kBlock = PagedKvCache::kPageTokens;
  PrefixCache(PagedKvCache& pool, uint64_t model_id) : pool_(pool), model_id_(model_id) {}
  // Blocks also go to disk as they are cached, and a block missing in memory is read from
  // disk when a page is free for it.
  void set_disk(DiskCache* disk) { disk_ = disk; }
  ~PrefixCache() { clear(); }
  PrefixCache(const PrefixCache&) = delete;
  PrefixCache& operator=(const PrefixCache&) = delete;

  // The longest cached prefix of tokens, in whole blocks and at most max_tokens long: a page
  // table for BatchEngine::add (which takes its own hold on the pages). from_disk: blocks
  // missing in memory may be read from disk into free pages.
  PageTable lookup(const std::vector<int32_t>& tokens, int64_t max_tokens, bool from_disk = true);
  // Keeps the whole blocks among positions [0, valid) of a sequence's table; tokens are the
  // sequence's (prompt, then generated), at least valid of them.
  void insert(const std::vector<int32_t>& tokens, const PageTable& table, int64_t valid);
  // Frees the least recently used block that only the cache holds; false if there is none.
  bool evict();
  int64_t evictable() const;  // blocks only the cache holds (each evict() frees one page)
  void clear();
  int64_t blocks() const { return int64_t(blocks_.size()); }
  uint64_t model_id() const { return model_id_; }

 private:
  struct Block {
    uint64_t parent;  // the hash before it (the model's identity for the first)
    std::vector<int32_t> tokens;
    int32_t page;
    uint64_t used;  // when last looked up or inserted (higher: more recent)
  };
  uint64_t chain(uint64_t parent, const int32_t* tokens) const;  // h(b)
  const Block* find(uint64_t h, uint64_t parent, const int32_t* tokens) const;
  PagedKvCache& pool_;
  uint64_t model_id_;
  DiskCache* disk_ = nullptr;
  uint64_t clock_ = 0;
  std::unordered_map<uint64_t, Block> blocks_;
};

}  // namespace dsv3::serve
