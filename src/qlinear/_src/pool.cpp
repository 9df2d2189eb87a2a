// A small persistent thread pool. After a job a worker waits for the next one for a
// bounded time (the spin policy below), then sleeps on a condition variable (a futex).
// Tasks are taken from an atomic counter; a task's result never depends on which thread
// runs it, nor on the spin policy.
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <chrono>

#include <atomic>
#include <condition_variable>
#include <algorithm>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#include "common.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QL_PAUSE() _mm_pause()
#else
#define QL_PAUSE() std::this_thread::yield()
#endif

namespace qlinear {

// Spin policy (see docs/kernels.md, "Threads"): how long a worker keeps polling for the
// next job before it sleeps, and whether it yields its core while polling. A worker
// that burns its core with `pause` between calls takes it from whatever runs between
// them (NumPy's OpenBLAS threads need both cores of a 2-core machine); one that sleeps
// at once pays a futex wake-up (~5-50 us) on every call.
static std::atomic<int> g_spin_us{QL_DEFAULT_SPIN_US};
static std::atomic<int> g_spin_yield{QL_DEFAULT_SPIN_YIELD};

void set_spin_policy(int spin_us, bool yield) {
    g_spin_us.store(spin_us < 0 ? 0 : spin_us);
    g_spin_yield.store(yield ? 1 : 0);
}
int spin_policy_us() { return g_spin_us.load(); }
bool spin_policy_yield() { return g_spin_yield.load() != 0; }

namespace {

// Background prefetch: byte ranges the next calls will read. Worker 0 issues prefetches
// for them, PF_LINES cache lines between two looks at `gen`, while it polls for its next
// job (never while it sleeps, never during a job). A prefetch never faults, so a range
// whose array is gone by then is harmless; a new request replaces the old one.
constexpr int PF_LINES = 16;
struct PrefetchRequest {
    std::mutex m;
    std::atomic<bool> pending{false};
    std::vector<std::pair<const char*, int64_t>> ranges;
};
PrefetchRequest g_prefetch;

struct PrefetchCursor {
    std::vector<std::pair<const char*, int64_t>> ranges;
    size_t i = 0;
    int64_t off = 0;

    // One slice of the work; false when there is nothing left to prefetch.
    bool step() {
        if (g_prefetch.pending.load(std::memory_order_acquire)) {
            std::lock_guard<std::mutex> lk(g_prefetch.m);
            ranges.swap(g_prefetch.ranges);
            g_prefetch.ranges.clear();
            g_prefetch.pending.store(false, std::memory_order_relaxed);
            i = 0;
            off = 0;
        }
        if (i >= ranges.size()) return false;
        const char* p = ranges[i].first;
        const int64_t n = ranges[i].second;
        const int64_t end = std::min<int64_t>(n, off + PF_LINES * 64);
        for (; off < end; off += 64) {
#if defined(__x86_64__) || defined(__i386__)
            _mm_prefetch(p + off, _MM_HINT_T0);
#else
            __builtin_prefetch(p + off);
#endif
        }
        if (off >= n) {
            ++i;
            off = 0;
        }
        return true;
    }
};

// Job protocol: `gen` is odd while the caller sets a job up and even once it is published.
// A worker enters a job by incrementing `active` and re-reading `gen` (both seq_cst): if
// the job is no longer the one it saw, it backs out without touching it. The caller
// waits only for its tasks to complete (`done`), not for sleeping or descheduled workers
// to show up; before setting up the next job it makes `gen` odd and waits for `active`
// to drop to 0, so no late worker can claim a task of the new job with the old state.
struct Pool {
    std::mutex m;
    std::condition_variable cv;
    std::mutex call;  // one job at a time; a second caller runs its job alone
    std::atomic<uint64_t> gen{0};
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::atomic<int> active{0};
    std::atomic<bool> failed{false};
    void (*fn)(void*, int64_t, int) = nullptr;
    void* ctx = nullptr;
    int64_t ntasks = 0;
    int want = 0;     // workers (by index) that join the current job
    int nworkers = 0;

    void run_tasks(int tid) {
        for (;;) {
            const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
            if (i >= ntasks) break;
            try {
                fn(ctx, i, tid);
            } catch (...) {
                failed.store(true);
            }
            done.fetch_add(1, std::memory_order_acq_rel);
        }
    }

    // `seen`: the job generation when the worker was started (a job published before
    // the thread gets to run must still be picked up).
    void worker(int idx, uint64_t seen) {
        PrefetchCursor pf;
        for (;;) {
            uint64_t g = gen.load(std::memory_order_acquire);
            const int spin_us = g_spin_us.load(std::memory_order_relaxed);
            const bool yield = g_spin_yield.load(std::memory_order_relaxed) != 0;
            if (spin_us > 0 && (g == seen || (g & 1))) {
                auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us);
                bool prefetching = false;
                for (int spin = 1; g == seen || (g & 1); ++spin) {
                    // prefetch work does not count against the wait: the window starts
                    // (clock read once) when there is none left
                    if (idx == 0 && pf.step()) {
                        prefetching = true;
                    } else {
                        if (prefetching) {
                            prefetching = false;
                            spin = 1;
                            until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us);
                        }
                        if (yield) sched_yield();
                        else QL_PAUSE();
                    }
                    g = gen.load(std::memory_order_acquire);
                    if (!prefetching && (spin & 63) == 0 && std::chrono::steady_clock::now() > until) break;
                }
            }
            if (g == seen || (g & 1)) {
                std::unique_lock<std::mutex> lk(m);
                cv.wait(lk, [&] {
                    const uint64_t v = gen.load(std::memory_order_acquire);
                    return v != seen && !(v & 1);
                });
                g = gen.load(std::memory_order_acquire);
            }
            seen = g;
            if (idx < want) {
                active.fetch_add(1, std::memory_order_seq_cst);
                if (gen.load(std::memory_order_seq_cst) == g) run_tasks(idx + 1);
                active.fetch_sub(1, std::memory_order_seq_cst);
            }
        }
    }
};

Pool* g_pool = nullptr;
std::mutex g_pool_mutex;

void reset_after_fork() {
    // The child has none of the parent's worker threads: start a fresh pool on demand
    // (the old one is leaked on purpose; its mutexes may be held by vanished threads).
    g_pool = nullptr;
    new (&g_pool_mutex) std::mutex();
}

Pool* get_pool() {
    std::lock_guard<std::mutex> lk(g_pool_mutex);
    if (!g_pool) {
        static bool registered = false;
        if (!registered) {
            pthread_atfork(nullptr, nullptr, &reset_after_fork);
            registered = true;
        }
        g_pool = new Pool();  // never deleted: workers may outlive static destructors
    }
    return g_pool;
}

}  // namespace

void prefetch_async(std::vector<std::pair<const char*, int64_t>> ranges) {
    std::lock_guard<std::mutex> lk(g_prefetch.m);
    g_prefetch.ranges.swap(ranges);
    g_prefetch.pending.store(true, std::memory_order_release);
}

void parallel_for(int64_t ntasks, int threads, void (*fn)(void*, int64_t, int), void* ctx) {
    if (ntasks <= 0) return;
    if (threads > ntasks) threads = static_cast<int>(ntasks);
    if (threads <= 1) {
        for (int64_t i = 0; i < ntasks; ++i) fn(ctx, i, 0);
        return;
    }
    Pool* p = get_pool();
    std::unique_lock<std::mutex> call(p->call, std::try_to_lock);
    if (!call.owns_lock()) {
        for (int64_t i = 0; i < ntasks; ++i) fn(ctx, i, 0);
        return;
    }
    const int helpers = threads - 1;
    while (p->nworkers < helpers) {
        const int idx = p->nworkers;
        std::thread(&Pool::worker, p, idx, p->gen.load()).detach();
        ++p->nworkers;
    }
    // Close the previous job: late workers back out, those inside leave.
    p->gen.fetch_add(1, std::memory_order_seq_cst);  // odd: setting up
    for (int spin = 0; p->active.load(std::memory_order_seq_cst) > 0; ++spin) {
        if (spin < 4000) QL_PAUSE();
        else std::this_thread::yield();
    }
    p->fn = fn;
    p->ctx = ctx;
    p->ntasks = ntasks;
    p->next.store(0);
    p->done.store(0);
    p->failed.store(false);
    {
        std::lock_guard<std::mutex> lk(p->m);
        p->want = helpers;
        p->gen.fetch_add(1, std::memory_order_seq_cst);  // even: published
    }
    p->cv.notify_all();
    p->run_tasks(0);
    for (int spin = 0; p->done.load(std::memory_order_acquire) < ntasks; ++spin) {
        if (spin < 4000) QL_PAUSE();
        else std::this_thread::yield();
    }
    if (p->failed.load()) throw std::runtime_error("qlinear native kernel task failed");
}

}  // namespace qlinear
