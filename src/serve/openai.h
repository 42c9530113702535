// The OpenAI API's request and response bodies, as the official clients send and expect
// them: a /v1/chat/completions or /v1/completions body checked field by field into what the
// scheduler runs (wrong types, out-of-range values and fields whose meaning dsv3 does not
// implement are errors naming the field; harmless ones are ignored), and the JSON pieces of
// the answer (usage with DeepSeek's cache fields, log-probabilities, errors). Uses infer
// (options) and tokenizer (chat template, encoding).
#pragma once
#include <cstdint>
#include <exception>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "infer/generate.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/tokenizer_config.h"

namespace dsv3::serve {

// An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status.
struct ApiError : std::exception {
  int status;
  std::string message, type, param, code;
  ApiError(int status, std::string message, std::string type, std::string param = "", std::string code = "");
  const char* what() const noexcept override { return message.c_str(); }
};
// 400 invalid_request_error naming the field.
[[noreturn]] void bad_request(const std::string& param, const std::string& message, const std::string& code = "invalid_value");
nlohmann::json error_body(const ApiError& e);

// What requests are checked against.
struct ServedModel {
  std::string name;                         // the `model` requests must name
  const Tokenizer* tokenizer = nullptr;     // null: token-id prompts only
  const TokenizerConfig* config = nullptr;  // chat template, BOS
  int64_t context = 0;                      // positions per sequence
  int64_t max_n = 1;                        // choices per request
  bool reasoning = false;                   // the template writes <think>...</think>
  bool speculative = false;                 // --speculative mtp
  int64_t draft = 1;
  std::vector<int64_t> eos;                 // the ids that end a text (structured output)
};

struct CompletionRequest {
  bool chat = false, stream = false, include_usage = false;
  std::vector<int32_t> prompt;
  std::vector<GenerateOptions> options;  // one per choice (n)
  std::vector<std::string> stop;
  int64_t logprobs = -1;  // -1: none; else alternatives per token (chat's top_logprobs)
  bool thinking = false;  // the rendered prompt ends inside a reasoning part ("<think>")
  bool tools = false;       // the model was told of tools: its answer may hold tool calls
};

// A request body of /v1/chat/completions (chat) or /v1/completions; throws ApiError.
CompletionRequest parse_completion_request(const nlohmann::json& body, bool chat, const ServedModel& m,
                                           EncodeState& state);

nlohmann::json usage_json(int64_t prompt, int64_t completion, int64_t cache_hit);
// One token's entry in a chat response's logprobs.content (token, logprob, bytes, top_logprobs).
nlohmann::json chat_logprob(const Tokenizer* tok, int32_t token, const TokenLogprobs& lp);
// A completion response's logprobs object for tokens (tokens, token_logprobs, top_logprobs,
// text_offset), the first token's text at offset.
nlohmann::json completion_logprobs(const Tokenizer* tok, const std::vector<int32_t>& tokens,
                                   const std::vector<TokenLogprobs>& lps, size_t offset);
std::string token_text(const Tokenizer* tok, int32_t token);  // its bytes ("" for an unknown id)
// Serialises invalid UTF-8 (a model's raw bytes) as U+FFFD instead of failing.
std::string dump(const nlohmann::json& j);

}  // namespace dsv3::serve
