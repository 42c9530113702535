// Chat templates: a small interpreter for the subset of Jinja that Hugging Face chat
// templates use, set up as transformers sets it up (trim_blocks, lstrip_blocks, loop
// controls, raise_exception, namespace, tojson). Statements: if/elif/else, for (with else,
// a filter condition, tuple targets and loop.*), set (names, namespace attributes, blocks),
// break/continue, macro, raw, generation. Expressions: literals, lists, dicts, attribute,
// subscript and slice, calls, filters, tests, arithmetic, comparison and logic with
// Jinja's precedence, and common str/dict methods. Anything else is an Error naming what is
// unsupported and where: a template renders exactly as Jinja would, or not at all.
// Depends on core and nlohmann_json.
#pragma once
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "tokenizer/tokenizer_config.h"

namespace dsv3 {

class ChatTemplate {
 public:
  // Parses source; `what` starts error messages (for example "tokenizer_config.json: chat_template").
  explicit ChatTemplate(std::string_view source, std::string what = "chat template");
  ~ChatTemplate();
  ChatTemplate(ChatTemplate&&) noexcept;
  ChatTemplate& operator=(ChatTemplate&&) noexcept;

  // Renders with the given top-level variables (a JSON object).
  std::string render(const nlohmann::ordered_json& variables) const;

 private:
  struct Program;
  std::unique_ptr<Program> program_;
};

// Renders a conversation as transformers' apply_chat_template does: variables `messages`,
// `add_generation_prompt`, and the special-token strings (bos_token, eos_token, pad_token,
// unk_token) of the config. Throws Error if the config has no chat template.
std::string apply_chat_template(const TokenizerConfig& config, const nlohmann::ordered_json& messages,
                                bool add_generation_prompt);
// The same with more top-level variables (for example `tools`, for templates that render them).
std::string apply_chat_template(const TokenizerConfig& config, const nlohmann::ordered_json& messages,
                                bool add_generation_prompt, const nlohmann::ordered_json& extra);
// One user message with the assistant's turn opened: the prompt a chat model is asked with
// (dsv3 eval --chat, GRPO's prompts). The template writes its own BOS.
std::string user_turn(const TokenizerConfig& config, const std::string& content);

}  // namespace dsv3
