// Pipeline-parallel schedules (DeepSeek-V3 §3.2.1, Table 2): what each pipeline rank runs, in
// order, for one step of M micro-batches, and a simulator that times it under given chunk
// costs. A chunk is one stage's work on one micro-batch: F (forward), B (backward for the
// inputs; with W folded in when the schedule does not split it), W (backward for the
// weights), or F&B (a forward and a backward of two micro-batches run overlapped, DualPipe's
// unit). Schedules:
//   1f1b      one forward one backward (PipeDream-flush): rank r warms up with P-1-r
//             forwards, alternates, and drains.
//   zb1p      zero-bubble ZB-H1 (Qi et al., 2023): 1F1B's order with each backward split into
//             B and W, and the W of the first P-1-r ... deferred into the drain's bubbles; the
//             activations held stay 1F1B's.
//   dualpipe  DualPipe (DeepSeek-V3 §3.2.1; DeepSeek's DualPipe repository): P even, M even
//             and >= 2P; rank r holds stages r and P-1-r, half of the micro-batches enter at
//             rank 0 and half at rank P-1, a forward of one direction overlapped with a
//             backward of the other in the steady state, and the ends use zero-bubble W.
//   dualpipev DualPipeV, DualPipe cut in half (DeepSeek's DualPipe repository): the model in
//             2P stages, rank r holding stages r and 2P-1-r; every micro-batch enters at rank
//             0, runs down the ranks (phase 0) and back up (phase 1, from stage P on rank
//             P-1), its loss on rank 0. M >= 2P. Rank r's op order is DualPipe's on 2P ranks
//             with 2M micro-batches, its direction read as the phase of one stream.
// The simulator ignores communication (as Table 2 does): a chunk starts when its rank is free
// and its inputs exist (the previous stage's F, the next stage's B, its own F / B).
// The same op lists are what an executed pipeline will run (the MPI issue). Uses core only.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dsv3::dist {

enum class Chunk : uint8_t { F, B, W, FB };

struct Op {
  Chunk kind;
  int dir = 0;         // DualPipe: the direction (0 enters at rank 0, 1 at rank P-1); DualPipeV: the phase; else 0
  int micro = 0;       // the micro-batch (within its direction)
  bool full_b = true;  // B: with its W (no W op follows for it)
  int dir2 = 0, micro2 = 0;  // FB: the backward's direction and micro-batch (the F is dir/micro)
};

struct Schedule {
  std::string name;
  int pp = 0, micro_batches = 0;
  int stages_per_rank = 1;              // 2 for DualPipe (parameter copies) and DualPipeV (two halves)
  bool v_shape = false;                 // DualPipeV: the phases are one stream through 2P stages
  std::vector<std::vector<Op>> ranks;   // what each rank runs, in order

  int stages() const { return v_shape ? 2 * pp : pp; }
  // The stage a rank runs for a direction (phase).
  int stage_of(int rank, int dir) const { return dir == 0 ? rank : v_shape ? 2 * pp - 1 - rank : pp - 1 - rank; }
  // The stream a direction's micro-batches belong to (DualPipeV's phases are one stream).
  int stream(int dir) const { return v_shape ? 0 : dir; }
};

// Throw Error naming the violated condition (P < 2 but for DualPipeV, M < 1, DualPipe's
// evenness, M >= 2P for both DualPipes).
Schedule one_f_one_b(int pp, int micro_batches);
Schedule zero_bubble_h1(int pp, int micro_batches);
Schedule dualpipe(int pp, int micro_batches);
Schedule dualpipev(int pp, int micro_batches);
Schedule make_schedule(const std::string& name, int pp, int micro_batches);

// Chunk costs: F, the full backward B (inputs and weights), its weight part W, and an
// overlapped forward + backward FB.
struct Costs {
  double f = 1, b = 2, w = 1, fb = 2.5;
};

struct Timed {
  Op op;
  double start, end;
};
struct Timeline {
  std::vector<std::vector<Timed>> ranks;
  double makespan = 0;
  std::vector<double> busy, bubble;       // per rank: time computing, and idle before its last op ends... see .cpp
  std::vector<int> peak_activations;      // per rank: the most micro-batch chunks held at once
};

// Runs the schedule's op lists; Error if they deadlock (an op waits for one that never runs).
Timeline simulate(const Schedule& s, const Costs& c);
// The same with each rank's own chunk costs (measured ones: stages differ, the last one
// runs the output head).
Timeline simulate(const Schedule& s, const std::vector<Costs>& per_rank);

// Table 2's closed forms: bubble, parameter copies, activations of the first rank.
double table2_bubble(const std::string& name, int pp, const Costs& c);
int table2_parameters(const std::string& name);
int table2_activations(const std::string& name, int pp);

// The timeline as an SVG picture (one row per rank, chunks coloured by kind and direction).
std::string timeline_svg(const Schedule& s, const Timeline& t);

}  // namespace dsv3::dist
