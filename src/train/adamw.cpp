// AdamW and gradient clipping (see adamw.h).
#include "train/adamw.h"

#include <algorithm>
#include <cmath>
#include <set>

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

namespace {

// A piece of one tensor: updates run as one parallel loop over the pieces of all tensors,
// so the many small tensors (norms, experts) use every thread too.
struct Piece {
  size_t tensor;
  int64_t begin, end;
};

std::vector<Piece> pieces(const std::vector<TensorSlot>& slots) {
  constexpr int64_t kPiece = 16384;
  std::vector<Piece> out;
  for (size_t t = 0; t < slots.size(); ++t)
    for (int64_t b = 0; b < slots[t].mat->numel(); b += kPiece)
      out.push_back({t, b, std::min(slots[t].mat->numel(), b + kPiece)});
  return out;
}

}  // namespace

void AdamW::update(const ModelConfig& c, ModelWeights& params, const ModelWeights& grads, double lr, int64_t step) {
  const auto p = unique_trainable(c, params);
  const auto g = unique_trainable(c, const_cast<ModelWeights&>(grads));
  if (p.size() != moments_.size() || g.size() != p.size()) fail("AdamW: parameter list changed");
  const double bc1 = 1 - std::pow(cfg_.beta1, double(step)), bc2 = 1 - std::pow(cfg_.beta2, double(step));
  const float b1 = float(cfg_.beta1), b2 = float(cfg_.beta2), eps = float(cfg_.eps), step_lr = float(lr);
  const float inv_bc1 = float(1 / bc1), inv_sqrt_bc2 = float(1 / std::sqrt(bc2));
  const auto work = pieces(p);
#pragma omp parallel for schedule(dynamic, 8)
  for (size_t q = 0; q < work.size(); ++q) {
    const Piece& pc = work[q];
    float* w = mutable_data<float>(*p[pc.tensor].mat);
    const float* gr = g[pc.tensor].mat->as<float>();
    Moments& m = moments_[pc.tensor];
    const bool decay = p[pc.tensor].shape.size() == 2;  // matrices decay; norm weights do not
    const float decay_factor = decay ? float(1 - lr * cfg_.weight_decay) : 1.0f;
    for (int64_t i = pc.begin; i < pc.end; ++i) {
      float mi, vi;
      if (cfg_.bf16_moments) mi = bf16_to_f32(m.m16[size_t(i)]), vi = bf16_to_f32(m.v16[size_t(i)]);
      else mi = m.m32[size_t(i)], vi = m.v32[size_t(i)];
      mi = b1 * mi + (1 - b1) * gr[i];
      vi = b2 * vi + (1 - b2) * gr[i] * gr[i];
      if (cfg_.bf16_moments) m.m16[size_t(i)] = f32_to_bf16(mi), m.v16[size_t(i)] = f32_to_bf16(vi);
      else m.m32[size_t(i)] = mi, m.v32[size_t(i)] = vi;
      w[i] = w[i] * decay_factor - step_lr * (mi * inv_bc1) / (std::sqrt(vi) * inv_sqrt_bc2 + eps);
    }
  }
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

double clip_grad_norm(const ModelConfig& c, ModelWeights& grads, double max_norm) {
  const auto g = unique_trainable(c, grads);
  const auto work = pieces(g);
  // Per-piece sums added in a fixed order, so the norm does not depend on the threads.
  std::vector<double> part(work.size());
#pragma omp parallel for schedule(dynamic, 8)
  for (size_t q = 0; q < work.size(); ++q) {
    const float* x = g[work[q].tensor].mat->as<float>();
    double ss = 0;
    for (int64_t i = work[q].begin; i < work[q].end; ++i) ss += double(x[i]) * x[i];
    part[q] = ss;
  }
  double ss = 0;
  for (double v : part) ss += v;
  const double norm = std::sqrt(ss);
  if (max_norm > 0 && norm > max_norm) {
    const float k = float(max_norm / (norm + 1e-6));
#pragma omp parallel for schedule(dynamic, 8)
    for (size_t q = 0; q < work.size(); ++q) {
      float* x = mutable_data<float>(*g[work[q].tensor].mat);
      for (int64_t i = work[q].begin; i < work[q].end; ++i) x[i] *= k;
    }
  }
  return norm;
}

void zero_grads(const ModelConfig& c, ModelWeights& grads) {
  std::vector<TensorSlot> all;
  std::set<const uint8_t*> seen;
  for (const TensorSlot& s : list_tensors(c, grads))
    if (seen.insert(s.mat->data).second) all.push_back(s);
  const auto work = pieces(all);
#pragma omp parallel for schedule(dynamic, 8)
  for (size_t q = 0; q < work.size(); ++q) {
    float* x = mutable_data<float>(*all[work[q].tensor].mat);
    std::fill(x + work[q].begin, x + work[q].end, 0.0f);
  }
}

}  // namespace dsv3
