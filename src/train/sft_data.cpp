// SFT conversations and their loss masks (see sft_data.h).
#include "train/sft_data.h"

#include <algorithm>
#include <fstream>

#include "core/error.h"
#include "tokenizer/chat_template.h"

namespace dsv3 {

int64_t SftExample::learnt() const {
  int64_t n = 0;
  for (int32_t t : targets) n += t >= 0;
  return n;
}

SftExample sft_example(const Tokenizer& tok, const TokenizerConfig& config, const nlohmann::json& conversation,
                       const std::string& where) {
  const nlohmann::json& messages = conversation.is_object() && conversation.contains("messages") ? conversation["messages"] : conversation;
  if (!messages.is_array() || messages.empty()) fail(where, ": expected {\"messages\": [...]} with at least one message");
  nlohmann::ordered_json rendered = nlohmann::ordered_json::array();
  bool any_assistant = false;
  for (size_t i = 0; i < messages.size(); ++i) {
    const nlohmann::json& m = messages[i];
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string() || !m.contains("content") || !m["content"].is_string())
      fail(where, ": message ", i, " must be {\"role\": string, \"content\": string}");
    const std::string role = m["role"];
    if (role != "system" && role != "user" && role != "assistant")
      fail(where, ": message ", i, " has the unknown role '", role, "' (system, user, assistant)");
    any_assistant = any_assistant || role == "assistant";
    rendered.push_back({{"role", role}, {"content", m["content"]}});
  }
  if (!any_assistant) fail(where, ": the conversation has no assistant message to learn");
  auto encode = [&](const nlohmann::ordered_json& msgs, bool generation_prompt) {
    return tok.encode(apply_chat_template(config, msgs, generation_prompt));
  };
  SftExample ex;
  ex.tokens = encode(rendered, false);
  ex.targets.assign(ex.tokens.size(), -1);
  for (size_t i = 0; i < rendered.size(); ++i) {
    if (rendered[i]["role"] != "assistant") continue;
    nlohmann::ordered_json before = nlohmann::ordered_json::array(), through = nlohmann::ordered_json::array();
    for (size_t k = 0; k < i; ++k) before.push_back(rendered[k]);
    through = before;
    through.push_back(rendered[i]);
    const auto a = encode(before, true), b = encode(through, false);
    // Both must be prefixes of the whole, and a of b: then b's tail is this message's.
    auto is_prefix = [](const std::vector<int32_t>& p, const std::vector<int32_t>& w) {
      return p.size() <= w.size() && std::equal(p.begin(), p.end(), w.begin());
    };
    if (!is_prefix(a, b) || !is_prefix(b, ex.tokens))
      fail(where, ": the chat template does not render message ", i, " as a continuation of the conversation before it, "
           "so its tokens cannot be told apart");
    // Position j predicts token j + 1: the positions before each of the message's tokens learn it.
    for (size_t j = a.size(); j < b.size(); ++j)
      if (j >= 1) ex.targets[j - 1] = ex.tokens[j];
  }
  return ex;
}

std::vector<SftExample> read_sft_file(const Tokenizer& tok, const TokenizerConfig& config, const std::string& path) {
  std::ifstream in(path);
  if (!in) fail(path, ": cannot read");
  std::vector<SftExample> out;
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = path + " line " + std::to_string(n);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      fail(where, ": not JSON (", e.what(), ")");
    }
    out.push_back(sft_example(tok, config, j, where));
  }
  if (out.empty()) fail(path, ": no conversations");
  return out;
}

SftBatches::SftBatches(std::vector<SftExample> examples, int64_t seq, int32_t pad, uint64_t seed)
    : examples_(std::move(examples)), seq_(seq), pad_(pad), order_(int64_t(examples_.size()), seed) {
  if (seq <= 0) fail("sequence length must be positive");
  for (const SftExample& e : examples_) truncated_ += int64_t(e.tokens.size()) > seq;
}

void SftBatches::next_batch(int64_t batch, int32_t* inputs, int32_t* targets, int64_t* lengths) {
  for (int64_t b = 0; b < batch; ++b) {
    const SftExample& e = examples_[size_t(order_.next())];
    const size_t n = std::min(e.tokens.size(), size_t(seq_));
    if (lengths) lengths[b] = int64_t(n);
    int32_t* in = inputs + b * seq_;
    int32_t* tg = targets + b * seq_;
    std::copy_n(e.tokens.begin(), n, in);
    std::copy_n(e.targets.begin(), n, tg);
    std::fill(in + n, in + seq_, pad_);
    std::fill(tg + n, tg + seq_, -1);
  }
}

}  // namespace dsv3
