// A choice's tokens as text, sent as soon as it is safe: a UTF-8 character split across
// tokens waits for its last byte, and text that may be the start of a stop string waits until
// it is not. When a stop string appears, the text before it is the last sent (OpenAI's rule:
// the stop string itself is not returned). A reasoning model's `<think>...</think>` part is
// split off as DeepSeek's API does (reasoning_content). Uses the tokenizer.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace dsv3::serve {

class TextStream {
 public:
  // skip_special: special tokens (EOS, chat markers) add no text. thinking: the output
  // starts inside a reasoning part (the prompt ended with "<think>").
  // keep: special tokens written as text all the same (a tool call's markup). hold: strings
  // released only whole (text that may begin one waits), so that the reader finds them in
  // one piece (the tool-call markup, when the model spells it in bytes).
  TextStream(const Tokenizer* tokenizer, std::vector<std::string> stop, bool skip_special = true,
             bool reasoning = false, bool thinking = false, std::vector<int32_t> keep = {},
             std::vector<std::string> hold = {});
  // Adds a token. Returns false once a stop string has appeared (later tokens are ignored).
  bool push(int32_t token);
  // All text is final (the choice finished): nothing is held back any more.
  void finish();
  // The text ready since the last take: the answer's, and the reasoning's.
  std::string take_content();
  std::string take_reasoning();
  bool stopped() const { return stopped_; }
  int64_t tokens() const { return tokens_; }  // pushed before the stop

 private:
  void release(size_t end);  // moves text_[sent_, end) out, splitting off reasoning
  const Tokenizer* tokenizer_;
  std::vector<std::string> stop_;
  std::vector<int32_t> keep_;
  std::vector<std::string> hold_;
  bool skip_special_, reasoning_, thinking_, stopped_ = false, finished_ = false;
  bool decided_;                  // whether the output opened with "<think>" is known
  bool after_reasoning_ = false;  // newlines right after "</think>" are dropped
  std::string text_;  // every byte so far
  size_t sent_ = 0;   // bytes of text_ released
  std::string content_, reasoning_text_, partial_;  // released, not yet taken; a held tag
  int64_t tokens_ = 0;
};

// The length of the longest prefix of s that does not end inside a UTF-8 sequence.
size_t complete_utf8(const std::string& s);

}  // namespace dsv3::serve
