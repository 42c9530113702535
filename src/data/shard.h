// Token shards: the training data format (see docs/formats.md). A shard is a 32-byte
// little-endian header, then `n_tokens` uint32 token ids:
//   0  char[8] magic "DSV3TOKS"   8  u32 version (1)     12 u32 header bytes (32)
//   16 u32 vocab_size             20 u32 reserved (0)    24 u64 n_tokens
// Written atomically (temp file, rename); read over mmap with every header field checked.
// Depends on core only.
#pragma once
#include <cstdint>
#include <cstdio>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/mapped_file.h"

namespace dsv3 {

inline constexpr char kShardMagic[8] = {'D', 'S', 'V', '3', 'T', 'O', 'K', 'S'};
inline constexpr uint32_t kShardVersion = 1;
inline constexpr uint32_t kShardHeaderBytes = 32;

struct ShardHeader {
  uint32_t version = kShardVersion;
  uint32_t vocab_size = 0;
  uint64_t n_tokens = 0;
};

// Streams ids into path (through path + ".tmp"); finish() writes the count and renames.
// Destroyed without finish(), it removes the temp file.
class ShardWriter {
 public:
  ShardWriter(std::string path, uint32_t vocab_size);
  ~ShardWriter();
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;

  void write(std::span<const int32_t> ids);  // throws if an id is outside [0, vocab_size)
  void finish();
  uint64_t n_tokens() const { return n_tokens_; }
  const std::string& path() const { return path_; }

 private:
  void flush();
  std::string path_, tmp_;
  uint32_t vocab_size_;
  FILE* file_ = nullptr;
  std::vector<uint32_t> buffer_;
  uint64_t n_tokens_ = 0;
};

class ShardReader {
 public:
  // Maps path and checks the header and the file size; check_ids also checks every id is
  // below vocab_size. Throws Error naming the file and the problem.
  explicit ShardReader(const std::string& path, bool check_ids = false);

  const ShardHeader& header() const { return header_; }
  std::span<const uint32_t> tokens() const { return tokens_; }
  const std::string& path() const { return file_.path(); }

 private:
  MappedFile file_;
  ShardHeader header_;
  std::span<const uint32_t> tokens_;
};

// Every shard PREFIX-*.bin in dir (prefix "train" or "val"), sorted by name.
std::vector<std::unique_ptr<ShardReader>> open_shards(const std::string& dir, const std::string& prefix);

}  // namespace dsv3
