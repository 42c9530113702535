// Token shard writing and reading (see shard.h).
#include "data/shard.h"

#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "core/error.h"

namespace dsv3 {

namespace {

static_assert(std::endian::native == std::endian::little, "shards are little-endian; this code assumes a little-endian host");

void put_u32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }
void put_u64(uint8_t* p, uint64_t v) { std::memcpy(p, &v, 8); }
uint32_t get_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
uint64_t get_u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

void encode_header(uint8_t* h, uint32_t vocab_size, uint64_t n_tokens) {
  std::memset(h, 0, kShardHeaderBytes);
  std::memcpy(h, kShardMagic, 8);
  put_u32(h + 8, kShardVersion);
  put_u32(h + 12, kShardHeaderBytes);
  put_u32(h + 16, vocab_size);
  put_u64(h + 24, n_tokens);
}

}  // namespace

ShardWriter::ShardWriter(std::string path, uint32_t vocab_size)
    : path_(std::move(path)), tmp_(path_ + ".tmp"), vocab_size_(vocab_size) {
  if (vocab_size_ == 0) fail(path_, ": vocab size must be positive");
  file_ = std::fopen(tmp_.c_str(), "wb");
  if (!file_) fail(tmp_, ": cannot create: ", std::strerror(errno));
  uint8_t h[kShardHeaderBytes];
  encode_header(h, vocab_size_, 0);
  if (std::fwrite(h, 1, sizeof h, file_) != sizeof h) fail(tmp_, ": write failed");
  buffer_.reserve(1 << 16);
}

ShardWriter::~ShardWriter() {
  if (file_) {
    std::fclose(file_);
    std::remove(tmp_.c_str());
  }
}

void ShardWriter::write(std::span<const int32_t> ids) {
  for (int32_t id : ids) {
    if (id < 0 || uint32_t(id) >= vocab_size_) fail(path_, ": token id ", id, " is outside the vocabulary [0, ", vocab_size_, ")");
    buffer_.push_back(uint32_t(id));
    if (buffer_.size() == buffer_.capacity()) flush();
  }
  n_tokens_ += ids.size();
}

void ShardWriter::flush() {
  if (buffer_.empty()) return;
  if (std::fwrite(buffer_.data(), 4, buffer_.size(), file_) != buffer_.size()) fail(tmp_, ": write failed: ", std::strerror(errno));
  buffer_.clear();
}

void ShardWriter::finish() {
  if (!file_) fail(path_, ": shard already finished");
  flush();
  uint8_t h[kShardHeaderBytes];
  encode_header(h, vocab_size_, n_tokens_);
  if (std::fseek(file_, 0, SEEK_SET) != 0 || std::fwrite(h, 1, sizeof h, file_) != sizeof h || std::fflush(file_) != 0 ||
      ::fsync(fileno(file_)) != 0)
    fail(tmp_, ": write failed: ", std::strerror(errno));
  std::fclose(file_);
  file_ = nullptr;
  std::error_code ec;
  std::filesystem::rename(tmp_, path_, ec);
  if (ec) fail(path_, ": cannot rename from ", tmp_, ": ", ec.message());
}

ShardReader::ShardReader(const std::string& path, bool check_ids) : file_(path) {
  const uint8_t* d = file_.data();
  const size_t size = file_.size();
  if (size < kShardHeaderBytes) fail(path, ": ", size, " bytes is too short for a token shard header (", kShardHeaderBytes, ")");
  if (std::memcmp(d, kShardMagic, 8) != 0) fail(path, ": not a dsv3 token shard (bad magic)");
  header_.version = get_u32(d + 8);
  if (header_.version != kShardVersion) fail(path, ": shard version ", header_.version, " is not supported (only ", kShardVersion, ")");
  const uint32_t header_bytes = get_u32(d + 12);
  if (header_bytes != kShardHeaderBytes) fail(path, ": header size ", header_bytes, " (expected ", kShardHeaderBytes, ")");
  header_.vocab_size = get_u32(d + 16);
  if (header_.vocab_size == 0) fail(path, ": vocab size is 0");
  header_.n_tokens = get_u64(d + 24);
  const uint64_t want = uint64_t(kShardHeaderBytes) + header_.n_tokens * 4;
  if (header_.n_tokens > (uint64_t(1) << 61) || want != size)
    fail(path, ": header says ", header_.n_tokens, " tokens (", want, " bytes) but the file has ", size, " bytes");
  tokens_ = std::span<const uint32_t>(reinterpret_cast<const uint32_t*>(d + kShardHeaderBytes), size_t(header_.n_tokens));
  if (check_ids)
    for (size_t i = 0; i < tokens_.size(); ++i)
      if (tokens_[i] >= header_.vocab_size)
        fail(path, ": token ", i, " is id ", tokens_[i], ", outside the vocabulary [0, ", header_.vocab_size, ")");
}

std::vector<std::unique_ptr<ShardReader>> open_shards(const std::string& dir, const std::string& prefix) {
  std::vector<std::string> paths;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name.rfind(prefix + "-", 0) == 0 && e.path().extension() == ".bin") paths.push_back(e.path().string());
  }
  std::sort(paths.begin(), paths.end());
  std::vector<std::unique_ptr<ShardReader>> out;
  for (const auto& p : paths) out.push_back(std::make_unique<ShardReader>(p));
  return out;
}

}  // namespace dsv3
