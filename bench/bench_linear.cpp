// Matrix-vector (and few-row) throughput of the backend's linear() per weight shape and
// format, as a fraction of the read bandwidth measured in the same run: the decode kernels'
// share of the memory limit, apart from everything else a decoded token does. Shapes of the
// bench-v3-shaped model of bench_decode and of the real DeepSeek-V3; F32, BF16 and FP8 (E4M3
// with 128x128 block scales). Each product reads a different copy of the matrix, the copies
// together larger than any cache, so every byte comes from memory.
//   bench_linear [--rounds 3] [--rows 1,4] [--mib 384] [--shapes bench|v3|all]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "backend/ops.h"
#include "bandwidth.h"
#include "core/dtype.h"

using namespace dsv3;

namespace {

struct Shape {
  const char* name;
  int64_t rows, cols;  // [out, in]
};

// bench_decode's model (hidden 1536, 12 heads, q_lora 384, kv_lora 256, experts 512).
const Shape kBench[] = {{"q_a_proj", 384, 1536},   {"q_b_proj", 1152, 384},  {"kv_a_proj", 288, 1536},
                        {"kv_b_proj", 1536, 256},  {"o_proj", 1536, 768},    {"mlp up", 4096, 1536},
                        {"mlp down", 1536, 4096},  {"expert up", 512, 1536}, {"expert down", 1536, 512},
                        {"lm_head", 32000, 1536}};
// DeepSeek-V3 (hidden 7168, 128 heads, q_lora 1536, kv_lora 512, experts 2048, dense 18432).
const Shape kV3[] = {{"q_a_proj", 1536, 7168},    {"q_b_proj", 24576, 1536},  {"kv_a_proj", 576, 7168},
                     {"kv_b_proj", 32768, 512},   {"o_proj", 7168, 16384},    {"expert up", 2048, 7168},
                     {"expert down", 7168, 2048}, {"dense up", 18432, 7168},  {"dense down", 7168, 18432}};

struct Rng {
  uint64_t s = 0x9e3779b97f4a7c15ull;
  uint64_t next() {
    s ^= s >> 12, s ^= s << 25, s ^= s >> 27;
    return s * 2685821657736338717ull;
  }
};

// `copies` matrices of one shape in one format, filled with small random values.
struct Weights {
  std::vector<std::vector<uint8_t>> data;
  std::vector<std::vector<float>> scales;
  std::vector<Mat> mats;
  size_t bytes = 0;  // of one copy
};

Weights make(const Shape& s, DType dtype, int copies, Rng& rng) {
  Weights w;
  w.bytes = size_t(s.rows * s.cols) * dtype_size(dtype);
  const int64_t sr = (s.rows + 127) / 128, sc = (s.cols + 127) / 128;
  for (int c = 0; c < copies; ++c) {
    w.data.emplace_back(w.bytes);
    uint8_t* p = w.data.back().data();
    if (dtype == DType::f8_e4m3) {
      for (size_t i = 0; i < w.bytes; ++i) p[i] = uint8_t(rng.next() >> 56) & 0xfe;  // even: no NaN codes (0x7f, 0xff)
      w.scales.emplace_back(size_t(sr * sc), 1e-3f);
    } else if (dtype == DType::bf16) {
      uint16_t* h = reinterpret_cast<uint16_t*>(p);
      for (int64_t i = 0; i < s.rows * s.cols; ++i) h[i] = f32_to_bf16(float(int64_t(rng.next() >> 54) - 512) * 1e-4f);
    } else {
      float* f = reinterpret_cast<float*>(p);
      for (int64_t i = 0; i < s.rows * s.cols; ++i) f[i] = float(int64_t(rng.next() >> 54) - 512) * 1e-4f;
    }
  }
  for (int c = 0; c < copies; ++c) {
    Mat m{dtype, s.rows, s.cols, w.data[size_t(c)].data()};
    if (dtype == DType::f8_e4m3) m.scale_inv = w.scales[size_t(c)].data(), m.scale_cols = sc;
    w.mats.push_back(m);
  }
  return w;
}

// Weight bytes per second of linear() over the copies, repeated for at least `seconds`.
double throughput(const Weights& w, const float* x, int64_t n, float* y, double seconds) {
  for (const Mat& m : w.mats) linear(x, n, m, y);  // warm-up: threads, pages
  size_t calls = 0;
  const auto t0 = std::chrono::steady_clock::now();
  double elapsed = 0;
  do {
    for (const Mat& m : w.mats) linear(x, n, m, y), ++calls;
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  } while (elapsed < seconds);
  return double(w.bytes) * double(calls) / elapsed;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  prepare_threads(argv);  // the thread runtime as dsv3 itself runs it
  int rounds = 3;
  int64_t mib = 0;  // 0: working_set_mib
  std::vector<int64_t> row_counts = {1, 4};
  std::string which = "all";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--rounds" && i + 1 < argc) rounds = std::max(1, std::atoi(argv[++i]));
    else if (a == "--mib" && i + 1 < argc) mib = std::max<int64_t>(64, std::atoll(argv[++i]));
    else if (a == "--shapes" && i + 1 < argc && std::string(argv[i + 1]) != "bench" &&
             std::string(argv[i + 1]) != "v3" && std::string(argv[i + 1]) != "all") {
      std::fprintf(stderr, "--shapes: bench, v3 or all\n");
      return 1;
    }
    else if (a == "--shapes" && i + 1 < argc) which = argv[++i];
    else if (a == "--rows" && i + 1 < argc) {
      row_counts.clear();
      for (const char* p = argv[++i]; *p;) {
        char* end = nullptr;
        const long long n = std::strtoll(p, &end, 10);
        if (end == p || n < 1 || n > 8 || (*end != ',' && *end != 0)) {
          std::fprintf(stderr, "--rows: a list of row counts 1..8, such as 1,4\n");
          return 1;
        }
        row_counts.push_back(n);
        p = *end == ',' ? end + 1 : end;
      }
    } else {
      std::fprintf(stderr, "usage: bench_linear [--rounds R] [--rows 1,4] [--mib 384] [--shapes bench|v3|all]\n");
      return 1;
    }
  }
  if (mib == 0) mib = dsv3::bench::working_set_mib(384);
  std::printf("dsv3 linear() benchmark: %s; %ld MiB of copies per case\n", backend_info().c_str(), long(mib));
  std::printf("%d rounds per case; each round: the read bandwidth around the products, the higher one kept; "
              "medians (min - max) of weight GB/s / that bandwidth\n\n",
              rounds);
  std::printf("%-6s %-12s %13s %-5s %4s %10s %22s\n", "model", "matrix", "[out, in]", "dtype", "rows", "GB/s",
              "of measured bandwidth");
  dsv3::bench::Bandwidth bandwidth;
  Rng rng;
  std::vector<double> all_ratio[3][9];  // per dtype and row count, every shape
  const DType dtypes[3] = {DType::f32, DType::bf16, DType::f8_e4m3};
  auto run_set = [&](const char* model, const Shape* shapes, size_t count) {
    for (size_t si = 0; si < count; ++si) {
      const Shape& s = shapes[si];
      for (int d = 0; d < 3; ++d) {
        const size_t bytes = size_t(s.rows * s.cols) * dtype_size(dtypes[d]);
        const int copies = int(std::max<int64_t>(2, (mib << 20) / int64_t(bytes) + 1));
        const Weights w = make(s, dtypes[d], copies, rng);
        for (int64_t n : row_counts) {
          std::vector<float> x(size_t(n * s.cols)), y(size_t(n * s.rows));
          for (float& v : x) v = float(int64_t(rng.next() >> 54) - 512) * 1e-3f;
          std::vector<double> gbs, ratio;
          for (int r = 0; r < rounds; ++r) {
            const double before = bandwidth.measure(2);
            const double t = throughput(w, x.data(), n, y.data(), 0.25);
            const double limit = std::max(before, bandwidth.measure(2));
            gbs.push_back(t / 1e9), ratio.push_back(t / limit);
          }
          all_ratio[d][n].push_back(median(ratio));
          auto [lo, hi] = std::minmax_element(ratio.begin(), ratio.end());
          char dims[32];
          std::snprintf(dims, sizeof(dims), "[%ld, %ld]", long(s.rows), long(s.cols));
          std::printf("%-6s %-12s %13s %-5s %4ld %10.1f %8.1f%% (%4.1f - %4.1f)\n", model, s.name, dims,
                      dtypes[d] == DType::f8_e4m3 ? "FP8" : dtypes[d] == DType::bf16 ? "BF16" : "F32", long(n),
                      median(gbs), 100 * median(ratio), 100 * *lo, 100 * *hi);
          std::fflush(stdout);
        }
      }
    }
  };
  if (which == "bench" || which == "all") run_set("bench", kBench, std::size(kBench));
  if (which == "v3" || which == "all") run_set("v3", kV3, std::size(kV3));
  std::printf("\n");
  for (int64_t n : row_counts)
    std::printf("%ld row(s), median over the shapes of the fraction of bandwidth: F32 %.1f%%, BF16 %.1f%%, FP8 %.1f%%\n",
                long(n), 100 * median(all_ratio[0][n]), 100 * median(all_ratio[1][n]), 100 * median(all_ratio[2][n]));
  return 0;
}
