// Communication at scale (see parallel.h).
#include "cost/parallel.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"

namespace dsv3 {

ParallelEstimate estimate_parallel(const ModelConfig& c, const CostReport& cost, const ParallelLayout& l) {
  if (l.gpus < 1 || l.pp < 1 || l.ep < 1 || l.gpus_per_node < 1) fail("--gpus, --pp, --ep and --gpus-per-node must be >= 1");
  if (l.gpus % l.pp) fail("--gpus ", l.gpus, " is not a multiple of --pp ", l.pp);
  if (l.pp > c.num_hidden_layers) fail("--pp ", l.pp, " exceeds the model's ", c.num_hidden_layers, " layers");
  ParallelEstimate e;
  e.layout = l;
  e.dp = l.gpus / l.pp;
  if (e.dp % l.ep) fail("--ep ", l.ep, " must divide the ", e.dp, " GPUs of a pipeline stage (--gpus / --pp)");
  if (c.n_routed_experts == 0) fail("the model has no routed experts: expert parallelism does not apply");
  if (c.n_routed_experts % l.ep) fail("--ep ", l.ep, " must divide the model's ", c.n_routed_experts, " routed experts");
  if (l.ep % l.gpus_per_node && l.ep > l.gpus_per_node)
    fail("--ep ", l.ep, " must span whole nodes of --gpus-per-node ", l.gpus_per_node);
  if (!(l.nvlink_gb_s > 0) || !(l.ib_gb_s > 0)) fail("--nvlink and --ib must be > 0 GB/s");
  if (l.micro_batch_tokens < 1) fail("--micro-batch-tokens must be >= 1");
  e.ep_nodes = std::max<int64_t>(1, l.ep / l.gpus_per_node);
  if (l.max_nodes < 1 || l.max_nodes > e.ep_nodes)
    fail("--max-nodes ", l.max_nodes, " must be in [1, ", e.ep_nodes, "] (the nodes of the expert-parallel group)");
  e.experts_per_gpu = c.n_routed_experts / l.ep;
  int64_t moe_layers = 0;
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) moe_layers += c.is_moe_layer(i);
  e.moe_layers_per_stage = (moe_layers + l.pp - 1) / l.pp;

  // A token reaches min(M, K) nodes; one of them is its own with probability M / nodes
  // (its node is as likely as any to be among the chosen), and that copy stays on NVLink.
  const double K = double(c.num_experts_per_tok);
  const double reached = std::min<double>(double(l.max_nodes), K);
  e.ib_nodes_per_token = e.ep_nodes > 1 ? reached - reached / double(e.ep_nodes) : 0;
  const double H = double(c.hidden_size);
  const double fp8_bytes = H + std::ceil(H / 128) * 4, bf16_bytes = 2 * H;
  e.dispatch_ib_bytes = e.ib_nodes_per_token * fp8_bytes;
  e.combine_ib_bytes = e.ib_nodes_per_token * bf16_bytes;
  // Within each node, the copy is forwarded to the GPUs of its experts there: K in all.
  e.dispatch_nvlink_bytes = K * fp8_bytes;
  e.combine_nvlink_bytes = K * bf16_bytes;

  const ModelCount& m = cost.model;
  const double forward_per_token_layer = (m.train_flops_per_token - m.mtp_flops) / 3 / double(c.num_hidden_layers);
  const double t = double(l.micro_batch_tokens);
  e.forward_flops = t * forward_per_token_layer;
  e.forward_seconds = e.forward_flops / (cost.peak_flops * cost.mfu);
  auto seconds = [&](double ib_bytes, double nvlink_bytes) {  // IB and NVLink run side by side
    return std::max(t * ib_bytes / (l.ib_gb_s * 1e9), t * nvlink_bytes / (l.nvlink_gb_s * 1e9));
  };
  e.forward_comm_seconds = seconds(e.dispatch_ib_bytes, e.dispatch_nvlink_bytes) + seconds(e.combine_ib_bytes, e.combine_nvlink_bytes);
  e.backward_comm_seconds = 2 * seconds(e.combine_ib_bytes, e.combine_nvlink_bytes);
  e.ratio = e.forward_seconds / e.forward_comm_seconds;
  e.overlap_compute_seconds = 3 * e.forward_seconds;
  e.overlap_comm_seconds = e.forward_comm_seconds + e.backward_comm_seconds;
  e.dualpipe_hides = e.overlap_comm_seconds <= e.overlap_compute_seconds;
  e.all_to_all_bytes_per_token = double(moe_layers) * (e.dispatch_ib_bytes + e.combine_ib_bytes + 2 * e.combine_ib_bytes);
  return e;
}

namespace {

std::string bytes_str(double b) {
  char s[32];
  if (b >= 1e9) std::snprintf(s, sizeof(s), "%.2f GB", b / 1e9);
  else if (b >= 1e6) std::snprintf(s, sizeof(s), "%.2f MB", b / 1e6);
  else std::snprintf(s, sizeof(s), "%.1f KB", b / 1e3);
  return s;
}

std::string ms(double s) {
  char out[32];
  std::snprintf(out, sizeof(out), "%.2f ms", s * 1e3);
  return out;
}

}  // namespace

std::string format_parallel(const ParallelEstimate& e, const CostReport& cost) {
  const ParallelLayout& l = e.layout;
  std::ostringstream o;
  char line[512];
  o << "\nparallel layout (an estimate; assumptions in src/cost/parallel.h):\n";
  std::snprintf(line, sizeof(line),
                "  %ld GPUs = %ld pipeline stages x %ld data-parallel; experts over %ld GPUs (%ld node%s of %ld), %ld routed "
                "experts per GPU; at most %ld nodes per token\n",
                long(l.gpus), long(l.pp), long(e.dp), long(l.ep), long(e.ep_nodes), e.ep_nodes == 1 ? "" : "s",
                long(l.gpus_per_node), long(e.experts_per_gpu), long(l.max_nodes));
  o << line;
  std::snprintf(line, sizeof(line),
                "  per token per MoE layer: InfiniBand to %.2f other nodes: dispatch %s (FP8 + scales), combine %s (BF16); "
                "NVLink to its experts' GPUs: %s + %s\n",
                e.ib_nodes_per_token, bytes_str(e.dispatch_ib_bytes).c_str(), bytes_str(e.combine_ib_bytes).c_str(),
                bytes_str(e.dispatch_nvlink_bytes).c_str(), bytes_str(e.combine_nvlink_bytes).c_str());
  o << line;
  std::snprintf(line, sizeof(line),
                "  all-to-all over InfiniBand per token, forward and backward, all MoE layers: %s\n",
                bytes_str(e.all_to_all_bytes_per_token).c_str());
  o << line;
  std::snprintf(line, sizeof(line),
                "  one micro-batch (%ld tokens per GPU) through one MoE layer: computation %s (%.3g TFLOP at %.1f%% MFU of "
                "%s %s), dispatch + combine %s (IB %.0f GB/s, NVLink %.0f GB/s) -> computation : communication = %.2f : 1\n",
                long(l.micro_batch_tokens), ms(e.forward_seconds).c_str(), e.forward_flops / 1e12, 100 * cost.mfu,
                cost.gpu.label.c_str(), precision_name(cost.options.precision), ms(e.forward_comm_seconds).c_str(), l.ib_gb_s,
                l.nvlink_gb_s, e.ratio);
  o << line;
  std::snprintf(line, sizeof(line),
                "  DualPipe, a forward chunk with a backward chunk: computation %s, both chunks' all-to-all %s -> %s\n",
                ms(e.overlap_compute_seconds).c_str(), ms(e.overlap_comm_seconds).c_str(),
                e.dualpipe_hides ? "hidden behind computation" : "NOT hidden: communication is longer");
  o << line;
  o << "  the report (§3.2.1): without overlap cross-node expert parallelism leaves a computation-to-communication\n"
       "  ratio of about 1:1; DualPipe overlaps the two so the all-to-all costs near zero\n";
  return o.str();
}

std::string parallel_json(const ParallelEstimate& e) {
  const ParallelLayout& l = e.layout;
  nlohmann::json j = {{"gpus", l.gpus}, {"pp", l.pp}, {"dp", e.dp}, {"ep", l.ep}, {"gpus_per_node", l.gpus_per_node},
                      {"ep_nodes", e.ep_nodes}, {"experts_per_gpu", e.experts_per_gpu}, {"max_nodes", l.max_nodes},
                      {"ib_gb_s", l.ib_gb_s}, {"nvlink_gb_s", l.nvlink_gb_s}, {"micro_batch_tokens", l.micro_batch_tokens},
                      {"moe_layers_per_stage", e.moe_layers_per_stage}, {"ib_nodes_per_token", e.ib_nodes_per_token},
                      {"dispatch_ib_bytes_per_token_layer", e.dispatch_ib_bytes},
                      {"combine_ib_bytes_per_token_layer", e.combine_ib_bytes},
                      {"dispatch_nvlink_bytes_per_token_layer", e.dispatch_nvlink_bytes},
                      {"combine_nvlink_bytes_per_token_layer", e.combine_nvlink_bytes},
                      {"all_to_all_ib_bytes_per_token", e.all_to_all_bytes_per_token},
                      {"chunk_forward_flops", e.forward_flops}, {"chunk_forward_seconds", e.forward_seconds},
                      {"chunk_forward_comm_seconds", e.forward_comm_seconds},
                      {"chunk_backward_comm_seconds", e.backward_comm_seconds}, {"compute_to_comm_ratio", e.ratio},
                      {"overlap_compute_seconds", e.overlap_compute_seconds}, {"overlap_comm_seconds", e.overlap_comm_seconds},
                      {"dualpipe_hides_all_to_all", e.dualpipe_hides}};
  return j.dump();
}

}  // namespace dsv3
