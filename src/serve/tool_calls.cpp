// DeepSeek-V3 tool-call markup (see tool_calls.h).
#include "serve/tool_calls.h"

#include <random>

#include "core/error.h"

namespace dsv3::serve {

using nlohmann::json;

const std::vector<std::string>& tool_markers() {
  static const std::vector<std::string> markers = {kToolCallsBegin, kToolCallsEnd, kToolCallBegin, kToolCallEnd, kToolSep,
                                                   "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>",
                                                   "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"};
  return markers;
}

void check_tools(const json& tools) {
  if (!tools.is_array()) fail("'tools' must be an array");
  for (size_t i = 0; i < tools.size(); ++i) {
    const json& t = tools[i];
    const std::string at = "tools[" + std::to_string(i) + "]";
    if (!t.is_object() || !t.contains("type") || t["type"] != "function")
      fail(at, ": must be {\"type\": \"function\", \"function\": {...}}");
    const auto f = t.find("function");
    if (f == t.end() || !f->is_object()) fail(at, ".function: must be an object");
    const auto name = f->find("name");
    if (name == f->end() || !name->is_string() || name->get<std::string>().empty() || name->get<std::string>().size() > 64)
      fail(at, ".function.name: must be a string of 1 to 64 characters");
    for (char c : name->get<std::string>())
      if (!std::isalnum(static_cast<unsigned char>(c)) && c != '_' && c != '-')
        fail(at, ".function.name: only letters, digits, '_' and '-' (not '", std::string(1, c), "')");
    if (f->contains("description") && !(*f)["description"].is_string()) fail(at, ".function.description: must be a string");
    if (f->contains("parameters") && !(*f)["parameters"].is_object()) fail(at, ".function.parameters: must be a JSON schema object");
  }
}

std::string tools_prompt(const json& tools) {
  std::string out = "You can call these functions. Each takes its arguments as a JSON object fitting its parameters' schema.\n";
  for (const json& t : tools) {
    const json& f = t["function"];
    out += "\n- " + f["name"].get<std::string>();
    if (f.contains("description")) out += ": " + f["description"].get<std::string>();
    out += "\n  parameters: " + (f.contains("parameters") ? f["parameters"].dump() : std::string("{}"));
  }
  out += "\n\nTo call functions, answer with nothing but this markup, one block per call:\n";
  out += std::string(kToolCallsBegin) + kToolCallBegin + "function" + kToolSep + "NAME\n```json\n{ARGUMENTS}\n```" + kToolCallEnd +
         kToolCallsEnd + "\nOtherwise answer in plain text.";
  return out;
}

ParsedAnswer parse_tool_calls(const std::string& text) {
  ParsedAnswer out;
  const size_t begin = text.find(kToolCallsBegin);
  if (begin == std::string::npos) {
    out.content = text;
    return out;
  }
  out.content = text.substr(0, begin);
  while (!out.content.empty() && std::isspace(static_cast<unsigned char>(out.content.back()))) out.content.pop_back();
  static thread_local std::mt19937_64 rng(std::random_device{}());
  const std::string call_begin = kToolCallBegin, sep = kToolSep, call_end = kToolCallEnd;
  for (size_t at = begin; (at = text.find(call_begin, at)) != std::string::npos;) {
    const size_t s = text.find(sep, at), e = text.find(call_end, at);
    if (s == std::string::npos || e == std::string::npos || s > e) break;  // cut short (max_tokens)
    std::string body = text.substr(s + sep.size(), e - s - sep.size());
    ToolCall call;
    const size_t newline = body.find('\n');
    call.name = body.substr(0, newline);
    std::string args = newline == std::string::npos ? "" : body.substr(newline + 1);
    // The arguments inside a ```json fence, as the template writes them.
    if (args.rfind("```json", 0) == 0) args.erase(0, args.find('\n') == std::string::npos ? args.size() : args.find('\n') + 1);
    while (!args.empty() && std::isspace(static_cast<unsigned char>(args.back()))) args.pop_back();
    if (args.size() >= 3 && args.compare(args.size() - 3, 3, "```") == 0) args.resize(args.size() - 3);
    while (!args.empty() && std::isspace(static_cast<unsigned char>(args.back()))) args.pop_back();
    call.arguments = args.empty() ? "{}" : args;
    char id[32];
    std::snprintf(id, sizeof id, "call_%016llx", (unsigned long long)rng());
    call.id = id;
    out.calls.push_back(std::move(call));
    at = e + call_end.size();
  }
  return out;
}

}  // namespace dsv3::serve
