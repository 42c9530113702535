// The tensor list and the loader (see weights.h).
#include "model/weights.h"

#include <cmath>
#include <cstring>
#include <algorithm>
#include <set>

#include "core/error.h"
#include "io/checkpoint.h"

namespace dsv3 {

namespace {

struct Lister {
  const ModelConfig& c;
  const std::function<void(const TensorSlot&)>& fn;
  bool in_mtp = false;

  void mat(const std::string& name, Mat& m, int64_t rows, int64_t cols, bool quantizable,
           const Mat* copy_of = nullptr) {
    fn(TensorSlot{name, {rows, cols}, &m, quantizable, true, in_mtp, copy_of});
  }
  void vec(const std::string& name, Mat& v, int64_t n, bool trainable = true) {
    fn(TensorSlot{name, {n}, &v, false, trainable, in_mtp});
  }

  void mlp(const std::string& p, MlpWeights& w, int64_t inter) {
    mat(p + "gate_proj.weight", w.gate_proj, inter, c.hidden_size, true);
    mat(p + "up_proj.weight", w.up_proj, inter, c.hidden_size, true);
    mat(p + "down_proj.weight", w.down_proj, c.hidden_size, inter, true);
  }

  void layer(const std::string& p, int64_t index, LayerWeights& w) {
    const int64_t h = c.num_attention_heads;
    vec(p + "input_layernorm.weight", w.input_layernorm, c.hidden_size);
    const std::string a = p + "self_attn.";
    if (c.q_lora_rank > 0) {
      mat(a + "q_a_proj.weight", w.self_attn.q_a_proj, c.q_lora_rank, c.hidden_size, true);
      vec(a + "q_a_layernorm.weight", w.self_attn.q_a_layernorm, c.q_lora_rank);
      mat(a + "q_b_proj.weight", w.self_attn.q_b_proj, h * c.qk_head_dim(), c.q_lora_rank, true);
    } else {
      mat(a + "q_proj.weight", w.self_attn.q_proj, h * c.qk_head_dim(), c.hidden_size, true);
    }
    mat(a + "kv_a_proj_with_mqa.weight", w.self_attn.kv_a_proj_with_mqa, c.kv_lora_rank + c.qk_rope_head_dim,
        c.hidden_size, true);
    vec(a + "kv_a_layernorm.weight", w.self_attn.kv_a_layernorm, c.kv_lora_rank);
    mat(a + "kv_b_proj.weight", w.self_attn.kv_b_proj, h * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank, true);
    mat(a + "o_proj.weight", w.self_attn.o_proj, c.hidden_size, h * c.v_head_dim, true);
    vec(p + "post_attention_layernorm.weight", w.post_attention_layernorm, c.hidden_size);
    if (!w.is_moe) {
      mlp(p + "mlp.", w.mlp, c.intermediate_size);
      return;
    }
    mat(p + "mlp.gate.weight", w.moe.gate, c.n_routed_experts, c.hidden_size, false);
    if (c.topk_method == TopkMethod::noaux_tc)
      vec(p + "mlp.gate.e_score_correction_bias", w.moe.e_score_correction_bias, c.n_routed_experts, false);
    for (int64_t e = 0; e < c.n_routed_experts; ++e)
      mlp(p + "mlp.experts." + std::to_string(e) + ".", w.moe.experts[size_t(e)], c.moe_intermediate_size);
    if (c.n_shared_experts > 0)
      mlp(p + "mlp.shared_experts.", w.moe.shared_experts, c.n_shared_experts * c.moe_intermediate_size);
  }
};

void shape_layer(const ModelConfig& c, int64_t index, LayerWeights& l) {
  l.is_moe = c.is_moe_layer(index);
  if (l.is_moe) l.moe.experts.resize(size_t(c.n_routed_experts));
}

// Whether w is shaped as ModelWeights(c) shapes it; the first difference, or "".
std::string shape_difference(const ModelConfig& c, const ModelWeights& w) {
  if (int64_t(w.layers.size()) != c.num_hidden_layers)
    return cat(w.layers.size(), " layers, config.json has ", c.num_hidden_layers);
  if (int64_t(w.mtp.size()) != c.num_nextn_predict_layers)
    return cat(w.mtp.size(), " MTP modules, config.json has ", c.num_nextn_predict_layers);
  for (int64_t i = 0; i < c.num_hidden_layers + c.num_nextn_predict_layers; ++i) {
    const LayerWeights& l = i < c.num_hidden_layers ? w.layers[size_t(i)] : w.mtp[size_t(i - c.num_hidden_layers)].block;
    const int64_t experts = c.is_moe_layer(i) ? c.n_routed_experts : 0;
    if (l.is_moe != c.is_moe_layer(i) || int64_t(l.moe.experts.size()) != experts)
      return cat("layer ", i, " ", l.is_moe ? "MoE" : "dense", " with ", l.moe.experts.size(),
                 " routed experts, config.json has ", c.is_moe_layer(i) ? "MoE" : "dense", " with ", experts);
  }
  return "";
}

}  // namespace

ModelWeights::ModelWeights(const ModelConfig& c) {
  layers.resize(size_t(c.num_hidden_layers));
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) shape_layer(c, i, layers[size_t(i)]);
  mtp.resize(size_t(c.num_nextn_predict_layers));
  for (int64_t k = 0; k < c.num_nextn_predict_layers; ++k) shape_layer(c, c.num_hidden_layers + k, mtp[size_t(k)].block);
}

void for_each_tensor(const ModelConfig& c, ModelWeights& w, const std::function<void(const TensorSlot&)>& fn) {
  if (const std::string d = shape_difference(c, w); !d.empty())
    fail("for_each_tensor: the weights are not shaped for this config (", d,
         "); construct them with ModelWeights(config), load_weights or allocate_weights");
  Lister l{c, fn};
  l.mat("model.embed_tokens.weight", w.embed_tokens, c.vocab_size, c.hidden_size, false);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i)
    l.layer("model.layers." + std::to_string(i) + ".", i, w.layers[size_t(i)]);
  l.vec("model.norm.weight", w.norm, c.hidden_size);
  if (!c.tie_word_embeddings) l.mat("lm_head.weight", w.lm_head, c.vocab_size, c.hidden_size, false);
  l.in_mtp = true;
  for (int64_t k = 0; k < c.num_nextn_predict_layers; ++k) {
    const int64_t index = c.num_hidden_layers + k;
    const std::string p = "model.layers." + std::to_string(index) + ".";
    MtpWeights& m = w.mtp[size_t(k)];
    l.mat(p + "embed_tokens.weight", m.embed_tokens, c.vocab_size, c.hidden_size, false, &w.embed_tokens);
    l.vec(p + "enorm.weight", m.enorm, c.hidden_size);
    l.vec(p + "hnorm.weight", m.hnorm, c.hidden_size);
    l.mat(p + "eh_proj.weight", m.eh_proj, c.hidden_size, 2 * c.hidden_size, false);
    l.layer(p, index, m.block);
    l.vec(p + "shared_head.norm.weight", m.shared_head_norm, c.hidden_size);
    l.mat(p + "shared_head.head.weight", m.shared_head_head, c.vocab_size, c.hidden_size, false,
          c.tie_word_embeddings ? &w.embed_tokens : &w.lm_head);
  }
}

namespace {

float element_as_float(const TensorView& v, int64_t i) {
  uint16_t h;
  switch (v.dtype) {
    case DType::f32: {
      float f;
      std::memcpy(&f, v.data + 4 * i, 4);
      return f;
    }
    case DType::bf16: std::memcpy(&h, v.data + 2 * i, 2); return bf16_to_f32(h);
    case DType::f16: std::memcpy(&h, v.data + 2 * i, 2); return f16_to_f32(h);
    default: return NAN;
  }
}

}  // namespace

std::vector<TensorSlot> list_tensors(const ModelConfig& c, ModelWeights& w) {
  std::vector<TensorSlot> out;
  for_each_tensor(c, w, [&](const TensorSlot& s) { out.push_back(s); });
  return out;
}

namespace {

// Owned storage of n elements of dtype t, zeroed, kept alive by w.
uint8_t* own(ModelWeights& w, DType t, int64_t n) {
  const size_t bytes = size_t(n) * dtype_size(t);
  w.storage.push_back(std::make_unique<uint8_t[]>(std::max<size_t>(bytes, 1)));
  std::memset(w.storage.back().get(), 0, bytes);
  return w.storage.back().get();
}

Mat shape_mat(const TensorSlot& s) {
  return s.shape.size() == 1 ? Mat{DType::f32, 1, s.shape[0]} : Mat{DType::f32, s.shape[0], s.shape[1]};
}

}  // namespace

ModelWeights load_weights(const ModelConfig& c, const Checkpoint& ckpt) {
  ModelWeights w(c);
  std::set<std::string> used;
  for_each_tensor(c, w, [&](const TensorSlot& s) {
    const TensorView* v = ckpt.find(s.name);
    if (!v) fail(ckpt.dir(), ": tensor ", s.name, " is missing");
    const std::string where = cat(ckpt.file_of(s.name), ": tensor ", s.name);
    if (v->shape != s.shape)
      fail(where, ": shape ", shape_str(v->shape), " but config.json implies ", shape_str(s.shape));
    used.insert(s.name);
    Mat& m = *s.mat;
    m = shape_mat(s);
    if (s.shape.size() == 1) {  // vectors: converted to float32 once
      if (v->dtype != DType::f32 && v->dtype != DType::bf16 && v->dtype != DType::f16)
        fail(where, ": dtype ", dtype_name(v->dtype), " is not supported for this tensor (F32, BF16, F16)");
      float* f = reinterpret_cast<float*>(own(w, DType::f32, v->numel()));
      for (int64_t i = 0; i < v->numel(); ++i) f[i] = element_as_float(*v, i);
      m.data = reinterpret_cast<const uint8_t*>(f);
      return;
    }
    m.dtype = v->dtype;
    m.data = v->data;
    if (v->dtype == DType::f8_e4m3) {
      if (!s.fp8_quantizable) fail(where, ": F8_E4M3 is not expected for this tensor (stored in BF16 in DeepSeek-V3)");
      if (!c.fp8_weights) fail(where, ": is F8_E4M3 but config.json has no fp8 quantization_config");
      const std::string sname = s.name + "_scale_inv";
      const TensorView* sv = ckpt.find(sname);
      if (!sv) fail(ckpt.dir(), ": tensor ", sname, " is missing (FP8 weight ", s.name, " needs it)");
      const std::string swhere = cat(ckpt.file_of(sname), ": tensor ", sname);
      const std::vector<int64_t> sshape = {(s.shape[0] + kFp8Block - 1) / kFp8Block,
                                           (s.shape[1] + kFp8Block - 1) / kFp8Block};
      if (sv->shape != sshape) fail(swhere, ": shape ", shape_str(sv->shape), " but ", s.name, " needs ", shape_str(sshape));
      if (sv->dtype != DType::f32) fail(swhere, ": dtype ", dtype_name(sv->dtype), ", expected F32");
      float* scales = reinterpret_cast<float*>(own(w, DType::f32, sv->numel()));
      for (int64_t i = 0; i < sv->numel(); ++i) {
        scales[i] = element_as_float(*sv, i);
        if (!std::isfinite(scales[i]) || scales[i] <= 0)
          fail(swhere, ": block ", i / sshape[1], ",", i % sshape[1], " has scale ", scales[i],
               "; scales must be finite and positive");
      }
      m.scale_inv = scales;
      m.scale_cols = sshape[1];
      used.insert(sname);
    } else if (v->dtype != DType::bf16 && v->dtype != DType::f32 && v->dtype != DType::f16) {
      fail(where, ": dtype ", dtype_name(v->dtype), " is not supported (F32, BF16, F16, F8_E4M3)");
    }
  });
  if (c.tie_word_embeddings) w.lm_head = w.embed_tokens;
  for (const std::string& name : ckpt.names())
    if (!used.count(name))
      fail(ckpt.file_of(name), ": unexpected tensor ", name, " (not part of the model config.json describes)");
  return w;
}

void tie_mtp_shared(ModelWeights& w) {
  for (MtpWeights& m : w.mtp) {
    m.embed_tokens = w.embed_tokens;
    m.shared_head_head = w.lm_head;
  }
}

FlatLayout flat_layout(const ModelConfig& c, DType dtype, MtpTying mtp) {
  if (dtype != DType::f32 && dtype != DType::f64) fail("flat_layout: F32 or F64 only, not ", dtype_name(dtype));
  const int64_t align = int64_t(kFlatAlignment / dtype_size(dtype));  // in elements
  FlatLayout out{dtype, mtp, {}, 0};
  ModelWeights shape(c);  // Mats only: the list needs somewhere to point
  std::vector<std::pair<const Mat*, int64_t>> offsets;  // of the tensors a copy may be tied to
  for_each_tensor(c, shape, [&](const TensorSlot& s) {
    FlatTensor t{s.name, s.shape, out.numel, 1, s.trainable, s.mtp, false};
    for (int64_t d : s.shape) t.numel *= d;
    if (s.copy_of && mtp == MtpTying::tied) {
      t.tied = true;
      bool found = false;
      for (const auto& [m, offset] : offsets)
        if (m == s.copy_of) t.offset = offset, found = true;
      if (!found) fail("flat layout: ", s.name, " is tied to a tensor not laid out before it");
    } else {
      if (s.mat == &shape.embed_tokens || s.mat == &shape.lm_head) offsets.push_back({s.mat, t.offset});
      out.numel += (t.numel + align - 1) / align * align;
    }
    out.tensors.push_back(std::move(t));
  });
  return out;
}

ModelWeights allocate_weights(const ModelConfig& c, DType dtype, MtpTying mtp) {
  const FlatLayout layout = flat_layout(c, dtype, mtp);
  ModelWeights w(c);
  FlatWeights& f = w.flat;
  f.dtype = dtype, f.mtp = mtp, f.numel = layout.numel;
  // calloc: zeroed pages from the system, untouched until used; 64 bytes more to align.
  f.owner.reset(static_cast<uint8_t*>(std::calloc(f.bytes() + kFlatAlignment, 1)));
  if (!f.owner) fail("allocate_weights: cannot allocate ", f.bytes(), " bytes");
  const uintptr_t base = reinterpret_cast<uintptr_t>(f.owner.get());
  f.data = f.owner.get() + (kFlatAlignment - base % kFlatAlignment) % kFlatAlignment;
  size_t i = 0;
  for_each_tensor(c, w, [&](const TensorSlot& s) {
    Mat& m = *s.mat;
    m = shape_mat(s);
    m.dtype = dtype;
    m.data = f.data + size_t(layout.tensors[i++].offset) * dtype_size(dtype);
  });
  if (c.tie_word_embeddings) w.lm_head = w.embed_tokens;
  return w;
}

void convert_weights(const ModelConfig& c, const ModelWeights& src, ModelWeights& dst) {
  std::vector<TensorSlot> from = list_tensors(c, const_cast<ModelWeights&>(src));
  std::vector<TensorSlot> to = list_tensors(c, dst);
  std::vector<float> row;
  for (size_t i = 0; i < from.size(); ++i) {
    const Mat& a = *from[i].mat;
    const Mat& b = *to[i].mat;
    row.resize(size_t(a.cols));
    for (int64_t r = 0; r < a.rows; ++r) {
      dequantize_rows(a, r, 1, row.data());
      if (b.dtype == DType::f64)
        for (int64_t k = 0; k < a.cols; ++k) mutable_data<double>(b)[r * a.cols + k] = row[size_t(k)];
      else
        std::memcpy(mutable_data<float>(b) + r * a.cols, row.data(), size_t(a.cols) * 4);
    }
  }
}

}  // namespace dsv3
