// The communicator over MPI, and a world of one process (see communicator.h).
#include "dist/communicator.h"

#include <mpi.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <exception>
#include <cstdio>
#include <thread>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/error.h"

namespace dsv3::dist {

namespace {

// MPI's answer, or an Error naming the operation and MPI's reason.
void check(int code, const char* op) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, text, &len);
  fail("MPI ", op, " failed: ", std::string(text, size_t(len)));
}

int as_int(int64_t n, const char* op) {
  if (n < 0 || n > INT_MAX) fail("MPI ", op, ": a count of ", n, " elements is outside MPI's int");
  return int(n);
}

// How long a communication may wait for the other processes: DSV3_COMM_TIMEOUT seconds,
// 600 by default (a checkpoint or an evaluation on rank 0 makes the others wait).
double comm_timeout() {
  static const double seconds = [] {
    const char* v = std::getenv("DSV3_COMM_TIMEOUT");
    const double s = v ? std::atof(v) : 600.0;
    return s > 0 ? s : 600.0;
  }();
  return seconds;
}

// Set when a communication timed out: the job is ending, and nothing waits on MPI again
// (the process's one piece of shared state: MPI itself is per process).
std::atomic<bool> job_failing{false};

class MpiHandle : public Handle {
 public:
  MpiHandle(const char* op) : op_(op) {}
  MPI_Request request = MPI_REQUEST_NULL;
  std::vector<int> counts, displacements, counts2, displacements2;  // alive until done
  // Polls rather than MPI_Wait: a rank that hung (or died without the launcher noticing)
  // becomes an Error after comm_timeout() seconds instead of a job waiting forever, and a
  // waiting process sleeps between polls, leaving the cores to those computing.
  void wait() override {
    if (job_failing && request != MPI_REQUEST_NULL) fail("MPI ", op_, ": not waited for, an earlier communication failed");
    wait_for(comm_timeout());
  }
  bool test() override {
    if (request == MPI_REQUEST_NULL) return true;
    int flag = 0;
    const int code = MPI_Test(&request, &flag, MPI_STATUS_IGNORE);
    if (code != MPI_SUCCESS) request = MPI_REQUEST_NULL;
    check(code, op_);
    return flag != 0;
  }
  // Waits for the request before its buffers go. While an error unwinds (the job is ending:
  // main aborts it) it waits briefly only, so that the error is printed: a point-to-point
  // request then left (a pipeline's early receive or send) is cancelled, a collective's
  // abandoned until the abort. A timeout outside an error ends the job here.
  ~MpiHandle() override {
    if (request == MPI_REQUEST_NULL) return;
    const bool unwinding = job_failing || std::uncaught_exceptions() > 0;
    try {
      wait_for(job_failing ? 0.1 : unwinding ? 1.0 : comm_timeout());
    } catch (const Error& e) {
      job_failing = true;  // the others left go without waiting long
      if (point_to_point) {
        MPI_Cancel(&request);
        MPI_Request_free(&request);
      }
      request = MPI_REQUEST_NULL;  // abandoned
      if (!unwinding) fail_job(std::string("dsv3: error: ") + e.what(), 1);
    }
  }
  bool point_to_point = false;  // a send or receive (MPI_Cancel applies)

 private:
  void wait_for(double limit) {
    const auto start = std::chrono::steady_clock::now();
    for (int polls = 0; !test(); ++polls) {
      if (polls < 200) continue;  // a few microseconds of spinning first: most waits are short
      const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (waited > limit) {
        job_failing = true;
        fail("MPI ", op_, ": no answer from the other processes in ", int(waited),
             " s; a process hung or died (the limit is DSV3_COMM_TIMEOUT, in seconds)");
      }
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  }
  const char* op_;
};

// Counts in rank order, and their offsets.
void layout(const std::vector<int64_t>& counts, int size, const char* op, std::vector<int>& c, std::vector<int>& d, int64_t& total) {
  if (int(counts.size()) != size) fail("MPI ", op, ": ", counts.size(), " counts for ", size, " ranks");
  c.resize(size_t(size)), d.resize(size_t(size));
  total = 0;
  for (int i = 0; i < size; ++i) {
    c[size_t(i)] = as_int(counts[size_t(i)], op);
    d[size_t(i)] = as_int(total, op);
    total += counts[size_t(i)];
  }
  as_int(total, op);
}

class MpiCommunicator : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm) : comm_(comm) {
    check(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "Comm_set_errhandler");
    check(MPI_Comm_rank(comm_, &rank_), "Comm_rank");
    check(MPI_Comm_size(comm_, &size_), "Comm_size");
  }
  ~MpiCommunicator() override {
    if (comm_ != MPI_COMM_WORLD) MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  std::unique_ptr<Handle> all_reduce_async(std::span<float> data) override {
    auto h = std::make_unique<MpiHandle>("all_reduce");
    check(MPI_Iallreduce(MPI_IN_PLACE, data.data(), as_int(int64_t(data.size()), "all_reduce"), MPI_FLOAT, MPI_SUM, comm_, &h->request),
          "all_reduce");
    return h;
  }
  std::unique_ptr<Handle> all_reduce_async(std::span<double> data) override {
    auto h = std::make_unique<MpiHandle>("all_reduce");
    check(MPI_Iallreduce(MPI_IN_PLACE, data.data(), as_int(int64_t(data.size()), "all_reduce"), MPI_DOUBLE, MPI_SUM, comm_, &h->request),
          "all_reduce");
    return h;
  }
  std::unique_ptr<Handle> reduce_scatter_async(std::span<const float> in, std::span<float> out) override {
    if (in.size() != out.size() * size_t(size_))
      fail("MPI reduce_scatter: ", in.size(), " elements in for ", out.size(), " out on each of ", size_, " ranks");
    auto h = std::make_unique<MpiHandle>("reduce_scatter");
    check(MPI_Ireduce_scatter_block(in.data(), out.data(), as_int(int64_t(out.size()), "reduce_scatter"), MPI_FLOAT, MPI_SUM, comm_,
                                    &h->request),
          "reduce_scatter");
    return h;
  }
  std::unique_ptr<Handle> all_gather_async(std::span<const float> in, std::span<float> out, const std::vector<int64_t>& counts) override {
    auto h = std::make_unique<MpiHandle>("all_gather");
    int64_t total = 0;
    layout(counts, size_, "all_gather", h->counts, h->displacements, total);
    if (int64_t(in.size()) != counts[size_t(rank_)] || int64_t(out.size()) != total)
      fail("MPI all_gather: rank ", rank_, " gives ", in.size(), " elements (its count is ", counts[size_t(rank_)], ") into ", out.size(),
           " (the counts sum to ", total, ")");
    check(MPI_Iallgatherv(in.data(), int(in.size()), MPI_FLOAT, out.data(), h->counts.data(), h->displacements.data(), MPI_FLOAT,
                          comm_, &h->request),
          "all_gather");
    return h;
  }
  std::unique_ptr<Handle> gather_async(std::span<const float> in, std::span<float> out, const std::vector<int64_t>& counts,
                                       int root) override {
    if (root < 0 || root >= size_) fail("MPI gather: no rank ", root, " among ", size_);
    auto h = std::make_unique<MpiHandle>("gather");
    int64_t total = 0;
    layout(counts, size_, "gather", h->counts, h->displacements, total);
    if (int64_t(in.size()) != counts[size_t(rank_)] || (rank_ == root && int64_t(out.size()) != total))
      fail("MPI gather: rank ", rank_, " gives ", in.size(), " elements (its count is ", counts[size_t(rank_)], ")",
           rank_ == root ? cat(" into ", out.size(), " (the counts sum to ", total, ")") : std::string());
    check(MPI_Igatherv(in.data(), int(in.size()), MPI_FLOAT, out.data(), h->counts.data(), h->displacements.data(), MPI_FLOAT, root,
                       comm_, &h->request),
          "gather");
    return h;
  }
  std::unique_ptr<Handle> all_to_all_async(std::span<const float> send, const std::vector<int64_t>& send_counts, std::span<float> recv,
                                           const std::vector<int64_t>& recv_counts) override {
    auto h = std::make_unique<MpiHandle>("all_to_all");
    int64_t sent = 0, received = 0;
    layout(send_counts, size_, "all_to_all", h->counts, h->displacements, sent);
    layout(recv_counts, size_, "all_to_all", h->counts2, h->displacements2, received);
    if (int64_t(send.size()) != sent || int64_t(recv.size()) != received)
      fail("MPI all_to_all: buffers of ", send.size(), " and ", recv.size(), " elements for counts summing to ", sent, " and ", received);
    check(MPI_Ialltoallv(send.data(), h->counts.data(), h->displacements.data(), MPI_FLOAT, recv.data(), h->counts2.data(),
                         h->displacements2.data(), MPI_FLOAT, comm_, &h->request),
          "all_to_all");
    return h;
  }
  std::unique_ptr<Handle> send_async(std::span<const float> data, int to, int tag) override {
    if (to < 0 || to >= size_) fail("MPI send: no rank ", to, " among ", size_);
    auto h = std::make_unique<MpiHandle>("send");
    h->point_to_point = true;
    check(MPI_Isend(data.data(), as_int(int64_t(data.size()), "send"), MPI_FLOAT, to, tag, comm_, &h->request), "send");
    return h;
  }
  std::unique_ptr<Handle> recv_async(std::span<float> data, int from, int tag) override {
    if (from < 0 || from >= size_) fail("MPI recv: no rank ", from, " among ", size_);
    auto h = std::make_unique<MpiHandle>("recv");
    h->point_to_point = true;
    check(MPI_Irecv(data.data(), as_int(int64_t(data.size()), "recv"), MPI_FLOAT, from, tag, comm_, &h->request), "recv");
    return h;
  }
  void barrier() override {
    MpiHandle h("barrier");
    check(MPI_Ibarrier(comm_, &h.request), "barrier");
    h.wait();
  }
  std::unique_ptr<Communicator> split(int color, int key) override {
    if (color < 0) fail("MPI split: a color must be >= 0, not ", color);
    barrier();  // every rank there (with the deadline) before the blocking MPI_Comm_split
    MPI_Comm sub;
    check(MPI_Comm_split(comm_, color, key, &sub), "split");
    return std::make_unique<MpiCommunicator>(sub);
  }

 private:
  MPI_Comm comm_;
  int rank_ = 0, size_ = 1;
};

struct Done : Handle {
  void wait() override {}
  bool test() override { return true; }
};

// One process: every collective is a copy (or nothing), and there is no peer to talk to.
class SingleProcess : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::unique_ptr<Handle> all_reduce_async(std::span<float>) override { return std::make_unique<Done>(); }
  std::unique_ptr<Handle> all_reduce_async(std::span<double>) override { return std::make_unique<Done>(); }
  std::unique_ptr<Handle> reduce_scatter_async(std::span<const float> in, std::span<float> out) override {
    if (in.size() != out.size()) fail("reduce_scatter: ", in.size(), " elements in for ", out.size(), " out on one rank");
    std::memcpy(out.data(), in.data(), in.size() * sizeof(float));
    return std::make_unique<Done>();
  }
  std::unique_ptr<Handle> all_gather_async(std::span<const float> in, std::span<float> out, const std::vector<int64_t>& counts) override {
    if (counts.size() != 1 || int64_t(in.size()) != counts[0] || out.size() != in.size()) fail("all_gather: sizes disagree on one rank");
    std::memcpy(out.data(), in.data(), in.size() * sizeof(float));
    return std::make_unique<Done>();
  }
  std::unique_ptr<Handle> gather_async(std::span<const float> in, std::span<float> out, const std::vector<int64_t>& counts,
                                       int root) override {
    if (root != 0) fail("gather: no rank ", root, " in a world of one process");
    return all_gather_async(in, out, counts);
  }
  std::unique_ptr<Handle> all_to_all_async(std::span<const float> send, const std::vector<int64_t>& sc, std::span<float> recv,
                                           const std::vector<int64_t>& rc) override {
    if (sc.size() != 1 || rc.size() != 1 || sc[0] != rc[0] || int64_t(send.size()) != sc[0] || recv.size() != send.size())
      fail("all_to_all: sizes disagree on one rank");
    std::memcpy(recv.data(), send.data(), send.size() * sizeof(float));
    return std::make_unique<Done>();
  }
  std::unique_ptr<Handle> send_async(std::span<const float>, int to, int) override { fail("send to rank ", to, ": a world of one process has no peer"); }
  std::unique_ptr<Handle> recv_async(std::span<float>, int from, int) override { fail("recv from rank ", from, ": a world of one process has no peer"); }
  void barrier() override {}
  std::unique_ptr<Communicator> split(int, int) override { return std::make_unique<SingleProcess>(); }
};

}  // namespace

bool launched_by_mpi() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
    if (const char* s = std::getenv(v)) return std::string(v) == "PMIX_RANK" || std::atoi(s) > 1;
  return false;
}

void fail_job(const std::string& message, int code) {
  int initialized = 0, finalized = 0, size = 1, rank = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Comm_size(MPI_COMM_WORLD, &size), MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (size > 1 && rank != 0) {
    // A bad launch fails on every rank alike: rank 0's message and MPI_Abort come first and
    // end this process; a failure of this rank alone is printed after the pause.
    // (Shorter than the communication deadline, so that a lone failure is not overtaken by
    // the others' timeouts.)
    std::this_thread::sleep_for(std::chrono::duration<double>(std::min(5.0, comm_timeout() / 2)));
    std::fprintf(stderr, "rank %d: %s\n", rank, message.c_str());
  } else {
    std::fprintf(stderr, "%s\n", message.c_str());
  }
  std::fflush(stderr);
  abort_job(code);
}

void abort_job(int code) {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized) return;
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (size > 1) MPI_Abort(MPI_COMM_WORLD, code);
}

Communicator& world() {
  static std::unique_ptr<Communicator> w = [] () -> std::unique_ptr<Communicator> {
    if (!launched_by_mpi()) return std::make_unique<SingleProcess>();
    int provided = 0;
    check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided), "Init_thread");
    std::atexit([] {
      int finalized = 0;
      MPI_Finalized(&finalized);
      if (!finalized) MPI_Finalize();
    });
    return std::make_unique<MpiCommunicator>(MPI_COMM_WORLD);
  }();
  return *w;
}

}  // namespace dsv3::dist
