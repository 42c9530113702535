// Tool calls (OpenAI's `tools`), in DeepSeek-V3's own markup: its chat template writes an
// assistant's calls as
//   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>
//   ... <｜tool▁calls▁end｜>
// and tool results between <｜tool▁outputs▁begin｜> and <｜tool▁outputs▁end｜>. The template does
// not render the tool definitions, so (as DeepSeek's API must) the server describes them in
// the system prompt, with the markup the model is to answer in; a template that does render
// `tools` gets them as a variable instead. The answer's markup is parsed back into
// choices[].message.tool_calls; a forced tool_choice constrains the answer to the markup.
// Uses infer (the constraint interface), tokenizer and serve's JSON grammar.
#pragma once
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "infer/constraint.h"
#include "serve/json_grammar.h"
#include "tokenizer/tokenizer.h"

namespace dsv3::serve {

inline constexpr const char* kToolCallsBegin = "<｜tool▁calls▁begin｜>";
inline constexpr const char* kToolCallsEnd = "<｜tool▁calls▁end｜>";
inline constexpr const char* kToolCallBegin = "<｜tool▁call▁begin｜>";
inline constexpr const char* kToolCallEnd = "<｜tool▁call▁end｜>";
inline constexpr const char* kToolSep = "<｜tool▁sep｜>";
// Every marker of the markup (kept in the answer's text while it is parsed).
const std::vector<std::string>& tool_markers();

// Checks a request's `tools` (an array of {"type": "function", "function": {"name",
// "description"?, "parameters"?}}); throws Error naming what is wrong and where.
void check_tools(const nlohmann::json& tools);
// The system prompt's part that describes the tools and the markup to call them in.
std::string tools_prompt(const nlohmann::json& tools);

// tool_choice "required" or a named function: the answer must be tool calls in the markup,
// each to one of `names` with arguments fitting that tool's parameters (json_grammar.h),
// then EOS. Masks as JsonConstraint does; the markup's special tokens (keep) are allowed,
// other special tokens not. single: one call only (a named function).
class ToolChoiceConstraint : public TokenConstraint {
 public:
  ToolChoiceConstraint(std::vector<std::string> names, std::vector<std::shared_ptr<const JsonGrammar>> params,
                       bool single, const Tokenizer& tok, std::vector<int64_t> eos, std::vector<int32_t> keep);
  void mask(float* logits, int64_t vocab) override;
  void accept(int32_t token) override;
  bool failed() const override { return dead_end_; }

  // Where the answer is: literal text, a tool's name (then its opening fence), its arguments.
  struct State {
    enum Phase : uint8_t { kLiteral, kName, kArguments, kMore, kEnd } phase = kLiteral;
    size_t pos = 0;     // bytes matched of the literal / of the candidates
    uint64_t cand = 0;  // names (kName) or continuations (kMore) still possible
    int tool = -1;
    JsonMatcher args{nullptr};
    bool feed(const ToolChoiceConstraint& c, uint8_t byte);
  };

 private:
  std::vector<std::string> names_;  // each followed by its fence: "NAME\n```json\n"
  std::vector<std::shared_ptr<const JsonGrammar>> params_;
  bool single_;
  const Tokenizer& tok_;
  std::vector<int64_t> eos_;
  std::vector<int32_t> keep_;
  State s_, scratch_;
  bool dead_end_ = false;
};

struct ToolCall {
  std::string id, name, arguments;  // arguments: the JSON text the model wrote
};
struct ParsedAnswer {
  std::string content;          // text before the calls
  std::vector<ToolCall> calls;  // complete calls, in order
};
// Splits an answer's text (markers kept) into content and tool calls.
ParsedAnswer parse_tool_calls(const std::string& text);

}  // namespace dsv3::serve
