// Training batches from one token stream (documents packed back to back with EOS between
// them, as DeepSeek-V3 packs its pre-training data): windows of S+1 tokens, visited in a
// random order drawn from the seed, epoch after epoch. The position is saved in
// checkpoints, so a resumed run sees the same batches. Depends on std.
#pragma once
#include <cstdint>
#include <random>
#include <span>
#include <vector>

namespace dsv3 {

class BatchSampler {
 public:
  // streams: the shards (spans stay valid while the sampler is used).
  BatchSampler(std::vector<std::span<const uint32_t>> streams, int64_t seq, uint64_t seed);

  // inputs[b*S + i] = window token i, targets[b*S + i] = window token i + 1.
  void next_batch(int64_t batch, int32_t* inputs, int32_t* targets);

  struct Position {
    int64_t epoch = 0, index = 0;
  };
  Position position() const { return pos_; }
  void seek(Position p);
  int64_t windows() const { return windows_; }

 private:
  void shuffle();
  const uint32_t* window(int64_t w) const;
  std::vector<std::span<const uint32_t>> streams_;
  std::vector<int64_t> first_window_;  // per stream, prefix sums of its windows
  int64_t seq_, windows_ = 0;
  uint64_t seed_;
  Position pos_;
  std::vector<int64_t> order_;
};

}  // namespace dsv3
