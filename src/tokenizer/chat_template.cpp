// The Jinja-subset interpreter behind chat templates (see chat_template.h). Three stages:
// scan() cuts the source into text, {{ output }} and {% statement %} chunks applying
// Jinja's whitespace rules; Parser builds statement and expression trees; Renderer walks
// them over Values with Python semantics (truthiness, str(), ==, +, slicing).
#include "tokenizer/chat_template.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <ctime>
#include <functional>
#include <map>
#include <optional>
#include <unordered_map>
#include <vector>

#include "core/error.h"
#include "tokenizer/byte_level.h"

namespace dsv3 {

namespace {

using ojson = nlohmann::ordered_json;

// ---------------------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------------------

struct Value;
using List = std::vector<Value>;
struct Dict;
struct Args;
using Builtin = std::function<Value(Args&)>;

struct Value {
  enum class Kind : uint8_t { undefined, none, boolean, integer, floating, string, list, dict, ns, callable };
  Kind kind = Kind::undefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;  // a string's bytes; an undefined value's name, for errors; a callable's name
  std::shared_ptr<List> list;
  std::shared_ptr<Dict> dict;  // dict or namespace
  std::shared_ptr<Builtin> fn;

  static Value undefined(std::string name = "") { Value v; v.s = std::move(name); return v; }
  static Value none() { Value v; v.kind = Kind::none; return v; }
  static Value boolean(bool x) { Value v; v.kind = Kind::boolean; v.b = x; return v; }
  static Value integer(int64_t x) { Value v; v.kind = Kind::integer; v.i = x; return v; }
  static Value floating(double x) { Value v; v.kind = Kind::floating; v.f = x; return v; }
  static Value string(std::string x) { Value v; v.kind = Kind::string; v.s = std::move(x); return v; }
  static Value make_list(List x = {}) { Value v; v.kind = Kind::list; v.list = std::make_shared<List>(std::move(x)); return v; }
  static Value make_dict(Kind kind = Kind::dict);
  static Value callable(std::string name, Builtin fn) {
    Value v;
    v.kind = Kind::callable;
    v.s = std::move(name);
    v.fn = std::make_shared<Builtin>(std::move(fn));
    return v;
  }

  bool is(Kind k) const { return kind == k; }
  bool is_number() const { return kind == Kind::integer || kind == Kind::floating || kind == Kind::boolean; }
  double as_double() const { return kind == Kind::floating ? f : kind == Kind::boolean ? double(b) : double(i); }
};

struct Dict {
  std::vector<std::pair<std::string, Value>> items;
  Value* find(std::string_view key) {
    for (auto& [k, v] : items)
      if (k == key) return &v;
    return nullptr;
  }
  void set(const std::string& key, Value v) {
    if (Value* old = find(key))
      *old = std::move(v);
    else
      items.emplace_back(key, std::move(v));
  }
};

Value Value::make_dict(Kind kind) {
  Value v;
  v.kind = kind;
  v.dict = std::make_shared<Dict>();
  return v;
}

struct Args {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;
  std::string where;  // "line N", for errors

  const Value* kwarg(std::string_view name) const {
    for (const auto& [k, v] : kw)
      if (k == name) return &v;
    return nullptr;
  }
  // Positional argument i or keyword `name`, else the fallback.
  Value get(size_t i, std::string_view name, Value fallback = Value::undefined()) const {
    if (i < pos.size()) return pos[i];
    if (const Value* v = kwarg(name)) return *v;
    return fallback;
  }
};

const char* kind_name(const Value& v) {
  switch (v.kind) {
    case Value::Kind::undefined: return "undefined";
    case Value::Kind::none: return "none";
    case Value::Kind::boolean: return "bool";
    case Value::Kind::integer: return "int";
    case Value::Kind::floating: return "float";
    case Value::Kind::string: return "string";
    case Value::Kind::list: return "list";
    case Value::Kind::dict: return "dict";
    case Value::Kind::ns: return "namespace";
    case Value::Kind::callable: return "function";
  }
  return "?";
}

bool truthy(const Value& v) {
  switch (v.kind) {
    case Value::Kind::undefined:
    case Value::Kind::none: return false;
    case Value::Kind::boolean: return v.b;
    case Value::Kind::integer: return v.i != 0;
    case Value::Kind::floating: return v.f != 0;
    case Value::Kind::string: return !v.s.empty();
    case Value::Kind::list: return !v.list->empty();
    case Value::Kind::dict: return !v.dict->items.empty();
    case Value::Kind::ns:
    case Value::Kind::callable: return true;
  }
  return false;
}

// Python's repr() of a float.
std::string float_str(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, x);
  std::string s(buf, end);
  // Python writes exponents as e+16 / e-05 and switches to them at 1e16 and below 1e-4.
  const double a = std::fabs(x);
  if (a != 0 && (a >= 1e16 || a < 1e-4)) {
    auto [e2, ec2] = std::to_chars(buf, buf + sizeof buf, x, std::chars_format::scientific);
    s.assign(buf, e2);
    const size_t e = s.find('e');
    std::string mant = s.substr(0, e), exp = s.substr(e + 1);
    const char sign = exp[0] == '-' ? '-' : '+';
    if (exp[0] == '-' || exp[0] == '+') exp.erase(0, 1);
    while (exp.size() > 1 && exp[0] == '0') exp.erase(0, 1);
    if (exp.size() < 2) exp = "0" + exp;
    return mant + "e" + sign + exp;
  }
  if (s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}

std::string repr(const Value& v);

// Python's str().
std::string str(const Value& v) {
  switch (v.kind) {
    case Value::Kind::undefined: return "";
    case Value::Kind::none: return "None";
    case Value::Kind::boolean: return v.b ? "True" : "False";
    case Value::Kind::integer: return std::to_string(v.i);
    case Value::Kind::floating: return float_str(v.f);
    case Value::Kind::string: return v.s;
    case Value::Kind::list:
    case Value::Kind::dict: return repr(v);
    case Value::Kind::ns: return "<Namespace>";
    case Value::Kind::callable: return "<function " + v.s + ">";
  }
  return "";
}

std::string repr(const Value& v) {
  switch (v.kind) {
    case Value::Kind::string: {
      const bool dq = v.s.find('\'') != std::string::npos && v.s.find('"') == std::string::npos;
      const char q = dq ? '"' : '\'';
      std::string out(1, q);
      for (char ch : v.s) {
        const auto c = uint8_t(ch);
        if (ch == q || ch == '\\') out += '\\', out += ch;
        else if (ch == '\n') out += "\\n";
        else if (ch == '\r') out += "\\r";
        else if (ch == '\t') out += "\\t";
        else if (c < 0x20 || c == 0x7F) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\x%02x", c);
          out += buf;
        } else out += ch;
      }
      return out + q;
    }
    case Value::Kind::list: {
      std::string out = "[";
      for (size_t i = 0; i < v.list->size(); ++i) out += (i ? ", " : "") + repr((*v.list)[i]);
      return out + "]";
    }
    case Value::Kind::dict: {
      std::string out = "{";
      bool first = true;
      for (const auto& [k, x] : v.dict->items) {
        out += (first ? "" : ", ") + repr(Value::string(k)) + ": " + repr(x);
        first = false;
      }
      return out + "}";
    }
    default: return str(v);
  }
}

// json.dumps(x, ensure_ascii=False) as transformers' tojson filter calls it: separators
// ", " and ": " without indent, "," and ": " with it; keys in insertion order.
void to_json(const Value& v, int indent, int depth, std::string& out, const std::string& where) {
  auto newline = [&](int d) {
    if (indent < 0) return;
    out += '\n';
    out.append(size_t(indent * d), ' ');
  };
  switch (v.kind) {
    case Value::Kind::undefined: fail(where, ": tojson: ", v.s.empty() ? "an undefined value" : "'" + v.s + "' (undefined)", " is not JSON serializable");
    case Value::Kind::none: out += "null"; return;
    case Value::Kind::boolean: out += v.b ? "true" : "false"; return;
    case Value::Kind::integer: out += std::to_string(v.i); return;
    case Value::Kind::floating:
      if (std::isnan(v.f)) out += "NaN";
      else if (std::isinf(v.f)) out += v.f > 0 ? "Infinity" : "-Infinity";
      else out += float_str(v.f);
      return;
    case Value::Kind::string:
      out += '"';
      for (char ch : v.s) {
        const auto c = uint8_t(ch);
        switch (ch) {
          case '"': out += "\\\""; break;
          case '\\': out += "\\\\"; break;
          case '\n': out += "\\n"; break;
          case '\r': out += "\\r"; break;
          case '\t': out += "\\t"; break;
          case '\b': out += "\\b"; break;
          case '\f': out += "\\f"; break;
          default:
            if (c < 0x20) {
              char buf[8];
              std::snprintf(buf, sizeof buf, "\\u%04x", c);
              out += buf;
            } else {
              out += ch;
            }
        }
      }
      out += '"';
      return;
    case Value::Kind::list: {
      if (v.list->empty()) {
        out += "[]";
        return;
      }
      out += '[';
      for (size_t i = 0; i < v.list->size(); ++i) {
        if (i) out += indent < 0 ? ", " : ",";
        newline(depth + 1);
        to_json((*v.list)[i], indent, depth + 1, out, where);
      }
      newline(depth);
      out += ']';
      return;
    }
    case Value::Kind::dict:
    case Value::Kind::ns: {
      if (v.dict->items.empty()) {
        out += "{}";
        return;
      }
      out += '{';
      bool first = true;
      for (const auto& [k, x] : v.dict->items) {
        if (!first) out += indent < 0 ? ", " : ",";
        first = false;
        newline(depth + 1);
        to_json(Value::string(k), indent, depth + 1, out, where);
        out += ": ";
        to_json(x, indent, depth + 1, out, where);
      }
      newline(depth);
      out += '}';
      return;
    }
    case Value::Kind::callable: fail(where, ": tojson: a function is not JSON serializable");
  }
}

Value from_json(const ojson& j) {
  switch (j.type()) {
    case ojson::value_t::null: return Value::none();
    case ojson::value_t::boolean: return Value::boolean(j.get<bool>());
    case ojson::value_t::number_integer: return Value::integer(j.get<int64_t>());
    case ojson::value_t::number_unsigned: return Value::integer(int64_t(j.get<uint64_t>()));
    case ojson::value_t::number_float: return Value::floating(j.get<double>());
    case ojson::value_t::string: return Value::string(j.get<std::string>());
    case ojson::value_t::array: {
      Value v = Value::make_list();
      for (const auto& x : j) v.list->push_back(from_json(x));
      return v;
    }
    case ojson::value_t::object: {
      Value v = Value::make_dict();
      for (auto it = j.begin(); it != j.end(); ++it) v.dict->items.emplace_back(it.key(), from_json(it.value()));
      return v;
    }
    default: fail("chat template: unsupported JSON value in the variables");
  }
}

bool equal(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.is(Value::Kind::floating) || b.is(Value::Kind::floating)) return a.as_double() == b.as_double();
    return (a.is(Value::Kind::boolean) ? int64_t(a.b) : a.i) == (b.is(Value::Kind::boolean) ? int64_t(b.b) : b.i);
  }
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Value::Kind::undefined:
    case Value::Kind::none: return true;
    case Value::Kind::string: return a.s == b.s;
    case Value::Kind::list:
      if (a.list->size() != b.list->size()) return false;
      for (size_t i = 0; i < a.list->size(); ++i)
        if (!equal((*a.list)[i], (*b.list)[i])) return false;
      return true;
    case Value::Kind::dict: {
      if (a.dict->items.size() != b.dict->items.size()) return false;
      for (const auto& [k, x] : a.dict->items) {
        const Value* y = b.dict->find(k);
        if (!y || !equal(x, *y)) return false;
      }
      return true;
    }
    default: return a.dict == b.dict && a.fn == b.fn;
  }
}

// ---------------------------------------------------------------------------------------
// Expression tokens
// ---------------------------------------------------------------------------------------

struct Tok {
  enum class Kind : uint8_t { name, string, integer, floating, op, end } kind = Kind::end;
  std::string text;  // name, operator, or the decoded string
  int64_t i = 0;
  double f = 0;
  int line = 0;
};

// Python's unicode-escape decoding of a Jinja string literal body.
std::string unescape(std::string_view s, const std::string& where) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '\\' || i + 1 == s.size()) {
      out += s[i];
      continue;
    }
    const char e = s[++i];
    auto hex = [&](size_t n) -> char32_t {
      char32_t c = 0;
      for (size_t k = 1; k <= n; ++k) {
        if (i + k >= s.size() || !std::isxdigit(uint8_t(s[i + k]))) fail(where, ": bad \\", e, " escape in a string");
        c = c * 16 + char32_t(std::isdigit(uint8_t(s[i + k])) ? s[i + k] - '0' : (std::tolower(uint8_t(s[i + k])) - 'a' + 10));
      }
      i += n;
      return c;
    };
    switch (e) {
      case 'n': out += '\n'; break;
      case 't': out += '\t'; break;
      case 'r': out += '\r'; break;
      case '\\': out += '\\'; break;
      case '\'': out += '\''; break;
      case '"': out += '"'; break;
      case 'a': out += '\a'; break;
      case 'b': out += '\b'; break;
      case 'f': out += '\f'; break;
      case 'v': out += '\v'; break;
      case '\n': break;  // line continuation
      case 'x': byte_level::append_utf8(out, hex(2)); break;
      case 'u': byte_level::append_utf8(out, hex(4)); break;
      case 'U': byte_level::append_utf8(out, hex(8)); break;
      case '0': case '1': case '2': case '3': case '4': case '5': case '6': case '7': {
        char32_t c = char32_t(e - '0');
        for (int k = 0; k < 2 && i + 1 < s.size() && s[i + 1] >= '0' && s[i + 1] <= '7'; ++k) c = c * 8 + char32_t(s[++i] - '0');
        byte_level::append_utf8(out, c);
        break;
      }
      default: out += '\\'; out += e;  // unknown escapes stay as written
    }
  }
  return out;
}

std::vector<Tok> lex_expression(std::string_view s, int line, const std::string& what) {
  std::vector<Tok> toks;
  size_t i = 0;
  auto where = [&] { return what + ": line " + std::to_string(line); };
  while (i < s.size()) {
    const char c = s[i];
    if (c == '\n') {
      ++line;
      ++i;
      continue;
    }
    if (std::isspace(uint8_t(c))) {
      ++i;
      continue;
    }
    Tok t;
    t.line = line;
    if (std::isalpha(uint8_t(c)) || c == '_') {
      size_t j = i;
      while (j < s.size() && (std::isalnum(uint8_t(s[j])) || s[j] == '_')) ++j;
      t.kind = Tok::Kind::name;
      t.text = std::string(s.substr(i, j - i));
      i = j;
    } else if (std::isdigit(uint8_t(c))) {
      size_t j = i;
      bool is_float = false;
      while (j < s.size() && (std::isdigit(uint8_t(s[j])) || s[j] == '_')) ++j;
      if (j + 1 < s.size() && s[j] == '.' && std::isdigit(uint8_t(s[j + 1]))) {
        is_float = true;
        ++j;
        while (j < s.size() && (std::isdigit(uint8_t(s[j])) || s[j] == '_')) ++j;
      }
      if (j < s.size() && (s[j] == 'e' || s[j] == 'E')) {
        size_t k = j + 1;
        if (k < s.size() && (s[k] == '+' || s[k] == '-')) ++k;
        if (k < s.size() && std::isdigit(uint8_t(s[k]))) {
          is_float = true;
          j = k;
          while (j < s.size() && std::isdigit(uint8_t(s[j]))) ++j;
        }
      }
      std::string num;
      for (size_t k = i; k < j; ++k)
        if (s[k] != '_') num += s[k];
      if (is_float) {
        t.kind = Tok::Kind::floating;
        t.f = std::strtod(num.c_str(), nullptr);
      } else {
        t.kind = Tok::Kind::integer;
        auto [p, ec] = std::from_chars(num.data(), num.data() + num.size(), t.i);
        if (ec != std::errc()) fail(where(), ": integer literal ", num, " is out of range");
      }
      t.text = num;
      i = j;
    } else if (c == '\'' || c == '"') {
      size_t j = i + 1;
      while (j < s.size() && s[j] != c) {
        if (s[j] == '\\') ++j;
        if (j < s.size() && s[j] == '\n') ++line;
        ++j;
      }
      if (j >= s.size()) fail(where(), ": unterminated string literal");
      t.kind = Tok::Kind::string;
      t.text = unescape(s.substr(i + 1, j - i - 1), where());
      i = j + 1;
    } else {
      static const char* const kOps[] = {"**", "//", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<",
                                         ">", "=", "(", ")", "[", "]", "{", "}", ",", ".", ":", "|"};
      t.kind = Tok::Kind::op;
      for (const char* op : kOps)
        if (s.substr(i).starts_with(op)) {
          t.text = op;
          break;
        }
      if (t.text.empty()) fail(where(), ": unexpected character '", c, "' in an expression");
      i += t.text.size();
    }
    toks.push_back(std::move(t));
  }
  Tok end;
  end.line = line;
  toks.push_back(end);
  return toks;
}

// ---------------------------------------------------------------------------------------
// Scanning the template into chunks (Jinja's lexer with trim_blocks and lstrip_blocks)
// ---------------------------------------------------------------------------------------

struct Chunk {
  enum class Kind : uint8_t { text, output, statement } kind;
  std::string text;  // text, or the tag's inside
  int line = 0;
};

std::vector<Chunk> scan(std::string src, const std::string& what) {
  // Jinja turns \r\n and \r into \n and drops one trailing newline (keep_trailing_newline off).
  std::string s;
  s.reserve(src.size());
  for (size_t i = 0; i < src.size(); ++i) {
    if (src[i] == '\r') {
      s += '\n';
      if (i + 1 < src.size() && src[i + 1] == '\n') ++i;
    } else {
      s += src[i];
    }
  }
  if (!s.empty() && s.back() == '\n') s.pop_back();

  std::vector<Chunk> chunks;
  size_t pos = 0;
  int line = 1;
  bool line_starting = true;
  auto is_ws = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; };
  auto count_lines = [](std::string_view t) { return int(std::count(t.begin(), t.end(), '\n')); };
  auto push_text = [&](std::string t, int at) {
    if (!t.empty()) chunks.push_back({Chunk::Kind::text, std::move(t), at});
  };
  while (pos < s.size()) {
    size_t k = pos;
    while (true) {
      k = s.find('{', k);
      if (k == std::string::npos || k + 1 >= s.size()) {
        k = s.size();
        break;
      }
      if (s[k + 1] == '{' || s[k + 1] == '%' || s[k + 1] == '#') break;
      ++k;
    }
    std::string data = s.substr(pos, k - pos);
    const int data_line = line;
    line += count_lines(data);
    if (k == s.size()) {
      push_text(std::move(data), data_line);
      break;
    }
    const char type = s[k + 1];  // '{', '%' or '#'
    const char mod = k + 2 < s.size() ? s[k + 2] : 0;
    if (mod == '-') {
      while (!data.empty() && is_ws(data.back())) data.pop_back();
    } else if (type != '{' && mod != '+') {
      // lstrip_blocks: spaces and tabs between the start of a line and a block tag go.
      const size_t nl = data.rfind('\n');
      const size_t l_pos = nl == std::string::npos ? 0 : nl + 1;
      if (l_pos > 0 || line_starting) {
        if (data.find_first_not_of(" \t", l_pos) == std::string::npos) data.resize(l_pos);
      }
    }
    push_text(std::move(data), data_line);

    // Find the end of the tag.
    const size_t body = k + 2 + (mod == '-' || mod == '+' ? 1 : 0);
    const std::string closer = type == '{' ? "}}" : type == '%' ? "%}" : "#}";
    size_t e = body;
    if (type == '#') {
      e = s.find(closer, body);
    } else {
      char quote = 0;
      for (; e < s.size(); ++e) {
        if (quote) {
          if (s[e] == '\\') ++e;
          else if (s[e] == quote) quote = 0;
        } else if (s[e] == '\'' || s[e] == '"') {
          quote = s[e];
        } else if (s.compare(e, 2, closer) == 0) {
          break;
        }
      }
      if (e >= s.size()) e = std::string::npos;
    }
    if (e == std::string::npos)
      fail(what, ": line ", line, ": unclosed ", type == '{' ? "{{" : type == '%' ? "{%" : "{#", " (no ", closer, ")");
    size_t inner_end = e;
    char close_mod = 0;
    if (inner_end > body && (s[inner_end - 1] == '-' || s[inner_end - 1] == '+')) {
      close_mod = s[inner_end - 1];
      --inner_end;
    }
    const std::string inner = s.substr(body, inner_end - body);
    const int tag_line = line;
    line += count_lines(inner);
    pos = e + 2;
    // After the tag: '-' eats all whitespace; trim_blocks eats one newline after a block.
    const size_t after = pos;
    if (close_mod == '-') {
      while (pos < s.size() && is_ws(s[pos])) ++pos;
    } else if (type != '{' && close_mod != '+' && pos < s.size() && s[pos] == '\n') {
      ++pos;
    }
    line += count_lines(std::string_view(s).substr(after, pos - after));
    line_starting = pos > after && s[pos - 1] == '\n';

    if (type == '#') continue;
    if (type == '{') {
      chunks.push_back({Chunk::Kind::output, inner, tag_line});
      continue;
    }
    // {% raw %} ... {% endraw %}: the body is text, verbatim.
    std::string_view trimmed = inner;
    while (!trimmed.empty() && is_ws(trimmed.front())) trimmed.remove_prefix(1);
    while (!trimmed.empty() && is_ws(trimmed.back())) trimmed.remove_suffix(1);
    if (trimmed == "raw") {
      size_t search = pos;
      while (true) {
        const size_t open = s.find("{%", search);
        if (open == std::string::npos) fail(what, ": line ", tag_line, ": {% raw %} without {% endraw %}");
        size_t q = open + 2;
        const bool strip_before = q < s.size() && s[q] == '-';
        if (q < s.size() && (s[q] == '-' || s[q] == '+')) ++q;
        while (q < s.size() && is_ws(s[q])) ++q;
        if (s.compare(q, 6, "endraw") != 0) {
          search = open + 2;
          continue;
        }
        q += 6;
        while (q < s.size() && is_ws(s[q])) ++q;
        char m = 0;
        if (q < s.size() && (s[q] == '-' || s[q] == '+')) m = s[q++];
        if (s.compare(q, 2, "%}") != 0) {
          search = open + 2;
          continue;
        }
        std::string raw = s.substr(pos, open - pos);
        if (strip_before)
          while (!raw.empty() && is_ws(raw.back())) raw.pop_back();
        line += count_lines(std::string_view(s).substr(pos, q + 2 - pos));
        push_text(std::move(raw), tag_line);
        pos = q + 2;
        if (m == '-')
          while (pos < s.size() && is_ws(s[pos])) ++pos;
        else if (m != '+' && pos < s.size() && s[pos] == '\n')
          ++pos;
        line_starting = pos > 0 && s[pos - 1] == '\n';
        break;
      }
      continue;
    }
    chunks.push_back({Chunk::Kind::statement, inner, tag_line});
  }
  return chunks;
}

// ---------------------------------------------------------------------------------------
// Syntax trees
// ---------------------------------------------------------------------------------------

struct Expr {
  enum class Kind : uint8_t {
    literal, name, attr, item, slice, call, filter, test, neg, pos, not_, binary, compare, and_, or_, cond, list, dict
  } kind;
  int line = 0;
  Value value;                              // literal
  std::string name;                         // name, attribute, filter, test, binary operator
  std::vector<std::unique_ptr<Expr>> args;  // operands; call/filter/test arguments after the first
  std::vector<std::pair<std::string, std::unique_ptr<Expr>>> kwargs;
  std::vector<std::string> ops;             // compare: one per operand after the first
  bool negated = false;                     // test: `is not`
};
using ExprPtr = std::unique_ptr<Expr>;

struct Node;
using Body = std::vector<Node>;

struct Node {
  enum class Kind : uint8_t { text, output, if_, for_, set, set_block, break_, continue_, macro } kind = Kind::text;
  int line = 0;
  std::string text;                                   // text; set_block / macro name
  ExprPtr expr;                                       // output; for iterable; set value
  std::vector<std::pair<ExprPtr, Body>> branches;     // if / elif
  Body body, else_body;                               // for, set_block, macro; else
  std::vector<std::string> targets;                   // for / set targets; set "ns.attr" is {"ns", "attr"} with attr_target
  bool attr_target = false;
  ExprPtr filter;                                     // for ... if cond
  std::vector<std::pair<std::string, ExprPtr>> params;  // macro parameters and defaults
};

Node make_node(Node::Kind kind) {
  Node n;
  n.kind = kind;
  return n;
}

class Parser {
 public:
  Parser(std::vector<Chunk> chunks, std::string what) : chunks_(std::move(chunks)), what_(std::move(what)) {}

  Body parse_all() {
    std::string end;
    Body b = parse_body({}, end);
    return b;
  }

 private:
  // ---- statements ----
  std::string where(int line) const { return what_ + ": line " + std::to_string(line); }

  // Parses nodes until a statement whose first word is in `ends` (returned in `end`, with
  // its tokens left in toks_ for the caller); at the top level `ends` is empty.
  Body parse_body(const std::vector<std::string>& ends, std::string& end) {
    Body body;
    while (at_ < chunks_.size()) {
      const Chunk& c = chunks_[at_++];
      if (c.kind == Chunk::Kind::text) {
        Node n = make_node(Node::Kind::text);
        n.line = c.line;
        n.text = c.text;
        body.push_back(std::move(n));
        continue;
      }
      start(c);
      if (c.kind == Chunk::Kind::output) {
        Node n = make_node(Node::Kind::output);
        n.line = c.line;
        n.expr = parse_expression();
        expect_end();
        body.push_back(std::move(n));
        continue;
      }
      const Tok& first = peek();
      if (first.kind != Tok::Kind::name) fail(where(c.line), ": a statement must start with a keyword");
      const std::string word = first.text;
      if (std::find(ends.begin(), ends.end(), word) != ends.end()) {
        next();
        end = word;
        return body;
      }
      next();
      if (word == "if") body.push_back(parse_if(c.line));
      else if (word == "for") body.push_back(parse_for(c.line));
      else if (word == "set") body.push_back(parse_set(c.line));
      else if (word == "macro") body.push_back(parse_macro(c.line));
      else if (word == "break" || word == "continue") {
        expect_end();
        Node n = make_node(word == "break" ? Node::Kind::break_ : Node::Kind::continue_);
        n.line = c.line;
        body.push_back(std::move(n));
      } else if (word == "generation") {  // transformers' assistant-mask marker: renders its body
        expect_end();
        std::string e;
        Body inner = parse_body({"endgeneration"}, e);
        expect_end();
        for (Node& n : inner) body.push_back(std::move(n));
      } else if (word == "elif" || word == "else" || word.starts_with("end")) {
        fail(where(c.line), ": unexpected {% ", word, " %}");
      } else {
        fail(where(c.line), ": the Jinja statement '", word, "' is not supported");
      }
    }
    if (!ends.empty()) fail(what_, ": missing {% ", ends.back(), " %} at the end of the template");
    return body;
  }

  Node parse_if(int line) {
    Node n = make_node(Node::Kind::if_);
    n.line = line;
    ExprPtr cond = parse_expression();
    expect_end();
    while (true) {
      std::string end;
      Body b = parse_body({"elif", "else", "endif"}, end);
      n.branches.emplace_back(std::move(cond), std::move(b));
      if (end == "elif") {
        cond = parse_expression();
        expect_end();
        continue;
      }
      if (end == "else") {
        expect_end();
        std::string e2;
        n.else_body = parse_body({"endif"}, e2);
      }
      expect_end();
      return n;
    }
  }

  Node parse_for(int line) {
    Node n = make_node(Node::Kind::for_);
    n.line = line;
    do {
      n.targets.push_back(expect_name("a loop variable"));
    } while (accept(","));
    if (!accept_word("in")) fail(where(line), ": expected 'in' in the for statement");
    n.expr = parse_or_expression(/*allow_cond=*/false);
    if (accept_word("if")) n.filter = parse_or_expression(false);
    if (accept_word("recursive")) fail(where(line), ": recursive for loops are not supported");
    expect_end();
    std::string end;
    n.body = parse_body({"else", "endfor"}, end);
    if (end == "else") {
      expect_end();
      std::string e2;
      n.else_body = parse_body({"endfor"}, e2);
    }
    expect_end();
    return n;
  }

  Node parse_set(int line) {
    Node n = make_node(Node::Kind::set);
    n.line = line;
    std::string first = expect_name("a variable name");
    if (accept(".")) {
      n.attr_target = true;
      n.targets = {first, expect_name("an attribute name")};
    } else {
      n.targets.push_back(first);
      while (accept(",")) n.targets.push_back(expect_name("a variable name"));
    }
    if (peek().kind == Tok::Kind::end) {  // {% set x %}...{% endset %}
      if (n.attr_target || n.targets.size() != 1) fail(where(line), ": a block set takes one variable name");
      n.kind = Node::Kind::set_block;
      n.text = first;
      std::string end;
      n.body = parse_body({"endset"}, end);
      expect_end();
      return n;
    }
    if (!accept("=")) fail(where(line), ": expected '=' in the set statement");
    n.expr = parse_expression();
    expect_end();
    return n;
  }

  Node parse_macro(int line) {
    Node n = make_node(Node::Kind::macro);
    n.line = line;
    n.text = expect_name("a macro name");
    expect("(");
    if (!accept(")")) {
      do {
        std::string p = expect_name("a parameter name");
        ExprPtr def;
        if (accept("=")) def = parse_expression();
        n.params.emplace_back(std::move(p), std::move(def));
      } while (accept(","));
      expect(")");
    }
    expect_end();
    std::string end;
    n.body = parse_body({"endmacro"}, end);
    expect_end();
    return n;
  }

  // ---- expressions (Jinja's grammar and precedence) ----
  void start(const Chunk& c) {
    toks_ = lex_expression(c.text, c.line, what_);
    t_ = 0;
  }
  const Tok& peek(size_t k = 0) const { return toks_[std::min(t_ + k, toks_.size() - 1)]; }
  const Tok& next() { return toks_[std::min(t_++, toks_.size() - 1)]; }
  bool is_op(const char* op, size_t k = 0) const { return peek(k).kind == Tok::Kind::op && peek(k).text == op; }
  bool is_word(const char* w, size_t k = 0) const { return peek(k).kind == Tok::Kind::name && peek(k).text == w; }
  bool accept(const char* op) {
    if (!is_op(op)) return false;
    ++t_;
    return true;
  }
  bool accept_word(const char* w) {
    if (!is_word(w)) return false;
    ++t_;
    return true;
  }
  void expect(const char* op) {
    if (!accept(op)) fail(where(peek().line), ": expected '", op, "'", describe_here());
  }
  std::string expect_name(const char* what) {
    if (peek().kind != Tok::Kind::name) fail(where(peek().line), ": expected ", what, describe_here());
    return next().text;
  }
  void expect_end() {
    if (peek().kind != Tok::Kind::end) fail(where(peek().line), ": unexpected ", describe(peek()), " (expected the end of the tag)");
  }
  static std::string describe(const Tok& t) {
    switch (t.kind) {
      case Tok::Kind::end: return "end of tag";
      case Tok::Kind::string: return "string '" + t.text + "'";
      default: return "'" + t.text + "'";
    }
  }
  std::string describe_here() const { return ", found " + describe(peek()); }

  ExprPtr make(Expr::Kind k, int line) {
    auto e = std::make_unique<Expr>();
    e->kind = k;
    e->line = line;
    return e;
  }

  ExprPtr parse_expression() { return parse_or_expression(true); }

  ExprPtr parse_or_expression(bool allow_cond) {
    ExprPtr e = parse_or();
    while (allow_cond && is_word("if")) {  // a if b else c
      const int line = next().line;
      auto c = make(Expr::Kind::cond, line);
      ExprPtr test = parse_or();
      ExprPtr other = accept_word("else") ? parse_or_expression(true) : nullptr;
      c->args.push_back(std::move(e));
      c->args.push_back(std::move(test));
      if (other) c->args.push_back(std::move(other));
      e = std::move(c);
    }
    return e;
  }
  ExprPtr parse_or() {
    ExprPtr e = parse_and();
    while (is_word("or")) {
      auto o = make(Expr::Kind::or_, next().line);
      o->args.push_back(std::move(e));
      o->args.push_back(parse_and());
      e = std::move(o);
    }
    return e;
  }
  ExprPtr parse_and() {
    ExprPtr e = parse_not();
    while (is_word("and")) {
      auto a = make(Expr::Kind::and_, next().line);
      a->args.push_back(std::move(e));
      a->args.push_back(parse_not());
      e = std::move(a);
    }
    return e;
  }
  ExprPtr parse_not() {
    if (is_word("not")) {
      auto n = make(Expr::Kind::not_, next().line);
      n->args.push_back(parse_not());
      return n;
    }
    return parse_compare();
  }
  ExprPtr parse_compare() {
    ExprPtr e = parse_math1();
    ExprPtr cmp;
    while (true) {
      std::string op;
      if (peek().kind == Tok::Kind::op && (peek().text == "==" || peek().text == "!=" || peek().text == "<" ||
                                           peek().text == "<=" || peek().text == ">" || peek().text == ">=")) {
        op = next().text;
      } else if (is_word("in")) {
        next();
        op = "in";
      } else if (is_word("not") && is_word("in", 1)) {
        next();
        next();
        op = "not in";
      } else {
        break;
      }
      if (!cmp) {
        cmp = make(Expr::Kind::compare, peek().line);
        cmp->args.push_back(std::move(e));
      }
      cmp->ops.push_back(op);
      cmp->args.push_back(parse_math1());
    }
    return cmp ? std::move(cmp) : std::move(e);
  }
  ExprPtr binary(ExprPtr l, const std::string& op, ExprPtr r, int line) {
    auto b = make(Expr::Kind::binary, line);
    b->name = op;
    b->args.push_back(std::move(l));
    b->args.push_back(std::move(r));
    return b;
  }
  ExprPtr parse_math1() {
    ExprPtr e = parse_concat();
    while (is_op("+") || is_op("-")) {
      const Tok& t = next();
      std::string op = t.text;
      e = binary(std::move(e), op, parse_concat(), t.line);
    }
    return e;
  }
  ExprPtr parse_concat() {
    ExprPtr e = parse_math2();
    while (is_op("~")) {
      const int line = next().line;
      e = binary(std::move(e), "~", parse_math2(), line);
    }
    return e;
  }
  ExprPtr parse_math2() {
    ExprPtr e = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const Tok& t = next();
      std::string op = t.text;
      e = binary(std::move(e), op, parse_pow(), t.line);
    }
    return e;
  }
  ExprPtr parse_pow() {
    ExprPtr e = parse_unary(true);
    while (is_op("**")) {
      const int line = next().line;
      e = binary(std::move(e), "**", parse_unary(true), line);
    }
    return e;
  }
  ExprPtr parse_unary(bool with_filter) {
    ExprPtr e;
    if (is_op("-") || is_op("+")) {
      const Tok& t = next();
      e = make(t.text == "-" ? Expr::Kind::neg : Expr::Kind::pos, t.line);
      e->args.push_back(parse_unary(false));
    } else {
      e = parse_primary();
    }
    e = parse_postfix(std::move(e));
    if (with_filter) e = parse_filter_expr(std::move(e));
    return e;
  }
  ExprPtr parse_primary() {
    const Tok& t = peek();
    const int line = t.line;
    switch (t.kind) {
      case Tok::Kind::string: {
        std::string s;
        while (peek().kind == Tok::Kind::string) s += next().text;  // adjacent literals join
        auto e = make(Expr::Kind::literal, line);
        e->value = Value::string(std::move(s));
        return e;
      }
      case Tok::Kind::integer: {
        auto e = make(Expr::Kind::literal, line);
        e->value = Value::integer(next().i);
        return e;
      }
      case Tok::Kind::floating: {
        auto e = make(Expr::Kind::literal, line);
        e->value = Value::floating(next().f);
        return e;
      }
      case Tok::Kind::name: {
        const std::string n = next().text;
        auto e = make(Expr::Kind::literal, line);
        if (n == "true" || n == "True") e->value = Value::boolean(true);
        else if (n == "false" || n == "False") e->value = Value::boolean(false);
        else if (n == "none" || n == "None") e->value = Value::none();
        else {
          e->kind = Expr::Kind::name;
          e->name = n;
        }
        return e;
      }
      case Tok::Kind::op:
        if (accept("(")) {
          if (accept(")")) return make(Expr::Kind::list, line);  // () : an empty tuple, as a list
          ExprPtr e = parse_expression();
          if (is_op(",")) {  // a tuple, kept as a list
            auto l = make(Expr::Kind::list, line);
            l->args.push_back(std::move(e));
            while (accept(",")) {
              if (is_op(")")) break;
              l->args.push_back(parse_expression());
            }
            e = std::move(l);
          }
          expect(")");
          return e;
        }
        if (accept("[")) {
          auto l = make(Expr::Kind::list, line);
          while (!is_op("]")) {
            l->args.push_back(parse_expression());
            if (!accept(",")) break;
          }
          expect("]");
          return l;
        }
        if (accept("{")) {
          auto d = make(Expr::Kind::dict, line);
          while (!is_op("}")) {
            d->args.push_back(parse_expression());
            expect(":");
            d->args.push_back(parse_expression());
            if (!accept(",")) break;
          }
          expect("}");
          return d;
        }
        break;
      case Tok::Kind::end: break;
    }
    fail(where(line), ": unexpected ", describe(t), " in an expression");
  }
  void parse_call_args(Expr& call) {
    // after '('
    while (!is_op(")")) {
      if (is_op("*") || is_op("**")) fail(where(peek().line), ": *args / **kwargs in calls are not supported");
      if (peek().kind == Tok::Kind::name && is_op("=", 1)) {
        std::string k = next().text;
        next();
        call.kwargs.emplace_back(std::move(k), parse_expression());
      } else {
        if (!call.kwargs.empty()) fail(where(peek().line), ": a positional argument after a keyword argument");
        call.args.push_back(parse_expression());
      }
      if (!accept(",")) break;
    }
    expect(")");
  }
  ExprPtr parse_postfix(ExprPtr e) {
    while (true) {
      if (is_op(".")) {
        const int line = next().line;
        auto a = make(Expr::Kind::attr, line);
        if (peek().kind == Tok::Kind::integer) {  // x.0 is x[0]
          a->kind = Expr::Kind::item;
          auto idx = make(Expr::Kind::literal, line);
          idx->value = Value::integer(next().i);
          a->args.push_back(std::move(e));
          a->args.push_back(std::move(idx));
        } else {
          a->name = expect_name("an attribute name");
          a->args.push_back(std::move(e));
        }
        e = std::move(a);
      } else if (is_op("[")) {
        const int line = next().line;
        // item or slice [a:b:c]
        ExprPtr parts[3];
        bool is_slice = false;
        int part = 0;
        while (true) {
          if (is_op(":")) {
            next();
            is_slice = true;
            if (++part > 2) fail(where(line), ": a slice has at most three parts");
            continue;
          }
          if (is_op("]")) break;
          if (parts[part]) fail(where(line), ": expected ':' or ']' in a subscript");
          parts[part] = parse_expression();
        }
        expect("]");
        auto s = make(is_slice ? Expr::Kind::slice : Expr::Kind::item, line);
        s->args.push_back(std::move(e));
        if (is_slice) {
          for (auto& p : parts) s->args.push_back(std::move(p));  // may be null
        } else {
          if (!parts[0]) fail(where(line), ": empty subscript");
          s->args.push_back(std::move(parts[0]));
        }
        e = std::move(s);
      } else if (is_op("(")) {
        const int line = next().line;
        auto c = make(Expr::Kind::call, line);
        c->args.push_back(std::move(e));
        parse_call_args(*c);
        e = std::move(c);
      } else {
        return e;
      }
    }
  }
  ExprPtr parse_filter_expr(ExprPtr e) {
    while (true) {
      if (is_op("|")) {
        const int line = next().line;
        auto f = make(Expr::Kind::filter, line);
        f->name = expect_name("a filter name");
        while (accept(".")) f->name += "." + expect_name("a filter name");
        f->args.push_back(std::move(e));
        if (accept("(")) parse_call_args(*f);
        e = std::move(f);
      } else if (is_word("is")) {
        const int line = next().line;
        auto t = make(Expr::Kind::test, line);
        t->negated = accept_word("not");
        t->name = expect_name("a test name");
        t->args.push_back(std::move(e));
        if (accept("(")) {
          parse_call_args(*t);
        } else if (peek().kind == Tok::Kind::string || peek().kind == Tok::Kind::integer ||
                   peek().kind == Tok::Kind::floating ||
                   (peek().kind == Tok::Kind::name && !is_word("and") && !is_word("or") && !is_word("else") &&
                    !is_word("if") && !is_word("in") && !is_word("not") && !is_word("is"))) {
          t->args.push_back(parse_primary());  // `is divisibleby 3`, `is sameas none`
          t->args.back() = parse_postfix(std::move(t->args.back()));
        }
        e = std::move(t);
      } else {
        return e;
      }
    }
  }

  std::vector<Chunk> chunks_;
  std::string what_;
  size_t at_ = 0;
  std::vector<Tok> toks_;
  size_t t_ = 0;
};

// ---------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------

class Renderer {
 public:
  Renderer(const std::string& what, std::string& out) : what_(what), out_(&out) { scopes_.emplace_back(); }

  void set_global(const std::string& name, Value v) { scopes_.front()[name] = std::move(v); }

  enum class Flow { normal, break_, continue_ };

  Flow exec(const Body& body) {
    for (const Node& n : body) {
      const Flow f = exec(n);
      if (f != Flow::normal) return f;
    }
    return Flow::normal;
  }

 private:
  using Scope = std::unordered_map<std::string, Value>;

  std::string where(int line) const { return what_ + ": line " + std::to_string(line); }

  Value lookup(const std::string& name) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      auto f = it->find(name);
      if (f != it->end()) return f->second;
    }
    return Value::undefined(name);
  }

  Flow exec(const Node& n) {
    switch (n.kind) {
      case Node::Kind::text: *out_ += n.text; return Flow::normal;
      case Node::Kind::output: {
        const Value v = eval(*n.expr);
        if (v.is(Value::Kind::callable)) fail(where(n.line), ": printing the function '", v.s, "' (missing call parentheses?)");
        *out_ += str(v);
        return Flow::normal;
      }
      case Node::Kind::if_:
        for (const auto& [cond, body] : n.branches)
          if (truthy(eval(*cond))) return exec(body);
        return exec(n.else_body);
      case Node::Kind::for_: return exec_for(n);
      case Node::Kind::set: {
        Value v = eval(*n.expr);
        if (n.attr_target) {
          Value ns = lookup(n.targets[0]);
          if (!ns.is(Value::Kind::ns))
            fail(where(n.line), ": cannot set attribute '", n.targets[1], "' of ", n.targets[0], " (a ", kind_name(ns), ", not a namespace)");
          ns.dict->set(n.targets[1], std::move(v));
        } else if (n.targets.size() == 1) {
          scopes_.back()[n.targets[0]] = std::move(v);
        } else {
          const List items = iterate(v, n.line);
          if (items.size() != n.targets.size())
            fail(where(n.line), ": cannot unpack ", items.size(), " values into ", n.targets.size(), " variables");
          for (size_t i = 0; i < items.size(); ++i) scopes_.back()[n.targets[i]] = items[i];
        }
        return Flow::normal;
      }
      case Node::Kind::set_block: {
        std::string captured;
        std::string* saved = out_;
        out_ = &captured;
        exec(n.body);
        out_ = saved;
        scopes_.back()[n.text] = Value::string(std::move(captured));
        return Flow::normal;
      }
      case Node::Kind::break_: return Flow::break_;
      case Node::Kind::continue_: return Flow::continue_;
      case Node::Kind::macro: {
        const Node* node = &n;
        scopes_.back()[n.text] = Value::callable(n.text, [this, node](Args& a) { return call_macro(*node, a); });
        return Flow::normal;
      }
    }
    return Flow::normal;
  }

  Value call_macro(const Node& m, Args& a) {
    if (a.pos.size() > m.params.size()) fail(a.where, ": macro '", m.text, "' takes ", m.params.size(), " arguments, got ", a.pos.size());
    Scope locals;
    for (size_t i = 0; i < m.params.size(); ++i) {
      const auto& [name, def] = m.params[i];
      if (i < a.pos.size()) locals[name] = a.pos[i];
      else if (const Value* v = a.kwarg(name)) locals[name] = *v;
      else if (def) locals[name] = eval(*def);
      else locals[name] = Value::undefined(name);
    }
    for (const auto& [k, v] : a.kw)
      if (std::none_of(m.params.begin(), m.params.end(), [&](const auto& p) { return p.first == k; }))
        fail(a.where, ": macro '", m.text, "' has no parameter '", k, "'");
    // A macro sees the template's globals and its own parameters, not the caller's locals.
    std::vector<Scope> saved_scopes;
    saved_scopes.swap(scopes_);
    scopes_.push_back(saved_scopes.front());
    scopes_.push_back(std::move(locals));
    std::string result;
    std::string* saved_out = out_;
    out_ = &result;
    exec(m.body);
    out_ = saved_out;
    scopes_.swap(saved_scopes);
    return Value::string(std::move(result));
  }

  Flow exec_for(const Node& n) {
    List items = iterate(eval(*n.expr), n.line);
    auto bind = [&](Scope& scope, const Value& item) {
      if (n.targets.size() == 1) {
        scope[n.targets[0]] = item;
        return;
      }
      const List parts = iterate(item, n.line);
      if (parts.size() != n.targets.size())
        fail(where(n.line), ": cannot unpack ", parts.size(), " values into ", n.targets.size(), " loop variables");
      for (size_t i = 0; i < parts.size(); ++i) scope[n.targets[i]] = parts[i];
    };
    if (n.filter) {  // `for x in xs if cond`: loop.* counts only the kept items
      List kept;
      for (const Value& item : items) {
        scopes_.emplace_back();
        bind(scopes_.back(), item);
        const bool keep = truthy(eval(*n.filter));
        scopes_.pop_back();
        if (keep) kept.push_back(item);
      }
      items = std::move(kept);
    }
    if (items.empty()) return exec(n.else_body);
    const auto len = int64_t(items.size());
    for (int64_t i = 0; i < len; ++i) {
      scopes_.emplace_back();
      Scope& scope = scopes_.back();
      bind(scope, items[size_t(i)]);
      Value loop = Value::make_dict(Value::Kind::ns);
      Dict& d = *loop.dict;
      d.set("index", Value::integer(i + 1));
      d.set("index0", Value::integer(i));
      d.set("revindex", Value::integer(len - i));
      d.set("revindex0", Value::integer(len - i - 1));
      d.set("first", Value::boolean(i == 0));
      d.set("last", Value::boolean(i == len - 1));
      d.set("length", Value::integer(len));
      d.set("previtem", i > 0 ? items[size_t(i - 1)] : Value::undefined("loop.previtem"));
      d.set("nextitem", i + 1 < len ? items[size_t(i + 1)] : Value::undefined("loop.nextitem"));
      auto cycle_items = std::make_shared<int64_t>(i);
      d.set("cycle", Value::callable("loop.cycle", [cycle_items](Args& a) {
              if (a.pos.empty()) fail(a.where, ": loop.cycle() needs at least one value");
              return a.pos[size_t(*cycle_items % int64_t(a.pos.size()))];
            }));
      scope["loop"] = loop;
      const Flow f = exec(n.body);
      scopes_.pop_back();
      if (f == Flow::break_) break;
    }
    return Flow::normal;
  }

  // The items a for loop visits: list elements, dict keys, string characters.
  List iterate(const Value& v, int line) const {
    switch (v.kind) {
      case Value::Kind::undefined: return {};  // Jinja iterates an undefined value as empty
      case Value::Kind::list: return *v.list;
      case Value::Kind::dict: {
        List keys;
        for (const auto& [k, x] : v.dict->items) keys.push_back(Value::string(k));
        return keys;
      }
      case Value::Kind::string: return chars(v.s);
      default: fail(where(line), ": cannot iterate over a ", kind_name(v));
    }
  }

  static List chars(const std::string& s) {
    List out;
    for (size_t i = 0; i < s.size();) {
      const auto c = uint8_t(s[i]);
      const size_t n = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
      out.push_back(Value::string(s.substr(i, n)));
      i += n;
    }
    return out;
  }

  // ---- expressions ----
  Value eval(const Expr& e) {
    switch (e.kind) {
      case Expr::Kind::literal: return e.value;
      case Expr::Kind::name: return lookup(e.name);
      case Expr::Kind::attr: return get_attr(eval(*e.args[0]), e.name, e.line, &e);
      case Expr::Kind::item: return get_item(eval(*e.args[0]), eval(*e.args[1]), e.line, &e);
      case Expr::Kind::slice: return slice(e);
      case Expr::Kind::call: {
        Value f = eval(*e.args[0]);
        if (!f.is(Value::Kind::callable)) {
          const std::string name = e.args[0]->kind == Expr::Kind::name ? e.args[0]->name
                                   : e.args[0]->kind == Expr::Kind::attr ? e.args[0]->name : "expression";
          if (f.is(Value::Kind::undefined)) fail(where(e.line), ": '", name, "' is not defined (or not a supported function)");
          fail(where(e.line), ": '", name, "' is a ", kind_name(f), ", not a function");
        }
        Args a = args_of(e, 1);
        return (*f.fn)(a);
      }
      case Expr::Kind::filter: return apply_filter(e);
      case Expr::Kind::test: {
        const bool r = apply_test(e);
        return Value::boolean(e.negated ? !r : r);
      }
      case Expr::Kind::neg:
      case Expr::Kind::pos: {
        Value v = eval(*e.args[0]);
        if (v.is(Value::Kind::integer) || v.is(Value::Kind::boolean)) return Value::integer(e.kind == Expr::Kind::neg ? -(v.is(Value::Kind::boolean) ? int64_t(v.b) : v.i) : v.i);
        if (v.is(Value::Kind::floating)) return Value::floating(e.kind == Expr::Kind::neg ? -v.f : v.f);
        fail(where(e.line), ": bad operand type for unary ", e.kind == Expr::Kind::neg ? "-" : "+", ": ", kind_name(v));
      }
      case Expr::Kind::not_: return Value::boolean(!truthy(eval(*e.args[0])));
      case Expr::Kind::and_: {
        Value l = eval(*e.args[0]);
        return truthy(l) ? eval(*e.args[1]) : l;
      }
      case Expr::Kind::or_: {
        Value l = eval(*e.args[0]);
        return truthy(l) ? l : eval(*e.args[1]);
      }
      case Expr::Kind::cond:
        if (truthy(eval(*e.args[1]))) return eval(*e.args[0]);
        return e.args.size() > 2 ? eval(*e.args[2]) : Value::undefined();
      case Expr::Kind::list: {
        Value l = Value::make_list();
        for (const auto& a : e.args) l.list->push_back(eval(*a));
        return l;
      }
      case Expr::Kind::dict: {
        Value d = Value::make_dict();
        for (size_t i = 0; i + 1 < e.args.size(); i += 2) {
          Value k = eval(*e.args[i]);
          if (!k.is(Value::Kind::string)) fail(where(e.line), ": only string dict keys are supported");
          d.dict->set(k.s, eval(*e.args[i + 1]));
        }
        return d;
      }
      case Expr::Kind::binary: return binary(e);
      case Expr::Kind::compare: {
        Value l = eval(*e.args[0]);
        for (size_t i = 0; i < e.ops.size(); ++i) {
          Value r = eval(*e.args[i + 1]);
          if (!compare(l, e.ops[i], r, e.line)) return Value::boolean(false);
          l = std::move(r);
        }
        return Value::boolean(true);
      }
    }
    fail(where(e.line), ": unknown expression");
  }

  Args args_of(const Expr& e, size_t first) {
    Args a;
    a.where = where(e.line);
    for (size_t i = first; i < e.args.size(); ++i) a.pos.push_back(eval(*e.args[i]));
    for (const auto& [k, x] : e.kwargs) a.kw.emplace_back(k, eval(*x));
    return a;
  }

  [[noreturn]] void undefined_error(const Value& v, const std::string& what, int line) const {
    fail(where(line), ": ", v.s.empty() ? "an undefined value" : "'" + v.s + "' is undefined and", " has no ", what);
  }

  // `whole`: the attribute expression (for the name of an undefined result), or null.
  Value get_attr(const Value& obj, const std::string& name, int line, const Expr* whole) {
    const auto missing = [&] { return Value::undefined(whole ? describe(whole) : name); };
    switch (obj.kind) {
      case Value::Kind::undefined: undefined_error(obj, "attribute '" + name + "'", line);
      case Value::Kind::ns:
      case Value::Kind::dict: {
        if (obj.is(Value::Kind::dict)) {
          if (Value m = method(obj, name, line); m.is(Value::Kind::callable)) return m;
        }
        if (Value* v = obj.dict->find(name)) return *v;
        return missing();
      }
      case Value::Kind::string:
      case Value::Kind::list: {
        Value m = method(obj, name, line);
        if (m.is(Value::Kind::callable)) return m;
        return missing();
      }
      default: return missing();
    }
  }

  static std::string describe(const Expr* e) {
    if (!e) return "value";
    if (e->kind == Expr::Kind::name) return e->name;
    if (e->kind == Expr::Kind::attr && !e->args.empty()) return describe(e->args[0].get()) + "." + e->name;
    if (e->kind == Expr::Kind::item && !e->args.empty()) {
      std::string base = describe(e->args[0].get());
      if (e->args[1]->kind == Expr::Kind::literal) return base + "[" + repr(e->args[1]->value) + "]";
      return base + "[...]";
    }
    if (e->kind == Expr::Kind::attr || e->kind == Expr::Kind::item) return describe(e->args[0].get());
    return "value";
  }

  Value get_item(const Value& obj, const Value& key, int line, const Expr* e) {
    switch (obj.kind) {
      case Value::Kind::undefined: undefined_error(obj, "item " + repr(key), line);
      case Value::Kind::dict:
      case Value::Kind::ns: {
        if (!key.is(Value::Kind::string)) return Value::undefined(describe(e->args[0].get()) + "[" + repr(key) + "]");
        if (Value* v = obj.dict->find(key.s)) return *v;
        if (obj.is(Value::Kind::dict))
          if (Value m = method(obj, key.s, line); m.is(Value::Kind::callable)) return m;
        return Value::undefined(describe(e->args[0].get()) + "[" + repr(key) + "]");
      }
      case Value::Kind::list:
      case Value::Kind::string: {
        if (key.is(Value::Kind::string)) return get_attr(obj, key.s, line, e);
        if (!key.is(Value::Kind::integer)) fail(where(line), ": indices must be integers, not ", kind_name(key));
        const List* items = obj.is(Value::Kind::list) ? obj.list.get() : nullptr;
        List cs;
        if (!items) {
          cs = chars(obj.s);
          items = &cs;
        }
        int64_t i = key.i;
        const auto n = int64_t(items->size());
        if (i < 0) i += n;
        if (i < 0 || i >= n) return Value::undefined(describe(e->args[0].get()) + "[" + std::to_string(key.i) + "]");
        return (*items)[size_t(i)];
      }
      default: return Value::undefined(describe(e->args[0].get()) + "[" + repr(key) + "]");
    }
  }

  Value slice(const Expr& e) {
    Value obj = eval(*e.args[0]);
    auto part = [&](size_t k) -> std::optional<int64_t> {
      if (!e.args[k]) return std::nullopt;
      Value v = eval(*e.args[k]);
      if (v.is(Value::Kind::none)) return std::nullopt;
      if (!v.is(Value::Kind::integer)) fail(where(e.line), ": slice indices must be integers");
      return v.i;
    };
    const std::optional<int64_t> start = part(1), stop = part(2), step_opt = part(3);
    const int64_t step = step_opt.value_or(1);
    if (step == 0) fail(where(e.line), ": slice step cannot be zero");
    List items;
    if (obj.is(Value::Kind::list)) items = *obj.list;
    else if (obj.is(Value::Kind::string)) items = chars(obj.s);
    else fail(where(e.line), ": cannot slice a ", kind_name(obj));
    const auto n = int64_t(items.size());
    auto clamp = [&](std::optional<int64_t> v, int64_t def, int64_t lo, int64_t hi) {
      if (!v) return def;
      int64_t x = *v < 0 ? *v + n : *v;
      return std::clamp(x, lo, hi);
    };
    List out;
    if (step > 0) {
      const int64_t b = clamp(start, 0, 0, n), en = clamp(stop, n, 0, n);
      for (int64_t i = b; i < en; i += step) out.push_back(items[size_t(i)]);
    } else {
      const int64_t b = clamp(start, n - 1, -1, n - 1), en = clamp(stop, -1, -1, n - 1);
      for (int64_t i = b; i > en; i += step) out.push_back(items[size_t(i)]);
    }
    if (obj.is(Value::Kind::string)) {
      std::string s;
      for (const Value& c : out) s += c.s;
      return Value::string(std::move(s));
    }
    return Value::make_list(std::move(out));
  }

  static int64_t as_int(const Value& v) { return v.is(Value::Kind::boolean) ? int64_t(v.b) : v.i; }

  Value binary(const Expr& e) {
    const Value l = eval(*e.args[0]);
    const Value r = eval(*e.args[1]);
    const std::string& op = e.name;
    if (op == "~") return Value::string(str(l) + str(r));
    auto type_error = [&]() -> Value {
      if (l.is(Value::Kind::undefined) || r.is(Value::Kind::undefined))
        undefined_error(l.is(Value::Kind::undefined) ? l : r, "value for '" + op + "'", e.line);
      fail(where(e.line), ": unsupported operand types for ", op, ": ", kind_name(l), " and ", kind_name(r));
    };
    const bool nums = l.is_number() && r.is_number();
    const bool ints = nums && !l.is(Value::Kind::floating) && !r.is(Value::Kind::floating);
    if (op == "+") {
      if (l.is(Value::Kind::string) && r.is(Value::Kind::string)) return Value::string(l.s + r.s);
      if (l.is(Value::Kind::list) && r.is(Value::Kind::list)) {
        List out = *l.list;
        out.insert(out.end(), r.list->begin(), r.list->end());
        return Value::make_list(std::move(out));
      }
      if (ints) return Value::integer(as_int(l) + as_int(r));
      if (nums) return Value::floating(l.as_double() + r.as_double());
      return type_error();
    }
    if (op == "-") {
      if (ints) return Value::integer(as_int(l) - as_int(r));
      if (nums) return Value::floating(l.as_double() - r.as_double());
      return type_error();
    }
    if (op == "*") {
      if (ints) return Value::integer(as_int(l) * as_int(r));
      if (nums) return Value::floating(l.as_double() * r.as_double());
      const Value* s = l.is(Value::Kind::string) ? &l : r.is(Value::Kind::string) ? &r : nullptr;
      const Value* k = s == &l ? &r : &l;
      if (s && (k->is(Value::Kind::integer) || k->is(Value::Kind::boolean))) {
        std::string out;
        for (int64_t i = 0; i < as_int(*k); ++i) out += s->s;
        return Value::string(std::move(out));
      }
      return type_error();
    }
    if (op == "/") {
      if (!nums) return type_error();
      if (r.as_double() == 0) fail(where(e.line), ": division by zero");
      return Value::floating(l.as_double() / r.as_double());
    }
    if (op == "//" || op == "%") {
      if (op == "%" && l.is(Value::Kind::string)) fail(where(e.line), ": string formatting with % is not supported");
      if (!nums) return type_error();
      if (r.as_double() == 0) fail(where(e.line), ": division by zero");
      if (ints) {
        const int64_t a = as_int(l), b = as_int(r);
        int64_t q = a / b, m = a % b;
        if (m != 0 && ((m < 0) != (b < 0))) --q, m += b;  // Python floors
        return Value::integer(op == "//" ? q : m);
      }
      const double a = l.as_double(), b = r.as_double();
      const double q = std::floor(a / b);
      return Value::floating(op == "//" ? q : a - q * b);
    }
    if (op == "**") {
      if (ints && as_int(r) >= 0) {
        int64_t out = 1;
        for (int64_t i = 0; i < as_int(r); ++i) out *= as_int(l);
        return Value::integer(out);
      }
      if (nums) return Value::floating(std::pow(l.as_double(), r.as_double()));
      return type_error();
    }
    fail(where(e.line), ": unknown operator ", op);
  }

  bool contains(const Value& container, const Value& item, int line) const {
    switch (container.kind) {
      case Value::Kind::string:
        if (!item.is(Value::Kind::string)) fail(where(line), ": 'in <string>' requires a string on the left, not a ", kind_name(item));
        return container.s.find(item.s) != std::string::npos;
      case Value::Kind::list:
        return std::any_of(container.list->begin(), container.list->end(), [&](const Value& x) { return equal(x, item); });
      case Value::Kind::dict:
        return item.is(Value::Kind::string) && container.dict->find(item.s);
      case Value::Kind::undefined: undefined_error(container, "items for 'in'", line);
      default: fail(where(line), ": a ", kind_name(container), " has no items for 'in'");
    }
  }

  bool compare(const Value& l, const std::string& op, const Value& r, int line) const {
    if (op == "==") return equal(l, r);
    if (op == "!=") return !equal(l, r);
    if (op == "in") return contains(r, l, line);
    if (op == "not in") return !contains(r, l, line);
    int c;
    if (l.is_number() && r.is_number()) c = l.as_double() < r.as_double() ? -1 : l.as_double() > r.as_double() ? 1 : 0;
    else if (l.is(Value::Kind::string) && r.is(Value::Kind::string)) c = l.s.compare(r.s) < 0 ? -1 : l.s == r.s ? 0 : 1;
    else fail(where(line), ": '", op, "' is not supported between a ", kind_name(l), " and a ", kind_name(r));
    if (op == "<") return c < 0;
    if (op == "<=") return c <= 0;
    if (op == ">") return c > 0;
    return c >= 0;
  }

  // ---- methods of str, dict and list ----
  static std::string strip_chars(const std::string& s, const Value& chars, bool left, bool right) {
    const std::string set = chars.is(Value::Kind::string) ? chars.s : std::string(" \t\n\r\f\v");
    size_t b = 0, e = s.size();
    if (left)
      while (b < e && set.find(s[b]) != std::string::npos) ++b;
    if (right)
      while (e > b && set.find(s[e - 1]) != std::string::npos) --e;
    return s.substr(b, e - b);
  }

  static std::string title_case(const std::string& s) {
    std::string out = s;
    bool prev_alpha = false;
    for (char& c : out) {
      const bool alpha = std::isalpha(uint8_t(c));
      if (alpha) c = char(prev_alpha ? std::tolower(uint8_t(c)) : std::toupper(uint8_t(c)));
      prev_alpha = alpha;
    }
    return out;
  }

  Value method(const Value& self, const std::string& name, int line) const {
    const std::string w = where(line);
    if (self.is(Value::Kind::string)) {
      const std::string s = self.s;
      if (name == "strip" || name == "lstrip" || name == "rstrip")
        return Value::callable(name, [s, name](Args& a) {
          return Value::string(strip_chars(s, a.get(0, "chars"), name != "rstrip", name != "lstrip"));
        });
      if (name == "upper" || name == "lower")
        return Value::callable(name, [s, name](Args&) {
          std::string out = s;
          for (char& c : out) c = char(name == "upper" ? std::toupper(uint8_t(c)) : std::tolower(uint8_t(c)));
          return Value::string(out);
        });
      if (name == "title") return Value::callable(name, [s](Args&) { return Value::string(title_case(s)); });
      if (name == "capitalize")
        return Value::callable(name, [s](Args&) {
          std::string out = s;
          for (char& c : out) c = char(std::tolower(uint8_t(c)));
          if (!out.empty()) out[0] = char(std::toupper(uint8_t(out[0])));
          return Value::string(out);
        });
      if (name == "startswith" || name == "endswith")
        return Value::callable(name, [s, name, w](Args& a) {
          const Value p = a.get(0, "prefix");
          List options = p.is(Value::Kind::list) ? *p.list : List{p};
          for (const Value& o : options) {
            if (!o.is(Value::Kind::string)) fail(w, ": ", name, "() takes a string");
            if (name == "startswith" ? s.starts_with(o.s) : s.ends_with(o.s)) return Value::boolean(true);
          }
          return Value::boolean(false);
        });
      if (name == "split")
        return Value::callable(name, [s, w](Args& a) {
          const Value sep = a.get(0, "sep");
          const Value maxv = a.get(1, "maxsplit", Value::integer(-1));
          int64_t max = maxv.is(Value::Kind::integer) ? maxv.i : -1;
          List out;
          if (sep.is(Value::Kind::string)) {
            if (sep.s.empty()) fail(w, ": split(): empty separator");
            size_t b = 0;
            while (max-- != 0) {
              const size_t k = s.find(sep.s, b);
              if (k == std::string::npos) break;
              out.push_back(Value::string(s.substr(b, k - b)));
              b = k + sep.s.size();
            }
            out.push_back(Value::string(s.substr(b)));
          } else {
            size_t i = 0;
            auto ws = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; };
            while (true) {
              while (i < s.size() && ws(s[i])) ++i;
              if (i >= s.size()) break;
              if (max-- == 0) {
                size_t e = s.size();
                while (e > i && ws(s[e - 1])) --e;
                out.push_back(Value::string(s.substr(i, e - i)));
                break;
              }
              size_t j = i;
              while (j < s.size() && !ws(s[j])) ++j;
              out.push_back(Value::string(s.substr(i, j - i)));
              i = j;
            }
          }
          return Value::make_list(std::move(out));
        });
      if (name == "replace")
        return Value::callable(name, [s, w](Args& a) {
          const Value from = a.get(0, "old"), to = a.get(1, "new");
          if (!from.is(Value::Kind::string) || !to.is(Value::Kind::string)) fail(w, ": replace() takes two strings");
          return Value::string(replace_all(s, from.s, to.s));
        });
      if (name == "join")
        return Value::callable(name, [s, w](Args& a) {
          const Value items = a.get(0, "iterable");
          if (!items.is(Value::Kind::list)) fail(w, ": join() takes a list");
          std::string out;
          for (size_t i = 0; i < items.list->size(); ++i) {
            if (!(*items.list)[i].is(Value::Kind::string)) fail(w, ": join(): item ", i, " is not a string");
            out += (i ? s : "") + (*items.list)[i].s;
          }
          return Value::string(out);
        });
      if (name == "count")
        return Value::callable(name, [s, w](Args& a) {
          const Value sub = a.get(0, "sub");
          if (!sub.is(Value::Kind::string) || sub.s.empty()) fail(w, ": count() takes a non-empty string");
          int64_t n = 0;
          for (size_t k = s.find(sub.s); k != std::string::npos; k = s.find(sub.s, k + sub.s.size())) ++n;
          return Value::integer(n);
        });
      if (name == "find")
        return Value::callable(name, [s, w](Args& a) {
          const Value sub = a.get(0, "sub");
          if (!sub.is(Value::Kind::string)) fail(w, ": find() takes a string");
          const size_t k = s.find(sub.s);
          return Value::integer(k == std::string::npos ? -1 : int64_t(k));
        });
      return Value::undefined();
    }
    if (self.is(Value::Kind::dict)) {
      const std::shared_ptr<Dict> d = self.dict;
      if (name == "items")
        return Value::callable(name, [d](Args&) {
          List out;
          for (const auto& [k, v] : d->items) out.push_back(Value::make_list({Value::string(k), v}));
          return Value::make_list(std::move(out));
        });
      if (name == "keys")
        return Value::callable(name, [d](Args&) {
          List out;
          for (const auto& [k, v] : d->items) out.push_back(Value::string(k));
          return Value::make_list(std::move(out));
        });
      if (name == "values")
        return Value::callable(name, [d](Args&) {
          List out;
          for (const auto& [k, v] : d->items) out.push_back(v);
          return Value::make_list(std::move(out));
        });
      if (name == "get")
        return Value::callable(name, [d](Args& a) {
          const Value key = a.get(0, "key");
          if (key.is(Value::Kind::string))
            if (Value* v = d->find(key.s)) return *v;
          return a.get(1, "default", Value::none());
        });
      return Value::undefined();
    }
    return Value::undefined();
  }

  static std::string replace_all(std::string s, const std::string& from, const std::string& to) {
    if (from.empty()) {
      std::string out;
      for (const Value& c : chars(s)) out += to + c.s;
      return out + to;
    }
    std::string out;
    size_t b = 0;
    for (size_t k = s.find(from); k != std::string::npos; k = s.find(from, b)) {
      out += s.substr(b, k - b) + to;
      b = k + from.size();
    }
    return out + s.substr(b);
  }

  // ---- filters ----
  Value apply_filter(const Expr& e) {
    Value v = eval(*e.args[0]);
    Args a = args_of(e, 1);
    const std::string& f = e.name;
    const std::string w = where(e.line);
    auto need = [&](Value::Kind k, const char* what) {
      if (v.is(Value::Kind::undefined)) undefined_error(v, "value for the filter '" + f + "'", e.line);
      if (!v.is(k)) fail(w, ": the filter '", f, "' needs ", what, ", got a ", kind_name(v));
    };
    if (f == "trim") {
      need(Value::Kind::string, "a string");
      return Value::string(strip_chars(v.s, a.get(0, "chars"), true, true));
    }
    if (f == "length" || f == "count") {
      if (v.is(Value::Kind::string)) return Value::integer(int64_t(chars(v.s).size()));
      if (v.is(Value::Kind::list)) return Value::integer(int64_t(v.list->size()));
      if (v.is(Value::Kind::dict)) return Value::integer(int64_t(v.dict->items.size()));
      if (v.is(Value::Kind::undefined)) return Value::integer(0);
      fail(w, ": the filter '", f, "' needs a string, list or dict, got a ", kind_name(v));
    }
    if (f == "lower" || f == "upper" || f == "capitalize" || f == "title") {
      Value s = Value::string(str(v));
      if (f == "title") return Value::string(title_case(s.s));
      Value m = method(s, f, e.line);
      Args none;
      return (*m.fn)(none);
    }
    if (f == "string") return Value::string(str(v));
    if (f == "default" || f == "d") {
      const bool boolean = truthy(a.get(1, "boolean", Value::boolean(false)));
      if (v.is(Value::Kind::undefined) || (boolean && !truthy(v))) return a.get(0, "default_value", Value::string(""));
      return v;
    }
    if (f == "first" || f == "last") {
      if (v.is(Value::Kind::string)) v = Value::make_list(chars(v.s));
      need(Value::Kind::list, "a list");
      if (v.list->empty()) return Value::undefined("first of an empty list");
      return f == "first" ? v.list->front() : v.list->back();
    }
    if (f == "join") {
      const Value sep = a.get(0, "d", Value::string(""));
      const Value attr = a.get(1, "attribute");
      List items = v.is(Value::Kind::list) ? *v.list : v.is(Value::Kind::string) ? chars(v.s) : List{};
      if (!v.is(Value::Kind::list) && !v.is(Value::Kind::string)) need(Value::Kind::list, "a list");
      std::string out;
      for (size_t i = 0; i < items.size(); ++i) {
        Value x = attr.is(Value::Kind::string) ? get_attr(items[i], attr.s, e.line, nullptr) : items[i];
        out += (i ? str(sep) : "") + str(x);
      }
      return Value::string(out);
    }
    if (f == "list") return Value::make_list(iterate(v, e.line));
    if (f == "reverse") {
      if (v.is(Value::Kind::string)) {
        List cs = chars(v.s);
        std::string out;
        for (auto it = cs.rbegin(); it != cs.rend(); ++it) out += it->s;
        return Value::string(out);
      }
      List items = iterate(v, e.line);
      std::reverse(items.begin(), items.end());
      return Value::make_list(std::move(items));
    }
    if (f == "items") {
      need(Value::Kind::dict, "a dict");
      Value m = method(v, "items", e.line);
      Args none;
      return (*m.fn)(none);
    }
    if (f == "tojson") {
      const Value indent = a.get(0, "indent");
      std::string out;
      to_json(v, indent.is(Value::Kind::integer) ? int(indent.i) : -1, 0, out, w);
      return Value::string(out);
    }
    if (f == "int") {
      if (v.is(Value::Kind::integer)) return v;
      if (v.is(Value::Kind::boolean)) return Value::integer(v.b);
      if (v.is(Value::Kind::floating)) return Value::integer(int64_t(v.f));
      if (v.is(Value::Kind::string)) {
        int64_t x = 0;
        const std::string t = strip_chars(v.s, Value::undefined(), true, true);
        auto [p, ec] = std::from_chars(t.data(), t.data() + t.size(), x);
        if (ec == std::errc() && p == t.data() + t.size()) return Value::integer(x);
      }
      return a.get(0, "default", Value::integer(0));
    }
    if (f == "float") {
      if (v.is_number()) return Value::floating(v.as_double());
      if (v.is(Value::Kind::string)) {
        char* end = nullptr;
        const double x = std::strtod(v.s.c_str(), &end);
        if (end && end != v.s.c_str() && *end == 0) return Value::floating(x);
      }
      return a.get(0, "default", Value::floating(0));
    }
    if (f == "abs") {
      if (v.is(Value::Kind::integer)) return Value::integer(v.i < 0 ? -v.i : v.i);
      if (v.is(Value::Kind::floating)) return Value::floating(std::fabs(v.f));
      fail(w, ": the filter 'abs' needs a number, got a ", kind_name(v));
    }
    if (f == "replace") {
      need(Value::Kind::string, "a string");
      const Value from = a.get(0, "old"), to = a.get(1, "new");
      if (!from.is(Value::Kind::string) || !to.is(Value::Kind::string)) fail(w, ": replace takes two strings");
      return Value::string(replace_all(v.s, from.s, to.s));
    }
    if (f == "selectattr" || f == "rejectattr") {
      const Value attr = a.get(0, "attr");
      if (!attr.is(Value::Kind::string)) fail(w, ": ", f, " needs an attribute name");
      List out;
      for (const Value& item : iterate(v, e.line)) {
        const Value x = get_attr(item, attr.s, e.line, nullptr);
        bool keep;
        if (a.pos.size() >= 2) {
          Args test_args;
          test_args.where = w;
          for (size_t i = 2; i < a.pos.size(); ++i) test_args.pos.push_back(a.pos[i]);
          if (!a.pos[1].is(Value::Kind::string)) fail(w, ": ", f, ": the test name must be a string");
          keep = run_test(a.pos[1].s, x, test_args, e.line);
        } else {
          keep = truthy(x);
        }
        if (keep == (f == "selectattr")) out.push_back(item);
      }
      return Value::make_list(std::move(out));
    }
    if (f == "map") {
      const Value* attr = a.kwarg("attribute");
      if (!attr || !attr->is(Value::Kind::string)) fail(w, ": only map(attribute='name') is supported");
      List out;
      for (const Value& item : iterate(v, e.line)) {
        Value x = get_attr(item, attr->s, e.line, nullptr);
        if (x.is(Value::Kind::undefined))
          if (const Value* d = a.kwarg("default")) x = *d;
        out.push_back(x);
      }
      return Value::make_list(std::move(out));
    }
    fail(w, ": the filter '", f, "' is not supported");
  }

  // ---- tests ----
  bool apply_test(const Expr& e) {
    Value v = eval(*e.args[0]);
    Args a = args_of(e, 1);
    return run_test(e.name, v, a, e.line);
  }

  bool run_test(const std::string& t, const Value& v, const Args& a, int line) const {
    using K = Value::Kind;
    if (t == "defined") return !v.is(K::undefined);
    if (t == "undefined") return v.is(K::undefined);
    if (t == "none") return v.is(K::none);
    if (t == "string") return v.is(K::string);
    if (t == "number") return v.is(K::integer) || v.is(K::floating);
    if (t == "integer") return v.is(K::integer);
    if (t == "float") return v.is(K::floating);
    if (t == "boolean") return v.is(K::boolean);
    if (t == "true") return v.is(K::boolean) && v.b;
    if (t == "false") return v.is(K::boolean) && !v.b;
    if (t == "mapping") return v.is(K::dict);
    if (t == "sequence") return v.is(K::list) || v.is(K::string) || v.is(K::dict);
    if (t == "iterable") return v.is(K::list) || v.is(K::string) || v.is(K::dict);
    if (t == "callable") return v.is(K::callable);
    if (t == "lower" || t == "upper") {
      if (!v.is(K::string)) return false;
      return std::none_of(v.s.begin(), v.s.end(), [&](char c) { return t == "lower" ? std::isupper(uint8_t(c)) : std::islower(uint8_t(c)); });
    }
    if (t == "even" || t == "odd" || t == "divisibleby") {
      if (!v.is(K::integer)) fail(where(line), ": the test '", t, "' needs an integer");
      if (t == "divisibleby") {
        const Value d = a.get(0, "num");
        if (!d.is(K::integer) || d.i == 0) fail(where(line), ": divisibleby needs a non-zero integer");
        return v.i % d.i == 0;
      }
      return (v.i % 2 == 0) == (t == "even");
    }
    static const std::map<std::string, std::string> kCompare = {
        {"eq", "=="}, {"equalto", "=="}, {"==", "=="}, {"ne", "!="}, {"!=", "!="}, {"lt", "<"}, {"lessthan", "<"},
        {"<", "<"},   {"le", "<="},      {"<=", "<="}, {"gt", ">"},  {">", ">"},   {"greaterthan", ">"},
        {"ge", ">="}, {">=", ">="},      {"in", "in"}};
    if (auto it = kCompare.find(t); it != kCompare.end()) {
      if (a.pos.empty()) fail(where(line), ": the test '", t, "' needs an argument");
      return compare(v, it->second, a.pos[0], line);
    }
    if (t == "sameas") {
      if (a.pos.empty()) fail(where(line), ": the test 'sameas' needs an argument");
      const Value& o = a.pos[0];
      if (v.kind != o.kind) return false;
      if (v.is(K::none) || v.is(K::undefined)) return true;
      if (v.is(K::boolean)) return v.b == o.b;
      return equal(v, o) && (v.list == o.list && v.dict == o.dict);
    }
    fail(where(line), ": the test '", t, "' is not supported");
  }

  std::string what_;
  std::string* out_;
  std::vector<Scope> scopes_;
};

}  // namespace

struct ChatTemplate::Program {
  std::string what;
  Body body;
};

ChatTemplate::ChatTemplate(std::string_view source, std::string what) : program_(std::make_unique<Program>()) {
  program_->what = std::move(what);
  Parser parser(scan(std::string(source), program_->what), program_->what);
  program_->body = parser.parse_all();
}

ChatTemplate::~ChatTemplate() = default;
ChatTemplate::ChatTemplate(ChatTemplate&&) noexcept = default;
ChatTemplate& ChatTemplate::operator=(ChatTemplate&&) noexcept = default;

std::string ChatTemplate::render(const nlohmann::ordered_json& variables) const {
  if (!variables.is_object()) fail(program_->what, ": the variables must be a JSON object");
  std::string out;
  Renderer r(program_->what, out);
  const std::string what = program_->what;
  r.set_global("raise_exception", Value::callable("raise_exception", [what](Args& a) -> Value {
                 fail(what, ": the template raised an error: ", str(a.get(0, "message")));
               }));
  r.set_global("namespace", Value::callable("namespace", [](Args& a) {
                 Value ns = Value::make_dict(Value::Kind::ns);
                 for (const Value& p : a.pos)
                   if (p.is(Value::Kind::dict))
                     for (const auto& [k, v] : p.dict->items) ns.dict->set(k, v);
                 for (const auto& [k, v] : a.kw) ns.dict->set(k, v);
                 return ns;
               }));
  r.set_global("dict", Value::callable("dict", [](Args& a) {
                 Value d = Value::make_dict();
                 for (const auto& [k, v] : a.kw) d.dict->set(k, v);
                 return d;
               }));
  r.set_global("range", Value::callable("range", [](Args& a) {
                 int64_t b = 0, e = 0, step = 1;
                 for (const Value& p : a.pos)
                   if (!p.is(Value::Kind::integer)) fail(a.where, ": range() takes integers");
                 if (a.pos.size() == 1) e = a.pos[0].i;
                 else if (a.pos.size() >= 2) b = a.pos[0].i, e = a.pos[1].i;
                 if (a.pos.size() == 3) step = a.pos[2].i;
                 if (a.pos.empty() || a.pos.size() > 3 || step == 0) fail(a.where, ": range() takes 1 to 3 integers (step not 0)");
                 if ((e - b) / step > 1000000) fail(a.where, ": range() longer than a million items");
                 List out;
                 for (int64_t i = b; step > 0 ? i < e : i > e; i += step) out.push_back(Value::integer(i));
                 return Value::make_list(std::move(out));
               }));
  r.set_global("strftime_now", Value::callable("strftime_now", [](Args& a) {
                 const Value fmt = a.get(0, "format");
                 if (!fmt.is(Value::Kind::string)) fail(a.where, ": strftime_now() takes a format string");
                 const std::time_t now = std::time(nullptr);
                 std::tm tm{};
                 localtime_r(&now, &tm);
                 char buf[256];
                 const size_t n = std::strftime(buf, sizeof buf, fmt.s.c_str(), &tm);
                 return Value::string(std::string(buf, n));
               }));
  for (auto it = variables.begin(); it != variables.end(); ++it) r.set_global(it.key(), from_json(it.value()));
  r.exec(program_->body);
  return out;
}

std::string apply_chat_template(const TokenizerConfig& config, const nlohmann::ordered_json& messages,
                                bool add_generation_prompt) {
  return apply_chat_template(config, messages, add_generation_prompt, nlohmann::ordered_json::object());
}

std::string apply_chat_template(const TokenizerConfig& config, const nlohmann::ordered_json& messages,
                                bool add_generation_prompt, const nlohmann::ordered_json& extra) {
  if (!config.chat_template) fail(config.path, ": has no chat_template");
  if (!messages.is_array()) fail("messages: not a JSON array of {\"role\", \"content\"} objects");
  for (size_t i = 0; i < messages.size(); ++i) {
    const auto& m = messages[i];
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string())
      fail("messages[", i, "]: not an object with a \"role\" string");
  }
  ChatTemplate t(*config.chat_template, config.path + ": chat_template");
  nlohmann::ordered_json vars = nlohmann::ordered_json::object();
  vars["messages"] = messages;
  vars["add_generation_prompt"] = add_generation_prompt;
  auto put = [&](const char* key, const std::optional<std::string>& v) {
    if (v) vars[key] = *v;
  };
  put("bos_token", config.bos_token);
  put("eos_token", config.eos_token);
  put("pad_token", config.pad_token);
  put("unk_token", config.unk_token);
  for (const auto& [key, value] : extra.items()) vars[key] = value;
  return t.render(vars);
}

std::string user_turn(const TokenizerConfig& config, const std::string& content) {
  nlohmann::ordered_json messages = nlohmann::ordered_json::array();
  messages.push_back({{"role", "user"}, {"content", content}});
  return apply_chat_template(config, messages, true);
}

}  // namespace dsv3
