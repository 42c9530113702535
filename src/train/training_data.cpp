// Epoch orders (see training_data.h).
#include "train/training_data.h"

#include <numeric>
#include <random>

#include "core/error.h"

namespace dsv3 {

EpochOrder::EpochOrder(int64_t n, uint64_t seed) : n_(n), seed_(seed) {
  if (n <= 0) fail("training data: no items");
  shuffle();
}

void EpochOrder::shuffle() {
  order_.resize(size_t(n_));
  std::iota(order_.begin(), order_.end(), 0);
  std::mt19937_64 rng(seed_ * 1000003 + uint64_t(pos_.epoch));
  for (int64_t i = n_ - 1; i > 0; --i) std::swap(order_[size_t(i)], order_[size_t(rng() % uint64_t(i + 1))]);
}

void EpochOrder::seek(DataPosition p) {
  if (p.epoch < 0 || p.index < 0 || p.index >= n_) fail("data position (", p.epoch, ", ", p.index, ") out of range");
  pos_ = p;
  shuffle();
}

int64_t EpochOrder::next() {
  const int64_t item = order_[size_t(pos_.index)];
  if (++pos_.index == n_) {
    pos_.index = 0;
    ++pos_.epoch;
    shuffle();
  }
  return item;
}

void TrainingData::next_batch(int64_t, int32_t*, int32_t*, int64_t*) {
  fail("this training data has no token batches (it feeds another objective)");
}

}  // namespace dsv3
