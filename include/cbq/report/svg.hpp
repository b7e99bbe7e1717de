#pragma once
// Charts as SVG text, written directly (no plotting dependency): line charts with linear or
// logarithmic y axes, grouped bar charts, and a grid of charts in one file. Enough for the run
// reports of report.hpp; every chart is a pure function of its data.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <fmt/format.h>

namespace cbq::report {

// A colour per series index (ColorBrewer Set1, then repeated).
inline std::string series_color(size_t i) {
  static const char* kColors[] = {"#e41a1c", "#377eb8", "#4daf4a", "#984ea3",
                                  "#ff7f00", "#a65628", "#f781bf", "#555555"};
  return kColors[i % (sizeof(kColors) / sizeof(kColors[0]))];
}

inline std::string xml_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

struct Series {
  std::string name;
  std::vector<double> x, y;
  std::vector<double> y_low, y_high;  // optional error bars (same length as y)
  std::string color;                  // empty: series_color(index)
  bool dashed = false;
  bool markers = false;
};

struct LineChart {
  std::string title, x_label, y_label;
  bool log_y = false;
  std::vector<Series> series;
  std::vector<std::pair<double, std::string>> x_ticks;  // empty: automatic
};

struct BarChart {
  std::string title, x_label, y_label;
  bool log_y = false;
  std::vector<std::string> categories;  // along x
  std::vector<Series> series;           // y[i] per category; one bar per series in each group
};

namespace detail {

// About `target` round tick positions covering [lo, hi].
inline std::vector<double> nice_ticks(double lo, double hi, int target = 5) {
  if (!(hi > lo)) return {lo};
  const double raw = (hi - lo) / target;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 2.5, 5.0, 10.0})
    if (m * mag >= raw) {
      step = m * mag;
      break;
    }
  std::vector<double> t;
  for (double v = std::ceil(lo / step) * step; v <= hi + 1e-9 * step; v += step)
    t.push_back(std::abs(v) < 1e-12 * step ? 0.0 : v);
  return t;
}

inline std::string tick_label(double v) {
  if (v == 0) return "0";
  const double a = std::abs(v);
  if (a >= 1e5 || a < 1e-3) return fmt::format("{:.0e}", v);
  return fmt::format("{:g}", v);
}

// The plotting frame shared by both chart kinds: margins, the y mapping, axes and labels.
struct Frame {
  double width, height, left = 64, right = 12, top = 28, bottom = 42;
  double y_lo = 0, y_hi = 1;
  bool log_y = false;
  double px(double f) const { return left + f * (width - left - right); }  // f in [0, 1]
  double py(double y) const {
    double f;
    if (log_y)
      f = (std::log10(std::max(y, 1e-300)) - std::log10(y_lo)) /
          (std::log10(y_hi) - std::log10(y_lo));
    else
      f = (y - y_lo) / (y_hi - y_lo);
    f = std::clamp(f, -0.02, 1.02);
    return height - bottom - f * (height - top - bottom);
  }
  // Sets the y range from the data (positive values only on a log axis).
  void fit_y(const std::vector<double>& values) {
    double lo = std::numeric_limits<double>::infinity(), hi = -lo;
    for (double v : values) {
      if (!std::isfinite(v) || (log_y && v <= 0)) continue;
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    if (!std::isfinite(lo)) lo = hi = log_y ? 1 : 0;
    if (log_y) {
      y_lo = std::pow(10.0, std::floor(std::log10(lo)));
      y_hi = std::pow(10.0, std::ceil(std::log10(hi)));
      if (y_hi <= y_lo) y_hi = y_lo * 10;
    } else {
      if (lo > 0 && lo < 0.3 * hi) lo = 0;
      const double pad = hi > lo ? 0.05 * (hi - lo) : std::max(std::abs(hi), 1.0) * 0.1;
      y_lo = lo - (lo == 0 ? 0 : pad);
      y_hi = hi + pad;
    }
  }
  std::string axes(const std::string& title, const std::string& y_label) const {
    std::string s;
    s += fmt::format(
        "<text x=\"{:.1f}\" y=\"16\" font-size=\"13\" text-anchor=\"middle\" "
        "font-weight=\"bold\">{}</text>\n",
        width / 2, xml_escape(title));
    std::vector<double> ticks;
    if (log_y)
      for (double v = y_lo; v <= y_hi * 1.0001; v *= 10) ticks.push_back(v);
    else
      ticks = nice_ticks(y_lo, y_hi);
    for (double t : ticks) {
      const double y = py(t);
      s += fmt::format(
          "<line x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"#e0e0e0\"/>\n"
          "<text x=\"{:.1f}\" y=\"{:.1f}\" font-size=\"10\" text-anchor=\"end\">{}</text>\n",
          left, y, width - right, y, left - 4, y + 3, tick_label(t));
    }
    s += fmt::format(
        "<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" fill=\"none\" "
        "stroke=\"#333\"/>\n",
        left, top, width - left - right, height - top - bottom);
    s += fmt::format(
        "<text transform=\"translate(12,{:.1f}) rotate(-90)\" font-size=\"11\" "
        "text-anchor=\"middle\">{}</text>\n",
        (top + height - bottom) / 2, xml_escape(y_label));
    return s;
  }
};

inline std::string legend(const std::vector<Series>& series, double x, double y) {
  std::string s;
  for (size_t i = 0; i < series.size(); ++i) {
    const std::string color = series[i].color.empty() ? series_color(i) : series[i].color;
    const double yy = y + 13.0 * static_cast<double>(i);
    s += fmt::format(
        "<line x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"{}\" "
        "stroke-width=\"2\"{}/>\n<text x=\"{:.1f}\" y=\"{:.1f}\" font-size=\"10\">{}</text>\n",
        x, yy, x + 16, yy, color, series[i].dashed ? " stroke-dasharray=\"4,3\"" : "", x + 20,
        yy + 3, xml_escape(series[i].name));
  }
  return s;
}

}  // namespace detail

// The chart's drawing (without the <svg> wrapper), in a width × height box.
inline std::string draw(const LineChart& c, double width, double height) {
  detail::Frame f{width, height};
  f.log_y = c.log_y;
  std::vector<double> ys;
  double x_lo = std::numeric_limits<double>::infinity(), x_hi = -x_lo;
  for (const Series& s : c.series) {
    for (double v : s.y) ys.push_back(v);
    for (double v : s.y_low) ys.push_back(v);
    for (double v : s.y_high) ys.push_back(v);
    for (double v : s.x) {
      x_lo = std::min(x_lo, v);
      x_hi = std::max(x_hi, v);
    }
  }
  for (const auto& [v, label] : c.x_ticks) {
    x_lo = std::min(x_lo, v);
    x_hi = std::max(x_hi, v);
  }
  if (!std::isfinite(x_lo)) x_lo = 0, x_hi = 1;
  if (x_hi <= x_lo) x_lo -= 0.5, x_hi += 0.5;
  const double x_pad = c.x_ticks.empty() ? 0 : 0.05 * (x_hi - x_lo);
  x_lo -= x_pad;
  x_hi += x_pad;
  f.fit_y(ys);
  auto px = [&](double x) { return f.px((x - x_lo) / (x_hi - x_lo)); };
  std::string s = f.axes(c.title, c.y_label);
  std::vector<std::pair<double, std::string>> ticks = c.x_ticks;
  if (ticks.empty())
    for (double t : detail::nice_ticks(x_lo, x_hi)) ticks.emplace_back(t, detail::tick_label(t));
  for (const auto& [v, label] : ticks)
    s += fmt::format(
        "<text x=\"{:.1f}\" y=\"{:.1f}\" font-size=\"10\" text-anchor=\"middle\">{}</text>\n",
        px(v), height - f.bottom + 13, xml_escape(label));
  s += fmt::format(
      "<text x=\"{:.1f}\" y=\"{:.1f}\" font-size=\"11\" text-anchor=\"middle\">{}</text>\n",
      f.px(0.5), height - 8, xml_escape(c.x_label));
  for (size_t i = 0; i < c.series.size(); ++i) {
    const Series& se = c.series[i];
    const std::string color = se.color.empty() ? series_color(i) : se.color;
    std::string points;
    for (size_t k = 0; k < se.x.size() && k < se.y.size(); ++k) {
      if (!std::isfinite(se.y[k]) || (c.log_y && se.y[k] <= 0)) continue;
      points += fmt::format("{:.1f},{:.1f} ", px(se.x[k]), f.py(se.y[k]));
    }
    if (!points.empty())
      s += fmt::format(
          "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\"{}/>\n", points,
          color, se.dashed ? " stroke-dasharray=\"4,3\"" : "");
    for (size_t k = 0; k < se.x.size() && k < se.y.size(); ++k) {
      if (!std::isfinite(se.y[k]) || (c.log_y && se.y[k] <= 0)) continue;
      if (k < se.y_low.size() && k < se.y_high.size())
        s += fmt::format(
            "<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{0:.1f}\" y2=\"{2:.1f}\" stroke=\"{3}\"/>\n",
            px(se.x[k]), f.py(se.y_low[k]), f.py(se.y_high[k]), color);
      if (se.markers)
        s += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"3\" fill=\"{}\"/>\n", px(se.x[k]),
                         f.py(se.y[k]), color);
    }
  }
  s += detail::legend(c.series, f.px(0) + 8, f.top + 12);
  return s;
}

inline std::string draw(const BarChart& c, double width, double height) {
  detail::Frame f{width, height};
  f.log_y = c.log_y;
  std::vector<double> ys;
  for (const Series& s : c.series) ys.insert(ys.end(), s.y.begin(), s.y.end());
  f.fit_y(ys);
  if (!c.log_y) f.y_lo = std::min(0.0, f.y_lo);
  std::string s = f.axes(c.title, c.y_label);
  const size_t n = std::max<size_t>(c.categories.size(), 1),
               m = std::max<size_t>(c.series.size(), 1);
  const double group_w = (f.px(1) - f.px(0)) / static_cast<double>(n);
  const double bar_w = 0.8 * group_w / static_cast<double>(m);
  const double base = c.log_y ? f.py(f.y_lo) : f.py(0);
  for (size_t k = 0; k < c.categories.size(); ++k) {
    const double gx = f.px(0) + group_w * static_cast<double>(k);
    s += fmt::format(
        "<text x=\"{:.1f}\" y=\"{:.1f}\" font-size=\"10\" text-anchor=\"middle\">{}</text>\n",
        gx + group_w / 2, height - f.bottom + 13, xml_escape(c.categories[k]));
    for (size_t i = 0; i < c.series.size(); ++i) {
      if (k >= c.series[i].y.size()) continue;
      const double v = c.series[i].y[k];
      if (!std::isfinite(v) || (c.log_y && v <= 0)) continue;
      const double top = f.py(v);
      const std::string color = c.series[i].color.empty() ? series_color(i) : c.series[i].color;
      s += fmt::format(
          "<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" "
          "fill=\"{}\"><title>{} "
          "{}: {:.4g}</title></rect>\n",
          gx + 0.1 * group_w + bar_w * static_cast<double>(i), std::min(top, base), bar_w,
          std::abs(base - top), color, xml_escape(c.series[i].name), xml_escape(c.categories[k]),
          v);
    }
  }
  s += fmt::format(
      "<text x=\"{:.1f}\" y=\"{:.1f}\" font-size=\"11\" text-anchor=\"middle\">{}</text>\n",
      f.px(0.5), height - 8, xml_escape(c.x_label));
  s += detail::legend(c.series, f.px(0) + 8, f.top + 12);
  return s;
}

// One SVG document of `columns` charts per row, each cell width × height.
template <class Chart>
std::string svg_grid(const std::vector<Chart>& charts, int columns, double width, double height) {
  columns =
      std::max(1, std::min<int>(columns, static_cast<int>(std::max<size_t>(charts.size(), 1))));
  const int rows = (static_cast<int>(charts.size()) + columns - 1) / columns;
  std::string s = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{:.0f}\" height=\"{:.0f}\" "
      "font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
      width * columns, height * std::max(rows, 1));
  for (size_t i = 0; i < charts.size(); ++i) {
    const double x = width * static_cast<double>(static_cast<int>(i) % columns);
    const double y = height * static_cast<double>(static_cast<int>(i) / columns);
    s += fmt::format("<g transform=\"translate({:.0f},{:.0f})\">\n{}</g>\n", x, y,
                     draw(charts[i], width, height));
  }
  return s + "</svg>\n";
}

template <class Chart>
std::string svg(const Chart& chart, double width = 640, double height = 400) {
  return svg_grid(std::vector<Chart>{chart}, 1, width, height);
}

}  // namespace cbq::report
