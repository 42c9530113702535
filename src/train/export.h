// Checkpoint export: any checkpoint dsv3 loads (a training checkpoint in float32, a
// released BF16 or FP8 folder) written as a shareable Hugging Face folder in BF16, or in
// FP8 exactly as DeepSeek-V3 is released: the projection weights in E4M3 with float32
// `weight_scale_inv` per 128x128 block (scale = max|w| / 448 of the block, code = w /
// scale rounded to nearest even), everything else BF16, e_score_correction_bias float32;
// config.json with (FP8) or without (BF16) the release's quantization_config; sharded with
// model.safetensors.index.json above a shard size; tokenizer files copied. The folder is
// written beside the destination and renamed into place, so a crash leaves nothing
// half-written. Uses model, backend (dequantisation, FP8 quantisation) and io.
#pragma once
#include <cstdint>
#include <string>

#include "core/dtype.h"

namespace dsv3 {

struct ExportOptions {
  DType dtype = DType::bf16;                  // bf16 or f8_e4m3
  int64_t max_shard_bytes = 5'000'000'000;  // a shard's tensor bytes, at most (one tensor may exceed it); HF's "5GB"
};

struct ExportSummary {
  int64_t tensors = 0;      // tensors written, FP8 scales included
  int64_t bytes = 0;        // their bytes (the index's metadata.total_size)
  int shards = 0;
  int64_t fp8_tensors = 0;  // weights stored in E4M3
};

// Writes the checkpoint folder src as out (which must not exist, or be an empty folder).
// Throws dsv3::Error naming the file, tensor or value at fault (a non-finite weight, for
// one), leaving out untouched.
ExportSummary export_checkpoint(const std::string& src, const std::string& out, const ExportOptions& opt);

// "bf16" -> DType::bf16, "fp8" -> DType::f8_e4m3; anything else is an error naming it.
DType parse_export_dtype(const std::string& name);

}  // namespace dsv3
