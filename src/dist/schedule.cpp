// Pipeline schedules and their simulator (see schedule.h).
#include "dist/schedule.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <deque>
#include <limits>
#include <map>
#include <tuple>

#include "core/error.h"

namespace dsv3::dist {

namespace {

void check_sizes(const char* name, int pp, int m) {
  if (pp < 2) fail(name, ": pipeline parallelism needs at least 2 ranks, not ", pp);
  if (m < 1) fail(name, ": at least one micro-batch is needed, not ", m);
}

Op f_op(int dir, int micro) { return Op{Chunk::F, dir, micro, true, 0, 0}; }
Op b_op(int dir, int micro, bool full) { return Op{Chunk::B, dir, micro, full, 0, 0}; }
Op w_op(int dir, int micro) { return Op{Chunk::W, dir, micro, true, 0, 0}; }


double duration(const Op& op, const Costs& c) {
  switch (op.kind) {
    case Chunk::F: return c.f;
    case Chunk::B: return op.full_b ? c.b : c.b - c.w;
    case Chunk::W: return c.w;
    case Chunk::FB: return c.fb;
  }
  return 0;
}

// When each chunk of work is done: (kind F/B/W, direction, micro-batch, stage) -> time.
using Key = std::tuple<int, int, int, int>;
constexpr int kF = 0, kB = 1, kW = 2;

}  // namespace

Schedule one_f_one_b(int pp, int m) {
  check_sizes("1f1b", pp, m);
  Schedule s{"1f1b", pp, m, 1, false, std::vector<std::vector<Op>>(size_t(pp))};
  for (int r = 0; r < pp; ++r) {
    auto& ops = s.ranks[size_t(r)];
    const int warmup = std::min(pp - 1 - r, m);
    int f = 0, b = 0;
    while (f < warmup) ops.push_back(f_op(0, f++));
    while (f < m) ops.push_back(f_op(0, f++)), ops.push_back(b_op(0, b++, true));
    while (b < m) ops.push_back(b_op(0, b++, true));
  }
  return s;
}

Schedule zero_bubble_h1(int pp, int m) {
  check_sizes("zb1p", pp, m);
  // ZB-H1: 1F1B's order and warm-up, each backward split into B and W. A rank first runs B,
  // then F (within 1F1B's P - r activations), and fills what would be idle with the oldest
  // pending W; the schedule is the order this gives with unit chunk costs (the paper's
  // F = B = W), found by simulating all ranks together.
  Schedule s{"zb1p", pp, m, 1, false, std::vector<std::vector<Op>>(size_t(pp))};
  std::map<Key, double> done;
  std::vector<double> free(size_t(pp), 0);
  std::vector<int> nf(size_t(pp), 0), nb(size_t(pp), 0), nw(size_t(pp), 0);
  auto at = [&](int kind, int micro, int stage) {
    const auto it = done.find({kind, 0, micro, stage});
    return it == done.end() ? std::numeric_limits<double>::infinity() : it->second;
  };
  const double unit = 1;
  for (int placed = 0; placed < 3 * pp * m;) {
    // The ranks free first decide, in rank order; what others have not placed yet is not ready.
    const double t = *std::min_element(free.begin(), free.end());
    double next = INFINITY;
    bool acted = false;
    for (int r = 0; r < pp && !acted; ++r) {
      const size_t ri = size_t(r);
      if (free[ri] != t) {
        next = std::min(next, free[ri]);
        continue;
      }
      const double b_ready = nb[ri] < nf[ri] ? std::max(at(kF, nb[ri], r), r == pp - 1 ? 0.0 : at(kB, nb[ri], r + 1)) : INFINITY;
      const double f_ready = nf[ri] < m && nf[ri] - nb[ri] < pp - r ? (r == 0 ? 0.0 : at(kF, nf[ri], r - 1)) : INFINITY;
      Op op;
      if (b_ready <= t) op = b_op(0, nb[ri]++, false);
      else if (f_ready <= t) op = f_op(0, nf[ri]++);
      else if (nw[ri] < nb[ri]) op = w_op(0, nw[ri]++);
      else {
        next = std::min({next, b_ready, f_ready});
        continue;
      }
      const double end = t + unit;
      done[{op.kind == Chunk::F ? kF : op.kind == Chunk::B ? kB : kW, 0, op.micro, r}] = end;
      free[ri] = end;
      s.ranks[ri].push_back(op);
      ++placed, acted = true;
    }
    if (acted) continue;
    if (next == INFINITY) fail("zb1p: the schedule deadlocked at time ", t);
    for (double& f : free)
      if (f == t) f = next;  // nothing to do until then
  }
  return s;
}

Schedule dualpipe(int pp, int m) {
  if (pp < 2 || pp % 2 != 0) fail("dualpipe: the number of pipeline ranks must be even and >= 2, not ", pp);
  if (m < 2 * pp || m % 2 != 0) fail("dualpipe: micro-batches must be even and >= 2 x ranks (", 2 * pp, "), not ", m);
  Schedule s{"dualpipe", pp, m, 2, false, std::vector<std::vector<Op>>(size_t(pp))};
  const int half_ranks = pp / 2, half = m / 2;
  for (int r = 0; r < pp; ++r) {
    auto& ops = s.ranks[size_t(r)];
    const int h = std::min(r, pp - 1 - r);
    const bool second = r >= half_ranks, middle = h == half_ranks - 1;
    // Local phase 0 is the direction this half of the ranks runs first (0 on the first half).
    int next_f[2] = {0, 0}, next_b[2] = {0, 0};
    std::deque<std::pair<int, int>> deferred;  // backwards whose W waits (zero bubble), oldest first
    auto F = [&](int p) { ops.push_back(f_op(p ^ second, next_f[p]++)); };
    auto B = [&](int p, bool zero_bubble) {
      ops.push_back(b_op(p ^ second, next_b[p], !zero_bubble));
      if (zero_bubble) deferred.emplace_back(p ^ second, next_b[p]);
      ++next_b[p];
    };
    auto W = [&] {
      if (deferred.empty()) fail("dualpipe: rank ", r, " has no deferred weight gradient to compute");
      ops.push_back(w_op(deferred.front().first, deferred.front().second));
      deferred.pop_front();
    };
    auto FB = [&](int pf, int pb) {
      Op op{Chunk::FB, pf ^ second, next_f[pf]++, true, pb ^ second, next_b[pb]++};
      ops.push_back(op);
    };
    // The eight steps of DualPipe, with their counts per rank (DeepSeek's DualPipe).
    for (int i = 0; i < (half_ranks - h - 1) * 2; ++i) F(0);        // 1: forwards of direction 0
    for (int i = 0; i < h + 1; ++i) F(0), F(1);                       // 2: both directions
    for (int i = 0; i < half_ranks - h - 1; ++i) B(1, true), W(), F(1);  // 3: zero-bubble B, a W, F
    for (int i = 0; i < half - pp + h + 1; ++i) {                     // 4: the overlapped steady state
      if (i == 0 && middle) F(0), B(1, false);  // the middle ranks do not overlap their first pair
      else FB(0, 1);
      FB(1, 0);
    }
    for (int i = 0; i < half_ranks - h - 1; ++i) B(1, false), FB(1, 0);  // 5
    bool zero_bubble = false;                                          // 6: backwards, the later half deferring W
    for (int i = 0; i < h + 1; ++i) {
      if (i == (h + 1) / 2 && h % 2 == 1) zero_bubble = true;
      B(1, zero_bubble);
      if (i == (h + 1) / 2 && h % 2 == 0) zero_bubble = true;
      B(0, zero_bubble);
    }
    for (int i = 0; i < half_ranks - h - 1; ++i) W(), B(0, true);      // 7
    for (int i = 0; i < h + 1; ++i) W();                               // 8: the remaining W
    if (!deferred.empty()) fail("dualpipe: rank ", r, " left ", deferred.size(), " weight gradients");
    if (next_f[0] != half || next_f[1] != half || next_b[0] != half || next_b[1] != half)
      fail("dualpipe: rank ", r, " does not run every micro-batch once");
  }
  return s;
}

Schedule dualpipev(int pp, int m) {
  if (pp < 1) fail("dualpipev: at least one rank is needed, not ", pp);
  if (m < 2 * pp) fail("dualpipev: micro-batches must be >= 2 x ranks (", 2 * pp, "), not ", m);
  // Cut in half: DualPipe's first P of 2P ranks, whose two directions become one stream's
  // two phases (rank r's second stage, 2P-1-r, is where DualPipe's rank 2P-1-r would be).
  Schedule whole = dualpipe(2 * pp, 2 * m);
  Schedule s{"dualpipev", pp, m, 2, true, {}};
  s.ranks.assign(whole.ranks.begin(), whole.ranks.begin() + pp);
  return s;
}

Schedule make_schedule(const std::string& name, int pp, int m) {
  if (name == "1f1b") return one_f_one_b(pp, m);
  if (name == "zb1p") return zero_bubble_h1(pp, m);
  if (name == "dualpipe") return dualpipe(pp, m);
  if (name == "dualpipev") return dualpipev(pp, m);
  fail("unknown pipeline schedule '", name, "' (1f1b, zb1p, dualpipe, dualpipev)");
}

Timeline simulate(const Schedule& s, const Costs& c) { return simulate(s, std::vector<Costs>(size_t(s.pp), c)); }

Timeline simulate(const Schedule& s, const std::vector<Costs>& per_rank) {
  const int P = s.pp;
  if (int(per_rank.size()) != P) fail(s.name, ": ", per_rank.size(), " ranks' costs for ", P, " ranks");
  std::map<Key, double> done;
  auto when = [&](int kind, int dir, int micro, int stage) -> double {
    const auto it = done.find({kind, dir, micro, stage});
    return it == done.end() ? -1 : it->second;
  };
  // When an op's inputs exist (-1: not yet known).
  auto ready = [&](int rank, int kind, int dir, int micro) -> double {
    const int stage = s.stage_of(rank, dir), stream = s.stream(dir);
    double t = 0;
    auto need = [&](double x) { t = (t < 0 || x < 0) ? -1 : std::max(t, x); };
    if (kind == kF) {
      if (stage > 0) need(when(kF, stream, micro, stage - 1));
    } else if (kind == kB) {
      need(when(kF, stream, micro, stage));
      if (stage < s.stages() - 1) need(when(kB, stream, micro, stage + 1));
    } else {
      need(when(kB, stream, micro, stage));
    }
    return t;
  };
  Timeline tl;
  tl.ranks.resize(size_t(P));
  tl.busy.assign(size_t(P), 0), tl.bubble.assign(size_t(P), 0), tl.peak_activations.assign(size_t(P), 0);
  std::vector<size_t> next(size_t(P), 0);
  std::vector<double> free(size_t(P), 0);
  for (bool progress = true; progress;) {
    progress = false;
    for (int r = 0; r < P; ++r) {
      const auto& ops = s.ranks[size_t(r)];
      while (next[size_t(r)] < ops.size()) {
        const Op& op = ops[next[size_t(r)]];
        double t;
        if (op.kind == Chunk::FB) {
          const double a = ready(r, kF, op.dir, op.micro), b = ready(r, kB, op.dir2, op.micro2);
          t = a < 0 || b < 0 ? -1 : std::max(a, b);
        } else {
          t = ready(r, op.kind == Chunk::F ? kF : op.kind == Chunk::B ? kB : kW, op.dir, op.micro);
        }
        if (t < 0) break;
        const double start = std::max(t, free[size_t(r)]), end = start + duration(op, per_rank[size_t(r)]);
        auto mark = [&](int kind, int dir, int micro) { done[{kind, s.stream(dir), micro, s.stage_of(r, dir)}] = end; };
        if (op.kind == Chunk::F) mark(kF, op.dir, op.micro);
        if (op.kind == Chunk::B) {
          mark(kB, op.dir, op.micro);
          if (op.full_b) mark(kW, op.dir, op.micro);
        }
        if (op.kind == Chunk::W) mark(kW, op.dir, op.micro);
        if (op.kind == Chunk::FB) mark(kF, op.dir, op.micro), mark(kB, op.dir2, op.micro2), mark(kW, op.dir2, op.micro2);
        tl.ranks[size_t(r)].push_back({op, start, end});
        tl.busy[size_t(r)] += end - start;
        free[size_t(r)] = end;
        ++next[size_t(r)];
        progress = true;
      }
    }
  }
  for (int r = 0; r < P; ++r)
    if (next[size_t(r)] < s.ranks[size_t(r)].size())
      fail(s.name, ": rank ", r, " waits forever at its op ", next[size_t(r)], " (the schedule deadlocks)");
  for (int r = 0; r < P; ++r) tl.makespan = std::max(tl.makespan, free[size_t(r)]);
  for (int r = 0; r < P; ++r) {
    // Idle time within the step, as Table 2 counts a bubble (its figures: the worst rank).
    const auto& ops = tl.ranks[size_t(r)];
    tl.bubble[size_t(r)] = tl.makespan - tl.busy[size_t(r)];
    // Activations: a forward's are held until the backward for its inputs has run (what W
    // still needs, the layers' inputs and output gradients, is counted as the zero-bubble
    // paper and Table 2 count it: not as a micro-batch's activations).
    int held = 0, peak = 0;
    for (const Timed& t : ops) {
      if (t.op.kind == Chunk::F || t.op.kind == Chunk::FB) ++held;
      peak = std::max(peak, held);
      if (t.op.kind == Chunk::B || t.op.kind == Chunk::FB) --held;
    }
    tl.peak_activations[size_t(r)] = peak;
  }
  return tl;
}

double table2_bubble(const std::string& name, int pp, const Costs& c) {
  if (name == "1f1b") return (pp - 1) * (c.f + c.b);
  if (name == "zb1p") return (pp - 1) * (c.f + c.b - 2 * c.w);
  if (name == "dualpipe") return (pp / 2 - 1) * (c.fb + c.b - 3 * c.w);
  fail("unknown pipeline schedule '", name, "'");
}

int table2_parameters(const std::string& name) { return name == "dualpipe" ? 2 : 1; }
int table2_activations(const std::string& name, int pp) { return name == "dualpipe" ? pp + 1 : pp; }

std::string timeline_svg(const Schedule& s, const Timeline& t) {
  const double scale = 900.0 / std::max(t.makespan, 1e-9), row = 26;
  std::string svg;
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" font-size=\"10\">\n",
                int(960), int(row * (s.pp + 2)));
  svg += buf;
  std::snprintf(buf, sizeof buf, "<text x=\"4\" y=\"14\">%s, %d ranks, %d micro-batches, step %.2f</text>\n", s.name.c_str(), s.pp,
                s.micro_batches, t.makespan);
  svg += buf;
  for (int r = 0; r < s.pp; ++r) {
    const double y = row * (r + 1);
    std::snprintf(buf, sizeof buf, "<text x=\"4\" y=\"%.1f\">%d</text>\n", y + 16, r);
    svg += buf;
    for (const Timed& c : t.ranks[size_t(r)]) {
      const char* colour = c.op.kind == Chunk::F ? (c.op.dir ? "#f4b183" : "#9dc3e6")
                           : c.op.kind == Chunk::B ? (c.op.dir ? "#c55a11" : "#2e75b6")
                           : c.op.kind == Chunk::W ? "#a9d18e" : "#ffd966";
      std::snprintf(buf, sizeof buf, "<rect x=\"%.2f\" y=\"%.1f\" width=\"%.2f\" height=\"%.1f\" fill=\"%s\" stroke=\"#fff\"/>\n",
                    50 + c.start * scale, y + 2, (c.end - c.start) * scale, row - 4, colour);
      svg += buf;
      const std::string label = (c.op.kind == Chunk::F ? "F" : c.op.kind == Chunk::B ? "B" : c.op.kind == Chunk::W ? "W" : "FB") +
                                std::to_string(c.op.micro);
      std::snprintf(buf, sizeof buf, "<text x=\"%.2f\" y=\"%.1f\" fill=\"#000\">%s</text>\n", 52 + c.start * scale, y + 16, label.c_str());
      svg += buf;
    }
  }
  svg += "</svg>\n";
  return svg;
}

}  // namespace dsv3::dist
