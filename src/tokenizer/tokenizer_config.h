// tokenizer_config.json: the special-token strings, whether BOS/EOS are added, and the chat
// template. Depends on core and nlohmann_json.
#pragma once
#include <optional>
#include <string>

namespace dsv3 {

struct TokenizerConfig {
  std::string path;                           // for error messages
  std::optional<std::string> bos_token, eos_token, pad_token, unk_token;
  bool add_bos_token = false, add_eos_token = false;
  std::optional<std::string> chat_template;   // the "default" one when several are named
};

// `path`: a tokenizer_config.json file or a folder holding one. Token fields may be strings
// or AddedToken objects ({"content": ...}); a missing file is an Error naming it.
TokenizerConfig load_tokenizer_config(const std::string& path);

}  // namespace dsv3
