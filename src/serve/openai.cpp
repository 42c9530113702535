// OpenAI request checking and response pieces (see openai.h).
#include "serve/openai.h"

#include <random>

#include "core/error.h"
#include "serve/json_grammar.h"
#include "serve/tool_calls.h"
#include "tokenizer/chat_template.h"

namespace dsv3::serve {

using nlohmann::json;

ApiError::ApiError(int status, std::string message, std::string type, std::string param, std::string code)
    : status(status), message(std::move(message)), type(std::move(type)), param(std::move(param)), code(std::move(code)) {}

void bad_request(const std::string& param, const std::string& message, const std::string& code) {
  throw ApiError(400, message, "invalid_request_error", param, code);
}

json error_body(const ApiError& e) {
  json err = {{"message", e.message}, {"type", e.type}, {"param", nullptr}, {"code", nullptr}};
  if (!e.param.empty()) err["param"] = e.param;
  if (!e.code.empty()) err["code"] = e.code;
  return json{{"error", err}};
}

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

namespace {

const char* type_name(const json& v) {
  if (v.is_string()) return "a string";
  if (v.is_boolean()) return "a boolean";
  if (v.is_number_integer() || v.is_number_unsigned()) return "an integer";
  if (v.is_number()) return "a number";
  if (v.is_array()) return "an array";
  if (v.is_object()) return "an object";
  return "null";
}

// The field if present and not null.
const json* field(const json& body, const char* name) {
  const auto it = body.find(name);
  return it == body.end() || it->is_null() ? nullptr : &*it;
}

int64_t integer(const json& body, const char* name, int64_t lo, int64_t hi, int64_t fallback) {
  const json* v = field(body, name);
  if (!v) return fallback;
  if (!v->is_number_integer() && !v->is_number_unsigned())
    bad_request(name, std::string("'") + name + "' must be an integer, not " + type_name(*v), "invalid_type");
  if (v->is_number_unsigned() && v->get<uint64_t>() > uint64_t(INT64_MAX))
    bad_request(name, std::string("'") + name + "' is out of range: at most " + std::to_string(hi));
  const int64_t x = v->get<int64_t>();
  if (x < lo || x > hi)
    bad_request(name, std::string("'") + name + "' must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], not " +
                          std::to_string(x));
  return x;
}

double number(const json& body, const char* name, double lo, double hi, double fallback, bool open_lo = false) {
  const json* v = field(body, name);
  if (!v) return fallback;
  if (!v->is_number()) bad_request(name, std::string("'") + name + "' must be a number, not " + type_name(*v), "invalid_type");
  const double x = v->get<double>();
  if (!(open_lo ? x > lo : x >= lo) || !(x <= hi)) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "'%s' must be in %c%g, %g], not %g", name, open_lo ? '(' : '[', lo, hi, x);
    bad_request(name, buf);
  }
  return x;
}

bool boolean(const json& body, const char* name, bool fallback) {
  const json* v = field(body, name);
  if (!v) return fallback;
  if (!v->is_boolean()) bad_request(name, std::string("'") + name + "' must be a boolean, not " + type_name(*v), "invalid_type");
  return v->get<bool>();
}

[[noreturn]] void unsupported(const char* name, const std::string& why) {
  bad_request(name, std::string("'") + name + "' is not supported by this server: " + why, "unsupported_parameter");
}

// A message's content as text: a string, or an array of {"type": "text", "text": ...} parts.
std::string content_text(const json& content, size_t i) {
  const std::string param = "messages[" + std::to_string(i) + "].content";
  if (content.is_null()) return "";
  if (content.is_string()) return content.get<std::string>();
  if (!content.is_array()) bad_request(param, "'" + param + "' must be a string or an array of parts", "invalid_type");
  std::string text;
  for (const json& part : content) {
    if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") || !part["text"].is_string())
      bad_request(param, "'" + param + "': only parts of type \"text\" with a string \"text\" are supported");
    text += part["text"].get<std::string>();
  }
  return text;
}

std::vector<int32_t> encode(const ServedModel& m, const std::string& text, bool add_bos, EncodeState& state) {
  std::vector<int32_t> ids;
  if (add_bos && m.config && m.config->add_bos_token && m.config->bos_token)
    if (auto bos = m.tokenizer->token_id(*m.config->bos_token)) ids.push_back(*bos);
  m.tokenizer->encode(text, EncodeOptions{}, state, ids);
  return ids;
}

}  // namespace

CompletionRequest parse_completion_request(const json& body, bool chat, const ServedModel& m, EncodeState& state) {
  if (!body.is_object()) bad_request("", "the request body must be a JSON object", "invalid_type");
  CompletionRequest r;
  r.chat = chat;
  const json* model = field(body, "model");
  if (!model) bad_request("model", "'model' is required", "missing_required_parameter");
  if (!model->is_string()) bad_request("model", "'model' must be a string", "invalid_type");
  if (model->get<std::string>() != m.name)
    throw ApiError(404, "The model '" + model->get<std::string>() + "' does not exist; this server serves '" + m.name + "'",
                   "invalid_request_error", "model", "model_not_found");

  // Fields whose meaning this server does not implement: an error, never silently ignored.
  for (const char* name : {"presence_penalty", "frequency_penalty"})
    if (number(body, name, -2, 2, 0) != 0) unsupported(name, "only 0 (no penalty)");
  if (const json* v = field(body, "logit_bias"); v && !(v->is_object() && v->empty())) unsupported("logit_bias", "no biases");
  for (const char* name : {"functions", "function_call", "suffix", "audio", "prediction", "modalities"})
    if (field(body, name)) unsupported(name, "not implemented");
  // Tools (chat only): described to the model, its calls parsed back (tool_calls.h).
  json tools;
  if (const json* v = field(body, "tools"); v && !(v->is_array() && v->empty())) {
    if (!chat) unsupported("tools", "tools go with /v1/chat/completions");
    try {
      check_tools(*v);
    } catch (const Error& e) {
      bad_request("tools", e.what());
    }
    tools = *v;
  }
  // tool_choice: "auto" (default), "none" (the model is not told of the tools), "required"
  // or {"type": "function", "function": {"name": ...}} (the answer is constrained to calls).
  bool forced = false;
  std::string forced_name;
  if (const json* v = field(body, "tool_choice")) {
    if (v->is_string() && (*v == "none" || *v == "auto" || *v == "required")) {
      if (*v == "none") tools = json();
      forced = *v == "required";
    } else if (v->is_object() && v->contains("function") && (*v)["function"].is_object() && (*v)["function"].contains("name") &&
               (*v)["function"]["name"].is_string()) {
      forced = true, forced_name = (*v)["function"]["name"];
    } else {
      bad_request("tool_choice", "'tool_choice' must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}");
    }
    if (forced && tools.is_null()) bad_request("tool_choice", "'tool_choice' forces a call, but no 'tools' are given");
  }
  std::vector<std::string> forced_names;
  std::vector<std::shared_ptr<const JsonGrammar>> forced_params;
  if (forced) {
    for (size_t i = 0; i < tools.size(); ++i) {
      const json& f = tools[i]["function"];
      if (!forced_name.empty() && f["name"] != forced_name) continue;
      forced_names.push_back(f["name"]);
      try {
        forced_params.push_back(f.contains("parameters") ? JsonGrammar::from_schema(f["parameters"]) : JsonGrammar::any_object());
      } catch (const Error& e) {
        bad_request("tools", "tools[" + std::to_string(i) + "].function.parameters: " + e.what(), "invalid_schema");
      }
    }
    if (forced_names.empty()) bad_request("tool_choice", "no tool is named '" + forced_name + "'");
  }
  // Structured output: a grammar every choice's tokens are constrained to (json_grammar.h).
  std::shared_ptr<const JsonGrammar> grammar;
  if (const json* v = field(body, "response_format")) {
    if (!v->is_object() || !v->contains("type") || !(*v)["type"].is_string())
      bad_request("response_format", "'response_format' must be an object with a string 'type'", "invalid_type");
    const std::string type = (*v)["type"];
    if (type == "json_object") {
      grammar = JsonGrammar::any_object();
    } else if (type == "json_schema") {
      const auto js = v->find("json_schema");
      if (js == v->end() || !js->is_object() || !js->contains("schema"))
        bad_request("response_format", "'response_format.json_schema' must be an object with a 'schema'", "invalid_type");
      try {
        grammar = JsonGrammar::from_schema((*js)["schema"]);
      } catch (const Error& e) {
        bad_request("response_format", std::string("response_format.json_schema: ") + e.what(), "invalid_schema");
      }
    } else if (type != "text") {
      bad_request("response_format", "'response_format.type' must be text, json_object or json_schema, not '" + type + "'");
    }
    if (grammar && !m.tokenizer) bad_request("response_format", "structured output needs the model's tokenizer.json");
  }
  if (boolean(body, "echo", false)) unsupported("echo", "the prompt is not echoed");
  if (const json* v = field(body, "user"); v && !v->is_string()) bad_request("user", "'user' must be a string", "invalid_type");

  // The prompt.
  if (chat) {
    const json* messages = field(body, "messages");
    if (!messages) bad_request("messages", "'messages' is required", "missing_required_parameter");
    if (!messages->is_array() || messages->empty()) bad_request("messages", "'messages' must be a non-empty array", "invalid_type");
    if (!m.tokenizer || !m.config || !m.config->chat_template)
      bad_request("messages", "this model has no chat template (tokenizer_config.json); use /v1/completions");
    nlohmann::ordered_json rendered = nlohmann::ordered_json::array();
    for (size_t i = 0; i < messages->size(); ++i) {
      const json& msg = (*messages)[i];
      const std::string param = "messages[" + std::to_string(i) + "]";
      if (!msg.is_object()) bad_request(param, "'" + param + "' must be an object", "invalid_type");
      if (!msg.contains("role") || !msg["role"].is_string()) bad_request(param + ".role", "'" + param + ".role' must be a string", "invalid_type");
      std::string role = msg["role"];
      if (role == "developer") role = "system";  // OpenAI's newer name for the system role
      if (role != "system" && role != "user" && role != "assistant" && role != "tool")
        bad_request(param + ".role", "unknown role '" + role + "' (system, developer, user, assistant or tool)");
      const bool calls = role == "assistant" && msg.contains("tool_calls") && msg["tool_calls"].is_array() && !msg["tool_calls"].empty();
      if (!msg.contains("content") && !calls)
        bad_request(param + ".content", "'" + param + ".content' is required", "missing_required_parameter");
      nlohmann::ordered_json out = {{"role", role}};
      const std::string text = msg.contains("content") ? content_text(msg["content"], i) : "";
      if (calls) {  // an earlier turn's tool calls, as the template writes them (content none)
        out["content"] = text.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(text);
        out["tool_calls"] = nlohmann::ordered_json::array();
        for (size_t k = 0; k < msg["tool_calls"].size(); ++k) {
          const json& call = msg["tool_calls"][k];
          const std::string at = param + ".tool_calls[" + std::to_string(k) + "]";
          if (!call.is_object() || !call.contains("function") || !call["function"].is_object() ||
              !call["function"].contains("name") || !call["function"]["name"].is_string() ||
              !call["function"].contains("arguments") || !call["function"]["arguments"].is_string())
            bad_request(at, "'" + at + "' must be {\"type\": \"function\", \"function\": {\"name\": string, \"arguments\": string}}");
          out["tool_calls"].push_back({{"id", call.contains("id") && call["id"].is_string() ? call["id"].get<std::string>() : ""},
                                       {"type", "function"},
                                       {"function", {{"name", call["function"]["name"]}, {"arguments", call["function"]["arguments"]}}}});
        }
      } else {
        out["content"] = text;
      }
      if (role == "tool" && msg.contains("tool_call_id") && msg["tool_call_id"].is_string()) out["tool_call_id"] = msg["tool_call_id"];
      rendered.push_back(std::move(out));
    }
    nlohmann::ordered_json extra = nlohmann::ordered_json::object();
    if (!tools.is_null()) {
      r.tools = true;
      if (m.config->chat_template->find("tools") != std::string::npos) {
        extra["tools"] = tools;  // the template renders them itself
      } else if (!rendered.empty() && rendered[0]["role"] == "system") {
        rendered[0]["content"] = rendered[0]["content"].get<std::string>() + "\n\n" + tools_prompt(tools);
      } else {
        rendered.insert(rendered.begin(), nlohmann::ordered_json{{"role", "system"}, {"content", tools_prompt(tools)}});
      }
    }
    std::string text;
    try {
      text = apply_chat_template(*m.config, rendered, true, extra);
    } catch (const Error& e) {
      bad_request("messages", std::string("the chat template rejects these messages: ") + e.what());
    }
    r.thinking = m.reasoning && (text.ends_with("<think>") || text.ends_with("<think>\n"));
    r.prompt = encode(m, text, false, state);  // the template writes the BOS token itself
  } else {
    const json* prompt = field(body, "prompt");
    if (!prompt) bad_request("prompt", "'prompt' is required", "missing_required_parameter");
    const json* p = prompt;
    if (p->is_array() && p->size() == 1 && ((*p)[0].is_string() || (*p)[0].is_array())) p = &(*p)[0];  // a batch of one
    if (p->is_string()) {
      if (!m.tokenizer) bad_request("prompt", "this model has no tokenizer.json: send the prompt as token ids");
      r.prompt = encode(m, p->get<std::string>(), true, state);
    } else if (p->is_array()) {
      for (size_t i = 0; i < p->size(); ++i) {
        const json& t = (*p)[i];
        if (!t.is_number_integer() && !t.is_number_unsigned())
          bad_request("prompt", "'prompt' must be a string, or an array of token ids (one prompt per request)", "invalid_type");
        const int64_t id = t.is_number_unsigned() && t.get<uint64_t>() > uint64_t(INT64_MAX) ? -1 : t.get<int64_t>();
        if (id < 0 || id > INT32_MAX) bad_request("prompt", "prompt token " + std::to_string(i) + " is not a valid token id");
        r.prompt.push_back(int32_t(id));
      }
    } else {
      bad_request("prompt", "'prompt' must be a string or an array of token ids", "invalid_type");
    }
  }
  if (r.prompt.empty()) bad_request(chat ? "messages" : "prompt", "the prompt is empty");
  const int64_t P = int64_t(r.prompt.size());
  if (P >= m.context)
    bad_request(chat ? "messages" : "prompt",
                "this model's maximum context length is " + std::to_string(m.context) + " tokens; the prompt has " + std::to_string(P),
                "context_length_exceeded");

  // Sampling. Defaults as OpenAI's: temperature 1, top_p 1; max_tokens: what the context
  // leaves, at most 4096 (DeepSeek's API default).
  GenerateOptions opt;
  int64_t max_tokens = integer(body, "max_tokens", 1, INT64_MAX, 0);
  max_tokens = integer(body, "max_completion_tokens", 1, INT64_MAX, max_tokens);
  if (max_tokens == 0) max_tokens = std::min<int64_t>(4096, m.context - P);
  if (max_tokens > m.context - P)
    bad_request("max_tokens",
                "this model's maximum context length is " + std::to_string(m.context) + " tokens; the prompt has " +
                    std::to_string(P) + " and max_tokens asks " + std::to_string(max_tokens) + " more",
                "context_length_exceeded");
  opt.max_tokens = max_tokens;
  opt.sampling.temperature = float(number(body, "temperature", 0, 2, 1));
  opt.sampling.top_p = float(number(body, "top_p", 0, 1, 1, true));
  const int64_t top_k = integer(body, "top_k", -1, INT32_MAX, 0);  // an extension, as vLLM's (-1: none)
  opt.sampling.top_k = top_k < 0 ? 0 : top_k;
  const json* seed = field(body, "seed");
  uint64_t base_seed = std::random_device{}() * 0x100000000ULL + std::random_device{}();
  if (seed) base_seed = uint64_t(integer(body, "seed", INT64_MIN, INT64_MAX, 0));
  opt.speculative_mtp = m.speculative, opt.draft = m.draft;
  opt.stop_at_eos = !boolean(body, "ignore_eos", false);  // an extension, as vLLM's (benchmarks)

  if (const json* stop = field(body, "stop")) {
    if (stop->is_string()) {
      r.stop.push_back(*stop);
    } else if (stop->is_array()) {
      if (stop->size() > 4) bad_request("stop", "'stop' holds at most 4 strings, not " + std::to_string(stop->size()));
      for (const json& s : *stop) {
        if (!s.is_string()) bad_request("stop", "'stop' must be a string or an array of strings", "invalid_type");
        r.stop.push_back(s);
      }
    } else {
      bad_request("stop", "'stop' must be a string or an array of strings", "invalid_type");
    }
    for (const std::string& s : r.stop)
      if (s.empty()) bad_request("stop", "a stop string must not be empty");
  }

  if (chat) {
    const bool logprobs = boolean(body, "logprobs", false);
    const int64_t top = integer(body, "top_logprobs", 0, 20, 0);
    if (field(body, "top_logprobs") && !logprobs) bad_request("top_logprobs", "'top_logprobs' needs 'logprobs': true");
    r.logprobs = logprobs ? top : -1;
  } else {
    r.logprobs = integer(body, "logprobs", 0, 20, -1);
  }
  opt.logprobs = r.logprobs;

  const int64_t n = integer(body, "n", 1, m.max_n, 1);
  if (!chat) {
    const int64_t best_of = integer(body, "best_of", 1, m.max_n, n);
    if (best_of != n) unsupported("best_of", "only best_of = n");
  }
  r.stream = boolean(body, "stream", false);
  if (const json* so = field(body, "stream_options")) {
    if (!r.stream) bad_request("stream_options", "'stream_options' is only allowed when 'stream' is true");
    if (!so->is_object()) bad_request("stream_options", "'stream_options' must be an object", "invalid_type");
    r.include_usage = boolean(*so, "include_usage", false);
  }
  for (int64_t i = 0; i < n; ++i) {
    r.options.push_back(opt);
    r.options.back().sampling.seed = base_seed + uint64_t(i);
    if (grammar) {  // its own matcher per choice; constrained tokens are not drafted
      r.options.back().constraint = std::make_shared<JsonConstraint>(grammar, *m.tokenizer, m.eos);
      r.options.back().speculative_mtp = false;
    }
  }
  if (forced) {
    if (grammar) bad_request("tool_choice", "a forced tool call cannot be combined with a JSON response_format");
    if (!r.stop.empty()) bad_request("stop", "'stop' cannot be combined with a forced tool call");
    std::vector<int32_t> keep;
    for (const std::string& marker : tool_markers())
      if (auto id = m.tokenizer->token_id(marker)) keep.push_back(*id);
    for (GenerateOptions& o : r.options) {
      o.constraint = std::make_shared<ToolChoiceConstraint>(forced_names, forced_params, !forced_name.empty(), *m.tokenizer, m.eos, keep);
      o.speculative_mtp = false;
    }
  }
  if (grammar) {  // what would cut or change a constrained answer
    if (!r.stop.empty()) bad_request("stop", "'stop' cannot be combined with a JSON response_format (it would cut the JSON)");
    if (!opt.stop_at_eos) bad_request("ignore_eos", "'ignore_eos' cannot be combined with a JSON response_format");
    if (r.thinking) unsupported("response_format", "this model reasons first (<think>), and the constraint would apply to the reasoning");
    r.tools = false;  // the answer is the JSON, not tool calls
  }
  return r;
}

json usage_json(int64_t prompt, int64_t completion, int64_t cache_hit) {
  return json{{"prompt_tokens", prompt},
              {"completion_tokens", completion},
              {"total_tokens", prompt + completion},
              {"prompt_cache_hit_tokens", cache_hit},
              {"prompt_cache_miss_tokens", prompt - cache_hit},
              {"prompt_tokens_details", {{"cached_tokens", cache_hit}}}};
}

std::string token_text(const Tokenizer* tok, int32_t token) {
  if (!tok || token < 0 || token >= tok->vocab_size()) return "";
  return std::string(tok->token_bytes(token));
}

namespace {

json bytes_of(const std::string& s) {
  json b = json::array();
  for (unsigned char c : s) b.push_back(int(c));
  return b;
}

}  // namespace

json chat_logprob(const Tokenizer* tok, int32_t token, const TokenLogprobs& lp) {
  const std::string text = token_text(tok, token);
  json top = json::array();
  for (const auto& [id, l] : lp.top) {
    const std::string t = token_text(tok, id);
    top.push_back({{"token", t}, {"logprob", l}, {"bytes", bytes_of(t)}});
  }
  return json{{"token", text}, {"logprob", lp.logprob}, {"bytes", bytes_of(text)}, {"top_logprobs", top}};
}

json completion_logprobs(const Tokenizer* tok, const std::vector<int32_t>& tokens, const std::vector<TokenLogprobs>& lps,
                         size_t offset) {
  json out = {{"tokens", json::array()}, {"token_logprobs", json::array()}, {"top_logprobs", json::array()}, {"text_offset", json::array()}};
  for (size_t i = 0; i < tokens.size() && i < lps.size(); ++i) {
    const std::string text = token_text(tok, tokens[i]);
    out["tokens"].push_back(text);
    out["token_logprobs"].push_back(lps[i].logprob);
    json top = json::object();
    for (const auto& [id, l] : lps[i].top) top[token_text(tok, id)] = l;
    out["top_logprobs"].push_back(top);
    out["text_offset"].push_back(offset);
    offset += text.size();
  }
  return out;
}

}  // namespace dsv3::serve
