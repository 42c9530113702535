// The context cache on disk (`dsv3 serve --cache-dir`), so that cached prefixes outlive the
// process as DeepSeek's do: one file per 64-token block, named by its chained hash, under a
// folder named by the checkpoint's identity. A file holds a header (format, the model's
// identity, the block's hash, its parent's hash, the shapes, its 64 tokens), the keys of
// every layer for those positions (the latent and the RoPE key, float32) and a checksum of
// all before it. Files are written by a background thread to a temporary name and renamed,
// so a reader sees a whole file or none; a corrupt, truncated or foreign file is skipped
// with a warning and never gives a wrong answer. The oldest files go when the folder
// exceeds its byte budget. A block's earlier tokens are covered by its chained 64-bit hash
// (its parent's), its own tokens compared. Uses model (the page pool).
#pragma once
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "model/config.h"
#include "model/paged_cache.h"

namespace dsv3::serve {

// A checkpoint folder's identity: the version of the code that computes keys, config.json,
// and per safetensors file its name, size, modification time, header and 64 samples of its
// bytes (hashing all of a 700 GB checkpoint would take minutes; two trained checkpoints
// differ in every sample, and a file edited in place has a new time). A copied checkpoint
// (new times) misses the cache once; it never hits on another's keys.
uint64_t checkpoint_identity(const std::string& model_dir);

class DiskCache {
 public:
  DiskCache(const std::string& dir, uint64_t model_id, const ModelConfig& c, int64_t max_bytes);
  ~DiskCache();  // writes what is queued first
  DiskCache(const DiskCache&) = delete;
  DiskCache& operator=(const DiskCache&) = delete;

  // Queues the block in pool page `page` for writing (again, if its file exists: a block is
  // saved as it enters the memory cache, not when it was read from disk, so a damaged file
  // that broke a chain before it is replaced).
  void save(uint64_t hash, uint64_t parent, const int32_t* tokens, PagedKvCache& pool, int32_t page);
  // Reads the block into `page`; false if there is no file, or (with a warning) if it is
  // not a whole file of this model (then removed, so that the block can be written again).
  bool load(uint64_t hash, uint64_t parent, const int32_t* tokens, PagedKvCache& pool, int32_t page);
  void flush();  // returns once every queued file is written
  int64_t files_written() const;

 private:
  std::string path(uint64_t hash) const;
  void writer();
  void trim();  // deletes the oldest files while the folder exceeds max_bytes_
  std::string dir_;
  uint64_t model_id_;
  int64_t layers_, rank_, rope_, max_bytes_, bytes_ = 0;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<std::pair<std::string, std::vector<char>>> queue_;
  bool stop_ = false, busy_ = false;
  int64_t written_ = 0;
  std::thread thread_;
};

}  // namespace dsv3::serve
