// AdamW and gradient clipping (see adamw.h).
#include "train/adamw.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "backend/optimizer.h"
#include "core/dtype.h"
#include "core/error.h"

namespace dsv3 {

namespace {

// The trainable tensors, each storage once (the MTP module shares the embedding and the
// output head with the main model: one tensor, two names).
ModelWeights tied_shape(const ModelConfig& c) {
  ModelWeights w = allocate_weights(c, DType::f32);
  tie_mtp_shared(w);
  return w;
}

std::vector<TensorSlot> unique_trainable(const ModelConfig& c, ModelWeights& w) {
  std::vector<TensorSlot> out;
  std::set<const uint8_t*> seen;
  for (const TensorSlot& s : list_tensors(c, w))
    if (s.trainable && seen.insert(s.mat->data).second) out.push_back(s);
  return out;
}

}  // namespace

AdamW::AdamW(const ModelConfig& c, const AdamWConfig& cfg) : cfg_(cfg) {
  // The layout (names, shapes) is recorded once here; state() and load_state() use it.
  ModelWeights shape = tied_shape(c);
  for (const TensorSlot& s : unique_trainable(c, shape)) {
    Moments m;
    m.name = s.name;
    m.shape = s.shape;
    const size_t n = size_t(s.mat->numel());
    if (cfg.bf16_moments) m.m16.assign(n, 0), m.v16.assign(n, 0);
    else m.m32.assign(n, 0.0f), m.v32.assign(n, 0.0f);
    moments_.push_back(std::move(m));
  }
}

void AdamW::update(const ModelConfig& c, ModelWeights& params, const ModelWeights& grads, double lr, int64_t step) {
  const auto p = unique_trainable(c, params);
  const auto g = unique_trainable(c, const_cast<ModelWeights&>(grads));
  if (p.size() != moments_.size() || g.size() != p.size()) fail("AdamW: parameter list changed");
  const double bc1 = 1 - std::pow(cfg_.beta1, double(step)), bc2 = 1 - std::pow(cfg_.beta2, double(step));
  const AdamWStep s{float(cfg_.beta1), float(cfg_.beta2), float(cfg_.eps), float(lr), float(1 / bc1),
                    float(1 / std::sqrt(bc2))};
  std::vector<AdamWTensor> tensors;
  for (size_t t = 0; t < p.size(); ++t) {
    Moments& m = moments_[t];
    const bool decay = p[t].shape.size() == 2;  // matrices decay; norm weights do not
    AdamWTensor x{mutable_data<float>(*p[t].mat), g[t].mat->as<float>(), p[t].mat->numel(),
                  decay ? float(1 - lr * cfg_.weight_decay) : 1.0f};
    if (cfg_.bf16_moments) x.m16 = m.m16.data(), x.v16 = m.v16.data();
    else x.m32 = m.m32.data(), x.v32 = m.v32.data();
    tensors.push_back(x);
  }
  adamw_step(tensors.data(), tensors.size(), s);
}

std::vector<AdamW::NamedTensor> AdamW::state(const ModelConfig&) const {
  std::vector<NamedTensor> out;
  for (const Moments& m : moments_) {
    NamedTensor em{"exp_avg." + m.name, m.shape, {}}, ev{"exp_avg_sq." + m.name, m.shape, {}};
    const size_t n = cfg_.bf16_moments ? m.m16.size() : m.m32.size();
    em.values.resize(n), ev.values.resize(n);
    for (size_t i = 0; i < n; ++i) {
      em.values[i] = cfg_.bf16_moments ? bf16_to_f32(m.m16[i]) : m.m32[i];
      ev.values[i] = cfg_.bf16_moments ? bf16_to_f32(m.v16[i]) : m.v32[i];
    }
    out.push_back(std::move(em));
    out.push_back(std::move(ev));
  }
  return out;
}

void AdamW::load_state(const ModelConfig&, const std::vector<NamedTensor>& tensors) {
  if (tensors.size() != 2 * moments_.size())
    fail("optimizer state: ", tensors.size(), " tensors, expected ", 2 * moments_.size());
  for (size_t t = 0; t < moments_.size(); ++t) {
    Moments& m = moments_[t];
    const NamedTensor& em = tensors[2 * t];
    const NamedTensor& ev = tensors[2 * t + 1];
    if (em.name != "exp_avg." + m.name || ev.name != "exp_avg_sq." + m.name)
      fail("optimizer state: found ", em.name, ", expected exp_avg.", m.name);
    const size_t n = cfg_.bf16_moments ? m.m16.size() : m.m32.size();
    if (em.values.size() != n || ev.values.size() != n) fail("optimizer state: ", em.name, " has the wrong size");
    for (size_t i = 0; i < n; ++i) {
      if (cfg_.bf16_moments) m.m16[i] = f32_to_bf16(em.values[i]), m.v16[i] = f32_to_bf16(ev.values[i]);
      else m.m32[i] = em.values[i], m.v32[i] = ev.values[i];
    }
  }
}

namespace {

std::vector<FloatSpan> spans(const std::vector<TensorSlot>& slots) {
  std::vector<FloatSpan> out;
  for (const TensorSlot& s : slots) out.push_back({mutable_data<float>(*s.mat), s.mat->numel()});
  return out;
}

}  // namespace

double clip_grad_norm(const ModelConfig& c, ModelWeights& grads, double max_norm) {
  const auto g = spans(unique_trainable(c, grads));
  const double norm = std::sqrt(sum_of_squares(g.data(), g.size()));
  if (max_norm > 0 && norm > max_norm) scale_spans(g.data(), g.size(), float(max_norm / (norm + 1e-6)));
  return norm;
}

void zero_grads(const ModelConfig& c, ModelWeights& grads) {
  std::vector<TensorSlot> all;
  std::set<const uint8_t*> seen;
  for (const TensorSlot& s : list_tensors(c, grads))
    if (seen.insert(s.mat->data).second) all.push_back(s);
  const auto z = spans(all);
  zero_spans(z.data(), z.size());
}

}  // namespace dsv3
