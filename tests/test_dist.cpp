// Pipeline schedules (dist/schedule.h): every op list runs each micro-batch's forward,
// backward and weight gradient exactly once per stage, in dependency order; the simulated
// step reproduces DeepSeek-V3's Table 2 (bubble, parameter copies, activations) exactly over
// a grid of ranks, micro-batches and chunk costs; bad sizes are named; and `dsv3 schedule`.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <tuple>

#include "core/error.h"
#include "dist/schedule.h"

namespace dsv3 {
namespace {

using dist::Chunk;

// Each (direction, micro-batch) gets, on every stage, one forward, one backward for the
// inputs and one for the weights (folded into a whole backward or an overlapped pair).
void expect_complete(const dist::Schedule& s) {
  std::map<std::tuple<int, int, int, int>, int> count;  // (what, dir, micro, rank)
  for (int r = 0; r < s.pp; ++r)
    for (const dist::Op& op : s.ranks[size_t(r)]) {
      if (op.kind == Chunk::F) ++count[{0, op.dir, op.micro, r}];
      if (op.kind == Chunk::B) ++count[{1, op.dir, op.micro, r}], count[{2, op.dir, op.micro, r}] += op.full_b;
      if (op.kind == Chunk::W) ++count[{2, op.dir, op.micro, r}];
      if (op.kind == Chunk::FB) ++count[{0, op.dir, op.micro, r}], ++count[{1, op.dir2, op.micro2, r}], ++count[{2, op.dir2, op.micro2, r}];
    }
  const int dirs = s.stages_per_rank, per_dir = s.micro_batches / dirs;
  EXPECT_EQ(count.size(), size_t(3 * dirs * per_dir * s.pp)) << s.name;
  for (const auto& [key, n] : count) EXPECT_EQ(n, 1) << s.name << ": a chunk runs " << n << " times";
}

TEST(PipelineSchedule, ReproducesTable2OverAGrid) {
  // Costs with a forward as long as a backward for inputs (F = B - W), the case Table 2's
  // closed forms are derived for, and others.
  const std::vector<dist::Costs> equal = {{1, 2, 1, 2.5}, {1, 2, 1, 2}, {1, 2, 1, 3}, {2, 3, 1, 4}, {1, 1.5, 0.5, 2}, {3, 4.5, 1.5, 5}};
  const std::vector<dist::Costs> other = {{1, 2, 0.5, 2.2}, {1, 1, 0.5, 1.5}, {2, 2.5, 1, 3}};
  int checked = 0;
  for (const std::string name : {"1f1b", "zb1p", "dualpipe"})
    for (int pp : {2, 4, 6, 8, 16})
      for (int m : {2 * pp, 2 * pp + 2, 3 * pp + (pp % 2), 4 * pp}) {
        const dist::Schedule s = dist::make_schedule(name, pp, m);
        expect_complete(s);
        for (const auto* costs : {&equal, &other})
          for (const dist::Costs& c : *costs) {
            if (costs == &other && name == "dualpipe") continue;  // its closed form assumes F = B - W
            const dist::Timeline t = dist::simulate(s, c);
            const double bubble = *std::max_element(t.bubble.begin(), t.bubble.end());
            EXPECT_NEAR(bubble, dist::table2_bubble(name, pp, c), 1e-9) << name << " P=" << pp << " M=" << m << " F=" << c.f << " B=" << c.b
                                                                        << " W=" << c.w << " FB=" << c.fb;
            EXPECT_EQ(*std::max_element(t.peak_activations.begin(), t.peak_activations.end()), dist::table2_activations(name, pp))
                << name << " P=" << pp << " M=" << m;
            EXPECT_EQ(s.stages_per_rank, dist::table2_parameters(name));
            ++checked;
          }
      }
  EXPECT_GT(checked, 300);
}

TEST(PipelineSchedule, DualPipeVRunsEveryChunkOfTheVOnce) {
  // DualPipeV: 2P stages, rank r holding r and 2P-1-r; each micro-batch's F, B and W once on
  // every stage, and the simulation (phase 1 after phase 0 of the same micro-batch) ends.
  for (int pp : {1, 2, 3, 4, 8})
    for (int m : {2 * pp, 2 * pp + 1, 3 * pp + 2}) {
      const dist::Schedule s = dist::dualpipev(pp, m);
      EXPECT_TRUE(s.v_shape);
      EXPECT_EQ(s.stages(), 2 * pp);
      std::map<std::tuple<int, int, int>, int> count;  // (what, stage, micro)
      for (int r = 0; r < pp; ++r)
        for (const dist::Op& op : s.ranks[size_t(r)]) {
          const int f = s.stage_of(r, op.dir), b = s.stage_of(r, op.kind == Chunk::FB ? op.dir2 : op.dir);
          const int bm = op.kind == Chunk::FB ? op.micro2 : op.micro;
          if (op.kind == Chunk::F || op.kind == Chunk::FB) ++count[{0, f, op.micro}];
          if (op.kind == Chunk::B || op.kind == Chunk::FB) ++count[{1, b, bm}];
          if ((op.kind == Chunk::B && op.full_b) || op.kind == Chunk::FB || op.kind == Chunk::W) ++count[{2, b, bm}];
        }
      EXPECT_EQ(count.size(), size_t(3 * 2 * pp * m)) << "P=" << pp << " M=" << m;
      for (const auto& [key, n] : count) EXPECT_EQ(n, 1) << "P=" << pp << " M=" << m;
      const dist::Timeline t = dist::simulate(s, {1, 2, 1, 2.5});
      EXPECT_GT(t.makespan, 0);
    }
  EXPECT_THROW(dist::dualpipev(4, 7), Error);  // M < 2P
}

TEST(PipelineSchedule, OneFOneBIsItsTextbookOrder) {
  const dist::Schedule s = dist::one_f_one_b(4, 6);
  auto text = [](const std::vector<dist::Op>& ops) {
    std::string out;
    for (const dist::Op& op : ops) out += (op.kind == Chunk::F ? "F" : "B") + std::to_string(op.micro) + " ";
    return out;
  };
  EXPECT_EQ(text(s.ranks[0]), "F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5 ");
  EXPECT_EQ(text(s.ranks[3]), "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 ");
  const dist::Timeline t = dist::simulate(s, {1, 2, 1, 2.5});
  EXPECT_DOUBLE_EQ(t.makespan, (6 + 3) * 3.0);  // (M + P - 1)(F + B)
  // Per-rank costs (what the executed pipeline measures): a slower last stage sets the pace
  // of the steady state; the first rank's wait is its bubble.
  std::vector<dist::Costs> costs(4, dist::Costs{1, 2, 1, 2.5});
  EXPECT_DOUBLE_EQ(dist::simulate(s, costs).makespan, t.makespan);
  costs[3] = {2, 4, 2, 5};
  const dist::Timeline slow = dist::simulate(s, costs);
  // The last rank runs F0 once the first three forwards arrive (t = 3), then its 6 x (2 + 4)
  // back to back; B5 then travels back through ranks 2, 1, 0 (2 each).
  EXPECT_DOUBLE_EQ(slow.makespan, 3 + 6 * 6.0 + 3 * 2);
  EXPECT_DOUBLE_EQ(slow.bubble[0], slow.makespan - 6 * 3.0);
  EXPECT_THROW(dist::simulate(s, std::vector<dist::Costs>(3)), Error);
}

TEST(PipelineSchedule, BadSizesAreNamed) {
  using testing::HasSubstr;
  auto message = [](auto&& f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_THAT(message([] { dist::dualpipe(6, 10); }), HasSubstr(">= 2 x ranks"));
  EXPECT_THAT(message([] { dist::dualpipe(3, 12); }), HasSubstr("even"));
  EXPECT_THAT(message([] { dist::dualpipe(4, 9); }), HasSubstr("even"));
  EXPECT_THAT(message([] { dist::one_f_one_b(1, 4); }), HasSubstr("at least 2 ranks"));
  EXPECT_THAT(message([] { dist::make_schedule("gpipe", 4, 8); }), HasSubstr("unknown pipeline schedule 'gpipe'"));
}

TEST(PipelineSchedule, CommandPrintsJsonAndDrawsTheTimeline) {
  const std::string svg = testing::TempDir() + "/dsv3_schedule.svg";
  const std::string cmd = std::string(DSV3_BINARY) + " schedule --pp 8 --micro-batches 20 --schedule dualpipe --json --svg " + svg;
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(cmd.c_str(), "r"), pclose);
  std::string out;
  char buf[4096];
  for (size_t n; (n = fread(buf, 1, sizeof buf, pipe.get())) > 0;) out.append(buf, n);
  const auto j = nlohmann::json::parse(out);
  EXPECT_EQ(j["schedule"], "dualpipe");
  EXPECT_DOUBLE_EQ(j["bubble"].get<double>(), j["bubble_table2"].get<double>());
  EXPECT_EQ(j["parameter_copies"], 2);
  EXPECT_EQ(j["peak_activations"], 9);
  EXPECT_EQ(j["ranks"].size(), 8u);
  FILE* f = fopen(svg.c_str(), "r");
  ASSERT_NE(f, nullptr);
  fclose(f);
  EXPECT_NE(system((std::string(DSV3_BINARY) + " schedule --pp 3 --schedule dualpipe 2>/dev/null").c_str()), 0);
}

}  // namespace
}  // namespace dsv3
