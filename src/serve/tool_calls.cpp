// DeepSeek-V3 tool-call markup (see tool_calls.h).
#include "serve/tool_calls.h"

#include <algorithm>
#include <bit>
#include <random>

#include "core/error.h"
#include "serve/byte_mask.h"

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

// --- A forced tool_choice ---------------------------------------------------------------------

namespace {

const std::string kCallHead = std::string(kToolCallBegin) + "function" + kToolSep;
const std::string kFirst = std::string(kToolCallsBegin) + kCallHead;  // the answer's start
const std::string kFence = "\n```json\n";                            // after a name
const std::string kAfterArguments = std::string("\n```") + kToolCallEnd;
const std::string kContinuations[2] = {"\n" + kCallHead, kToolCallsEnd};  // another call, or the end

}  // namespace

ToolChoiceConstraint::ToolChoiceConstraint(std::vector<std::string> names, std::vector<std::shared_ptr<const JsonGrammar>> params,
                                           bool single, const Tokenizer& tok, std::vector<int64_t> eos, std::vector<int32_t> keep)
    : names_(std::move(names)), params_(std::move(params)), single_(single), tok_(tok), eos_(std::move(eos)), keep_(std::move(keep)) {
  if (names_.empty() || names_.size() > 64 || names_.size() != params_.size()) fail("tool_choice: 1 to 64 tools, each with its grammar");
  for (std::string& n : names_) n += kFence;
}

bool ToolChoiceConstraint::State::feed(const ToolChoiceConstraint& c, uint8_t byte) {
  for (;;) {
    switch (phase) {
      case kLiteral: {
        const std::string& lit = tool < 0 ? kFirst : kAfterArguments;
        if (byte != uint8_t(lit[pos])) return false;
        if (++pos < lit.size()) return true;
        pos = 0;
        if (tool < 0) phase = kName, cand = c.names_.size() >= 64 ? ~uint64_t(0) : (uint64_t(1) << c.names_.size()) - 1;
        else phase = kMore, cand = c.single_ ? 2 : 3;
        return true;
      }
      case kName:
      case kMore: {
        uint64_t next = 0;
        int done = -1;
        for (uint64_t m = cand; m; m &= m - 1) {
          const int i = std::countr_zero(m);
          const std::string& w = phase == kName ? c.names_[size_t(i)] : kContinuations[i];
          if (w.size() > pos && uint8_t(w[pos]) == byte) {
            next |= uint64_t(1) << i;
            if (w.size() == pos + 1) done = i;
          }
        }
        if (!next) return false;
        cand = next, ++pos;
        if (done < 0) return true;
        pos = 0;
        if (phase == kName) tool = done, phase = kArguments, args = JsonMatcher(c.params_[size_t(done)].get());
        else if (done == 0) phase = kName, cand = c.names_.size() >= 64 ? ~uint64_t(0) : (uint64_t(1) << c.names_.size()) - 1;
        else phase = kEnd;
        return true;
      }
      case kArguments:
        if (!args.finished()) return args.feed(byte);
        phase = kLiteral, pos = 0;  // the arguments' object closed: the fence and the call's end
        continue;
      case kEnd:
        return false;
    }
    return false;
  }
}

void ToolChoiceConstraint::mask(float* logits, int64_t vocab) {
  mask_tokens(tok_, eos_, keep_, s_, scratch_, s_.phase == State::kEnd, dead_end_,
              [this](State& st, uint8_t b) { return st.feed(*this, b); }, logits, vocab);
}

void ToolChoiceConstraint::accept(int32_t token) {
  accept_token(tok_, eos_, token, s_, dead_end_, [this](State& st, uint8_t b) { return st.feed(*this, b); });
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
