// dsv3 plot: compare training runs. Reads each run's metrics.csv (dsv3 train), draws one
// column against the step for all of them in an SVG, writes the curves side by side as
// one CSV, and prints a table of the final values, each relative to a baseline run.
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
  std::string column = "val_loss", out, csv, baseline, title;
  int64_t from_step = 0;
};

struct Run {
  std::string label, path;
  std::map<int64_t, double> values;  // step -> value (a step repeated after a resume: the last)
  int64_t last_step = 0, last_tokens = 0;
};

std::vector<std::string> split_csv(const std::string& line) {
  std::vector<std::string> out;
  std::stringstream ss(line);
  std::string field;
  while (std::getline(ss, field, ',')) out.push_back(field);
  if (!line.empty() && line.back() == ',') out.emplace_back();
  return out;
}

// "label=path" or "path" (label: the run folder's name); path: a run folder or a CSV.
Run read_run(const std::string& spec, const std::string& column) {
  Run r;
  // LABEL=PATH, unless the whole spec is a path (a folder named lr=2e-3, say) or the part
  // before '=' looks like one.
  size_t eq = spec.find('=');
  if (eq != std::string::npos && (fs::exists(spec) || spec.substr(0, eq).find('/') != std::string::npos))
    eq = std::string::npos;
  r.path = eq == std::string::npos ? spec : spec.substr(eq + 1);
  if (fs::is_directory(r.path)) r.path = (fs::path(r.path) / "metrics.csv").string();
  r.label = eq == std::string::npos ? fs::path(r.path).parent_path().filename().string() : spec.substr(0, eq);
  if (r.label.empty()) r.label = r.path;
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

void run(const PlotFlags& f) {
  std::vector<Run> runs;
  std::set<std::string> labels;
  for (const std::string& spec : f.runs) {
    runs.push_back(read_run(spec, f.column));
    if (runs.back().label.find_first_of(",<>&\"'") != std::string::npos)
      fail("run label '", runs.back().label, "' has a character that CSV or SVG would need escaped (, < > & \" ')");
    if (!labels.insert(runs.back().label).second)
      fail("two runs are labelled '", runs.back().label, "': name them with LABEL=PATH");
  }
  const Run* base = nullptr;
  if (!f.baseline.empty()) {
    for (const Run& r : runs)
      if (r.label == f.baseline) base = &r;
    if (!base) fail("--baseline ", f.baseline, ": no run has that label");
  }

  static const char* kColors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"};
  std::vector<Curve> curves;
  for (size_t i = 0; i < runs.size(); ++i) {
    Curve c{runs[i].label, kColors[i % 8], {}};
    for (auto [step, v] : runs[i].values)
      if (step >= f.from_step) c.points.push_back({double(step), v});
    curves.push_back(std::move(c));
  }
  if (!f.out.empty())
    write_svg_plot(f.out, f.title.empty() ? f.column + " by step" : f.title, curves);

  if (!f.csv.empty()) {  // step, then one column per run (empty where a run has no value)
    std::set<int64_t> steps;
    for (const Run& r : runs)
      for (auto [step, v] : r.values) steps.insert(step);
    std::ofstream out(f.csv + ".tmp");
    out.precision(8);
    out << "step";
    for (const Run& r : runs) out << "," << r.label;
    out << "\n";
    for (int64_t step : steps) {
      out << step;
      for (const Run& r : runs) {
        out << ",";
        if (auto it = r.values.find(step); it != r.values.end()) out << it->second;
      }
      out << "\n";
    }
    out.close();
    if (!out) fail(f.csv, ": write failed");
    fs::rename(f.csv + ".tmp", f.csv);
  }

  // The table: each run's last value of the column.
  std::printf("| run | steps | tokens | final %s |%s\n", f.column.c_str(), base ? cat(" vs ", base->label, " |").c_str() : "");
  std::printf("|---|---:|---:|---:|%s\n", base ? "---:|" : "");
  for (const Run& r : runs) {
    const auto [step, v] = *r.values.rbegin();
    std::printf("| %s | %ld | %ld | %.4f |", r.label.c_str(), long(step), long(r.last_tokens), v);
    if (base) {
      const double b = base->values.rbegin()->second;
      if (b != 0) std::printf(" %+.3f%% |", (v - b) / b * 100);
      else std::printf(" n/a |");
    }
    std::printf("\n");
    if (step != r.last_step)
      std::fprintf(stderr, "note: %s ran to step %ld; its last %s is at step %ld\n", r.label.c_str(), long(r.last_step),
                   f.column.c_str(), long(step));
  }
}

}  // namespace

void add_plot(CLI::App& app) {
  auto f = std::make_shared<PlotFlags>();
  CLI::App* cmd = app.add_subcommand(
      "plot", "Compare training runs: one metrics.csv column of each against the step (SVG, CSV) and a table of final values");
  cmd->add_option("runs", f->runs, "run folders of dsv3 train (or their metrics.csv), each optionally LABEL=PATH")
      ->required();
  cmd->add_option("--column", f->column, "metrics.csv column: val_loss, loss, mtp_loss, grad_norm, max_vio, ...")
      ->capture_default_str();
  cmd->add_option("--out,-o", f->out, "SVG picture to write");
  cmd->add_option("--csv", f->csv, "CSV to write: step, then the column of every run");
  cmd->add_option("--baseline", f->baseline, "label of the run the table compares the others with (relative difference)");
  cmd->add_option("--from-step", f->from_step, "plot only steps from this one (zooms in past the first drop)")
      ->capture_default_str();
  cmd->add_option("--title", f->title, "title of the picture");
  cmd->callback([f] { run(*f); });
}

}  // namespace dsv3::cli
