// Pre-training batches from token streams (documents packed back to back with EOS between
// them, as DeepSeek-V3 packs its pre-training data): windows of S+1 tokens, visited in a
// random order drawn from the seed, epoch after epoch (EpochOrder). Depends on std.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

#include "train/training_data.h"

namespace dsv3 {

class BatchSampler : public TrainingData {
 public:
  using Position = DataPosition;
  // streams: the shards (spans stay valid while the sampler is used).
  BatchSampler(std::vector<std::span<const uint32_t>> streams, int64_t seq, uint64_t seed);

  // inputs[b*S + i] = window token i, targets[b*S + i] = window token i + 1; lengths S.
  void next_batch(int64_t batch, int32_t* inputs, int32_t* targets, int64_t* lengths = nullptr) override;
  DataPosition position() const override { return order_.position(); }
  void seek(DataPosition p) override { order_.seek(p); }
  int64_t size() const override { return order_.size(); }
  int64_t windows() const { return order_.size(); }

 private:
  static int64_t count_windows(const std::vector<std::span<const uint32_t>>& streams, int64_t seq);
  const uint32_t* window(int64_t w) const;
  std::vector<std::span<const uint32_t>> streams_;
  std::vector<int64_t> first_window_;  // per stream, prefix sums of its windows
  int64_t seq_;
  EpochOrder order_;
};

}  // namespace dsv3
