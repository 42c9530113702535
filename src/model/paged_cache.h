// The latent KV cache in pages (the batched engine's, issue 13): one pool of fixed-size pages
// of 64 positions (DeepSeek's context-cache granularity), each page holding every layer's
// latent and RoPE key for its positions; a sequence owns a page table. Pages are
// reference-counted: a fork shares all of its parent's pages, and a shared page is copied
// only when a sequence writes into it (its last, partial page). Finished sequences return
// their pages. MLA reads a sequence's keys through a KeyGather (mla.h). Uses model only.
#pragma once
#include <cstdint>
#include <vector>

#include "model/mla.h"
#include "model/transformer.h"

namespace dsv3 {

class PagedKvCache {
 public:
  static constexpr int64_t kPageTokens = 64;
  // layers < 0: the main model's num_hidden_layers.
  PagedKvCache(const ModelConfig& c, int64_t pages, int64_t layers = -1);
  int64_t pages() const { return int64_t(refs_.size()); }
  int64_t free_pages() const { return int64_t(free_.size()); }
  // A page with one holder; Error naming the pool's size when every page is in use.
  int32_t allocate();
  void retain(int32_t page);   // one holder more (a fork)
  void release(int32_t page);  // one holder less; free at none
  int32_t refs(int32_t page) const { return refs_.at(size_t(page)); }
  void copy_page(int32_t from, int32_t to) { storage_.copy_rows(from * kPageTokens, to * kPageTokens, kPageTokens); }
  // The whole pool as one cache: row page * 64 + offset.
  LayerCache<float> layer(int64_t l) { return storage_.layer(l); }
  KvCache& rows() { return storage_; }

 private:
  KvCache storage_;
  std::vector<int32_t> refs_, free_;
};

// One sequence's pages, in position order, and how many positions are written.
struct PageTable {
  std::vector<int32_t> pages;
  int64_t length = 0;
  int64_t row(int64_t pos) const {
    return int64_t(pages[size_t(pos / PagedKvCache::kPageTokens)]) * PagedKvCache::kPageTokens +
           pos % PagedKvCache::kPageTokens;
  }
};

// Makes positions [t.length, t.length + n) writable (pages allocated; a shared page about to
// be written copied first) and counts them written.
void extend(PagedKvCache& cache, PageTable& t, int64_t n);
// Keeps positions [0, length) and returns the pages past them (rejected speculative drafts).
void truncate(PagedKvCache& cache, PageTable& t, int64_t length);
// A table sharing every page of t (one holder more each).
PageTable fork(PagedKvCache& cache, const PageTable& t);
// Returns t's pages to the pool; t is empty after.
void release(PagedKvCache& cache, PageTable& t);

// A pass over tokens of several sequences: token i is at position pos[i] of the sequence whose
// table is tables[i] (a sequence's tokens consecutive, its table extended past them). Fills the
// tokens' cache rows (to write) and the key gather MLA reads through.
void paged_rows(const PageTable* const* tables, const int64_t* pos, int64_t n, TokenRows& rows, KeyGather& gather);

}  // namespace dsv3
