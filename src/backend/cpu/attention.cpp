// The attention core on the CPU (see backend/attention.h). Work is cut into tasks of one
// sequence (a run of query tokens sharing their keys) and one head, or all heads at once
// when every key and value vector is shared (MLA's absorbed form: the (token, head) pairs
// are then the rows of one product, so the latents are read once for all heads). Each task
// is three or four GEMMs and a row-wise softmax. Several tasks run on their own threads
// (their GEMMs single-threaded); a single task gets the threads inside its GEMMs.
#include "backend/attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "backend/cpu/kernels.h"
#include "backend/cpu/threads.h"
#include "core/error.h"

namespace dsv3 {

namespace {

// A run of query tokens [t0, t0 + nt) with the same key rows [first, first + keys).
struct Group {
  int64_t t0, nt, first, keys;
};

// Into out (cleared; callers keep it between calls, so a pass allocates nothing).
template <typename T>
void sequences(const AttentionArgs<T>& a, std::vector<Group>& out) {
  out.clear();
  for (int64_t t = 0; t < a.n; ++t) {
    if (a.key_count[t] <= 0) fail("attention: query ", t, " sees no keys");
    if (out.empty() || out.back().first != a.key_first[t]) out.push_back({t, 0, a.key_first[t], 0});
    Group& g = out.back();
    ++g.nt;
    g.keys = std::max(g.keys, a.key_count[t]);
  }
}

// True when every key and value vector is shared by all heads and the (token, head) query
// rows are evenly spaced, so all heads of a task form one matrix of rows.
template <typename T>
bool heads_as_rows(const AttentionArgs<T>& a) {
  auto even = [&](const HeadRows<const T>& q) { return a.heads == 1 || q.row_stride == a.heads * q.head_stride; };
  const bool shared = a.k1.head_stride == 0 && a.v.head_stride == 0 && (a.q2.width == 0 || a.k2.head_stride == 0);
  return shared && even(a.q1) && (a.q2.width == 0 || even(a.q2));
}

// One task: tokens [t0, t0 + nt) of a sequence, one head (head >= 0) or all heads (-1).
// Its rows are (token, head) pairs; row r of a task's matrix is at base + r * ld. A task
// computes `keys` columns; a kept probability row is zero-filled up to the whole
// sequence's `group_keys`, all that the backward (one task per sequence) reads.
struct Task {
  int64_t t0, nt, head, first, keys, group_keys;
  int64_t rows(int64_t heads) const { return head < 0 ? nt * heads : nt; }
  int64_t token(int64_t r, int64_t heads) const { return t0 + (head < 0 ? r / heads : r); }
};

template <typename P>
P* query_rows(const HeadRows<P>& q, const Task& t, int64_t heads, int64_t& ld) {
  ld = t.head < 0 && heads > 1 ? q.head_stride : q.row_stride;
  return q.data + t.t0 * q.row_stride + (t.head < 0 ? 0 : t.head * q.head_stride);
}
template <typename P>
P* key_rows(const HeadRows<P>& k, const Task& t, int64_t& ld) {
  ld = k.row_stride;
  return k.data + t.first * k.row_stride + std::max<int64_t>(t.head, 0) * k.head_stride;
}

// Where a task's row r keeps its log-sum-exp: (token, head) rows of the whole op, t*heads + h.
inline int64_t lse_row(const Task& t, int64_t r, int64_t heads) {
  return t.head < 0 ? t.t0 * heads + r : (t.t0 + r) * heads + t.head;
}

// s = scale * s, softmax over the first `visible` entries, zeros after them up to `width`,
// per row; with lse, each row's log-sum-exp of the scaled scores (max + log of the sum).
template <typename T>
void causal_softmax(const AttentionArgs<T>& a, const Task& t, T* s, int64_t lds, int64_t width, T* lse) {
  const int64_t rows = t.rows(a.heads);
#pragma omp parallel for schedule(static) if (!omp_in_parallel() && rows * t.keys > 65536)
  for (int64_t r = 0; r < rows; ++r) {
    T* row = s + r * lds;
    const int64_t visible = a.key_count[t.token(r, a.heads)];
    T mx = row[0] * T(a.scale);
    for (int64_t j = 0; j < visible; ++j) mx = std::max(mx, row[j] = row[j] * T(a.scale));
    double sum = 0;
    for (int64_t j = 0; j < visible; ++j) sum += double(row[j] = std::exp(row[j] - mx));
    const T inv = T(1.0 / sum);
    for (int64_t j = 0; j < visible; ++j) row[j] *= inv;
    std::fill(row + visible, row + width, T(0));
    if (lse) lse[lse_row(t, r, a.heads)] = T(double(mx) + std::log(sum));
  }
}

// The task's scores and probabilities into s (lds; rows zero-filled to `width` columns),
// then its output rows.
template <typename T>
void forward_task(const AttentionArgs<T>& a, const Task& t, T* s, int64_t lds, int64_t width, T* out, T* lse) {
  const int64_t m = t.rows(a.heads), dv = a.v.width;
  int64_t ldq, ldk;
  const T* q1 = query_rows(a.q1, t, a.heads, ldq);
  const T* k1 = key_rows(a.k1, t, ldk);
  cpu::gemm<T>(false, true, m, t.keys, a.q1.width, q1, ldq, k1, ldk, T(0), s, lds);
  if (a.q2.width > 0) {
    const T* q2 = query_rows(a.q2, t, a.heads, ldq);
    const T* k2 = key_rows(a.k2, t, ldk);
    cpu::gemm<T>(false, true, m, t.keys, a.q2.width, q2, ldq, k2, ldk, T(1), s, lds);
  }
  causal_softmax(a, t, s, lds, width, lse);
  int64_t ldv;
  const T* v = key_rows(a.v, t, ldv);
  T* o = out + t.t0 * a.heads * dv + std::max<int64_t>(t.head, 0) * dv;
  cpu::gemm<T>(false, false, m, dv, t.keys, s, lds, v, ldv, T(0), o, t.head < 0 ? dv : a.heads * dv);
}

// Score entries per task at most, so that a long prompt's scores stay small (16 MiB in float).
constexpr int64_t kTaskScores = int64_t(1) << 22;
// Query tokens per causal block: a block computes scores only against the keys its tokens
// see, so a sequence's attention costs about the lower triangle, not the whole square
// (half the products of a long prompt or a training window).
constexpr int64_t kCausalBlock = 64;

// Into tasks (cleared), as sequences().
template <typename T>
void forward_tasks(const AttentionArgs<T>& a, bool whole_sequences, std::vector<Task>& tasks) {
  tasks.clear();
  const bool all = heads_as_rows(a);
  const int64_t rows_per_token = all ? a.heads : 1;
  thread_local std::vector<Group> groups;
  sequences(a, groups);
  for (const Group& g : groups) {
    const int64_t chunk =
        whole_sequences
            ? g.nt
            : std::min(kCausalBlock, std::max<int64_t>(1, kTaskScores / std::max<int64_t>(1, rows_per_token * g.keys)));
    for (int64_t t0 = 0; t0 < g.nt; t0 += chunk) {
      const int64_t nt = std::min(chunk, g.nt - t0);
      int64_t keys = 0;
      for (int64_t t = g.t0 + t0; t < g.t0 + t0 + nt; ++t) keys = std::max(keys, a.key_count[t]);
      if (all) tasks.push_back({g.t0 + t0, nt, -1, g.first, keys, g.keys});
      else
        for (int64_t h = 0; h < a.heads; ++h) tasks.push_back({g.t0 + t0, nt, h, g.first, keys, g.keys});
    }
  }
}

template <typename T>
void check_args(const AttentionArgs<T>& a, const void* probs, int64_t ld_probs) {
  if (a.n <= 0 || a.heads <= 0 || a.q1.width != a.k1.width || a.q2.width != a.k2.width)
    fail("attention: inconsistent shapes");
  if (probs)
    for (int64_t t = 0; t < a.n; ++t)
      if (a.key_count[t] > ld_probs) fail("attention: ", a.key_count[t], " keys do not fit probability rows of ", ld_probs);
}

}  // namespace

template <typename T>
void attention_forward(const AttentionArgs<T>& a, T* out, T* probs, int64_t ld_probs, T* lse) {
  check_args(a, probs, ld_probs);
  cpu::adapt_threads();
  // Every list and scratch buffer below is thread_local: kept from call to call (OpenMP's
  // threads persist), so that a forward allocates nothing once its shapes have been seen.
  // Lists the threads share are reached through a reference to the calling thread's object
  // (a thread_local named inside the parallel region would be each thread's own).
  thread_local std::vector<Task> tasks_kept;
  std::vector<Task>& tasks = tasks_kept;
  forward_tasks(a, false, tasks);
  const int64_t n_tasks = int64_t(tasks.size());
  // Each thread's scores buffer: a slice of one buffer sized for the largest task, so what is
  // allocated depends on the tasks, never on which thread the schedule gives which task.
  int64_t slice = 0;
  for (const Task& t : tasks) slice = std::max(slice, t.rows(a.heads) * t.keys);
  const int threads = int(std::min<int64_t>(n_tasks, omp_get_max_threads()));
  thread_local std::vector<T> scratch_kept;
  std::vector<T>& scratch_all = scratch_kept;
  // Grown, never shrunk, and with headroom: callers alternate shapes (the model and its MTP
  // module, growing contexts), and an exact fit would reallocate at every step.
  if (!probs && scratch_all.size() < size_t(slice * threads))
    scratch_all.resize(std::max(size_t(slice * threads), 2 * scratch_all.size()));
  auto run = [&](const Task& t, T* scratch) {
    if (probs) {
      // Rows (t * heads + h): consecutive for all heads, heads * ld_probs apart for one.
      T* s = probs + (t.t0 * a.heads + std::max<int64_t>(t.head, 0)) * ld_probs;
      forward_task(a, t, s, t.head < 0 ? ld_probs : a.heads * ld_probs, t.group_keys, out, lse);
    } else {
      forward_task(a, t, scratch, t.keys, t.keys, out, lse);
    }
  };
  if (n_tasks == 1) {
    // Outside any parallel region, so the GEMMs use the threads themselves (an inactive
    // region around them makes OpenBLAS start a nested team per call: measured 30 % slower
    // decoding).
    run(tasks[0], scratch_all.data());
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    T* scratch = probs ? nullptr : scratch_all.data() + size_t(omp_get_thread_num()) * size_t(slice);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_tasks; ++i) run(tasks[size_t(i)], scratch);
  }
}

template <typename T>
void attention_backward(const AttentionArgs<T>& a, const T* probs, int64_t ld_probs, const T* d_out,
                        const AttentionGrads<T>& g, const T* lse) {
  check_args(a, probs, ld_probs);
  cpu::adapt_threads();
  if (!probs && !lse) fail("attention backward: the forward's probabilities or their log-sum-exp are needed");
  // Whole sequences per task, so that only tasks of one sequence's heads touch its keys'
  // gradients; a shared key or value gradient of a one-head task goes to the task's own
  // buffer, summed into place afterwards in task order (deterministic).
  thread_local std::vector<Task> tasks_kept;  // kept between calls, shared by reference, as in the forward
  std::vector<Task>& tasks = tasks_kept;
  forward_tasks(a, true, tasks);
  {  // concurrent tasks write their keys' gradients in place: the sequences' keys must not overlap
    thread_local std::vector<Group> groups;
    thread_local std::vector<std::pair<int64_t, int64_t>> ranges;
    sequences(a, groups);
    ranges.clear();
    for (const Group& s : groups) ranges.push_back({s.first, s.first + s.keys});
    std::sort(ranges.begin(), ranges.end());
    for (size_t i = 1; i < ranges.size(); ++i)
      if (ranges[i].first < ranges[i - 1].second)
        fail("attention backward: two sequences share key rows [", ranges[i].first, ", ", ranges[i - 1].second, ")");
  }
  const int64_t n_tasks = int64_t(tasks.size()), dv = a.v.width;
  const bool per_head = !tasks.empty() && tasks[0].head >= 0;
  struct Private {
    std::vector<T> k1, k2, v;
  };
  thread_local std::vector<Private> priv_kept;  // resized, not rebuilt: its buffers keep their memory
  std::vector<Private>& priv = priv_kept;
  priv.resize(per_head ? tasks.size() : 0);
  for (Private& x : priv) x.k1.clear(), x.k2.clear(), x.v.clear();
  // Each thread's dP buffer (and, recomputing, its P buffer): a slice of one buffer sized for
  // the largest causal block of any task, never a whole sequence's square.
  int64_t slice = 0;
  for (const Task& t : tasks)
    slice = std::max(slice, std::min(t.nt, kCausalBlock) * (t.head < 0 ? a.heads : 1) * t.keys);
  const int threads = int(std::min<int64_t>(n_tasks, omp_get_max_threads()));
  // Without kept probabilities, each thread recomputes a causal block's into a second slice.
  thread_local std::vector<T> dp_kept;
  std::vector<T>& dp_all = dp_kept;
  const int64_t per_thread = probs ? slice : 2 * slice;
  if (dp_all.size() < size_t(per_thread * threads)) dp_all.resize(std::max(size_t(per_thread * threads), 2 * dp_all.size()));
  auto run = [&](int64_t i, T* dp) {
    const Task& t = tasks[size_t(i)];
    const int64_t L = t.keys;
    const T* p = probs ? probs + (t.t0 * a.heads + std::max<int64_t>(t.head, 0)) * ld_probs : nullptr;
    const int64_t ldp = t.head < 0 ? ld_probs : a.heads * ld_probs;
    T* recomputed = dp + slice;
    const T* dop = d_out + t.t0 * a.heads * dv + std::max<int64_t>(t.head, 0) * dv;
    const int64_t lddo = t.head < 0 ? dv : a.heads * dv;
    // The gradient of a key-side view: in place, or this task's buffer if shared by heads.
    auto key_grad = [&](const HeadRows<T>& gv, std::vector<T>* own, int64_t& ld) -> T* {
      if (per_head && gv.head_stride == 0) {
        own->assign(size_t(L * gv.width), T(0));
        ld = gv.width;
        return own->data();
      }
      return key_rows(gv, t, ld);
    };
    Private* mine = per_head ? &priv[size_t(i)] : nullptr;
    int64_t ldv, ldk1, ldk2 = 0, ldgv, ldgk1, ldgk2 = 0;
    const T* v = key_rows(a.v, t, ldv);
    const T* k1 = key_rows(a.k1, t, ldk1);
    const T* k2 = a.q2.width > 0 ? key_rows(a.k2, t, ldk2) : nullptr;
    T* gv = key_grad(g.v, mine ? &mine->v : nullptr, ldgv);
    T* gk1 = key_grad(g.k1, mine ? &mine->k1 : nullptr, ldgk1);
    T* gk2 = a.q2.width > 0 ? key_grad(g.k2, mine ? &mine->k2 : nullptr, ldgk2) : nullptr;
    // Causal blocks of the task's query tokens, each against only the keys its tokens see
    // (the probabilities past them are zero): about half the products of the whole square.
    const int64_t per_token = t.head < 0 ? a.heads : 1;
    for (int64_t c0 = 0; c0 < t.nt; c0 += kCausalBlock) {
      const int64_t c1 = std::min(t.nt, c0 + kCausalBlock);
      const int64_t r0 = c0 * per_token, m = (c1 - c0) * per_token;
      int64_t Lc = 0;
      for (int64_t tok = t.t0 + c0; tok < t.t0 + c1; ++tok) Lc = std::max(Lc, a.key_count[tok]);
      const T* pc = p ? p + r0 * ldp : recomputed;
      const int64_t ldpc = p ? ldp : Lc;
      if (!p) {  // P = exp(scale * (q1 k1^T + q2 k2^T) - lse) over the visible keys, 0 after them
        int64_t ldq;
        const T* q1 = query_rows(a.q1, t, a.heads, ldq) + r0 * ldq;
        cpu::gemm<T>(false, true, m, Lc, a.q1.width, q1, ldq, k1, ldk1, T(0), recomputed, Lc);
        if (a.q2.width > 0) {
          const T* q2 = query_rows(a.q2, t, a.heads, ldq) + r0 * ldq;
          cpu::gemm<T>(false, true, m, Lc, a.q2.width, q2, ldq, k2, ldk2, T(1), recomputed, Lc);
        }
        for (int64_t r = 0; r < m; ++r) {
          T* row = recomputed + r * Lc;
          const int64_t visible = a.key_count[t.token(r0 + r, a.heads)];
          const T l = lse[lse_row(t, r0 + r, a.heads)];
          for (int64_t j = 0; j < visible; ++j) row[j] = std::exp(row[j] * T(a.scale) - l);
          std::fill(row + visible, row + Lc, T(0));
        }
      }
      const T* doc = dop + r0 * lddo;
      // out = P v:  dP = d_out v^T,  dv += P^T d_out
      cpu::gemm<T>(false, true, m, Lc, dv, doc, lddo, v, ldv, T(0), dp, Lc);
      cpu::gemm<T>(true, false, Lc, dv, m, pc, ldpc, doc, lddo, T(1), gv, ldgv);
      // P = softmax(scale * scores):  dS = scale * P * (dP - sum(P * dP))
      for (int64_t r = 0; r < m; ++r) {
        const T* pr = pc + r * ldpc;
        T* d = dp + r * Lc;
        const int64_t visible = a.key_count[t.token(r0 + r, a.heads)];
        T dot = 0;
        for (int64_t j = 0; j < visible; ++j) dot += pr[j] * d[j];
        for (int64_t j = 0; j < visible; ++j) d[j] = T(a.scale) * pr[j] * (d[j] - dot);
        std::fill(d + visible, d + Lc, T(0));
      }
      // scores = q1 k1^T + q2 k2^T:  dq += dS k,  dk += dS^T q
      auto product = [&](const HeadRows<const T>& q, const T* k, int64_t ldk, const HeadRows<T>& gq, T* gk,
                         int64_t ldgk) {
        int64_t ldq, ldgq;
        const T* qp = query_rows(q, t, a.heads, ldq) + r0 * ldq;
        T* gqp = query_rows(gq, t, a.heads, ldgq) + r0 * ldgq;
        cpu::gemm<T>(false, false, m, q.width, Lc, dp, Lc, k, ldk, T(1), gqp, ldgq);
        cpu::gemm<T>(true, false, Lc, q.width, m, dp, Lc, qp, ldq, T(1), gk, ldgk);
      };
      product(a.q1, k1, ldk1, g.q1, gk1, ldgk1);
      if (a.q2.width > 0) product(a.q2, k2, ldk2, g.q2, gk2, ldgk2);
    }
  };
  if (n_tasks == 1) {  // outside any parallel region, as in the forward
    run(0, dp_all.data());
  } else {
#pragma omp parallel num_threads(threads)
    {
      T* dp = dp_all.data() + size_t(omp_get_thread_num()) * size_t(per_thread);
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < n_tasks; ++i) run(i, dp);
    }
  }
  // The shared gradients of one-head tasks, summed into place.
  for (size_t i = 0; i < priv.size(); ++i) {
    const Task& t = tasks[i];
    auto add = [&](const HeadRows<T>& gv, const std::vector<T>& own) {
      if (own.empty()) return;
      for (int64_t j = 0; j < t.keys; ++j) {
        T* dst = gv.data + (t.first + j) * gv.row_stride;
        for (int64_t w = 0; w < gv.width; ++w) dst[w] += own[size_t(j * gv.width + w)];
      }
    };
    add(g.k1, priv[i].k1);
    add(g.k2, priv[i].k2);
    add(g.v, priv[i].v);
  }
}

// The references: one (token, head) at a time, in double.
namespace {

template <typename P>
P* at(const HeadRows<P>& x, int64_t row, int64_t head) {
  return x.data + row * x.row_stride + head * x.head_stride;
}

template <typename T>
std::vector<double> reference_probs(const AttentionArgs<T>& a, int64_t t, int64_t h) {
  const int64_t first = a.key_first[t], count = a.key_count[t];
  std::vector<double> p(static_cast<size_t>(count));
  double mx = -INFINITY;
  for (int64_t j = 0; j < count; ++j) {
    double s = 0;
    for (int64_t i = 0; i < a.q1.width; ++i) s += double(at(a.q1, t, h)[i]) * double(at(a.k1, first + j, h)[i]);
    for (int64_t i = 0; i < a.q2.width; ++i) s += double(at(a.q2, t, h)[i]) * double(at(a.k2, first + j, h)[i]);
    p[size_t(j)] = s * a.scale;
    mx = std::max(mx, p[size_t(j)]);
  }
  double sum = 0;
  for (double& x : p) sum += x = std::exp(x - mx);
  for (double& x : p) x /= sum;
  return p;
}

}  // namespace

template <typename T>
void attention_forward_reference(const AttentionArgs<T>& a, T* out, T* probs, int64_t ld_probs) {
  check_args(a, probs, ld_probs);
  const int64_t dv = a.v.width;
  for (int64_t t = 0; t < a.n; ++t)
    for (int64_t h = 0; h < a.heads; ++h) {
      const std::vector<double> p = reference_probs(a, t, h);
      for (int64_t i = 0; i < dv; ++i) {
        double o = 0;
        for (size_t j = 0; j < p.size(); ++j) o += p[j] * double(at(a.v, a.key_first[t] + int64_t(j), h)[i]);
        out[(t * a.heads + h) * dv + i] = T(o);
      }
      if (probs)
        for (size_t j = 0; j < p.size(); ++j) probs[(t * a.heads + h) * ld_probs + int64_t(j)] = T(p[j]);
    }
}

template <typename T>
void attention_backward_reference(const AttentionArgs<T>& a, const T* probs, int64_t, const T* d_out,
                                  const AttentionGrads<T>& g) {
  const int64_t dv = a.v.width;
  for (int64_t t = 0; t < a.n; ++t)
    for (int64_t h = 0; h < a.heads; ++h) {
      const std::vector<double> p = reference_probs(a, t, h);  // recomputed, not the given probs
      const int64_t first = a.key_first[t], count = a.key_count[t];
      const T* dout = d_out + (t * a.heads + h) * dv;
      std::vector<double> dp(p.size());
      double dot = 0;
      for (int64_t j = 0; j < count; ++j) {
        for (int64_t i = 0; i < dv; ++i) {
          dp[size_t(j)] += double(dout[i]) * double(at(a.v, first + j, h)[i]);
          at(g.v, first + j, h)[i] += T(p[size_t(j)] * double(dout[i]));
        }
        dot += p[size_t(j)] * dp[size_t(j)];
      }
      for (int64_t j = 0; j < count; ++j) {
        const double ds = a.scale * p[size_t(j)] * (dp[size_t(j)] - dot);
        for (int64_t i = 0; i < a.q1.width; ++i) {
          at(g.q1, t, h)[i] += T(ds * double(at(a.k1, first + j, h)[i]));
          at(g.k1, first + j, h)[i] += T(ds * double(at(a.q1, t, h)[i]));
        }
        for (int64_t i = 0; i < a.q2.width; ++i) {
          at(g.q2, t, h)[i] += T(ds * double(at(a.k2, first + j, h)[i]));
          at(g.k2, first + j, h)[i] += T(ds * double(at(a.q2, t, h)[i]));
        }
      }
    }
  (void)probs;
}

#define DSV3_INSTANTIATE(T)                                                                                    \
  template void attention_forward<T>(const AttentionArgs<T>&, T*, T*, int64_t, T*);                               \
  template void attention_backward<T>(const AttentionArgs<T>&, const T*, int64_t, const T*,                   \
                                      const AttentionGrads<T>&, const T*);                                     \
  template void attention_forward_reference<T>(const AttentionArgs<T>&, T*, T*, int64_t);                     \
  template void attention_backward_reference<T>(const AttentionArgs<T>&, const T*, int64_t, const T*,         \
                                                const AttentionGrads<T>&);
DSV3_INSTANTIATE(float)
DSV3_INSTANTIATE(double)

}  // namespace dsv3
