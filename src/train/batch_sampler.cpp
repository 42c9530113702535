// Window sampling (see batch_sampler.h).
#include "train/batch_sampler.h"

#include <algorithm>
#include <numeric>

#include "core/error.h"

namespace dsv3 {

BatchSampler::BatchSampler(std::vector<std::span<const uint32_t>> streams, int64_t seq, uint64_t seed)
    : streams_(std::move(streams)), seq_(seq), seed_(seed) {
  if (seq <= 0) fail("sequence length must be positive");
  int64_t total = 0;
  for (const auto& s : streams_) {
    first_window_.push_back(windows_);
    windows_ += s.size() > 0 ? (int64_t(s.size()) - 1) / seq : 0;
    total += int64_t(s.size());
  }
  if (windows_ <= 0) fail("the data has ", total, " tokens: not enough for one sequence of ", seq + 1);
  shuffle();
}

const uint32_t* BatchSampler::window(int64_t w) const {
  size_t s = size_t(std::upper_bound(first_window_.begin(), first_window_.end(), w) - first_window_.begin()) - 1;
  return streams_[s].data() + (w - first_window_[s]) * seq_;
}

void BatchSampler::shuffle() {
  order_.resize(size_t(windows_));
  std::iota(order_.begin(), order_.end(), 0);
  std::mt19937_64 rng(seed_ * 1000003 + uint64_t(pos_.epoch));
  for (int64_t i = windows_ - 1; i > 0; --i) std::swap(order_[size_t(i)], order_[size_t(rng() % uint64_t(i + 1))]);
}

void BatchSampler::seek(Position p) {
  if (p.epoch < 0 || p.index < 0 || p.index >= windows_) fail("data position (", p.epoch, ", ", p.index, ") out of range");
  pos_ = p;
  shuffle();
}

void BatchSampler::next_batch(int64_t batch, int32_t* inputs, int32_t* targets) {
  for (int64_t b = 0; b < batch; ++b) {
    const uint32_t* w = window(order_[size_t(pos_.index)]);
    for (int64_t i = 0; i < seq_; ++i) {
      inputs[b * seq_ + i] = int32_t(w[i]);
      targets[b * seq_ + i] = int32_t(w[i + 1]);
    }
    if (++pos_.index == windows_) {
      pos_.index = 0;
      ++pos_.epoch;
      shuffle();
    }
  }
}

}  // namespace dsv3
