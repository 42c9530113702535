// dsv3 serve: the OpenAI request checks, streaming text (UTF-8, stop strings, reasoning), the
// context cache, and a real server on a loopback port: greedy answers equal generate()
// alone and 16 at once, streaming, n > 1, stop strings, log-probabilities, cache hits in
// 64-token blocks with the same text, OpenAI's errors for bad input, the API key, a full
// queue, 32 streaming clients, a stalled and a vanishing client, and every page back after.
#include <arpa/inet.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <fstream>
#include <functional>
#include <random>
#include <chrono>
#include <cmath>
#include <thread>
#include <tuple>

#include "core/error.h"
#include "infer/generate.h"
#include "serve/disk_cache.h"
#include "serve/json_grammar.h"
#include "serve/openai.h"
#include "serve/prefix_cache.h"
#include "serve/text_stream.h"
#include "serve/tool_calls.h"
#include "serve_util.h"
#include "tokenizer/chat_template.h"

namespace dsv3 {
namespace {

using nlohmann::json;
using testing::HasSubstr;

struct Reply {
  int status = 0;
  json body;
  std::string raw;
};

Reply post(httplib::Client& c, const std::string& path, const std::string& body, const httplib::Headers& headers = {}) {
  auto res = c.Post(path.c_str(), headers, body, "application/json");
  Reply r;
  if (!res) {
    r.raw = "no answer: " + httplib::to_string(res.error());
    return r;
  }
  r.status = res->status, r.raw = res->body;
  r.body = json::parse(res->body, nullptr, false);
  return r;
}
Reply post(httplib::Client& c, const std::string& path, const json& body, const httplib::Headers& headers = {}) {
  return post(c, path, body.dump(), headers);
}

// Text as the server sends it: special tokens dropped, invalid UTF-8 as U+FFFD.
std::string as_sent(const Tokenizer& tok, const std::vector<int32_t>& tokens) {
  return json::parse(serve::dump(json(tok.decode(tokens, true)))).get<std::string>();
}

// The value of a metric line "name value" in /metrics.
double metric(httplib::Client& c, const std::string& name) {
  auto res = c.Get("/metrics");
  if (!res) return NAN;
  const std::string& t = res->body;
  const size_t at = t.find("\n" + name + " ");
  if (at == std::string::npos) return NAN;
  return std::stod(t.substr(at + name.size() + 2));
}

// The events of a streamed answer: the JSON of each "data:" line before [DONE].
std::vector<json> events(const std::string& raw, bool& done) {
  std::vector<json> out;
  done = false;
  size_t at = 0;
  while ((at = raw.find("data: ", at)) != std::string::npos) {
    const size_t end = raw.find("\n\n", at);
    const std::string data = raw.substr(at + 6, end - at - 6);
    at = end;
    if (data == "[DONE]") {
      done = true;
      break;
    }
    out.push_back(json::parse(data));
  }
  return out;
}

// --- Streaming text -------------------------------------------------------------------

TEST(TextStream, StopStringsAcrossTokensAndSplitCharacters) {
  const Tokenizer tok(test::servable_model() + "/tokenizer.json");
  // A stop string spanning several tokens: the text before it, and nothing of it, is sent.
  const auto ids = tok.encode("And God said, Let there be light: and there was light.");
  serve::TextStream s(&tok, {"there was"});
  std::string sent;
  bool go = true;
  for (size_t i = 0; i < ids.size() && go; ++i) {
    go = s.push(ids[i]);
    sent += s.take_content();
    EXPECT_EQ(sent.find("there w"), std::string::npos) << "a stop string's start was sent early";
  }
  EXPECT_TRUE(s.stopped());
  s.finish();
  sent += s.take_content();
  EXPECT_EQ(sent, "And God said, Let there be light: and ");
  // A character split over byte tokens is held until complete.
  const auto e = tok.encode("é");
  ASSERT_EQ(e.size(), 2u);
  serve::TextStream u(&tok, {});
  u.push(e[0]);
  EXPECT_EQ(u.take_content(), "");
  u.push(e[1]);
  EXPECT_EQ(u.take_content(), "é");
  // Without a stop string everything comes out by the end, stop-like prefixes included.
  serve::TextStream t(&tok, {"light!"});
  for (int32_t id : ids) t.push(id);
  t.finish();
  EXPECT_EQ(t.take_content(), "And God said, Let there be light: and there was light.");
}

TEST(TextStream, ReasoningIsSplitFromTheAnswer) {
  const Tokenizer tok(test::servable_model() + "/tokenizer.json");
  for (bool in_prompt : {false, true}) {
    const std::string text = std::string(in_prompt ? "" : "<think>") + "Seth begat Enos.</think>\n\nSeth.";
    serve::TextStream s(&tok, {}, true, true, in_prompt);
    std::string content, reasoning;
    for (int32_t id : tok.encode(text)) {
      s.push(id);
      content += s.take_content(), reasoning += s.take_reasoning();
    }
    s.finish();
    content += s.take_content(), reasoning += s.take_reasoning();
    EXPECT_EQ(reasoning, "Seth begat Enos.");
    EXPECT_EQ(content, "Seth.");
  }
  serve::TextStream plain(&tok, {}, true, true, false);  // a reasoning model that does not think
  for (int32_t id : tok.encode("Seth.")) plain.push(id);
  plain.finish();
  EXPECT_EQ(plain.take_content(), "Seth.");
  EXPECT_EQ(plain.take_reasoning(), "");
}

// --- Request checks ---------------------------------------------------------------------

class OpenAiRequest : public testing::Test {
 protected:
  OpenAiRequest() : tok_(test::servable_model() + "/tokenizer.json"), config_(load_tokenizer_config(test::servable_model())) {
    m_.name = "tiny", m_.tokenizer = &tok_, m_.config = &config_, m_.context = 256, m_.max_n = 4;
  }
  serve::CompletionRequest parse(const std::string& body, bool chat = true) {
    return serve::parse_completion_request(json::parse(body), chat, m_, state_);
  }
  // The error a body gets: status, param and message.
  serve::ApiError error(const std::string& body, bool chat = true) {
    try {
      parse(body, chat);
    } catch (const serve::ApiError& e) {
      return e;
    }
    ADD_FAILURE() << "no error for " << body;
    return serve::ApiError(0, "", "");
  }
  Tokenizer tok_;
  TokenizerConfig config_;
  serve::ServedModel m_;
  EncodeState state_;
};

TEST_F(OpenAiRequest, ChatIsRenderedAndOptionsRead) {
  const auto r = parse(R"({"model": "tiny", "messages": [{"role": "system", "content": "Be brief."},
      {"role": "user", "content": [{"type": "text", "text": "Who begat "}, {"type": "text", "text": "Enos?"}]}],
      "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 20, "seed": 11, "n": 2, "stop": ["\n", "Amen"],
      "stream": true, "stream_options": {"include_usage": true}, "logprobs": true, "top_logprobs": 3, "user": "u1",
      "ignore_eos": true})");
  const std::string expect =
      apply_chat_template(config_, nlohmann::ordered_json::parse(R"([{"role": "system", "content": "Be brief."},
      {"role": "user", "content": "Who begat Enos?"}])"), true);
  EXPECT_EQ(r.prompt, tok_.encode(expect));
  ASSERT_EQ(r.options.size(), 2u);
  EXPECT_EQ(r.options[0].max_tokens, 7);
  EXPECT_FLOAT_EQ(r.options[0].sampling.temperature, 0.5f);
  EXPECT_FLOAT_EQ(r.options[0].sampling.top_p, 0.9f);
  EXPECT_EQ(r.options[0].sampling.top_k, 20);
  EXPECT_EQ(r.options[0].sampling.seed, 11u);
  EXPECT_EQ(r.options[1].sampling.seed, 12u);  // n > 1: each choice its own seed
  EXPECT_EQ(r.stop, (std::vector<std::string>{"\n", "Amen"}));
  EXPECT_TRUE(r.stream && r.include_usage);
  EXPECT_EQ(r.logprobs, 3);
  EXPECT_FALSE(r.options[0].stop_at_eos);  // ignore_eos
  EXPECT_TRUE(parse(R"({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})").options[0].stop_at_eos);
  // Completions: a string (with BOS when the tokenizer asks), or token ids as they are.
  const auto c = parse(R"({"model": "tiny", "prompt": [5, 6, 7], "max_completion_tokens": 3})", false);
  EXPECT_EQ(c.prompt, (std::vector<int32_t>{5, 6, 7}));
  EXPECT_EQ(c.options[0].max_tokens, 3);
  EXPECT_EQ(c.options[0].sampling.temperature, 1.0f);  // OpenAI's default
  EXPECT_EQ(parse(R"({"model": "tiny", "prompt": "In the beginning"})", false).options[0].max_tokens, 256 - int64_t(parse(R"({"model": "tiny", "prompt": "In the beginning"})", false).prompt.size()));
}

TEST_F(OpenAiRequest, BadFieldsAreNamed) {
  struct Case {
    const char* body;
    int status;
    const char* param;
    const char* says;
  };
  const Case cases[] = {
      {R"([1, 2])", 400, "", "JSON object"},
      {R"({"messages": [{"role": "user", "content": "hi"}]})", 400, "model", "required"},
      {R"({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})", 404, "model", "does not exist"},
      {R"({"model": "tiny"})", 400, "messages", "required"},
      {R"({"model": "tiny", "messages": []})", 400, "messages", "non-empty"},
      {R"({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]})", 400, "messages[0].role", "unknown role"},
      {R"({"model": "tiny", "messages": [{"role": "user"}]})", 400, "messages[0].content", "required"},
      {R"({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})", 400, "messages[0].content", "text"},
      {R"({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"})", 400, "temperature", "number"},
      {R"({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 2.5})", 400, "temperature", "[0, 2]"},
      {R"({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_p": 0})", 400, "top_p", "(0, 1]"},
      {R"({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1})", 400, "max_tokens", "[1,"},
      {R"({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1.5})", 400, "max_tokens", "integer"},
      {R"({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e300})", 400, "max_tokens", "integer"},
      {R"({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 18446744073709551615})", 400, "max_tokens", "range"},
      {R"({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000})", 400, "max_tokens", "context length"},
      {R"({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 5})", 400, "n", "[1, 4]"},
      {R"({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]})", 400, "stop", "at most 4"},
      {R"({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": [1]})", 400, "stop", "string"},
      {R"({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": ""})", 400, "stop", "empty"},
      {R"({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": true}})", 400, "stream_options", "stream"},
      {R"({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2})", 400, "top_logprobs", "logprobs"},
      {R"({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 21})", 400, "top_logprobs", "[0, 20]"},
      {R"({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5})", 400, "presence_penalty", "not supported"},
      {R"({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 10}})", 400, "logit_bias", "not supported"},
      {R"({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]})", 400, "tools", "tools[0].function"},
      {R"({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}})", 400, "response_format", "json_schema"},
      {R"({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "patternProperties": {}}}}})", 400, "response_format", "'patternProperties' is not supported"},
      {R"({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}})", 400, "response_format", "schema"},
      {R"({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "seed": "x"})", 400, "seed", "integer"},
      {R"({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "user": 5})", 400, "user", "string"},
  };
  for (const Case& c : cases) {
    const serve::ApiError e = error(c.body);
    EXPECT_EQ(e.status, c.status) << c.body;
    EXPECT_EQ(e.param, c.param) << c.body;
    EXPECT_THAT(e.message, HasSubstr(c.says)) << c.body;
  }
  const std::string long_prompt = json(std::string(2000, 'x')).dump();
  EXPECT_EQ(error(R"({"model": "tiny", "prompt": )" + long_prompt + "}", false).code, "context_length_exceeded");
  EXPECT_EQ(error(R"({"model": "tiny", "prompt": [1, -2]})", false).param, "prompt");
  EXPECT_EQ(error(R"({"model": "tiny", "prompt": [[1], [2]]})", false).param, "prompt");
  EXPECT_EQ(error(R"({"model": "tiny", "prompt": "x", "echo": true})", false).param, "echo");
  EXPECT_EQ(error(R"({"model": "tiny", "prompt": "x", "logprobs": 30})", false).param, "logprobs");
  // Harmless fields are ignored.
  EXPECT_NO_THROW(parse(R"({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "store": false,
      "metadata": {"a": "b"}, "tool_choice": "none", "presence_penalty": 0, "response_format": {"type": "text"}})"));
}

// --- Tool calls ---------------------------------------------------------------------------

TEST(ToolCalls, DeepSeekMarkupParsesIntoCalls) {
  const std::string call = std::string(serve::kToolCallBegin) + "function" + serve::kToolSep + "get_weather\n```json\n{\"city\": \"Paris\"}\n```" +
                           serve::kToolCallEnd;
  const std::string call2 = std::string(serve::kToolCallBegin) + "function" + serve::kToolSep + "now\n```json\n{}\n```" + serve::kToolCallEnd;
  const auto p = serve::parse_tool_calls("Let me look.\n\n" + std::string(serve::kToolCallsBegin) + call + "\n" + call2 + serve::kToolCallsEnd);
  EXPECT_EQ(p.content, "Let me look.");
  ASSERT_EQ(p.calls.size(), 2u);
  EXPECT_EQ(p.calls[0].name, "get_weather");
  EXPECT_EQ(json::parse(p.calls[0].arguments), json({{"city", "Paris"}}));
  EXPECT_EQ(p.calls[1].name, "now");
  EXPECT_EQ(p.calls[1].arguments, "{}");
  EXPECT_NE(p.calls[0].id, p.calls[1].id);
  EXPECT_EQ(p.calls[0].id.rfind("call_", 0), 0u);
  // Cut short: the complete calls only; no markup: all content.
  EXPECT_EQ(serve::parse_tool_calls(std::string(serve::kToolCallsBegin) + call + serve::kToolCallBegin + "function").calls.size(), 1u);
  EXPECT_EQ(serve::parse_tool_calls("plain text").content, "plain text");
  EXPECT_TRUE(serve::parse_tool_calls("plain text").calls.empty());
}

// With DeepSeek-V3's own tokenizer and template: tools described in the system prompt, an
// earlier turn's calls and the tools' results rendered as the template writes them, and the
// markup kept in a TextStream (special tokens otherwise dropped).
TEST(ToolCalls, RenderedThroughDeepSeekV3sTemplate) {
  const std::string dir = test::data_dir() + "/tokenizer";
  const Tokenizer tok(dir + "/tokenizer.json");
  const TokenizerConfig config = load_tokenizer_config(dir);
  serve::ServedModel m;
  m.name = "v3", m.tokenizer = &tok, m.config = &config, m.context = 4096, m.max_n = 1;
  EncodeState state;
  const json tools = json::parse(R"([{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])");
  const json body = {{"model", "v3"}, {"tools", tools}, {"messages", json::parse(R"([
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "Weather in Paris?"},
      {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
          "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
      {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}])")}};
  const auto r = serve::parse_completion_request(body, true, m, state);
  EXPECT_TRUE(r.tools);
  const std::string text = tok.decode(r.prompt);
  EXPECT_THAT(text, HasSubstr("Be brief.\n\n" + serve::tools_prompt(tools)));
  EXPECT_THAT(text, HasSubstr(std::string("<｜User｜>Weather in Paris?<｜Assistant｜>") + serve::kToolCallsBegin + serve::kToolCallBegin +
                              "function" + serve::kToolSep + "get_weather\n```json\n{\"city\": \"Paris\"}\n```" + serve::kToolCallEnd));
  EXPECT_THAT(text, HasSubstr("<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>18 C, sunny<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"));
  // tool_choice none: the model is not told of the tools.
  json none = body;
  none["tool_choice"] = "none";
  EXPECT_THAT(tok.decode(serve::parse_completion_request(none, true, m, state).prompt), testing::Not(HasSubstr("get_weather\n  parameters")));
  // Bad tools and forced calls are named.
  for (const auto& [field, value, says] : std::vector<std::tuple<const char*, json, const char*>>{
           {"tools", json::parse(R"([{"type": "function", "function": {"name": "bad name"}}])"), "only letters"},
           {"tools", json::parse(R"([{"type": "retrieval"}])"), "tools[0]"},
           {"tool_choice", json::parse(R"({"type": "function", "function": {"name": "nope"}})"), "no tool is named"},
           {"tool_choice", "always", "must be"}}) {
    json b = body;
    b[field] = value;
    try {
      serve::parse_completion_request(b, true, m, state);
      ADD_FAILURE() << field;
    } catch (const serve::ApiError& e) {
      EXPECT_EQ(e.param, field);
      EXPECT_THAT(e.message, HasSubstr(says));
    }
  }
  // The markup survives detokenization when kept; EOS does not.
  std::vector<int32_t> keep;
  for (const std::string& marker : serve::tool_markers())
    if (auto id = tok.token_id(marker)) keep.push_back(*id);
  ASSERT_EQ(keep.size(), serve::tool_markers().size());
  const std::string answer = std::string(serve::kToolCallsBegin) + serve::kToolCallBegin + "function" + serve::kToolSep + "get_weather\n```json\n{}\n```" +
                             serve::kToolCallEnd + serve::kToolCallsEnd;
  serve::TextStream ts(&tok, {}, true, false, false, keep);
  for (int32_t id : tok.encode(answer + "<｜end▁of▁sentence｜>")) ts.push(id);
  ts.finish();
  EXPECT_EQ(ts.take_content(), answer);
}

// A forced tool_choice: random walks under the constraint always give calls to the allowed
// tools, with arguments that parse and fit their schemas, then EOS; on the bundled 500-token
// vocabulary (markup spelt in bytes) and on DeepSeek-V3's (markup as its special tokens).
TEST(ToolCalls, ForcedChoiceConstrainsTheAnswerToCalls) {
  const json weather = json::parse(R"({"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer"}},
      "required": ["city"], "additionalProperties": false})");
  const std::vector<std::string> names = {"get_weather", "now"};
  const std::vector<std::shared_ptr<const serve::JsonGrammar>> params = {
      serve::JsonGrammar::from_schema(weather), serve::JsonGrammar::from_schema(json::parse(R"({"type": "object", "properties": {}, "additionalProperties": false})"))};
  const Tokenizer small(test::servable_model() + "/tokenizer.json"), v3(test::data_dir() + "/tokenizer/tokenizer.json");
  for (const Tokenizer* tok : {&small, &v3}) {
    std::vector<int32_t> keep;
    for (const std::string& marker : serve::tool_markers())
      if (auto id = tok->token_id(marker)) keep.push_back(*id);
    const int64_t eos = *tok->token_id("<｜end▁of▁sentence｜>"), vocab = tok->vocab_size();
    int ended = 0;
    const int walks = tok == &small ? 20 : 3;
    for (int seed = 1; seed <= walks; ++seed) {
      const bool single = seed % 2 == 0;
      serve::ToolChoiceConstraint c(single ? std::vector<std::string>{"get_weather"} : names,
                                    single ? std::vector<std::shared_ptr<const serve::JsonGrammar>>{params[0]} : params, single, *tok, {eos}, keep);
      std::mt19937 rng(static_cast<uint32_t>(seed));
      std::normal_distribution<float> noise(0, 1);
      std::vector<float> logits(static_cast<size_t>(vocab));
      std::string text;
      bool used_markup_token = false;
      for (int step = 0; step < 1000; ++step) {
        for (float& l : logits) l = noise(rng);
        logits[size_t(eos)] += 6;
        c.mask(logits.data(), vocab);
        const int32_t t = int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
        if (t == eos) {
          ++ended;
          const auto parsed = serve::parse_tool_calls(text);
          EXPECT_EQ(parsed.content, "") << text;
          ASSERT_FALSE(parsed.calls.empty()) << text;
          if (single) {
            EXPECT_EQ(parsed.calls.size(), 1u) << text;
          }
          for (const auto& call : parsed.calls) {
            const json args = json::parse(call.arguments);
            if (call.name == "get_weather") {
              EXPECT_TRUE(args["city"] == "Paris" || args["city"] == "Rome") << text;
            } else {
              EXPECT_EQ(call.name, "now") << text;
              EXPECT_TRUE(args.empty()) << text;
            }
          }
          break;
        }
        c.accept(t);
        used_markup_token = used_markup_token || std::find(keep.begin(), keep.end(), t) != keep.end();
        text += tok->token_bytes(t);
        ASSERT_FALSE(c.failed()) << text;
      }
      if (tok == &v3) {
        EXPECT_TRUE(used_markup_token) << "DeepSeek-V3's markup tokens are allowed: " << text;
      }
    }
    EXPECT_EQ(ended, walks);
  }
}

// --- Structured output -------------------------------------------------------------------

bool matches(const serve::JsonGrammar& g, const std::string& text, bool complete = true) {
  serve::JsonMatcher m(&g);
  for (char c : text)
    if (!m.feed(uint8_t(c))) return false;
  return !complete || m.can_end();
}

TEST(JsonGrammar, AnyObjectAcceptsJsonObjectsOnly) {
  const auto g = serve::JsonGrammar::any_object();
  for (const char* ok : {"{}", " {\n  \"a\": [1, 2.5e-3, -0, 0.5E+7, true, false, null, \"x\\u00e9\\n\\\"\"],\n  \"b\": {\"c\": {}}\n}",
                         "{\"\u00e9t\u00e9\": \"\u2603 \xf0\x9f\x98\x80\"}", "{\"\": []}"})
    EXPECT_TRUE(matches(*g, ok)) << ok;
  for (const char* bad : {"[]", "\"x\"", "1", "{\"a\" 1}", "{\"a\":01}", "{\"a\":1,}", "{\"a\":1}}", "{\"a\":1} ", "{a:1}",
                          "{\"a\":\"\\ud800\"}", "{\"a\":\"\x01\"}", "{\"a\":\"\xff\"}", "{\"a\":\"\xed\xa0\x80\"}",
                          "{\"a\":\"\xc0\xaf\"}", "{\"a\":tru}", "{\"a\":-}", "{\"a\":1.}", "{\"a\":1e}", "{\"a\":\"\\x\"}"})
    EXPECT_FALSE(matches(*g, bad)) << bad;
  // Numbers every parser reads; surrogate escapes refused, the code points below them not.
  EXPECT_TRUE(matches(*g, "{\"a\": [123456789012345678, 1.5e99, 0.123456789012345678901234567890, \"\\ud7ff\"]}"));
  for (const char* bad : {"{\"a\": 1234567890123456789}", "{\"a\": 1e999}", "{\"a\": 1.1234567890123456789012345678901}",
                          "{\"a\": \"\\udc00\"}"})
    EXPECT_FALSE(matches(*g, bad)) << bad;
  EXPECT_TRUE(matches(*g, "{\"a\": [1, {\"b\"", false));  // a prefix
  EXPECT_FALSE(matches(*g, "{\"a\": [1, {\"b\""));        // not complete
  // Whitespace: a space, or a newline and up to 16 spaces or tabs.
  EXPECT_TRUE(matches(*g, "{\n" + std::string(16, ' ') + "\"a\": 1\n}"));
  EXPECT_FALSE(matches(*g, "{\n" + std::string(17, ' ') + "\"a\": 1}"));
  EXPECT_FALSE(matches(*g, "{  \"a\": 1}"));
  EXPECT_FALSE(matches(*g, "{\r\n\"a\": 1}"));
}

TEST(JsonGrammar, SchemaPropertiesRequiredItemsAndEnums) {
  const auto g = serve::JsonGrammar::from_schema(json::parse(R"({"type": "object", "properties": {
      "name": {"type": "string"}, "age": {"type": "integer"}, "score": {"type": ["number", "null"]},
      "tags": {"type": "array", "items": {"enum": ["a", "b", 12, 1]}, "minItems": 1, "maxItems": 2},
      "ok": {"type": "boolean"}, "any": {}},
      "required": ["name", "age"], "additionalProperties": false})"));
  for (const char* ok : {R"({"name": "x", "age": 3})", R"({"age": -40, "name": "", "tags": ["a", 12], "ok": true})",
                         R"({"name": "x", "age": 0, "score": null, "tags": [1], "any": {"z": [null]}})",
                         R"({"name": "x", "age": 0, "score": -1.5e3})"})
    EXPECT_TRUE(matches(*g, ok)) << ok;
  for (const char* bad : {R"({"name": "x"})", R"({"name": "x", "age": 1.5})", R"({"name": "x", "age": 1, "nick": "y"})",
                          R"({"name": "x", "age": 1, "tags": []})", R"({"name": "x", "age": 1, "tags": ["a", "b", "a"]})",
                          R"({"name": "x", "age": 1, "tags": ["c"]})", R"({"name": "x", "age": 1, "tags": [13]})",
                          R"({"name": 5, "age": 1})", R"({"name": "x", "age": 1, "ok": null})", R"({"name": "x", "age": 1, "score": "1"})"})
    EXPECT_FALSE(matches(*g, bad)) << bad;
  // Extra keys are allowed by default, with any value.
  const auto open = serve::JsonGrammar::from_schema(json::parse(R"({"properties": {"a": {"type": "integer"}}})"));
  EXPECT_TRUE(matches(*open, R"({"b": "x", "a": 2, "ab": [1]})"));
  EXPECT_FALSE(matches(*open, R"({"a": "x"})"));
  EXPECT_FALSE(matches(*open, R"({"a": 1, "a": "x"})"));  // a key twice: a parser would keep the unchecked last
  // Names beyond ASCII are matched byte by byte.
  const auto accented = serve::JsonGrammar::from_schema(json::parse(R"({"properties": {"été": {"type": "integer"}, "ça": {"type": "string"}},
      "required": ["été"], "additionalProperties": false})"));
  EXPECT_TRUE(matches(*accented, R"({"ça": "oui", "été": 3})"));
  EXPECT_FALSE(matches(*accented, R"({"ét": 3})"));
  EXPECT_FALSE(matches(*accented, R"({"ça": "x"})"));
  json deep = json::object();
  for (int i = 0; i < 40; ++i) deep = json{{"items", deep}};
  EXPECT_THROW(serve::JsonGrammar::from_schema(deep), Error);
  // What is not supported, or malformed, is named.
  for (const auto& [schema, says] : std::vector<std::pair<const char*, const char*>>{
           {R"({"type": "strnig"})", "not a JSON type"}, {R"({"type": "string", "pattern": "^a"})", "'pattern' is not supported"},
           {R"({"properties": {"a": {"minimum": 1}}})", "schema.properties.a: 'minimum'"},
           {R"({"properties": {"a": {}}, "required": ["b"]})", "not one of the properties"},
           {R"({"type": "array", "minItems": 3, "maxItems": 2})", "exceeds maxItems"}, {R"({"enum": []})", "non-empty"},
           {R"({"anyOf": [{}]})", "'anyOf' is not supported"}, {R"(false)", "allows no value"}, {R"(3)", "must be an object"},
           {R"({"type": "string", "enum": ["a", 1]})", "not of the schema's type"}, {R"({"type": []})", "lists no type"},
           {R"({"type": "array", "maxItems": 18446744073709551615})", "non-negative integer"}}) {
    try {
      serve::JsonGrammar::from_schema(json::parse(schema));
      ADD_FAILURE() << "no error for " << schema;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr(says)) << schema;
    }
  }
}

// The constraint over a real vocabulary: random logits, the token chosen among the allowed,
// many times over; the text is always a prefix of valid JSON, and once EOS is chosen (only
// allowed when complete) it parses and fits the schema.
TEST(JsonConstraint, RandomWalksStayValidAndEndParsed) {
  const Tokenizer tok(test::servable_model() + "/tokenizer.json");
  const int64_t vocab = tok.vocab_size(), eos = 1;
  const auto schema = json::parse(R"({"type": "object", "properties": {"ok": {"type": "boolean"},
      "n": {"type": "integer"}, "color": {"enum": ["red", "green"]}}, "required": ["ok", "color"], "additionalProperties": false})");
  for (bool with_schema : {false, true}) {
    const auto g = with_schema ? serve::JsonGrammar::from_schema(schema) : serve::JsonGrammar::any_object();
    int ended = 0;
    for (uint32_t seed = 1; seed <= 40; ++seed) {
      serve::JsonConstraint c(g, tok, {eos});
      std::mt19937 rng(seed);
      std::normal_distribution<float> noise(0, 1);
      std::string text;
      std::vector<float> logits(static_cast<size_t>(vocab));
      for (int step = 0; step < 120; ++step) {
        for (float& l : logits) l = noise(rng);
        logits[size_t(eos)] += 4;  // end when allowed, mostly
        c.mask(logits.data(), vocab);
        const int32_t t = int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
        ASSERT_GT(logits[size_t(t)], serve::JsonConstraint::kMasked) << "every token masked after " << text;
        if (t == eos) {
          ++ended;
          const json parsed = json::parse(text);  // throws if not JSON
          EXPECT_TRUE(parsed.is_object()) << text;
          if (with_schema) {
            EXPECT_TRUE(parsed.contains("ok") && parsed["ok"].is_boolean()) << text;
            EXPECT_TRUE(parsed.contains("color") && (parsed["color"] == "red" || parsed["color"] == "green")) << text;
            for (const auto& [k, v] : parsed.items()) EXPECT_TRUE(k == "ok" || k == "n" || k == "color") << text;
          }
          break;
        }
        c.accept(t);
        text += tok.token_bytes(t);
        ASSERT_TRUE(matches(*g, text, false)) << text;
      }
    }
    if (with_schema) {
      EXPECT_GT(ended, 30);  // a short schema ends within 120 tokens
    }
  }
}

// --- The context cache -------------------------------------------------------------------

TEST(PrefixCache, BlocksChainMatchAndEvictOldestLeavesFirst) {
  Transformer model(test::golden_dir("tiny-v3-bf16"));
  PagedKvCache pool(model.config(), 8);
  serve::PrefixCache cache(pool, 42);
  std::vector<int32_t> a(200);
  for (size_t i = 0; i < a.size(); ++i) a[i] = int32_t(i % 97);
  PageTable t;
  extend(pool, t, 200);  // 4 pages; 3 whole blocks
  cache.insert(a, t, 200);
  EXPECT_EQ(cache.blocks(), 3);
  release(pool, t);
  EXPECT_EQ(pool.free_pages(), 5);  // the cache holds 3
  // The longest cached prefix in whole blocks, within the limit.
  EXPECT_EQ(cache.lookup(a, 199).length, 192);
  EXPECT_EQ(cache.lookup(a, 191).length, 128);
  std::vector<int32_t> b = a;
  b[70] = 3;  // differs in the second block: only the first matches
  EXPECT_EQ(cache.lookup(b, 199).length, 64);
  b = a;
  b[0] = 5;  // the same later blocks after another first block: nothing matches
  EXPECT_EQ(cache.lookup(b, 199).length, 0);
  serve::PrefixCache other(pool, 43);  // another model: nothing matches
  EXPECT_EQ(other.lookup(a, 199).length, 0);
  // Eviction: the chain's last block first.
  cache.lookup(a, 199);
  ASSERT_TRUE(cache.evict());
  EXPECT_EQ(cache.lookup(a, 199).length, 128);
  // A page a sequence still holds is not evicted (it would free nothing).
  PageTable held = cache.lookup(a, 199);
  PageTable user = fork(pool, held);
  EXPECT_FALSE(cache.evict());
  release(pool, user);
  EXPECT_TRUE(cache.evict());
  EXPECT_TRUE(cache.evict());
  EXPECT_FALSE(cache.evict());
  EXPECT_EQ(pool.free_pages(), 8);
}

TEST(DiskCache, ABlockRoundTripsAndEachDamageIsNamed) {
  test::ScratchDir dir;
  Transformer model(test::golden_dir("tiny-v3-bf16"));
  const ModelConfig& c = model.config();
  PagedKvCache pool(c, 2);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerCache<float> layer = pool.layer(l);
    for (int64_t i = 0; i < 64 * c.kv_lora_rank; ++i) layer.latent[i] = float(l * 1000 + i) * 0.25f;
    for (int64_t i = 0; i < 64 * c.qk_rope_head_dim; ++i) layer.k_pe[i] = -float(l + i);
  }
  std::vector<int32_t> tokens(64);
  for (int i = 0; i < 64; ++i) tokens[size_t(i)] = i * 3;
  std::string file;
  auto write = [&] {
    serve::DiskCache disk(dir.path(), 77, c, 1 << 30);
    disk.save(123, 45, tokens.data(), pool, 0);
    disk.flush();
    EXPECT_EQ(disk.files_written(), 1);
    for (const auto& sub : std::filesystem::directory_iterator(dir.path()))
      for (const auto& e : std::filesystem::directory_iterator(sub.path())) file = e.path().string();
  };
  write();
  serve::DiskCache disk(dir.path(), 77, c, 1 << 30);
  ASSERT_TRUE(disk.load(123, 45, tokens.data(), pool, 1));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerCache<float> layer = pool.layer(l);
    EXPECT_TRUE(std::equal(layer.latent, layer.latent + 64 * c.kv_lora_rank, layer.latent + 64 * c.kv_lora_rank));
    EXPECT_TRUE(std::equal(layer.k_pe, layer.k_pe + 64 * c.qk_rope_head_dim, layer.k_pe + 64 * c.qk_rope_head_dim));
  }
  std::vector<int32_t> other = tokens;
  other[5] = 1;
  EXPECT_FALSE(disk.load(123, 45, other.data(), pool, 1));  // another block's tokens: a miss
  EXPECT_FALSE(disk.load(124, 45, tokens.data(), pool, 1));  // no such file
  struct Damage {
    std::function<void()> apply;
    const char* says;
  };
  const Damage damages[] = {
      {[&] { std::filesystem::resize_file(file, std::filesystem::file_size(file) - 1); }, "truncated"},
      {[&] { std::filesystem::resize_file(file, 20); }, "truncated header"},
      {[&] { std::fstream io(file, std::ios::in | std::ios::out | std::ios::binary); io.seekp(4000), io.put('\x33'); }, "checksum"},
      {[&] { std::fstream io(file, std::ios::in | std::ios::out | std::ios::binary); io.seekp(8), io.put('\x01'); }, "another model"},
      {[&] { std::fstream io(file, std::ios::in | std::ios::out | std::ios::binary); io.seekp(0), io.put('X'); }, "not a dsv3"},
  };
  for (const Damage& d : damages) {
    write();
    d.apply();
    testing::internal::CaptureStderr();
    EXPECT_FALSE(disk.load(123, 45, tokens.data(), pool, 1)) << d.says;
    EXPECT_THAT(testing::internal::GetCapturedStderr(), HasSubstr(d.says));
    EXPECT_FALSE(std::filesystem::exists(file)) << "a bad file is removed";
  }
}

// --- The server ----------------------------------------------------------------------------

TEST(Server, GreedyAnswersEqualGenerateAloneAndSixteenAtOnce) {
  test::TestServer server;
  const Tokenizer& tok = server.tokenizer();
  const std::vector<std::string> texts = {"In the beginning", "And God said", "The LORD is my shepherd",
                                          "Blessed are the meek: for they", "Jesus wept.", "And the earth was without form"};
  // Expected: generate() alone on the ids the server encodes (BOS as the tokenizer asks).
  std::vector<std::string> expect;
  for (const std::string& t : texts) {
    std::vector<int32_t> ids;
    if (server.config().add_bos_token) ids.push_back(*tok.token_id(*server.config().bos_token));
    for (int32_t id : tok.encode(t)) ids.push_back(id);
    GenerateOptions opt;
    opt.max_tokens = 16;
    expect.push_back(as_sent(tok, generate(server.model(), ids, opt).tokens));
  }
  auto ask = [&](size_t i) {
    httplib::Client c = server.client();
    return post(c, "/v1/completions", json{{"model", "tiny"}, {"prompt", texts[i]}, {"max_tokens", 16}, {"temperature", 0}});
  };
  for (size_t i = 0; i < texts.size(); ++i) {  // one client at a time
    const Reply r = ask(i);
    ASSERT_EQ(r.status, 200) << r.raw;
    EXPECT_EQ(r.body["choices"][0]["text"], expect[i]) << texts[i];
    EXPECT_EQ(r.body["usage"]["completion_tokens"], 16);
  }
  std::vector<Reply> replies(16);
  std::vector<std::thread> clients;
  for (size_t k = 0; k < 16; ++k) clients.emplace_back([&, k] { replies[k] = ask(k % texts.size()); });
  for (auto& t : clients) t.join();
  for (size_t k = 0; k < 16; ++k) {
    ASSERT_EQ(replies[k].status, 200) << replies[k].raw;
    EXPECT_EQ(replies[k].body["choices"][0]["text"], expect[k % texts.size()]) << "client " << k;
  }
}

TEST(Server, ChatStreamsWhatItAnswersWhole) {
  test::TestServer server;
  httplib::Client c = server.client();
  const json body = {{"model", "tiny"}, {"messages", {{{"role", "user"}, {"content", "Who begat Enos?"}}}}, {"max_tokens", 20}, {"temperature", 0}};
  const Reply whole = post(c, "/v1/chat/completions", body);
  ASSERT_EQ(whole.status, 200) << whole.raw;
  EXPECT_EQ(whole.body["object"], "chat.completion");
  EXPECT_EQ(whole.body["choices"][0]["message"]["role"], "assistant");
  json streamed = body;
  streamed["stream"] = true, streamed["stream_options"] = {{"include_usage", true}};
  const Reply s = post(c, "/v1/chat/completions", streamed);
  ASSERT_EQ(s.status, 200);
  bool done = false;
  const auto ev = events(s.raw, done);
  EXPECT_TRUE(done);
  ASSERT_GE(ev.size(), 3u);
  EXPECT_EQ(ev[0]["choices"][0]["delta"]["role"], "assistant");
  std::string text, finish;
  for (const json& e : ev) {
    EXPECT_EQ(e["object"], "chat.completion.chunk");
    EXPECT_EQ(e["id"], ev[0]["id"]);
    if (e["choices"].empty()) continue;
    text += e["choices"][0]["delta"].value("content", "");
    if (!e["choices"][0]["finish_reason"].is_null()) finish = e["choices"][0]["finish_reason"];
  }
  EXPECT_EQ(text, whole.body["choices"][0]["message"]["content"]);
  EXPECT_EQ(finish, whole.body["choices"][0]["finish_reason"]);
  EXPECT_TRUE(ev.back()["choices"].empty());  // the usage chunk
  EXPECT_EQ(ev.back()["usage"]["completion_tokens"], whole.body["usage"]["completion_tokens"]);
  EXPECT_EQ(ev.back()["usage"]["prompt_tokens"], whole.body["usage"]["prompt_tokens"]);
}

TEST(Server, ChoicesStopStringsAndLogprobs) {
  test::TestServer server;
  httplib::Client c = server.client();
  // n = 3 greedy choices: one prompt read, three equal answers; sampled ones repeat by seed.
  const Reply greedy = post(c, "/v1/completions", json{{"model", "tiny"}, {"prompt", "In the beginning"}, {"max_tokens", 10}, {"temperature", 0}, {"n", 3}});
  ASSERT_EQ(greedy.status, 200) << greedy.raw;
  ASSERT_EQ(greedy.body["choices"].size(), 3u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(greedy.body["choices"][i]["index"], i);
    EXPECT_EQ(greedy.body["choices"][i]["text"], greedy.body["choices"][0]["text"]);
  }
  EXPECT_EQ(greedy.body["usage"]["completion_tokens"], 30);
  const json hot = {{"model", "tiny"}, {"prompt", "In the beginning"}, {"max_tokens", 10}, {"temperature", 1.2}, {"n", 3}, {"seed", 7}};
  const Reply a = post(c, "/v1/completions", hot), b = post(c, "/v1/completions", hot);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(a.body["choices"][i]["text"], b.body["choices"][i]["text"]);
  EXPECT_TRUE(a.body["choices"][0]["text"] != a.body["choices"][1]["text"] || a.body["choices"][1]["text"] != a.body["choices"][2]["text"]);

  // A stop string: the text up to it, finish_reason "stop", fewer tokens.
  const std::string full = greedy.body["choices"][0]["text"];
  ASSERT_GE(full.size(), 6u);
  const std::string stop = full.substr(3, 3);
  const Reply stopped = post(c, "/v1/completions", json{{"model", "tiny"}, {"prompt", "In the beginning"}, {"max_tokens", 10}, {"temperature", 0}, {"stop", {stop, "never-there"}}});
  EXPECT_EQ(stopped.body["choices"][0]["text"], full.substr(0, full.find(stop)));
  EXPECT_EQ(stopped.body["choices"][0]["finish_reason"], "stop");
  EXPECT_LT(stopped.body["usage"]["completion_tokens"].get<int>(), 10);

  // Log-probabilities: one entry per token, the greedy choice the most likely, in order.
  const Reply lp = post(c, "/v1/chat/completions", json{{"model", "tiny"}, {"messages", {{{"role", "user"}, {"content", "Hi"}}}}, {"max_tokens", 6}, {"temperature", 0}, {"logprobs", true}, {"top_logprobs", 3}});
  ASSERT_EQ(lp.status, 200) << lp.raw;
  const json& content = lp.body["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(content.size(), 6u);
  for (const json& t : content) {
    EXPECT_LE(t["logprob"].get<double>(), 0.0);
    ASSERT_EQ(t["top_logprobs"].size(), 3u);
    EXPECT_EQ(t["top_logprobs"][0]["token"], t["token"]);
    EXPECT_GE(t["top_logprobs"][0]["logprob"].get<double>(), t["top_logprobs"][1]["logprob"].get<double>());
  }
  const Reply clp = post(c, "/v1/completions", json{{"model", "tiny"}, {"prompt", "In the beginning"}, {"max_tokens", 4}, {"temperature", 0}, {"logprobs", 2}});
  EXPECT_EQ(clp.body["choices"][0]["logprobs"]["tokens"].size(), 4u);
  EXPECT_EQ(clp.body["choices"][0]["logprobs"]["text_offset"][0], 0);
}

// Structured output through the server: a random model's answers, constrained, parse and fit
// the schema (those that end; json_object ones may run to max_tokens inside a long string).
TEST(Server, ResponseFormatJsonSchemaAndJsonObject) {
  test::TestServer server;
  httplib::Client c = server.client();
  const json schema = json::parse(R"({"type": "object", "properties": {"answer": {"type": "boolean"},
      "book": {"enum": ["Genesis", "Exodus"]}, "verse": {"type": "integer"}}, "required": ["answer", "book"],
      "additionalProperties": false})");
  int ended = 0;
  for (int seed = 0; seed < 6; ++seed) {
    const Reply r = post(c, "/v1/chat/completions",
                         json{{"model", "tiny"}, {"messages", {{{"role", "user"}, {"content", "Which book? Answer in JSON."}}}},
                              {"max_tokens", 200}, {"seed", seed}, {"n", 2},
                              {"response_format", {{"type", "json_schema"}, {"json_schema", {{"name", "answer"}, {"schema", schema}, {"strict", true}}}}}});
    ASSERT_EQ(r.status, 200) << r.raw;
    for (const json& choice : r.body["choices"]) {
      const std::string text = choice["message"]["content"];
      if (choice["finish_reason"] != "stop") continue;
      ++ended;
      const json parsed = json::parse(text);
      EXPECT_TRUE(parsed["answer"].is_boolean()) << text;
      EXPECT_TRUE(parsed["book"] == "Genesis" || parsed["book"] == "Exodus") << text;
      EXPECT_LE(parsed.size(), 3u) << text;
      if (parsed.contains("verse")) {
        EXPECT_TRUE(parsed["verse"].is_number_integer()) << text;
      }
    }
  }
  EXPECT_GE(ended, 6);
  const auto any = serve::JsonGrammar::any_object();
  for (int seed = 0; seed < 4; ++seed) {
    const Reply r = post(c, "/v1/completions", json{{"model", "tiny"}, {"prompt", "{"}, {"max_tokens", 40}, {"seed", seed},
                                                    {"response_format", {{"type", "json_object"}}}});
    ASSERT_EQ(r.status, 200) << r.raw;
    const std::string text = r.body["choices"][0]["text"];
    if (r.body["choices"][0]["finish_reason"] == "stop") {
      EXPECT_TRUE(json::parse(text).is_object()) << text;
    } else {
      EXPECT_TRUE(matches(*any, text, false)) << text;
    }
  }
}

// A forced tool call through the server: the answer is message.tool_calls (content null,
// finish_reason tool_calls), whole and streamed.
TEST(Server, ForcedToolCallsComeBackAsToolCalls) {
  test::TestServer server;
  httplib::Client c = server.client();
  const json tools = json::parse(R"([{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
      "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
      "additionalProperties": false}}}])");
  const json body = {{"model", "tiny"}, {"messages", {{{"role", "user"}, {"content", "Weather in Paris?"}}}}, {"tools", tools},
                     {"tool_choice", {{"type", "function"}, {"function", {{"name", "get_weather"}}}}}, {"max_tokens", 600}, {"seed", 3}};
  const Reply r = post(c, "/v1/chat/completions", body);
  ASSERT_EQ(r.status, 200) << r.raw;
  const json& choice = r.body["choices"][0];
  ASSERT_EQ(choice["finish_reason"], "tool_calls") << r.raw;
  EXPECT_TRUE(choice["message"]["content"].is_null());
  ASSERT_EQ(choice["message"]["tool_calls"].size(), 1u);
  const json& call = choice["message"]["tool_calls"][0];
  EXPECT_EQ(call["type"], "function");
  EXPECT_EQ(call["function"]["name"], "get_weather");
  const json args = json::parse(call["function"]["arguments"].get<std::string>());
  EXPECT_TRUE(args["city"] == "Paris" || args["city"] == "Rome");
  // Streamed: the same call in the last delta.
  json streamed = body;
  streamed["stream"] = true;
  const Reply s = post(c, "/v1/chat/completions", streamed);
  bool done = false;
  const auto ev = events(s.raw, done);
  ASSERT_TRUE(done);
  json last_choice;
  std::string content;
  for (const json& e : ev)
    if (!e["choices"].empty()) {
      content += e["choices"][0]["delta"].value("content", "");
      if (!e["choices"][0]["finish_reason"].is_null()) last_choice = e["choices"][0];
    }
  EXPECT_EQ(content, "");
  ASSERT_EQ(last_choice["finish_reason"], "tool_calls") << s.raw;
  EXPECT_EQ(last_choice["delta"]["tool_calls"][0]["index"], 0);
  EXPECT_EQ(last_choice["delta"]["tool_calls"][0]["function"]["arguments"], call["function"]["arguments"]);
}

// A reasoning model (the prompt opens "<think>"): what it writes before "</think>" is
// reasoning_content, whole and streamed; here the random model never closes it.
TEST(Server, ReasoningGoesToReasoningContent) {
  test::TestServer server({}, {}, false, test::reasoning_model());
  httplib::Client c = server.client();
  const json body = {{"model", "tiny"}, {"messages", {{{"role", "user"}, {"content", "Who begat Enos?"}}}}, {"max_tokens", 12}, {"temperature", 0}};
  const Reply r = post(c, "/v1/chat/completions", body);
  ASSERT_EQ(r.status, 200) << r.raw;
  const json& message = r.body["choices"][0]["message"];
  ASSERT_TRUE(message.contains("reasoning_content")) << r.raw;
  const std::string reasoning = message["reasoning_content"];
  EXPECT_FALSE(reasoning.empty());
  EXPECT_EQ(reasoning.find("</think>"), std::string::npos);
  EXPECT_EQ(message["content"], "") << r.raw;
  json streamed = body;
  streamed["stream"] = true;
  const Reply s = post(c, "/v1/chat/completions", streamed);
  bool done = false;
  std::string text;
  for (const json& e : events(s.raw, done))
    if (!e["choices"].empty()) text += e["choices"][0]["delta"].value("reasoning_content", "");
  EXPECT_EQ(text, reasoning);
  // An earlier answer's reasoning is not sent back to the model (the template drops it).
  const Reply next = post(c, "/v1/chat/completions",
                          json{{"model", "tiny"}, {"max_tokens", 2},
                               {"messages", {{{"role", "user"}, {"content", "Hi"}}, {{"role", "assistant"}, {"content", "<think>hmm</think>Hello."}},
                                             {{"role", "user"}, {"content", "And?"}}}}});
  EXPECT_EQ(next.status, 200) << next.raw;
}

TEST(Server, RepeatedPrefixesHitTheCacheInBlocksWithTheSameText) {
  test::TestServer server;
  httplib::Client c = server.client();
  std::string prefix;
  for (int i = 0; i < 12; ++i) prefix += "And the LORD spake unto Moses, saying, Speak unto the children of Israel. ";
  const json body = {{"model", "tiny"}, {"prompt", prefix + "And"}, {"max_tokens", 12}, {"temperature", 0}};
  const Reply cold = post(c, "/v1/completions", body);
  ASSERT_EQ(cold.status, 200) << cold.raw;
  EXPECT_EQ(cold.body["usage"]["prompt_cache_hit_tokens"], 0);
  const int prompt = cold.body["usage"]["prompt_tokens"];
  ASSERT_GT(prompt, 200);
  const Reply warm = post(c, "/v1/completions", body);
  const int hit = warm.body["usage"]["prompt_cache_hit_tokens"];
  EXPECT_GT(hit, 0);
  EXPECT_EQ(hit % 64, 0);
  EXPECT_EQ(hit, (prompt - 1) / 64 * 64);
  EXPECT_EQ(warm.body["usage"]["prompt_cache_miss_tokens"], prompt - hit);
  EXPECT_EQ(warm.body["choices"][0]["text"], cold.body["choices"][0]["text"]);
  // Another ending on the same prefix: the blocks before the difference hit.
  const Reply other = post(c, "/v1/completions", json{{"model", "tiny"}, {"prompt", prefix + "Then Moses said"}, {"max_tokens", 4}, {"temperature", 0}});
  EXPECT_GE(other.body["usage"]["prompt_cache_hit_tokens"].get<int>(), 64);
  // A follow-up turn of a chat reuses the previous turn's blocks (answer included).
  json messages = {{{"role", "user"}, {"content", prefix}}};
  const Reply turn1 = post(c, "/v1/chat/completions", json{{"model", "tiny"}, {"messages", messages}, {"max_tokens", 70}, {"temperature", 0}});
  ASSERT_EQ(turn1.status, 200);
  messages.push_back({{"role", "assistant"}, {"content", turn1.body["choices"][0]["message"]["content"]}});
  messages.push_back({{"role", "user"}, {"content", "And?"}});
  const Reply turn2 = post(c, "/v1/chat/completions", json{{"model", "tiny"}, {"messages", messages}, {"max_tokens", 4}, {"temperature", 0}});
  EXPECT_GE(turn2.body["usage"]["prompt_cache_hit_tokens"].get<int>(), turn1.body["usage"]["prompt_tokens"].get<int>() / 64 * 64);
}

// --cache-dir: the blocks outlive the server; a truncated, corrupt or foreign file is
// skipped with a warning (and removed, so the block is written again), never used.
TEST(Server, CacheDirSurvivesARestartAndSkipsBadFiles) {
  test::ScratchDir dir;
  serve::SchedulerOptions so;
  so.cache_dir = dir.path(), so.model_id = serve::checkpoint_identity(test::servable_model());
  std::string prompt;  // 193..248 tokens: 3 whole blocks of prompt, and still 3 with 8 more tokens
  const Tokenizer tok(test::servable_model() + "/tokenizer.json");
  while (tok.encode(prompt).size() < 200) prompt += "And the LORD spake unto Moses, saying. ";
  ASSERT_LE(tok.encode(prompt).size(), 240u);
  const json body = {{"model", "tiny"}, {"prompt", prompt}, {"max_tokens", 8}, {"temperature", 0}};
  std::string text;
  auto run = [&](int expect_hit) {
    test::TestServer server(so);
    httplib::Client c = server.client();
    const Reply r = post(c, "/v1/completions", body);
    EXPECT_EQ(r.status, 200) << r.raw;
    EXPECT_EQ(r.body["usage"]["prompt_cache_hit_tokens"], expect_hit);
    if (text.empty()) text = r.body["choices"][0]["text"];
    EXPECT_EQ(r.body["choices"][0]["text"], text);
    server.scheduler().flush_disk_cache();
  };
  auto files = [&] {
    std::vector<std::string> out;
    for (const auto& sub : std::filesystem::directory_iterator(dir.path()))
      for (const auto& e : std::filesystem::directory_iterator(sub.path())) out.push_back(e.path().string());
    std::sort(out.begin(), out.end());
    return out;
  };
  run(0);
  ASSERT_EQ(files().size(), 3u);
  run(192);  // a new process: every block from disk
  // Damage each file differently.
  const auto f = files();
  std::filesystem::resize_file(f[0], std::filesystem::file_size(f[0]) - 100);
  {
    std::fstream io(f[1], std::ios::in | std::ios::out | std::ios::binary);
    io.seekp(5000);
    io.put('\x5a');
  }
  {
    std::fstream io(f[2], std::ios::in | std::ios::out | std::ios::binary);
    io.seekp(8);  // the model identity
    io.put('\x01'), io.put('\x02');
  }
  testing::internal::CaptureStderr();
  run(0);
  const std::string warnings = testing::internal::GetCapturedStderr();
  EXPECT_THAT(warnings, HasSubstr("skipped"));
  EXPECT_TRUE(warnings.find("truncated") != std::string::npos || warnings.find("checksum") != std::string::npos ||
              warnings.find("another model") != std::string::npos)
      << warnings;
  run(192);  // written again by the run before
  // Another model's identity: a folder of its own, nothing shared.
  so.model_id ^= 1;
  run(0);
}

TEST(Server, ErrorsAreOpenAIsWithTheRightStatus) {
  serve::ServerOptions opt;
  opt.max_body_bytes = 4096;
  test::TestServer server({}, opt);
  httplib::Client c = server.client();
  auto expect_error = [&](const Reply& r, int status, const std::string& type) {
    EXPECT_EQ(r.status, status) << r.raw;
    ASSERT_TRUE(r.body.is_object() && r.body.contains("error")) << r.raw;
    EXPECT_EQ(r.body["error"]["type"], type) << r.raw;
    EXPECT_TRUE(r.body["error"]["message"].is_string());
    EXPECT_TRUE(r.body["error"].contains("param") && r.body["error"].contains("code"));
  };
  expect_error(post(c, "/v1/chat/completions", std::string("{\"model\": ")), 400, "invalid_request_error");
  expect_error(post(c, "/v1/chat/completions", std::string("{\"model\": \"tiny\", \"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}")), 400, "invalid_request_error");
  expect_error(post(c, "/v1/completions", json{{"model", "tiny"}, {"prompt", "x"}, {"max_tokens", "many"}}), 400, "invalid_request_error");
  expect_error(post(c, "/v1/completions", std::string(R"({"model": "tiny", "prompt": "x", "max_tokens": 1e999999})")), 400, "invalid_request_error");
  expect_error(post(c, "/v1/completions", json{{"model", "tiny"}, {"prompt", "x"}, {"temperature", -1}}), 400, "invalid_request_error");
  expect_error(post(c, "/v1/completions", json{{"model", "tiny"}, {"prompt", {1, 2, 999999}}}), 400, "invalid_request_error");
  expect_error(post(c, "/v1/completions", json{{"model", "nope"}, {"prompt", "x"}}), 404, "invalid_request_error");
  expect_error(post(c, "/v1/nothing", json::object()), 404, "invalid_request_error");
  expect_error(post(c, "/v1/completions", std::string(R"({"model": "tiny", "prompt": "x", "user": )") + std::string(100, '[') +
                                              std::string(100, ']') + "}"),
               400, "invalid_request_error");
  expect_error(post(c, "/v1/completions", json{{"model", "tiny"}, {"prompt", "x"}, {"stop", "}"}, {"response_format", {{"type", "json_object"}}}}),
               400, "invalid_request_error");
  expect_error(post(c, "/v1/chat/completions", json{{"model", "tiny"}, {"messages", {{{"role", "user"}, {"content", "hi"}}}}, {"tools", {{{"type", 5}}}}}),
               400, "invalid_request_error");
  expect_error(post(c, "/v1/completions", json{{"model", "tiny"}, {"prompt", std::string(5000, 'a')}}), 413, "invalid_request_error");
  const Reply too_long = post(c, "/v1/completions", json{{"model", "tiny"}, {"prompt", "x"}, {"max_tokens", 100000}});
  expect_error(too_long, 400, "invalid_request_error");
  EXPECT_EQ(too_long.body["error"]["code"], "context_length_exceeded");
  auto missing = c.Get("/v1/models/nope");
  ASSERT_TRUE(missing);
  EXPECT_EQ(missing->status, 404);
  // Still serving.
  EXPECT_EQ(post(c, "/v1/completions", json{{"model", "tiny"}, {"prompt", "x"}, {"max_tokens", 2}}).status, 200);
}

TEST(Server, ApiKeyOnEveryV1Route) {
  serve::ServerOptions opt;
  opt.api_key = "sk-test-123";
  test::TestServer server({}, opt);
  httplib::Client c = server.client();
  const json chat = {{"model", "tiny"}, {"messages", {{{"role", "user"}, {"content", "hi"}}}}, {"max_tokens", 2}};
  const json completion = {{"model", "tiny"}, {"prompt", "hi"}, {"max_tokens", 2}};
  for (const httplib::Headers& h : {httplib::Headers{}, httplib::Headers{{"Authorization", "Bearer sk-test-124"}},
                                    httplib::Headers{{"Authorization", "Bearer sk-test-1234"}}, httplib::Headers{{"Authorization", "sk-test-123"}}}) {
    EXPECT_EQ(post(c, "/v1/chat/completions", chat, h).status, 401);
    const Reply r = post(c, "/v1/completions", completion, h);
    EXPECT_EQ(r.status, 401);
    EXPECT_EQ(r.body["error"]["code"], "invalid_api_key");
    auto m = c.Get("/v1/models", h);
    EXPECT_EQ(m->status, 401);
  }
  const httplib::Headers ok = {{"Authorization", "Bearer sk-test-123"}};
  EXPECT_EQ(post(c, "/v1/chat/completions", chat, ok).status, 200);
  EXPECT_EQ(post(c, "/v1/completions", completion, ok).status, 200);
  EXPECT_EQ(c.Get("/v1/models", ok)->status, 200);
  EXPECT_EQ(c.Get("/health")->status, 200);  // no key for health and metrics
  EXPECT_EQ(c.Get("/metrics")->status, 200);
}

TEST(Server, HealthSaysLoadingUntilReady) {
  serve::Metrics metrics;
  serve::ServerOptions opt;
  opt.port = 0;
  serve::Server server(opt, metrics);
  const int port = server.bind();
  std::thread listener([&] { server.listen(); });
  httplib::Client c("127.0.0.1", port);
  auto h = c.Get("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 503);
  const Reply r = post(c, "/v1/completions", json{{"model", "tiny"}, {"prompt", "x"}});
  EXPECT_EQ(r.status, 503);
  EXPECT_EQ(r.body["error"]["code"], "model_loading");
  server.stop();
  listener.join();
}

// A full queue: 429. A queued stream gets keep-alive comments while it waits, and a whole
// answer spaces before its JSON.
TEST(Server, AFullQueueIsTooManyRequestsAndWaitersAreKeptAlive) {
  serve::SchedulerOptions so;
  so.max_sequences = 1, so.max_queue = 1;
  serve::ServerOptions opt;
  opt.keep_alive_seconds = 0.02;
  test::TestServer server(so, opt);
  const json slow = {{"model", "tiny"}, {"prompt", "In the beginning"}, {"max_tokens", 1000}, {"temperature", 0}};
  std::vector<std::thread> clients;
  std::vector<Reply> replies(2);
  for (int i = 0; i < 2; ++i) {  // one runs, one (streamed) waits
    clients.emplace_back([&, i] {
      httplib::Client c = server.client();
      json body = slow;
      if (i == 1) body["stream"] = true;
      replies[size_t(i)] = post(c, "/v1/completions", body);
    });
    for (int t = 0; t < 500 && server.scheduler().gauges().running + server.scheduler().gauges().queued < i + 1; ++t)
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  httplib::Client c = server.client();
  const Reply full = post(c, "/v1/completions", slow);
  EXPECT_EQ(full.status, 429) << full.raw;
  EXPECT_EQ(full.body["error"]["code"], "queue_full");
  for (auto& t : clients) t.join();
  EXPECT_EQ(replies[0].status, 200);
  EXPECT_EQ(replies[1].status, 200);
  EXPECT_EQ(replies[0].body["usage"]["completion_tokens"], 1000) << replies[0].raw.substr(0, 200);
  EXPECT_EQ(replies[0].raw.front(), ' ');  // spaces while it was made
  EXPECT_EQ(replies[1].raw.rfind(": keep-alive\n\n", 0), 0u) << replies[1].raw.substr(0, 200);
}

// A raw connection: what a misbehaving client sends.
int connect_to(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET, addr.sin_port = htons(uint16_t(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) ADD_FAILURE() << "cannot connect";
  return fd;
}

TEST(Server, ManyStreamsStalledAndVanishingClientsAndEveryPageBack) {
  serve::ServerOptions opt;
  opt.read_timeout_seconds = 1;
  test::TestServer server({}, opt);
  // A client that sends half a request and stalls is dropped after the read timeout.
  const int stalled = connect_to(server.port());
  const std::string half = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\": ";
  ASSERT_EQ(::send(stalled, half.data(), half.size(), 0), ssize_t(half.size()));
  // A streaming client that leaves after its first bytes: its sequence is cancelled.
  const int leaving = connect_to(server.port());
  const std::string body = json{{"model", "tiny"}, {"prompt", "In the beginning"}, {"max_tokens", 1200}, {"stream", true}}.dump();
  const std::string request = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " +
                              std::to_string(body.size()) + "\r\n\r\n" + body;
  ASSERT_EQ(::send(leaving, request.data(), request.size(), 0), ssize_t(request.size()));
  char buf[512];
  ASSERT_GT(::recv(leaving, buf, sizeof buf, 0), 0);
  ::close(leaving);

  // 32 streaming clients at once, each to [DONE].
  std::vector<std::thread> clients;
  std::atomic<int> complete{0};
  for (int k = 0; k < 32; ++k)
    clients.emplace_back([&, k] {
      httplib::Client c = server.client();
      const Reply r = post(c, "/v1/chat/completions",
                           json{{"model", "tiny"}, {"messages", {{{"role", "user"}, {"content", "Psalm " + std::to_string(k)}}}},
                                {"max_tokens", 8 + k % 5}, {"stream", true}, {"seed", k}});
      bool done = false;
      const auto ev = events(r.raw, done);
      if (r.status == 200 && done && !ev.empty())
        ++complete;
      else
        ADD_FAILURE() << "client " << k << ": status " << r.status << ": " << r.raw.substr(0, 300);
    });
  for (auto& t : clients) t.join();
  EXPECT_EQ(complete.load(), 32);
  // The stalled client was answered (an HTTP error) and its connection closed.
  timeval wait{5, 0};
  setsockopt(stalled, SOL_SOCKET, SO_RCVTIMEO, &wait, sizeof wait);
  std::string answer;
  for (ssize_t got; answer.find("\r\n\r\n") == std::string::npos && (got = ::recv(stalled, buf, sizeof buf, 0)) > 0;)
    answer.append(buf, size_t(got));
  EXPECT_THAT(answer, testing::AnyOf(testing::IsEmpty(), testing::StartsWith("HTTP/1.1 4")));
  ::close(stalled);

  // Afterwards: nothing running or queued, and every page free or held by the context cache.
  httplib::Client c = server.client();
  for (int t = 0; t < 200 && metric(c, "dsv3_running_sequences") > 0; ++t) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(metric(c, "dsv3_running_sequences"), 0);
  EXPECT_EQ(metric(c, "dsv3_queue_depth"), 0);
  EXPECT_EQ(metric(c, "dsv3_kv_cache_pages_free") + metric(c, "dsv3_prefix_cache_pages"), metric(c, "dsv3_kv_cache_pages_total"));
  EXPECT_LT(metric(c, "dsv3_generation_tokens_total"), 1000);  // the vanished stream did not run to its 1200 tokens
  EXPECT_GE(metric(c, "dsv3_time_to_first_token_seconds_count"), 32);
  EXPECT_EQ(post(c, "/v1/completions", json{{"model", "tiny"}, {"prompt", "x"}, {"max_tokens", 2}}).status, 200);
}

}  // namespace
}  // namespace dsv3
