// Helpers for the malformed-input tests: a scratch folder per test, raw file bytes,
// safetensors files rebuilt tensor by tensor, JSON file edits, copies of the golden
// checkpoints, and error_of() to capture a dsv3::Error's message. Every damaged file is
// generated at test time from valid bytes; nothing generated is kept.
#pragma once
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "golden_util.h"
#include "io/safetensors.h"

namespace dsv3::test {

namespace fs = std::filesystem;
using json = nlohmann::json;
using testing::AllOf;
using testing::HasSubstr;

// A fresh folder under testing::TempDir() named after the running test, removed afterwards.
class ScratchDir {
 public:
  ScratchDir() {
    const testing::TestInfo* info = testing::UnitTest::GetInstance()->current_test_info();
    std::string name = std::string("dsv3_") + info->test_suite_name() + "_" + info->name() + "_" +
                       std::to_string(::getpid());
    std::replace(name.begin(), name.end(), '/', '_');
    path_ = fs::path(testing::TempDir()) / name;
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;

  std::string path() const { return path_.string(); }
  std::string operator/(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

inline std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  if (!out) fail(path, ": cannot write");
}

inline void truncate_by(const std::string& path, size_t n) { fs::resize_file(path, fs::file_size(path) - n); }

// The message of the dsv3::Error fn throws; a test failure if it throws nothing or something else.
inline std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected dsv3::Error, got another exception: " << e.what();
    return "";
  }
  ADD_FAILURE() << "expected dsv3::Error, nothing was thrown";
  return "";
}

// ---- safetensors files as editable values ----

struct OwnedTensor {
  std::string name;
  DType dtype = DType::f32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;

  template <typename T>
  void set(size_t i, T value) {  // element i, as its stored type T
    std::memcpy(bytes.data() + i * sizeof(T), &value, sizeof(T));
  }
};

struct OwnedFile {
  std::vector<OwnedTensor> tensors;
  std::map<std::string, std::string> metadata;

  OwnedTensor& at(const std::string& name) {
    for (OwnedTensor& t : tensors)
      if (t.name == name) return t;
    fail("test file has no tensor ", name);
  }
  void erase(const std::string& name) {
    at(name);  // must exist
    std::erase_if(tensors, [&](const OwnedTensor& t) { return t.name == name; });
  }
  // A zero-filled tensor of the given dtype and shape.
  void add(const std::string& name, DType dtype, std::vector<int64_t> shape) {
    size_t n = dtype_size(dtype);
    for (int64_t d : shape) n *= size_t(d);
    tensors.push_back({name, dtype, std::move(shape), std::vector<uint8_t>(n, 0)});
  }
};

inline OwnedFile load_owned(const std::string& path) {
  SafetensorsFile f(path);
  OwnedFile out;
  out.metadata = f.metadata();
  for (const auto& [name, v] : f.tensors())
    out.tensors.push_back({name, v.dtype, v.shape, std::vector<uint8_t>(v.data, v.data + v.nbytes)});
  return out;
}

inline void save_owned(const std::string& path, const OwnedFile& f) {
  std::vector<TensorToWrite> out;
  for (const OwnedTensor& t : f.tensors) out.push_back({t.name, t.dtype, t.shape, t.bytes.data()});
  write_safetensors(path, out, f.metadata);
}

// Reads the safetensors file at path, applies edit, writes it back.
inline void rewrite_safetensors(const std::string& path, const std::function<void(OwnedFile&)>& edit) {
  OwnedFile f = load_owned(path);
  edit(f);
  save_owned(path, f);
}

// ---- JSON files ----

inline json read_json(const std::string& path) { return json::parse(read_bytes(path)); }
inline void write_json(const std::string& path, const json& j) { write_bytes(path, j.dump(2)); }
inline void edit_json(const std::string& path, const std::function<void(json&)>& edit) {
  json j = read_json(path);
  edit(j);
  write_json(path, j);
}

// ---- golden checkpoints ----

inline constexpr char kIndexFile[] = "model.safetensors.index.json";

// Copies the checkpoint files (config, weights, index; not the goldens) of golden checkpoint
// `name` into dir/name and returns the copy's path.
inline std::string copy_golden(const ScratchDir& dir, const std::string& name) {
  const std::string dst = dir / name;
  fs::create_directories(dst);
  for (const auto& e : fs::directory_iterator(golden_dir(name))) {
    const std::string file = e.path().filename().string();
    if (file == "config.json" || file == kIndexFile || file.rfind("model", 0) == 0) fs::copy(e.path(), dst);
  }
  return dst;
}

// The file of checkpoint dir that holds tensor `name` (through the index if there is one).
inline std::string file_holding(const std::string& dir, const std::string& name) {
  const std::string index = dir + "/" + kIndexFile;
  if (!fs::exists(index)) return dir + "/model.safetensors";
  return dir + "/" + read_json(index).at("weight_map").at(name).get<std::string>();
}

// Rewrites the file of checkpoint dir that holds tensor `name`.
inline void rewrite_holding(const std::string& dir, const std::string& name,
                            const std::function<void(OwnedFile&)>& edit) {
  rewrite_safetensors(file_holding(dir, name), edit);
}

// Removes tensor `name` from checkpoint dir: from its file and, if sharded, from the index.
inline void drop_tensor(const std::string& dir, const std::string& name) {
  rewrite_holding(dir, name, [&](OwnedFile& f) { f.erase(name); });
  const std::string index = dir + "/" + kIndexFile;
  if (fs::exists(index)) edit_json(index, [&](json& j) { j["weight_map"].erase(name); });
}

}  // namespace dsv3::test
