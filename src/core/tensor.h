// A non-owning view of a stored tensor: dtype, shape and bytes (in a mapped file or in
// memory owned elsewhere). Depends on std only.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace dsv3 {

struct TensorView {
  DType dtype = DType::f32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  size_t nbytes = 0;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

std::string shape_str(const std::vector<int64_t>& shape);  // "[64, 256]"

}  // namespace dsv3
