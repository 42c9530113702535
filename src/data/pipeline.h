// The data pipeline behind `dsv3 data`: a corpus (.txt / .jsonl, optionally .gz, files or
// folders) streamed through the tokenizer into token shards, with EOS after every document
// and the tail of the corpus held out as validation. Depends on tokenizer and core.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "tokenizer/corpus.h"

namespace dsv3 {

struct DataOptions {
  std::string tokenizer;                 // folder with tokenizer.json and tokenizer_config.json (its eos_token)
  std::vector<std::string> inputs;       // files and folders
  std::string out;                       // output folder (created)
  double val_fraction = 0.01;            // the last fraction of the text goes to validation
  uint64_t shard_tokens = uint64_t(1) << 27;  // tokens per shard at most (512 MiB)
  TxtDocs txt_docs = TxtDocs::file;
  bool progress = true;                  // a progress bar with MB/s on stderr
};

struct ShardInfo {
  std::string file;  // name inside the output folder
  uint64_t tokens = 0;
};

struct DataSummary {
  std::vector<ShardInfo> train, val;
  uint64_t train_tokens = 0, val_tokens = 0;
  uint64_t documents = 0, text_bytes = 0;
  int32_t vocab_size = 0, eos_id = 0;
  double seconds = 0;
};

// Runs the pipeline; writes out/train-NNNNN.bin, out/val-NNNNN.bin and out/data.json (the
// summary, listing the shards). Throws Error naming the file and problem.
DataSummary prepare_data(const DataOptions& options);

}  // namespace dsv3
