// The backend's thread count from the machine's load (see threads.h).
#include "backend/cpu/threads.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace dsv3::cpu {

namespace {

constexpr int64_t kSampleNs = 20'000'000;  // how often the load is looked at
constexpr int kAgreeing = 2;               // samples that must agree before the count changes

std::atomic<int> g_most{0};  // 0: what OpenMP starts with

// Runnable threads on the machine now (the kernel's procs_running), or -1 if unknown.
int procs_running() {
  FILE* f = std::fopen("/proc/stat", "r");
  if (!f) return -1;
  char line[256];
  int n = -1;
  while (std::fgets(line, sizeof(line), f))
    if (std::strncmp(line, "procs_running ", 14) == 0) {
      n = std::atoi(line + 14);
      break;
    }
  std::fclose(f);
  return n;
}

bool enabled() {
  static const bool on = [] {
    const char* e = std::getenv("DSV3_ADAPT_THREADS");
    return !(e && std::string(e) == "0") && procs_running() > 0;
  }();
  return on;
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
  t_plan = Plan{most};
  omp_set_num_threads(most);
}

void adapt_threads() {
  if (!enabled() || omp_in_parallel()) return;
  Plan& p = t_plan;
  const int64_t now = now_ns();
  if (now < p.next_ns) return;
  p.next_ns = now + kSampleNs;
  const int most = g_most.load() > 0 ? g_most.load() : omp_get_max_threads();
  if (p.current == 0) p.current = most;
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

}  // namespace dsv3::cpu
