// Streaming detokenization with stop strings and reasoning (see text_stream.h).
#include "serve/text_stream.h"

#include <algorithm>
#include <utility>

namespace dsv3::serve {

namespace {

constexpr const char* kThinkOpen = "<think>";
constexpr const char* kThinkClose = "</think>";

// The longest suffix of s[from, end) that is a proper prefix of one of the strings.
size_t held_suffix(const std::string& s, size_t from, size_t end, const std::vector<std::string>& strings) {
  size_t held = 0;
  for (const std::string& w : strings)
    for (size_t k = std::min(w.size() - 1, end - from); k > held; --k)
      if (s.compare(end - k, k, w, 0, k) == 0) {
        held = k;
        break;
      }
  return held;
}

}  // namespace

size_t complete_utf8(const std::string& s) {
  const size_t n = s.size();
  for (size_t back = 1; back <= 3 && back <= n; ++back) {
    const unsigned char ch = static_cast<unsigned char>(s[n - back]);
    if ((ch & 0xC0) == 0x80) continue;  // a continuation byte
    const size_t need = ch >= 0xF0 ? 4 : ch >= 0xE0 ? 3 : ch >= 0xC0 ? 2 : 1;
    return need > back ? n - back : n;
  }
  return n;
}

TextStream::TextStream(const Tokenizer* tokenizer, std::vector<std::string> stop, bool skip_special, bool reasoning,
                       bool thinking, std::vector<int32_t> keep, std::vector<std::string> hold)
    : tokenizer_(tokenizer),
      stop_(std::move(stop)),
      keep_(std::move(keep)),
      hold_(std::move(hold)),
      skip_special_(skip_special),
      reasoning_(reasoning),
      thinking_(thinking),
      decided_(thinking) {
  std::erase_if(stop_, [](const std::string& s) { return s.empty(); });
}

bool TextStream::push(int32_t token) {
  if (stopped_) return false;
  ++tokens_;
  const bool kept = std::find(keep_.begin(), keep_.end(), token) != keep_.end();
  if (tokenizer_ && token < tokenizer_->vocab_size() && !(skip_special_ && tokenizer_->is_special(token) && !kept))
    text_ += tokenizer_->token_bytes(token);
  // A stop string can only start in text not yet released (held_suffix keeps its beginning).
  size_t first = std::string::npos;
  for (const std::string& w : stop_) first = std::min(first, text_.find(w, sent_));
  if (first != std::string::npos) {
    text_.resize(first);
    stopped_ = true;
    release(first);
    return false;
  }
  const size_t end = complete_utf8(text_);
  release(end - std::max(held_suffix(text_, sent_, end, stop_), held_suffix(text_, sent_, end, hold_)));
  return true;
}

void TextStream::finish() {
  finished_ = true;
  release(text_.size());
}

void TextStream::release(size_t end) {
  const bool final = finished_ || stopped_;
  std::string piece = partial_;
  if (end > sent_) piece.append(text_, sent_, end - sent_), sent_ = end;
  partial_.clear();
  if (!reasoning_) {
    content_ += piece;
    return;
  }
  const std::string open = kThinkOpen, close = kThinkClose;
  if (!decided_) {  // the output's start: an opening "<think>" enters the reasoning part
    if (piece.size() < open.size() && open.compare(0, piece.size(), piece) == 0 && !final) {
      partial_ = piece;
      return;
    }
    decided_ = true;
    if (piece.compare(0, open.size(), open) == 0) thinking_ = true, piece.erase(0, open.size());
  }
  if (thinking_) {
    const size_t at = piece.find(close);
    if (at == std::string::npos) {
      const size_t held = final ? 0 : held_suffix(piece, 0, piece.size(), {close});
      reasoning_text_.append(piece, 0, piece.size() - held);
      partial_ = piece.substr(piece.size() - held);
      return;
    }
    reasoning_text_.append(piece, 0, at);
    piece.erase(0, at + close.size());
    thinking_ = false, after_reasoning_ = true;
  }
  if (after_reasoning_) {  // DeepSeek-R1 writes "\n\n" between the reasoning and the answer
    piece.erase(0, std::min(piece.size(), piece.find_first_not_of('\n')));
    if (!piece.empty()) after_reasoning_ = false;
  }
  content_ += piece;
}

std::string TextStream::take_content() { return std::exchange(content_, std::string()); }
std::string TextStream::take_reasoning() { return std::exchange(reasoning_text_, std::string()); }

}  // namespace dsv3::serve
