// dsv3 schedule: a pipeline schedule's timeline and costs (DeepSeek-V3 Table 2), simulated.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "dist/schedule.h"

namespace dsv3::cli {

namespace {

struct ScheduleFlags {
  int pp = 4, micro_batches = 8;
  std::string schedule = "dualpipe", svg;
  dist::Costs costs;
  bool json = false;
};

void run(const ScheduleFlags& f) {
  const dist::Costs& c = f.costs;
  if (!(c.f > 0) || !(c.b > 0) || !(c.w > 0) || !(c.fb > 0)) fail("--f, --b, --w and --fb must be > 0");
  if (!(c.w < c.b)) fail("--w (the weights' part of a backward) must be less than --b (the whole backward)");
  const dist::Schedule s = dist::make_schedule(f.schedule, f.pp, f.micro_batches);
  const dist::Timeline t = dist::simulate(s, c);
  const double bubble = *std::max_element(t.bubble.begin(), t.bubble.end());
  const int activations = *std::max_element(t.peak_activations.begin(), t.peak_activations.end());
  const bool in_table = f.schedule != "dualpipev";  // Table 2 lists 1F1B, ZB1P and DualPipe
  const double table = in_table ? dist::table2_bubble(f.schedule, f.pp, c) : -1;
  if (!f.svg.empty()) {
    std::ofstream out(f.svg);
    if (!(out << dist::timeline_svg(s, t))) fail("--svg: cannot write ", f.svg);
  }
  if (f.json) {
    nlohmann::json j = {{"schedule", s.name}, {"pp", s.pp}, {"micro_batches", s.micro_batches},
                        {"costs", {{"f", c.f}, {"b", c.b}, {"w", c.w}, {"fb", c.fb}}}, {"step", t.makespan},
                        {"bubble", bubble}, {"parameter_copies", s.stages_per_rank}, {"peak_activations", activations},
                        {"ranks", nlohmann::json::array()}};
    if (in_table) j["bubble_table2"] = table, j["activations_table2"] = dist::table2_activations(f.schedule, f.pp);
    for (int r = 0; r < s.pp; ++r)
      j["ranks"].push_back({{"busy", t.busy[size_t(r)]}, {"bubble", t.bubble[size_t(r)]}, {"peak_activations", t.peak_activations[size_t(r)]},
                            {"ops", s.ranks[size_t(r)].size()}});
    std::printf("%s\n", j.dump(2).c_str());
    return;
  }
  std::printf("%s: %d ranks, %d micro-batches; chunk costs F %.3g, B %.3g (W %.3g of it), F&B %.3g\n", s.name.c_str(), s.pp,
              s.micro_batches, c.f, c.b, c.w, c.fb);
  std::printf("%4s %10s %10s %12s\n", "rank", "busy", "bubble", "activations");
  for (int r = 0; r < s.pp; ++r)
    std::printf("%4d %10.3f %10.3f %12d\n", r, t.busy[size_t(r)], t.bubble[size_t(r)], t.peak_activations[size_t(r)]);
  if (!in_table) {  // each chunk is half a DualPipe stage: the model is cut into 2P stages
    std::printf("step %.3f; bubble %.3f (%.1f %% of the step) on the worst rank (Table 2 does not list DualPipeV)\n", t.makespan,
                bubble, 100 * bubble / t.makespan);
    std::printf("stages per rank 2 (halves of a 2P-stage model: one copy of the parameters); peak activations %d chunks\n",
                activations);
  } else {
    std::printf("step %.3f; bubble %.3f (%.1f %% of the step) on the worst rank; Table 2's closed form: %.3f%s\n", t.makespan, bubble,
                100 * bubble / t.makespan, table,
                f.schedule == "dualpipe" && c.f != c.b - c.w ? " (derived for F = B - W; this run's costs differ)" : "");
    std::printf("parameter copies per rank %dx (Table 2: %dx); peak activations %d micro-batch chunks (Table 2: %d)\n",
                s.stages_per_rank, dist::table2_parameters(f.schedule), activations, dist::table2_activations(f.schedule, f.pp));
  }
  if (!f.svg.empty()) std::printf("timeline: %s\n", f.svg.c_str());
}

}  // namespace

void add_schedule(CLI::App& app) {
  auto f = std::make_shared<ScheduleFlags>();
  CLI::App* cmd = app.add_subcommand("schedule", "simulate a pipeline-parallel schedule: timeline, bubble, memory (DeepSeek-V3 Table 2)");
  cmd->add_option("--pp", f->pp, "pipeline ranks (default 4)");
  cmd->add_option("--micro-batches", f->micro_batches, "micro-batches per step (default 8)");
  cmd->add_option("--schedule", f->schedule, "1f1b, zb1p, dualpipe (default) or dualpipev")
      ->check(CLI::IsMember({"1f1b", "zb1p", "dualpipe", "dualpipev"}));
  cmd->add_option("--f", f->costs.f, "time of a forward chunk (default 1)");
  cmd->add_option("--b", f->costs.b, "time of a whole backward chunk (default 2)");
  cmd->add_option("--w", f->costs.w, "time of its backward-for-weights part (default 1)");
  cmd->add_option("--fb", f->costs.fb, "time of a forward and a backward chunk overlapped (default 2.5)");
  cmd->add_option("--svg", f->svg, "draw the timeline (one row per rank) into this SVG file");
  cmd->add_flag("--json", f->json, "one JSON object instead of the table");
  cmd->callback([f] { run(*f); });
}

}  // namespace dsv3::cli
