// Expert exchange over all-to-all (see expert_parallel.h).
#include "train/expert_parallel.h"

#include <algorithm>
#include <span>

#include "core/error.h"

namespace dsv3 {

CommExpertExchange::CommExpertExchange(dist::Communicator& group, int64_t routed_experts, int64_t nodes)
    : group_(group), experts_(routed_experts), nodes_(nodes) {
  const int64_t P = group.size();
  if (routed_experts < 1 || routed_experts % P != 0)
    fail("expert parallelism over ", P, " processes needs the routed experts (", routed_experts, ") divisible by it");
  if (nodes < 1 || P % nodes != 0) fail("expert parallelism: ", nodes, " nodes do not divide the ", P, " processes");
  here_ = routed_experts / P;
  first_ = int64_t(group.rank()) * here_;
}

void CommExpertExchange::plan(const Dispatch& d, ExpertRoute& route) {
  const std::vector<int64_t>& offset = d.offset;
  const int64_t P = processes(), E = experts_;
  if (int64_t(offset.size()) != E + 1) fail("expert exchange: ", offset.size() - 1, " experts dispatched, the group splits ", E);
  // Every process's rows per expert, known to all (exact in doubles), in one all-reduce.
  counts_.assign(size_t(P * E), 0.0);
  const int64_t me = group_.rank();
  for (int64_t e = 0; e < E; ++e) counts_[size_t(me * E + e)] = double(offset[size_t(e + 1)] - offset[size_t(e)]);
  group_.all_reduce(std::span<double>(counts_));
  route.send.assign(size_t(P), 0);
  route.recv.assign(size_t(P * here_), 0);
  for (int64_t p = 0; p < P; ++p) {
    route.send[size_t(p)] = offset[size_t((p + 1) * here_)] - offset[size_t(p * here_)];
    for (int64_t e = 0; e < here_; ++e) route.recv[size_t(p * here_ + e)] = int64_t(counts_[size_t(p * E + first_ + e)]);
  }
  // The (token, other node) pairs: rows are grouped by expert, so a node's rows are one run
  // of them, in token order within each expert; a token is counted once per node.
  if (nodes_ == 1) return;
  const int64_t per_node = E / nodes_, my_node = me / (P / nodes_);
  const int64_t tokens = d.token.empty() ? 0 : *std::max_element(d.token.begin(), d.token.end()) + 1;
  for (int64_t node = 0; node < nodes_; ++node) {
    if (node == my_node) continue;
    seen_.assign(size_t(tokens), 0);
    for (int64_t i = offset[size_t(node * per_node)]; i < offset[size_t((node + 1) * per_node)]; ++i) {
      const size_t t = size_t(d.token[size_t(i)]);
      node_sends_ += seen_[t] ? 0 : 1;
      seen_[t] = 1;
    }
  }
}

void CommExpertExchange::to_experts(const ExpertRoute& route, const float* rows, int64_t width, float* received) {
  const int64_t P = processes();
  send_.assign(size_t(P), 0), recv_.assign(size_t(P), 0);
  int64_t sent = 0, got = 0;
  for (int64_t p = 0; p < P; ++p) {
    send_[size_t(p)] = route.send[size_t(p)] * width;
    for (int64_t e = 0; e < here_; ++e) recv_[size_t(p)] += route.recv[size_t(p * here_ + e)] * width;
    sent += send_[size_t(p)], got += recv_[size_t(p)];
    if (p != group_.rank()) sent_away_ += route.send[size_t(p)];
  }
  group_.all_to_all(std::span<const float>(rows, size_t(sent)), send_, std::span<float>(received, size_t(got)), recv_);
}

void CommExpertExchange::to_tokens(const ExpertRoute& route, const float* rows, int64_t width, float* back) {
  const int64_t P = processes();
  send_.assign(size_t(P), 0), recv_.assign(size_t(P), 0);
  int64_t sent = 0, got = 0;
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t e = 0; e < here_; ++e) send_[size_t(p)] += route.recv[size_t(p * here_ + e)] * width;
    recv_[size_t(p)] = route.send[size_t(p)] * width;
    sent += send_[size_t(p)], got += recv_[size_t(p)];
    if (p != group_.rank()) for (int64_t e = 0; e < here_; ++e) sent_away_ += route.recv[size_t(p * here_ + e)];
  }
  group_.all_to_all(std::span<const float>(rows, size_t(sent)), send_, std::span<float>(back, size_t(got)), recv_);
}

}  // namespace dsv3
