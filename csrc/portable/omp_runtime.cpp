// A small OpenMP runtime for the portable wheel.
//
// The portable wheel is compiled by zig's clang against glibc 2.28 with libc++
// linked in statically, so one binary loads on every manylinux_2_28 system.
// clang lowers `#pragma omp parallel` and `omp for` to calls into an LLVM-style
// OpenMP runtime (the __kmpc_* entry points). GCC's libgomp has another ABI,
// and a static copy of LLVM's or Intel's runtime aborts the process when a
// second copy is already loaded (their duplicate-runtime check), which is
// common next to numpy/MKL. fastalign's CPU kernels use only parallel regions
// (with `num_threads` and `if`), `for schedule(static)` and barriers; this file
// implements exactly those with one persistent thread pool and nothing else, so
// a new construct in the kernels fails at link time, never at run time.
//
// Semantics kept from OpenMP: OMP_NUM_THREADS (else the CPUs this process may
// run on) sets the team size; nested regions, and a region started while
// another application thread's region is running, run on one thread; the end of
// a region waits for every member (the join); a child process after fork()
// builds a fresh pool.
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "omp.h"

extern "C" {
struct ident_t;
typedef void (*microtask_t)(int32_t*, int32_t*, ...);
}

namespace {

struct Team {
  int nthreads = 1;
  microtask_t fn = nullptr;
  void** args = nullptr;
  int argc = 0;
  std::atomic<int> arrived{0};
  std::atomic<uint32_t> barrier_gen{0};
};

Team g_solo;                           // the team of a serialized region: one member
thread_local Team* t_team = nullptr;   // null outside every parallel region
thread_local int t_tid = 0;
thread_local int t_requested = 0;      // the num_threads clause of the next region
thread_local std::vector<std::pair<Team*, int>> t_serialized;
std::atomic<int> g_max_threads{0};     // omp_set_num_threads; 0 = the default

int default_threads() {
  static const int n = [] {
    if (const char* s = std::getenv("OMP_NUM_THREADS")) {
      const int v = std::atoi(s);
      if (v > 0) return v;
    }
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
    const unsigned h = std::thread::hardware_concurrency();
    return h ? static_cast<int>(h) : 1;
  }();
  return n;
}

// The outlined region takes (gtid*, btid*, captured pointers...): call it with argc pointers.
constexpr size_t kMaxArgs = 32;
template <size_t>
using VoidPtr = void*;
template <size_t... I>
void invoke_with(microtask_t fn, int32_t* gtid, int32_t* btid, void** a, std::index_sequence<I...>) {
  reinterpret_cast<void (*)(int32_t*, int32_t*, VoidPtr<I>...)>(fn)(gtid, btid, a[I]...);
}
template <size_t N>
void invoke(microtask_t fn, int32_t* gtid, int32_t* btid, void** a) {
  invoke_with(fn, gtid, btid, a, std::make_index_sequence<N>{});
}
using Invoker = void (*)(microtask_t, int32_t*, int32_t*, void**);
template <size_t... N>
constexpr std::array<Invoker, sizeof...(N)> make_invokers(std::index_sequence<N...>) {
  return {{&invoke<N>...}};
}
constexpr auto kInvokers = make_invokers(std::make_index_sequence<kMaxArgs + 1>{});

void run_member(Team* team, int tid) {
  Team* const outer_team = t_team;
  const int outer_tid = t_tid;
  t_team = team;
  t_tid = tid;
  int32_t gtid = tid, btid = tid;
  kInvokers[team->argc](team->fn, &gtid, &btid, team->args);
  t_team = outer_team;
  t_tid = outer_tid;
}

class Pool {
 public:
  std::mutex busy;  // held by the application thread whose region owns the pool

  // Members 1..n-1 run on workers, member 0 on the caller; returns when all are done.
  void run(Team* team) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      while (workers_ < team->nthreads - 1) {
        std::thread(&Pool::work, this, workers_ + 1, generation_).detach();
        ++workers_;
      }
      team_ = team;
      pending_ = team->nthreads - 1;
      ++generation_;
    }
    start_.notify_all();
    run_member(team, 0);
    std::unique_lock<std::mutex> lk(mu_);
    done_.wait(lk, [&] { return pending_ == 0; });
    team_ = nullptr;
  }

 private:
  void work(int tid, uint64_t seen) {
    for (;;) {
      Team* team;
      {
        std::unique_lock<std::mutex> lk(mu_);
        start_.wait(lk, [&] { return generation_ != seen; });
        seen = generation_;
        // Read the size under the lock: once the region ends, its Team may be reused.
        team = team_ != nullptr && tid < team_->nthreads ? team_ : nullptr;
      }
      if (team == nullptr) continue;  // not a member of this region
      run_member(team, tid);
      std::lock_guard<std::mutex> lk(mu_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex mu_;
  std::condition_variable start_, done_;
  Team* team_ = nullptr;
  int workers_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
};

std::atomic<Pool*> g_pool{nullptr};

Pool* pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p) return p;
  static std::once_flag atfork;
  std::call_once(atfork, [] {
    // The child of fork() has none of the parent's workers: it starts a new pool (the old one is dropped).
    pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr, std::memory_order_release); });
  });
  Pool* fresh = new Pool();
  if (!g_pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) {
    delete fresh;
    return p;
  }
  return fresh;
}

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "fastalign OpenMP runtime: %s\n", what);
  std::abort();
}

// schedule(static) bounds for this thread. lower/upper are inclusive.
template <typename T, typename ST>
void static_init(int32_t sched, int32_t* plast, T* plower, T* pupper, ST* pstride, ST incr, ST chunk) {
  using U = std::make_unsigned_t<T>;
  if (incr == 0) fail("loop increment 0");
  if (incr > 0 ? *pupper < *plower : *plower < *pupper) {  // no iterations: the bounds already say so
    *plast = 0;
    *pstride = incr;
    return;
  }
  const U step = static_cast<U>(incr);
  const U span = incr > 0 ? static_cast<U>(*pupper) - static_cast<U>(*plower)
                          : static_cast<U>(*plower) - static_cast<U>(*pupper);
  const U trip = (incr > 0 ? span / step : span / static_cast<U>(-incr)) + 1;
  const U nth = static_cast<U>(omp_get_num_threads()), tid = static_cast<U>(omp_get_thread_num());
  const U lower = static_cast<U>(*plower);
  if (sched == 34) {  // kmp_sch_static: one contiguous block per thread, sizes differing by at most one
    const U small = trip / nth, extras = trip % nth;
    const U mine = small + (tid < extras ? 1 : 0);
    const U first = lower + (tid * small + std::min(tid, extras)) * step;
    *plower = static_cast<T>(first);
    *pupper = static_cast<T>(mine ? first + (mine - 1) * step : first - step);
    *plast = trip <= nth ? tid == trip - 1 : tid == nth - 1;
    *pstride = static_cast<ST>(trip * step);
  } else if (sched == 33) {  // kmp_sch_static_chunked: chunks dealt round-robin; the caller loops by *pstride
    const U c = chunk > 0 ? static_cast<U>(chunk) : 1;
    const U first = lower + tid * c * step;
    *plower = static_cast<T>(first);
    *pupper = static_cast<T>(first + (c - 1) * step);
    *plast = tid == ((trip - 1) / c) % nth;
    *pstride = static_cast<ST>(nth * c * step);
  } else {
    fail("unsupported loop schedule (only schedule(static) is built in)");
  }
}

}  // namespace

extern "C" {

int omp_get_thread_num(void) { return t_team ? t_tid : 0; }
int omp_get_num_threads(void) { return t_team ? t_team->nthreads : 1; }
int omp_get_max_threads(void) {
  const int n = g_max_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : default_threads();
}
void omp_set_num_threads(int n) { g_max_threads.store(n > 0 ? n : 0, std::memory_order_relaxed); }

int32_t __kmpc_global_thread_num(ident_t*) { return omp_get_thread_num(); }

void __kmpc_push_num_threads(ident_t*, int32_t, int32_t n) { t_requested = n; }

void __kmpc_fork_call(ident_t*, int32_t argc, microtask_t fn, ...) {
  if (argc < 0 || static_cast<size_t>(argc) > kMaxArgs) fail("parallel region captures too many variables");
  void* args[kMaxArgs];
  va_list ap;
  va_start(ap, fn);
  for (int i = 0; i < argc; ++i) args[i] = va_arg(ap, void*);
  va_end(ap);
  const int n = t_requested > 0 ? t_requested : omp_get_max_threads();
  t_requested = 0;
  Team team;
  team.fn = fn;
  team.args = args;
  team.argc = argc;
  Pool* p = n > 1 && t_team == nullptr ? pool() : nullptr;
  if (p && p->busy.try_lock()) {
    team.nthreads = n;
    p->run(&team);
    p->busy.unlock();
  } else {
    run_member(&team, 0);
  }
}

void __kmpc_serialized_parallel(ident_t*, int32_t) {
  t_requested = 0;
  t_serialized.emplace_back(t_team, t_tid);
  t_team = &g_solo;
  t_tid = 0;
}

void __kmpc_end_serialized_parallel(ident_t*, int32_t) {
  t_team = t_serialized.back().first;
  t_tid = t_serialized.back().second;
  t_serialized.pop_back();
}

void __kmpc_barrier(ident_t*, int32_t) {
  Team* team = t_team;
  if (team == nullptr || team->nthreads == 1) return;
  const uint32_t gen = team->barrier_gen.load(std::memory_order_acquire);
  if (team->arrived.fetch_add(1, std::memory_order_acq_rel) + 1 == team->nthreads) {
    team->arrived.store(0, std::memory_order_relaxed);
    team->barrier_gen.fetch_add(1, std::memory_order_release);
    return;
  }
  for (int spin = 0; team->barrier_gen.load(std::memory_order_acquire) == gen; ++spin)
    if (spin > 256) std::this_thread::yield();
}

void __kmpc_for_static_init_4(ident_t*, int32_t, int32_t sched, int32_t* last, int32_t* lo, int32_t* hi,
                              int32_t* stride, int32_t incr, int32_t chunk) {
  static_init(sched, last, lo, hi, stride, incr, chunk);
}
void __kmpc_for_static_init_4u(ident_t*, int32_t, int32_t sched, int32_t* last, uint32_t* lo, uint32_t* hi,
                               int32_t* stride, int32_t incr, int32_t chunk) {
  static_init(sched, last, lo, hi, stride, incr, chunk);
}
void __kmpc_for_static_init_8(ident_t*, int32_t, int32_t sched, int32_t* last, int64_t* lo, int64_t* hi,
                              int64_t* stride, int64_t incr, int64_t chunk) {
  static_init(sched, last, lo, hi, stride, incr, chunk);
}
void __kmpc_for_static_init_8u(ident_t*, int32_t, int32_t sched, int32_t* last, uint64_t* lo, uint64_t* hi,
                               int64_t* stride, int64_t incr, int64_t chunk) {
  static_init(sched, last, lo, hi, stride, incr, chunk);
}
void __kmpc_for_static_fini(ident_t*, int32_t) {}

}  // extern "C"
