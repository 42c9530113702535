// Streaming corpus reading (see corpus.h).
#include "tokenizer/corpus.h"

#include <zlib.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace dsv3 {

namespace fs = std::filesystem;

namespace {

bool ends_with(const std::string& s, const char* suffix) { return s.ends_with(suffix); }
bool is_gz(const std::string& p) { return ends_with(p, ".gz"); }
bool is_jsonl(const std::string& p) { return ends_with(p, ".jsonl") || ends_with(p, ".jsonl.gz"); }
bool is_corpus_file(const std::string& p) {
  return ends_with(p, ".txt") || ends_with(p, ".txt.gz") || ends_with(p, ".jsonl") || ends_with(p, ".jsonl.gz");
}

}  // namespace

std::vector<std::string> corpus_files(const std::vector<std::string>& inputs) {
  std::vector<std::string> files;
  if (inputs.empty()) fail("no corpus inputs given");
  for (const std::string& in : inputs) {
    std::error_code ec;
    const fs::file_status st = fs::status(in, ec);
    if (ec || !fs::exists(st)) fail(in, ": no such file or folder");
    if (fs::is_directory(st)) {
      std::vector<std::string> found;
      for (const auto& e : fs::recursive_directory_iterator(in, fs::directory_options::follow_directory_symlink))
        if (e.is_regular_file() && is_corpus_file(e.path().string())) found.push_back(e.path().string());
      if (found.empty()) fail(in, ": folder holds no .txt, .jsonl, .txt.gz or .jsonl.gz files");
      std::sort(found.begin(), found.end());
      files.insert(files.end(), found.begin(), found.end());
    } else {
      if (!is_corpus_file(in)) fail(in, ": not a corpus file (expected .txt, .jsonl, .txt.gz or .jsonl.gz)");
      files.push_back(in);
    }
  }
  return files;
}

size_t safe_cut(std::string_view text, size_t limit) {
  if (text.empty()) return 0;
  limit = std::min(limit, text.size() - 1);
  for (size_t p = limit; p > 0; --p) {
    if (text[p - 1] != '\n') continue;
    const auto c = uint8_t(text[p]);
    if (c > 0x20 && c < 0x7F) return p;
  }
  return 0;
}

// One open file: plain (stdio) or gzip (zlib), read in blocks.
struct CorpusReader::Source {
  std::string path;
  FILE* plain = nullptr;
  gzFile gz = nullptr;

  explicit Source(const std::string& p) : path(p) {
    if (is_gz(p)) {
      gz = gzopen(p.c_str(), "rb");
      if (!gz) fail(p, ": cannot open");
      gzbuffer(gz, 256 * 1024);
    } else {
      plain = std::fopen(p.c_str(), "rb");
      if (!plain) fail(p, ": cannot open");
    }
  }
  ~Source() {
    if (plain) std::fclose(plain);
    if (gz) gzclose(gz);
  }
  // Appends up to n bytes to out; returns how many (0 at the end).
  size_t read(std::string& out, size_t n) {
    const size_t old = out.size();
    out.resize(old + n);
    size_t got;
    if (gz) {
      const int r = gzread(gz, out.data() + old, unsigned(n));
      if (r < 0) {
        int err = 0;
        const char* msg = gzerror(gz, &err);
        fail(path, ": gzip read error: ", msg ? msg : "?");
      }
      got = size_t(r);
    } else {
      got = std::fread(out.data() + old, 1, n, plain);
      if (got < n && std::ferror(plain)) fail(path, ": read error");
    }
    out.resize(old + got);
    return got;
  }
};

CorpusReader::CorpusReader(const std::vector<std::string>& inputs, CorpusOptions options)
    : files_(corpus_files(inputs)), options_(options) {
  if (options_.chunk_bytes < 1024) options_.chunk_bytes = 1024;
  for (const std::string& f : files_) {
    const auto size = uint64_t(fs::file_size(f));
    uint64_t text = size;
    if (is_gz(f) && size >= 18) {  // ISIZE: the last 4 bytes, little-endian
      FILE* fp = std::fopen(f.c_str(), "rb");
      uint8_t b[4] = {};
      if (fp && std::fseek(fp, -4, SEEK_END) == 0 && std::fread(b, 1, 4, fp) == 4)
        text = uint64_t(b[0]) | uint64_t(b[1]) << 8 | uint64_t(b[2]) << 16 | uint64_t(b[3]) << 24;
      if (fp) std::fclose(fp);
    }
    total_size_ += text;
  }
}

CorpusReader::~CorpusReader() = default;

const std::string& CorpusReader::current_file() const {
  static const std::string none;
  return source_ ? source_->path : none;
}

uint64_t CorpusReader::position() const { return done_size_ + file_read_ - (buf_.size() - buf_pos_); }

bool CorpusReader::open_next_file() {
  done_size_ += file_read_;
  file_read_ = 0;
  source_.reset();
  buf_.clear();
  buf_pos_ = 0;
  line_no_ = 0;
  if (file_index_ >= files_.size()) return false;
  source_ = std::make_unique<Source>(files_[file_index_++]);
  eof_ = false;
  return true;
}

bool CorpusReader::fill() {
  if (eof_) return false;
  if (buf_pos_ > 0) {
    buf_.erase(0, buf_pos_);
    buf_pos_ = 0;
  }
  const size_t got = source_->read(buf_, options_.chunk_bytes);
  file_read_ += got;
  if (got == 0) eof_ = true;
  return !eof_;
}

bool CorpusReader::next_line(std::string& line) {
  while (true) {
    const size_t nl = buf_.find('\n', buf_pos_);
    if (nl != std::string::npos) {
      line.assign(buf_, buf_pos_, nl - buf_pos_);
      buf_pos_ = nl + 1;
      ++line_no_;
      return true;
    }
    if (!fill()) {
      if (buf_pos_ >= buf_.size()) return false;
      line.assign(buf_, buf_pos_, std::string::npos);
      buf_pos_ = buf_.size();
      ++line_no_;
      return true;
    }
  }
}

bool CorpusReader::next(std::string& text, bool& doc_end) {
  while (true) {
    if (!source_ || (eof_ && buf_pos_ >= buf_.size())) {
      if (!open_next_file()) return false;
      continue;
    }
    const std::string& path = source_->path;
    if (is_jsonl(path)) {
      std::string line;
      if (!next_line(line)) {
        eof_ = true;
        buf_pos_ = buf_.size();
        continue;
      }
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& e) {
        fail(path, ": line ", line_no_, ": not valid JSON: ", e.what());
      }
      if (!j.is_object() || !j.contains("text") || !j["text"].is_string())
        fail(path, ": line ", line_no_, ": not an object with a \"text\" string");
      text = j["text"].get<std::string>();
      if (text.empty()) continue;
      doc_end = true;
      text_bytes_ += text.size();
      return true;
    }
    if (options_.txt_docs == TxtDocs::line) {
      if (!next_line(text)) {
        eof_ = true;
        buf_pos_ = buf_.size();
        continue;
      }
      if (!text.empty() && text.back() == '\r') text.pop_back();
      if (text.empty()) continue;
      doc_end = true;
      text_bytes_ += text.size();
      return true;
    }
    // A whole .txt file is one document: deliver it in chunks cut at safe points.
    const size_t chunk = options_.chunk_bytes;
    while (!eof_ && buf_.size() - buf_pos_ <= chunk) fill();
    size_t avail = buf_.size() - buf_pos_;
    if (avail == 0) continue;  // the file is done
    size_t cut = avail;
    if (!(eof_ && avail <= chunk)) {
      cut = safe_cut(std::string_view(buf_).substr(buf_pos_), chunk);
      // No safe point in the first chunk_bytes: look further (reading up to 64 chunks ahead).
      for (size_t from = chunk; cut == 0;) {
        const std::string_view rest = std::string_view(buf_).substr(buf_pos_);
        for (size_t p = std::max<size_t>(from, 1); p + 1 <= rest.size() - 1 && cut == 0; ++p)
          if (rest[p - 1] == '\n' && uint8_t(rest[p]) > 0x20 && uint8_t(rest[p]) < 0x7F) cut = p;
        if (cut || eof_ || rest.size() >= 64 * chunk) break;
        from = rest.size() - 1;
        fill();
      }
      avail = buf_.size() - buf_pos_;
      if (cut == 0) {
        if (eof_) {
          cut = avail;
        } else {  // text with no safe point for 64 chunks: cut at a character boundary
          cut = chunk;
          while (cut < avail && (uint8_t(buf_[buf_pos_ + cut]) & 0xC0) == 0x80) ++cut;
        }
      }
    }
    text.assign(buf_, buf_pos_, cut);
    buf_pos_ += cut;
    doc_end = eof_ && buf_pos_ >= buf_.size();
    text_bytes_ += text.size();
    return true;
  }
}

}  // namespace dsv3
