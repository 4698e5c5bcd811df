// Thread policy of the CPU kernels.
//
// A training process always shares its cores (data loaders, the trainer, other
// ranks). A team of threads that ends at a barrier waits for its slowest member,
// and a member the OS has descheduled stalls the whole call for a scheduler time
// slice while its peers spin (libgomp spins ~300k iterations before sleeping,
// and its wait policy is fixed when torch loads it). Two rules follow:
//
// 1. threads_for(work): one thread per kWorkPerThread elements of work, at most
//    the thread count in force (torch.set_num_threads / OMP_NUM_THREADS: fastalign
//    and torch share one OpenMP runtime, so omp_get_max_threads is torch's). Small
//    calls run on the calling thread alone and never wait on a peer.
// 2. parallel_for(n, threads, f): rows are handed out in chunks from an atomic
//    counter to the calling thread and up to threads - 1 helper threads. The
//    caller takes chunks too and waits only for chunks already taken, sleeping on
//    a condition variable (never spinning): a helper that has not started yet is
//    never waited for, and one descheduled mid-chunk gets the caller's core back.
//    Each row is computed by one thread whatever the split, so results do not
//    depend on the thread count (bitwise).
#pragma once
#include <omp.h>
#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

namespace fastalign {

// ~0.1-0.3 ms of single-thread work for the element-wise and row kernels.
constexpr int64_t kWorkPerThread = int64_t(1) << 19;

inline int threads_for(int64_t work, int64_t per_thread = kWorkPerThread) {
  const int64_t cap = omp_get_max_threads();
  const int64_t want = work / per_thread;
  return int(want < 1 ? 1 : (want < cap ? want : cap));
}

namespace pool {

// One parallel_for call. Helpers keep it alive through a shared_ptr, so a helper
// that arrives after the call returned only finds no chunk left; `body` is only
// called after a chunk was taken, and the caller returns only once every chunk
// is done, so `body` (on the caller's stack) is never used after it returns.
struct Job {
  void (*run)(const void* ctx, int64_t begin, int64_t end) = nullptr;
  const void* ctx = nullptr;
  int64_t n = 0, chunk = 1, nchunks = 0;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex m;
  std::condition_variable cv;
  // Take and run chunks until none is left; true if this call finished the last one.
  bool work() {
    bool last = false;
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < nchunks;) {
      const int64_t b = c * chunk, e = b + chunk < n ? b + chunk : n;
      run(ctx, b, e);
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == nchunks) last = true;
    }
    return last;
  }
};

struct Pool {
  std::mutex m;
  std::condition_variable cv;
  std::shared_ptr<Job> job;  // the open job, if any
  uint64_t generation = 0;
  int wanted = 0;            // helpers still to join the open job
  int started = 0;

  void helper() {
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> j;
      {
        std::unique_lock<std::mutex> lk(m);
        cv.wait(lk, [&] { return generation != seen && wanted > 0; });
        seen = generation;
        --wanted;
        j = job;
      }
      if (j && j->work()) {
        std::lock_guard<std::mutex> lk(j->m);
        j->cv.notify_all();
      }
    }
  }
  void ensure(int helpers) {  // called with m held
    while (started < helpers) {
      std::thread([this] { helper(); }).detach();
      ++started;
    }
  }
};

inline Pool* instance() {
  // Leaked on purpose (helpers never exit); rebuilt in a forked child, where they do not exist.
  static Pool* p = [] {
    pthread_atfork(nullptr, nullptr, [] { new (instance()) Pool(); });
    return new Pool();
  }();
  return p;
}

}  // namespace pool

// f(begin, end) over [0, n) in chunks, on the calling thread and up to threads - 1 helpers.
template <typename F>
void parallel_for(int64_t n, int threads, const F& f) {
  if (n <= 0) return;
  if (threads <= 1 || n == 1) {
    f(int64_t(0), n);
    return;
  }
  auto job = std::make_shared<pool::Job>();
  job->run = [](const void* ctx, int64_t b, int64_t e) { (*static_cast<const F*>(ctx))(b, e); };
  job->ctx = &f;
  job->n = n;
  const int64_t target = int64_t(threads) * 4;  // a few chunks a thread: a late helper costs little
  job->chunk = (n + target - 1) / target;
  job->nchunks = (n + job->chunk - 1) / job->chunk;
  pool::Pool* p = pool::instance();
  bool posted = false;
  {
    std::lock_guard<std::mutex> lk(p->m);
    if (!p->job || p->job->next.load(std::memory_order_relaxed) >= p->job->nchunks) {  // else: run alone
      p->ensure(threads - 1);
      p->job = job;
      ++p->generation;
      p->wanted = threads - 1;
      posted = true;
    }
  }
  if (posted) p->cv.notify_all();
  job->work();
  if (job->done.load(std::memory_order_acquire) != job->nchunks) {
    std::unique_lock<std::mutex> lk(job->m);
    job->cv.wait(lk, [&] { return job->done.load(std::memory_order_acquire) == job->nchunks; });
  }
  if (posted) {
    std::lock_guard<std::mutex> lk(p->m);
    if (p->job == job) {
      p->job.reset();
      p->wanted = 0;
    }
  }
}

}  // namespace fastalign
