// Helpers to read golden tensors in tests.
#pragma once
#include <cstring>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/safetensors.h"

namespace dsv3::test {

inline std::string data_dir() { return DSV3_TEST_DATA; }
inline std::string golden_dir(const std::string& name) { return data_dir() + "/golden/" + name; }

inline std::vector<float> read_f32(const SafetensorsFile& f, const std::string& name) {
  const TensorView* v = f.find(name);
  if (!v || v->dtype != DType::f32) fail(f.path(), ": no F32 tensor ", name);
  std::vector<float> out(static_cast<size_t>(v->numel()));
  std::memcpy(out.data(), v->data, v->nbytes);
  return out;
}
inline std::vector<int32_t> read_i32(const SafetensorsFile& f, const std::string& name) {
  const TensorView* v = f.find(name);
  if (!v || v->dtype != DType::i32) fail(f.path(), ": no I32 tensor ", name);
  std::vector<int32_t> out(static_cast<size_t>(v->numel()));
  std::memcpy(out.data(), v->data, v->nbytes);
  return out;
}
inline float max_abs(const std::vector<float>& a) {
  float m = 0;
  for (float x : a) m = std::max(m, std::abs(x));
  return m;
}
inline float max_abs_diff(const float* a, const float* b, size_t n) {
  float m = 0;
  for (size_t i = 0; i < n; ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

}  // namespace dsv3::test
