// safetensors reading and writing: every way a file can be malformed gets its own error
// message naming the file (and the tensor); write_safetensors round-trips bytes, shapes,
// dtypes and metadata, aligns the data section, and never leaves a partial file behind.
#include <array>

#include "malformed_util.h"

namespace dsv3 {
namespace {

using namespace test;

// A valid header: "a" F32 [2, 3] at [0, 24), "b" BF16 [4] at [24, 32), and metadata.
json valid_header() {
  return json::parse(R"({"__metadata__": {"format": "pt"},
                         "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                         "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}})");
}
constexpr size_t kValidDataBytes = 32;

std::string length_prefix(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[size_t(i)] = char(uint8_t(n >> (8 * i)));
  return s;
}

// A safetensors image: u64 little-endian header length, header text, data_bytes of data.
std::string image(const std::string& header_text, size_t data_bytes = kValidDataBytes) {
  return length_prefix(header_text.size()) + header_text + std::string(data_bytes, '\x5a');
}
std::string image(const json& header, size_t data_bytes = kValidDataBytes) {
  return image(header.dump(), data_bytes);
}

class SafetensorsMalformed : public testing::Test {
 protected:
  // Writes bytes as a file and returns the message SafetensorsFile gives when opening it.
  std::string open_error(const std::string& bytes) {
    write_bytes(path_, bytes);
    return error_of([&] { SafetensorsFile f(path_); });
  }
  // The message for the valid header after edit, with data_bytes of data.
  std::string header_error(const std::function<void(json&)>& edit, size_t data_bytes = kValidDataBytes) {
    json h = valid_header();
    edit(h);
    return open_error(image(h, data_bytes));
  }
  // The message must name this file and say `text`.
  auto says(const std::string& text) const { return HasSubstr(path_ + ": " + text); }

  ScratchDir dir_;
  const std::string path_ = dir_ / "bad.safetensors";
};

TEST_F(SafetensorsMalformed, TheUndamagedImageIsValid) {
  write_bytes(path_, image(valid_header()));
  SafetensorsFile f(path_);
  ASSERT_EQ(f.tensors().size(), 2u);
  EXPECT_EQ(f.find("a")->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(f.find("b")->dtype, DType::bf16);
  EXPECT_EQ(f.metadata().at("format"), "pt");
}

TEST_F(SafetensorsMalformed, FileShorterThanTheLengthField) {
  EXPECT_THAT(open_error(image(valid_header()).substr(0, 5)),
              says("file is 5 bytes, too short for the 8-byte header length"));
  EXPECT_THAT(open_error(""), says("file is 0 bytes, too short for the 8-byte header length"));
}

TEST_F(SafetensorsMalformed, HeaderLengthPastTheEndOfTheFile) {
  const std::string text = valid_header().dump();
  const std::string cut = image(text).substr(0, 8 + text.size() - 1);
  EXPECT_THAT(open_error(cut), says(cat("header length ", text.size(), " runs past the end of the file (",
                                        cut.size(), " bytes)")));
}

TEST_F(SafetensorsMalformed, HeaderLengthOverTheLimit) {
  const std::string valid = image(valid_header());
  const uint64_t limit = 100ull << 20;
  EXPECT_THAT(open_error(length_prefix(limit + 1) + valid.substr(8)),
              says(cat("header length ", limit + 1, " exceeds the 100 MiB limit")));
  EXPECT_THAT(open_error(length_prefix(~0ull) + valid.substr(8)),
              says(cat("header length ", ~0ull, " exceeds the 100 MiB limit")));
}

TEST_F(SafetensorsMalformed, HeaderNotValidJson) {
  const std::string text = valid_header().dump();
  EXPECT_THAT(open_error(image(text.substr(0, text.size() / 2))), says("header is not valid JSON"));
}

TEST_F(SafetensorsMalformed, HeaderNotAnObject) {
  EXPECT_THAT(open_error(image(std::string(R"([{"dtype": "F32"}])"))), says("header is not a JSON object"));
}

TEST_F(SafetensorsMalformed, TensorEntryNotAnObject) {
  EXPECT_THAT(header_error([](json& h) { h["a"] = 5; }), says("tensor a: entry is not an object"));
}

TEST_F(SafetensorsMalformed, TensorEntryMissingDtype) {
  EXPECT_THAT(header_error([](json& h) { h["a"].erase("dtype"); }), says("tensor a: missing or non-string dtype"));
  EXPECT_THAT(header_error([](json& h) { h["a"]["dtype"] = 4; }), says("tensor a: missing or non-string dtype"));
}

TEST_F(SafetensorsMalformed, TensorEntryMissingShape) {
  EXPECT_THAT(header_error([](json& h) { h["b"].erase("shape"); }), says("tensor b: missing or non-array shape"));
  EXPECT_THAT(header_error([](json& h) { h["b"]["shape"] = 4; }), says("tensor b: missing or non-array shape"));
}

TEST_F(SafetensorsMalformed, TensorEntryMissingOrBadDataOffsets) {
  const std::string msg = "tensor a: data_offsets must be two non-negative integers";
  EXPECT_THAT(header_error([](json& h) { h["a"].erase("data_offsets"); }), says(msg));
  EXPECT_THAT(header_error([](json& h) { h["a"]["data_offsets"] = {0, 24, 32}; }), says(msg));
  EXPECT_THAT(header_error([](json& h) { h["a"]["data_offsets"] = {-8, 16}; }), says(msg));
  EXPECT_THAT(header_error([](json& h) { h["a"]["data_offsets"] = {0.0, 24.0}; }), says(msg));
}

TEST_F(SafetensorsMalformed, UnknownDtype) {
  EXPECT_THAT(header_error([](json& h) { h["a"]["dtype"] = "F128"; }), says("tensor a: unknown dtype 'F128'"));
}

TEST_F(SafetensorsMalformed, NegativeOrNonIntegerShapeEntries) {
  const std::string msg = "tensor a: shape entries must be non-negative integers";
  EXPECT_THAT(header_error([](json& h) { h["a"]["shape"] = {-2, 3}; }), says(msg));
  EXPECT_THAT(header_error([](json& h) { h["a"]["shape"] = {2.5, 3}; }), says(msg));
  EXPECT_THAT(header_error([](json& h) { h["a"]["shape"] = {"2", 3}; }), says(msg));
}

TEST_F(SafetensorsMalformed, ShapeTooLarge) {
  EXPECT_THAT(header_error([](json& h) { h["a"]["shape"] = json::array({1ull << 41}); }),
              says(cat("tensor a: shape entry ", 1ull << 41, " is too large")));
  // Each entry is allowed, but the element count (2^64) wraps around to 0 in 64 bits.
  EXPECT_THAT(header_error([](json& h) {
                h["a"]["shape"] = {1ull << 40, 1ull << 24};
                h["a"]["data_offsets"] = {0, 0};
              }),
              says("tensor a: shape [1099511627776, 16777216] is too large"));
}

TEST_F(SafetensorsMalformed, DataOffsetsReversed) {
  EXPECT_THAT(header_error([](json& h) { h["a"]["data_offsets"] = {24, 0}; }),
              says("tensor a: data_offsets [24, 0] are reversed"));
}

TEST_F(SafetensorsMalformed, DataOffsetsPastTheDataSection) {
  EXPECT_THAT(header_error([](json&) {}, kValidDataBytes - 4),
              says("tensor b: data_offsets [24, 32] run past the data section (28 bytes)"));
}

TEST_F(SafetensorsMalformed, ByteCountDisagreesWithDtypeAndShape) {
  EXPECT_THAT(header_error([](json& h) { h["a"]["shape"] = {2, 4}; }),
              says("tensor a: F32 [2, 4] needs 32 bytes but data_offsets span 24"));
  EXPECT_THAT(header_error([](json& h) { h["b"]["dtype"] = "F32"; }),
              says("tensor b: F32 [4] needs 16 bytes but data_offsets span 8"));
}

TEST_F(SafetensorsMalformed, TensorsOverlap) {
  EXPECT_THAT(header_error([](json& h) { h["b"]["data_offsets"] = {20, 28}; }),
              says("tensors a and b overlap in the data section"));
}

// The reference library requires the tensors to cover the data section exactly.
TEST_F(SafetensorsMalformed, GapsAndTrailingBytesInTheDataSection) {
  EXPECT_THAT(header_error([](json& h) {
                h["a"]["data_offsets"] = {8, 32};
                h["a"]["shape"] = {2, 3};
                h["b"]["data_offsets"] = {32, 40};
              }, 40),
              says("8 unused bytes before tensor a in the data section (at 0)"));
  EXPECT_THAT(header_error([](json& h) { h["b"]["data_offsets"] = {28, 36}; }, 36),
              says("4 unused bytes before tensor b in the data section (at 24)"));
  EXPECT_THAT(open_error(image(valid_header(), kValidDataBytes + 3)),
              says("3 bytes after the last tensor's data (the data section is 35 bytes, the tensors cover 32)"));
}

TEST_F(SafetensorsMalformed, RepeatedKeys) {
  const std::string twice = R"({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                               "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
                               "a": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}})";
  EXPECT_THAT(open_error(image(twice)), says("header has the key 'a' twice"));
  const std::string inner = R"({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24], "dtype": "F16"},
                               "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}})";
  EXPECT_THAT(open_error(image(inner)), says("header has the key 'dtype' twice"));
}

// A header length that is not a multiple of 8 (some published checkpoints have one) leaves
// the tensors unaligned: they are still read, from an aligned copy.
TEST_F(SafetensorsMalformed, UnalignedDataIsReadFromAnAlignedCopy) {
  std::string header = valid_header().dump();
  header.append((8 - header.size() % 8) % 8 + 3, ' ');  // 8 + length = 3 mod 8
  std::string bytes = image(header);
  for (int i = 0; i < 6; ++i) {  // a = 0.5, 1.5, ... as float32
    const float v = 0.5f + float(i);
    std::memcpy(&bytes[8 + header.size() + size_t(i) * 4], &v, 4);
  }
  write_bytes(path_, bytes);
  SafetensorsFile f(path_);
  const TensorView* a = f.find("a");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a->data) % 4, 0u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(f.find("b")->data) % 2, 0u);
  const float* av = reinterpret_cast<const float*>(a->data);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(av[i], 0.5f + float(i));
}

TEST_F(SafetensorsMalformed, MetadataValueNotAString) {
  EXPECT_THAT(header_error([](json& h) { h["__metadata__"]["format"] = 1; }),
              says("__metadata__ value 'format' is not a string"));
  EXPECT_THAT(header_error([](json& h) { h["__metadata__"] = {1, 2}; }), says("__metadata__ is not an object"));
}

// The safetensors library stores tensors by dtype size, then name, so an empty F32 tensor
// can sit at the same offset as the BF16 tensor after it. Empty tensors overlap nothing.
TEST_F(SafetensorsMalformed, EmptyTensorSharingAnOffsetIsValid) {
  write_bytes(path_, image(json::parse(R"({"a": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]},
                                           "z": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}})"),
                           8));
  SafetensorsFile f(path_);
  ASSERT_NE(f.find("z"), nullptr);
  EXPECT_EQ(f.find("z")->nbytes, 0u);
  EXPECT_EQ(f.find("a")->nbytes, 8u);
}

// ---- writing ----

class SafetensorsWrite : public testing::Test {
 protected:
  // Tensors of four dtypes with distinct, recognisable bytes.
  SafetensorsWrite() {
    for (size_t i = 0; i < f32_.size(); ++i) f32_[i] = 0.5f * float(i) - 1.0f;
    for (size_t i = 0; i < bf16_.size(); ++i) bf16_[i] = f32_to_bf16(3.0f + float(i));
    for (size_t i = 0; i < i32_.size(); ++i) i32_[i] = int32_t(i) * -7 + 100000;
    for (size_t i = 0; i < fp8_.size(); ++i) fp8_[i] = f32_to_fp8_e4m3(float(i) - 2.5f);
  }
  std::vector<TensorToWrite> tensors() const {
    return {{"weights.f32", DType::f32, {2, 3}, f32_.data()},
            {"weights.bf16", DType::bf16, {3}, bf16_.data()},  // 6 bytes: later data is unaligned
            {"ids", DType::i32, {2, 2}, i32_.data()},
            {"weights.fp8", DType::f8_e4m3, {5, 1}, fp8_.data()}};
  }
  static void expect_same(const SafetensorsFile& f, const TensorToWrite& t, size_t nbytes) {
    const TensorView* v = f.find(t.name);
    ASSERT_NE(v, nullptr) << t.name;
    EXPECT_EQ(v->dtype, t.dtype) << t.name;
    EXPECT_EQ(v->shape, t.shape) << t.name;
    ASSERT_EQ(v->nbytes, nbytes) << t.name;
    if (nbytes > 0) {
      EXPECT_EQ(std::memcmp(v->data, t.data, nbytes), 0) << t.name;
    }
  }

  std::array<float, 6> f32_{};
  std::array<uint16_t, 3> bf16_{};
  std::array<int32_t, 4> i32_{};
  std::array<uint8_t, 5> fp8_{};
  ScratchDir dir_;
};

TEST_F(SafetensorsWrite, RoundTripKeepsBytesShapesDtypesAndMetadata) {
  const std::string path = dir_ / "out.safetensors";
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "round trip"}};
  write_safetensors(path, tensors(), meta);

  SafetensorsFile f(path);
  EXPECT_EQ(f.tensors().size(), 4u);
  const auto t = tensors();
  expect_same(f, t[0], 24);
  expect_same(f, t[1], 6);
  expect_same(f, t[2], 16);
  expect_same(f, t[3], 5);
  EXPECT_EQ(f.metadata(), meta);
  for (const auto& [name, v] : f.tensors())  // wider elements first: every tensor aligned in place
    EXPECT_EQ(reinterpret_cast<uintptr_t>(v.data) % dtype_size(v.dtype), 0u) << name;

  // The data section starts 8-byte aligned; the header is padded with spaces.
  const std::string bytes = read_bytes(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | uint8_t(bytes[size_t(i)]);
  EXPECT_EQ((8 + n) % 8, 0u);
  EXPECT_EQ(bytes.size(), 8 + n + 24 + 6 + 16 + 5);
  const std::string header = bytes.substr(8, n);
  EXPECT_EQ(header.find_first_not_of(' ', header.rfind('}') + 1), std::string::npos);
  EXPECT_FALSE(fs::exists(path + ".tmp"));
}

TEST_F(SafetensorsWrite, EmptyTensorFirstRoundTrips) {
  const std::string path = dir_ / "out.safetensors";
  write_safetensors(path, {{"z", DType::f32, {0}, nullptr}, {"a", DType::bf16, {3}, bf16_.data()}});
  SafetensorsFile f(path);
  expect_same(f, {"z", DType::f32, {0}, nullptr}, 0);
  expect_same(f, {"a", DType::bf16, {3}, bf16_.data()}, 6);
}

TEST_F(SafetensorsWrite, IntoMissingDirectoryThrowsAndLeavesNothing) {
  const std::string missing = dir_ / "no_such_dir";
  const std::string path = missing + "/out.safetensors";
  EXPECT_THAT(error_of([&] { write_safetensors(path, tensors()); }),
              HasSubstr(path + ".tmp: cannot create: No such file or directory"));
  EXPECT_FALSE(fs::exists(missing));
  EXPECT_TRUE(fs::is_empty(dir_.path()));
}

TEST_F(SafetensorsWrite, FailedOverwriteLeavesThePreviousFileIntact) {
  const std::string path = dir_ / "out.safetensors";
  write_safetensors(path, tensors(), {{"version", "1"}});
  const std::string before = read_bytes(path);

  // A directory where the temporary file should go makes the new write fail.
  fs::create_directory(path + ".tmp");
  EXPECT_THAT(error_of([&] { write_safetensors(path, {tensors()[0]}, {{"version", "2"}}); }),
              HasSubstr(path + ".tmp: cannot create"));
  EXPECT_EQ(read_bytes(path), before);
  EXPECT_EQ(SafetensorsFile(path).metadata().at("version"), "1");
}

TEST_F(SafetensorsWrite, FailedRenameRemovesTheTemporaryFile) {
  const std::string path = dir_ / "taken";
  fs::create_directories(path + "/child");  // a non-empty directory cannot be replaced by a file
  EXPECT_THAT(error_of([&] { write_safetensors(path, tensors()); }), HasSubstr(path + ": rename failed"));
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  EXPECT_TRUE(fs::is_directory(path + "/child"));
}

}  // namespace
}  // namespace dsv3
