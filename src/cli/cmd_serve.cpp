// dsv3 serve: an OpenAI-compatible HTTP server for a Hugging Face checkpoint folder.
#include <CLI/CLI.hpp>
#include <atomic>
#include <csignal>
#include <exception>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <thread>
#include <unistd.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "core/error.h"
#include "serve/disk_cache.h"
#include "serve/server.h"
#include "tokenizer/tokenizer_config.h"

namespace dsv3::cli {

namespace {

struct ServeFlags {
  std::string model, host = "127.0.0.1", api_key, served_name, speculative, attn = "auto";
  int port = 8000, threads = 0, request_timeout = 30, http_threads = 0;
  int64_t draft = 1, kv_cache_tokens = 0, max_batch = 32, max_model_len = 0, max_step_tokens = 512, max_queue = 256;
  int64_t max_body_bytes = 8 << 20;
  bool no_prefix_cache = false;
  std::string cache_dir;
  double cache_dir_gb = 16;
};

void serve(const ServeFlags& f) {
  if (f.draft != 1 && f.speculative.empty()) fail("--draft ", f.draft, " goes with --speculative mtp");
  if (f.draft < 1 || f.draft > 8) fail("--draft must be in 1..8, not ", f.draft);
  if (f.port < 0 || f.port > 65535) fail("--port must be in 0..65535 (0: any free port), not ", f.port);
  if (f.max_body_bytes < 1024) fail("--max-body-bytes must be at least 1024, not ", f.max_body_bytes);
  if (!(f.cache_dir_gb > 0)) fail("--cache-dir-gb must be > 0, not ", f.cache_dir_gb);
  if (f.request_timeout < 1) fail("--request-timeout must be at least 1 second, not ", f.request_timeout);
  if (!std::filesystem::is_directory(f.model)) fail("--model: ", f.model, " is not a folder");
  set_threads(f.threads);
  // SIGINT and SIGTERM are waited for by this thread only: blocked before any thread starts.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT), sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  serve::Metrics metrics;
  serve::ServerOptions so;
  so.host = f.host, so.port = f.port;
  so.api_key = f.api_key.empty() && std::getenv("DSV3_API_KEY") ? std::getenv("DSV3_API_KEY") : f.api_key;
  so.max_body_bytes = size_t(f.max_body_bytes);
  so.read_timeout_seconds = f.request_timeout;
  so.http_threads = f.http_threads > 0 ? f.http_threads : int(f.max_queue + f.max_batch + 16);
  serve::Server server(so, metrics);
  const int port = server.bind();
  std::atomic<bool> stopping{false};
  std::thread listener([&] {
    server.listen();
    if (!stopping) kill(getpid(), SIGTERM);  // the server stopped by itself: so does the process
  });
  std::fprintf(stderr, "dsv3 serve: listening on http://%s:%d (loading %s)\n", f.host.c_str(), port, f.model.c_str());
  // The model loads on a thread of its own, so that this one can wait for a signal at once:
  // a server still loading stops on Ctrl-C too.
  std::unique_ptr<Transformer> model;
  std::unique_ptr<Tokenizer> tokenizer;
  std::unique_ptr<TokenizerConfig> config;
  serve::ServedModel m;
  std::unique_ptr<serve::Scheduler> scheduler;
  std::exception_ptr load_error;            // written before state says "failed"
  std::atomic<int> state{0};                 // 0 loading, 1 loaded, 2 failed
  std::thread loader([&] {
    try {
      model = std::make_unique<Transformer>(f.model);
      if (f.attn == "naive") model->attn_form = AttnForm::naive;
      if (f.attn == "absorbed") model->attn_form = AttnForm::absorbed;
      if (std::filesystem::exists(f.model + "/tokenizer.json")) tokenizer = std::make_unique<Tokenizer>(f.model + "/tokenizer.json");
      if (tokenizer && std::filesystem::exists(f.model + "/tokenizer_config.json"))
        config = std::make_unique<TokenizerConfig>(load_tokenizer_config(f.model + "/tokenizer_config.json"));
      m.name = f.served_name.empty() ? std::filesystem::path(f.model).lexically_normal().filename().string() : f.served_name;
      if (m.name.empty()) m.name = std::filesystem::absolute(f.model).parent_path().filename().string();
      m.tokenizer = tokenizer.get(), m.config = config.get();
      m.reasoning = config && config->chat_template && config->chat_template->find("</think>") != std::string::npos;
      m.speculative = f.speculative == "mtp", m.draft = f.draft;
      m.eos = model->config().eos_token_ids;
      serve::SchedulerOptions sched_opt;
      sched_opt.max_sequences = f.max_batch;
      sched_opt.max_len = f.max_model_len > 0 ? f.max_model_len : model->config().max_position_embeddings;
      sched_opt.step_tokens = std::max(f.max_step_tokens, f.max_batch);
      sched_opt.cache_tokens = f.kv_cache_tokens;
      sched_opt.max_queue = f.max_queue;
      sched_opt.prefix_cache = !f.no_prefix_cache;
      sched_opt.model_id = serve::checkpoint_identity(f.model);
      sched_opt.cache_dir = f.cache_dir;
      sched_opt.cache_dir_bytes = int64_t(f.cache_dir_gb * double(1 << 30));
      m.context = sched_opt.max_len;
      m.max_n = f.max_batch;
      scheduler = std::make_unique<serve::Scheduler>(*model, sched_opt, metrics);
      server.ready(&m, scheduler.get());
      state = 1;
      std::fprintf(stderr, "dsv3 serve: ready: model '%s', %lld sequences at once, context %lld, KV cache %lld pages of 64\n",
                   m.name.c_str(), (long long)f.max_batch, (long long)m.context, (long long)scheduler->gauges().total_pages);
    } catch (...) {
      load_error = std::current_exception();
      state = 2;
      kill(getpid(), SIGTERM);  // wakes the waiting thread below
    }
  });
  int sig = 0;
  sigwait(&signals, &sig);
  stopping = true;
  pthread_sigmask(SIG_UNBLOCK, &signals, nullptr);  // a second Ctrl-C ends the process at once
  const int loaded = state.load();
  if (loaded == 0) {  // interrupted while loading: nothing to save, and no way to cut a load short
    std::fprintf(stderr, "dsv3 serve: %s while loading, stopping\n", sig == SIGINT ? "interrupted" : "terminated");
    std::_Exit(128 + sig);
  }
  server.stop();
  listener.join();
  loader.join();
  if (loaded == 2) std::rethrow_exception(load_error);
  std::fprintf(stderr, "dsv3 serve: %s, stopping\n", sig == SIGINT ? "interrupted" : "terminated");
  scheduler->flush_disk_cache();
  scheduler.reset();  // before the model it runs
}

}  // namespace

void add_serve(CLI::App& app) {
  auto f = std::make_shared<ServeFlags>();
  CLI::App* cmd = app.add_subcommand("serve", "OpenAI-compatible HTTP server (chat and completions, streaming, context cache)");
  cmd->add_option("--model,-m", f->model, "Hugging Face checkpoint folder")->required();
  cmd->add_option("--host", f->host, "address to listen on (default 127.0.0.1)");
  cmd->add_option("--port", f->port, "port (0: any free port, printed on stderr; default 8000)");
  cmd->add_option("--api-key", f->api_key, "require 'Authorization: Bearer KEY' on /v1 routes (default: $DSV3_API_KEY, else none)");
  cmd->add_option("--served-model-name", f->served_name, "the model id clients name (default: the folder's name)");
  cmd->add_option("--speculative", f->speculative, "mtp: the checkpoint's MTP module drafts tokens")->check(CLI::IsMember({"mtp"}));
  cmd->add_option("--draft", f->draft, "drafts per check with --speculative mtp (1..8)");
  cmd->add_option("--max-batch", f->max_batch, "sequences running at once (default 32)");
  cmd->add_option("--max-model-len", f->max_model_len, "positions per sequence (default: max_position_embeddings)");
  cmd->add_option("--max-step-tokens", f->max_step_tokens, "tokens per batch step: prompts are read in chunks within it (default 512)");
  cmd->add_option("--kv-cache-tokens", f->kv_cache_tokens, "positions in the KV cache pool (default: max-batch x max-model-len)");
  cmd->add_option("--max-queue", f->max_queue, "requests waiting beyond the running ones; more get 429 (default 256)");
  cmd->add_option("--max-body-bytes", f->max_body_bytes, "larger request bodies get 413 (default 8 MiB)");
  cmd->add_option("--request-timeout", f->request_timeout, "seconds to read a request or write to a stalled client (default 30)");
  cmd->add_option("--http-threads", f->http_threads, "connections served at once (default: max-queue + max-batch + 16)");
  cmd->add_option("--cache-dir", f->cache_dir, "keep the context cache on disk too, across restarts (one file per 64-token block)");
  cmd->add_option("--cache-dir-gb", f->cache_dir_gb, "the disk cache's budget; the oldest files go first (default 16)");
  cmd->add_flag("--no-prefix-cache", f->no_prefix_cache, "do not keep prompt prefixes for later requests");
  cmd->add_option("--attn", f->attn, "MLA form")->check(CLI::IsMember({"auto", "absorbed", "naive"}));
  cmd->add_option("--threads,-t", f->threads, "CPU threads (default: all)");
  cmd->callback([f] { serve(*f); });
}

}  // namespace dsv3::cli
