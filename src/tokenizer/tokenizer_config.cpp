// tokenizer_config.json loading (see tokenizer_config.h).
#include "tokenizer/tokenizer_config.h"

#include <sys/stat.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"

namespace dsv3 {

TokenizerConfig load_tokenizer_config(const std::string& path) {
  struct stat st {};
  TokenizerConfig c;
  c.path = ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode) ? path + "/tokenizer_config.json" : path;
  std::ifstream in(c.path, std::ios::binary);
  if (!in) fail(c.path, ": cannot open");
  std::ostringstream ss;
  ss << in.rdbuf();
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(ss.str());
  } catch (const nlohmann::json::exception& e) {
    fail(c.path, ": not valid JSON: ", e.what());
  }
  if (!j.is_object()) fail(c.path, ": not a JSON object");

  auto token = [&](const char* key) -> std::optional<std::string> {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) return std::nullopt;
    if (it->is_string()) return it->get<std::string>();
    if (it->is_object() && it->contains("content") && (*it)["content"].is_string()) return (*it)["content"].get<std::string>();
    fail(c.path, ": ", key, " is neither a string nor an object with a \"content\" string");
  };
  auto flag = [&](const char* key, bool fallback) {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) return fallback;
    if (!it->is_boolean()) fail(c.path, ": ", key, " is not true or false");
    return it->get<bool>();
  };
  c.bos_token = token("bos_token");
  c.eos_token = token("eos_token");
  c.pad_token = token("pad_token");
  c.unk_token = token("unk_token");
  c.add_bos_token = flag("add_bos_token", false);
  c.add_eos_token = flag("add_eos_token", false);

  if (auto it = j.find("chat_template"); it != j.end() && !it->is_null()) {
    if (it->is_string()) {
      c.chat_template = it->get<std::string>();
    } else if (it->is_array()) {  // [{"name": "default", "template": "..."}, ...]
      for (const auto& t : *it)
        if (t.is_object() && t.value("name", "") == "default" && t.contains("template") && t["template"].is_string())
          c.chat_template = t["template"].get<std::string>();
      if (!c.chat_template) fail(c.path, ": chat_template lists named templates but none is named \"default\"");
    } else {
      fail(c.path, ": chat_template is neither a string nor a list of named templates");
    }
  }
  return c;
}

}  // namespace dsv3
