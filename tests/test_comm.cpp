// The communicator (dist/communicator.h), run by CTest under `mpirun -np 4` (and alone, a
// world of one): every collective's result against values computed here, uneven counts,
// sub-communicators, non-blocking forms overlapped with local work, point-to-point in a ring,
// and mismatched sizes named.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <numeric>

#include "core/error.h"
#include "dist/communicator.h"

namespace dsv3 {
namespace {

using dist::world;

TEST(Communicator, AllReduceSumsInPlaceAndOverlaps) {
  auto& w = world();
  const int R = w.size(), r = w.rank();
  std::vector<float> data(1000);
  for (size_t i = 0; i < data.size(); ++i) data[i] = float(r) + float(i);
  auto h = w.all_reduce_async(data);
  double local = 0;  // work while the sum is in flight
  for (int i = 0; i < 100000; ++i) local += i * 1e-9;
  h->wait();
  h->wait();  // idempotent
  EXPECT_GT(local, 0);
  for (size_t i = 0; i < data.size(); ++i) ASSERT_FLOAT_EQ(data[i], float(R) * float(i) + float(R * (R - 1) / 2)) << i;
}

TEST(Communicator, ReduceScatterAndAllGatherAreZeroOnesHalves) {
  auto& w = world();
  const int R = w.size(), r = w.rank();
  const int64_t count = 7;
  std::vector<float> in(size_t(count * R)), out(static_cast<size_t>(count));
  for (size_t j = 0; j < in.size(); ++j) in[j] = float(r * 1000) + float(j);
  w.reduce_scatter(in, out);
  for (int64_t k = 0; k < count; ++k)
    EXPECT_FLOAT_EQ(out[size_t(k)], float(1000 * R * (R - 1) / 2) + float(R) * float(r * count + k));
  // Uneven shards: rank i holds i + 1 values, all i.
  std::vector<int64_t> counts(static_cast<size_t>(R));
  for (int i = 0; i < R; ++i) counts[size_t(i)] = i + 1;
  std::vector<float> mine(size_t(r + 1), float(r)), all(size_t(R * (R + 1) / 2));
  w.all_gather(mine, all, counts);
  size_t at = 0;
  for (int i = 0; i < R; ++i)
    for (int k = 0; k <= i; ++k) EXPECT_FLOAT_EQ(all[at++], float(i));
  // The same pieces to the last rank only.
  std::vector<float> at_root(r == R - 1 ? all.size() : 0, -1.0f);
  w.gather(mine, at_root, counts, R - 1);
  if (r == R - 1) {
    EXPECT_EQ(at_root, all);
  }
}

TEST(Communicator, AllToAllWithVariableCounts) {
  auto& w = world();
  const int R = w.size(), r = w.rank();
  // Rank i sends i + j + 1 values of i * 100 + j to rank j.
  std::vector<int64_t> send_counts(static_cast<size_t>(R)), recv_counts(static_cast<size_t>(R));
  std::vector<float> send;
  for (int j = 0; j < R; ++j) {
    send_counts[size_t(j)] = r + j + 1, recv_counts[size_t(j)] = j + r + 1;
    send.insert(send.end(), size_t(r + j + 1), float(r * 100 + j));
  }
  std::vector<float> recv(size_t(std::accumulate(recv_counts.begin(), recv_counts.end(), int64_t(0))));
  w.all_to_all(send, send_counts, recv, recv_counts);
  size_t at = 0;
  for (int j = 0; j < R; ++j)
    for (int k = 0; k < j + r + 1; ++k) EXPECT_FLOAT_EQ(recv[at++], float(j * 100 + r));
}

TEST(Communicator, RingAndSubCommunicators) {
  auto& w = world();
  const int R = w.size(), r = w.rank();
  if (R > 1) {  // each rank passes its number to the next
    std::vector<float> out = {float(r)}, in(1);
    auto s = w.send_async(out, (r + 1) % R, 7);
    w.recv(in, (r + R - 1) % R, 7);
    s->wait();
    EXPECT_FLOAT_EQ(in[0], float((r + R - 1) % R));
  } else {
    std::vector<float> x(1);
    EXPECT_THROW(w.send(x, 0, 0), Error);
  }
  // Even and odd ranks: two groups, each summing its own.
  auto group = w.split(r % 2, r);
  std::vector<float> v = {float(r)};
  group->all_reduce(v);
  float expect = 0;
  for (int i = r % 2; i < R; i += 2) expect += float(i);
  EXPECT_FLOAT_EQ(v[0], expect);
  EXPECT_EQ(group->rank(), r / 2);
  w.barrier();
}

TEST(Communicator, MismatchedSizesAreNamed) {
  auto& w = world();
  std::vector<float> in(3), out(2);
  try {
    w.reduce_scatter(in, out);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), testing::HasSubstr("reduce_scatter"));
  }
  std::vector<int64_t> wrong(size_t(w.size() + 1), 1);
  std::vector<float> a(1), b(size_t(w.size() + 1));
  EXPECT_THROW(w.all_gather(a, b, wrong), Error);
}

}  // namespace
}  // namespace dsv3
