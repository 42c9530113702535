// dsv3 export: a checkpoint written as a shareable Hugging Face folder in BF16, or in FP8
// with 128x128 block scales exactly as DeepSeek-V3 is released (train/export.h).
#include <CLI/CLI.hpp>
#include <cctype>
#include <cstdio>
#include <memory>

#include "cli/args.h"
#include "cli/commands.h"
#include "core/error.h"
#include "train/export.h"

namespace dsv3::cli {

namespace {

struct ExportFlags {
  std::string model, dtype, out, max_shard_size = "5GB";
  int threads = 0;
};

// "5GB", "500MB", "2GiB", "1.5gb", "1048576": bytes (decimal units as Hugging Face's
// max_shard_size; the unit's case does not matter).
int64_t parse_size(const std::string& text) {
  size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) ++i;
  double value = -1;
  try {
    size_t used = 0;
    if (i) value = std::stod(text.substr(0, i), &used);
    if (used != i) value = -1;  // "1.2.3MB"
  } catch (...) {
    value = -1;
  }
  std::string unit = text.substr(i);
  for (char& ch : unit) ch = char(std::tolower(static_cast<unsigned char>(ch)));
  double scale = 0;
  if (unit.empty() || unit == "b") scale = 1;
  else if (unit == "kb") scale = 1e3;
  else if (unit == "mb") scale = 1e6;
  else if (unit == "gb") scale = 1e9;
  else if (unit == "kib") scale = 1024.0;
  else if (unit == "mib") scale = 1024.0 * 1024;
  else if (unit == "gib") scale = 1024.0 * 1024 * 1024;
  if (value <= 0 || scale == 0 || value * scale < 1 || value * scale > 9e18)
    fail("--max-shard-size '", text, "': expected a positive size such as 5GB, 500MB or 2GiB");
  return int64_t(value * scale);
}

void run(const ExportFlags& f) {
  set_threads(f.threads);
  ExportOptions opt;
  opt.dtype = parse_export_dtype(f.dtype);
  opt.max_shard_bytes = parse_size(f.max_shard_size);
  const ExportSummary s = export_checkpoint(f.model, f.out, opt);
  const std::string fp8 =
      s.fp8_tensors ? cat(" (", s.fp8_tensors, " weights in FP8 E4M3 with 128x128 scales)") : std::string(" in BF16");
  std::printf("wrote %s: %ld tensors%s, %.1f MB in %d shard%s\n", f.out.c_str(), long(s.tensors), fp8.c_str(),
              double(s.bytes) / 1e6, s.shards, s.shards == 1 ? "" : "s");
}

}  // namespace

void add_export(CLI::App& app) {
  auto f = std::make_shared<ExportFlags>();
  CLI::App* cmd = app.add_subcommand(
      "export", "Write a checkpoint as a shareable Hugging Face folder in BF16, or in FP8 as DeepSeek-V3 is released");
  cmd->add_option("--model,-m", f->model, "checkpoint folder (a training checkpoint, or a BF16 / FP8 release)")
      ->required()
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--dtype", f->dtype, "bf16, or fp8 (E4M3 projections with 128x128 weight_scale_inv, the rest BF16)")
      ->required();
  cmd->add_option("--out,-o", f->out, "output folder (new, or empty)")->required();
  cmd->add_option("--max-shard-size", f->max_shard_size, "largest shard, as Hugging Face writes them (e.g. 5GB, 500MB)")
      ->capture_default_str();
  cmd->add_option("--threads,-t", f->threads, "CPU threads (default: all)");
  cmd->callback([f] { run(*f); });
}

}  // namespace dsv3::cli
