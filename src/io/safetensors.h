// safetensors files: read over mmap with every header field validated, and written
// atomically (temp file, fsync, rename). Uses core only.
// Format: u64 little-endian header length N, N bytes of JSON header (tensor name ->
// {dtype, shape, data_offsets [begin, end)} relative to the data section, plus an optional
// "__metadata__" string map), then the data section.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/mapped_file.h"
#include "core/tensor.h"

namespace dsv3 {

struct SafetensorsHeader {
  std::map<std::string, TensorView> tensors;  // data pointers point into the given buffer
  std::map<std::string, std::string> metadata;
};

// Parses and validates the header of a safetensors image of `size` bytes at `data`: every
// field, one entry per name, and tensors that tile the data section exactly (no overlap,
// gap or trailing bytes). `what` (usually the path) starts every error message. Throws
// Error on anything malformed. Data pointers may be unaligned (SafetensorsFile fixes that).
SafetensorsHeader parse_safetensors(const uint8_t* data, size_t size, const std::string& what);

class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  const std::string& path() const { return file_.path(); }
  const TensorView* find(const std::string& name) const;
  const std::map<std::string, TensorView>& tensors() const { return header_.tensors; }
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }

 private:
  MappedFile file_;
  SafetensorsHeader header_;
  std::vector<std::vector<uint64_t>> aligned_copies_;  // of tensors that cannot be read in place
};

struct TensorToWrite {
  std::string name;
  DType dtype = DType::f32;
  std::vector<int64_t> shape;
  const void* data = nullptr;  // numel * dtype_size bytes
};

// Writes path atomically: a crash leaves either the old file or the complete new one. The
// header is padded to a multiple of 8 and the data ordered by decreasing element size, so
// every tensor is aligned.
void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

}  // namespace dsv3
