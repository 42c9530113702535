// Training curves as a self-contained SVG picture (no plotting dependency). Depends on std.
#pragma once
#include <string>
#include <utility>
#include <vector>

namespace dsv3 {

struct Curve {
  std::string label, color;
  std::vector<std::pair<double, double>> points;  // (step, value)
  // Optional: a shaded band around the curve, (low, high) at each point (e.g. mean +- sd over
  // seeds); empty, or as many as points.
  std::vector<std::pair<double, double>> band;
};

// Writes a line chart of the curves (x: step, y: value) with axes and a legend.
void write_svg_plot(const std::string& path, const std::string& title, const std::vector<Curve>& curves);

}  // namespace dsv3
