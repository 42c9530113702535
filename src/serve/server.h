// `dsv3 serve`'s HTTP side, on cpp-httplib (Debian's libcpp-httplib-dev: a threaded
// HTTP/1.1 server with chunked responses, body-size limits and timeouts, and no framework
// around it). Routes: POST /v1/chat/completions and /v1/completions (streamed as
// server-sent events or answered whole), GET /v1/models, /health (503 while the model
// loads), /metrics (Prometheus). Every /v1 route checks the API key; errors are OpenAI's
// JSON. A request flows: body read (size limit, timeout) -> checked (openai.h) -> queued
// (scheduler.h) -> its tokens streamed back as text (text_stream.h). Uses serve's pieces.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "serve/metrics.h"
#include "serve/openai.h"
#include "serve/scheduler.h"

namespace httplib {
class Server;
}

namespace dsv3::serve {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8000;                    // 0: any free port (bind() says which)
  std::string api_key;                // empty: no key needed
  size_t max_body_bytes = 8 << 20;    // larger bodies: 413
  int read_timeout_seconds = 30;      // a client that stalls mid-request is dropped
  int http_threads = 64;              // connections served at once
  double keep_alive_seconds = 1.0;    // a waiting stream gets ": keep-alive" this often
};

class Server {
 public:
  Server(const ServerOptions& opt, Metrics& metrics);
  ~Server();
  int bind();    // the port; Error if the address cannot be bound
  void listen();  // serves until stop()
  void stop();
  // The model is loaded: /v1 routes answer (until then 503), /health says 200.
  void ready(const ServedModel* model, Scheduler* scheduler);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dsv3::serve
