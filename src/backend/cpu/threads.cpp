// The backend's thread count from the machine's load (see threads.h).
#include "backend/cpu/threads.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>

#include <unistd.h>

namespace dsv3::cpu {

namespace {

constexpr int64_t kSampleNs = 20'000'000;  // how often the load is looked at
constexpr int kAgreeing = 2;               // samples that must agree before the count changes

std::atomic<int> g_most{0};        // the limit: --threads, else the threads OpenMP started with
std::atomic<bool> g_pinned{false};  // pin_threads(): tests that compare thread counts

// Runnable threads on the machine now (the 4th field of /proc/loadavg, "running/total",
// the kernel's procs_running; a short file, unlike /proc/stat), or -1 if unknown.
int procs_running() {
  FILE* f = std::fopen("/proc/loadavg", "r");
  if (!f) return -1;
  double a, b, c;
  int running = -1, total = 0;
  if (std::fscanf(f, "%lf %lf %lf %d/%d", &a, &b, &c, &running, &total) != 5) running = -1;
  std::fclose(f);
  return running;
}

bool enabled() {
  static const bool on = [] {
    const char* e = std::getenv("DSV3_ADAPT_THREADS");
    return !(e && std::string(e) == "0") && procs_running() > 0;
  }();
  return on && !g_pinned.load();
}

// The limit, fixed at the first call from the threads OpenMP starts with if --threads did not
// set it (read before this file ever changes the count, so a drop is never taken for the limit).
int limit() {
  int most = g_most.load();
  if (most == 0) {
    int initial = omp_get_max_threads();
    g_most.compare_exchange_strong(most, initial);
    most = g_most.load();
  }
  return most;
}

// Each application thread that calls the backend adapts its own OpenMP thread count.
struct Plan {
  int current = 0;  // 0: not started
  int pending = 0, agreeing = 0;
  int64_t next_ns = 0;
};
thread_local Plan t_plan;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

int threads_for(int cpus, int others, int most) { return std::clamp(cpus - others, 1, std::max(most, 1)); }

void set_thread_limit(int most) {
  g_most = most;
  t_plan = Plan{};
  omp_set_num_threads(most);
}

void pin_threads(int threads) {
  g_pinned = threads > 0;
  if (threads > 0) omp_set_num_threads(threads);
  else omp_set_num_threads(limit()), t_plan = Plan{};
}

void adapt_threads() {
  if (!enabled() || omp_in_parallel()) return;
  Plan& p = t_plan;
  const int64_t now = now_ns();
  if (now < p.next_ns) return;
  p.next_ns = now + kSampleNs;
  const int most = limit();
  if (p.current == 0) {  // this thread's first op: start from the limit (a new thread starts from OpenMP's default)
    p.current = most;
    omp_set_num_threads(most);
  }
  const int running = procs_running();
  if (running < 0) return;
  // Our team's threads run (or spin) while we work; everything else is other work. The
  // calling thread is always one of the running.
  const int others = std::max(0, running - p.current);
  const int want = threads_for(omp_get_num_procs(), others, most);
  if (want == p.current) {
    p.agreeing = 0;
    return;
  }
  p.agreeing = want == p.pending ? p.agreeing + 1 : 1;
  p.pending = want;
  if (p.agreeing < kAgreeing) return;
  p.current = want, p.agreeing = 0;
  omp_set_num_threads(want);
}

void prepare_wait_policy(char** argv) {
  if (std::getenv("GOMP_SPINCOUNT") || std::getenv("OMP_WAIT_POLICY") || !argv || !argv[0]) return;
  const char* preload = std::getenv("LD_PRELOAD");
  if (preload && std::string(preload).find("vgpreload") != std::string::npos) return;  // valgrind
  char exe[4096];
  const ssize_t len = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (len <= 0) return;
  exe[len] = 0;
  if (std::string(exe).find("/ld-linux") != std::string::npos) return;  // started through the loader
  if (setenv("GOMP_SPINCOUNT", "30000", 1) != 0) return;
  execv(exe, argv);  // returns only on failure: then go on with the default
  unsetenv("GOMP_SPINCOUNT");
}

}  // namespace dsv3::cpu
