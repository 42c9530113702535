// A Hugging Face checkpoint folder: config.json plus model.safetensors, or shards listed
// in model.safetensors.index.json. Tensors are resolved by name through the weight map
// (a weight and its scale may live in different shards). Uses core and io only.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "io/safetensors.h"

namespace dsv3 {

class Checkpoint {
 public:
  explicit Checkpoint(const std::string& dir);  // throws Error naming the file at fault

  const std::string& dir() const { return dir_; }
  std::string config_path() const { return dir_ + "/config.json"; }
  const TensorView* find(const std::string& name) const;
  std::string file_of(const std::string& name) const;  // the shard holding name, for messages
  std::vector<std::string> names() const;              // every tensor, sorted

 private:
  struct Entry {
    const TensorView* view;
    const SafetensorsFile* file;
  };
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, Entry> tensors_;
};

}  // namespace dsv3
