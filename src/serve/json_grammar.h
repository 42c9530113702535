// Structured output (response_format json_object / json_schema): a JSON grammar, compiled
// from a schema, that a byte-level pushdown matcher follows, and the token constraint that
// masks, before each token is sampled, every token whose bytes would leave the output no
// longer a prefix of a valid JSON text of the schema (and EOS until the text is complete).
// Whatever the model prefers, the output then parses, and fits the schema, once it ends
// with finish_reason "stop". Supported schema keywords: type (one or a list), properties,
// required, additionalProperties (bool or schema), items, minItems, maxItems, enum, const,
// and the annotations title, description, default, examples, $schema; anything else is an
// Error naming it and where. Strings are UTF-8 checked; \u escapes of surrogates, and
// escapes inside object keys, and numbers of more than 18 integer, 30 fraction or 2 exponent
// digits (which not every parser reads) are not produced; a property's key never repeats
// (other keys, free strings, are not remembered: a repeat is valid JSON); schemas
// nest at most 32 deep; whitespace between tokens is one space, or a
// newline and up to 16 spaces or tabs (llama.cpp's JSON grammar allows the same shapes), so
// that a model cannot wander in whitespace.
// Uses infer (the constraint interface) and tokenizer (token bytes).
#pragma once
#include <cstdint>
#include <deque>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "infer/constraint.h"
#include "tokenizer/tokenizer.h"

namespace dsv3::serve {

struct JsonNode {
  enum Type : uint32_t { kObject = 1, kArray = 2, kString = 4, kNumber = 8, kInteger = 16, kBoolean = 32, kNull = 64, kAll = 127 };
  uint32_t types = kAll;                     // the JSON types allowed here
  std::vector<std::string> literals;         // enum / const: the allowed values as compact JSON texts
  std::vector<std::string> names;            // object: property names (at most 64)
  std::vector<const JsonNode*> properties;   // their schemas
  uint64_t required = 0;                     // bit i: names[i] is required
  const JsonNode* additional = nullptr;      // schema of other keys' values; null: no other keys
  const JsonNode* items = nullptr;           // array items
  int64_t min_items = 0, max_items = INT64_MAX;
};

class JsonGrammar {
 public:
  // Any JSON object (response_format json_object).
  static std::shared_ptr<const JsonGrammar> any_object();
  // A JSON schema; Error naming an unsupported or malformed keyword and its path.
  static std::shared_ptr<const JsonGrammar> from_schema(const nlohmann::json& schema);
  const JsonNode* root() const { return root_; }

 private:
  const JsonNode* compile(const nlohmann::json& s, const std::string& path, int depth);
  std::deque<JsonNode> nodes_;
  const JsonNode* root_ = nullptr;
  const JsonNode* any_ = nullptr;
};

// Where a text is in the grammar: a stack of open values.
class JsonMatcher {
 public:
  explicit JsonMatcher(const JsonGrammar* g);  // null: matches nothing (a placeholder)
  bool feed(uint8_t byte);  // false (state unspecified after) if the byte cannot follow
  bool can_end() const;     // the text so far is a complete value of the root
  bool finished() const { return finished_; }

  struct Frame {
    const JsonNode* node;
    uint8_t kind, phase, utf8;  // utf8: a character's remaining bytes and the next one's range
    uint16_t len;
    uint32_t count;
    int32_t prop;
    uint64_t used, cand;
  };

 private:
  bool value_start(Frame& f, uint8_t c);
  std::vector<Frame> stack_;
  int ws_ = 0;  // whitespace bytes in a row
  bool finished_ = false;
};

class JsonConstraint : public TokenConstraint {
 public:
  // eos: the ids that end the text (allowed once it is complete, and then only they).
  JsonConstraint(std::shared_ptr<const JsonGrammar> g, const Tokenizer& tok, std::vector<int64_t> eos);
  void mask(float* logits, int64_t vocab) override;
  void accept(int32_t token) override;
  // No token could continue the text (or one that could not was chosen): the text is not
  // valid JSON and only EOS is allowed; the server reports the answer cut short ("length").
  bool failed() const override { return dead_end_; }

 private:
  std::shared_ptr<const JsonGrammar> g_;
  const Tokenizer& tok_;
  std::vector<int64_t> eos_;
  JsonMatcher m_, scratch_;
  bool dead_end_ = false;
};

}  // namespace dsv3::serve
