// Window sampling (see batch_sampler.h).
#include "train/batch_sampler.h"

#include <algorithm>

#include "core/error.h"

namespace dsv3 {

int64_t BatchSampler::count_windows(const std::vector<std::span<const uint32_t>>& streams, int64_t seq) {
  if (seq <= 0) fail("sequence length must be positive");
  int64_t windows = 0, total = 0;
  for (const auto& s : streams) {
    windows += s.size() > 0 ? (int64_t(s.size()) - 1) / seq : 0;
    total += int64_t(s.size());
  }
  if (windows <= 0) fail("the data has ", total, " tokens: not enough for one sequence of ", seq + 1);
  return windows;
}

BatchSampler::BatchSampler(std::vector<std::span<const uint32_t>> streams, int64_t seq, uint64_t seed)
    : streams_(std::move(streams)), seq_(seq), order_(count_windows(streams_, seq), seed) {
  int64_t windows = 0;
  for (const auto& s : streams_) {
    first_window_.push_back(windows);
    windows += s.size() > 0 ? (int64_t(s.size()) - 1) / seq : 0;
  }
}

const uint32_t* BatchSampler::window(int64_t w) const {
  size_t s = size_t(std::upper_bound(first_window_.begin(), first_window_.end(), w) - first_window_.begin()) - 1;
  return streams_[s].data() + (w - first_window_[s]) * seq_;
}

void BatchSampler::next_batch(int64_t batch, int32_t* inputs, int32_t* targets, int64_t* lengths) {
  for (int64_t b = 0; b < batch; ++b) {
    if (lengths) lengths[b] = seq_;
    const uint32_t* w = window(order_.next());
    for (int64_t i = 0; i < seq_; ++i) {
      inputs[b * seq_ + i] = int32_t(w[i]);
      targets[b * seq_ + i] = int32_t(w[i + 1]);
    }
  }
}

}  // namespace dsv3
