// Checkpoint export (see export.h). Two passes over the tensor list: the first assigns each
// tensor (with its FP8 scales) to a shard from the sizes alone, the second converts and
// writes one shard at a time, so memory holds one shard, not the model.
#include "train/export.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <vector>

#include "backend/fp8.h"
#include "backend/ops.h"
#include "core/error.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "model/weights.h"
#include "train/checkpoint.h"

namespace dsv3 {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// How one tensor is stored in the export: DeepSeek-V3's release keeps the router's
// correction bias in float32, quantizes the projection weights to E4M3 in FP8 exports, and
// stores everything else (embeddings, head, norms, router gate, MTP's eh_proj) in BF16.
DType stored_dtype(const TensorSlot& s, DType target) {
  if (s.name.ends_with("e_score_correction_bias")) return DType::f32;
  if (target == DType::f8_e4m3 && s.fp8_quantizable) return DType::f8_e4m3;
  return DType::bf16;
}

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::vector<int64_t> scale_shape(const std::vector<int64_t>& shape) {
  return {(shape[0] + kFp8Block - 1) / kFp8Block, (shape[1] + kFp8Block - 1) / kFp8Block};
}

// Bytes a tensor takes in the export, its FP8 scales included.
int64_t stored_bytes(const TensorSlot& s, DType dtype) {
  const int64_t n = numel_of(s.shape);
  if (dtype == DType::f8_e4m3) return n + numel_of(scale_shape(s.shape)) * 4;
  return n * int64_t(dtype_size(dtype));
}

// One tensor converted: its bytes, and for FP8 its scale_inv tensor beside it.
struct Converted {
  std::vector<TensorToWrite> entries;
  std::vector<uint8_t> data, scales;
};

void convert(const TensorSlot& s, DType dtype, Converted& out) {
  const Mat& m = *s.mat;
  std::vector<float> values(size_t(m.rows * m.cols));
  dequantize_rows(m, 0, m.rows, values.data());
  if (dtype == DType::f8_e4m3) {
    Fp8Tensor q;
    try {
      quantize_into(q, values.data(), m.rows, m.cols, Fp8Tiling::blocks_128x128, Fp8Format::e4m3);
    } catch (const Error& e) {
      fail("tensor ", s.name, ": ", e.what());
    }
    out.data = std::move(q.codes);
    out.scales.resize(q.scales.size() * 4);
    std::memcpy(out.scales.data(), q.scales.data(), out.scales.size());
    out.entries.push_back({s.name, DType::f8_e4m3, s.shape, out.data.data()});
    out.entries.push_back({s.name + "_scale_inv", DType::f32, scale_shape(s.shape), out.scales.data()});
    return;
  }
  for (size_t i = 0; i < values.size(); ++i)
    if (!std::isfinite(values[i]))
      fail("tensor ", s.name, ": non-finite value ", values[i], " at index ", i, "; not exported");
  if (dtype == DType::f32) {
    out.data.resize(values.size() * 4);
    std::memcpy(out.data.data(), values.data(), out.data.size());
  } else {
    out.data.resize(values.size() * 2);
    uint16_t* b = reinterpret_cast<uint16_t*>(out.data.data());
    for (size_t i = 0; i < values.size(); ++i) b[i] = f32_to_bf16(values[i]);
  }
  out.entries.push_back({s.name, dtype, s.shape, out.data.data()});
}

// The files of a checkpoint folder other than its weights and config (tokenizer, chat
// template, the release's modeling code and README), copied as they are. A training
// checkpoint's optimizer state and trainer state are not part of a shared model.
bool copied(const fs::path& p) {
  const std::string n = p.filename().string();
  return !n.ends_with(".safetensors") && n != "model.safetensors.index.json" && n != "config.json" &&
         n != "trainer_state.json" && n[0] != '.';
}

}  // namespace

DType parse_export_dtype(const std::string& name) {
  if (name == "bf16") return DType::bf16;
  if (name == "fp8") return DType::f8_e4m3;
  fail("--dtype '", name, "': expected bf16 or fp8");
}

namespace {

ExportSummary export_folder(const std::string& src, const std::string& out, const ExportOptions& opt) {
  if (opt.dtype != DType::bf16 && opt.dtype != DType::f8_e4m3)
    fail("export: dtype ", dtype_name(opt.dtype), " is not an export format (BF16 or F8_E4M3)");
  if (opt.max_shard_bytes <= 0) fail("export: the shard size must be positive, not ", opt.max_shard_bytes);
  if (fs::exists(out) && !(fs::is_directory(out) && fs::is_empty(out)))
    fail(out, ": exists and is not an empty folder; export into a new folder");

  const ModelConfig c = ModelConfig::load(src + "/config.json");
  json cfg = json::parse(read_text(src + "/config.json"));
  const Checkpoint ckpt(src);
  ModelWeights w = load_weights(c, ckpt);
  const std::vector<TensorSlot> slots = list_tensors(c, w);

  // Pass 1: shards from the sizes (a weight and its scales stay together).
  std::vector<int> shard_of(slots.size());
  int shards = 1;
  int64_t in_shard = 0, total = 0;
  for (size_t i = 0; i < slots.size(); ++i) {
    const int64_t b = stored_bytes(slots[i], stored_dtype(slots[i], opt.dtype));
    if (in_shard > 0 && in_shard + b > opt.max_shard_bytes) ++shards, in_shard = 0;
    shard_of[i] = shards - 1;
    in_shard += b, total += b;
  }
  auto file_name = [&](int k) {
    if (shards == 1) return std::string("model.safetensors");
    char name[64];
    std::snprintf(name, sizeof(name), "model-%05d-of-%05d.safetensors", k + 1, shards);
    return std::string(name);
  };

  // Pass 2, into a temporary folder beside the destination, renamed when complete.
  fs::path out_path = fs::absolute(fs::path(out)).lexically_normal();
  if (!out_path.has_filename()) out_path = out_path.parent_path();  // "DIR/" names DIR
  if (out_path == out_path.root_path()) fail(out, ": not a folder to export into");
  const std::string tmp = (out_path.parent_path() / ("." + out_path.filename().string() + ".export-tmp")).string();
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  // Anything that fails from here on removes the temporary folder: nothing half-written stays.
  try {
    ExportSummary sum;
    json weight_map = json::object();
    size_t next = 0;
    for (int k = 0; k < shards; ++k) {
      std::vector<std::unique_ptr<Converted>> held;
      std::vector<TensorToWrite> tensors;
      for (; next < slots.size() && shard_of[next] == k; ++next) {
        const DType dtype = stored_dtype(slots[next], opt.dtype);
        held.push_back(std::make_unique<Converted>());
        convert(slots[next], dtype, *held.back());
        for (const TensorToWrite& t : held.back()->entries) {
          tensors.push_back(t);
          weight_map[t.name] = file_name(k);
          sum.tensors += 1;
        }
        sum.fp8_tensors += dtype == DType::f8_e4m3;
      }
      write_safetensors(tmp + "/" + file_name(k), tensors);
      std::fprintf(stderr, "export: wrote %s (%d of %d)\n", file_name(k).c_str(), k + 1, shards);
    }
    sum.shards = shards;
    sum.bytes = total;
    if (shards > 1)
      write_text(tmp + "/model.safetensors.index.json",
                 json{{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}}.dump(2) + "\n");

    if (opt.dtype == DType::f8_e4m3)
      cfg["quantization_config"] = {{"activation_scheme", "dynamic"},
                                    {"fmt", "e4m3"},
                                    {"quant_method", "fp8"},
                                    {"weight_block_size", {kFp8Block, kFp8Block}}};
    else cfg.erase("quantization_config");
    cfg["torch_dtype"] = "bfloat16";
    write_text(tmp + "/config.json", cfg.dump(2) + "\n");
    for (const auto& e : fs::directory_iterator(src))
      if (e.is_regular_file() && copied(e.path())) {
        const std::string dst = tmp + "/" + e.path().filename().string();
        fs::copy_file(e.path(), dst);
        fsync_path(dst, false);
      }
    fsync_path(tmp, true);
    if (fs::exists(out_path)) fs::remove(out_path);  // an empty folder (checked above)
    fs::rename(tmp, out_path);
    fsync_path(out_path.parent_path().string(), true);
    return sum;
  } catch (...) {
    std::error_code ignored;
    fs::remove_all(tmp, ignored);
    throw;
  }
}

}  // namespace

ExportSummary export_checkpoint(const std::string& src, const std::string& out, const ExportOptions& opt) {
  try {
    return export_folder(src, out, opt);
  } catch (const fs::filesystem_error& e) {  // a full disk, a read-only folder: say which step
    fail("export to ", out, ": ", e.what());
  }
}

}  // namespace dsv3
