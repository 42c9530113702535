// The decoder block (see block.h).
#include "model/block.h"

#include <algorithm>

#include "backend/ops.h"
#include "core/error.h"

namespace dsv3 {

template <typename T>
int64_t BlockRecord<T>::bytes() const {
  return int64_t((h_in.size() + h_mid.size()) * sizeof(T)) + mla.bytes() + mlp.bytes() + moe.bytes();
}

template <typename T>
double block_forward(const BlockContext& ctx, const LayerWeights& w, const TokenRows& tokens, LayerCache<T> cache, T* h,
                     Arena& arena, BlockRecord<T>* record, MoeState<T>* moe_state) {
  const ModelConfig& c = ctx.mla.config;
  const int64_t n = tokens.size(), dim = c.hidden_size;
  ArenaScope scope(arena);
  T* xn = arena.alloc<T>(size_t(n * dim));     // the normalised residual stream
  T* inv = arena.alloc<T>(size_t(n));          // its 1/rms (the backward recomputes it)
  T* delta = arena.alloc<T>(size_t(n * dim));  // a sub-layer's output

  if (record) record->h_in.assign(h, h + n * dim);
  rmsnorm_forward(h, w.input_layernorm.as<T>(), xn, inv, n, dim, c.rms_norm_eps);
  mla_forward<T>(ctx.mla, w.self_attn, xn, tokens, cache, arena, delta, record ? &record->mla : nullptr);
  add_to(h, delta, n * dim);

  if (record) record->h_mid.assign(h, h + n * dim);
  rmsnorm_forward(h, w.post_attention_layernorm.as<T>(), xn, inv, n, dim, c.rms_norm_eps);
  double balance = 0;
  if (w.is_moe)
    balance = moe_forward<T>(c, w.moe, xn, n, arena, delta, ctx.mla.lin, record ? &record->moe : nullptr, ctx.balance,
                             moe_state, ctx.experts);
  else mlp_forward<T>(w.mlp, xn, n, arena, delta, ctx.mla.lin, record ? &record->mlp : nullptr);
  add_to(h, delta, n * dim);
  return balance;
}

template <typename T>
void block_backward(const BlockContext& ctx, const LayerWeights& w, const TokenRows& tokens, const BlockRecord<T>& rec,
                    T* dh, LayerWeights& g, Arena& arena) {
  const ModelConfig& c = ctx.mla.config;
  const int64_t n = tokens.size(), dim = c.hidden_size;
  if (rec.h_in.size() != size_t(n * dim) || rec.h_mid.size() != size_t(n * dim))
    fail("block backward: the record is not of a forward over these ", n, " tokens");
  ArenaScope scope(arena);
  T* xn = arena.alloc<T>(size_t(n * dim));
  T* inv = arena.alloc<T>(size_t(n));
  T* dxn = arena.alloc<T>(size_t(n * dim));

  // h_out = h_mid + FFN(norm2(h_mid)): dh passes through the residual, and the FFN's input
  // gradient goes back through norm2 into it.
  rmsnorm_forward(rec.h_mid.data(), w.post_attention_layernorm.as<T>(), xn, inv, n, dim, c.rms_norm_eps);  // recomputed
  std::fill(dxn, dxn + n * dim, T(0));
  if (w.is_moe) moe_backward<T>(c, w.moe, xn, n, rec.moe, dh, g.moe, dxn, arena, ctx.mla.lin, ctx.experts);
  else mlp_backward<T>(w.mlp, xn, n, rec.mlp, dh, g.mlp, dxn, arena, ctx.mla.lin);
  rmsnorm_backward(dxn, rec.h_mid.data(), w.post_attention_layernorm.as<T>(), inv, dh,
                   mutable_data<T>(g.post_attention_layernorm), n, dim);

  // h_mid = h_in + MLA(norm1(h_in))
  rmsnorm_forward(rec.h_in.data(), w.input_layernorm.as<T>(), xn, inv, n, dim, c.rms_norm_eps);  // recomputed
  std::fill(dxn, dxn + n * dim, T(0));
  mla_backward<T>(ctx.mla, w.self_attn, xn, tokens, rec.mla, dh, g.self_attn, dxn, arena);
  rmsnorm_backward(dxn, rec.h_in.data(), w.input_layernorm.as<T>(), inv, dh, mutable_data<T>(g.input_layernorm), n, dim);
}

#define DSV3_BLOCK(T)                                                                                               \
  template struct BlockRecord<T>;                                                                                   \
  template double block_forward<T>(const BlockContext&, const LayerWeights&, const TokenRows&, LayerCache<T>, T*,    \
                                   Arena&, BlockRecord<T>*, MoeState<T>*);                                          \
  template void block_backward<T>(const BlockContext&, const LayerWeights&, const TokenRows&, const BlockRecord<T>&, \
                                  T*, LayerWeights&, Arena&);
DSV3_BLOCK(float)
DSV3_BLOCK(double)
#undef DSV3_BLOCK

}  // namespace dsv3
