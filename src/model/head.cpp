// The embedding and the output head (see head.h).
#include "model/head.h"

#include <type_traits>

#include "backend/ops.h"
#include "core/error.h"

namespace dsv3 {

namespace {

const int64_t* row_index(const int32_t* ids, int64_t n, int64_t rows, Arena& arena) {
  int64_t* index = arena.alloc<int64_t>(size_t(n));
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= rows) fail("token id ", ids[i], " at index ", i, " is out of range [0, ", rows, ")");
    index[i] = ids[i];
  }
  return index;
}

}  // namespace

template <typename T>
void embed_forward(const Mat& table, const int32_t* ids, int64_t n, T* out, Arena& arena) {
  if constexpr (std::is_same_v<T, float>) {
    embedding(table, ids, n, out);  // dequantizes BF16 / FP8 rows of a checkpoint
  } else {
    if (table.dtype != DType::f64) fail("embedding: a ", dtype_name(table.dtype), " table in a double pass");
    ArenaScope scope(arena);
    gather_rows(table.as<T>(), table.cols, row_index(ids, n, table.rows, arena), static_cast<const T*>(nullptr), n,
                table.cols, out, table.cols);
  }
}

template <typename T>
void embed_backward(const int32_t* ids, int64_t n, const T* dout, const Mat& g, Arena& arena) {
  ArenaScope scope(arena);
  scatter_add_rows(dout, row_index(ids, n, g.rows, arena), static_cast<const T*>(nullptr), n, g.cols,
                   mutable_data<T>(g));
}

template <typename T>
void head_forward(const ModelConfig& c, const Mat& norm, const Mat& head, const T* h, int64_t n, T* logits,
                  Arena& arena) {
  const int64_t dim = c.hidden_size;
  ArenaScope scope(arena);
  T* xn = arena.alloc<T>(size_t(n * dim));
  rmsnorm_forward(h, norm.as<T>(), xn, arena.alloc<T>(size_t(n)), n, dim, c.rms_norm_eps);
  LinearGemm{}.forward(xn, head, logits, n);  // fp32 (or double): the head is not a low-precision GEMM
}

template <typename T>
void head_backward(const ModelConfig& c, const Mat& norm, const Mat& head, const T* h, int64_t n, const T* dlogits,
                   T* dh, const Mat& g_norm, const Mat& g_head, Arena& arena) {
  const int64_t dim = c.hidden_size, vocab = head.rows;
  ArenaScope scope(arena);
  T* xn = arena.alloc<T>(size_t(n * dim));
  T* inv = arena.alloc<T>(size_t(n));
  T* dxn = arena.alloc<T>(size_t(n * dim));
  rmsnorm_forward(h, norm.as<T>(), xn, inv, n, dim, c.rms_norm_eps);  // recomputed
  matmul_dw(dlogits, xn, mutable_data<T>(g_head), n, dim, vocab);
  matmul_dx(dlogits, head.as<T>(), dxn, n, dim, vocab, false);
  rmsnorm_backward(dxn, h, norm.as<T>(), inv, dh, mutable_data<T>(g_norm), n, dim);
}

#define DSV3_HEAD(T)                                                                                                 \
  template void embed_forward<T>(const Mat&, const int32_t*, int64_t, T*, Arena&);                                 \
  template void embed_backward<T>(const int32_t*, int64_t, const T*, const Mat&, Arena&);                          \
  template void head_forward<T>(const ModelConfig&, const Mat&, const Mat&, const T*, int64_t, T*, Arena&);         \
  template void head_backward<T>(const ModelConfig&, const Mat&, const Mat&, const T*, int64_t, const T*, T*,       \
                                 const Mat&, const Mat&, Arena&);
DSV3_HEAD(float)
DSV3_HEAD(double)
#undef DSV3_HEAD

}  // namespace dsv3
