// DeepSeek-V3's learning-rate and batch-size schedules (§4.2), scaled to a run's length:
// linear warmup to lr, constant, cosine decay to min_lr, then constant min_lr; the batch
// size ramps linearly from batch_start to batch over the first ramp steps. Depends on std.
#pragma once
#include <cstdint>

namespace dsv3 {

struct Schedule {
  double lr = 2.2e-4, min_lr = 2.2e-5;  // the paper's peak and end values
  int64_t warmup_steps = 2000;          // the paper: 2K steps
  int64_t decay_start = 0, decay_end = 0;  // cosine decay over [decay_start, decay_end)
  int64_t batch = 0, batch_start = 0, batch_ramp_steps = 0;

  double lr_at(int64_t step) const;       // step counts from 1
  int64_t batch_at(int64_t step) const;   // sequences per step
};

}  // namespace dsv3
