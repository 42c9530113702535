// Helpers for the server tests: a servable folder (a golden checkpoint with a 500-token
// tokenizer learnt from the bundled corpus, so that text round-trips through its vocabulary)
// and a real server on a free loopback port, in process.
#pragma once
#include <httplib.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>

#include "model_fixture.h"
#include "serve/server.h"
#include "tokenizer/tokenizer_config.h"

namespace dsv3::test {

// The same with a DeepSeek-R1-style template: the generation prompt opens "<think>\n", and
// earlier answers keep only what follows their "</think>".
inline const std::string& reasoning_model() {
  static const std::string dir = [] {
    const std::string d = servable_model() + "-r1";
    std::filesystem::create_directories(d);
    for (const char* f : {"config.json", "model.safetensors", "tokenizer.json"})
      std::filesystem::copy_file(servable_model() + "/" + f, d + "/" + f, std::filesystem::copy_options::overwrite_existing);
    std::ifstream in(servable_model() + "/tokenizer_config.json");
    nlohmann::json config = nlohmann::json::parse(in);
    std::string t = config["chat_template"];
    const std::string assistant = "{{ '<｜Assistant｜>' + message['content'] + eos_token }}";
    const size_t at = t.find(assistant);
    if (at == std::string::npos) fail("the trained template changed: no assistant turn to rewrite");
    t.replace(at, assistant.size(), "{%- set content = message['content'] %}{%- if '</think>' in content %}{%- set content = "
              "content.split('</think>')[-1] %}{%- endif %}{{ '<｜Assistant｜>' + content + eos_token }}");
    const std::string prompt = "{{ '<｜Assistant｜>' }}{%- endif %}";
    if (t.rfind(prompt) == std::string::npos) fail("the trained template changed: no generation prompt to rewrite");
    t.replace(t.rfind(prompt), prompt.size(), "{{ '<｜Assistant｜><think>\\n' }}{%- endif %}");
    config["chat_template"] = t;
    std::ofstream(d + "/tokenizer_config.json") << config.dump();
    return d;
  }();
  return dir;
}

// A server with its model loaded, listening on 127.0.0.1 at port().
class TestServer {
 public:
  explicit TestServer(serve::SchedulerOptions so = {}, serve::ServerOptions opt = {}, bool speculative = false,
                      const std::string& dir = servable_model())
      : model_(dir), tokenizer_(dir + "/tokenizer.json"), config_(load_tokenizer_config(dir)) {
    opt.host = "127.0.0.1", opt.port = 0;
    server_ = std::make_unique<serve::Server>(opt, metrics_);
    port_ = server_->bind();
    listener_ = std::thread([this] { server_->listen(); });
    served_.name = "tiny";
    served_.tokenizer = &tokenizer_, served_.config = &config_;
    if (so.max_len == 0) so.max_len = model_.config().max_position_embeddings;
    served_.context = so.max_len, served_.max_n = so.max_sequences;
    served_.speculative = speculative;
    served_.reasoning = config_.chat_template && config_.chat_template->find("</think>") != std::string::npos;
    served_.eos = model_.config().eos_token_ids;
    scheduler_ = std::make_unique<serve::Scheduler>(model_, so, metrics_);
    server_->ready(&served_, scheduler_.get());
  }
  ~TestServer() {
    server_->stop();
    listener_.join();
    scheduler_.reset();
  }
  int port() const { return port_; }
  httplib::Client client() const {
    httplib::Client c("127.0.0.1", port_);
    c.set_read_timeout(60, 0);
    return c;
  }
  Transformer& model() { return model_; }
  const Tokenizer& tokenizer() const { return tokenizer_; }
  const TokenizerConfig& config() const { return config_; }
  serve::Scheduler& scheduler() { return *scheduler_; }

 private:
  Transformer model_;
  Tokenizer tokenizer_;
  TokenizerConfig config_;
  serve::Metrics metrics_;
  serve::ServedModel served_;
  std::unique_ptr<serve::Server> server_;
  std::unique_ptr<serve::Scheduler> scheduler_;
  std::thread listener_;
  int port_ = 0;
};

}  // namespace dsv3::test
