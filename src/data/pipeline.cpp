// The corpus -> token shards pipeline (see pipeline.h).
#include "data/pipeline.h"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/shard.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/tokenizer_config.h"

namespace dsv3 {

namespace {

// Writes shards named prefix-00000.bin, prefix-00001.bin, ... of at most max_tokens each.
class ShardSet {
 public:
  ShardSet(std::string dir, std::string prefix, uint32_t vocab_size, uint64_t max_tokens)
      : dir_(std::move(dir)), prefix_(std::move(prefix)), vocab_size_(vocab_size), max_tokens_(max_tokens) {}

  void write(std::span<const int32_t> ids) {
    while (!ids.empty()) {
      if (!current_ || current_->n_tokens() == max_tokens_) open();
      const size_t n = size_t(std::min<uint64_t>(ids.size(), max_tokens_ - current_->n_tokens()));
      current_->write(ids.first(n));
      ids = ids.subspan(n);
    }
  }
  // Finishes the last shard (an empty set still gets one empty shard, so readers find it).
  std::vector<ShardInfo> finish() {
    if (!current_) open();
    close();
    return shards_;
  }
  uint64_t tokens() const {
    uint64_t n = current_ ? current_->n_tokens() : 0;
    for (const ShardInfo& s : shards_) n += s.tokens;
    return n;
  }

 private:
  void open() {
    close();
    char name[64];
    std::snprintf(name, sizeof name, "%s-%05zu.bin", prefix_.c_str(), shards_.size());
    current_ = std::make_unique<ShardWriter>(dir_ + "/" + name, vocab_size_);
    current_name_ = name;
  }
  void close() {
    if (!current_) return;
    current_->finish();
    shards_.push_back({current_name_, current_->n_tokens()});
    current_.reset();
  }

  std::string dir_, prefix_;
  uint32_t vocab_size_;
  uint64_t max_tokens_;
  std::unique_ptr<ShardWriter> current_;
  std::string current_name_;
  std::vector<ShardInfo> shards_;
};

class Progress {
 public:
  explicit Progress(bool on) : on_(on), tty_(on && ::isatty(2)), start_(clock::now()), last_(start_) {}

  // position / total: input bytes (for the bar); text: bytes of text encoded (for MB/s).
  void update(uint64_t position, uint64_t total, uint64_t text, uint64_t tokens, bool final = false) {
    if (!on_) return;
    const auto now = clock::now();
    const double since_last = std::chrono::duration<double>(now - last_).count();
    const double pct = total ? std::min(100.0, 100.0 * double(position) / double(total)) : 100.0;
    if (!final) {
      if (tty_ && since_last < 0.2) return;
      if (!tty_ && pct < next_pct_) return;
    }
    next_pct_ = pct + 10;
    last_ = now;
    const double secs = std::max(1e-9, std::chrono::duration<double>(now - start_).count());
    constexpr int kWidth = 30;
    const int filled = int(pct / 100 * kWidth);
    std::string bar(size_t(filled), '=');
    if (filled < kWidth) bar += '>' + std::string(size_t(kWidth - filled - 1), ' ');
    std::fprintf(stderr, "%s[%s] %5.1f%%  %.1f MB  %.1f MB/s  %llu tokens%s", tty_ ? "\r" : "", bar.c_str(), pct,
                 double(text) / 1e6, double(text) / 1e6 / secs, static_cast<unsigned long long>(tokens),
                 tty_ && !final ? "" : "\n");
    std::fflush(stderr);
  }

 private:
  using clock = std::chrono::steady_clock;
  bool on_, tty_;
  clock::time_point start_, last_;
  double next_pct_ = 0;
};

}  // namespace

DataSummary prepare_data(const DataOptions& o) {
  const auto start = std::chrono::steady_clock::now();
  if (!(o.val_fraction >= 0 && o.val_fraction < 1)) fail("--val-fraction must be in [0, 1), got ", o.val_fraction);
  if (o.shard_tokens == 0) fail("--shard-tokens must be positive");
  Tokenizer tok(o.tokenizer);
  const TokenizerConfig config = load_tokenizer_config(o.tokenizer);
  if (!config.eos_token) fail(config.path, ": has no eos_token (needed between documents)");
  const std::optional<int32_t> eos = tok.token_id(*config.eos_token);
  if (!eos) fail(config.path, ": eos_token \"", *config.eos_token, "\" is not a token of the tokenizer");

  CorpusReader reader(o.inputs, CorpusOptions{.txt_docs = o.txt_docs});
  std::error_code ec;
  std::filesystem::create_directories(o.out, ec);
  if (ec) fail(o.out, ": cannot create folder: ", ec.message());

  DataSummary s;
  s.vocab_size = tok.vocab_size();
  s.eos_id = *eos;
  ShardSet train(o.out, "train", uint32_t(s.vocab_size), o.shard_tokens);
  ShardSet val(o.out, "val", uint32_t(s.vocab_size), o.shard_tokens);
  // Validation is the tail: what follows (1 - f) of the input bytes. A chunk of a .txt
  // document that straddles that point is cut at a safe point there (the cut ends a
  // document); a document delivered whole (.jsonl, line mode) goes to validation whole.
  const uint64_t total = reader.total_size();
  const auto threshold = o.val_fraction > 0 ? uint64_t(double(total) * (1 - o.val_fraction)) : UINT64_MAX;
  bool in_val = false, mid_doc = false;

  EncodeState state;
  const EncodeOptions encode_options{.split_special = true};  // "<｜end▁of▁sentence｜>" in text is text
  std::vector<int32_t> ids;
  std::string text;
  bool doc_end = false;
  uint64_t delivered = 0;
  Progress progress(o.progress);
  const int32_t eos_id = *eos;
  uint64_t before = reader.position();
  while (reader.next(text, doc_end)) {
    const uint64_t after = reader.position();
    std::string_view rest = text;
    if (!in_val && after > threshold) {
      const bool raw_chunk = after - before == text.size();  // a piece of a .txt file (not .jsonl, not a line)
      const size_t cut = raw_chunk && threshold > before ? safe_cut(text, size_t(threshold - before)) : 0;
      if (cut > 0) {
        ids.clear();
        tok.encode(rest.substr(0, cut), encode_options, state, ids);
        train.write(ids);
        rest.remove_prefix(cut);
        mid_doc = true;
      }
      if (mid_doc) {
        train.write(std::span(&eos_id, 1));
        ++s.documents;
      }
      in_val = true;
    }
    ids.clear();
    tok.encode(rest, encode_options, state, ids);
    if (doc_end) ids.push_back(eos_id);
    (in_val ? val : train).write(ids);
    if (doc_end) ++s.documents;
    mid_doc = !doc_end;
    delivered += text.size();
    before = after;
    progress.update(after, total, delivered, train.tokens() + val.tokens());
  }
  progress.update(total, total, delivered, train.tokens() + val.tokens(), true);
  s.text_bytes = delivered;
  s.train = train.finish();
  s.val = val.finish();
  for (const ShardInfo& x : s.train) s.train_tokens += x.tokens;
  for (const ShardInfo& x : s.val) s.val_tokens += x.tokens;
  s.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  nlohmann::ordered_json j;
  j["format"] = "dsv3 token shards";
  j["version"] = kShardVersion;
  j["tokenizer"] = std::filesystem::absolute(o.tokenizer).lexically_normal().string();
  j["vocab_size"] = s.vocab_size;
  j["eos_id"] = s.eos_id;
  j["documents"] = s.documents;
  j["text_bytes"] = s.text_bytes;
  j["val_fraction"] = o.val_fraction;
  auto list = [](const std::vector<ShardInfo>& v) {
    nlohmann::ordered_json a = nlohmann::ordered_json::array();
    for (const ShardInfo& x : v) a.push_back({{"file", x.file}, {"tokens", x.tokens}});
    return a;
  };
  j["train"] = list(s.train);
  j["val"] = list(s.val);
  j["train_tokens"] = s.train_tokens;
  j["val_tokens"] = s.val_tokens;
  j["inputs"] = reader.files();
  const std::string path = o.out + "/data.json";
  std::ofstream out(path + ".tmp", std::ios::trunc);
  out << j.dump(2) << "\n";
  out.close();
  if (!out) fail(path, ".tmp: write failed");
  std::filesystem::rename(path + ".tmp", path, ec);
  if (ec) fail(path, ": cannot rename: ", ec.message());
  return s;
}

}  // namespace dsv3
