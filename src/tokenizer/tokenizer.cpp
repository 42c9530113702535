// tokenizer.json loading, added-token matching, encode and decode (see tokenizer.h).
#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <array>
#include <bitset>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <sys/stat.h>
#include <unordered_map>

#include "core/error.h"
#include "tokenizer/byte_level.h"

namespace dsv3 {

using json = nlohmann::json;

namespace {

// The GPT-2 regex that a ByteLevel pre-tokenizer with use_regex applies.
constexpr char kGpt2Pattern[] = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// A byte trie of added-token contents: leftmost-longest search, as aho-corasick's
// MatchKind::LeftmostLongest in the tokenizers library.
class TokenTrie {
 public:
  void add(std::string_view s, int32_t token) {
    int32_t node = 0;
    for (char ch : s) {
      const auto b = uint8_t(ch);
      int32_t child = -1;
      for (const auto& [eb, en] : nodes_[size_t(node)].edges)
        if (eb == b) child = en;
      if (child < 0) {
        child = int32_t(nodes_.size());
        nodes_[size_t(node)].edges.emplace_back(b, child);
        nodes_.emplace_back();
      }
      node = child;
    }
    nodes_[size_t(node)].token = token;
    first_[uint8_t(s[0])] = true;
    ++n_tokens_;
  }
  bool empty() const { return n_tokens_ == 0; }

  struct Match {
    size_t begin = 0, end = 0;
    int32_t token = -1;
  };
  // The leftmost match starting at or after `from` (the longest there); false if none.
  bool find(std::string_view s, size_t from, Match& m) const {
    for (size_t i = from; i < s.size(); ++i) {
      if (!first_[uint8_t(s[i])]) continue;
      int32_t node = 0, best = -1;
      size_t best_end = 0;
      for (size_t j = i; j < s.size(); ++j) {
        const auto b = uint8_t(s[j]);
        int32_t child = -1;
        for (const auto& [eb, en] : nodes_[size_t(node)].edges)
          if (eb == b) {
            child = en;
            break;
          }
        if (child < 0) break;
        node = child;
        if (nodes_[size_t(node)].token >= 0) best = nodes_[size_t(node)].token, best_end = j + 1;
      }
      if (best >= 0) {
        m = {i, best_end, best};
        return true;
      }
    }
    return false;
  }

 private:
  struct Node {
    int32_t token = -1;
    std::vector<std::pair<uint8_t, int32_t>> edges;
  };
  std::vector<Node> nodes_{Node{}};
  std::bitset<256> first_;
  size_t n_tokens_ = 0;
};

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, ": cannot open");
  std::ostringstream ss;
  ss << in.rdbuf();
  if (!in && !in.eof()) fail(path, ": read error");
  return ss.str();
}

// Typed access to JSON fields; errors name the file and the field path.
struct Fields {
  const std::string& what;

  const json& at(const json& j, const char* key, const std::string& where) const {
    if (!j.is_object()) fail(what, ": ", where, " is not an object");
    auto it = j.find(key);
    if (it == j.end()) fail(what, ": ", where.empty() ? "" : where + ".", key, " is missing");
    return *it;
  }
  const json* opt(const json& j, const char* key) const {
    auto it = j.find(key);
    return it == j.end() || it->is_null() ? nullptr : &*it;
  }
  bool flag(const json& j, const char* key, bool fallback, const std::string& where) const {
    const json* v = opt(j, key);
    if (!v) return fallback;
    if (!v->is_boolean()) fail(what, ": ", where, ".", key, " is not true or false");
    return v->get<bool>();
  }
  std::string str(const json& j, const char* key, const std::string& where) const {
    const json& v = at(j, key, where);
    if (!v.is_string()) fail(what, ": ", where, ".", key, " is not a string");
    return v.get<std::string>();
  }
  [[noreturn]] void unsupported(const std::string& where, const std::string& thing) const {
    fail(what, ": ", where, ": ", thing, " is not supported");
  }
};

}  // namespace

struct Tokenizer::Impl {
  std::string what;
  Bpe bpe;
  PreTokenizer pre;
  std::vector<AddedToken> added;  // in tokenizer.json order
  TokenTrie trie_raw, trie_normalized;
  std::unordered_map<std::string, int32_t> ids_by_content;  // vocabulary strings, then added tokens
  std::vector<uint8_t> special;                             // per id
  std::string dec_bytes;                                    // every id's bytes, concatenated
  std::vector<uint32_t> dec_offset;                         // id -> [offset[id], offset[id + 1]); holes have length 0
  std::vector<uint8_t> present;                             // per id: has a token
  mutable EncodeState state;                                // for the convenience overload

  void load(const json& j);
  void load_pre_tokenizer(const json& p, const std::string& where, bool& byte_level);
  void load_normalizer(const json& n, const std::string& where);
  void load_decoder(const json& d, const std::string& where);
};

void Tokenizer::Impl::load_normalizer(const json& n, const std::string& where) {
  Fields f{what};
  if (n.is_null()) return;
  const std::string type = f.str(n, "type", where);
  if (type != "Sequence") f.unsupported(where, "normalizer type '" + type + "' (only none or an empty Sequence)");
  const json& list = f.at(n, "normalizers", where);
  if (!list.is_array()) fail(what, ": ", where, ".normalizers is not an array");
  for (size_t i = 0; i < list.size(); ++i) load_normalizer(list[i], where + ".normalizers[" + std::to_string(i) + "]");
}

void Tokenizer::Impl::load_decoder(const json& d, const std::string& where) {
  Fields f{what};
  if (d.is_null()) return;
  const std::string type = f.str(d, "type", where);
  if (type == "ByteLevel") return;
  if (type == "Sequence") {
    const json& list = f.at(d, "decoders", where);
    if (!list.is_array()) fail(what, ": ", where, ".decoders is not an array");
    for (size_t i = 0; i < list.size(); ++i) load_decoder(list[i], where + ".decoders[" + std::to_string(i) + "]");
    return;
  }
  f.unsupported(where, "decoder type '" + type + "' (only ByteLevel)");
}

void Tokenizer::Impl::load_pre_tokenizer(const json& p, const std::string& where, bool& byte_level) {
  Fields f{what};
  const std::string type = f.str(p, "type", where);
  if (byte_level) f.unsupported(where, "a pre-tokenizer step after ByteLevel");
  if (type == "Sequence") {
    const json& list = f.at(p, "pretokenizers", where);
    if (!list.is_array()) fail(what, ": ", where, ".pretokenizers is not an array");
    for (size_t i = 0; i < list.size(); ++i)
      load_pre_tokenizer(list[i], where + ".pretokenizers[" + std::to_string(i) + "]", byte_level);
  } else if (type == "Split") {
    const json& pattern = f.at(p, "pattern", where);
    std::string regex;
    if (const json* r = f.opt(pattern, "Regex"); r && r->is_string()) {
      regex = r->get<std::string>();
    } else if (const json* s = f.opt(pattern, "String"); s && s->is_string()) {
      for (char ch : s->get<std::string>()) {  // escape ASCII punctuation: a literal match
        if (uint8_t(ch) < 0x80 && !std::isalnum(uint8_t(ch))) regex += '\\';
        regex += ch;
      }
    } else {
      fail(what, ": ", where, ".pattern has neither a Regex nor a String");
    }
    const std::string behavior = f.str(p, "behavior", where);
    if (behavior != "Isolated") f.unsupported(where, "Split behavior '" + behavior + "' (only Isolated)");
    if (f.flag(p, "invert", false, where)) f.unsupported(where, "Split with invert true");
    try {
      pre.add_split(regex);
    } catch (const Error& e) {
      fail(what, ": ", where, ": ", e.what());
    }
  } else if (type == "ByteLevel") {
    if (f.flag(p, "add_prefix_space", true, where)) f.unsupported(where, "ByteLevel add_prefix_space true");
    if (f.flag(p, "use_regex", true, where)) pre.add_split(kGpt2Pattern);
    byte_level = true;
  } else {
    f.unsupported(where, "pre-tokenizer type '" + type + "'");
  }
}

void Tokenizer::Impl::load(const json& j) {
  Fields f{what};
  if (!j.is_object()) fail(what, ": not a JSON object");
  const json& model = f.at(j, "model", "");
  if (!model.is_object()) fail(what, ": model is not an object");
  const json* type = f.opt(model, "type");
  if (type && (!type->is_string() || type->get<std::string>() != "BPE"))
    fail(what, ": model.type ", type->dump(), " is not supported (only BPE)");
  if (f.flag(model, "byte_fallback", false, "model")) f.unsupported("model", "byte_fallback true");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (const json* v = f.opt(model, key); v && !(v->is_string() && v->get<std::string>().empty()))
      f.unsupported("model", std::string(key) + " " + v->dump());
  if (const json* v = f.opt(model, "dropout"); v && !(v->is_number() && v->get<double>() == 0.0))
    f.unsupported("model", "dropout " + v->dump());
  const bool ignore_merges = f.flag(model, "ignore_merges", false, "model");

  // Vocabulary: string -> id.
  const json& vocab = f.at(model, "vocab", "model");
  if (!vocab.is_object()) fail(what, ": model.vocab is not an object");
  std::unordered_map<std::string, int32_t> vocab_ids;
  vocab_ids.reserve(vocab.size());
  std::vector<const std::string*> strings;  // id -> vocabulary string
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 || it.value().get<int64_t>() >= INT32_MAX)
      fail(what, ": model.vocab[\"", it.key(), "\"] is not an id (a non-negative integer)");
    const auto id = it.value().get<int32_t>();
    auto [pos, inserted] = vocab_ids.emplace(it.key(), id);
    if (size_t(id) >= strings.size()) strings.resize(size_t(id) + 1, nullptr);
    if (strings[size_t(id)]) fail(what, ": model.vocab: id ", id, " is given to both \"", *strings[size_t(id)], "\" and \"", it.key(), "\"");
    strings[size_t(id)] = &pos->first;
  }

  // The 256 byte tokens (ByteLevel: every byte must have one, there is no unknown token).
  std::array<int32_t, 256> byte_ids{};
  for (int b = 0; b < 256; ++b) {
    auto it = vocab_ids.find(byte_level::utf8_of(uint8_t(b)));
    if (it == vocab_ids.end()) fail(what, ": model.vocab has no token for byte 0x", std::hex, b, " ('", byte_level::utf8_of(uint8_t(b)), "'); a byte-level BPE needs all 256");
    byte_ids[size_t(b)] = it->second;
  }

  // Merges, by rank.
  const json& merges_json = f.at(model, "merges", "model");
  if (!merges_json.is_array()) fail(what, ": model.merges is not an array");
  std::vector<BpeMerge> merges;
  merges.reserve(merges_json.size());
  std::string left, right;
  for (size_t r = 0; r < merges_json.size(); ++r) {
    const json& m = merges_json[r];
    if (m.is_string()) {
      const std::string& s = m.get_ref<const std::string&>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        fail(what, ": model.merges[", r, "] \"", s, "\" is not two tokens separated by one space");
      left = s.substr(0, sp);
      right = s.substr(sp + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      left = m[0].get<std::string>();
      right = m[1].get<std::string>();
    } else {
      fail(what, ": model.merges[", r, "] is neither \"left right\" nor [left, right]");
    }
    auto l = vocab_ids.find(left), rr = vocab_ids.find(right), mm = vocab_ids.find(left + right);
    if (l == vocab_ids.end()) fail(what, ": model.merges[", r, "] refers to \"", left, "\", which is not in the vocabulary");
    if (rr == vocab_ids.end()) fail(what, ": model.merges[", r, "] refers to \"", right, "\", which is not in the vocabulary");
    if (mm == vocab_ids.end()) fail(what, ": model.merges[", r, "]: the merged token \"", left + right, "\" is not in the vocabulary");
    merges.push_back({l->second, rr->second, mm->second});
  }

  std::unordered_map<std::string, int32_t> whole_pieces;
  if (ignore_merges)
    for (const auto& [s, id] : vocab_ids) {
      std::string bytes;
      if (byte_level::decode(s, bytes)) whole_pieces.emplace(bytes, id);
    }
  bpe = Bpe(byte_ids, merges, std::move(whole_pieces));

  // Added tokens.
  std::vector<std::string> by_id(strings.size());
  for (size_t id = 0; id < strings.size(); ++id)
    if (strings[id]) by_id[id] = *strings[id];
  present.assign(strings.size(), 0);
  for (size_t id = 0; id < strings.size(); ++id) present[id] = strings[id] != nullptr;
  ids_by_content = std::move(vocab_ids);
  if (const json* list = f.opt(j, "added_tokens")) {
    if (!list->is_array()) fail(what, ": added_tokens is not an array");
    for (size_t i = 0; i < list->size(); ++i) {
      const json& t = (*list)[i];
      const std::string where = "added_tokens[" + std::to_string(i) + "]";
      if (!t.is_object()) fail(what, ": ", where, " is not an object");
      const json& idj = f.at(t, "id", where);
      if (!idj.is_number_integer() || idj.get<int64_t>() < 0 || idj.get<int64_t>() >= INT32_MAX)
        fail(what, ": ", where, ".id is not a non-negative integer");
      AddedToken a;
      a.id = idj.get<int32_t>();
      a.content = f.str(t, "content", where);
      if (a.content.empty()) fail(what, ": ", where, ".content is empty");
      a.special = f.flag(t, "special", false, where);
      a.normalized = f.flag(t, "normalized", !a.special, where);
      for (const char* key : {"lstrip", "rstrip", "single_word"})
        if (f.flag(t, key, false, where)) f.unsupported(where, "\"" + a.content + "\" with " + key + " true");
      const size_t id = size_t(a.id);
      if (id >= by_id.size()) {
        by_id.resize(id + 1);
        present.resize(id + 1, 0);
      }
      if (present[id] && by_id[id] != a.content)
        fail(what, ": ", where, ": id ", a.id, " of \"", a.content, "\" is already the token \"", by_id[id], "\"");
      auto [pos, inserted] = ids_by_content.emplace(a.content, a.id);
      if (!inserted && pos->second != a.id)
        fail(what, ": ", where, ": \"", a.content, "\" has id ", a.id, " but also id ", pos->second);
      by_id[id] = a.content;
      present[id] = 1;
      (a.normalized ? trie_normalized : trie_raw).add(a.content, int32_t(added.size()));
      added.push_back(std::move(a));
    }
  }

  // Pipeline steps around the model.
  load_normalizer(j.contains("normalizer") ? j["normalizer"] : json(), "normalizer");
  bool byte_level = false;
  if (const json* p = f.opt(j, "pre_tokenizer")) load_pre_tokenizer(*p, "pre_tokenizer", byte_level);
  if (!byte_level) f.unsupported("pre_tokenizer", "a tokenizer without a ByteLevel pre-tokenizer");
  load_decoder(j.contains("decoder") ? j["decoder"] : json(), "decoder");

  // Decoding table: a token's bytes through the ByteLevel decoder; a token holding a
  // character outside the byte map (the special tokens) is its own UTF-8, as in the
  // tokenizers library.
  special.assign(by_id.size(), 0);
  for (const AddedToken& a : added) special[size_t(a.id)] = a.special;
  dec_offset.assign(by_id.size() + 1, 0);
  std::string bytes;
  for (size_t id = 0; id < by_id.size(); ++id) {
    dec_offset[id] = uint32_t(dec_bytes.size());
    if (!present[id]) continue;
    if (byte_level::decode(by_id[id], bytes))
      dec_bytes += bytes;
    else
      dec_bytes += by_id[id];
  }
  dec_offset[by_id.size()] = uint32_t(dec_bytes.size());
}

Tokenizer::Tokenizer() : impl_(std::make_unique<Impl>()) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer::Tokenizer(const std::string& path) : Tokenizer() {
  struct stat st {};
  const std::string file = ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode) ? path + "/tokenizer.json" : path;
  *this = from_json(read_file(file), file);
}

Tokenizer Tokenizer::from_json(std::string_view json_text, const std::string& what) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {
    fail(what, ": not valid JSON: ", e.what());
  }
  Tokenizer t;
  t.impl_->what = what;
  t.impl_->load(j);
  return t;
}

void Tokenizer::encode_ordinary(std::string_view text, EncodeState& state, std::vector<int32_t>& out) const {
  const Impl& m = *impl_;
  if (state.cache.owner() != &m) state.cache.reset(&m);  // a cache holds one tokenizer's pieces
  m.pre.for_each_piece(text, state.regex, [&](std::string_view piece) {
    if (state.cache.find(piece, out)) return;
    const size_t n0 = out.size();
    m.bpe.encode(piece, state.scratch, out);
    state.cache.insert(piece, out.data() + n0, out.size() - n0);
  });
}

void Tokenizer::encode(std::string_view text, const EncodeOptions& options, EncodeState& state, std::vector<int32_t>& out) const {
  const Impl& m = *impl_;
  // Splits s on the tokens of trie: gaps go to on_gap, tokens to out. A token marked special
  // is left in the gap text under split_special (the search goes on after it).
  auto split = [&](const TokenTrie& trie, std::string_view s, auto&& on_gap) {
    if (trie.empty()) {
      on_gap(s);
      return;
    }
    size_t gap = 0, from = 0;
    TokenTrie::Match match;
    while (from < s.size() && trie.find(s, from, match)) {
      const AddedToken& a = m.added[size_t(match.token)];
      from = match.end;
      if (options.split_special && a.special) continue;
      if (match.begin > gap) on_gap(s.substr(gap, match.begin - gap));
      out.push_back(a.id);
      gap = match.end;
    }
    if (gap < s.size()) on_gap(s.substr(gap));
  };
  split(m.trie_raw, text, [&](std::string_view gap) {
    split(m.trie_normalized, gap, [&](std::string_view rest) { encode_ordinary(rest, state, out); });
  });
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, const EncodeOptions& options) const {
  std::vector<int32_t> out;
  encode(text, options, impl_->state, out);
  return out;
}

std::string_view Tokenizer::token_bytes(int32_t id) const {
  const Impl& m = *impl_;
  if (id < 0 || size_t(id) >= m.present.size() || !m.present[size_t(id)])
    fail(m.what, ": token id ", id, id < 0 || size_t(id) >= m.present.size() ? " is outside the vocabulary" : " has no token");
  return std::string_view(m.dec_bytes).substr(m.dec_offset[size_t(id)], m.dec_offset[size_t(id) + 1] - m.dec_offset[size_t(id)]);
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  std::string out;
  for (int32_t id : ids) {
    std::string_view b = token_bytes(id);
    if (skip_special && impl_->special[size_t(id)]) continue;
    out += b;
  }
  return out;
}

int32_t Tokenizer::vocab_size() const { return int32_t(impl_->present.size()); }

std::optional<int32_t> Tokenizer::token_id(std::string_view content) const {
  auto it = impl_->ids_by_content.find(std::string(content));
  if (it == impl_->ids_by_content.end()) return std::nullopt;
  return it->second;
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && size_t(id) < impl_->special.size() && impl_->special[size_t(id)];
}

const std::vector<AddedToken>& Tokenizer::added_tokens() const { return impl_->added; }
const Bpe& Tokenizer::bpe() const { return impl_->bpe; }

}  // namespace dsv3
