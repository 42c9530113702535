// safetensors reading and writing (see safetensors.h).
#include "io/safetensors.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.h"

namespace dsv3 {

namespace {

constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // the reference library's limit

using json = nlohmann::json;

int64_t checked_dim(const json& d, const std::string& what, const std::string& name) {
  if (!d.is_number_unsigned() && !(d.is_number_integer() && d.get<int64_t>() >= 0))
    fail(what, ": tensor ", name, ": shape entries must be non-negative integers");
  uint64_t v = d.get<uint64_t>();
  if (v > (1ull << 40)) fail(what, ": tensor ", name, ": shape entry ", v, " is too large");
  return int64_t(v);
}

}  // namespace

SafetensorsHeader parse_safetensors(const uint8_t* data, size_t size, const std::string& what) {
  if (size < 8) fail(what, ": file is ", size, " bytes, too short for the 8-byte header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];
  if (n > kMaxHeaderBytes) fail(what, ": header length ", n, " exceeds the 100 MiB limit");
  if (n > size - 8)
    fail(what, ": header length ", n, " runs past the end of the file (", size, " bytes)");
  // The JSON library keeps the last of repeated keys; the format allows one entry per name,
  // so the keys of every object are tracked while parsing and a repeat is an error.
  std::vector<std::set<std::string>> keys;  // one set per open object
  std::string repeated;
  auto track = [&](int /*depth*/, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) keys.emplace_back();
    else if (event == json::parse_event_t::object_end && !keys.empty()) keys.pop_back();
    else if (event == json::parse_event_t::key && !keys.empty() && !keys.back().insert(parsed.get<std::string>()).second &&
             repeated.empty())
      repeated = parsed.get<std::string>();
    return true;
  };
  json h;
  try {
    h = json::parse(data + 8, data + 8 + n, track);
  } catch (const json::exception& e) {
    fail(what, ": header is not valid JSON: ", e.what());
  }
  if (!repeated.empty()) fail(what, ": header has the key '", repeated, "' twice");
  if (!h.is_object()) fail(what, ": header is not a JSON object");

  SafetensorsHeader out;
  const uint8_t* base = data + 8 + n;
  const uint64_t data_size = size - 8 - n;
  struct Span {
    uint64_t begin, end;
    const std::string* name;
  };
  std::vector<Span> spans;
  for (auto it = h.begin(); it != h.end(); ++it) {
    const std::string& name = it.key();
    const json& t = it.value();
    if (name == "__metadata__") {
      if (!t.is_object()) fail(what, ": __metadata__ is not an object");
      for (auto m = t.begin(); m != t.end(); ++m) {
        if (!m.value().is_string()) fail(what, ": __metadata__ value '", m.key(), "' is not a string");
        out.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (!t.is_object()) fail(what, ": tensor ", name, ": entry is not an object");
    auto dt = t.find("dtype");
    auto sh = t.find("shape");
    auto off = t.find("data_offsets");
    if (dt == t.end() || !dt->is_string()) fail(what, ": tensor ", name, ": missing or non-string dtype");
    if (sh == t.end() || !sh->is_array()) fail(what, ": tensor ", name, ": missing or non-array shape");
    if (off == t.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
        !(*off)[1].is_number_unsigned())
      fail(what, ": tensor ", name, ": data_offsets must be two non-negative integers");
    TensorView v;
    if (!parse_dtype(dt->get<std::string>(), &v.dtype))
      fail(what, ": tensor ", name, ": unknown dtype '", dt->get<std::string>(), "'");
    uint64_t numel = 1;
    for (const json& d : *sh) {
      v.shape.push_back(checked_dim(d, what, name));
      const uint64_t dim = uint64_t(v.shape.back());
      // Checked before multiplying: numel * dim could wrap around 2^64 (to 0, say).
      if (dim != 0 && numel > (1ull << 50) / dim)
        fail(what, ": tensor ", name, ": shape ", shape_str(v.shape), " is too large");
      numel *= dim;
    }
    const uint64_t begin = (*off)[0].get<uint64_t>(), end = (*off)[1].get<uint64_t>();
    if (begin > end) fail(what, ": tensor ", name, ": data_offsets [", begin, ", ", end, "] are reversed");
    if (end > data_size)
      fail(what, ": tensor ", name, ": data_offsets [", begin, ", ", end, "] run past the data section (",
           data_size, " bytes)");
    const uint64_t expect = numel * dtype_size(v.dtype);
    if (end - begin != expect)
      fail(what, ": tensor ", name, ": ", dtype_name(v.dtype), " ", shape_str(v.shape), " needs ", expect,
           " bytes but data_offsets span ", end - begin);
    v.data = base + begin;
    v.nbytes = size_t(expect);
    auto [pos, inserted] = out.tensors.emplace(name, std::move(v));
    if (begin != end) spans.push_back({begin, end, &pos->first});  // empty tensors overlap nothing
  }
  // The tensors tile the data section exactly, as the reference library requires: no
  // overlaps, no gaps, nothing after the last one. (Empty tensors may sit at any offset
  // within the section; the reference library is stricter there.)
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  uint64_t pos = 0;
  for (size_t i = 0; i < spans.size(); ++i) {
    if (spans[i].begin < pos)
      fail(what, ": tensors ", *spans[i - 1].name, " and ", *spans[i].name, " overlap in the data section");
    if (spans[i].begin > pos)
      fail(what, ": ", spans[i].begin - pos, " unused bytes before tensor ", *spans[i].name, " in the data section (at ",
           pos, ")");
    pos = spans[i].end;
  }
  if (pos != data_size)
    fail(what, ": ", data_size - pos, " bytes after the last tensor's data (the data section is ", data_size,
         " bytes, the tensors cover ", pos, ")");
  return out;
}

SafetensorsFile::SafetensorsFile(const std::string& path)
    : file_(path), header_(parse_safetensors(file_.data(), file_.size(), path)) {
  // A tensor whose bytes do not start at a multiple of its element size (a header length
  // that is not a multiple of 8 does that; some published checkpoints have one) cannot be
  // read in place as a typed array: such a tensor is copied once into aligned memory. FP8
  // and other 1-byte tensors are always read in place.
  for (auto& [name, v] : header_.tensors) {
    if (v.nbytes == 0 || reinterpret_cast<uintptr_t>(v.data) % dtype_size(v.dtype) == 0) continue;
    aligned_copies_.emplace_back((v.nbytes + 7) / 8);
    std::memcpy(aligned_copies_.back().data(), v.data, v.nbytes);
    v.data = reinterpret_cast<const uint8_t*>(aligned_copies_.back().data());
  }
}

const TensorView* SafetensorsFile::find(const std::string& name) const {
  auto it = header_.tensors.find(name);
  return it == header_.tensors.end() ? nullptr : &it->second;
}

namespace {

void write_all(int fd, const void* p, size_t n, const std::string& path) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    ssize_t w = ::write(fd, c, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      fail(path, ": write failed: ", std::strerror(errno));
    }
    c += w;
    n -= size_t(w);
  }
}

}  // namespace

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  json h = json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  // The data in order of decreasing element size, as the reference library writes it: with
  // the 8-byte aligned data section, every tensor then starts aligned to its element size.
  std::vector<const TensorToWrite*> order;
  for (const auto& t : tensors) order.push_back(&t);
  std::stable_sort(order.begin(), order.end(), [](const TensorToWrite* a, const TensorToWrite* b) {
    return dtype_size(a->dtype) > dtype_size(b->dtype);
  });
  uint64_t offset = 0;
  for (const TensorToWrite* tp : order) {
    const TensorToWrite& t = *tp;
    uint64_t numel = 1;
    for (int64_t d : t.shape) numel *= uint64_t(d);
    const uint64_t bytes = numel * dtype_size(t.dtype);
    h[t.name] = {{"dtype", std::string(dtype_name(t.dtype))}, {"shape", t.shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string header = h.dump();
  header.append((8 - header.size() % 8) % 8, ' ');  // data section 8-byte aligned
  const std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail(tmp, ": cannot create: ", std::strerror(errno));
  try {
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = uint8_t(uint64_t(header.size()) >> (8 * i));
    write_all(fd, len, 8, tmp);
    write_all(fd, header.data(), header.size(), tmp);
    for (const TensorToWrite* t : order) {
      uint64_t numel = 1;
      for (int64_t d : t->shape) numel *= uint64_t(d);
      write_all(fd, t->data, numel * dtype_size(t->dtype), tmp);
    }
    if (::fsync(fd) != 0) fail(tmp, ": fsync failed: ", std::strerror(errno));
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    ::unlink(tmp.c_str());
    fail(path, ": rename failed: ", std::strerror(errno));
  }
}

}  // namespace dsv3
