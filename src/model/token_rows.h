// Where the tokens of one forward pass sit. Attention is causal within each sequence
// (§2.1.1): token t is at position pos[t] of its sequence and its latent lives in cache row
// row[t], so that sequence's positions 0 .. pos[t] are the rows row[t] - pos[t] .. row[t].
// The tokens of a sequence are consecutive and in order. One sequence being decoded, a
// prompt, a batch of sequences at different positions and a batch of training windows are
// all such a list. Depends on std only.
#pragma once
#include <cstdint>
#include <vector>

namespace dsv3 {

struct TokenRows {
  std::vector<int64_t> pos, row;

  int64_t size() const { return int64_t(pos.size()); }
  int64_t first_row(int64_t t) const { return row[size_t(t)] - pos[size_t(t)]; }  // its position 0

  // n tokens of one sequence from position start, in a cache whose row p holds position p.
  // Filled in place: the vectors keep their memory from one pass to the next.
  void set_sequence(int64_t start, int64_t n) {
    pos.resize(size_t(n)), row.resize(size_t(n));
    for (int64_t t = 0; t < n; ++t) pos[size_t(t)] = row[size_t(t)] = start + t;
  }
  // B windows of S tokens from position 0; token b*S + i is row b*S + i (a training batch).
  void set_windows(int64_t B, int64_t S) {
    pos.resize(size_t(B * S)), row.resize(size_t(B * S));
    for (int64_t t = 0; t < B * S; ++t) pos[size_t(t)] = t % S, row[size_t(t)] = t;
  }
  static TokenRows sequence(int64_t start, int64_t n) {
    TokenRows r;
    r.set_sequence(start, n);
    return r;
  }
  static TokenRows windows(int64_t B, int64_t S) {
    TokenRows r;
    r.set_windows(B, S);
    return r;
  }
};

}  // namespace dsv3
