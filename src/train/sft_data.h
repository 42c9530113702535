// Supervised fine-tuning data (the post-training issue, item 1): conversations in OpenAI's
// messages format rendered with the checkpoint's chat template, and the loss restricted to
// what the assistant says. The spans are found from the template itself: for each assistant
// message, the conversation up to it is rendered with the generation prompt, and up to and
// including it without; the tokens the second adds to the first are the assistant's (its
// content and the end-of-sentence token the template closes it with), learnt; every other
// token is context, its target ignored (-1). A template whose renderings are not prefixes of
// one another in tokens is an Error (the spans would be ambiguous). One conversation per
// training sequence, padded after its end (targets -1): attention is causal, so nothing of
// a neighbour or of the padding reaches a conversation's tokens, and its loss is the same
// whatever it is batched with (no packing, so no cross-document mask is needed). Uses
// tokenizer (chat template, encoding) and train/training_data.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"
#include "tokenizer/tokenizer_config.h"
#include "train/training_data.h"

namespace dsv3 {

struct SftExample {
  std::vector<int32_t> tokens;   // the rendered conversation
  std::vector<int32_t> targets;  // targets[i]: the token after tokens[i] if the assistant said it, else -1
  int64_t learnt() const;        // targets that count
};

// One conversation ({"messages": [...]} or the array itself); `where` starts error messages
// (the file and line). Roles: system, user, assistant (content a string).
SftExample sft_example(const Tokenizer& tok, const TokenizerConfig& config, const nlohmann::json& conversation,
                       const std::string& where);
// Every conversation of a JSONL file (blank lines skipped); Error naming the line.
std::vector<SftExample> read_sft_file(const Tokenizer& tok, const TokenizerConfig& config, const std::string& path);

// Conversations as training sequences of S tokens, one per sequence, in an epoch order from
// the seed. A conversation longer than S is cut to its first S tokens (truncated() counts
// them); the rest of a sequence is `pad` with no target.
class SftBatches : public TrainingData {
 public:
  SftBatches(std::vector<SftExample> examples, int64_t seq, int32_t pad, uint64_t seed);
  void next_batch(int64_t batch, int32_t* inputs, int32_t* targets, int64_t* lengths = nullptr) override;
  DataPosition position() const override { return order_.position(); }
  void seek(DataPosition p) override { order_.seek(p); }
  int64_t size() const override { return order_.size(); }
  int64_t truncated() const { return truncated_; }

 private:
  std::vector<SftExample> examples_;
  int64_t seq_;
  int32_t pad_;
  EpochOrder order_;
  int64_t truncated_ = 0;
};

}  // namespace dsv3
