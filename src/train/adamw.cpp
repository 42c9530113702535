// AdamW and gradient clipping over flat buffers (see adamw.h).
#include "train/adamw.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "core/dtype.h"
#include "core/error.h"

namespace dsv3 {

AdamW::AdamW(const ModelConfig& c, const AdamWConfig& cfg) : cfg_(cfg) {
  // The MTP module shares the embedding and the output head with the main model (one
  // tensor, two names): tied copies are left out, so each tensor is updated once.
  const FlatLayout layout = flat_layout(c, DType::f32, MtpTying::tied);
  flat_numel_ = layout.numel;
  for (const FlatTensor& t : layout.tensors)
    if (t.trainable && !t.tied) segments_.push_back({t.name, t.shape, t.offset, t.numel, t.shape.size() == 2});
  const size_t n = size_t(flat_numel_);
  if (cfg.bf16_moments) m16_.assign(n, 0), v16_.assign(n, 0);
  else m32_.assign(n, 0.0f), v32_.assign(n, 0.0f);
  step_.resize(segments_.size());
  all_segments_ = segments_;
  hi_ = flat_numel_;
}

void AdamW::shard(int64_t lo, int64_t hi) {
  if (sharded_) fail("AdamW: already sharded");
  if (lo < 0 || hi > flat_numel_ || lo > hi) fail("AdamW: shard [", lo, ", ", hi, ") is outside the ", flat_numel_, " elements");
  std::vector<Segment> mine;
  for (const Segment& seg : all_segments_) {
    const int64_t a = std::max(seg.offset, lo), b = std::min(seg.offset + seg.n, hi);
    if (a < b) mine.push_back({seg.name, seg.shape, a, b - a, seg.decay});
  }
  segments_ = std::move(mine);
  step_.resize(segments_.size());
  auto keep = [&](auto& v) { v = std::vector<typename std::decay_t<decltype(v)>::value_type>(v.begin() + lo, v.begin() + hi); };
  if (cfg_.bf16_moments) keep(m16_), keep(v16_);
  else keep(m32_), keep(v32_);
  lo_ = lo, hi_ = hi, sharded_ = true;
}

AdamW AdamW::gathered(dist::Communicator& comm, const std::vector<int64_t>& counts) const {
  if (!sharded_) return *this;
  const int64_t mine = hi_ - lo_;
  int64_t total = 0;
  for (int64_t n : counts) total += n;
  if (int64_t(counts.size()) != comm.size() || total != flat_numel_ || counts[size_t(comm.rank())] != mine)
    fail("AdamW: the shards' counts do not cover the ", flat_numel_, " elements with this rank's ", mine);
  AdamW out = *this;
  out.segments_ = all_segments_, out.step_.resize(all_segments_.size());
  out.sharded_ = false, out.lo_ = 0, out.hi_ = flat_numel_;
  // Only rank 0 holds the whole moments (the point of ZeRO-1 is that no rank must).
  const bool root = comm.rank() == 0;
  out.m16_.clear(), out.v16_.clear(), out.m32_.clear(), out.v32_.clear();
  std::vector<float> part(static_cast<size_t>(mine)), whole(root ? static_cast<size_t>(flat_numel_) : 0);
  for (int which = 0; which < 2; ++which) {
    for (int64_t i = 0; i < mine; ++i)
      part[size_t(i)] = cfg_.bf16_moments ? bf16_to_f32((which ? v16_ : m16_)[size_t(i)]) : (which ? v32_ : m32_)[size_t(i)];
    comm.gather(part, whole, counts, 0);
    if (!root) continue;
    if (cfg_.bf16_moments) {
      auto& dst = which ? out.v16_ : out.m16_;
      dst.resize(size_t(flat_numel_));
      for (int64_t i = 0; i < flat_numel_; ++i) dst[size_t(i)] = f32_to_bf16(whole[size_t(i)]);  // exact: BF16 values
    } else {
      (which ? out.v32_ : out.m32_) = whole;
    }
  }
  return out;
}

void AdamW::check_layout(const ModelWeights& w, const char* what) const {
  const FlatWeights& f = w.flat;
  if (!f.data || f.dtype != DType::f32 || f.mtp != MtpTying::tied || f.numel != flat_numel_)
    fail("AdamW: the ", what, " are not laid out as allocate_weights(config, F32, MtpTying::tied) lays out ",
         "this model (", flat_numel_, " elements; they have ", f.numel, ")");
}

void AdamW::update(ModelWeights& params, const ModelWeights& grads, double lr, int64_t step) {
  check_layout(params, "parameters");
  check_layout(grads, "gradients");
  const double bc1 = 1 - std::pow(cfg_.beta1, double(step)), bc2 = 1 - std::pow(cfg_.beta2, double(step));
  const AdamWStep s{float(cfg_.beta1), float(cfg_.beta2), float(cfg_.eps), float(lr), float(1 / bc1),
                    float(1 / std::sqrt(bc2))};
  const float decay = float(1 - lr * cfg_.weight_decay);
  float* w = params.flat.as<float>().data();
  const float* g = grads.flat.as<float>().data();
  for (size_t i = 0; i < segments_.size(); ++i) {
    const Segment& seg = segments_[i];
    AdamWTensor& x = step_[i];
    x = {w + seg.offset, g + seg.offset, seg.n, seg.decay ? decay : 1.0f};
    const int64_t k = seg.offset - lo_;  // the moments hold the shard only
    if (cfg_.bf16_moments) x.m16 = m16_.data() + k, x.v16 = v16_.data() + k;
    else x.m32 = m32_.data() + k, x.v32 = v32_.data() + k;
  }
  adamw_step(step_.data(), step_.size(), s);
}

std::vector<FloatSpan> AdamW::trainable_spans(ModelWeights& w) const {
  check_layout(w, "weights");
  float* base = w.flat.as<float>().data();
  std::vector<FloatSpan> out;
  out.reserve(segments_.size());
  for (const Segment& seg : segments_) out.push_back({base + seg.offset, seg.n});
  return out;
}

std::vector<AdamW::NamedTensor> AdamW::state(const ModelConfig&) const {
  if (sharded_) fail("AdamW: a sharded optimizer's state is gathered() first");
  std::vector<NamedTensor> out;
  for (const Segment& seg : segments_) {
    NamedTensor em{"exp_avg." + seg.name, seg.shape, {}}, ev{"exp_avg_sq." + seg.name, seg.shape, {}};
    em.values.resize(size_t(seg.n)), ev.values.resize(size_t(seg.n));
    for (int64_t i = 0; i < seg.n; ++i) {
      const size_t k = size_t(seg.offset + i);
      em.values[size_t(i)] = cfg_.bf16_moments ? bf16_to_f32(m16_[k]) : m32_[k];
      ev.values[size_t(i)] = cfg_.bf16_moments ? bf16_to_f32(v16_[k]) : v32_[k];
    }
    out.push_back(std::move(em));
    out.push_back(std::move(ev));
  }
  return out;
}

void AdamW::load_state(const ModelConfig&, const std::vector<NamedTensor>& tensors) {
  if (sharded_) fail("AdamW: load the state before sharding");
  if (tensors.size() != 2 * segments_.size())
    fail("optimizer state: ", tensors.size(), " tensors, expected ", 2 * segments_.size());
  for (size_t t = 0; t < segments_.size(); ++t) {
    const Segment& seg = segments_[t];
    const NamedTensor& em = tensors[2 * t];
    const NamedTensor& ev = tensors[2 * t + 1];
    if (em.name != "exp_avg." + seg.name || ev.name != "exp_avg_sq." + seg.name)
      fail("optimizer state: found ", em.name, ", expected exp_avg.", seg.name);
    if (int64_t(em.values.size()) != seg.n || int64_t(ev.values.size()) != seg.n)
      fail("optimizer state: ", em.name, " has the wrong size");
    for (int64_t i = 0; i < seg.n; ++i) {
      const size_t k = size_t(seg.offset + i);
      if (cfg_.bf16_moments) m16_[k] = f32_to_bf16(em.values[size_t(i)]), v16_[k] = f32_to_bf16(ev.values[size_t(i)]);
      else m32_[k] = em.values[size_t(i)], v32_[k] = ev.values[size_t(i)];
    }
  }
}

double clip_grad_norm(std::span<const FloatSpan> grads, double max_norm) {
  const double norm = std::sqrt(sum_of_squares(grads.data(), grads.size()));
  if (max_norm > 0 && norm > max_norm) scale_spans(grads.data(), grads.size(), float(max_norm / (norm + 1e-6)));
  return norm;
}

void zero_grads(ModelWeights& grads) {
  if (!grads.flat.data || grads.flat.dtype != DType::f32)
    fail("zero_grads: the gradients are not a flat float32 allocation (allocate_weights(config, F32))");
  const FloatSpan all{grads.flat.as<float>().data(), grads.flat.numel};
  zero_spans(&all, 1);
}

}  // namespace dsv3
