// How many threads the backend's parallel regions use (issue 12, "threads that never
// stall"). An OpenMP team waits at every op's barrier for its slowest thread; when another
// process holds a core, the OS deschedules one of ours for a whole time slice and two threads
// ran 3-10x slower than one. So the backend looks at the machine every 20 ms (the runnable
// threads /proc/stat counts) and runs as many threads as there are cores the rest of the
// machine leaves free, at most the user's --threads. Results do not depend on the thread
// count (every reduction sums fixed chunks in a fixed order), so this changes speed only.
// DSV3_ADAPT_THREADS=0 turns it off. Internal to backend/cpu.
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

}  // namespace dsv3::cpu
