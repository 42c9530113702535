// What a training run reads, and where it is: items (pre-training windows, conversations,
// GRPO prompts) visited in a random order drawn per epoch from the seed, epoch after epoch.
// The position is saved in checkpoints, so a resumed run reads what the uninterrupted run
// would have. Depends on std.
#pragma once
#include <cstdint>
#include <vector>

namespace dsv3 {

struct DataPosition {
  int64_t epoch = 0, index = 0;  // index: items of this epoch already read
};

// A permutation of 0..n-1 per epoch, from (seed, epoch) alone.
class EpochOrder {
 public:
  EpochOrder(int64_t n, uint64_t seed);
  int64_t next();  // the next item; moves on to the next epoch after the last
  DataPosition position() const { return pos_; }
  void seek(DataPosition p);  // Error if out of range
  int64_t size() const { return n_; }

 private:
  void shuffle();
  int64_t n_;
  uint64_t seed_;
  DataPosition pos_;
  std::vector<int64_t> order_;
};

// A source of training items for Trainer.
class TrainingData {
 public:
  virtual ~TrainingData() = default;
  // Items in one epoch: a resumed run checks it against the checkpoint's (same data).
  virtual int64_t size() const = 0;
  virtual DataPosition position() const = 0;
  virtual void seek(DataPosition p) = 0;
  // The next `batch` sequences of the source's length S: inputs and targets [batch * S]
  // (target -1: no loss), and each sequence's real positions (lengths [batch]; the rest is
  // padding). Sources that feed another objective (GRPO's prompts) have none.
  virtual void next_batch(int64_t batch, int32_t* inputs, int32_t* targets, int64_t* lengths);
};

}  // namespace dsv3
