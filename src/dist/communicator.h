// The communicator of the parallel plan (the multi-process issue): the collectives and
// point-to-point transfers data, expert and pipeline parallelism need, over float32 buffers,
// each in a blocking form and a non-blocking one that returns a Handle to wait on, so that
// communication overlaps computation (DualPipe's premise). Implementations: MPI across
// processes (communicator.cpp, OpenMPI on CPU; all calls from one thread), and NCCL later for
// GPUs behind the same interface. The model never calls it: the parallel plan wraps the model's modules from
// outside (ARCHITECTURE). Errors (a failed call, a dead rank) are dsv3::Error naming the
// operation. Uses core only.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace dsv3::dist {

// A communication in flight; wait() returns once it completed (idempotent).
class Handle {
 public:
  virtual ~Handle() = default;
  virtual void wait() = 0;
  virtual bool test() = 0;  // whether it completed, without blocking
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // Element-wise sum over all ranks, in place (doubles: norms, counts, exact integers).
  virtual std::unique_ptr<Handle> all_reduce_async(std::span<float> data) = 0;
  virtual std::unique_ptr<Handle> all_reduce_async(std::span<double> data) = 0;
  // Sum over all ranks of `in` (size() * count elements), rank i keeping block i in `out`
  // (count elements): ZeRO's gradient reduction.
  virtual std::unique_ptr<Handle> reduce_scatter_async(std::span<const float> in, std::span<float> out) = 0;
  // Each rank's `in` (counts[rank] elements) concatenated in rank order into `out` on every
  // rank: ZeRO's updated shards.
  virtual std::unique_ptr<Handle> all_gather_async(std::span<const float> in, std::span<float> out,
                                                   const std::vector<int64_t>& counts) = 0;
  // all_gather's pieces delivered to `root` only (`out` matters there alone): a checkpoint's
  // optimizer state, gathered without every rank holding all of it.
  virtual std::unique_ptr<Handle> gather_async(std::span<const float> in, std::span<float> out, const std::vector<int64_t>& counts,
                                               int root) = 0;
  // Rank i sends send_counts[j] elements to rank j (in rank order from `send`) and receives
  // recv_counts[j] from rank j (in rank order into `recv`): expert parallelism's dispatch and
  // combine.
  virtual std::unique_ptr<Handle> all_to_all_async(std::span<const float> send, const std::vector<int64_t>& send_counts,
                                                   std::span<float> recv, const std::vector<int64_t>& recv_counts) = 0;
  virtual std::unique_ptr<Handle> send_async(std::span<const float> data, int to, int tag) = 0;
  virtual std::unique_ptr<Handle> recv_async(std::span<float> data, int from, int tag) = 0;
  virtual void barrier() = 0;
  // The ranks with the same color (>= 0), ordered by key: a sub-communicator (a
  // data-parallel, expert-parallel or pipeline group).
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  // Blocking forms.
  void all_reduce(std::span<float> data) { all_reduce_async(data)->wait(); }
  void all_reduce(std::span<double> data) { all_reduce_async(data)->wait(); }
  void reduce_scatter(std::span<const float> in, std::span<float> out) { reduce_scatter_async(in, out)->wait(); }
  void all_gather(std::span<const float> in, std::span<float> out, const std::vector<int64_t>& counts) {
    all_gather_async(in, out, counts)->wait();
  }
  void gather(std::span<const float> in, std::span<float> out, const std::vector<int64_t>& counts, int root) {
    gather_async(in, out, counts, root)->wait();
  }
  void all_to_all(std::span<const float> send, const std::vector<int64_t>& send_counts, std::span<float> recv,
                  const std::vector<int64_t>& recv_counts) {
    all_to_all_async(send, send_counts, recv, recv_counts)->wait();
  }
  void send(std::span<const float> data, int to, int tag) { send_async(data, to, tag)->wait(); }
  void recv(std::span<float> data, int from, int tag) { recv_async(data, from, tag)->wait(); }
};

// The world of this process: MPI's when the program was started by mpirun (MPI is
// initialised once), else a world of one process whose collectives copy. Error if MPI
// reports a failure.
Communicator& world();
// Ends every process of the job at once (MPI_Abort) when this one fails alone: the others
// would wait for it in their next collective forever. Returns if there is no such job.
void abort_job(int code);
// Prints `message` on stderr and ends the job (abort_job). Under mpirun a process other
// than rank 0 first waits 5 s (at most half the communication deadline), so that an error every rank hits alike (a bad launch) is
// printed once, by rank 0, whose abort ends the others; one failing alone is printed
// with its rank.
void fail_job(const std::string& message, int code);
// Whether the program runs under an MPI launcher with more than one process.
bool launched_by_mpi();

}  // namespace dsv3::dist
