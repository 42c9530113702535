// Learning-rate and batch-size schedules (see schedule.h).
#include "train/schedule.h"

#include <algorithm>
#include <cmath>

namespace dsv3 {

double Schedule::lr_at(int64_t step) const {
  if (warmup_steps > 0 && step <= warmup_steps) return lr * double(step) / double(warmup_steps);
  if (step < decay_start || decay_end <= decay_start) return lr;
  if (step >= decay_end) return min_lr;
  const double t = double(step - decay_start) / double(decay_end - decay_start);
  return min_lr + 0.5 * (lr - min_lr) * (1 + std::cos(M_PI * t));
}

int64_t Schedule::batch_at(int64_t step) const {
  if (batch_ramp_steps <= 0 || batch_start <= 0 || step >= batch_ramp_steps) return batch;
  const double t = double(step) / double(batch_ramp_steps);
  return std::clamp(int64_t(std::llround(double(batch_start) + t * double(batch - batch_start))), int64_t(1), batch);
}

}  // namespace dsv3
