// dsv3 data / train-tokenizer: corpora into token shards, and a byte-level BPE tokenizer
// learnt from a corpus.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <memory>

#include "cli/commands.h"
#include "core/error.h"
#include "data/pipeline.h"
#include "tokenizer/bpe_trainer.h"
#include "tokenizer/corpus.h"
#include "tokenizer/tokenizer.h"

namespace dsv3::cli {

namespace {

TxtDocs txt_docs_of(const std::string& s) { return s == "line" ? TxtDocs::line : TxtDocs::file; }

struct DataFlags {
  std::string tokenizer, out, txt_docs = "file";
  std::vector<std::string> inputs;
  double val_fraction = 0.01;
  uint64_t shard_tokens = uint64_t(1) << 27;
  bool quiet = false;
};

void run_data(const DataFlags& f) {
  const DataSummary s = prepare_data({.tokenizer = f.tokenizer,
                                      .inputs = f.inputs,
                                      .out = f.out,
                                      .val_fraction = f.val_fraction,
                                      .shard_tokens = f.shard_tokens,
                                      .txt_docs = txt_docs_of(f.txt_docs),
                                      .progress = !f.quiet});
  std::printf("%llu documents, %.1f MB of text -> %llu train tokens in %zu shard(s), %llu validation tokens; "
              "%s/data.json (%.1f s, %.1f MB/s)\n",
              static_cast<unsigned long long>(s.documents), double(s.text_bytes) / 1e6,
              static_cast<unsigned long long>(s.train_tokens), s.train.size(), static_cast<unsigned long long>(s.val_tokens),
              f.out.c_str(), s.seconds, double(s.text_bytes) / 1e6 / std::max(s.seconds, 1e-9));
}

struct TrainFlags {
  std::vector<std::string> inputs, special;
  std::string out, txt_docs = "file";
  int32_t vocab_size = 4096;
  uint64_t min_frequency = 2;
};

void run_train(const TrainFlags& f) {
  const auto start = std::chrono::steady_clock::now();
  BpeTrainerOptions options;
  options.vocab_size = f.vocab_size;
  if (!f.special.empty()) options.special_tokens = f.special;
  options.min_frequency = f.min_frequency;
  BpeTrainer trainer(options);
  CorpusReader reader(f.inputs, CorpusOptions{.txt_docs = txt_docs_of(f.txt_docs)});
  std::string text;
  bool doc_end = false;
  while (reader.next(text, doc_end)) trainer.add_text(text);
  const std::string json = trainer.train();
  write_trained_tokenizer(f.out, json, options.special_tokens);
  Tokenizer check(f.out);  // what was written must load
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("learnt %zu merges from %.1f MB (%zu distinct pieces); vocabulary %d; wrote %s/tokenizer.json and "
              "tokenizer_config.json (%.1f s)\n",
              trainer.merges().size(), double(reader.text_bytes()) / 1e6, trainer.n_unique_pieces(), check.vocab_size(),
              f.out.c_str(), secs);
}

}  // namespace

void add_data(CLI::App& app) {
  auto f = std::make_shared<DataFlags>();
  CLI::App* cmd = app.add_subcommand("data", "Tokenize a corpus into training and validation token shards");
  cmd->add_option("--tokenizer", f->tokenizer, "folder with tokenizer.json and tokenizer_config.json")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--input,-i", f->inputs, ".txt / .jsonl files (optionally .gz) or folders of them")->required();
  cmd->add_option("--out,-o", f->out, "output folder")->required();
  cmd->add_option("--val-fraction", f->val_fraction, "fraction of the text (its tail) held out for validation (default 0.01)");
  cmd->add_option("--shard-tokens", f->shard_tokens, "tokens per shard at most (default 134217728)");
  cmd->add_option("--txt-docs", f->txt_docs, "a .txt document is the whole file (default) or each line")->check(CLI::IsMember({"file", "line"}));
  cmd->add_flag("--quiet,-q", f->quiet, "no progress bar");
  cmd->callback([f] { run_data(*f); });
}

void add_train_tokenizer(CLI::App& app) {
  auto f = std::make_shared<TrainFlags>();
  CLI::App* cmd = app.add_subcommand("train-tokenizer", "Learn a byte-level BPE tokenizer from a corpus");
  cmd->add_option("--input,-i", f->inputs, ".txt / .jsonl files (optionally .gz) or folders of them")->required();
  cmd->add_option("--vocab-size", f->vocab_size, "vocabulary size: special tokens + 256 bytes + merges (default 4096)");
  cmd->add_option("--out,-o", f->out, "output folder for tokenizer.json and tokenizer_config.json")->required();
  cmd->add_option("--special", f->special, "special tokens, BOS and EOS first (default: DeepSeek-V3's BOS, EOS, pad, User, Assistant)");
  cmd->add_option("--min-frequency", f->min_frequency, "do not merge pairs seen fewer times (default 2)");
  cmd->add_option("--txt-docs", f->txt_docs, "a .txt document is the whole file (default) or each line")->check(CLI::IsMember({"file", "line"}));
  cmd->callback([f] { run_train(*f); });
}

}  // namespace dsv3::cli
