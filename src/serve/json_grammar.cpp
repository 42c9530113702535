// JSON grammar, matcher and token constraint (see json_grammar.h).
#include "serve/json_grammar.h"

#include <algorithm>
#include <bit>
#include <set>

#include "core/error.h"
#include "serve/byte_mask.h"

namespace dsv3::serve {

using nlohmann::json;

namespace {

enum Kind : uint8_t { kValue, kObjectFrame, kArrayFrame, kStringFrame, kNumberFrame, kLiteralFrame };
enum ObjectPhase : uint8_t { kOpen, kKey, kColon, kAfter, kNext };
enum NumberPhase : uint8_t { kSign, kZero, kInt, kFrac0, kFrac, kExp0, kExpSign, kExp };
constexpr int kMaxIndent = 16;

const std::vector<std::string> kBooleans = {"true", "false"}, kNullText = {"null"};

// The literals a literal frame matches: count 0 the node's enum, 1 booleans, 2 null.
const std::vector<std::string>& literals(const JsonMatcher::Frame& f) {
  return f.count == 0 ? f.node->literals : f.count == 1 ? kBooleans : kNullText;
}

bool is_space(uint8_t c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }

// One byte of UTF-8 inside a string: st holds the bytes a character still needs (high
// nibble) and the range its next byte must be in (low nibble: 0 80-BF, 1 A0-BF, 2 80-9F,
// 3 90-BF, 4 80-8F), which rules out overlong forms, surrogates and code points past U+10FFFF.
bool utf8_step(uint8_t& st, uint8_t c) {
  if (st) {
    static const uint8_t lo[5] = {0x80, 0xA0, 0x80, 0x90, 0x80}, hi[5] = {0xBF, 0xBF, 0x9F, 0xBF, 0x8F};
    if (c < lo[st & 15] || c > hi[st & 15]) return false;
    const uint8_t rest = uint8_t((st >> 4) - 1);
    st = uint8_t(rest << 4);
    return true;
  }
  if (c < 0x80) return true;
  if (c >= 0xC2 && c <= 0xDF) st = 1 << 4;
  else if (c == 0xE0) st = 2 << 4 | 1;
  else if (c == 0xED) st = 2 << 4 | 2;
  else if (c >= 0xE1 && c <= 0xEF) st = 2 << 4;
  else if (c == 0xF0) st = 3 << 4 | 3;
  else if (c >= 0xF1 && c <= 0xF3) st = 3 << 4;
  else if (c == 0xF4) st = 3 << 4 | 4;
  else return false;
  return true;
}

uint64_t low_bits(size_t n) { return n >= 64 ? ~uint64_t(0) : (uint64_t(1) << n) - 1; }

}  // namespace

// --- The grammar -----------------------------------------------------------------------------

std::shared_ptr<const JsonGrammar> JsonGrammar::any_object() {
  auto g = std::make_shared<JsonGrammar>();
  JsonNode& any = g->nodes_.emplace_back();
  any.additional = any.items = g->any_ = &any;
  JsonNode& root = g->nodes_.emplace_back();
  root.types = JsonNode::kObject, root.additional = &any;
  g->root_ = &root;
  return g;
}

std::shared_ptr<const JsonGrammar> JsonGrammar::from_schema(const json& schema) {
  auto g = std::make_shared<JsonGrammar>();
  JsonNode& any = g->nodes_.emplace_back();
  any.additional = any.items = g->any_ = &any;
  g->root_ = g->compile(schema, "schema", 0);
  return g;
}

const JsonNode* JsonGrammar::compile(const json& s, const std::string& path, int depth) {
  if (depth > 32) fail(path, ": schemas nest at most 32 deep here");
  if (s.is_boolean()) {
    if (!s.get<bool>()) fail(path, ": the schema false allows no value");
    return any_;
  }
  if (!s.is_object()) fail(path, ": a schema must be an object");
  static const std::set<std::string> known = {"type", "properties", "required", "additionalProperties", "items", "minItems",
                                              "maxItems", "enum", "const", "title", "description", "default", "examples",
                                              "$schema", "$comment"};
  for (const auto& [key, v] : s.items())
    if (!known.count(key))
      fail(path, ": '", key, "' is not supported (type, properties, required, additionalProperties, items, minItems, maxItems, "
           "enum, const)");
  JsonNode& n = nodes_.emplace_back();
  n.additional = any_, n.items = any_;
  if (s.contains("type")) {
    static const std::pair<const char*, uint32_t> names[] = {{"object", JsonNode::kObject}, {"array", JsonNode::kArray},
        {"string", JsonNode::kString}, {"number", JsonNode::kNumber | JsonNode::kInteger}, {"integer", JsonNode::kInteger},
        {"boolean", JsonNode::kBoolean}, {"null", JsonNode::kNull}};
    const json types = s["type"].is_array() ? s["type"] : json::array({s["type"]});
    n.types = 0;
    for (const json& t : types) {
      uint32_t bit = 0;
      for (const auto& [name, b] : names)
        if (t.is_string() && t.get<std::string>() == name) bit = b;
      if (!bit) fail(path, ".type: ", t.dump(), " is not a JSON type (object, array, string, number, integer, boolean, null)");
      n.types |= bit;
    }
    if (!n.types) fail(path, ".type: lists no type");
  }
  if (s.contains("enum") || s.contains("const")) {
    const json values = s.contains("const") ? json::array({s["const"]}) : s["enum"];
    if (!values.is_array() || values.empty()) fail(path, ".enum: must be a non-empty array");
    if (values.size() > 64) fail(path, ".enum: at most 64 values, not ", values.size());
    for (const json& v : values) {
      const uint32_t t = v.is_object() ? JsonNode::kObject : v.is_array() ? JsonNode::kArray : v.is_string() ? JsonNode::kString
                         : v.is_boolean() ? JsonNode::kBoolean : v.is_null() ? JsonNode::kNull
                         : v.is_number_integer() || v.is_number_unsigned() ? JsonNode::kInteger : JsonNode::kNumber;
      if (!(n.types & t)) fail(path, ".enum: the value ", v.dump(), " is not of the schema's type");
      n.literals.push_back(v.dump());
    }
    return &n;
  }
  if (!s.contains("type") && s.contains("properties")) n.types = JsonNode::kObject;
  else if (!s.contains("type") && s.contains("items")) n.types = JsonNode::kArray;
  if (s.contains("properties")) {
    const json& props = s["properties"];
    if (!props.is_object()) fail(path, ".properties: must be an object");
    if (props.size() > 64) fail(path, ".properties: at most 64, not ", props.size());
    for (const auto& [name, sub] : props.items()) {
      for (unsigned char ch : name)
        if (ch == '"' || ch == '\\' || ch < 0x20) fail(path, ".properties: the name ", json(name).dump(), " needs escapes, which keys do not get");
      n.names.push_back(name);
      n.properties.push_back(compile(sub, path + ".properties." + name, depth + 1));
    }
  }
  if (s.contains("required")) {
    if (!s["required"].is_array()) fail(path, ".required: must be an array of property names");
    for (const json& r : s["required"]) {
      const auto it = r.is_string() ? std::find(n.names.begin(), n.names.end(), r.get<std::string>()) : n.names.end();
      if (it == n.names.end()) fail(path, ".required: ", r.dump(), " is not one of the properties");
      n.required |= uint64_t(1) << (it - n.names.begin());
    }
  }
  if (s.contains("additionalProperties")) {
    const json& a = s["additionalProperties"];
    n.additional = a.is_boolean() && !a.get<bool>() ? nullptr : compile(a, path + ".additionalProperties", depth + 1);
  }
  if (s.contains("items")) n.items = compile(s["items"], path + ".items", depth + 1);
  for (const char* k : {"minItems", "maxItems"})
    if (s.contains(k) && !((s[k].is_number_unsigned() && s[k].get<uint64_t>() <= uint64_t(INT64_MAX)) ||
                           (s[k].is_number_integer() && s[k].get<int64_t>() >= 0)))
      fail(path, ".", k, ": must be a non-negative integer");
  if (s.contains("minItems")) n.min_items = s["minItems"].get<int64_t>();
  if (s.contains("maxItems")) n.max_items = s["maxItems"].get<int64_t>();
  if (n.min_items > n.max_items) fail(path, ": minItems ", n.min_items, " exceeds maxItems ", n.max_items);
  return &n;
}

// --- The matcher ----------------------------------------------------------------------------

JsonMatcher::JsonMatcher(const JsonGrammar* g) {
  stack_.reserve(32);
  if (g) stack_.push_back(Frame{g->root(), kValue, 0, 0, 0, 0, -1, 0, 0});
}

bool JsonMatcher::can_end() const {
  if (finished_) return true;
  if (stack_.size() != 1) return false;
  const Frame& f = stack_.back();
  if (f.kind == kNumberFrame) return f.phase == kZero || f.phase == kInt || f.phase == kFrac || f.phase == kExp;
  if (f.kind == kLiteralFrame) {
    const auto& lits = literals(f);
    for (size_t i = 0; i < lits.size(); ++i)
      if ((f.cand >> i & 1) && lits[i].size() == f.len) return true;
  }
  return false;
}

// The first byte of a value in frame f (kValue): f becomes the value's frame. Enum values
// start matching with nothing consumed, so the caller feeds the byte again.
bool JsonMatcher::value_start(Frame& f, uint8_t c) {
  const JsonNode* n = f.node;
  if (!n->literals.empty()) {
    f.kind = kLiteralFrame, f.count = 0, f.len = 0, f.cand = low_bits(n->literals.size());
    return true;
  }
  const uint32_t t = n->types;
  f.len = 0, f.utf8 = 0, f.used = 0, f.cand = 0, f.prop = -1, f.count = 0;
  if (c == '{' && (t & JsonNode::kObject)) f.kind = kObjectFrame, f.phase = kOpen;
  else if (c == '[' && (t & JsonNode::kArray)) f.kind = kArrayFrame, f.phase = kOpen;
  else if (c == '"' && (t & JsonNode::kString)) f.kind = kStringFrame, f.phase = 0;
  else if ((c == '-' || (c >= '0' && c <= '9')) && (t & JsonNode::kInteger))
    f.kind = kNumberFrame, f.phase = c == '-' ? kSign : c == '0' ? kZero : kInt, f.count = (t & JsonNode::kNumber) ? 0 : 1,
    f.len = c == '-' ? 0 : 1;
  else if ((c == 't' || c == 'f') && (t & JsonNode::kBoolean)) f.kind = kLiteralFrame, f.count = 1, f.len = 1, f.cand = c == 't' ? 1 : 2;
  else if (c == 'n' && (t & JsonNode::kNull)) f.kind = kLiteralFrame, f.count = 2, f.len = 1, f.cand = 1;
  else return false;
  return true;
}

bool JsonMatcher::feed(uint8_t c) {
  for (;;) {
    if (stack_.empty()) return false;  // the root value is complete: nothing may follow
    Frame& f = stack_.back();
    const bool space = is_space(c);
    // Between tokens: one space, or a newline and up to 16 spaces or tabs of indentation
    // (ws_: 0 none yet, -1 after a space, 1 + n after a newline and n indentation bytes).
    auto whitespace = [&] {
      if (ws_ == 0 && (c == ' ' || c == '\n')) return ws_ = c == ' ' ? -1 : 1, true;
      if (ws_ >= 1 && ws_ <= kMaxIndent && (c == ' ' || c == '\t')) return ++ws_, true;
      return false;
    };
    auto pop = [&] {
      stack_.pop_back();
      if (stack_.empty()) finished_ = true;
    };
    auto push_value = [&](const JsonNode* node) { stack_.push_back(Frame{node, kValue, 0, 0, 0, 0, -1, 0, 0}); };
    if (!space) ws_ = 0;
    switch (f.kind) {
      case kValue:
        if (space) return whitespace();
        if (!value_start(f, c)) return false;
        if (f.kind == kLiteralFrame && f.count == 0) continue;  // an enum: match c against its values
        return true;
      case kObjectFrame: {
        const JsonNode* n = f.node;
        const uint64_t unused = low_bits(n->names.size()) & ~f.used;
        if (f.phase == kKey) {
          if (!f.utf8 && c == '"') {
            uint64_t exact = 0;
            for (uint64_t m = f.cand; m; m &= m - 1) {
              const int i = std::countr_zero(m);
              if (n->names[size_t(i)].size() == f.len) exact |= uint64_t(1) << i;
            }
            if (exact & f.used) return false;  // a key twice: a parser keeps the last, unchecked
            if (exact) f.prop = std::countr_zero(exact), f.used |= exact;
            else if (n->additional) f.prop = -1;
            else return false;
            f.phase = kColon;
            return true;
          }
          if ((!f.utf8 && (c == '\\' || c < 0x20)) || !utf8_step(f.utf8, c)) return false;
          uint64_t next = 0;
          for (uint64_t m = f.cand; m; m &= m - 1) {
            const int i = std::countr_zero(m);
            const std::string& name = n->names[size_t(i)];
            if (name.size() > f.len && uint8_t(name[f.len]) == c) next |= uint64_t(1) << i;
          }
          if (!next && !n->additional) return false;
          f.cand = next;
          if (f.len < UINT16_MAX) ++f.len;
          return true;
        }
        if (space) return whitespace();
        if ((f.phase == kOpen || f.phase == kNext) && c == '"') {
          if (!unused && !n->additional) return false;
          // Without other keys, only unused names can be typed (no dead end on a used one);
          // with them, every name is matched so that a used one is refused at its end.
          f.phase = kKey, f.len = 0, f.cand = n->additional ? low_bits(n->names.size()) : unused, f.utf8 = 0;
          return true;
        }
        if ((f.phase == kOpen || f.phase == kAfter) && c == '}') {
          if (n->required & ~f.used) return false;
          pop();
          return true;
        }
        if (f.phase == kColon && c == ':') {
          f.phase = kAfter;
          push_value(f.prop >= 0 ? n->properties[size_t(f.prop)] : n->additional);
          return true;
        }
        if (f.phase == kAfter && c == ',') {
          if (!unused && !n->additional) return false;
          f.phase = kNext;
          return true;
        }
        return false;
      }
      case kArrayFrame: {
        const JsonNode* n = f.node;
        if (space) return whitespace();
        if (f.phase == kOpen && c == ']') {
          if (n->min_items > 0) return false;
          pop();
          return true;
        }
        if (f.phase == kAfter) {
          if (c == ',' && int64_t(f.count) < n->max_items) return f.phase = kNext, true;
          if (c == ']' && int64_t(f.count) >= n->min_items) return pop(), true;
          return false;
        }
        if (n->max_items == 0) return false;
        f.phase = kAfter, ++f.count;  // kOpen or kNext: an item starts with c
        push_value(n->items);
        continue;
      }
      case kStringFrame:
        if (f.utf8) return utf8_step(f.utf8, c);
        if (f.phase == 0) {  // characters
          if (c == '"') return pop(), true;
          if (c == '\\') return f.phase = 1, true;
          return c >= 0x20 && utf8_step(f.utf8, c);
        }
        if (f.phase == 1) {  // after a backslash
          if (c == 'u') return f.phase = 2, f.count = 4, true;
          if (c == '"' || c == '\\' || c == '/' || c == 'b' || c == 'f' || c == 'n' || c == 'r' || c == 't') return f.phase = 0, true;
          return false;
        }
        // \uXXXX: hex digits, but no surrogate D800-DFFF (a lone one would not parse)
        if (!std::isxdigit(c)) return false;
        if (f.count == 4) f.len = (c == 'd' || c == 'D');
        if (f.count == 3 && f.len && !(c >= '0' && c <= '7')) return false;
        if (--f.count == 0) f.phase = 0;
        return true;
      case kNumberFrame: {
        // Digits within what every parser reads exactly or as a finite double: at most 18
        // integer digits, 30 fraction digits and 2 exponent digits (len counts the run).
        const bool digit = c >= '0' && c <= '9', integer = f.count == 1;
        switch (f.phase) {
          case kSign:
            if (c == '0') return f.phase = kZero, true;
            return digit && (f.phase = kInt, f.len = 1, true);
          case kZero:
          case kInt:
            if (digit && f.phase == kInt) return ++f.len <= 18;
            if (c == '.' && !integer) return f.phase = kFrac0, true;
            if ((c == 'e' || c == 'E') && !integer) return f.phase = kExp0, true;
            break;
          case kFrac0:
            return digit && (f.phase = kFrac, f.len = 1, true);
          case kFrac:
            if (digit) return ++f.len <= 30;
            if (c == 'e' || c == 'E') return f.phase = kExp0, true;
            break;
          case kExp0:
            if (c == '+' || c == '-') return f.phase = kExpSign, true;
            return digit && (f.phase = kExp, f.len = 1, true);
          case kExpSign:
            return digit && (f.phase = kExp, f.len = 1, true);
          case kExp:
            if (digit) return ++f.len <= 2;
            break;
        }
        pop();  // complete: c belongs to what holds the number
        continue;
      }
      case kLiteralFrame: {
        const auto& lits = literals(f);
        uint64_t next = 0;
        bool complete = false;
        for (uint64_t m = f.cand; m; m &= m - 1) {
          const int i = std::countr_zero(m);
          const std::string& lit = lits[size_t(i)];
          if (lit.size() > f.len && uint8_t(lit[f.len]) == c) next |= uint64_t(1) << i;
          if (lit.size() == f.len) complete = true;
        }
        if (next) {
          f.cand = next, ++f.len;
          // true/false/null end with their last letter; enum values when nothing else can follow
          bool longer = false, done = false;
          for (uint64_t m = next; m; m &= m - 1) {
            const size_t size = lits[size_t(std::countr_zero(m))].size();
            longer = longer || size > f.len, done = done || size == f.len;
          }
          if (done && !longer) pop();
          return true;
        }
        if (!complete) return false;
        pop();
        continue;
      }
    }
    return false;
  }
}

// --- The constraint ---------------------------------------------------------------------------

JsonConstraint::JsonConstraint(std::shared_ptr<const JsonGrammar> g, const Tokenizer& tok, std::vector<int64_t> eos)
    : g_(std::move(g)), tok_(tok), eos_(std::move(eos)), m_(g_.get()), scratch_(g_.get()) {}

void JsonConstraint::mask(float* logits, int64_t vocab) {
  mask_tokens(tok_, eos_, {}, m_, scratch_, m_.can_end(), dead_end_, [](JsonMatcher& m, uint8_t b) { return m.feed(b); }, logits,
              vocab);
}

void JsonConstraint::accept(int32_t token) {
  accept_token(tok_, eos_, token, m_, dead_end_, [](JsonMatcher& m, uint8_t b) { return m.feed(b); });
}

}  // namespace dsv3::serve
