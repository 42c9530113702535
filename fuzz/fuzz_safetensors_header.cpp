// libFuzzer target: dsv3::parse_safetensors on arbitrary bytes. Malformed input must end in
// a dsv3::Error; anything else (a crash, a sanitizer report, another exception) is a bug.
// Every accepted tensor must lie inside the input and agree with its dtype and shape.
#include <cstddef>
#include <cstdint>

#include "core/error.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const dsv3::SafetensorsHeader h = dsv3::parse_safetensors(data, size, "fuzz-input");
    for (const auto& [name, v] : h.tensors) {
      if (size_t(v.numel()) * dsv3::dtype_size(v.dtype) != v.nbytes) __builtin_trap();
      if (v.nbytes == 0) continue;
      if (v.data < data || v.data + v.nbytes > data + size) __builtin_trap();
      // Touch both ends so AddressSanitizer checks the view too.
      volatile uint8_t sink = v.data[0] ^ v.data[v.nbytes - 1];
      (void)sink;
    }
  } catch (const dsv3::Error&) {
  }
  return 0;
}
