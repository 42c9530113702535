// dsv3 perplexity: the next-token loss and perplexity of a checkpoint over held-out text:
// the validation shards of dsv3 data, the training windows a run has not reached yet, or a
// text file. Windows are drawn as the trainer draws them (train/batch_sampler.h), so that
// `--split val --windows N` scores the windows of the trainer's validation loss. Uses infer
// (the scoring), train (the sampler, the checkpoint's trainer state), data and tokenizer.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/args.h"
#include "cli/commands.h"
#include "core/error.h"
#include "data/shard.h"
#include "infer/perplexity.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/tokenizer_config.h"
#include "train/batch_sampler.h"
#include "train/checkpoint.h"

namespace dsv3::cli {

namespace {

namespace fs = std::filesystem;

struct PerplexityFlags {
  std::string model, data, split = "val", file, csv;
  int64_t seq = 128, windows = 0;
  int threads = 0;
};

// The text of --file as one token stream: BOS first when the tokenizer's config asks for it,
// as dsv3 generate encodes a prompt.
std::vector<uint32_t> encode_file(const std::string& model_dir, const std::string& path) {
  const std::string tok_path = model_dir + "/tokenizer.json";
  if (!fs::exists(tok_path)) fail(model_dir, ": no tokenizer.json, needed to encode --file");
  const Tokenizer tok(tok_path);
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("--file: cannot open ", path);
  std::stringstream ss;
  ss << in.rdbuf();
  std::vector<uint32_t> stream;
  if (fs::exists(model_dir + "/tokenizer_config.json")) {
    const TokenizerConfig tc = load_tokenizer_config(model_dir + "/tokenizer_config.json");
    if (tc.add_bos_token && tc.bos_token)
      if (auto bos = tok.token_id(*tc.bos_token)) stream.push_back(uint32_t(*bos));
  }
  for (int32_t id : tok.encode(ss.str())) stream.push_back(uint32_t(id));
  return stream;
}

void run(const PerplexityFlags& f) {
  set_threads(f.threads);
  if (f.data.empty() == f.file.empty()) fail("give exactly one of --data (token shards) and --file (text)");
  if (!f.file.empty() && f.split != "val") fail("--split applies to --data, not to --file");
  if (f.seq < 1) fail("--seq must be positive, got ", f.seq);
  if (f.windows < 0) fail("--windows must be >= 0 (0: all), got ", f.windows);

  // The token streams and the sampler that visits their windows.
  std::vector<std::unique_ptr<ShardReader>> shards;
  std::vector<uint32_t> text_stream;
  std::vector<std::span<const uint32_t>> streams;
  std::string source;
  if (!f.file.empty()) {
    text_stream = encode_file(f.model, f.file);
    if (int64_t(text_stream.size()) < f.seq + 1)
      fail("--file ", f.file, ": ", text_stream.size(), " tokens, fewer than one window of --seq + 1 = ", f.seq + 1,
           text_stream.size() >= 2 ? cat("; pass --seq ", text_stream.size() - 1, " or less") : std::string());
    streams.push_back(text_stream);
    source = f.file;
  } else {
    if (!fs::is_directory(f.data)) fail("--data: ", f.data, " is not a folder of token shards");
    shards = open_shards(f.data, f.split == "val" ? "val" : "train");
    if (shards.empty())
      fail("--data: ", f.data, " has no ", f.split == "val" ? "val" : "train", "-*.bin shards (make them with dsv3 data)");
    for (const auto& s : shards) streams.push_back(s->tokens());
    source = f.data + " (" + f.split + ")";
  }
  // The checkpoint's trainer state, when a dsv3 train run wrote it: its step for --csv, and
  // for --split unseen the run's sampler and position.
  std::optional<TrainerState> st;
  if (fs::exists(f.model + "/trainer_state.json")) st = read_trainer_state(f.model);
  if (f.split == "unseen") {
    if (!st) fail("--split unseen: ", f.model, " has no trainer_state.json (not a dsv3 train checkpoint)");
    if (st->seq == 0 || st->data_windows == 0)
      fail("--split unseen: ", f.model, "/trainer_state.json does not record the run's seq and data_windows (a "
           "checkpoint older than both), so its unseen windows cannot be told");
    if (st->seq != f.seq) fail("--split unseen: the run trained on windows of ", st->seq, " tokens; pass --seq ", st->seq);
  }
  // The windows the run that wrote this checkpoint would train on next: its sampler, at its
  // saved position; only in the first epoch are they unseen. Otherwise the trainer's
  // validation order (seed 0) from the start.
  const bool unseen = f.split == "unseen";
  BatchSampler sampler(streams, f.seq, unseen ? st->seed : 0);  // throws when the data holds no window
  int64_t available = sampler.windows();
  if (unseen) {
    if (st->data_windows != sampler.windows())
      fail("--split unseen: the run's training data had ", st->data_windows, " windows, ", f.data, " has ",
           sampler.windows(), ": not the data this run trained on");
    if (st->data.epoch > 0)
      fail("--split unseen: the run is in epoch ", st->data.epoch + 1, " and has trained on every window");
    sampler.seek(st->data);
    available -= st->data.index;  // > 0: seek() allows index < windows only
  }
  const int64_t n = f.windows > 0 ? std::min(f.windows, available) : available;

  Transformer model(f.model);
  for (const auto& s : shards)
    if (s->header().vocab_size > uint32_t(model.config().vocab_size))
      fail(s->path(), ": token ids up to ", s->header().vocab_size, " but the model's vocab_size is ",
           model.config().vocab_size);
  std::fprintf(stderr, "dsv3 perplexity: %s on %s: %ld windows, each scoring %ld tokens\n", f.model.c_str(),
               source.c_str(), long(n), long(f.seq));
  if (!f.file.empty() && int64_t(text_stream.size()) > sampler.windows() * f.seq + 1)
    std::fprintf(stderr, "the last %ld tokens of the text do not fill a window and are not scored\n",
                 long(int64_t(text_stream.size()) - 1 - sampler.windows() * f.seq));

  WindowScorer scorer(model, f.seq);
  std::vector<int32_t> inputs(size_t(f.seq)), targets(size_t(f.seq)), window(size_t(f.seq + 1));
  std::vector<double> losses;
  const bool tty = isatty(STDERR_FILENO);
  const auto t0 = std::chrono::steady_clock::now();
  int64_t next_report = 0;
  for (int64_t w = 0; w < n; ++w) {
    sampler.next_batch(1, inputs.data(), targets.data());
    std::copy(inputs.begin(), inputs.end(), window.begin());
    window.back() = targets.back();
    losses.push_back(scorer.loss(window));
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (w + 1 == n || (tty ? secs >= double(next_report) * 0.2 : (w + 1) * 10 / n > (w * 10) / n)) {
      next_report = int64_t(secs / 0.2) + 1;
      const PerplexityResult r = summarize_windows(losses, f.seq);
      const int width = 24, filled = int(double(width) * double(w + 1) / double(n));
      std::fprintf(stderr, "%s%ld/%ld [%s%s] loss %.4f ppl %.2f | %.0f tok/s | ETA %s%s", tty ? "\r" : "", long(w + 1),
                   long(n), std::string(size_t(filled), '#').c_str(), std::string(size_t(width - filled), '.').c_str(),
                   r.loss, r.perplexity, double(r.tokens) / secs,
                   format_duration(secs / double(w + 1) * double(n - w - 1)).c_str(),
                   tty ? (w + 1 < n ? "\033[K" : "\033[K\n") : "\n");
    }
  }
  const PerplexityResult r = summarize_windows(losses, f.seq);
  // One row per checkpoint, with the training step, so that dsv3 plot can group and compare
  // these files as it does metrics.csv (a run folder's heldout.csv, say).
  const int64_t step = st ? st->step : 0;
  char line[256];
  std::snprintf(line, sizeof(line), "%ld,%ld,%ld,%.6f,%.6f,%.4f\n", long(step), long(r.tokens), long(r.windows), r.loss,
                r.loss_se, r.perplexity);
  if (!f.csv.empty()) {
    const std::string tmp = f.csv + ".tmp";
    {
      std::ofstream out(tmp, std::ios::trunc);
      out << "step,tokens,windows,loss,loss_se,perplexity\n" << line;
      if (!out.flush()) fail("--csv: cannot write ", tmp);
    }
    std::error_code ec;
    fs::rename(tmp, f.csv, ec);
    if (ec) fail("--csv: cannot rename ", tmp, " to ", f.csv, ": ", ec.message());
  }
  nlohmann::ordered_json out = {{"model", f.model},      {"source", source},   {"step", step},
                                 {"windows", r.windows}, {"tokens", r.tokens}, {"loss", r.loss},
                                 {"loss_se", r.loss_se}, {"perplexity", r.perplexity}};
  std::printf("%s\n", out.dump().c_str());
}

}  // namespace

void add_perplexity(CLI::App& app) {
  auto f = std::make_shared<PerplexityFlags>();
  CLI::App* cmd = app.add_subcommand(
      "perplexity", "Next-token loss and perplexity of a checkpoint on held-out data (token shards or a text file)");
  cmd->add_option("--model,-m", f->model, "checkpoint folder")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--data,-d", f->data, "folder of token shards from dsv3 data");
  cmd->add_option("--split", f->split,
                  "with --data: val (the validation shards), train, or unseen (the training windows the run that "
                  "wrote the checkpoint has not reached: held-out data from the training distribution)")
      ->check(CLI::IsMember({"val", "train", "unseen"}))
      ->capture_default_str();
  cmd->add_option("--file,-f", f->file, "text file, encoded with the checkpoint's tokenizer.json");
  cmd->add_option("--seq", f->seq, "tokens per window (each window scores this many next tokens)")->capture_default_str();
  cmd->add_option("--windows", f->windows, "windows scored, in the trainer's order (0: all)")->capture_default_str();
  cmd->add_option("--csv", f->csv, "also write step,tokens,windows,loss,loss_se,perplexity to this CSV (for dsv3 plot)");
  cmd->add_option("--threads,-t", f->threads, "CPU threads (default: all)");
  cmd->callback([f] { run(*f); });
}

}  // namespace dsv3::cli
