// The ByteLevel byte <-> character map of GPT-2-style tokenizers: every byte is shown as
// one printable Unicode character, so vocabulary entries are strings of those characters.
// Depends on std only.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace dsv3::byte_level {

// The code point that stands for byte b ('!'..'~', '¡'..'¬', '®'..'ÿ' map to themselves;
// the other 68 bytes map to U+0100, U+0101, ... in byte order).
char32_t char_of(uint8_t b);

// The UTF-8 encoding of char_of(b) (1 or 2 bytes).
const std::string& utf8_of(uint8_t b);

// Decodes a vocabulary string (UTF-8 of mapped characters) back to bytes. Returns false when
// `s` holds a character outside the map (or is not valid UTF-8); `out` is then unspecified.
bool decode(std::string_view s, std::string& out);

// Encodes raw bytes as the mapped characters' UTF-8 (the inverse of decode).
std::string encode(std::string_view bytes);

// Appends the UTF-8 encoding of code point c.
void append_utf8(std::string& out, char32_t c);

}  // namespace dsv3::byte_level
