// BPE training (see bpe_trainer.h).
#include "tokenizer/bpe_trainer.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <queue>

#include "core/error.h"
#include "tokenizer/byte_level.h"

namespace dsv3 {

using ojson = nlohmann::ordered_json;

const std::vector<std::string>& deepseek_v3_split_patterns() {
  static const std::vector<std::string> p = {
      R"(\p{N}{1,3})",
      "[\u4E00-\u9FA5\u3040-\u309F\u30A0-\u30FF]+",
      "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
  };
  return p;
}

const std::vector<std::string>& default_special_tokens() {
  static const std::vector<std::string> s = {"<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>",
                                             "<｜User｜>", "<｜Assistant｜>"};
  return s;
}

BpeTrainer::BpeTrainer(BpeTrainerOptions options) : options_(std::move(options)) {
  const auto& sp = options_.special_tokens;
  if (sp.size() < 2) fail("BPE trainer: at least two special tokens are needed (BOS and EOS)");
  for (size_t i = 0; i < sp.size(); ++i) {
    if (sp[i].empty()) fail("BPE trainer: special token ", i, " is empty");
    for (size_t j = 0; j < i; ++j)
      if (sp[i] == sp[j]) fail("BPE trainer: special token \"", sp[i], "\" is given twice");
  }
  const int64_t base = int64_t(sp.size()) + 256;
  if (options_.vocab_size < base)
    fail("BPE trainer: vocab size ", options_.vocab_size, " is below the ", base, " ids the special tokens and 256 bytes need");
  if (options_.min_frequency < 1) options_.min_frequency = 1;
  for (const std::string& p : options_.split_patterns) pre_.add_split(p);
}

void BpeTrainer::add_text(std::string_view text) {
  pre_.for_each_piece(text, regex_, [&](std::string_view piece) {
    auto it = counts_.find(std::string(piece));
    if (it == counts_.end())
      counts_.emplace(std::string(piece), 1);
    else
      ++it->second;
    ++n_pieces_;
  });
}

std::string BpeTrainer::train() {
  const auto n_special = int32_t(options_.special_tokens.size());
  // Words: each distinct piece as a sequence of symbol ids, with its count. Sorted so that
  // training does not depend on hash-map order.
  std::vector<std::pair<std::string, uint64_t>> sorted(counts_.begin(), counts_.end());
  std::sort(sorted.begin(), sorted.end());
  std::vector<std::vector<int32_t>> words(sorted.size());
  std::vector<uint64_t> counts(sorted.size());
  for (size_t w = 0; w < sorted.size(); ++w) {
    counts[w] = sorted[w].second;
    for (char ch : sorted[w].first) words[w].push_back(n_special + uint8_t(ch));
  }
  sorted.clear();

  // Symbol strings (byte-level characters), by id.
  std::vector<std::string> strings;
  for (const std::string& s : options_.special_tokens) strings.push_back(s);
  for (int b = 0; b < 256; ++b) strings.push_back(byte_level::utf8_of(uint8_t(b)));

  auto key = [](int32_t a, int32_t b) { return uint64_t(uint32_t(a)) << 32 | uint32_t(b); };
  std::unordered_map<uint64_t, int64_t> pair_count;
  std::unordered_map<uint64_t, std::vector<uint32_t>> where;  // pair -> words holding it (may repeat)
  for (size_t w = 0; w < words.size(); ++w)
    for (size_t i = 0; i + 1 < words[w].size(); ++i) {
      const uint64_t k = key(words[w][i], words[w][i + 1]);
      pair_count[k] += int64_t(counts[w]);
      where[k].push_back(uint32_t(w));
    }
  // Max-heap on (count, smaller pair first); entries go stale and are checked when popped.
  using Entry = std::pair<int64_t, uint64_t>;
  auto less = [](const Entry& a, const Entry& b) { return a.first != b.first ? a.first < b.first : a.second > b.second; };
  std::priority_queue<Entry, std::vector<Entry>, decltype(less)> heap(less);
  for (const auto& [k, c] : pair_count) heap.push({c, k});

  merges_.clear();
  std::vector<uint64_t> touched;
  std::vector<int32_t> merged;
  while (int32_t(strings.size()) < options_.vocab_size && !heap.empty()) {
    const auto [count, k] = heap.top();
    heap.pop();
    auto pc = pair_count.find(k);
    const int64_t now = pc == pair_count.end() ? 0 : pc->second;
    if (now != count) {  // stale
      if (now > 0) heap.push({now, k});
      continue;
    }
    if (uint64_t(count) < options_.min_frequency) break;
    const auto a = int32_t(k >> 32), b = int32_t(k & 0xFFFFFFFFu);
    const auto id = int32_t(strings.size());
    strings.push_back(strings[size_t(a)] + strings[size_t(b)]);
    merges_.emplace_back(strings[size_t(a)], strings[size_t(b)]);

    std::vector<uint32_t> ws = std::move(where[k]);
    where.erase(k);
    std::sort(ws.begin(), ws.end());
    ws.erase(std::unique(ws.begin(), ws.end()), ws.end());
    touched.clear();
    for (uint32_t w : ws) {
      std::vector<int32_t>& word = words[w];
      const auto c = int64_t(counts[w]);
      bool has = false;
      for (size_t i = 0; i + 1 < word.size() && !has; ++i) has = word[i] == a && word[i + 1] == b;
      if (!has) continue;
      for (size_t i = 0; i + 1 < word.size(); ++i) pair_count[key(word[i], word[i + 1])] -= c;
      merged.clear();
      for (size_t i = 0; i < word.size();) {
        if (i + 1 < word.size() && word[i] == a && word[i + 1] == b) {
          merged.push_back(id);
          i += 2;
        } else {
          merged.push_back(word[i++]);
        }
      }
      word.swap(merged);
      for (size_t i = 0; i + 1 < word.size(); ++i) {
        const uint64_t p = key(word[i], word[i + 1]);
        pair_count[p] += c;
        if (word[i] == id || word[i + 1] == id) {
          where[p].push_back(w);
          touched.push_back(p);
        }
      }
    }
    pair_count.erase(k);
    std::sort(touched.begin(), touched.end());
    touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
    for (uint64_t p : touched)
      if (pair_count[p] > 0) heap.push({pair_count[p], p});
  }

  // tokenizer.json in the layout of DeepSeek-V3's.
  ojson j;
  j["version"] = "1.0";
  j["truncation"] = nullptr;
  j["padding"] = nullptr;
  ojson added = ojson::array();
  for (int32_t i = 0; i < n_special; ++i)
    added.push_back({{"id", i}, {"content", strings[size_t(i)]}, {"single_word", false}, {"lstrip", false},
                     {"rstrip", false}, {"normalized", false}, {"special", true}});
  j["added_tokens"] = added;
  j["normalizer"] = {{"type", "Sequence"}, {"normalizers", ojson::array()}};
  ojson steps = ojson::array();
  for (const std::string& p : options_.split_patterns)
    steps.push_back({{"type", "Split"}, {"pattern", {{"Regex", p}}}, {"behavior", "Isolated"}, {"invert", false}});
  steps.push_back({{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}});
  j["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", steps}};
  j["post_processor"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false}, {"use_regex", true}};
  j["decoder"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}};
  ojson vocab = ojson::object();
  for (size_t i = 0; i < strings.size(); ++i) vocab[strings[i]] = int32_t(i);
  ojson merges = ojson::array();
  for (const auto& [l, r] : merges_) merges.push_back(l + " " + r);
  j["model"] = {{"type", "BPE"},           {"dropout", nullptr},         {"unk_token", nullptr},
                {"continuing_subword_prefix", nullptr}, {"end_of_word_suffix", nullptr}, {"fuse_unk", false},
                {"byte_fallback", false},  {"ignore_merges", false},     {"vocab", vocab},
                {"merges", merges}};
  return j.dump(1);
}

namespace {

void write_text(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail(tmp, ": cannot create");
    out.write(text.data(), std::streamsize(text.size()));
    out.flush();
    if (!out) fail(tmp, ": write failed");
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) fail(path, ": cannot rename from ", tmp, ": ", ec.message());
}

}  // namespace

void write_trained_tokenizer(const std::string& dir, const std::string& tokenizer_json,
                             const std::vector<std::string>& special_tokens) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) fail(dir, ": cannot create folder: ", ec.message());
  write_text(dir + "/tokenizer.json", tokenizer_json);

  const auto has = [&](const std::string& s) {
    return std::find(special_tokens.begin(), special_tokens.end(), s) != special_tokens.end();
  };
  const auto literal = [](const std::string& s) {  // a Jinja string literal's body
    std::string out;
    for (char ch : s) {
      if (ch == '\\' || ch == '\'') out += '\\';
      out += ch;
    }
    return out;
  };
  const std::string user = literal(has("<｜User｜>") ? "<｜User｜>" : "User: ");
  const std::string assistant = literal(has("<｜Assistant｜>") ? "<｜Assistant｜>" : "Assistant: ");
  // DeepSeek-V3's template without tool calls: BOS, the system prompts joined by blank
  // lines, then the turns.
  const std::string chat_template =
      "{% set ns = namespace(system_prompt='', is_first_sp=true) %}"
      "{%- for message in messages %}{%- if message['role'] == 'system' %}"
      "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}"
      "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}"
      "{%- endif %}{%- endfor %}"
      "{{ bos_token }}{{ ns.system_prompt }}"
      "{%- for message in messages %}"
      "{%- if message['role'] == 'user' %}{{ '" + user + "' + message['content'] }}"
      "{%- elif message['role'] == 'assistant' %}{{ '" + assistant + "' + message['content'] + eos_token }}"
      "{%- elif message['role'] != 'system' %}{{ raise_exception('unsupported role: ' + message['role']) }}"
      "{%- endif %}{%- endfor %}"
      "{%- if add_generation_prompt %}{{ '" + assistant + "' }}{%- endif %}";
  ojson c;
  c["add_bos_token"] = true;
  c["add_eos_token"] = false;
  c["bos_token"] = special_tokens.at(0);
  c["eos_token"] = special_tokens.at(1);
  if (special_tokens.size() > 2) c["pad_token"] = special_tokens[2];
  c["clean_up_tokenization_spaces"] = false;
  c["model_max_length"] = 131072;
  c["tokenizer_class"] = "PreTrainedTokenizerFast";
  c["chat_template"] = chat_template;
  write_text(dir + "/tokenizer_config.json", c.dump(2) + "\n");
}

}  // namespace dsv3
