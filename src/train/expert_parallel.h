// Expert parallelism over a communicator (§3.2.2; the multi-process issue, item 4): the
// routed experts of every MoE layer split into equal contiguous ranges over the processes
// of a group, and the MoE's exchange (model/moe.h) done with all-to-all of variable counts.
// The model calls it between dispatch and the experts and between the experts and the
// combine; it never sees the communicator. Uses model and dist.
#pragma once
#include <cstdint>
#include <vector>

#include "dist/communicator.h"
#include "model/moe.h"

namespace dsv3 {

class CommExpertExchange : public ExpertExchange {
 public:
  // Error unless the group's size divides the routed experts. nodes: the group's ranks in
  // this many equal runs of consecutive ranks (node-limited routing's nodes), for counting
  // what crosses between them.
  CommExpertExchange(dist::Communicator& group, int64_t routed_experts, int64_t nodes = 1);
  int64_t first_expert() const override { return first_; }
  int64_t experts_here() const override { return here_; }
  int64_t processes() const override { return int64_t(group_.size()); }
  void plan(const Dispatch& d, ExpertRoute& route) override;
  void to_experts(const ExpertRoute& route, const float* rows, int64_t width, float* received) override;
  void to_tokens(const ExpertRoute& route, const float* rows, int64_t width, float* back) override;
  // Rows this process sent to other processes' experts (all layers, forward and backward
  // exchanges), for the all-to-all volume a run logs.
  int64_t rows_sent_away() const { return sent_away_; }
  // Tokens' rows that a node-aware dispatch would send to other nodes: one per token and
  // other node holding any of its experts (DeepSeek-V3 sends a token once over InfiniBand
  // to each node, then on by NVLink; §3.2.2). What node-limited routing bounds.
  int64_t token_node_sends() const { return node_sends_; }

 private:
  dist::Communicator& group_;
  int64_t experts_, first_, here_;
  std::vector<double> counts_;             // every process's rows per expert, summed across the group
  std::vector<int64_t> send_, recv_;       // element counts of one exchange
  int64_t sent_away_ = 0;
  int64_t nodes_ = 1, node_sends_ = 0;
  std::vector<uint8_t> seen_;  // per token: counted for the node at hand
};

}  // namespace dsv3
