// Parameter, FLOP, GPU-hour and dollar accounting (see cost.h for what is counted).
#include "cost/cost.h"

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/error.h"
#include "model/weights.h"

namespace dsv3 {

using json = nlohmann::json;

Precision parse_precision(const std::string& name) {
  if (name == "bf16") return Precision::bf16;
  if (name == "fp8") return Precision::fp8;
  fail("precision '", name, "' is not known (bf16 or fp8)");
}

const char* precision_name(Precision p) { return p == Precision::bf16 ? "bf16" : "fp8"; }

double GpuSpec::peak_flops(Precision p) const {
  const double tflops = p == Precision::bf16 ? bf16_tflops : fp8_tflops;
  if (tflops <= 0) fail("GPU ", name, " has no ", precision_name(p), " tensor cores; use --precision bf16");
  return tflops * 1e12;
}

const std::vector<GpuSpec>& gpu_specs() {
  // H800 is the H100 SXM with a cut NVLink (400 GB/s) for export: the same tensor cores.
  static const std::vector<GpuSpec> specs = {
      {"h800", "H800", 989.5, 1979},
      {"h100", "H100", 989.5, 1979},
      {"h200", "H200", 989.5, 1979},  // H100's compute, more and faster HBM
      {"a100", "A100", 312, 0},
  };
  return specs;
}

const GpuSpec& find_gpu(const std::string& name) {
  std::string known;
  for (const GpuSpec& g : gpu_specs()) {
    if (g.name == name) return g;
    known += (known.empty() ? "" : ", ") + g.name;
  }
  fail("unknown GPU '", name, "' (known: ", known, ")");
}

// ---- configs ------------------------------------------------------------------------

DenseConfig DenseConfig::parse(const std::string& text, const std::string& what) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    fail(what, ": not valid JSON: ", e.what());
  }
  if (!j.is_object()) fail(what, ": not a JSON object");
  auto integer = [&](const char* key, std::optional<int64_t> fallback = std::nullopt) {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) {
      if (fallback) return *fallback;
      fail(what, ": missing field '", key, "'");
    }
    if (!it->is_number_integer() || it->get<int64_t>() < 1) fail(what, ": field '", key, "' must be a positive integer");
    return it->get<int64_t>();
  };
  DenseConfig c;
  c.vocab_size = integer("vocab_size");
  c.hidden_size = integer("hidden_size");
  c.intermediate_size = integer("intermediate_size");
  c.num_hidden_layers = integer("num_hidden_layers");
  c.num_attention_heads = integer("num_attention_heads");
  c.num_key_value_heads = integer("num_key_value_heads", c.num_attention_heads);
  if (c.num_attention_heads % c.num_key_value_heads)
    fail(what, ": field 'num_key_value_heads' (", c.num_key_value_heads, ") does not divide num_attention_heads (",
         c.num_attention_heads, ")");
  c.head_dim = integer("head_dim", c.hidden_size / c.num_attention_heads);
  auto tie = j.find("tie_word_embeddings");
  if (tie != j.end() && !tie->is_null()) {
    if (!tie->is_boolean()) fail(what, ": field 'tie_word_embeddings' must be true or false");
    c.tie_word_embeddings = tie->get<bool>();
  }
  return c;
}

DenseConfig llama_3_1_405b() {
  return DenseConfig{.vocab_size = 128256, .hidden_size = 16384, .intermediate_size = 53248,
                     .num_hidden_layers = 126, .num_attention_heads = 128, .num_key_value_heads = 8,
                     .head_dim = 128, .tie_word_embeddings = false};
}

// ---- parameters and FLOPs -----------------------------------------------------------

namespace {

// Causal attention per token and layer, forward + backward: QK^T over qk_dim and PV over
// v_dim, each 2 FLOPs per multiply-add, against seq/2 keys on average; backward 2x forward.
double attention_flops_per_layer(int64_t heads, int64_t qk_dim, int64_t v_dim, int64_t seq_len) {
  const double forward = 2.0 * double(heads) * double(qk_dim + v_dim) * (double(seq_len) / 2);
  return 3 * forward;
}

void check_seq_len(int64_t seq_len) {
  if (seq_len < 1) fail("seq is ", seq_len, "; the sequence length must be >= 1");
}

}  // namespace

ModelCount count_model(const ModelConfig& c, int64_t seq_len, const std::string& name) {
  check_seq_len(seq_len);
  // The tensor list only: Mats stay empty, no weights are allocated.
  ModelWeights w(c);
  const std::vector<TensorSlot> slots = list_tensors(c, w);
  std::set<const Mat*> routed, embedding, head_copy;
  auto add_routed = [&](const LayerWeights& l) {
    for (const MlpWeights& e : l.moe.experts) routed.insert({&e.gate_proj, &e.up_proj, &e.down_proj});
  };
  for (const LayerWeights& l : w.layers) add_routed(l);
  embedding.insert(&w.embed_tokens);
  for (const MtpWeights& m : w.mtp) {
    add_routed(m.block);
    embedding.insert(&m.embed_tokens);
    head_copy.insert(&m.shared_head_head);
  }

  struct Sums {
    int64_t all = 0, routed = 0, embedding = 0, vectors = 0, head_copy = 0;
  } main, mtp;
  for (const TensorSlot& s : slots) {
    int64_t n = 1;
    for (int64_t d : s.shape) n *= d;
    Sums& sum = s.mtp ? mtp : main;
    sum.all += n;
    if (routed.count(s.mat)) sum.routed += n;
    if (embedding.count(s.mat)) sum.embedding += n;
    if (head_copy.count(s.mat)) sum.head_copy += n;
    if (s.shape.size() == 1) sum.vectors += n;  // norms, router bias: no matmul
  }
  // §2.1.2: a token reaches num_experts_per_tok of the n_routed_experts in each MoE layer
  // (all experts of one model have one size, so the share is exact).
  auto active = [&](const Sums& s) {
    const int64_t routed_active = c.n_routed_experts ? s.routed * c.num_experts_per_tok / c.n_routed_experts : 0;
    return s.all - s.embedding - s.routed + routed_active;
  };
  const int64_t tied_head = c.tie_word_embeddings ? c.vocab_size * c.hidden_size : 0;  // still a matmul

  ModelCount m;
  m.name = name;
  m.moe = c.n_routed_experts > 0;
  m.description = m.moe ? cat("MoE, ", c.num_hidden_layers, " layers (", c.first_k_dense_replace, " dense), ",
                              c.num_experts_per_tok, " of ", c.n_routed_experts, " routed experts + ",
                              c.n_shared_experts, " shared, MLA, ", c.num_nextn_predict_layers, " MTP module")
                        : cat("dense, ", c.num_hidden_layers, " layers, MLA, ", c.num_nextn_predict_layers,
                              " MTP module");
  if (c.num_nextn_predict_layers != 1) m.description += "s";
  m.seq_len = seq_len;
  m.total_params = main.all;
  m.embedding_params = main.embedding;
  m.mtp_params = mtp.all;
  m.mtp_copy_params = mtp.embedding + mtp.head_copy;
  m.active_params = active(main) + tied_head;
  m.mtp_active_params = active(mtp);
  m.matmul_params = m.active_params - main.vectors;
  m.mtp_matmul_params = m.mtp_active_params - mtp.vectors;
  const double attn = attention_flops_per_layer(c.num_attention_heads, c.qk_head_dim(), c.v_head_dim, seq_len);
  m.matmul_flops = 6.0 * double(m.matmul_params);
  m.attention_flops = double(c.num_hidden_layers) * attn;
  // §2.2: each of the D modules runs over every token (D = 1 in DeepSeek-V3).
  m.mtp_flops = 6.0 * double(m.mtp_matmul_params) + double(c.num_nextn_predict_layers) * attn;
  m.train_flops_per_token = m.matmul_flops + m.attention_flops + m.mtp_flops;
  return m;
}

ModelCount count_model(const DenseConfig& c, int64_t seq_len, const std::string& name) {
  check_seq_len(seq_len);
  const int64_t h = c.hidden_size, q_dim = c.num_attention_heads * c.head_dim, kv_dim = c.num_key_value_heads * c.head_dim;
  const int64_t norms = 2 * h;
  const int64_t matmuls = h * q_dim + 2 * h * kv_dim + q_dim * h + 3 * h * c.intermediate_size;  // q k v o, SwiGLU
  const int64_t table = c.vocab_size * h;
  ModelCount m;
  m.name = name;
  m.description = cat("dense, ", c.num_hidden_layers, " layers, GQA ", c.num_attention_heads, "/",
                      c.num_key_value_heads, " heads");
  m.seq_len = seq_len;
  m.embedding_params = table;
  m.total_params = table + c.num_hidden_layers * (norms + matmuls) + h + (c.tie_word_embeddings ? 0 : table);
  m.matmul_params = c.num_hidden_layers * matmuls + table;  // the head, tied or not
  m.active_params = m.matmul_params + c.num_hidden_layers * norms + h;
  m.matmul_flops = 6.0 * double(m.matmul_params);
  m.attention_flops = double(c.num_hidden_layers) *
                      attention_flops_per_layer(c.num_attention_heads, c.head_dim, c.head_dim, seq_len);
  m.train_flops_per_token = m.matmul_flops + m.attention_flops;
  return m;
}

ModelCount count_model_file(const std::string& path, int64_t seq_len) {
  std::ifstream in(path);
  if (!in) fail(path, ": cannot open the config file");
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    fail(path, ": not valid JSON: ", e.what());
  }
  if (!j.is_object()) fail(path, ": not a JSON object");
  std::string type = "deepseek_v3";
  if (auto it = j.find("model_type"); it != j.end() && it->is_string()) type = it->get<std::string>();
  // the file's stem names the model, or its folder's name for a checkpoint's config.json
  const std::filesystem::path p = std::filesystem::absolute(path);
  const std::string name = p.stem() == "config" && p.has_parent_path() ? p.parent_path().filename().string()
                                                                       : p.stem().string();
  if (type == "llama") return count_model(DenseConfig::parse(text, path), seq_len, name);
  if (type != "deepseek_v3" && type != "deepseek_v2")
    fail(path, ": model_type '", type, "' is not counted (deepseek_v3, deepseek_v2, or llama for dense models)");
  return count_model(ModelConfig::parse(text, path), seq_len, name);
}

// ---- projection ---------------------------------------------------------------------

namespace {

CostReport start_report(const ModelCount& m, const CostOptions& o) {
  if (!std::isfinite(o.tokens) || o.tokens <= 0) fail("tokens is ", o.tokens, "; it must be > 0");
  if (!std::isfinite(o.price_per_gpu_hour) || o.price_per_gpu_hour < 0)
    fail("price is ", o.price_per_gpu_hour, "; dollars per GPU-hour must be >= 0");
  if (!std::isfinite(o.extra_gpu_hours) || o.extra_gpu_hours < 0)
    fail("extra GPU-hours is ", o.extra_gpu_hours, "; it must be >= 0");
  if (o.mfu && o.reported_gpu_hours) fail("give an MFU or reported GPU-hours, not both");
  if (o.mfu && !(*o.mfu > 0 && *o.mfu <= 1))
    fail("mfu is ", *o.mfu, "; it must be in (0, 1] (a fraction of the GPU's peak)");
  if (o.reported_gpu_hours && !(std::isfinite(*o.reported_gpu_hours) && *o.reported_gpu_hours > 0))
    fail("reported GPU-hours is ", *o.reported_gpu_hours, "; it must be > 0");
  CostReport r;
  r.model = m;
  r.options = o;
  r.gpu = find_gpu(o.gpu);
  r.peak_flops = r.gpu.peak_flops(o.precision);
  r.train_flops = o.tokens * m.train_flops_per_token;
  return r;
}

void finish_report(CostReport& r) {
  r.gpu_hours = r.token_gpu_hours + r.options.extra_gpu_hours;
  r.gpu_hours_per_trillion_tokens = r.token_gpu_hours * (1e12 / r.options.tokens);
  r.dollars = r.gpu_hours * r.options.price_per_gpu_hour;
}

}  // namespace

CostReport project_cost(const ModelCount& m, const CostOptions& o) {
  CostReport r = start_report(m, o);
  if (o.reported_gpu_hours) {
    r.token_gpu_hours = *o.reported_gpu_hours;
    r.mfu = r.train_flops / (r.token_gpu_hours * 3600 * r.peak_flops);
    r.mfu_source = MfuSource::implied;
  } else {
    r.mfu = o.mfu ? *o.mfu : kDefaultMfu;
    r.mfu_source = o.mfu ? MfuSource::given : MfuSource::assumed;
    r.token_gpu_hours = r.train_flops / (r.peak_flops * r.mfu * 3600);
  }
  finish_report(r);
  return r;
}

CostReport project_from_throughput(const ModelCount& m, double tokens_per_second_per_gpu, CostOptions o) {
  if (!std::isfinite(tokens_per_second_per_gpu) || tokens_per_second_per_gpu <= 0)
    fail("throughput is ", tokens_per_second_per_gpu, " tokens/s per GPU; it must be > 0");
  o.mfu.reset();
  o.reported_gpu_hours.reset();
  CostReport r = start_report(m, o);
  r.mfu = tokens_per_second_per_gpu * m.train_flops_per_token / r.peak_flops;
  r.mfu_source = MfuSource::measured;
  r.token_gpu_hours = o.tokens / tokens_per_second_per_gpu / 3600;
  finish_report(r);
  return r;
}

CostReport llama_3_1_405b_reported(const CostOptions& like) {
  CostOptions o = like;
  o.tokens = kLlama405bTokens;
  o.gpu = "h100";
  o.mfu.reset();
  o.reported_gpu_hours = kLlama405bGpuHours;
  o.extra_gpu_hours = 0;
  return project_cost(count_model(llama_3_1_405b(), like.seq_len, "Llama 3.1 405B"), o);
}

// ---- output -------------------------------------------------------------------------

namespace {

// x with a K/M/B/T suffix and `decimals` decimals (<0: 4 significant digits): 2.788M, 180.0K.
std::string count_str(double x, int decimals = -1) {
  static const char* const units[] = {"", "K", "M", "B", "T"};
  int k = 0;
  double v = x;
  while (std::fabs(v) >= 999.95 && k < 4) v /= 1000, ++k;
  if (decimals < 0) decimals = std::max(0, 3 - (std::fabs(v) >= 1 ? int(std::floor(std::log10(std::fabs(v)))) : 0));
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f%s", decimals, v, units[k]);
  return buf;
}
std::string params_str(int64_t n) { return count_str(double(n), 2); }  // 671.03B
std::string flops_str(double x) {
  static const struct { double scale; const char* unit; } units[] = {
      {1e15, "P"}, {1e12, "T"}, {1e9, "G"}, {1e6, "M"}, {1e3, "K"}};
  char buf[64];
  if (x >= 1e18) {
    std::snprintf(buf, sizeof buf, "%.3e FLOP", x);
    return buf;
  }
  for (const auto& u : units)
    if (x >= u.scale) return count_str(x / u.scale) + " " + u.unit + "FLOP";
  std::snprintf(buf, sizeof buf, "%.0f FLOP", x);
  return buf;
}
std::string pct(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f%%", 100 * x);
  return buf;
}
std::string ratio(double a, double b) {
  if (!(b > 0) || !(a > 0)) return "";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1fx", a / b);
  return buf;
}
const char* source_name(MfuSource s) {
  switch (s) {
    case MfuSource::given: return "given";
    case MfuSource::assumed: return "assumed";
    case MfuSource::implied: return "implied";
    case MfuSource::measured: return "measured";
  }
  return "";
}

struct Table {
  std::ostringstream out;
  void row(const std::string& label, const std::string& a, const std::string& b = "", const std::string& note = "") {
    char buf[512];
    std::snprintf(buf, sizeof buf, "%-30s %-18s %-18s %s", label.c_str(), a.c_str(), b.c_str(), note.c_str());
    std::string line = buf;
    while (!line.empty() && line.back() == ' ') line.pop_back();
    out << line << "\n";
  }
};

nlohmann::ordered_json report_json(const CostReport& r) {
  using json = nlohmann::ordered_json;
  const ModelCount& m = r.model;
  json j;
  j["model"] = m.name;
  j["description"] = m.description;
  j["total_params"] = m.total_params;
  j["mtp_params"] = m.mtp_params;
  j["active_params"] = m.active_params;
  j["train_flops_per_token"] = m.train_flops_per_token;
  j["gpu_hours"] = r.gpu_hours;
  j["dollars"] = r.dollars;
  j["implied_mfu"] = r.mfu_source == MfuSource::implied || r.mfu_source == MfuSource::measured ? json(r.mfu) : json();
  j["mfu"] = r.mfu;
  j["mfu_source"] = source_name(r.mfu_source);
  j["checkpoint_params"] = m.total_params + m.mtp_params;
  j["embedding_params"] = m.embedding_params;
  j["mtp_copy_params"] = m.mtp_copy_params;
  j["active_params_with_embedding"] = m.active_params_with_embedding();
  j["mtp_active_params"] = m.mtp_active_params;
  j["matmul_params"] = m.matmul_params;
  j["mtp_matmul_params"] = m.mtp_matmul_params;
  j["matmul_flops_per_token"] = m.matmul_flops;
  j["attention_flops_per_token"] = m.attention_flops;
  j["mtp_flops_per_token"] = m.mtp_flops;
  j["seq_len"] = m.seq_len;
  j["tokens"] = r.options.tokens;
  j["train_flops"] = r.train_flops;
  j["gpu"] = r.gpu.name;
  j["precision"] = precision_name(r.options.precision);
  j["peak_flops"] = r.peak_flops;
  j["token_gpu_hours"] = r.token_gpu_hours;
  j["extra_gpu_hours"] = r.options.extra_gpu_hours;
  j["gpu_hours_per_trillion_tokens"] = r.gpu_hours_per_trillion_tokens;
  j["price_per_gpu_hour"] = r.options.price_per_gpu_hour;
  return j;
}

}  // namespace

std::string format_cost(const CostReport& r, const CostReport* cmp) {
  const ModelCount& m = r.model;
  const CostReport* c = cmp;
  auto both = [&](auto get) { return c ? get(*c) : std::string(); };
  Table t;
  t.out << m.name << ": " << m.description << "\n";
  if (c) t.out << c->model.name << ": " << c->model.description << "\n";
  t.out << "\n";
  t.row("", m.name, c ? c->model.name : "", c ? "right/left" : "");
  t.row("parameters (main model)", params_str(m.total_params),
        both([](const CostReport& x) { return params_str(x.model.total_params); }),
        c ? ratio(double(c->model.total_params), double(m.total_params)) : "");
  if (m.mtp_params)
    t.row("  + MTP module(s)", params_str(m.mtp_params), c ? "-" : "",
          cat("(checkpoint: ", params_str(m.total_params + m.mtp_params), ")"));
  t.row("active per token", params_str(m.active_params),
        both([](const CostReport& x) { return params_str(x.model.active_params); }),
        c ? ratio(double(c->model.active_params), double(m.active_params)) : "");
  t.row("  with the embedding row", params_str(m.active_params_with_embedding()),
        both([](const CostReport& x) { return params_str(x.model.active_params_with_embedding()); }));
  t.row("train FLOPs per token", flops_str(m.train_flops_per_token),
        both([](const CostReport& x) { return flops_str(x.model.train_flops_per_token); }),
        c ? ratio(c->model.train_flops_per_token, m.train_flops_per_token) : "");
  t.row("  matmuls (6 x N)", flops_str(m.matmul_flops),
        both([](const CostReport& x) { return flops_str(x.model.matmul_flops); }),
        cat("N = ", params_str(m.matmul_params), c ? cat(" / ", params_str(c->model.matmul_params)) : ""));
  t.row(cat("  attention (seq ", m.seq_len, ")"), flops_str(m.attention_flops),
        both([](const CostReport& x) { return flops_str(x.model.attention_flops); }), "causal, fwd + bwd");
  if (m.mtp_params)
    t.row("  MTP module(s)", flops_str(m.mtp_flops), c ? "-" : "",
          cat("N = ", params_str(m.mtp_matmul_params), " + its attention"));
  t.row("tokens", count_str(r.options.tokens, 1),
        both([](const CostReport& x) { return count_str(x.options.tokens, 1); }));
  t.row("training FLOPs", flops_str(r.train_flops), both([](const CostReport& x) { return flops_str(x.train_flops); }),
        c ? ratio(c->train_flops, r.train_flops) : "");
  auto gpu = [](const CostReport& x) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%s %.1f TF/s", x.gpu.label.c_str(), x.peak_flops / 1e12);
    return std::string(buf);
  };
  t.row(cat("GPU, dense ", r.options.precision == Precision::bf16 ? "BF16" : "FP8", " peak"), gpu(r), both(gpu));
  auto mfu = [](const CostReport& x) { return cat(pct(x.mfu), " ", source_name(x.mfu_source)); };
  t.row("MFU", mfu(r), both(mfu));
  auto hours = [](const CostReport& x) { return count_str(x.gpu_hours); };
  t.row("GPU-hours", hours(r), both(hours), c ? ratio(c->gpu_hours, r.gpu_hours) : "");
  if (r.options.extra_gpu_hours > 0)
    t.row("  on the tokens + other", cat(count_str(r.token_gpu_hours), " + ", count_str(r.options.extra_gpu_hours)));
  auto per_t = [](const CostReport& x) { return count_str(x.gpu_hours_per_trillion_tokens); };
  t.row("GPU-hours per 1T tokens", per_t(r), both(per_t));
  char price[64];
  std::snprintf(price, sizeof price, "dollars at $%.2f/GPU-hour", r.options.price_per_gpu_hour);
  auto dollars = [](const CostReport& x) { return "$" + count_str(x.dollars); };
  t.row(price, dollars(r), both(dollars));
  t.out << "\nFLOPs: 6 x active matmul weights (lm_head in, embedding lookup out) + causal attention\n"
           "(QK and PV at seq/2 keys, backward 2x forward) + the MTP module(s); norms, activations,\n"
           "router, optimizer and recomputation not counted. Active excludes the embedding table.\n";
  if (r.mfu_source == MfuSource::assumed)
    t.out << "MFU " << pct(kDefaultMfu) << " is assumed: give --mfu, or --reported-gpu-hours to get the implied one.\n";
  if (c) t.out << c->model.name << ": Meta's reported " << count_str(c->gpu_hours) << " H100 GPU-hours for "
               << count_str(c->options.tokens, 1) << " tokens.\n";
  return t.out.str();
}

std::string format_projection(const CostReport& r) {
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "%s: %s/token to train; %s tokens on %s at %s MFU (%s vs dense %s peak) = %s GPU-hours = $%s at $%.2f/GPU-hour",
                r.model.name.c_str(), flops_str(r.model.train_flops_per_token).c_str(), count_str(r.options.tokens, 1).c_str(),
                r.gpu.label.c_str(), pct(r.mfu).c_str(), source_name(r.mfu_source),
                r.options.precision == Precision::bf16 ? "BF16" : "FP8", count_str(r.gpu_hours).c_str(),
                count_str(r.dollars).c_str(), r.options.price_per_gpu_hour);
  return buf;
}

std::string cost_json(const CostReport& r, const CostReport* compare) {
  nlohmann::ordered_json j = report_json(r);
  if (compare) j["compare"] = report_json(*compare);
  return j.dump(2);
}

}  // namespace dsv3
