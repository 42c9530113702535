// Training checkpoints in the Hugging Face DeepSeek-V3 layout, so that dsv3 generate and
// transformers load them: RUN/checkpoint-NNNNNNN/{config.json, model.safetensors (every
// tensor under its HF name, float32; the MTP module as layer num_hidden_layers with its
// copies of the embedding and head), optimizer.safetensors (AdamW moments),
// trainer_state.json (step, tokens, data position)}. A checkpoint is written into a
// temporary folder, each file fsynced, then renamed into place: a crash, even kill -9 in
// the middle, leaves the previous checkpoints intact. Uses model, io and train/adamw.
#pragma once
#include <cstdint>
#include <optional>
#include <string>

#include "train/adamw.h"
#include "train/training_data.h"

namespace dsv3 {

struct TrainerState {
  int64_t step = 0;    // optimizer steps done
  int64_t tokens = 0;  // tokens trained on
  DataPosition data;
  uint64_t seed = 0;
  int64_t seq = 0, batch = 0;  // the run's settings a resume must share (0: unknown)
  int64_t data_windows = 0;    // windows of the training data: a fingerprint of the data
};

// Files copied verbatim into every checkpoint (the tokenizer, so a checkpoint is a complete
// Hugging Face model folder).
struct CheckpointExtras {
  std::vector<std::string> files;
};

// Writes checkpoint `state.step` into run_dir and deletes all but the newest `keep`.
// config_json is written as config.json verbatim. Returns the checkpoint's folder.
std::string save_checkpoint(const std::string& run_dir, const std::string& config_json, const ModelConfig& c,
                            const ModelWeights& params, const AdamW& opt, const TrainerState& state, int keep,
                            const CheckpointExtras& extras = {});

// The newest complete checkpoint folder of run_dir, if any (unfinished ones are ignored).
std::optional<std::string> latest_checkpoint(const std::string& run_dir);

// Restores params, optimizer moments and state from a checkpoint folder; the checkpoint's
// config.json must equal config_json field by field (c is its parse). Throws Error naming
// what is wrong.
TrainerState load_checkpoint(const std::string& dir, const std::string& config_json, const ModelConfig& c,
                             ModelWeights& params, AdamW& opt);

// Files of a checkpoint folder: text written and fsynced on one descriptor (a full disk is
// an error, not an empty file), a file or folder fsynced, a whole file read.
void write_text(const std::string& path, const std::string& text);
void fsync_path(const std::string& path, bool directory);
std::string read_text(const std::string& path);

// The trainer_state.json of a checkpoint folder alone (step, tokens, data position, seed).
TrainerState read_trainer_state(const std::string& dir);

}  // namespace dsv3
