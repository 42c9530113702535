// Communication at scale (the multi-process issue, item 8): what DeepSeek-V3's parallel
// layout (§3.2: 16-way pipeline parallelism, 64-way expert parallelism over 8 nodes, ZeRO-1
// data parallelism, node-limited routing) sends per token and per micro-batch, the ratio of
// computation to expert all-to-all, and whether DualPipe's overlap can hide the all-to-all.
// An estimate from the config and the report's link speeds, with its assumptions stated:
//   - a token crosses InfiniBand once per node it is routed to other than its own (at most
//     max_nodes, §2.1.2; counted as max_nodes - the expected share of its own node, see
//     ib_nodes_per_token), then NVLink to each of its K experts' GPUs (§3.2.2);
//   - dispatch in FP8 with one float32 scale per 128 values, combine in BF16 (§3.3.4); the
//     backward moves the same tokens' gradients (BF16 both ways);
//   - a GPU's experts see as many token copies as its own tokens send (balanced load), so a
//     layer's computation per GPU is its micro-batch's tokens times the average layer's
//     FLOPs per token, at the given MFU of the GPU's peak;
//   - each GPU has its own InfiniBand NIC (50 GB/s) and NVLink (160 GB/s), both used at
//     their full rate, in one direction at a time (dispatch, then combine).
// Uses cost (FLOPs per token) and model (the config).
#pragma once
#include <cstdint>
#include <string>

#include "cost/cost.h"
#include "model/config.h"

namespace dsv3 {

struct ParallelLayout {
  int64_t gpus = 2048, pp = 16, ep = 64, gpus_per_node = 8;
  int64_t max_nodes = 4;              // node-limited routing: M nodes per token at most
  double nvlink_gb_s = 160, ib_gb_s = 50;  // per GPU, GB/s (the report's H800 figures)
  int64_t micro_batch_tokens = 4096;  // tokens one GPU runs per micro-batch (one 4K sequence)
};

struct ParallelEstimate {
  ParallelLayout layout;
  int64_t dp = 0;                 // gpus / pp: data-parallel copies of each stage
  int64_t ep_nodes = 0;           // nodes an expert-parallel group spans
  int64_t experts_per_gpu = 0;    // routed experts on each GPU of the group
  int64_t moe_layers_per_stage = 0;  // ceil(MoE layers / pp): the busiest stage's
  double ib_nodes_per_token = 0;  // other nodes a token's copies cross InfiniBand to
  // bytes per token per MoE layer, forward
  double dispatch_ib_bytes = 0, combine_ib_bytes = 0;
  double dispatch_nvlink_bytes = 0, combine_nvlink_bytes = 0;
  // one micro-batch through one MoE layer on one GPU (a DualPipe chunk's MoE part)
  double forward_flops = 0;       // micro_batch_tokens x the average layer's forward FLOPs per token
  double forward_seconds = 0;     // at the MFU
  double forward_comm_seconds = 0;   // dispatch + combine, the slower of IB and NVLink for each
  double backward_comm_seconds = 0;  // the gradients back (BF16 both ways)
  double ratio = 0;               // forward computation : forward all-to-all
  // DualPipe overlaps a forward chunk with a backward chunk (F + B = 3 forwards of
  // computation) while both chunks' all-to-all run: hidden if the communication fits.
  double overlap_compute_seconds = 0, overlap_comm_seconds = 0;
  bool dualpipe_hides = false;
  double all_to_all_bytes_per_token = 0;  // IB, forward + backward, all MoE layers
};

// Errors name the flag: gpus not a multiple of pp, ep not dividing gpus / pp nor the routed
// experts, ep not whole nodes, max_nodes outside [1, ep nodes], pp above the layers.
ParallelEstimate estimate_parallel(const ModelConfig& c, const CostReport& cost, const ParallelLayout& layout);

std::string format_parallel(const ParallelEstimate& e, const CostReport& cost);
std::string parallel_json(const ParallelEstimate& e);  // one JSON object

}  // namespace dsv3
