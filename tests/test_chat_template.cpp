// Chat templates: DeepSeek-V3's template renders the golden conversations exactly and they
// encode to the golden ids; the Jinja subset matches Jinja2 (3.1.6, set up as transformers
// sets it up) on the cases in tests/data/tokenizer/jinja_cases.json; and what the
// interpreter cannot do is an error naming it, never a wrong prompt.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "malformed_util.h"
#include "tokenizer/chat_template.h"
#include "tokenizer_util.h"

namespace dsv3 {
namespace {

using ojson = nlohmann::ordered_json;
using testing::HasSubstr;

TEST(ChatTemplateGolden, DeepSeekV3RendersAndEncodesEveryChatCase) {
  const TokenizerConfig config = load_tokenizer_config(test::tokenizer_dir());
  ASSERT_TRUE(config.chat_template);
  int n = 0;
  for (const auto& c : test::golden_cases()) {
    if (c["kind"] != "chat_template") continue;
    SCOPED_TRACE(c["messages"].dump());
    const std::string text = apply_chat_template(config, c["messages"], c["add_generation_prompt"].get<bool>());
    EXPECT_EQ(text, c["text"].get<std::string>());
    EXPECT_EQ(test::deepseek().encode(text), c["ids"].get<std::vector<int32_t>>());
    ++n;
  }
  EXPECT_EQ(n, 5);
}

TEST(ChatTemplateGolden, GenerationPromptAndToolTurns) {
  const TokenizerConfig config = load_tokenizer_config(test::tokenizer_dir());
  const ojson one = ojson::parse(R"([{"role": "user", "content": "Hi"}])");
  EXPECT_EQ(apply_chat_template(config, one, false), "<｜begin▁of▁sentence｜><｜User｜>Hi");
  EXPECT_EQ(apply_chat_template(config, one, true), "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>");
  // After a tool output the template closes the outputs and adds no generation prompt.
  const ojson tool = ojson::parse(R"([{"role": "user", "content": "Q"},
    {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
    {"role": "tool", "content": "42"}])");
  EXPECT_EQ(apply_chat_template(config, tool, true),
            "<｜begin▁of▁sentence｜><｜User｜>Q<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n"
            "```json\n{}\n```<｜tool▁call▁end｜><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>42<｜tool▁output▁end｜><｜tool▁outputs▁end｜>");
}

TEST(ChatTemplateJinja, MatchesJinja2OnEveryCase) {
  std::ifstream in(test::tokenizer_dir() + "/jinja_cases.json");
  const ojson cases = ojson::parse(in);
  const ojson messages = ojson::parse(R"([{"role":"system","content":"Be brief."},{"role":"user","content":"Hi  there "},
    {"role":"assistant","content":"Hello!"},{"role":"user","content":"2+2?"}])");
  ASSERT_GE(cases.size(), 15u);
  for (const auto& c : cases) {
    SCOPED_TRACE(c["template"].get<std::string>());
    ojson vars = {{"messages", messages}, {"add_generation_prompt", true}, {"bos_token", "<s>"}, {"eos_token", "</s>"}};
    for (auto it = c["vars"].begin(); it != c["vars"].end(); ++it) vars[it.key()] = it.value();
    std::string got;
    try {
      got = ChatTemplate(c["template"].get<std::string>()).render(vars);
    } catch (const Error& e) {
      ADD_FAILURE() << e.what();
    }
    EXPECT_EQ(got, c["expected"].get<std::string>());
  }
}

TEST(ChatTemplateJinja, WhitespaceControl) {
  const ojson vars = ojson::object();
  // trim_blocks drops the newline after a block tag; lstrip_blocks the indentation before it.
  EXPECT_EQ(ChatTemplate("a\n  {% if true %}\n  b\n  {% endif %}\nc").render(vars), "a\n  b\nc");
  EXPECT_EQ(ChatTemplate("a  {%- if true -%}  b  {%- endif -%}  c").render(vars), "abc");
  EXPECT_EQ(ChatTemplate("{{ 'x' }}\n{{ 'y' }}\n").render(vars), "x\ny");  // one trailing newline dropped
  EXPECT_EQ(ChatTemplate("a\r\nb").render(vars), "a\nb");
  EXPECT_EQ(ChatTemplate("{{ '\\u00e9\\x41\\n' }}").render(vars), "\u00e9A\n");
}

std::string render_error(const std::string& source, const ojson& vars = ojson::object()) {
  return test::error_of([&] { ChatTemplate(source, "tpl").render(vars); });
}

TEST(ChatTemplateErrors, UnsupportedOrWrongIsAnError) {
  EXPECT_THAT(render_error("{% include 'other.jinja' %}"), HasSubstr("tpl: line 1: the Jinja statement 'include' is not supported"));
  EXPECT_THAT(render_error("{% extends 'base' %}"), HasSubstr("'extends' is not supported"));
  EXPECT_THAT(render_error("{{ x | wordcount }}", {{"x", "a b"}}), HasSubstr("the filter 'wordcount' is not supported"));
  EXPECT_THAT(render_error("{{ x is prime }}", {{"x", 3}}), HasSubstr("the test 'prime' is not supported"));
  EXPECT_THAT(render_error("a\n{% if true %}b"), HasSubstr("missing {% endif %}"));
  EXPECT_THAT(render_error("{{ 'a' "), HasSubstr("tpl: line 1: unclosed {{"));
  EXPECT_THAT(render_error("{% endfor %}"), HasSubstr("unexpected {% endfor %}"));
  EXPECT_THAT(render_error("\n\n{{ 1 + }}"), HasSubstr("tpl: line 3: unexpected end of tag"));
  EXPECT_THAT(render_error("{{ raise_exception('Only user and assistant roles') }}"),
              HasSubstr("the template raised an error: Only user and assistant roles"));
  EXPECT_THAT(render_error("{{ m.content.x }}", {{"m", ojson::object()}}), HasSubstr("'m.content' is undefined and has no attribute 'x'"));
  EXPECT_THAT(render_error("{{ 'a' + none }}"), HasSubstr("unsupported operand types for +: string and none"));
  EXPECT_THAT(render_error("{{ 'a' + m.x }}", {{"m", ojson::object()}}), HasSubstr("'m.x' is undefined"));
  EXPECT_THAT(render_error("{{ '%s' % 'x' }}"), HasSubstr("string formatting with % is not supported"));
  EXPECT_THAT(render_error("{{ foo(1) }}"), HasSubstr("'foo' is not defined"));
  EXPECT_THAT(render_error("{% for x in 5 %}{% endfor %}"), HasSubstr("cannot iterate over a int"));
  EXPECT_THAT(render_error("{% set ns.a = 1 %}", {{"ns", 1}}), HasSubstr("not a namespace"));
  TokenizerConfig no_template;
  no_template.path = "cfg.json";
  EXPECT_THAT(test::error_of([&] { apply_chat_template(no_template, ojson::array(), false); }), HasSubstr("cfg.json: has no chat_template"));
  const TokenizerConfig config = load_tokenizer_config(test::tokenizer_dir());
  EXPECT_THAT(test::error_of([&] { apply_chat_template(config, ojson::parse(R"([{"content": "x"}])"), false); }),
              HasSubstr("messages[0]: not an object with a \"role\" string"));
  // DeepSeek-V3's template concatenates content: a missing content is an error, not "".
  EXPECT_THAT(test::error_of([&] { apply_chat_template(config, ojson::parse(R"([{"role": "user"}])"), false); }),
              HasSubstr("is undefined"));
}

TEST(ChatTemplateConfig, MalformedConfigIsNamed) {
  test::ScratchDir dir;
  test::write_bytes(dir / "tokenizer_config.json", "{");
  EXPECT_THAT(test::error_of([&] { load_tokenizer_config(dir.path()); }), HasSubstr("tokenizer_config.json: not valid JSON"));
  test::write_bytes(dir / "tokenizer_config.json", R"({"bos_token": 5})");
  EXPECT_THAT(test::error_of([&] { load_tokenizer_config(dir.path()); }), HasSubstr("bos_token is neither a string nor"));
  test::write_bytes(dir / "tokenizer_config.json", R"({"chat_template": [{"name": "tool_use", "template": "x"}]})");
  EXPECT_THAT(test::error_of([&] { load_tokenizer_config(dir.path()); }), HasSubstr("none is named \"default\""));
  test::write_bytes(dir / "tokenizer_config.json", R"({"bos_token": {"content": "<b>"}, "chat_template": [{"name": "default", "template": "{{ bos_token }}"}]})");
  const TokenizerConfig c = load_tokenizer_config(dir.path());
  EXPECT_EQ(c.bos_token, "<b>");
  EXPECT_EQ(apply_chat_template(c, ojson::array(), false), "<b>");
  EXPECT_THAT(test::error_of([] { load_tokenizer_config("/nonexistent-dir"); }), HasSubstr("/nonexistent-dir: cannot open"));
}

}  // namespace
}  // namespace dsv3
