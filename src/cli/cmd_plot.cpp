// dsv3 plot: compare training runs. Reads each run's metrics.csv (dsv3 train), draws one
// column against the step for all of them in an SVG, writes the curves side by side as
// one CSV, and prints a table of the final values, each relative to a baseline run. A label
// may group the runs of several seeds: its curve is then the mean with a +-sd band, and its
// gap to the baseline a mean over seed-by-seed pairs with a standard error and a 95 % interval.
#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>

#include "cli/commands.h"
#include "core/error.h"
#include "train/plot.h"

namespace dsv3::cli {

namespace {

namespace fs = std::filesystem;

struct PlotFlags {
  std::vector<std::string> runs;
  std::string column = "val_loss", out, csv, baseline, title, gap_out;
  int64_t from_step = 0;
};

struct Run {
  std::string label, path;
  std::map<int64_t, double> values;  // step -> value (a step repeated after a resume: the last)
  int64_t last_step = 0, last_tokens = 0;
  double final_value() const { return values.rbegin()->second; }
};

// The runs of one label: one run, or the same configuration from several seeds (LABEL=P1,P2,..).
// The i-th run of a group is paired with the i-th run of the baseline's group (the same seed).
struct Group {
  std::string label;
  std::vector<Run> runs;
};

struct MeanSd {
  double mean = 0, sd = 0;  // sd: the sample standard deviation (n - 1); 0 for one value
};
MeanSd mean_sd(const std::vector<double>& v) {
  MeanSd m;
  for (double x : v) m.mean += x / double(v.size());
  for (double x : v) m.sd += (x - m.mean) * (x - m.mean);
  m.sd = v.size() > 1 ? std::sqrt(m.sd / double(v.size() - 1)) : 0.0;
  return m;
}

// Two-sided 95 % quantile of Student's t with `df` degrees of freedom (the confidence interval
// of a mean over few seeds is wider than +-2 standard errors).
double t95(int64_t df) {
  static const double kT[] = {12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
                              2.201,  2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086};
  if (df < 1) return NAN;
  // Beyond the table, the quantile of the interval's smallest df (a slightly wider interval).
  return df <= 20 ? kT[df - 1] : df <= 30 ? 2.086 : df <= 60 ? 2.042 : df <= 120 ? 2.000 : 1.980;
}

std::vector<std::string> split_csv(const std::string& line) {
  std::vector<std::string> out;
  std::stringstream ss(line);
  std::string field;
  while (std::getline(ss, field, ',')) out.push_back(field);
  if (!line.empty() && line.back() == ',') out.emplace_back();
  return out;
}

// One run from its metrics.csv (a run folder or the file itself), labelled `label`.
Run read_run(const std::string& label, const std::string& path, const std::string& column) {
  Run r;
  r.label = label;
  r.path = fs::is_directory(path) ? (fs::path(path) / "metrics.csv").string() : path;
  std::ifstream in(r.path);
  if (!in) fail(r.path, ": cannot open (expected a dsv3 train run folder or its metrics.csv)");
  std::string line;
  if (!std::getline(in, line)) fail(r.path, ": empty file");
  const std::vector<std::string> header = split_csv(line);
  auto index_of = [&](const std::string& name) -> int64_t {
    for (size_t i = 0; i < header.size(); ++i)
      if (header[i] == name) return int64_t(i);
    return -1;
  };
  const int64_t col = index_of(column), step_col = index_of("step"), tokens_col = index_of("tokens");
  if (step_col < 0) fail(r.path, ": no 'step' column (not a dsv3 train metrics.csv?)");
  if (col < 0) {
    std::string names;
    for (const auto& h : header) names += (names.empty() ? "" : ", ") + h;
    fail(r.path, ": no column '", column, "' (it has: ", names, ")");
  }
  for (int64_t line_no = 2; std::getline(in, line); ++line_no) {
    if (line.empty()) continue;
    const std::vector<std::string> f = split_csv(line);
    auto number = [&](int64_t i, bool required) -> double {
      if (i < 0 || i >= int64_t(f.size()) || f[size_t(i)].empty()) {
        if (required) fail(r.path, ":", line_no, ": missing ", header[size_t(std::max<int64_t>(i, 0))]);
        return NAN;
      }
      size_t used = 0;
      double v = 0;
      try {
        v = std::stod(f[size_t(i)], &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used != f[size_t(i)].size()) fail(r.path, ":", line_no, ": ", header[size_t(i)], " '", f[size_t(i)], "' is not a number");
      return v;
    };
    const double step_value = number(step_col, true);
    if (!std::isfinite(step_value) || step_value < 0) fail(r.path, ":", line_no, ": step ", step_value, " is not a step");
    const int64_t step = int64_t(step_value);
    r.last_step = std::max(r.last_step, step);
    if (tokens_col >= 0) r.last_tokens = std::max(r.last_tokens, int64_t(number(tokens_col, true)));
    const double v = number(col, false);
    if (std::isnan(v)) r.values.erase(step);
    else r.values[step] = v;
  }
  if (r.values.empty()) fail(r.path, ": no values in column '", column, "'");
  return r;
}

// "LABEL=PATH[,PATH...]" or "PATH" (label: the run folder's name); a path is a run folder or
// its metrics.csv. A spec that exists as a path as a whole is a path (a folder named lr=2e-3).
Group read_group(const std::string& spec, const std::string& column) {
  size_t eq = spec.find('=');
  if (eq != std::string::npos && (fs::exists(spec) || spec.substr(0, eq).find('/') != std::string::npos))
    eq = std::string::npos;
  Group g;
  if (eq == std::string::npos) {
    const fs::path p = fs::is_directory(spec) ? fs::path(spec) / "metrics.csv" : fs::path(spec);
    g.label = p.parent_path().filename().string();
    if (g.label.empty()) g.label = spec;
    g.runs.push_back(read_run(g.label, spec, column));
    return g;
  }
  g.label = spec.substr(0, eq);
  if (g.label.empty()) fail("'", spec, "': empty label before '='");
  std::stringstream paths(spec.substr(eq + 1));
  for (std::string path; std::getline(paths, path, ',');) {
    if (path.empty()) fail("'", spec, "': an empty path in the list");
    g.runs.push_back(read_run(g.label, path, column));
  }
  if (g.runs.empty()) fail("'", spec, "': no path after '='");
  return g;
}

// The mean of a group's runs at each step where all of them have a value, with the sd.
std::map<int64_t, MeanSd> mean_curve(const Group& g) {
  std::map<int64_t, MeanSd> out;
  for (auto [step, v0] : g.runs[0].values) {
    std::vector<double> v;
    for (const Run& r : g.runs)
      if (auto it = r.values.find(step); it != r.values.end()) v.push_back(it->second);
    if (v.size() == g.runs.size()) out[step] = mean_sd(v);
  }
  return out;
}

// The relative difference of a group's final values to the baseline's, in %: paired run by
// run when both have as many runs (mean over the pairs), else of the means (unpaired).
struct Gap {
  double mean = 0, se = 0, ci95 = NAN;  // ci95: half-width of the 95 % confidence interval
  bool paired = true;
  std::vector<double> per_run;          // the paired differences
};
Gap gap_to(const Group& g, const Group& base) {
  Gap gap;
  const size_t n = g.runs.size(), nb = base.runs.size();
  if (n == nb) {
    for (size_t i = 0; i < n; ++i) {
      const double b = base.runs[i].final_value();
      gap.per_run.push_back(b != 0 ? (g.runs[i].final_value() - b) / b * 100 : NAN);
    }
    const MeanSd d = mean_sd(gap.per_run);
    gap.mean = d.mean, gap.se = d.sd / std::sqrt(double(n));
    gap.ci95 = n > 1 ? t95(int64_t(n) - 1) * gap.se : NAN;
    return gap;
  }
  std::vector<double> v, vb;
  for (const Run& r : g.runs) v.push_back(r.final_value());
  for (const Run& r : base.runs) vb.push_back(r.final_value());
  const MeanSd m = mean_sd(v), mb = mean_sd(vb);
  gap.paired = false;
  gap.mean = mb.mean != 0 ? (m.mean - mb.mean) / mb.mean * 100 : NAN;
  gap.se = std::sqrt(m.sd * m.sd / double(n) + mb.sd * mb.sd / double(nb)) / std::fabs(mb.mean) * 100;
  const int64_t df = int64_t(std::min(n, nb)) - 1;  // conservative (Welch's df is at least this)
  gap.ci95 = df >= 1 ? t95(df) * gap.se : NAN;
  return gap;
}

// The gap of a group to the baseline by step, in %: paired seed by seed where the counts
// match (mean, and its standard error in .sd), else the gap of the means (.sd = 0).
std::map<int64_t, MeanSd> gap_curve(const Group& g, const Group& base, const std::map<int64_t, MeanSd>& g_mean,
                                    const std::map<int64_t, MeanSd>& base_mean) {
  std::map<int64_t, MeanSd> out;
  const bool paired = g.runs.size() == base.runs.size();
  for (auto [step, m] : g_mean) {
    const auto b = base_mean.find(step);
    if (b == base_mean.end()) continue;
    if (!paired) {
      if (b->second.mean != 0) out[step] = {(m.mean - b->second.mean) / b->second.mean * 100, 0};
      continue;
    }
    std::vector<double> d;
    for (size_t i = 0; i < g.runs.size(); ++i) {
      const double bv = base.runs[i].values.at(step);
      if (bv != 0) d.push_back((g.runs[i].values.at(step) - bv) / bv * 100);
    }
    if (d.size() != g.runs.size()) continue;
    MeanSd gap = mean_sd(d);
    gap.sd /= std::sqrt(double(d.size()));
    out[step] = gap;
  }
  return out;
}

void run(const PlotFlags& f) {
  std::vector<Group> groups;
  std::set<std::string> labels;
  bool seeds = false;  // some label has several runs
  for (const std::string& spec : f.runs) {
    groups.push_back(read_group(spec, f.column));
    const std::string& label = groups.back().label;
    if (label.find_first_of(",<>&\"'") != std::string::npos)
      fail("run label '", label, "' has a character that CSV or SVG would need escaped (, < > & \" ')");
    if (!labels.insert(label).second) fail("two runs are labelled '", label, "': name them with LABEL=PATH");
    seeds = seeds || groups.back().runs.size() > 1;
  }
  const Group* base = nullptr;
  if (!f.baseline.empty()) {
    for (const Group& g : groups)
      if (g.label == f.baseline) base = &g;
    if (!base) fail("--baseline ", f.baseline, ": no run has that label");
  }
  std::vector<std::map<int64_t, MeanSd>> means;
  for (const Group& g : groups) {
    means.push_back(mean_curve(g));
    if (means.back().empty()) fail("'", g.label, "': its runs have no step with a ", f.column, " in common");
  }

  static const char* kColors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"};
  std::vector<Curve> curves;  // the mean over a label's runs, shaded +- sd where it has several
  for (size_t i = 0; i < groups.size(); ++i) {
    const size_t n = groups[i].runs.size();
    Curve c{n > 1 ? cat(groups[i].label, " (", n, " seeds, mean ± sd)") : groups[i].label, kColors[i % 8], {}, {}};
    for (auto [step, m] : means[i]) {
      if (step < f.from_step) continue;
      c.points.push_back({double(step), m.mean});
      if (n > 1) c.band.push_back({m.mean - m.sd, m.mean + m.sd});
    }
    curves.push_back(std::move(c));
  }
  if (!f.out.empty())
    write_svg_plot(f.out, f.title.empty() ? f.column + " by step" : f.title, curves);
  if (!f.gap_out.empty()) {  // each label's gap to the baseline, in %; the baseline is the zero line
    if (!base) fail("--gap-out needs --baseline");
    std::vector<Curve> gaps;
    const auto& base_mean = means[size_t(base - groups.data())];
    for (size_t i = 0; i < groups.size(); ++i) {
      const Group& g = groups[i];
      Curve c{g.label, kColors[i % 8], {}, {}};
      if (&g == base) {
        for (auto [step, m] : base_mean)
          if (step >= f.from_step) c.points.push_back({double(step), 0.0});
        gaps.push_back(std::move(c));
        continue;
      }
      const size_t n = g.runs.size();
      const bool paired = n == base->runs.size();
      if (!paired) c.label += " (gap of the means)";
      else if (n > 1) c.label += cat(" (", n, " seed pairs, mean ± s.e.)");
      for (auto [step, gap] : gap_curve(g, *base, means[i], base_mean)) {
        if (step < f.from_step) continue;
        c.points.push_back({double(step), gap.mean});
        if (paired && n > 1) c.band.push_back({gap.mean - gap.sd, gap.mean + gap.sd});
      }
      gaps.push_back(std::move(c));
    }
    write_svg_plot(f.gap_out, cat(f.column, " relative to ", base->label, ", %"), gaps);
  }

  if (!f.csv.empty()) {  // step, then per label its value (the mean) and, over seeds, the sd
    std::set<int64_t> steps;
    for (const auto& m : means)
      for (auto [step, v] : m) steps.insert(step);
    std::ofstream out(f.csv + ".tmp");
    out.precision(8);
    out << "step";
    for (const Group& g : groups) out << "," << g.label << (g.runs.size() > 1 ? cat(",", g.label, "_sd") : "");
    out << "\n";
    for (int64_t step : steps) {
      out << step;
      for (size_t i = 0; i < groups.size(); ++i) {
        const auto it = means[i].find(step);
        out << ",";
        if (it != means[i].end()) out << it->second.mean;
        if (groups[i].runs.size() > 1) {
          out << ",";
          if (it != means[i].end()) out << it->second.sd;
        }
      }
      out << "\n";
    }
    out.close();
    if (!out) fail(f.csv, ": write failed");
    fs::rename(f.csv + ".tmp", f.csv);
  }

  for (const Group& g : groups)
    for (const Run& r : g.runs) {
      const int64_t step = r.values.rbegin()->first;
      if (step != r.last_step)
        std::fprintf(stderr, "note: %s (%s) ran to step %ld; its last %s is at step %ld\n", g.label.c_str(),
                     r.path.c_str(), long(r.last_step), f.column.c_str(), long(step));
      if (step != g.runs[0].values.rbegin()->first)
        std::fprintf(stderr, "note: the runs of %s end at different steps (%ld in %s, %ld in %s)\n", g.label.c_str(),
                     long(g.runs[0].values.rbegin()->first), g.runs[0].path.c_str(), long(step), r.path.c_str());
    }

  // The table: each run's last value of the column.
  if (!seeds) {
    std::printf("| run | steps | tokens | final %s |%s\n", f.column.c_str(), base ? cat(" vs ", base->label, " |").c_str() : "");
    std::printf("|---|---:|---:|---:|%s\n", base ? "---:|" : "");
    for (const Group& g : groups) {
      const Run& r = g.runs[0];
      std::printf("| %s | %ld | %ld | %.4f |", r.label.c_str(), long(r.values.rbegin()->first), long(r.last_tokens),
                  r.final_value());
      if (base) {
        const double b = base->runs[0].final_value();
        if (b != 0) std::printf(" %+.3f%% |", (r.final_value() - b) / b * 100);
        else std::printf(" n/a |");
      }
      std::printf("\n");
    }
    return;
  }
  // Over seeds: mean ± sd of the final values; against the baseline the mean gap ± its
  // standard error and the 95 % confidence interval, paired seed by seed where possible.
  std::printf("| run | seeds | steps | tokens | final %s, mean ± sd |%s\n", f.column.c_str(),
              base ? cat(" vs ", base->label, ", mean ± s.e. | 95% interval |").c_str() : "");
  std::printf("|---|---:|---:|---:|---:|%s\n", base ? "---:|---|" : "");
  for (const Group& g : groups) {
    std::vector<double> finals;
    for (const Run& r : g.runs) finals.push_back(r.final_value());
    const MeanSd m = mean_sd(finals);
    std::printf("| %s | %zu | %ld | %ld | %.4f ± %.4f |", g.label.c_str(), g.runs.size(),
                long(g.runs[0].values.rbegin()->first), long(g.runs[0].last_tokens), m.mean, m.sd);
    if (base && &g == base) {
      std::printf(" (baseline) | |");
    } else if (base) {
      const Gap gap = gap_to(g, *base);
      std::printf(" %+.3f%% ± %.3f%%%s |", gap.mean, gap.se, gap.paired ? "" : " (unpaired)");
      if (std::isnan(gap.ci95)) std::printf(" n/a |");
      else std::printf(" [%+.3f%%, %+.3f%%] |", gap.mean - gap.ci95, gap.mean + gap.ci95);
    }
    std::printf("\n");
  }
  // Seed by seed: the i-th run of every label, and the paired gaps to the baseline's i-th.
  std::vector<std::pair<const Group*, Gap>> paired;
  if (base)
    for (const Group& g : groups)
      if (&g != base && g.runs.size() == base->runs.size()) paired.emplace_back(&g, gap_to(g, *base));
  size_t rows = 0;
  for (const Group& g : groups) rows = std::max(rows, g.runs.size());
  std::printf("\n| seed # |");
  for (const Group& g : groups) std::printf(" %s |", g.label.c_str());
  for (const auto& [g, gap] : paired) std::printf(" %s vs %s |", g->label.c_str(), base->label.c_str());
  std::printf("\n|---:|");
  for (size_t i = 0; i < groups.size() + paired.size(); ++i) std::printf("---:|");
  std::printf("\n");
  for (size_t i = 0; i < rows; ++i) {
    std::printf("| %zu |", i + 1);
    for (const Group& g : groups) {
      if (i < g.runs.size()) std::printf(" %.4f |", g.runs[i].final_value());
      else std::printf(" |");
    }
    for (const auto& [g, gap] : paired) std::printf(" %+.3f%% |", gap.per_run[i]);
    std::printf("\n");
  }
}

}  // namespace

void add_plot(CLI::App& app) {
  auto f = std::make_shared<PlotFlags>();
  CLI::App* cmd = app.add_subcommand(
      "plot", "Compare training runs: one metrics.csv column of each against the step (SVG, CSV) and a table of final values");
  cmd->add_option("runs", f->runs,
                  "run folders of dsv3 train (or their metrics.csv), each optionally LABEL=PATH; LABEL=P1,P2,... "
                  "groups the same run from several seeds (mean ± sd; the i-th is paired with the baseline's i-th)")
      ->required();
  cmd->add_option("--column", f->column, "metrics.csv column: val_loss, loss, mtp_loss, grad_norm, max_vio, ...")
      ->capture_default_str();
  cmd->add_option("--out,-o", f->out, "SVG picture to write");
  cmd->add_option("--csv", f->csv, "CSV to write: step, then the column of every run");
  cmd->add_option("--baseline", f->baseline, "label of the run the table compares the others with (relative difference)");
  cmd->add_option("--from-step", f->from_step, "plot only steps from this one (zooms in past the first drop)")
      ->capture_default_str();
  cmd->add_option("--title", f->title, "title of the picture");
  cmd->add_option("--gap-out", f->gap_out,
                  "SVG picture of each run's relative difference to --baseline by step, in % (over seeds: the "
                  "paired mean ± its standard error)");
  cmd->callback([f] { run(*f); });
}

}  // namespace dsv3::cli
