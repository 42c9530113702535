// A servable model folder for tests that need text: the golden tiny-v3-bf16 checkpoint
// (vocabulary 500, an MTP module) with a 500-token tokenizer learnt from the bundled corpus
// (DSV3_CORPUS), made once per test program in its temporary folder.
#pragma once
#include <unistd.h>

#include <filesystem>
#include <string>

#include "golden_util.h"
#include "malformed_util.h"
#include "tokenizer/bpe_trainer.h"
#include "tokenizer/corpus.h"

namespace dsv3::test {

// tiny-v3-bf16 (vocabulary 500, an MTP module) with a tokenizer of exactly 500 ids.
inline const std::string& servable_model() {
  static const std::string dir = [] {
    const std::string d = testing::TempDir() + "/dsv3_servable_" + std::to_string(::getpid());
    std::filesystem::create_directories(d);
    BpeTrainer trainer(BpeTrainerOptions{.vocab_size = 500});
    CorpusReader reader({DSV3_CORPUS});
    std::string chunk;
    bool doc_end = false;
    while (reader.next(chunk, doc_end)) trainer.add_text(chunk);
    write_trained_tokenizer(d, trainer.train(), default_special_tokens());
    for (const char* f : {"config.json", "model.safetensors"})
      std::filesystem::copy_file(golden_dir("tiny-v3-bf16") + "/" + f, d + "/" + f, std::filesystem::copy_options::overwrite_existing);
    return d;
  }();
  return dir;
}

}  // namespace dsv3::test
