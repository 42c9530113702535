// dsv3 tokenize / detokenize / template: text to token ids and back, and chat prompts,
// exactly as DeepSeek-V3's tokenizer does them. Output is exact (no added newline for text)
// because outside checkers compare it byte for byte.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/args.h"
#include "cli/commands.h"
#include "core/error.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/tokenizer_config.h"

namespace dsv3::cli {

namespace {

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, ": cannot open");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_exact(const std::string& s) {
  if (std::fwrite(s.data(), 1, s.size(), stdout) != s.size()) fail("cannot write to standard output");
  std::fflush(stdout);
}

struct TokenizeFlags {
  std::string model, text, file;
  bool no_special = false, bos = false;
};

void run_tokenize(const TokenizeFlags& f, bool have_text) {
  if (have_text == !f.file.empty()) fail("give exactly one of --text and --file");
  const std::string text = have_text ? f.text : read_all(f.file);
  Tokenizer tok(f.model);
  std::vector<int32_t> ids;
  if (f.bos) {
    const TokenizerConfig config = load_tokenizer_config(f.model);
    if (!config.bos_token) fail(config.path, ": has no bos_token (needed for --bos)");
    const auto bos = tok.token_id(*config.bos_token);
    if (!bos) fail(config.path, ": bos_token \"", *config.bos_token, "\" is not a token of the tokenizer");
    ids.push_back(*bos);
  }
  const std::vector<int32_t> body = tok.encode(text, EncodeOptions{.split_special = f.no_special});
  ids.insert(ids.end(), body.begin(), body.end());
  write_exact(ids_json(ids) + "\n");
}

struct DetokenizeFlags {
  std::string model, ids;
  bool skip_special = false;
};

void run_detokenize(const DetokenizeFlags& f) {
  const std::vector<int32_t> ids = parse_ids(f.ids, "--ids");
  Tokenizer tok(f.model);
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] >= tok.vocab_size()) fail("--ids: id ", ids[i], " at index ", i, " is outside the vocabulary [0, ", tok.vocab_size(), ")");
  write_exact(tok.decode(ids, f.skip_special));
}

struct TemplateFlags {
  std::string model, messages;
  bool generation_prompt = false;
};

void run_template(const TemplateFlags& f) {
  const TokenizerConfig config = load_tokenizer_config(f.model);
  nlohmann::ordered_json messages;
  try {
    messages = nlohmann::ordered_json::parse(read_all(f.messages));
  } catch (const nlohmann::json::exception& e) {
    fail(f.messages, ": not valid JSON: ", e.what());
  }
  if (messages.is_object() && messages.contains("messages")) messages = messages["messages"];
  if (!messages.is_array()) fail(f.messages, ": expected a JSON array of {\"role\", \"content\"} messages");
  write_exact(apply_chat_template(config, messages, f.generation_prompt));
}

}  // namespace

void add_tokenize(CLI::App& app) {
  auto f = std::make_shared<TokenizeFlags>();
  CLI::App* cmd = app.add_subcommand("tokenize", "Encode text into token ids (printed as one JSON array)");
  cmd->add_option("--model,-m", f->model, "folder with tokenizer.json")->required()->check(CLI::ExistingDirectory);
  CLI::Option* text = cmd->add_option("--text", f->text, "the text to encode");
  cmd->add_option("--file", f->file, "encode the bytes of this file")->check(CLI::ExistingFile);
  cmd->add_flag("--no-special", f->no_special, "treat special tokens written in the text as plain text");
  cmd->add_flag("--bos", f->bos, "prepend the BOS token of tokenizer_config.json");
  cmd->callback([f, text] { run_tokenize(*f, text->count() > 0); });
}

void add_detokenize(CLI::App& app) {
  auto f = std::make_shared<DetokenizeFlags>();
  CLI::App* cmd = app.add_subcommand("detokenize", "Decode token ids into text (printed exactly, no newline added)");
  cmd->add_option("--model,-m", f->model, "folder with tokenizer.json")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--ids", f->ids, "token ids: \"1 2 3\"")->required();
  cmd->add_flag("--skip-special", f->skip_special, "drop special tokens (BOS, EOS, ...)");
  cmd->callback([f] { run_detokenize(*f); });
}

void add_template(CLI::App& app) {
  auto f = std::make_shared<TemplateFlags>();
  CLI::App* cmd = app.add_subcommand("template", "Render a chat conversation with the model's chat template");
  cmd->add_option("--model,-m", f->model, "folder with tokenizer_config.json")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--messages", f->messages, "JSON file: an array of {\"role\", \"content\"} messages")->required()->check(CLI::ExistingFile);
  cmd->add_flag("--generation-prompt", f->generation_prompt, "end with the assistant prompt (add_generation_prompt)");
  cmd->callback([f] { run_template(*f); });
}

}  // namespace dsv3::cli
