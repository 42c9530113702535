// The context cache on disk (see disk_cache.h).
#include "serve/disk_cache.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <unistd.h>

#include "core/error.h"

namespace dsv3::serve {

namespace fs = std::filesystem;

namespace {

constexpr char kMagic[8] = {'d', 's', 'v', '3', 'k', 'v', 'c', '1'};
constexpr int64_t kBlock = PagedKvCache::kPageTokens;

struct Header {
  char magic[8];
  uint64_t model_id, hash, parent;
  uint32_t layers, rank, rope, tokens;
  int32_t ids[kBlock];
};

// A 64-bit checksum over whole words (fast enough for megabytes) and the tail bytes.
uint64_t checksum(const char* p, size_t n) {
  uint64_t h = 0x243f6a8885a308d3ULL ^ n;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    h = (h ^ w) * 0x100000001b3ULL;
    h ^= h >> 29;
  }
  for (; i < n; ++i) h = (h ^ uint8_t(p[i])) * 0x100000001b3ULL;
  return h ^ (h >> 32);
}

uint64_t fnv(const char* p, size_t n, uint64_t h) {
  for (size_t i = 0; i < n; ++i) h = (h ^ uint8_t(p[i])) * 1099511628211ULL;
  return h;
}

// A file that is not a whole block of this model is junk here: it is removed (so that the
// block can be written again) after a warning.
void warn(const std::string& file, const std::string& why) {
  std::fprintf(stderr, "dsv3 serve: warning: context cache file %s skipped and removed: %s\n", file.c_str(), why.c_str());
  std::error_code ec;
  fs::remove(file, ec);
}

}  // namespace

// Bumped whenever the code computing the cached keys changes what it computes (RoPE, MLA, the
// cache's layout): files of an older engine are then in another folder, never used.
constexpr uint64_t kKeysVersion = 1;

uint64_t checkpoint_identity(const std::string& model_dir) {
  uint64_t h = 1469598103934665603ULL ^ kKeysVersion;
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(model_dir))
    if (e.path().filename() == "config.json" || e.path().extension() == ".safetensors") files.push_back(e.path());
  std::sort(files.begin(), files.end());
  std::vector<char> buf(4096);
  for (const fs::path& f : files) {
    std::ifstream in(f, std::ios::binary);
    const uint64_t size = fs::file_size(f);
    const int64_t modified = fs::last_write_time(f).time_since_epoch().count();  // an edit in place
    const std::string name = f.filename().string();
    h = fnv(name.data(), name.size(), h);
    h = fnv(reinterpret_cast<const char*>(&size), sizeof size, h);
    h = fnv(reinterpret_cast<const char*>(&modified), sizeof modified, h);
    uint64_t header = 0;  // a safetensors file: 8 bytes of header length, then the JSON header
    if (f.extension() == ".safetensors" && size >= 8) {
      in.read(reinterpret_cast<char*>(&header), 8);
      header = std::min<uint64_t>(header, size - 8);
      std::vector<char> text(header);
      in.read(text.data(), std::streamsize(header));
      h = fnv(text.data(), text.size(), h);
    } else {
      std::vector<char> text(size);
      in.read(text.data(), std::streamsize(size));
      h = fnv(text.data(), text.size(), h);
      continue;
    }
    const uint64_t data = 8 + header, span = size - data;
    for (int s = 0; s < 64 && span > 0; ++s) {
      in.seekg(std::streamoff(data + span * uint64_t(s) / 64));
      in.read(buf.data(), std::streamsize(std::min<uint64_t>(buf.size(), span)));
      h = fnv(buf.data(), size_t(in.gcount()), h);
      in.clear();
    }
  }
  return h;
}

DiskCache::DiskCache(const std::string& dir, uint64_t model_id, const ModelConfig& c, int64_t max_bytes)
    : model_id_(model_id),
      layers_(c.num_hidden_layers),
      rank_(c.kv_lora_rank),
      rope_(c.qk_rope_head_dim),
      max_bytes_(max_bytes) {
  char name[32];
  std::snprintf(name, sizeof name, "%016llx", (unsigned long long)model_id);
  dir_ = (fs::path(dir) / name).string();
  std::error_code ec;
  fs::create_directories(dir_, ec);
  if (ec || !fs::is_directory(dir_)) fail("--cache-dir: cannot create ", dir_, " (", ec.message(), ")");
  for (const auto& e : fs::directory_iterator(dir_)) {
    if (e.path().extension() == ".tmp") fs::remove(e.path(), ec);  // a write cut short by a crash
    else if (e.is_regular_file()) bytes_ += int64_t(e.file_size());
  }
  thread_ = std::thread([this] { writer(); });
}

DiskCache::~DiskCache() {
  {
    std::lock_guard lock(mutex_);
    stop_ = true;
  }
  changed_.notify_all();
  thread_.join();
}

std::string DiskCache::path(uint64_t hash) const {
  char name[40];
  std::snprintf(name, sizeof name, "/%016llx.kv", (unsigned long long)hash);
  return dir_ + name;
}

void DiskCache::save(uint64_t hash, uint64_t parent, const int32_t* tokens, PagedKvCache& pool, int32_t page) {
  const std::string file = path(hash);
  Header h{};
  std::memcpy(h.magic, kMagic, 8);
  h.model_id = model_id_, h.hash = hash, h.parent = parent;
  h.layers = uint32_t(layers_), h.rank = uint32_t(rank_), h.rope = uint32_t(rope_), h.tokens = uint32_t(kBlock);
  std::copy_n(tokens, kBlock, h.ids);
  const size_t per_layer = size_t(kBlock * (rank_ + rope_)) * sizeof(float);
  std::vector<char> bytes(sizeof h + size_t(layers_) * per_layer + 8);
  std::memcpy(bytes.data(), &h, sizeof h);
  char* out = bytes.data() + sizeof h;
  for (int64_t l = 0; l < layers_; ++l) {
    const LayerCache<float> layer = pool.layer(l);
    const int64_t row = int64_t(page) * kBlock;
    std::memcpy(out, layer.latent + row * rank_, size_t(kBlock * rank_) * sizeof(float)), out += kBlock * rank_ * sizeof(float);
    std::memcpy(out, layer.k_pe + row * rope_, size_t(kBlock * rope_) * sizeof(float)), out += kBlock * rope_ * sizeof(float);
  }
  const uint64_t sum = checksum(bytes.data(), bytes.size() - 8);
  std::memcpy(bytes.data() + bytes.size() - 8, &sum, 8);
  {
    std::lock_guard lock(mutex_);
    if (queue_.size() >= 4096) return;  // the disk is behind: this block stays in memory only
    queue_.emplace_back(file, std::move(bytes));
  }
  changed_.notify_all();
}

bool DiskCache::load(uint64_t hash, uint64_t parent, const int32_t* tokens, PagedKvCache& pool, int32_t page) {
  const std::string file = path(hash);
  std::ifstream in(file, std::ios::binary);
  if (!in) return false;
  const size_t per_layer = size_t(kBlock * (rank_ + rope_)) * sizeof(float);
  const size_t expect = sizeof(Header) + size_t(layers_) * per_layer + 8;
  std::vector<char> bytes(expect + 1);
  in.read(bytes.data(), std::streamsize(bytes.size()));
  const size_t got = size_t(in.gcount());
  Header h;
  if (got < sizeof h) return warn(file, "truncated header"), false;
  std::memcpy(&h, bytes.data(), sizeof h);
  if (std::memcmp(h.magic, kMagic, 8) != 0) return warn(file, "not a dsv3 context cache file"), false;
  if (h.model_id != model_id_) return warn(file, "written for another model"), false;
  if (h.layers != uint32_t(layers_) || h.rank != uint32_t(rank_) || h.rope != uint32_t(rope_) || h.tokens != uint32_t(kBlock))
    return warn(file, "shapes differ from this model's"), false;
  if (got != expect) return warn(file, got < expect ? "truncated" : "longer than its shapes say"), false;
  uint64_t sum;
  std::memcpy(&sum, bytes.data() + expect - 8, 8);
  if (sum != checksum(bytes.data(), expect - 8)) return warn(file, "checksum mismatch (corrupt)"), false;
  if (h.hash != hash || h.parent != parent || !std::equal(tokens, tokens + kBlock, h.ids)) return false;  // another block (hash collision)
  const char* p = bytes.data() + sizeof h;
  for (int64_t l = 0; l < layers_; ++l) {
    const LayerCache<float> layer = pool.layer(l);
    const int64_t row = int64_t(page) * kBlock;
    std::memcpy(layer.latent + row * rank_, p, size_t(kBlock * rank_) * sizeof(float)), p += kBlock * rank_ * sizeof(float);
    std::memcpy(layer.k_pe + row * rope_, p, size_t(kBlock * rope_) * sizeof(float)), p += kBlock * rope_ * sizeof(float);
  }
  return true;
}

void DiskCache::writer() {
  for (;;) {
    std::pair<std::string, std::vector<char>> job;
    {
      std::unique_lock lock(mutex_);
      changed_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, with everything written
      job = std::move(queue_.front());
      queue_.pop_front();
      busy_ = true;
    }
    // A temporary name, then rename: a reader sees the whole file or none.
    const std::string tmp = job.first + "." + std::to_string(::getpid()) + ".tmp";
    bool ok = false;
    if (FILE* f = std::fopen(tmp.c_str(), "wb")) {
      ok = std::fwrite(job.second.data(), 1, job.second.size(), f) == job.second.size();
      ok = (std::fclose(f) == 0) && ok;
    }
    std::error_code ec;
    if (ok) fs::rename(tmp, job.first, ec);
    if (!ok || ec) {
      fs::remove(tmp, ec);
      std::fprintf(stderr, "dsv3 serve: warning: cannot write context cache file %s\n", job.first.c_str());
    }
    bool over = false;
    {
      std::lock_guard lock(mutex_);
      if (ok) ++written_, bytes_ += int64_t(job.second.size());
      over = bytes_ > max_bytes_;
    }
    if (over) trim();
    {
      std::lock_guard lock(mutex_);
      busy_ = false;
    }
    changed_.notify_all();
  }
}

void DiskCache::trim() {
  std::vector<std::pair<fs::file_time_type, fs::path>> files;
  std::error_code ec;
  int64_t total = 0;
  for (const auto& e : fs::directory_iterator(dir_, ec))
    if (e.is_regular_file() && e.path().extension() == ".kv") files.emplace_back(e.last_write_time(), e.path()), total += int64_t(e.file_size());
  std::sort(files.begin(), files.end());
  for (const auto& [when, p] : files) {
    if (total <= max_bytes_ * 9 / 10) break;
    const int64_t size = int64_t(fs::file_size(p, ec));
    if (fs::remove(p, ec)) total -= size;
  }
  std::lock_guard lock(mutex_);
  bytes_ = total;
}

void DiskCache::flush() {
  std::unique_lock lock(mutex_);
  changed_.wait(lock, [&] { return queue_.empty() && !busy_; });
}

int64_t DiskCache::files_written() const {
  std::lock_guard lock(mutex_);
  return written_;
}

}  // namespace dsv3::serve
