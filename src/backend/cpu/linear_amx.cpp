// linear() for five or more activation rows (prefill, experts with several tokens, batched
// decoding) on Intel AMX: the
// tile unit multiplies BF16 pairs into float32 accumulators, 16x16x32 per instruction, an
// order of magnitude beyond float32 FMAs on the same core.
//
// Accuracy. The tile unit multiplies BF16 values exactly into float32 sums. Weights in
// BF16 are exact as they are, and FP8 E4M3 codes are exact in BF16 (their 128x128 block
// scales are applied to the float32 sums of each 128-wide block of input features). The
// activations are float32, so each is split into three BF16 values, x = hi + mid + lo
// (hi = bf16(x), mid = bf16(x - hi), lo = bf16(x - hi - mid): exact, 8 + 8 + 8 bits), and
// the three products are summed: the result is a float32 GEMM's, to its rounding.
//
// Layout. The tile product C += A B takes A as 16 rows of 32 BF16 values (64 bytes) and B in
// pairs: row p holds (B[2p][c], B[2p+1][c]) for 16 columns c. A is a strip of weight rows
// as stored (row-major: BF16 rows read in place when they are whole steps and one pass over
// the tokens suffices, otherwise copied into a cache-resident strip; FP8 decoded there);
// B is the activations, packed once per call so that a tile holds 16 tokens by 32 input
// features in pairs; C is 16 weight rows by 16 tokens, i.e. y transposed, written to a
// buffer that one pass turns into y at the end.
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cpuid.h>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "backend/cpu/fp8_decode.h"
#include "backend/cpu/kernels.h"
#include "backend/ops.h"

// GCC 12 warns inside its own intrinsics headers (_mm512_undefined_*): false positives.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#define DSV3_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,f16c,amx-tile,amx-bf16")))

namespace dsv3::cpu {

namespace {

constexpr int64_t kStripRows = 32;  // weight rows per task: two A tiles
constexpr int64_t kTokens = 16;     // tokens per B tile (its 16 columns)
constexpr int64_t kStep = 32;       // input features per tile product

// The process must ask Linux for the tile state before a thread uses it (arch_prctl); the
// CPU must have AMX-TILE, AMX-BF16 and AVX512-BF16 (the splitting), and the OS must save
// the tile registers (XCR0 bits 17 and 18).
bool detect_amx() {
  const char* env = std::getenv("DSV3_AMX");
  if (env && std::string(env) == "0") return false;
  const char* kernels = std::getenv("DSV3_KERNELS");
  if (kernels && std::string(kernels) == "scalar") return false;
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool amx = (d & (1u << 22)) && (d & (1u << 24));  // AMX-BF16, AMX-TILE
  if (!amx || !__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a & (1u << 5))) return false;  // AVX512-BF16
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE
  if (!avx512_available()) return false;  // the packing and the FP8 decoding use AVX-512
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & 0xe6u) != 0xe6u) return false;              // AVX-512 state saved by the OS
  if ((lo & (3u << 17)) != (3u << 17)) return false;    // tile state too
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: C (strip half 0/1 x token tile 0/1); 4-5: A (the strip's halves); 6-7: B.
DSV3_AMX void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.bytes_per_row[t] = 64, cfg.rows[t] = 16;
  // GCC 12's _tile_loadconfig tells the compiler it reads only the first 8 bytes, which
  // let it drop the stores above: the barrier keeps them.
  __asm__ volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

// v = hi + mid + lo, three BF16 parts of 16 float32 values.
DSV3_AMX inline __m512 widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
DSV3_AMX inline void split16(__m512 v, __m256i& hi, __m256i& mid, __m256i& lo) {
  hi = __m256i(_mm512_cvtneps_pbh(v));
  v = _mm512_sub_ps(v, widen(hi));
  mid = __m256i(_mm512_cvtneps_pbh(v));
  lo = __m256i(_mm512_cvtneps_pbh(_mm512_sub_ps(v, widen(mid))));
}

// r[i][c] -> r[c][i] for a 16 x 16 block of 32-bit values: pairs within 128-bit lanes,
// then quads, then lanes across registers.
DSV3_AMX inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // u[i + q], lane l: column 4l + q of rows i..i+3
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int q = 0; q < 4; ++q) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[q], u[4 + q], 0x88), v1 = _mm512_shuffle_i32x4(u[q], u[4 + q], 0xdd);
    const __m512i w0 = _mm512_shuffle_i32x4(u[8 + q], u[12 + q], 0x88),
                  w1 = _mm512_shuffle_i32x4(u[8 + q], u[12 + q], 0xdd);
    r[q] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    r[q + 8] = _mm512_shuffle_i32x4(v0, w0, 0xdd);
    r[q + 4] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    r[q + 12] = _mm512_shuffle_i32x4(v1, w1, 0xdd);
  }
}

// Activations x[n, k] -> B tiles in pairs, one array per part (hi, mid, lo; `part` values
// apart): tile (g, s) holds tokens 16g.. and features 32s.., as 16 rows p of 16 tokens x
// (x[2p], x[2p+1]); tokens past n and features past k are zero. One token group: rows
// [16g, 16g + 16). A token's 32 features are 16 pairs, one 32-bit value each, so the tile
// is the transpose of 16 tokens x 16 pairs.
DSV3_AMX void pack_x_group(const float* x, int64_t n, int64_t k, int64_t g, int64_t steps, uint32_t* parts,
                           size_t part) {
  uint32_t* tiles = parts + g * steps * 256;
  for (int64_t s = 0; s < steps; ++s) {
    __m512i pairs[3][16];
    const int64_t left = k - s * kStep;
    const __mmask16 m0 = __mmask16(left >= 16 ? 0xffff : (1u << left) - 1);
    const __mmask16 m1 = __mmask16(left >= 32 ? 0xffff : left <= 16 ? 0 : (1u << (left - 16)) - 1);
    for (int64_t j = 0; j < kTokens; ++j) {
      const int64_t token = g * kTokens + j;
      __m256i p[2][3] = {};
      if (token < n) {
        const float* row = x + token * k + s * kStep;
        split16(_mm512_maskz_loadu_ps(m0, row), p[0][0], p[0][1], p[0][2]);
        split16(_mm512_maskz_loadu_ps(m1, row + 16), p[1][0], p[1][1], p[1][2]);
      }
      for (int q = 0; q < 3; ++q) pairs[q][j] = _mm512_inserti64x4(_mm512_castsi256_si512(p[0][q]), p[1][q], 1);
    }
    for (int q = 0; q < 3; ++q) {
      transpose16(pairs[q]);
      uint32_t* tile = tiles + q * part + s * 256;
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(tile + 16 * i, pairs[q][i]);
    }
  }
}

// y[tokens, rows] (row stride ldy) from yt[rows, tokens] (row stride ldt), 16 x 16 blocks
// in registers, the ragged edges element by element.
DSV3_AMX void transpose_out(const float* yt, int64_t ldt, int64_t rows, int64_t tokens, float* y, int64_t ldy) {
  int64_t r = 0;
  for (; r + 16 <= rows; r += 16) {
    int64_t t = 0;
    for (; t + 16 <= tokens; t += 16) {
      __m512i block[16];
      for (int i = 0; i < 16; ++i) block[i] = _mm512_loadu_si512(yt + (r + i) * ldt + t);
      transpose16(block);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(y + (t + i) * ldy + r, block[i]);
    }
    for (; t < tokens; ++t)
      for (int64_t i = r; i < r + 16; ++i) y[t * ldy + i] = yt[i * ldt + t];
  }
  for (; r < rows; ++r)
    for (int64_t t = 0; t < tokens; ++t) y[t * ldy + r] = yt[r * ldt + t];
}

// The packed strip's row stride, in BF16 values: one cache line more than the row, so that
// the 16 rows of a tile fall in different L1 sets (at a power-of-two stride they share one
// set, and every tile load missed).
inline int64_t strip_stride(int64_t k_pad) { return k_pad + 32; }

// Rows [r0, r0 + 32) of w into a row-major BF16 strip of k_pad values, zero beyond w's rows
// and columns: as stored for BF16; FP8 codes as their values / 256 (exact in BF16; the
// caller folds the 256 into the block scales), fetching two rows ahead as it goes.
DSV3_AMX void pack_w_strip(const Mat& w, int64_t r0, int64_t k_pad, uint16_t* strip) {
  for (int64_t i = 0; i < kStripRows; ++i) {
    uint16_t* h = strip + i * strip_stride(k_pad);
    const int64_t r = r0 + i;
    if (r >= w.rows) {
      std::memset(h, 0, size_t(k_pad) * 2);
      continue;
    }
    const uint8_t* row = w.data + size_t(r) * w.row_bytes();
    if (w.dtype == DType::bf16) {
      std::memcpy(h, row, size_t(w.cols) * 2);
      std::memset(h + w.cols, 0, size_t(k_pad - w.cols) * 2);
      continue;
    }
    const uint8_t* later = r + 2 < w.rows ? row + 2 * w.row_bytes() : nullptr;
    int64_t c = 0;
    for (; c + 32 <= w.cols; c += 32) {
      if (later && c % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(later + c), _MM_HINT_T0);
      __m512 lo, hi;
      decode32_fp8(row + c, lo, hi);
      _mm512_storeu_si512(h + c, __m512i(_mm512_cvtne2ps_pbh(hi, lo)));
    }
    for (; c < k_pad; c += 32) {  // the last codes, then zeros
      alignas(64) uint8_t tail[32] = {};
      if (c < w.cols) std::memcpy(tail, row + c, size_t(w.cols - c));
      __m512 lo, hi;
      decode32_fp8(tail, lo, hi);
      _mm512_storeu_si512(h + c, __m512i(_mm512_cvtne2ps_pbh(hi, lo)));
    }
  }
}

// A strip's 32 rows of BF16 values as the A tiles read them: a packed copy, or the stored
// rows themselves (BF16 weights whose rows are whole steps), stride bytes apart. Stored rows
// are read from memory on the first token pass, each row a short stream the hardware
// prefetcher picks up late, so that pass fetches a few steps ahead in software.
struct StripA {
  const uint8_t* rows;
  size_t stride;
  bool from_memory;
};
constexpr int64_t kFetchSteps = 4;  // 4 steps x 64 bytes ahead in each of the 32 rows

// Steps [s0, s1) of 32 input features: C += A (B_hi + B_mid + B_lo) for the strip's two
// halves (tiles 4, 5). Two token tiles (6, 7): C tile 2h + t is half h, token tile t. One
// token tile: even steps go to C tiles 0 and 2, odd ones to 1 and 3 (summed by the caller),
// so that four chains of dependent tile products run, not two.
template <int kTiles>
DSV3_AMX inline void run_steps(const StripA& a, const uint32_t* b0, const uint32_t* b1, size_t part, int64_t s0,
                               int64_t s1, int64_t steps, bool fetch) {
  const uint8_t* top = a.rows;
  const uint8_t* bottom = a.rows + 16 * a.stride;
  if (fetch && s0 == 0)  // the strip's first steps, all at once
    for (int64_t i = 0; i < kStripRows; ++i)
      for (int64_t f = 0; f < std::min(kFetchSteps, steps); ++f)
        _mm_prefetch(reinterpret_cast<const char*>(top + size_t(i) * a.stride + f * 64), _MM_HINT_T0);
  auto load_a = [&](int64_t s) {
    if (fetch && s + kFetchSteps < steps)
      for (int64_t i = 0; i < kStripRows; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(top + size_t(i) * a.stride + (s + kFetchSteps) * 64), _MM_HINT_T0);
    _tile_loadd(4, top + s * 64, a.stride);
    _tile_loadd(5, bottom + s * 64, a.stride);
  };
  int64_t s = s0;
  if constexpr (kTiles == 1) {
    for (; s + 1 < s1; s += 2) {
      load_a(s);
      for (int q = 0; q < 3; ++q) {
        _tile_loadd(6, b0 + q * part + s * 256, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
      }
      load_a(s + 1);
      for (int q = 0; q < 3; ++q) {
        _tile_loadd(7, b0 + q * part + (s + 1) * 256, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  for (; s < s1; ++s) {
    load_a(s);
    for (int q = 0; q < 3; ++q) {
      _tile_loadd(6, b0 + q * part + s * 256, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (kTiles == 2) {
        _tile_loadd(7, b1 + q * part + s * 256, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
}

// The C tiles into c (32 strip rows x 32 tokens): two token tiles, or one whose odd-step
// sums (tiles 1, 3) are added to the even ones.
DSV3_AMX inline void store_c(float (*c)[2 * kTokens], bool two) {
  constexpr size_t stride = 2 * kTokens * 4;
  _tile_stored(0, &c[0][0], stride);
  _tile_stored(1, &c[0][kTokens], stride);
  _tile_stored(2, &c[16][0], stride);
  _tile_stored(3, &c[16][kTokens], stride);
  if (two) return;
  for (int64_t i = 0; i < kStripRows; ++i)
    _mm512_store_ps(&c[i][0], _mm512_add_ps(_mm512_load_ps(&c[i][0]), _mm512_load_ps(&c[i][kTokens])));
}

// yt = strip x^T for a block of up to kBlockStrips strips (32 weight rows each; strip i's
// sums go to yts[i], rows ldt floats apart, token groups of 16 along a row) over all token
// groups, two at a time. `parts` holds the packed activations' three parts, `part` values
// apart. BF16 strips run alone, all their input features at once, the sums staying in the
// tiles. FP8 sums each 128-wide block of input features on its own (four steps), scales it
// and adds it to yt row by row (a strip may cross a 128-row scale block; row_scales[i][r]
// points at the scale row of row r of strip i); as its sums leave the tiles after every
// block anyway, several strips take turns on one block's activation tiles while those are
// in L1 (bench: 512 x 1536 x 1536 FP8 1.17x faster than strip after strip; for BF16 the
// same order, which must reload its sums, was 1.6x slower).
constexpr int kBlockStrips = 4;

template <bool kFp8>
DSV3_AMX void block_product(const StripA* a, int strips, int64_t k_pad, const uint32_t* parts, size_t part,
                            int64_t groups, const float* const (*row_scales)[kStripRows], float* const* yts,
                            int64_t ldt) {
  const int64_t steps = k_pad / kStep, chunk = kFp8 ? kFp8Block / kStep : steps;
  alignas(64) float c[kStripRows][2 * kTokens];
  for (int64_t g = 0; g < groups; g += 2) {
    const bool two = g + 1 < groups;
    const uint32_t* b0 = parts + g * steps * 256;
    const uint32_t* b1 = b0 + steps * 256;
    const int64_t width = (two ? 2 : 1) * kTokens;
    for (int64_t s0 = 0, block = 0; s0 < steps; s0 += chunk, ++block) {
      const int64_t s1 = std::min(steps, s0 + chunk);
      for (int i = 0; i < strips; ++i) {
        float* out = yts[i] + g * kTokens;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        const bool fetch = g == 0 && a[i].from_memory;
        if (two) run_steps<2>(a[i], b0, b1, part, s0, s1, steps, fetch);
        else run_steps<1>(a[i], b0, b1, part, s0, s1, steps, fetch);
        store_c(c, two);
        for (int64_t r = 0; r < kStripRows; ++r) {
          float* o = out + r * ldt;
          if constexpr (!kFp8) {
            for (int64_t t = 0; t < width; t += 16) _mm512_storeu_ps(o + t, _mm512_load_ps(&c[r][t]));
          } else {
            const __m512 scale = _mm512_set1_ps(256.0f * row_scales[i][r][block]);  // codes were / 256
            for (int64_t t = 0; t < width; t += 16) {
              const __m512 v = _mm512_mul_ps(scale, _mm512_load_ps(&c[r][t]));
              _mm512_storeu_ps(o + t, block == 0 ? v : _mm512_add_ps(v, _mm512_loadu_ps(o + t)));
            }
          }
        }
      }
    }
  }
}

DSV3_AMX void release_tiles() { _tile_release(); }

// Per job: where its packed activations and its transposed output live.
struct Plan {
  int64_t groups = 0, k_pad = 0;  // token groups of 16, padded input features
  size_t x_offset = 0, yt_offset = 0;
  int64_t ldt = 0;                // yt's row stride: groups * 16 + 16
};
// uint32 pairs in one part (hi, mid or lo) of a job's packed activations.
size_t part_size(const Plan& p) { return size_t(p.groups * p.k_pad * kTokens / 2); }

}  // namespace

bool amx_available() {
  static const bool ok = detect_amx();
  return ok;
}

void linear_amx(const LinearJob* jobs, size_t count) {
  // Buffers of the calling thread, kept between calls (no allocation once grown), shared
  // with the team by reference (a thread_local named inside the region would be the
  // worker's own).
  thread_local std::vector<Plan> plans_kept;
  thread_local std::vector<uint32_t> packed_x;
  thread_local std::vector<float> yt;
  struct Block {
    int32_t job;
    int64_t first_row, strips;  // strips of 32 rows, the last may reach past the matrix
  };
  thread_local std::vector<std::pair<int32_t, int64_t>> groups_kept;
  thread_local std::vector<Block> blocks_kept;
  std::vector<Plan>& plans = plans_kept;
  std::vector<std::pair<int32_t, int64_t>>& groups = groups_kept;  // (job, token group)
  std::vector<Block>& blocks = blocks_kept;
  plans.assign(count, Plan{});
  groups.clear(), blocks.clear();
  size_t x_size = 0, yt_size = 0;
  double work = 0;
  int64_t widest = 0;
  for (size_t i = 0; i < count; ++i) {
    const LinearJob& j = jobs[i];
    Plan& p = plans[i];
    if (j.w.cols == 0) {  // no input features: y = 0 (no strip would write it)
      std::fill(j.y, j.y + j.n * j.w.rows, 0.0f);
      continue;
    }
    p.groups = (j.n + kTokens - 1) / kTokens;
    p.k_pad = (j.w.cols + kStep - 1) / kStep * kStep;
    p.ldt = p.groups * kTokens + 16;  // a line more than the tokens: no power-of-two stride (L1 sets)
    p.x_offset = x_size;
    x_size += 3 * part_size(p);
    p.yt_offset = yt_size;
    yt_size += size_t((j.w.rows + kStripRows - 1) / kStripRows * kStripRows * p.ldt);
    for (int64_t g = 0; g < p.groups; ++g) groups.emplace_back(int32_t(i), g);
    // FP8 weight rows in blocks of strips that share a block's activation tiles in L1, as
    // many as fit about 1 MiB of L2, when there is more than one pass over the tokens;
    // otherwise one strip (small blocks balance the threads better).
    const int64_t per_block =
        j.w.dtype != DType::f8_e4m3 || p.groups <= 2
            ? 1
            : std::clamp<int64_t>((int64_t(1) << 20) / (kStripRows * strip_stride(p.k_pad) * 2), 1, kBlockStrips);
    for (int64_t r = 0; r < j.w.rows; r += per_block * kStripRows) blocks.push_back({int32_t(i), r, per_block});
    work += double(j.n) * double(j.w.rows) * double(j.w.cols);
    widest = std::max(widest, p.k_pad);
  }
  if (blocks.empty()) return;
  if (packed_x.size() < x_size) packed_x.resize(x_size);
  if (yt.size() < yt_size) yt.resize(yt_size);
  uint32_t* const xbuf = packed_x.data();
  float* const ytbuf = yt.data();

#pragma omp parallel if (work > 1e6)
  {
    // 1. The activations in B-tile pairs.
#pragma omp for schedule(static)
    for (size_t u = 0; u < groups.size(); ++u) {
      const auto [i, g] = groups[u];
      const Plan& p = plans[size_t(i)];
      const LinearJob& j = jobs[i];
      pack_x_group(j.x, j.n, j.w.cols, g, p.k_pad / kStep, xbuf + p.x_offset, part_size(p));
    }
    // 2. Strips of 32 weight rows against every token of their job, handed out one at a
    // time (jobs differ in cost: an MoE layer's experts have different numbers of tokens).
    thread_local std::vector<uint16_t> strip;  // this thread's, kept between calls
    const size_t strip_values = size_t(kStripRows * strip_stride(widest));
    if (strip.size() < kBlockStrips * strip_values) strip.resize(kBlockStrips * strip_values);
    configure_tiles();
#pragma omp for schedule(dynamic, 1) nowait
    for (size_t t = 0; t < blocks.size(); ++t) {
      const Block& b = blocks[t];
      const Plan& p = plans[size_t(b.job)];
      const LinearJob& j = jobs[b.job];
      const Mat& w = j.w;
      StripA a[kBlockStrips];
      float* yts[kBlockStrips];
      const float* row_scales[kBlockStrips][kStripRows];
      int count = 0;
      for (int64_t r0 = b.first_row; count < b.strips && r0 < w.rows; r0 += kStripRows, ++count) {
        yts[count] = ytbuf + p.yt_offset + size_t(r0 * p.ldt);
        // In place (BF16 rows of whole steps, a whole strip): read from memory on the first
        // token pass, from L2 on later ones, unless the rows lie a multiple of 4 KiB apart
        // (then a tile's 16 rows share L1 sets). Otherwise a copy into this thread's strips.
        if (w.dtype == DType::bf16 && p.k_pad == w.cols && r0 + kStripRows <= w.rows &&
            (p.groups <= 2 || w.row_bytes() % 4096 != 0)) {
          a[count] = {w.data + size_t(r0) * w.row_bytes(), w.row_bytes(), true};
          continue;
        }
        uint16_t* dst = strip.data() + size_t(count) * strip_values;
        pack_w_strip(w, r0, p.k_pad, dst);
        a[count] = {reinterpret_cast<const uint8_t*>(dst), size_t(strip_stride(p.k_pad)) * 2, false};
        if (w.dtype == DType::f8_e4m3)
          for (int64_t i = 0; i < kStripRows; ++i)
            row_scales[count][i] = w.scale_inv + ((w.row0 + std::min(r0 + i, w.rows - 1)) / kFp8Block) * w.scale_cols;
      }
      const uint32_t* packed = xbuf + p.x_offset;
      if (w.dtype == DType::f8_e4m3)
        block_product<true>(a, count, p.k_pad, packed, part_size(p), p.groups, row_scales, yts, p.ldt);
      else
        block_product<false>(a, count, p.k_pad, packed, part_size(p), p.groups, nullptr, yts, p.ldt);
    }
    release_tiles();
#pragma omp barrier
    // 3. y = yt^T.
#pragma omp for schedule(static)
    for (size_t t = 0; t < blocks.size(); ++t) {
      const Block& b = blocks[t];
      const Plan& p = plans[size_t(b.job)];
      const LinearJob& j = jobs[b.job];
      const int64_t rows = std::min(b.strips * kStripRows, j.w.rows - b.first_row);
      transpose_out(ytbuf + p.yt_offset + b.first_row * p.ldt, p.ldt, rows, j.n, j.y + b.first_row, j.w.rows);
    }
  }
}

// The scalar twin: the same three-part products, each 128-wide block of input features
// summed in float and scaled (FP8) or summed straight through (BF16).
void linear_amx_scalar(const float* x, int64_t n, const Mat& w, float* y) {
  auto bf16 = [](float v) { return bf16_to_f32(f32_to_bf16(v)); };
  for (int64_t r = 0; r < w.rows; ++r) {
    const uint8_t* stored = w.data + size_t(r) * w.row_bytes();
    for (int64_t t = 0; t < n; ++t) {
      float total = 0;
      for (int64_t c0 = 0; c0 < w.cols; c0 += kFp8Block) {
        float s = 0;
        for (int64_t c = c0; c < std::min(w.cols, c0 + kFp8Block); ++c) {
          uint16_t h = 0;
          if (w.dtype == DType::bf16) std::memcpy(&h, stored + 2 * c, 2);
          const float wv = w.dtype == DType::bf16 ? bf16_to_f32(h) : fp8_e4m3_to_f32(stored[c]);
          const float v = x[t * w.cols + c], hi = bf16(v), mid = bf16(v - hi), lo = bf16(v - hi - mid);
          s += wv * hi + wv * mid + wv * lo;
        }
        total += w.dtype == DType::bf16 ? s : s * w.scale_inv[((w.row0 + r) / kFp8Block) * w.scale_cols + c0 / kFp8Block];
      }
      y[t * w.rows + r] = total;
    }
  }
}

}  // namespace dsv3::cpu
