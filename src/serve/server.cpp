// The HTTP routes (see server.h).
#include "serve/server.h"

#include <arpa/inet.h>
#include <httplib.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <chrono>
#include <cstdio>
#include <ctime>
#include <random>

#include "core/error.h"
#include "serve/text_stream.h"
#include "serve/tool_calls.h"

namespace dsv3::serve {

using nlohmann::json;

namespace {

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string random_id(const char* prefix) {
  static thread_local std::mt19937_64 rng(std::random_device{}());
  char buf[40];
  std::snprintf(buf, sizeof buf, "%s%016llx%08llx", prefix, (unsigned long long)rng(), (unsigned long long)(rng() >> 32));
  return buf;
}

// Compares in a time that depends on the key's length only, not on where they differ.
bool same_key(const std::string& given, const std::string& key) {
  unsigned diff = given.size() != key.size();
  for (size_t i = 0; i < key.size(); ++i) diff |= static_cast<unsigned char>(key[i] ^ (i < given.size() ? given[i] : 0));
  return diff == 0;
}

// How deep a JSON text nests (brackets outside strings): a body is checked before it is
// parsed, so that a hostile depth cannot exhaust the stack of a recursive walk.
int nesting(const std::string& text) {
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      deepest = std::max(deepest, ++depth);
    } else if (c == '}' || c == ']') {
      --depth;
    }
  }
  return deepest;
}

void send_error(httplib::Response& res, const ApiError& e) {
  res.status = e.status;
  res.set_content(dump(error_body(e)), "application/json");
}

// One request's answer being built: its text streams, what was already sent, its ids.
struct Answer {
  std::shared_ptr<Request> request;
  CompletionRequest req;
  const ServedModel* model;
  std::string id;
  int64_t created;
  std::vector<TextStream> texts;
  std::vector<size_t> consumed;       // tokens taken from each choice
  std::vector<int64_t> used;          // tokens each choice generated (up to a stop string)
  std::vector<std::string> finish;    // "" while running; "stop" or "length"
  std::vector<bool> closed;           // its last text and finish_reason taken
  std::vector<std::string> content, reasoning;  // whole answers (not streamed)
  std::vector<std::vector<int32_t>> tokens;     // per choice, for logprobs
  std::vector<std::vector<TokenLogprobs>> logprobs;
  std::vector<size_t> text_offset;              // completions' logprobs
  std::vector<bool> in_tools;                   // the choice's text reached its tool calls
  std::vector<std::string> tool_text;           // from the tool calls' first marker on
  std::vector<std::vector<ToolCall>> calls;     // parsed when the choice ends
  bool role_sent = false, finished = false;
  double last_write = now_seconds();  // a whole answer's spaces: at least one per keep-alive interval
  std::string error;
  int64_t cache_hit = 0;

  Answer(std::shared_ptr<Request> r, CompletionRequest c, const ServedModel* m)
      : request(std::move(r)), req(std::move(c)), model(m) {
    id = random_id(req.chat ? "chatcmpl-" : "cmpl-");
    created = int64_t(std::time(nullptr));
    const size_t n = req.options.size();
    std::vector<int32_t> keep;  // a tool call's markup stays in the text until parsed
    if (req.tools && model->tokenizer)
      for (const std::string& marker : tool_markers())
        if (auto id = model->tokenizer->token_id(marker)) keep.push_back(*id);
    const std::vector<std::string> hold = req.tools ? std::vector<std::string>{kToolCallsBegin} : std::vector<std::string>{};
    for (size_t i = 0; i < n; ++i)
      texts.emplace_back(model->tokenizer, req.stop, true, req.chat && model->reasoning, req.thinking, keep, hold);
    in_tools.assign(n, false), tool_text.resize(n), calls.resize(n);
    closed.assign(n, false), consumed.assign(n, 0), used.assign(n, 0), finish.assign(n, ""), content.assign(n, ""), reasoning.assign(n, "");
    tokens.resize(n), logprobs.resize(n), text_offset.assign(n, 0);
  }

  // Waits up to `wait` for news from the engine and takes it into the text streams; the
  // per-choice new tokens (and their log-probabilities) since the last call.
  struct News {
    std::vector<std::vector<int32_t>> tokens;
    std::vector<std::vector<TokenLogprobs>> logprobs;
    std::vector<std::string> content, reasoning;
    std::vector<bool> ended;  // the choice ended in this news
  };
  bool take(double wait, News& news, bool& cancel_some) {
    Request& r = *request;
    const size_t n = texts.size();
    news = News{};
    news.tokens.resize(n), news.logprobs.resize(n), news.content.resize(n), news.reasoning.resize(n), news.ended.assign(n, false);
    bool any = false;
    {
      std::unique_lock lock(r.mutex);
      auto fresh = [&] {
        if (r.done) return true;
        for (size_t i = 0; i < n; ++i)
          if (finish[i].empty() && (r.choices[i].tokens.size() > consumed[i] || r.choices[i].finished)) return true;
        return false;
      };
      r.changed.wait_for(lock, std::chrono::duration<double>(wait), fresh);
      cache_hit = r.cache_hit;
      if (!r.error.empty()) {  // the engine failed the request: an error, not finish reasons
        error = r.error, finished = true;
        return true;
      }
      for (size_t i = 0; i < n; ++i) {
        if (!finish[i].empty()) continue;
        const Choice& c = r.choices[i];
        news.tokens[i].assign(c.tokens.begin() + long(consumed[i]), c.tokens.end());
        if (c.logprobs.size() == c.tokens.size())
          news.logprobs[i].assign(c.logprobs.begin() + long(consumed[i]), c.logprobs.end());
        consumed[i] = c.tokens.size();
        if (c.finished) {
          // A constrained answer that could not be completed ended without valid JSON.
          const auto& constraint = r.options[i].constraint;
          finish[i] = c.stopped_at_eos && !(constraint && constraint->failed()) ? "stop" : "length";
        }
      }
    }
    for (size_t i = 0; i < n; ++i) {
      if (closed[i]) continue;
      bool stopped = false;
      size_t kept = 0;
      for (int32_t t : news.tokens[i]) {
        ++kept;
        if (!texts[i].push(t)) {
          stopped = true;
          break;
        }
      }
      news.tokens[i].resize(kept);
      if (news.logprobs[i].size() > kept) news.logprobs[i].resize(kept);
      used[i] += int64_t(kept);
      if (stopped) {
        if (finish[i].empty() || finish[i] == "length") cancel_some = true;
        finish[i] = "stop";
        std::lock_guard lock(r.mutex);
        r.choices[i].cancel = true;
      }
      if (!finish[i].empty()) {
        texts[i].finish();
        news.ended[i] = closed[i] = true;
      }
      news.content[i] = texts[i].take_content();
      news.reasoning[i] = texts[i].take_reasoning();
      if (req.tools) {  // text from the tool calls' first marker on is parsed, not sent
        std::string& piece = news.content[i];
        if (in_tools[i]) {
          tool_text[i] += piece, piece.clear();
        } else if (const size_t at = piece.find(kToolCallsBegin); at != std::string::npos) {
          tool_text[i] = piece.substr(at), piece.resize(at), in_tools[i] = true;
        }
        if (news.ended[i] && in_tools[i]) {
          calls[i] = parse_tool_calls(tool_text[i]).calls;
          if (calls[i].empty()) piece += tool_text[i];  // no complete call: the text is the answer
          else if (finish[i] == "stop") finish[i] = "tool_calls";
        }
      }
      tokens[i].insert(tokens[i].end(), news.tokens[i].begin(), news.tokens[i].end());
      logprobs[i].insert(logprobs[i].end(), news.logprobs[i].begin(), news.logprobs[i].end());
      content[i] += news.content[i], reasoning[i] += news.reasoning[i];
      any = any || !news.tokens[i].empty() || news.ended[i];
    }
    finished = true;
    for (const std::string& f : finish) finished = finished && !f.empty();
    return any || !error.empty();
  }

  int64_t completion_tokens() const {
    int64_t n = 0;
    for (int64_t u : used) n += u;
    return n;
  }

  json usage() const { return usage_json(int64_t(req.prompt.size()), completion_tokens(), cache_hit); }

  json whole() {  // the non-streamed response
    json choices = json::array();
    for (size_t i = 0; i < texts.size(); ++i) {
      json c = {{"index", i}, {"finish_reason", finish[i]}, {"logprobs", nullptr}};
      if (req.chat) {
        json message = {{"role", "assistant"}, {"content", content[i]}};
        if (!calls[i].empty()) {
          if (content[i].empty()) message["content"] = nullptr;
          message["tool_calls"] = tool_calls_json(i, false);
        }
        if (model->reasoning) message["reasoning_content"] = reasoning[i];
        c["message"] = message;
        if (req.logprobs >= 0) {
          json lp = json::array();
          for (size_t t = 0; t < tokens[i].size() && t < logprobs[i].size(); ++t)
            lp.push_back(chat_logprob(model->tokenizer, tokens[i][t], logprobs[i][t]));
          c["logprobs"] = json{{"content", lp}};
        }
      } else {
        c["text"] = content[i];
        if (req.logprobs >= 0) c["logprobs"] = completion_logprobs(model->tokenizer, tokens[i], logprobs[i], 0);
      }
      choices.push_back(c);
    }
    return json{{"id", id},
                {"object", req.chat ? "chat.completion" : "text_completion"},
                {"created", created},
                {"model", model->name},
                {"system_fingerprint", "dsv3"},
                {"choices", choices},
                {"usage", usage()}};
  }

  // A choice's tool calls as a message's tool_calls (or a stream's delta, with indexes).
  json tool_calls_json(size_t i, bool delta) const {
    json out = json::array();
    for (size_t k = 0; k < calls[i].size(); ++k) {
      json call = {{"id", calls[i][k].id}, {"type", "function"},
                   {"function", {{"name", calls[i][k].name}, {"arguments", calls[i][k].arguments}}}};
      if (delta) call["index"] = k;
      out.push_back(call);
    }
    return out;
  }

  json chunk(json choices) const {
    return json{{"id", id},
                {"object", req.chat ? "chat.completion.chunk" : "text_completion"},
                {"created", created},
                {"model", model->name},
                {"system_fingerprint", "dsv3"},
                {"choices", std::move(choices)}};
  }

  // The server-sent events for news (one chunk per choice that has any).
  std::string events(const News& news) {
    std::string out;
    const size_t n = texts.size();
    if (req.chat && !role_sent) {
      role_sent = true;
      for (size_t i = 0; i < n; ++i)
        out += "data: " + dump(chunk(json::array({json{{"index", i}, {"delta", {{"role", "assistant"}, {"content", ""}}}, {"logprobs", nullptr}, {"finish_reason", nullptr}}}))) + "\n\n";
    }
    for (size_t i = 0; i < n; ++i) {
      if (news.tokens[i].empty() && !news.ended[i]) continue;
      json c = {{"index", i}, {"logprobs", nullptr}, {"finish_reason", nullptr}};
      if (req.chat) {
        json delta = json::object();
        if (!news.content[i].empty() || news.reasoning[i].empty()) delta["content"] = news.content[i];
        if (!news.reasoning[i].empty()) delta["reasoning_content"] = news.reasoning[i];
        if (news.ended[i] && !calls[i].empty()) delta["tool_calls"] = tool_calls_json(i, true);
        c["delta"] = delta;
        if (req.logprobs >= 0) {
          json lp = json::array();
          for (size_t t = 0; t < news.tokens[i].size() && t < news.logprobs[i].size(); ++t)
            lp.push_back(chat_logprob(model->tokenizer, news.tokens[i][t], news.logprobs[i][t]));
          c["logprobs"] = json{{"content", lp}};
        }
      } else {
        c["text"] = news.content[i];
        if (req.logprobs >= 0) {
          c["logprobs"] = completion_logprobs(model->tokenizer, news.tokens[i], news.logprobs[i], text_offset[i]);
          for (int32_t t : news.tokens[i]) text_offset[i] += token_text(model->tokenizer, t).size();
        }
      }
      if (news.ended[i]) c["finish_reason"] = finish[i];
      out += "data: " + dump(chunk(json::array({c}))) + "\n\n";
    }
    return out;
  }
};

}  // namespace

struct Server::Impl {
  ServerOptions opt;
  Metrics& metrics;
  httplib::Server http;
  std::atomic<const ServedModel*> model{nullptr};
  std::atomic<Scheduler*> scheduler{nullptr};

  Impl(const ServerOptions& o, Metrics& m) : opt(o), metrics(m) {}

  bool authorized(const httplib::Request& req, httplib::Response& res) {
    if (opt.api_key.empty()) return true;
    const std::string header = req.get_header_value("Authorization");
    const std::string bearer = "Bearer ";
    if (header.compare(0, bearer.size(), bearer) == 0 && same_key(header.substr(bearer.size()), opt.api_key)) return true;
    send_error(res, ApiError(401, header.empty() ? "Missing API key: send 'Authorization: Bearer KEY'" : "Incorrect API key provided",
                             "invalid_request_error", "", "invalid_api_key"));
    return false;
  }

  // The loaded model, or a 503 answer while it loads.
  bool loaded(httplib::Response& res) {
    if (model.load() && scheduler.load()) return true;
    res.set_header("Retry-After", "1");
    send_error(res, ApiError(503, "The model is still loading", "server_error", "", "model_loading"));
    return false;
  }

  void completions(const httplib::Request& hreq, httplib::Response& res, bool chat) {
    if (!authorized(hreq, res) || !loaded(res)) return;
    const ServedModel& m = *model.load();
    Scheduler& sched = *scheduler.load();
    json body;
    if (nesting(hreq.body) > 64)
      return send_error(res, ApiError(400, "The request body nests JSON more than 64 deep", "invalid_request_error", "", "invalid_json"));
    try {
      body = json::parse(hreq.body);
    } catch (const json::exception& e) {
      return send_error(res, ApiError(400, std::string("The request body is not valid JSON: ") + e.what(), "invalid_request_error", "", "invalid_json"));
    }
    thread_local EncodeState encode_state;
    auto request = std::make_shared<Request>();
    std::shared_ptr<Answer> answer;
    try {
      CompletionRequest cr = parse_completion_request(body, chat, m, encode_state);
      request->prompt = cr.prompt;
      request->options = cr.options;
      request->arrived = now_seconds();
      try {
        sched.check(*request);
      } catch (const Error& e) {
        const std::string what = e.what();
        const bool too_long = what.find("context") != std::string::npos || what.find("pages") != std::string::npos;
        bad_request(too_long ? (chat ? "messages" : "prompt") : "n", what, too_long ? "context_length_exceeded" : "invalid_value");
      }
      answer = std::make_shared<Answer>(request, std::move(cr), &m);
    } catch (const ApiError& e) {
      return send_error(res, e);
    }
    if (!sched.submit(request)) {
      res.set_header("Retry-After", "1");
      return send_error(res, ApiError(429, "The server's queue is full; retry later", "rate_limit_error", "", "queue_full"));
    }
    // The answer is written as the engine makes it: events for a stream, else the whole
    // JSON at the end with spaces before it while waiting (valid JSON, and a write that
    // fails tells that the client left). A client that leaves cancels its request.
    Scheduler* s = &sched;
    const double keep_alive = opt.keep_alive_seconds;
    auto cancel = [request, s] {
      {
        std::lock_guard lock(request->mutex);
        request->cancel_all = true;
      }
      s->wake();
    };
    auto provider = [answer, cancel, s, keep_alive](size_t, httplib::DataSink& sink) {
      Answer& a = *answer;
      Answer::News news;
      bool cancel_some = false;
      const bool got = a.take(keep_alive, news, cancel_some);
      if (cancel_some) s->wake();
      std::string out;
      if (a.req.stream) {
        out = got ? a.events(news) : ": keep-alive\n\n";
        if (a.finished || !a.error.empty()) {
          if (!a.error.empty())
            out += "data: " + dump(error_body(ApiError(500, a.error, "server_error"))) + "\n\n";
          else if (a.req.include_usage)
            out += "data: " + dump(json{{"id", a.id}, {"object", a.req.chat ? "chat.completion.chunk" : "text_completion"},
                                        {"created", a.created}, {"model", a.model->name}, {"choices", json::array()},
                                        {"usage", a.usage()}}) + "\n\n";
          out += "data: [DONE]\n\n";
        }
      } else if (!a.error.empty()) {
        out = dump(error_body(ApiError(500, a.error, "server_error")));
      } else if (a.finished) {
        out = dump(a.whole());
      } else if (now_seconds() - a.last_write >= keep_alive) {
        out = " ";  // tells whether the client is still there
      }
      if (!out.empty()) a.last_write = now_seconds();
      if (!out.empty() && !sink.write(out.data(), out.size())) {
        cancel();
        return false;
      }
      if (a.finished || !a.error.empty()) sink.done();
      return true;
    };
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(answer->req.stream ? "text/event-stream" : "application/json", provider,
                                     [cancel, answer](bool success) {
                                       if (!success || !answer->finished) cancel();
                                     });
  }

  void routes() {
    http.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
      const bool ok = model.load() && scheduler.load();
      res.status = ok ? 200 : 503;
      res.set_content(ok ? R"({"status":"ok"})" : R"({"status":"loading"})", "application/json");
    });
    http.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      Gauges g;
      if (Scheduler* s = scheduler.load()) g = s->gauges(), g.ready = true;
      res.set_content(metrics.render(g), "text/plain; version=0.0.4");
    });
    auto model_json = [](const ServedModel& m) {
      return json{{"id", m.name}, {"object", "model"}, {"created", 0}, {"owned_by", "dsv3"}, {"max_model_len", m.context}};
    };
    http.Get("/v1/models", [this, model_json](const httplib::Request& req, httplib::Response& res) {
      if (!authorized(req, res) || !loaded(res)) return;
      res.set_content(dump(json{{"object", "list"}, {"data", json::array({model_json(*model.load())})}}), "application/json");
    });
    http.Get(R"(/v1/models/(.+))", [this, model_json](const httplib::Request& req, httplib::Response& res) {
      if (!authorized(req, res) || !loaded(res)) return;
      if (req.matches[1] != model.load()->name)
        return send_error(res, ApiError(404, "The model '" + std::string(req.matches[1]) + "' does not exist", "invalid_request_error", "model", "model_not_found"));
      res.set_content(dump(model_json(*model.load())), "application/json");
    });
    http.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) { completions(req, res, true); });
    http.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) { completions(req, res, false); });
    // Anything else (unknown routes, bodies over the limit, malformed HTTP) as OpenAI's errors.
    http.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
      if (!res.body.empty()) return;
      if (res.status == 404)
        send_error(res, ApiError(404, "Unknown route: " + req.method + " " + req.path, "invalid_request_error", "", "unknown_url"));
      else if (res.status == 413)
        send_error(res, ApiError(413, "The request body is larger than the server accepts (--max-body-bytes)", "invalid_request_error", "", "request_too_large"));
      else
        send_error(res, ApiError(res.status, "HTTP error " + std::to_string(res.status), res.status >= 500 ? "server_error" : "invalid_request_error"));
    });
    http.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
      std::string what = "unknown";
      try {
        std::rethrow_exception(ep);
      } catch (const std::exception& e) {
        what = e.what();
      } catch (...) {
      }
      send_error(res, ApiError(500, "Internal error: " + what, "server_error"));
    });
    http.set_logger([this](const httplib::Request& req, const httplib::Response& res) {
      std::string route = req.path;
      if (route != "/v1/chat/completions" && route != "/v1/completions" && route != "/v1/models" && route != "/health" && route != "/metrics")
        route = route.rfind("/v1/models/", 0) == 0 ? "/v1/models" : "other";
      metrics.request(route, res.status);
    });
  }
};

Server::Server(const ServerOptions& opt, Metrics& metrics) : impl_(std::make_unique<Impl>(opt, metrics)) {
  httplib::Server& h = impl_->http;
  const int threads = std::max(4, opt.http_threads);
  h.new_task_queue = [threads] { return new httplib::ThreadPool(size_t(threads)); };
  h.set_payload_max_length(opt.max_body_bytes);
  h.set_read_timeout(opt.read_timeout_seconds, 0);
  h.set_write_timeout(opt.read_timeout_seconds, 0);
  h.set_keep_alive_timeout(5);
  impl_->routes();
}

Server::~Server() { stop(); }

namespace {

// Debian's cpp-httplib is compiled with a listen backlog of 5: when more clients than that
// connect at once, Linux drops their handshakes and they retry seconds later (a load test's
// first second). listen() again on the bound socket raises the backlog; the library keeps
// the socket private, so it is found among this process's descriptors by its port.
void raise_backlog(int port) {
  for (int fd = 0; fd < 4096; ++fd) {
    sockaddr_storage addr{};
    socklen_t len = sizeof addr;
    int listening = 0;
    socklen_t optlen = sizeof listening;
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) continue;
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &optlen) != 0 || !listening) continue;
    const int p = addr.ss_family == AF_INET    ? ntohs(reinterpret_cast<sockaddr_in*>(&addr)->sin_port)
                  : addr.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port)
                                               : -1;
    if (p == port) ::listen(fd, SOMAXCONN);
  }
}

}  // namespace

int Server::bind() {
  const ServerOptions& o = impl_->opt;
  const int port = o.port == 0 ? impl_->http.bind_to_any_port(o.host) : (impl_->http.bind_to_port(o.host, o.port) ? o.port : -1);
  if (port < 0) fail("serve: cannot listen on ", o.host, ":", o.port, " (in use, or not an address of this machine)");
  raise_backlog(port);
  return port;
}

void Server::listen() { impl_->http.listen_after_bind(); }
void Server::stop() { impl_->http.stop(); }

void Server::ready(const ServedModel* model, Scheduler* scheduler) {
  impl_->scheduler = scheduler;
  impl_->model = model;
}

}  // namespace dsv3::serve
