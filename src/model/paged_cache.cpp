// The paged latent cache (see paged_cache.h).
#include "model/paged_cache.h"

#include "core/error.h"

namespace dsv3 {

PagedKvCache::PagedKvCache(const ModelConfig& c, int64_t pages, int64_t layers)
    : storage_(c, std::max<int64_t>(pages, 1) * kPageTokens, layers) {
  if (pages < 1) fail("paged KV cache: at least one page is needed, not ", pages);
  refs_.assign(size_t(pages), 0);
  for (int64_t p = pages - 1; p >= 0; --p) free_.push_back(int32_t(p));
}

int32_t PagedKvCache::allocate() {
  if (free_.empty())
    fail("KV cache full: all ", pages(), " pages (", pages() * kPageTokens, " positions) are in use");
  const int32_t p = free_.back();
  free_.pop_back();
  refs_[size_t(p)] = 1;
  return p;
}

void PagedKvCache::retain(int32_t page) {
  if (refs_.at(size_t(page)) < 1) fail("paged KV cache: page ", page, " is free");
  ++refs_[size_t(page)];
}

void PagedKvCache::release(int32_t page) {
  if (refs_.at(size_t(page)) < 1) fail("paged KV cache: page ", page, " is already free");
  if (--refs_[size_t(page)] == 0) free_.push_back(page);
}

void extend(PagedKvCache& cache, PageTable& t, int64_t n) {
  const int64_t P = PagedKvCache::kPageTokens;
  for (int64_t pos = t.length; pos < t.length + n; ++pos) {
    const size_t page = size_t(pos / P);
    if (page == t.pages.size()) {
      t.pages.push_back(cache.allocate());
    } else if (pos % P == 0 || pos == t.length) {  // the first write into an existing page
      const int32_t old = t.pages[page];
      if (cache.refs(old) > 1) {  // shared with a fork: copy before writing
        const int32_t mine = cache.allocate();
        cache.copy_page(old, mine);
        cache.release(old);
        t.pages[page] = mine;
      }
    }
  }
  t.length += n;
}

void truncate(PagedKvCache& cache, PageTable& t, int64_t length) {
  if (length < 0 || length > t.length) fail("paged KV cache: cannot truncate ", t.length, " positions to ", length);
  const size_t keep = size_t((length + PagedKvCache::kPageTokens - 1) / PagedKvCache::kPageTokens);
  while (t.pages.size() > keep) cache.release(t.pages.back()), t.pages.pop_back();
  t.length = length;
}

PageTable fork(PagedKvCache& cache, const PageTable& t) {
  for (int32_t p : t.pages) cache.retain(p);
  return t;
}

void release(PagedKvCache& cache, PageTable& t) {
  for (int32_t p : t.pages) cache.release(p);
  t.pages.clear(), t.length = 0;
}

void paged_rows(const PageTable* const* tables, const int64_t* pos, int64_t n, TokenRows& rows, KeyGather& gather) {
  rows.pos.resize(size_t(n)), rows.row.resize(size_t(n));
  gather.rows.clear();
  gather.keys.pos.resize(size_t(n)), gather.keys.row.resize(size_t(n));
  int64_t base = 0;
  for (int64_t i = 0; i < n;) {
    const PageTable* t = tables[i];
    int64_t end = i, last = -1;
    while (end < n && tables[end] == t) last = std::max(last, pos[end]), ++end;
    if (last >= t->length) fail("paged KV cache: position ", last, " is past the ", t->length, " its table holds");
    for (int64_t p = 0; p <= last; ++p) gather.rows.push_back(t->row(p));  // the sequence's keys, in order
    for (int64_t j = i; j < end; ++j) {
      rows.pos[size_t(j)] = pos[j], rows.row[size_t(j)] = t->row(pos[j]);
      gather.keys.pos[size_t(j)] = pos[j], gather.keys.row[size_t(j)] = base + pos[j];
    }
    base += last + 1;
    i = end;
  }
}

}  // namespace dsv3
