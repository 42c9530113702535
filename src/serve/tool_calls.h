// Tool calls (OpenAI's `tools`), in DeepSeek-V3's own markup: its chat template writes an
// assistant's calls as
//   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>
//   ... <｜tool▁calls▁end｜>
// and tool results between <｜tool▁outputs▁begin｜> and <｜tool▁outputs▁end｜>. The template does
// not render the tool definitions, so (as DeepSeek's API must) the server describes them in
// the system prompt, with the markup the model is to answer in; a template that does render
// `tools` gets them as a variable instead. The answer's markup is parsed back into
// choices[].message.tool_calls. Uses nlohmann_json only.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

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
