// How many threads the backend's parallel regions use (issue 12, "threads that never
// stall"). An OpenMP team waits at every op's barrier for its slowest thread; when another
// process holds a core, the OS deschedules one of ours for a whole time slice and two threads
// ran 3-10x slower than one. So the backend looks at the machine every 20 ms (the runnable
// threads of /proc/loadavg) and runs as many threads as there are cores the rest of the
// machine leaves free, at most the user's --threads (or the threads OpenMP started with).
// dsv3's own kernels give the same results at any thread count (every reduction sums fixed
// chunks in a fixed order); OpenBLAS's GEMMs can differ in the last bits between one and
// several threads when K's last block is split differently (K between one and two of its
// K blocks, e.g. an expert's weight gradient over a few hundred rows), so bit-exact
// reproduction of a long run wants DSV3_ADAPT_THREADS=0, which turns this off. Internal to
// backend/cpu.
#pragma once

namespace dsv3::cpu {

// Threads for a machine of `cpus` cores on which `others` runnable threads belong to other
// work: the free cores, between 1 and `most`.
int threads_for(int cpus, int others, int most);

// Called at the start of the backend's threaded ops (from outside any parallel region):
// between samples it costs one clock read.
void adapt_threads();

// The most threads the backend may use (--threads), from now on.
void set_thread_limit(int most);

// How long an idle OpenMP thread spins before it sleeps. libgomp's default spin (300,000
// rounds of its wait loop: milliseconds) kept the second thread spinning through the serial stretches of a
// prefill, and the first thread ran them slower meanwhile: on the 2-core development machine
// (a VM) prefill of 64 tokens was 1.3-1.45x faster and of 512 tokens 1.08-1.12x with a spin
// of 30,000 rounds, while decode (whose parallel regions follow each other within
// microseconds) and training stayed the same within noise (bench_decode and dsv3 train,
// alternating runs, 2026-12-06). libgomp reads GOMP_SPINCOUNT only as it starts, so if
// neither it nor OMP_WAIT_POLICY is set, this sets it and executes the program again; if
// that fails, the program goes on as it is. Not under valgrind (the new program would run
// outside it) nor when /proc/self/exe is the dynamic loader (ld.so ./dsv3 ...).
void prepare_wait_policy(char** argv);

// Tests that compare thread counts: exactly `threads` from now on, no adapting (0: adapt
// again, from the limit).
void pin_threads(int threads);

}  // namespace dsv3::cpu
