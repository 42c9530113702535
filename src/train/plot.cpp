// SVG line charts (see plot.h).
#include "train/plot.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>

namespace dsv3 {

void write_svg_plot(const std::string& path, const std::string& title, const std::vector<Curve>& curves) {
  const double W = 720, H = 420, left = 70, right = 20, top = 40, bottom = 50;
  double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
  for (const Curve& c : curves) {
    for (auto [x, y] : c.points) x0 = std::min(x0, x), x1 = std::max(x1, x), y0 = std::min(y0, y), y1 = std::max(y1, y);
    for (auto [lo, hi] : c.band) y0 = std::min(y0, lo), y1 = std::max(y1, hi);
  }
  if (!(x1 > x0)) x1 = x0 + 1;
  if (!(y1 > y0)) y1 = y0 + 1;
  auto X = [&](double x) { return left + (x - x0) / (x1 - x0) * (W - left - right); };
  auto Y = [&](double y) { return top + (y1 - y) / (y1 - y0) * (H - top - bottom); };
  std::ofstream out(path + ".tmp");
  char buf[256];
  out << "<svg xmlns='http://www.w3.org/2000/svg' width='" << W << "' height='" << H
      << "' font-family='sans-serif' font-size='12'>\n<rect width='100%' height='100%' fill='white'/>\n";
  out << "<text x='" << W / 2 << "' y='22' text-anchor='middle' font-size='15'>" << title << "</text>\n";
  for (int i = 0; i <= 5; ++i) {  // grid and tick labels
    const double yv = y0 + (y1 - y0) * i / 5, xv = x0 + (x1 - x0) * i / 5;
    std::snprintf(buf, sizeof(buf),
                  "<line x1='%.1f' y1='%.1f' x2='%.1f' y2='%.1f' stroke='#ddd'/><text x='%.1f' y='%.1f' "
                  "text-anchor='end'>%.3g</text>\n",
                  left, Y(yv), W - right, Y(yv), left - 6, Y(yv) + 4, yv);
    out << buf;
    std::snprintf(buf, sizeof(buf), "<text x='%.1f' y='%.1f' text-anchor='middle'>%.0f</text>\n", X(xv), H - bottom + 18, xv);
    out << buf;
  }
  out << "<text x='" << W / 2 << "' y='" << H - 12 << "' text-anchor='middle'>step</text>\n";
  std::snprintf(buf, sizeof(buf), "<rect x='%.1f' y='%.1f' width='%.1f' height='%.1f' fill='none' stroke='#333'/>\n", left,
                top, W - left - right, H - top - bottom);
  out << buf;
  size_t longest = 0;  // the legend sits in the top right corner, as wide as its longest label
  for (const Curve& c : curves) longest = std::max(longest, c.label.size());
  const double legend_x = W - right - 40 - 6.5 * double(longest);
  for (size_t k = 0; k < curves.size(); ++k) {
    const Curve& c = curves[k];
    if (!c.band.empty() && c.band.size() == c.points.size()) {  // upper edge forwards, lower edge back
      out << "<polygon fill='" << c.color << "' fill-opacity='0.15' stroke='none' points='";
      for (size_t i = 0; i < c.points.size(); ++i) {
        std::snprintf(buf, sizeof(buf), "%.1f,%.1f ", X(c.points[i].first), Y(c.band[i].second));
        out << buf;
      }
      for (size_t i = c.points.size(); i-- > 0;) {
        std::snprintf(buf, sizeof(buf), "%.1f,%.1f ", X(c.points[i].first), Y(c.band[i].first));
        out << buf;
      }
      out << "'/>\n";
    }
    out << "<polyline fill='none' stroke='" << c.color << "' stroke-width='1.6' points='";
    for (auto [x, y] : c.points) {
      std::snprintf(buf, sizeof(buf), "%.1f,%.1f ", X(x), Y(y));
      out << buf;
    }
    out << "'/>\n";
    std::snprintf(buf, sizeof(buf),
                  "<line x1='%.1f' y1='%.1f' x2='%.1f' y2='%.1f' stroke='%s' stroke-width='3'/><text x='%.1f' "
                  "y='%.1f'>",
                  legend_x, top + 16 + 18.0 * double(k), legend_x + 25, top + 16 + 18.0 * double(k),
                  c.color.c_str(), legend_x + 32, top + 20 + 18.0 * double(k));
    out << buf << c.label << "</text>\n";  // a label of any length
  }
  out << "</svg>\n";
  out.close();
  std::rename((path + ".tmp").c_str(), path.c_str());
}

}  // namespace dsv3
