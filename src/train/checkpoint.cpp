// Checkpoint writing and reading (see checkpoint.h).
#include "train/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"

namespace dsv3 {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr const char* kPrefix = "checkpoint-";

}  // namespace

void fsync_path(const std::string& path, bool directory) {
  int fd = ::open(path.c_str(), (directory ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) fail(path, ": cannot open for fsync");
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) fail(path, ": fsync failed");
}

// Writes and fsyncs on one descriptor, so a full disk is an error here, not an empty file.
void write_text(const std::string& path, const std::string& text) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail(path, ": cannot create: ", std::strerror(errno));
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const std::string why = std::strerror(errno);
      ::close(fd);
      fail(path, ": write failed: ", why);
    }
    done += size_t(n);
  }
  const bool synced = ::fsync(fd) == 0;
  if (::close(fd) != 0 || !synced) fail(path, ": fsync / close failed: ", std::strerror(errno));
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

namespace {

int64_t step_of(const fs::path& p) {
  const std::string name = p.filename().string();
  if (name.rfind(kPrefix, 0) != 0) return -1;
  try {
    size_t used = 0;
    const int64_t step = std::stoll(name.substr(std::strlen(kPrefix)), &used);
    return used == name.size() - std::strlen(kPrefix) ? step : -1;
  } catch (...) {
    return -1;
  }
}

}  // namespace

std::string save_checkpoint(const std::string& run_dir, const std::string& config_json, const ModelConfig& c,
                            const ModelWeights& params, const AdamW& opt, const TrainerState& state, int keep,
                            const CheckpointExtras& extras) {
  char name[64];
  std::snprintf(name, sizeof(name), "%s%07ld", kPrefix, long(state.step));
  const std::string final_dir = run_dir + "/" + name, tmp_dir = run_dir + "/." + name + ".tmp";
  fs::create_directories(run_dir);
  // Saves that crashed earlier leave .checkpoint-*.tmp folders behind: nothing reads them.
  for (const auto& e : fs::directory_iterator(run_dir)) {
    const std::string n = e.path().filename().string();
    if (e.is_directory() && n.rfind(std::string(".") + kPrefix, 0) == 0 && n.size() > 4 && n.substr(n.size() - 4) == ".tmp")
      fs::remove_all(e.path());
  }
  fs::create_directories(tmp_dir);

  write_text(tmp_dir + "/config.json", config_json);
  for (const std::string& file : extras.files)
    write_text(tmp_dir + "/" + fs::path(file).filename().string(), read_text(file));
  std::vector<TensorToWrite> tensors;
  for (const TensorSlot& s : list_tensors(c, const_cast<ModelWeights&>(params)))
    tensors.push_back({s.name, DType::f32, s.shape, s.mat->data});
  write_safetensors(tmp_dir + "/model.safetensors", tensors);
  const auto moments = opt.state(c);
  std::vector<TensorToWrite> opt_tensors;
  for (const auto& m : moments) opt_tensors.push_back({m.name, DType::f32, m.shape, m.values.data()});
  write_safetensors(tmp_dir + "/optimizer.safetensors", opt_tensors,
                    {{"format", "pt"}, {"bf16_moments", opt.config().bf16_moments ? "true" : "false"}});
  const json st = {{"format", "dsv3-trainer-state-1"}, {"step", state.step},          {"tokens", state.tokens},
                   {"data_epoch", state.data.epoch},    {"data_index", state.data.index}, {"seed", state.seed},
                   {"seq", state.seq},                  {"batch", state.batch},           {"data_windows", state.data_windows}};
  write_text(tmp_dir + "/trainer_state.json", st.dump(2) + "\n");
  fsync_path(tmp_dir, true);

  fs::remove_all(final_dir);  // a checkpoint of the same step from an earlier, interrupted run
  fs::rename(tmp_dir, final_dir);
  fsync_path(run_dir, true);

  // Keep the newest `keep` complete checkpoints, this one included; never touch folders
  // that are not complete checkpoints, nor any newer than this one.
  std::vector<std::pair<int64_t, fs::path>> all;
  for (const auto& e : fs::directory_iterator(run_dir)) {
    const int64_t s = step_of(e.path());
    if (e.is_directory() && s >= 0 && s <= state.step && fs::exists(e.path() / "trainer_state.json"))
      all.push_back({s, e.path()});
  }
  std::sort(all.begin(), all.end());
  for (size_t i = 0; keep > 0 && i + size_t(keep) < all.size(); ++i)
    if (all[i].second != fs::path(final_dir)) fs::remove_all(all[i].second);
  return final_dir;
}

std::optional<std::string> latest_checkpoint(const std::string& run_dir) {
  if (!fs::is_directory(run_dir)) return std::nullopt;
  int64_t best = -1;
  std::string path;
  for (const auto& e : fs::directory_iterator(run_dir)) {
    const int64_t s = step_of(e.path());
    if (e.is_directory() && s > best && fs::exists(e.path() / "trainer_state.json")) best = s, path = e.path().string();
  }
  if (best < 0) return std::nullopt;
  return path;
}

TrainerState load_checkpoint(const std::string& dir, const std::string& config_json, const ModelConfig& c,
                             ModelWeights& params, AdamW& opt) {
  // config.json is written verbatim from the run's config: any field that differs (also one
  // that keeps the shapes, like routed_scaling_factor) means another model.
  json saved_json, run_json;
  try {
    saved_json = json::parse(read_text(dir + "/config.json"));
    run_json = json::parse(config_json);
  } catch (const json::exception& e) {
    fail(dir, "/config.json: not valid JSON: ", e.what());
  }
  for (const auto* a : {&saved_json, &run_json}) {
    const auto* b = a == &saved_json ? &run_json : &saved_json;
    if (!a->is_object()) fail(dir, "/config.json: not a JSON object");
    for (auto it = a->begin(); it != a->end(); ++it)
      if (!b->contains(it.key()) || (*b)[it.key()] != it.value())
        fail(dir, "/config.json: describes a different model than the run's config (field '", it.key(), "' differs)");
  }
  Checkpoint ckpt(dir);
  ModelWeights stored = load_weights(c, ckpt);  // validates names, shapes, dtypes
  convert_weights(c, stored, params);

  SafetensorsFile f(dir + "/optimizer.safetensors");
  const auto bf16 = f.metadata().find("bf16_moments");
  const std::string want = opt.config().bf16_moments ? "true" : "false";
  if (bf16 != f.metadata().end() && bf16->second != want)
    fail(f.path(), ": AdamW moments were ", bf16->second == "true" ? "BF16" : "float32",
         "; resume with the same --fp32-moments setting");
  std::vector<AdamW::NamedTensor> moments;
  for (const auto& m : opt.state(c)) {  // the expected names, in order
    const TensorView* v = f.find(m.name);
    if (!v) fail(f.path(), ": tensor ", m.name, " is missing");
    if (v->dtype != DType::f32 || v->shape != m.shape) fail(f.path(), ": tensor ", m.name, " has the wrong dtype or shape");
    AdamW::NamedTensor t{m.name, m.shape, std::vector<float>(size_t(v->numel()))};
    std::memcpy(t.values.data(), v->data, v->nbytes);
    moments.push_back(std::move(t));
  }
  opt.load_state(c, moments);

  return read_trainer_state(dir);
}

TrainerState read_trainer_state(const std::string& dir) {
  json st;
  try {
    st = json::parse(read_text(dir + "/trainer_state.json"));
  } catch (const json::exception& e) {
    fail(dir, "/trainer_state.json: not valid JSON: ", e.what());
  }
  if (!st.is_object() || st.value("format", "") != "dsv3-trainer-state-1")
    fail(dir, "/trainer_state.json: not a dsv3 trainer state");
  TrainerState s;
  try {
    s.step = st.at("step").get<int64_t>();
    s.tokens = st.at("tokens").get<int64_t>();
    s.data.epoch = st.at("data_epoch").get<int64_t>();
    s.data.index = st.at("data_index").get<int64_t>();
    s.seed = st.at("seed").get<uint64_t>();
    s.seq = st.value("seq", int64_t(0));
    s.batch = st.value("batch", int64_t(0));
    s.data_windows = st.value("data_windows", int64_t(0));
  } catch (const json::exception& e) {
    fail(dir, "/trainer_state.json: ", e.what());
  }
  return s;
}

}  // namespace dsv3
