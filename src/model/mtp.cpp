// The MTP module (see mtp.h).
#include "model/mtp.h"

#include <algorithm>

#include "backend/ops.h"
#include "core/error.h"
#include "model/head.h"

namespace dsv3 {

namespace {

// cat[n, 2*hidden] = [enorm(e) ; hnorm(h_prev)], with the two norms' 1/rms.
template <typename T>
void mtp_input(const ModelConfig& c, const MtpWeights& w, const T* e, const T* h_prev, int64_t n, T* cat, T* e_inv,
               T* h_inv, Arena& arena) {
  const int64_t dim = c.hidden_size;
  ArenaScope scope(arena);
  T* en = arena.alloc<T>(size_t(n * dim));
  T* hn = arena.alloc<T>(size_t(n * dim));
  rmsnorm_forward(e, w.enorm.as<T>(), en, e_inv, n, dim, c.rms_norm_eps);
  rmsnorm_forward(h_prev, w.hnorm.as<T>(), hn, h_inv, n, dim, c.rms_norm_eps);
  copy_rows(en, dim, n, dim, cat, 2 * dim);
  copy_rows(hn, dim, n, dim, cat + dim, 2 * dim);
}

}  // namespace

template <typename T>
double mtp_forward(const BlockContext& ctx, const MtpWeights& w, const int32_t* next_tokens, const T* h_prev,
                   const TokenRows& tokens, LayerCache<T> cache, T* h, Arena& arena, MtpRecord<T>* record,
                   MoeState<T>* moe_state) {
  const ModelConfig& c = ctx.mla.config;
  const int64_t n = tokens.size(), dim = c.hidden_size;
  ArenaScope scope(arena);
  T* e = record ? (record->e.resize(size_t(n * dim)), record->e.data()) : arena.alloc<T>(size_t(n * dim));
  embed_forward(w.embed_tokens, next_tokens, n, e, arena);
  if (record) record->h_prev.assign(h_prev, h_prev + n * dim);
  T* cat = arena.alloc<T>(size_t(n * 2 * dim));
  mtp_input(c, w, e, h_prev, n, cat, arena.alloc<T>(size_t(n)), arena.alloc<T>(size_t(n)), arena);
  ctx.mla.lin.forward(cat, w.eh_proj, h, n);
  return block_forward(ctx, w.block, tokens, cache, h, arena, record ? &record->block : nullptr, moe_state);
}

template <typename T>
void mtp_backward(const BlockContext& ctx, const MtpWeights& w, const int32_t* next_tokens, const TokenRows& tokens,
                  const MtpRecord<T>& rec, T* dh, MtpWeights& g, Arena& arena,
                  const Mat* embedding_grad) {
  const ModelConfig& c = ctx.mla.config;
  const int64_t n = tokens.size(), dim = c.hidden_size;
  if (rec.e.size() != size_t(n * dim) || rec.h_prev.size() != size_t(n * dim))
    fail("mtp backward: the record is not of a forward over these ", n, " tokens");
  block_backward(ctx, w.block, tokens, rec.block, dh, g.block, arena);  // dh: now d h'
  ArenaScope scope(arena);
  T* cat = arena.alloc<T>(size_t(n * 2 * dim));
  T* e_inv = arena.alloc<T>(size_t(n));
  T* h_inv = arena.alloc<T>(size_t(n));
  mtp_input(c, w, rec.e.data(), rec.h_prev.data(), n, cat, e_inv, h_inv, arena);  // recomputed
  // h' = cat eh_proj^T
  T* dcat = arena.alloc<T>(size_t(n * 2 * dim));
  ctx.mla.lin.dw(dh, cat, mutable_data<T>(g.eh_proj), n, 2 * dim, dim);
  ctx.mla.lin.dx(dh, w.eh_proj.as<T>(), dcat, n, 2 * dim, dim, false);
  T* den = arena.alloc<T>(size_t(n * dim));
  T* dhn = arena.alloc<T>(size_t(n * dim));
  T* de = arena.alloc<T>(size_t(n * dim));
  copy_rows(dcat, 2 * dim, n, dim, den, dim);
  copy_rows(dcat + dim, 2 * dim, n, dim, dhn, dim);
  std::fill(de, de + n * dim, T(0));
  rmsnorm_backward(den, rec.e.data(), w.enorm.as<T>(), e_inv, de, mutable_data<T>(g.enorm), n, dim);
  embed_backward(next_tokens, n, de, embedding_grad ? *embedding_grad : g.embed_tokens, arena);
  std::fill(dh, dh + n * dim, T(0));
  rmsnorm_backward(dhn, rec.h_prev.data(), w.hnorm.as<T>(), h_inv, dh, mutable_data<T>(g.hnorm), n, dim);
}

#define DSV3_MTP(T)                                                                                                 \
  template double mtp_forward<T>(const BlockContext&, const MtpWeights&, const int32_t*, const T*, const TokenRows&, \
                                 LayerCache<T>, T*, Arena&, MtpRecord<T>*, MoeState<T>*);                           \
  template void mtp_backward<T>(const BlockContext&, const MtpWeights&, const int32_t*, const TokenRows&,            \
                                const MtpRecord<T>&, T*, MtpWeights&, Arena&, const Mat*);
DSV3_MTP(float)
DSV3_MTP(double)
#undef DSV3_MTP

}  // namespace dsv3
