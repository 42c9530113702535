// The ByteLevel byte <-> character map (see byte_level.h).
#include "tokenizer/byte_level.h"

#include <vector>

namespace dsv3::byte_level {

namespace {

struct Tables {
  std::array<char32_t, 256> char_of{};
  std::array<std::string, 256> utf8_of;
  std::array<int16_t, 512> byte_of{};  // code point (< 512) -> byte, -1 if none

  Tables() {
    byte_of.fill(-1);
    auto printable = [](int b) { return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF); };
    int next = 256;
    for (int b = 0; b < 256; ++b) {
      const char32_t c = printable(b) ? char32_t(b) : char32_t(next++);
      char_of[size_t(b)] = c;
      append_utf8(utf8_of[size_t(b)], c);
      byte_of[size_t(c)] = int16_t(b);
    }
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

}  // namespace

void append_utf8(std::string& out, char32_t c) {
  if (c < 0x80) {
    out += char(c);
  } else if (c < 0x800) {
    out += char(0xC0 | (c >> 6));
    out += char(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += char(0xE0 | (c >> 12));
    out += char(0x80 | ((c >> 6) & 0x3F));
    out += char(0x80 | (c & 0x3F));
  } else {
    out += char(0xF0 | (c >> 18));
    out += char(0x80 | ((c >> 12) & 0x3F));
    out += char(0x80 | ((c >> 6) & 0x3F));
    out += char(0x80 | (c & 0x3F));
  }
}

char32_t char_of(uint8_t b) { return tables().char_of[b]; }

const std::string& utf8_of(uint8_t b) { return tables().utf8_of[b]; }

bool decode(std::string_view s, std::string& out) {
  const Tables& t = tables();
  out.clear();
  size_t i = 0;
  while (i < s.size()) {
    const auto c0 = uint8_t(s[i]);
    char32_t c;
    if (c0 < 0x80) {
      c = c0;
      i += 1;
    } else if (c0 >= 0xC2 && c0 < 0xE0 && i + 1 < s.size() && (uint8_t(s[i + 1]) & 0xC0) == 0x80) {
      c = char32_t(c0 & 0x1F) << 6 | char32_t(uint8_t(s[i + 1]) & 0x3F);
      i += 2;
    } else {
      return false;  // every mapped character is below U+0800
    }
    if (c >= t.byte_of.size() || t.byte_of[c] < 0) return false;
    out += char(t.byte_of[c]);
  }
  return true;
}

std::string encode(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (char ch : bytes) out += utf8_of(uint8_t(ch));
  return out;
}

}  // namespace dsv3::byte_level
