// Checkpoint folder resolution (see checkpoint.h).
#include "io/checkpoint.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"

namespace dsv3 {

namespace fs = std::filesystem;
using json = nlohmann::json;

Checkpoint::Checkpoint(const std::string& dir) : dir_(dir) {
  if (!fs::is_directory(dir)) fail(dir, ": not a directory");
  const std::string index_path = dir + "/model.safetensors.index.json";
  std::map<std::string, std::string> weight_map;  // tensor -> file
  if (fs::exists(index_path)) {
    if (fs::is_directory(index_path)) fail(index_path, ": is a directory, not an index file");
    std::ifstream in(index_path);
    if (!in) fail(index_path, ": cannot open (check its permissions)");
    std::stringstream ss;
    ss << in.rdbuf();
    json idx;
    try {
      idx = json::parse(ss.str());
    } catch (const json::exception& e) {
      fail(index_path, ": not valid JSON: ", e.what());
    }
    if (!idx.is_object() || !idx.contains("weight_map") || !idx["weight_map"].is_object())
      fail(index_path, ": missing \"weight_map\" object");
    for (auto it = idx["weight_map"].begin(); it != idx["weight_map"].end(); ++it) {
      if (!it.value().is_string()) fail(index_path, ": weight_map entry ", it.key(), " is not a file name");
      const std::string file = it.value().get<std::string>();
      if (file.empty() || file.find('/') != std::string::npos || file == "." || file == "..")
        fail(index_path, ": weight_map entry ", it.key(), " names an invalid file '", file, "'");
      weight_map[it.key()] = file;
    }
    if (weight_map.empty()) fail(index_path, ": weight_map is empty");
  } else if (fs::exists(dir + "/model.safetensors")) {
    files_.push_back(std::make_unique<SafetensorsFile>(dir + "/model.safetensors"));
    for (const auto& [name, view] : files_.back()->tensors()) tensors_[name] = {&view, files_.back().get()};
    return;
  } else {
    fail(dir, ": no model.safetensors or model.safetensors.index.json");
  }

  std::map<std::string, const SafetensorsFile*> by_file;
  for (const auto& [name, file] : weight_map) {
    if (!by_file.count(file)) {
      const std::string path = dir + "/" + file;
      if (!fs::exists(path)) fail(index_path, ": tensor ", name, " is mapped to ", file, ", which does not exist");
      files_.push_back(std::make_unique<SafetensorsFile>(path));
      by_file[file] = files_.back().get();
    }
    const SafetensorsFile* f = by_file[file];
    const TensorView* v = f->find(name);
    if (!v) fail(f->path(), ": has no tensor ", name, ", though the index maps it there");
    tensors_[name] = {v, f};
  }
  for (const auto& f : files_)
    for (const auto& [name, view] : f->tensors())
      if (!weight_map.count(name) || weight_map[name] != fs::path(f->path()).filename().string())
        fail(f->path(), ": tensor ", name, " is not listed for this file in model.safetensors.index.json");
}

const TensorView* Checkpoint::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : it->second.view;
}

std::string Checkpoint::file_of(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? dir_ : it->second.file->path();
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  for (const auto& kv : tensors_) out.push_back(kv.first);
  return out;
}

}  // namespace dsv3
