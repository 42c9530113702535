// The training loop: exact resume (also after kill -9 through the CLI), unfinished and
// corrupt checkpoints, checkpoints that inference loads, auxiliary-loss-free balancing, and
// dsv3 perplexity on a run's checkpoint.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>

#include "core/error.h"
#include "golden_util.h"
#include "infer/perplexity.h"
#include "io/safetensors.h"
#include "model/transformer.h"
#include "train/batch_sampler.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;

const char* kConfig = R"({"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
  "num_hidden_layers": 2, "num_attention_heads": 2, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
  "kv_lora_rank": 16, "q_lora_rank": 16, "max_position_embeddings": 128, "rope_theta": 10000,
  "first_k_dense_replace": 1, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1,
  "n_group": 2, "topk_group": 1, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": true,
  "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 1, "rms_norm_eps": 1e-6, "bos_token_id": 0,
  "eos_token_id": 1})";

// A learnable stream: short repeated phrases separated by EOS.
std::vector<uint32_t> corpus(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint32_t> out;
  while (out.size() < n) {
    const uint32_t start = 2 + rng() % 50;
    for (uint32_t k = 0; k < 3 + rng() % 6; ++k) out.push_back(2 + (start + 3 * k) % 62);
    out.push_back(1);
  }
  out.resize(n);
  return out;
}

// A token shard (data/shard.h) of a 64-token vocabulary, written by hand.
void write_shard(const std::string& path, const std::vector<uint32_t>& tokens) {
  std::ofstream out(path, std::ios::binary);
  const char magic[8] = {'D', 'S', 'V', '3', 'T', 'O', 'K', 'S'};
  const uint32_t words[4] = {1, 32, 64, 0};
  const uint64_t n = tokens.size();
  out.write(magic, 8);
  out.write(reinterpret_cast<const char*>(words), 16);
  out.write(reinterpret_cast<const char*>(&n), 8);
  out.write(reinterpret_cast<const char*>(tokens.data()), std::streamsize(n * 4));
}

// Runs the dsv3 binary; returns its exit status, and its stdout (and stderr) in *out.
int run_dsv3(const std::string& args, std::string* out) {
  FILE* p = popen((std::string(DSV3_BINARY) + " " + args + " 2>&1").c_str(), "r");
  std::string text;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof(buf), p)) text.append(buf, n);
  const int status = pclose(p);
  if (out) *out = text;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// The number after "key": in a JSON line.
double json_number(const std::string& text, const std::string& key) {
  const size_t at = text.find("\"" + key + "\":");
  if (at == std::string::npos) return NAN;
  return std::atof(text.c_str() + at + key.size() + 3);
}

class TrainerTest : public testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::TempDir() + "/trainer_" + testing::UnitTest::GetInstance()->current_test_info()->name();
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    train_ = corpus(20000, 1);
    val_ = corpus(2000, 2);
    opt_.steps = 8, opt_.batch = 4, opt_.seq = 16, opt_.eval_every = 0, opt_.save_every = 0;
    opt_.schedule.lr = 3e-3, opt_.schedule.min_lr = 3e-4, opt_.schedule.warmup_steps = 2;
    opt_.schedule.decay_start = 4, opt_.schedule.decay_end = 8;
  }
  void TearDown() override { fs::remove_all(dir_); }
  // DIR/config.json and the shards DIR/shards that dsv3 train reads through the CLI; returns
  // the shards folder.
  std::string write_cli_inputs() {
    const std::string data = dir_ + "/shards";
    fs::create_directories(data);
    write_shard(data + "/train-00000.bin", train_);
    write_shard(data + "/val-00000.bin", val_);
    std::ofstream(dir_ + "/config.json") << kConfig;
    return data;
  }
  std::unique_ptr<Trainer> make(const std::string& run) {
    return std::make_unique<Trainer>(kConfig, opt_, std::vector<std::span<const uint32_t>>{train_},
                                     std::vector<std::span<const uint32_t>>{val_}, run);
  }
  std::string dir_;
  std::vector<uint32_t> train_, val_;
  TrainOptions opt_;
};

TEST_F(TrainerTest, ResumeIsBitExact) {
  std::vector<double> straight;
  auto a = make(dir_ + "/a");
  for (int i = 0; i < 8; ++i) straight.push_back(a->step().loss);
  EXPECT_LT(straight.back(), straight.front());

  auto b = make(dir_ + "/b");
  for (int i = 0; i < 4; ++i) EXPECT_EQ(b->step().loss, straight[size_t(i)]);
  b->save();
  b.reset();
  auto c = make(dir_ + "/b");
  ASSERT_TRUE(c->resume());
  EXPECT_EQ(c->state().step, 4);
  for (int i = 4; i < 8; ++i) EXPECT_EQ(c->step().loss, straight[size_t(i)]) << "step " << i + 1;
  // The weights end identical too.
  const auto pa = list_tensors(c->config(), const_cast<ModelWeights&>(a->params()));
  const auto pc = list_tensors(c->config(), const_cast<ModelWeights&>(c->params()));
  for (size_t t = 0; t < pa.size(); ++t)
    ASSERT_EQ(0, std::memcmp(pa[t].mat->data, pc[t].mat->data, size_t(pa[t].mat->numel()) * 4)) << pa[t].name;
}

// A resumed run must read the same batches: another seed, seq or batch is refused.
TEST_F(TrainerTest, ResumeRefusesOtherSettings) {
  auto t = make(dir_);
  t->step();
  t->save();
  opt_.seed = 99;
  try {
    make(dir_)->resume();
    FAIL();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), testing::HasSubstr("the run used --seed 1234, this one 99"));
  }
  opt_.seed = 1234, opt_.batch = 5;
  EXPECT_THROW(make(dir_)->resume(), Error);
}

// Stray folders named like checkpoints (no trainer_state.json) are never counted or pruned
// in place of real ones, and the checkpoint just written survives keep = 1.
TEST_F(TrainerTest, PruningKeepsTheNewCheckpoint) {
  opt_.keep = 1;
  auto t = make(dir_);
  t->step();
  t->save();
  fs::create_directories(dir_ + "/checkpoint-0000099");  // stray, newer-looking
  fs::create_directories(dir_ + "/.checkpoint-0000007.tmp");  // left by a crashed save
  t->step();
  const std::string ck = t->save();
  EXPECT_TRUE(fs::exists(ck + "/trainer_state.json"));
  EXPECT_FALSE(fs::exists(dir_ + "/checkpoint-0000001"));
  EXPECT_TRUE(fs::exists(dir_ + "/checkpoint-0000099"));  // not ours to delete
  EXPECT_FALSE(fs::exists(dir_ + "/.checkpoint-0000007.tmp"));
  EXPECT_EQ(latest_checkpoint(dir_).value(), ck);
}

TEST_F(TrainerTest, TooShortValidationDataIsRefusedAtTheStart) {
  opt_.eval_every = 2;
  val_.resize(10);
  try {
    make(dir_);
    FAIL();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), testing::HasSubstr("the validation data has 10 tokens"));
  }
}

TEST_F(TrainerTest, UnfinishedCheckpointsAreIgnoredAndOldOnesPruned) {
  opt_.keep = 2;
  auto t = make(dir_);
  for (int s = 1; s <= 3; ++s) {
    t->step();
    t->save();
  }
  EXPECT_FALSE(fs::exists(dir_ + "/checkpoint-0000001"));  // keep = 2
  // A save killed half way leaves a temporary folder; a folder without trainer_state.json
  // is not a checkpoint either.
  fs::create_directories(dir_ + "/.checkpoint-0000004.tmp");
  std::ofstream(dir_ + "/.checkpoint-0000004.tmp/model.safetensors") << "partial";
  fs::create_directories(dir_ + "/checkpoint-0000005");
  EXPECT_EQ(latest_checkpoint(dir_).value(), dir_ + "/checkpoint-0000003");
  auto r = make(dir_);
  ASSERT_TRUE(r->resume());
  EXPECT_EQ(r->state().step, 3);
}

TEST_F(TrainerTest, BadCheckpointsAreRefused) {
  auto t = make(dir_);
  t->step();
  const std::string ck = t->save();
  {  // truncated weights
    fs::copy(ck, dir_ + "/bad1", fs::copy_options::recursive);
    fs::resize_file(dir_ + "/bad1/model.safetensors", 100);
    ModelWeights p = allocate_weights(t->config(), DType::f32);
    AdamW opt(t->config(), {});
    EXPECT_THROW(load_checkpoint(dir_ + "/bad1", kConfig, t->config(), p, opt), Error);
  }
  {  // another model's config
    fs::copy(ck, dir_ + "/bad2", fs::copy_options::recursive);
    std::string cfg = kConfig;
    cfg.replace(cfg.find("\"hidden_size\": 32"), 17, "\"hidden_size\": 48");
    std::ofstream(dir_ + "/bad2/config.json") << cfg;
    ModelWeights p = allocate_weights(t->config(), DType::f32);
    AdamW opt(t->config(), {});
    try {
      load_checkpoint(dir_ + "/bad2", kConfig, t->config(), p, opt);
      FAIL();
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), testing::HasSubstr("describes a different model than the run's config (field 'hidden_size'"));
    }
  }
  {  // trainer state not JSON
    fs::copy(ck, dir_ + "/bad3", fs::copy_options::recursive);
    std::ofstream(dir_ + "/bad3/trainer_state.json") << "{step: 1";
    ModelWeights p = allocate_weights(t->config(), DType::f32);
    AdamW opt(t->config(), {});
    EXPECT_THROW(load_checkpoint(dir_ + "/bad3", kConfig, t->config(), p, opt), Error);
  }
  {  // a field that keeps every shape: still another model
    fs::copy(ck, dir_ + "/bad4", fs::copy_options::recursive);
    std::string cfg = kConfig;
    cfg.replace(cfg.find("\"routed_scaling_factor\": 2.5"), 28, "\"routed_scaling_factor\": 1.0");
    std::ofstream(dir_ + "/bad4/config.json") << cfg;
    ModelWeights p = allocate_weights(t->config(), DType::f32);
    AdamW opt(t->config(), {});
    try {
      load_checkpoint(dir_ + "/bad4", kConfig, t->config(), p, opt);
      FAIL();
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), testing::HasSubstr("field 'routed_scaling_factor' differs"));
    }
  }
}

// What training saves is what inference runs: same logits as the training forward.
TEST_F(TrainerTest, CheckpointLoadsForInference) {
  auto t = make(dir_);
  for (int i = 0; i < 3; ++i) t->step();
  const std::string ck = t->save();
  Transformer m(ck);
  std::vector<int32_t> tokens = {5, 9, 14, 20, 1, 7, 3, 11};
  std::vector<int32_t> targets(tokens.size(), -1);
  TrainingPass<float> pass(t->config());
  pass.forward(t->params(), tokens.data(), targets.data(), 1, int64_t(tokens.size()));
  KvCache cache(m.config(), int64_t(tokens.size()));
  std::vector<float> logits(tokens.size() * 64);
  m.forward(tokens.data(), int64_t(tokens.size()), cache, logits.data(), true);
  EXPECT_LE(test::max_abs_diff(logits.data(), pass.logits().data(), logits.size()), 1e-4f * test::max_abs(logits));
  // Its MTP module is stored as layer num_hidden_layers, with the shared embedding copied.
  SafetensorsFile f(ck + "/model.safetensors");
  ASSERT_NE(f.find("model.layers.2.eh_proj.weight"), nullptr);
  EXPECT_EQ(0, std::memcmp(f.find("model.layers.2.embed_tokens.weight")->data, f.find("model.embed_tokens.weight")->data,
                           f.find("model.embed_tokens.weight")->nbytes));
}

// §2.2: with lambda > 0 the MTP module learns to predict two tokens ahead.
TEST_F(TrainerTest, MtpLossFalls) {
  opt_.steps = 40;
  opt_.schedule.decay_start = opt_.schedule.decay_end = 0;
  auto t = make(dir_);
  std::vector<double> mtp;
  for (int i = 0; i < opt_.steps; ++i) mtp.push_back(t->step().mtp_loss);
  EXPECT_GT(mtp.front(), 0);
  EXPECT_LT((mtp[35] + mtp[36] + mtp[37] + mtp[38] + mtp[39]) / 5, 0.8 * (mtp[0] + mtp[1] + mtp[2] + mtp[3] + mtp[4]) / 5);
}

// §3.3: the Linear GEMMs in BF16 or in FP8 (E4M3, fine-grained scales, promoted
// accumulation) train like FP32 on a short run: the loss falls and ends close. FP8 keeps
// less for the backward (§3.3.3: E5M6 attention outputs, E4M3 SwiGLU inputs).
TEST_F(TrainerTest, Bf16AndFp8GemmsTrainLikeFp32) {
  opt_.steps = 30;
  opt_.schedule.decay_start = opt_.schedule.decay_end = 0;
  std::map<GemmPrecision, int64_t> held;
  int runs = 0;
  auto final_loss = [&](GemmPrecision p) {
    opt_.linear.precision = p;
    auto t = make(dir_ + "/run" + std::to_string(runs++));
    std::vector<double> loss;
    for (int i = 0; i < opt_.steps; ++i) {
      const StepMetrics m = t->step();
      loss.push_back(m.loss);
      held[p] = m.activation_bytes;
    }
    EXPECT_LT(loss.back(), 0.85 * loss.front()) << gemm_precision_name(p);
    return (loss[27] + loss[28] + loss[29]) / 3;
  };
  const double fp32 = final_loss(GemmPrecision::fp32), bf16 = final_loss(GemmPrecision::bf16),
               fp8 = final_loss(GemmPrecision::fp8), fp8_tensor = final_loss(GemmPrecision::fp8_tensor);
  EXPECT_NEAR(bf16, fp32, 0.03 * fp32);
  EXPECT_NEAR(fp8, fp32, 0.03 * fp32);
  EXPECT_NE(bf16, fp32);  // the precision really reaches the GEMMs
  EXPECT_NE(fp8, bf16);
  EXPECT_NE(fp8_tensor, fp8);
  EXPECT_EQ(held[GemmPrecision::bf16], held[GemmPrecision::fp32]);
  EXPECT_LT(held[GemmPrecision::fp8], held[GemmPrecision::fp32]);
  EXPECT_GT(held[GemmPrecision::fp8], 0);
  std::printf("activations held: fp32 %ld bytes, fp8 %ld bytes\n", long(held[GemmPrecision::fp32]),
              long(held[GemmPrecision::fp8]));

  // The ablations (dsv3 train --fp8-caches full, --fp8-accumulator fp32): each changes the
  // run, and the caches switch alone decides what is held.
  opt_.linear.low_precision_caches = false;
  const double fp8_full_caches = final_loss(GemmPrecision::fp8);
  EXPECT_EQ(held[GemmPrecision::fp8], held[GemmPrecision::fp32]);
  EXPECT_NE(fp8_full_caches, fp8);
  EXPECT_NEAR(fp8_full_caches, fp32, 0.03 * fp32);
  opt_.linear.low_precision_caches = true, opt_.linear.fp8 = kFp8Fp32Accumulate;
  const double fp8_fp32_acc = final_loss(GemmPrecision::fp8);
  EXPECT_NE(fp8_fp32_acc, fp8);
  EXPECT_NE(fp8_fp32_acc, fp8_full_caches);
  EXPECT_LT(held[GemmPrecision::fp8], held[GemmPrecision::fp32]);
}

// §2.1.2: the bias update drives the expert load toward balance.
TEST_F(TrainerTest, BalancingLowersMaxVio) {
  opt_.steps = 60, opt_.batch = 8;
  opt_.schedule.decay_start = opt_.schedule.decay_end = 0;
  auto tail_vio = [&](double gamma, double* early) {
    opt_.gamma = gamma;
    auto t = make(dir_ + "/g" + std::to_string(gamma));
    std::vector<double> vio;
    for (int i = 0; i < opt_.steps; ++i) vio.push_back(t->step().max_vio);
    *early = (vio[0] + vio[1] + vio[2] + vio[3] + vio[4]) / 5;
    double s = 0;
    for (size_t i = vio.size() - 10; i < vio.size(); ++i) s += vio[i];
    return s / 10;
  };
  double early0, early1;
  const double without = tail_vio(0.0, &early0), with = tail_vio(0.01, &early1);
  EXPECT_LT(with, without);
  EXPECT_LT(with, early1);  // falls over the run
}

// The CLI killed with SIGKILL at some moment, then resumed, reproduces an uninterrupted run.
TEST_F(TrainerTest, KillNineThenResumeThroughTheCli) {
  const std::string data = write_cli_inputs();
  const std::string args = std::string(DSV3_BINARY) + " train -c " + dir_ + "/config.json -d " + data +
                           " --steps 150 --batch 4 --seq 16 --save-every 2 --eval-every 0 -t 1 --lr 3e-3 -o ";
  auto losses = [](const std::string& csv) {  // step -> loss, the last line of each step
    std::map<int, std::string> out;
    std::ifstream in(csv);
    std::string line;
    std::getline(in, line);
    while (std::getline(in, line)) {
      const auto c1 = line.find(','), c2 = line.find(',', c1 + 1), c3 = line.find(',', c2 + 1), c4 = line.find(',', c3 + 1);
      out[std::stoi(line.substr(0, c1))] = line.substr(c3 + 1, c4 - c3 - 1);  // the loss column
    }
    return out;
  };
  ASSERT_EQ(0, WEXITSTATUS(std::system((args + dir_ + "/straight > /dev/null 2>&1").c_str())));
  const auto want = losses(dir_ + "/straight/metrics.csv");
  ASSERT_EQ(want.size(), 150u);

  const pid_t pid = fork();
  if (pid == 0) {
    execl("/bin/sh", "sh", "-c", ("exec " + args + dir_ + "/killed > /dev/null 2>&1").c_str(), nullptr);
    _exit(127);
  }
  // Kill as soon as a checkpoint exists: the run is then still going (asserted below), and
  // the kill may land anywhere, also in the middle of writing the next checkpoint.
  for (int i = 0; i < 20000 && !latest_checkpoint(dir_ + "/killed"); ++i) usleep(200);
  kill(pid, SIGKILL);  // sh -c "exec ..." became the trainer itself
  waitpid(pid, nullptr, 0);
  const auto last = latest_checkpoint(dir_ + "/killed");
  ASSERT_TRUE(last.has_value());
  EXPECT_LT(losses(dir_ + "/killed/metrics.csv").size(), 150u) << "the kill came after the run had finished";
  const int rc = WEXITSTATUS(std::system((args + dir_ + "/killed --resume > " + dir_ + "/resume.log 2>&1").c_str()));
  std::ifstream log(dir_ + "/resume.log");
  const std::string log_text((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
  ASSERT_EQ(rc, 0) << log_text;
  const auto got = losses(dir_ + "/killed/metrics.csv");
  ASSERT_EQ(got.size(), 150u);
  for (const auto& [step, loss] : want) EXPECT_EQ(got.at(step), loss) << "step " << step;
}


// dsv3 perplexity on a run's checkpoint: --split val scores the windows of the trainer's
// validation loss (through the inference model, not the training pass), --split unseen the
// training windows the run has not reached; wrong settings are named.
TEST_F(TrainerTest, PerplexityScoresTheTrainersWindows) {
  const std::string data = write_cli_inputs();
  std::string out;
  ASSERT_EQ(0, run_dsv3("train -c " + dir_ + "/config.json -d " + data + " --steps 20 --batch 4 --seq 16 --lr 3e-3 " +
                            "--eval-every 20 --eval-batches 3 --save-every 20 -t 1 -o " + dir_ + "/run",
                        &out))
      << out;
  std::ifstream csv(dir_ + "/run/metrics.csv");
  std::string line, last;
  while (std::getline(csv, line)) last = line;
  double val_loss = 0;  // the sixth column of the last row
  for (size_t i = 0, col = 0; i < last.size(); ++i)
    if (last[i] == ',' && ++col == 5) val_loss = std::atof(last.c_str() + i + 1);
  ASSERT_GT(val_loss, 0) << last;
  const std::string ck = dir_ + "/run/checkpoint-0000020";
  const std::string ppl = "perplexity -m " + ck + " -d " + data + " --seq 16 -t 1 ";

  ASSERT_EQ(0, run_dsv3(ppl + "--split val --windows 12", &out)) << out;  // 3 batches of 4
  EXPECT_NEAR(json_number(out, "loss"), val_loss, 1e-4 * val_loss) << out;
  EXPECT_EQ(json_number(out, "tokens"), 12 * 16);
  EXPECT_NEAR(json_number(out, "perplexity"), std::exp(json_number(out, "loss")), 1e-3);

  // 20 steps of 4 windows seen, of (20000 - 1) / 16 = 1249.
  ASSERT_EQ(0, run_dsv3(ppl + "--split unseen --csv " + dir_ + "/heldout.csv", &out)) << out;
  EXPECT_EQ(json_number(out, "windows"), 1249 - 80) << out;
  EXPECT_EQ(json_number(out, "step"), 20);
  {  // the windows the run's sampler, at its saved position, would deliver next
    const TrainerState st = read_trainer_state(ck);
    BatchSampler next({train_}, 16, st.seed);
    next.seek(st.data);
    Transformer model(ck);
    WindowScorer scorer(model, 16);
    std::vector<int32_t> in(16), tg(16), window(17);
    double sum = 0;
    for (int w = 0; w < 1249 - 80; ++w) {
      next.next_batch(1, in.data(), tg.data());
      std::copy(in.begin(), in.end(), window.begin());
      window.back() = tg.back();
      sum += scorer.loss(window);
    }
    EXPECT_NEAR(json_number(out, "loss"), sum / (1249 - 80), 1e-5) << out;
    EXPECT_EQ(st.data.epoch, 0);
  }
  std::ifstream held(dir_ + "/heldout.csv");
  std::getline(held, line);
  EXPECT_EQ(line, "step,tokens,windows,loss,loss_se,perplexity");
  std::getline(held, line);
  EXPECT_EQ(line.rfind("20,18704,1169,", 0), 0u) << line;

  EXPECT_NE(0, run_dsv3("perplexity -m " + ck + " -d " + data + " --seq 8 --split unseen", &out));
  EXPECT_THAT(out, testing::HasSubstr("the run trained on windows of 16 tokens; pass --seq 16"));
  EXPECT_NE(0, run_dsv3(ppl + "--file " + dir_ + "/config.json", &out));
  EXPECT_THAT(out, testing::HasSubstr("give exactly one of --data (token shards) and --file (text)"));
  EXPECT_NE(0, run_dsv3("perplexity -m " + ck + " --file " + dir_ + "/config.json", &out));
  EXPECT_THAT(out, testing::HasSubstr("no tokenizer.json, needed to encode --file"));
  fs::copy(ck, dir_ + "/bare", fs::copy_options::recursive);
  fs::remove(dir_ + "/bare/trainer_state.json");
  EXPECT_NE(0, run_dsv3("perplexity -m " + dir_ + "/bare -d " + data + " --seq 16 --split unseen", &out));
  EXPECT_THAT(out, testing::HasSubstr("has no trainer_state.json (not a dsv3 train checkpoint)"));
  // Another data set than the run's.
  const std::string other = dir_ + "/other";
  fs::create_directories(other);
  write_shard(other + "/train-00000.bin", corpus(5000, 3));
  EXPECT_NE(0, run_dsv3("perplexity -m " + ck + " -d " + other + " --seq 16 --split unseen", &out));
  EXPECT_THAT(out, testing::HasSubstr("not the data this run trained on"));
}


// --file: the text encoded with the checkpoint's tokenizer (BOS first, as its config asks) and
// scored as one window here when it fits in one.
TEST_F(TrainerTest, PerplexityOfATextFile) {
  const std::string text = dir_ + "/text.txt";
  std::ofstream(text) << "In the beginning was the word, and the word was with the light. "
                         "And the light shone in the darkness, and the darkness was not.\n";
  std::string out;
  ASSERT_EQ(0, run_dsv3("train-tokenizer -i " + text + " --vocab-size 300 --min-frequency 1 -o " + dir_ + "/tok", &out))
      << out;
  std::string config = kConfig;
  const std::string from = "\"vocab_size\": 64";
  config.replace(config.find(from), from.size(), "\"vocab_size\": 320");
  opt_.extras.files = {dir_ + "/tok/tokenizer.json", dir_ + "/tok/tokenizer_config.json"};
  Trainer t(config, opt_, {train_}, {val_}, dir_ + "/run");
  t.step();
  const std::string ck = t.save();
  ASSERT_EQ(0, run_dsv3("tokenize -m " + ck + " --file " + text + " --bos", &out)) << out;
  std::vector<int32_t> ids;
  for (const auto& v : nlohmann::json::parse(out)) ids.push_back(v.get<int32_t>());
  ASSERT_GT(ids.size(), 10u);
  ASSERT_LE(ids.size(), 129u);  // one window within max_position_embeddings
  Transformer model(ck);
  const double want = WindowScorer(model, int64_t(ids.size()) - 1).loss(ids);
  ASSERT_EQ(0, run_dsv3("perplexity -m " + ck + " --file " + text + " --seq " + std::to_string(ids.size() - 1), &out))
      << out;
  EXPECT_EQ(json_number(out, "windows"), 1) << out;
  EXPECT_NEAR(json_number(out, "loss"), want, 1e-5 * want) << out;
  // A window longer than the text is named.
  EXPECT_NE(0, run_dsv3("perplexity -m " + ck + " --file " + text + " --seq " + std::to_string(ids.size()), &out));
  EXPECT_THAT(out, testing::HasSubstr(cat(ids.size(), " tokens, fewer than one window of --seq + 1 = ", ids.size() + 1,
                                           "; pass --seq ", ids.size() - 1, " or less")));
}

}  // namespace
}  // namespace dsv3
