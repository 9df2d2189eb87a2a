// Shared declarations of the qlinear native kernel core. The packed layout is in layout.h.
//
// Kernels see "unsigned" codes u and an effective zero point zpu in the same domain, so
// that w[o, k] = (u[o, k] - zpu[o, g]) * scale[o, g]. Scales and zero points are kept in
// per-block panels (kernels/native.py, Panels): the 16 values of block b, group g are
// contiguous at panel(L, b, g) (rows past `out` are 0 when n_groups > 1; with one group
// the panels are the plain (out,) arrays, unpadded), so one block's parameters for every
// group are one contiguous run.
#pragma once
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "layout.h"

namespace qlinear {

struct Layer {
    const uint8_t* w;      // packed codes
    int bits;              // 8 or 4
    int64_t out, in;
    int64_t group_size;    // multiple of 4, or == in (one group)
    int64_t n_groups;
    const float* scales32;   // panels, every scale rounded to float32 once
    const double* scales64;  // (out, n_groups) row-major: float64 x and one-group int8 mode
    const int32_t* zpu;    // int32 panels, unsigned-code domain; nullptr: all zp_uniform
    int32_t zp_uniform;
    const double* bias;    // (out,) or nullptr
};

// Index of row 0 of block bi, group g in the parameter panels.
inline int64_t panel(const Layer& L, int64_t bi, int64_t g) { return (bi * L.n_groups + g) * NR; }
// The float64 scale of output row o, group g.
inline double scale64(const Layer& L, int64_t o, int64_t g) { return L.scales64[o * L.n_groups + g]; }
inline int32_t zp_at(const Layer& L, int64_t i) { return L.zpu ? L.zpu[i] : L.zp_uniform; }

struct Call {
    int64_t n;             // rows of x
    const void* x;         // (n, in), row stride x_rs elements, unit column stride
    int64_t x_rs;
    void* y;               // (n, out), contiguous
    bool f64;              // x and y are float64 (else float32)
    int threads;
};

// The attention softmax of the decoder runner (runner_ops.h): each row of s scaled,
// softmax over its visible columns [lo, hi], 0 elsewhere, in place.
struct SoftmaxCall {
    float* s;            // (rows, cols), row r at s + r * cols
    int64_t rows, cols;  // row r uses lo[r % per], hi[r % per]
    int64_t per;
    float scale;
    const int64_t* lo;   // first visible column of each of the `per` query rows
    const int64_t* hi;   // last visible column (lo <= hi < cols)
};

// SwiGLU and RoPE of the decoder runner (runner_ops.h).
struct SwigluCall {
    const float* gu;  // (rows, 2 d): gate then up
    float* out;       // (rows, d)
    int64_t rows, d;
};

struct RopeCall {
    const float* x;        // rows of `heads` vectors of d floats; row r at x + r * x_rs
    int64_t x_rs;
    float* out;            // (rows, heads, d), contiguous
    int64_t rows, heads, d;
    const float* cos;      // (t, d): row r uses table row r % t
    const float* sin;
    int64_t t;
};

// Per-ISA entry points (generic.cpp, avx2.cpp, avx512.cpp).
struct KernelTable {
    const char* name;
    // Both return false when y holds an Inf or NaN (checked by each task on what it
    // wrote) or, in int8 mode, when x does (found while quantizing; y is then untouched).
    bool (*linear_float)(const Layer&, const Call&);
    bool (*linear_int8act)(const Layer&, const Call&);
    void (*softmax_rows)(const SoftmaxCall&, int threads);
    void (*swiglu_rows)(const SwigluCall&, int threads);
    void (*rope_rows)(const RopeCall&, int threads);
};

namespace generic { extern const KernelTable table; }
namespace avx2 { extern const KernelTable table; }
namespace avx512 { extern const KernelTable table; extern const KernelTable amx_table; }

// Tasks the AMX tiles ran (module.cpp; read by the tests to see the path taken).
int64_t amx_tasks_run();
void count_amx_task();

// cpu.cpp
bool cpu_has_avx2();
bool cpu_has_avx512vnni();
bool cpu_has_amx();  // AMX-TILE + AMX-INT8, enabled by the OS, tile data permission granted

// pool.cpp: run fn(task) for task in [0, ntasks) on up to `threads` threads (the caller
// is one of them). Which thread runs a task never changes its result.
void parallel_for(int64_t ntasks, int threads, void (*fn)(void*, int64_t, int), void* ctx);
// Worker wait policy: poll for `spin_us` microseconds after a job (sched_yield between
// polls if `yield`, else the pause instruction), then sleep.
#ifndef QL_DEFAULT_SPIN_US
#define QL_DEFAULT_SPIN_US 50
#endif
#ifndef QL_DEFAULT_SPIN_YIELD
#define QL_DEFAULT_SPIN_YIELD 0
#endif
void set_spin_policy(int spin_us, bool yield);
// Ask the pool's first worker to prefetch these byte ranges, in order, while it waits
// for its next job (replaces an earlier request). Never faults, never blocks a job.
void prefetch_async(std::vector<std::pair<const char*, int64_t>> ranges);
int spin_policy_us();
bool spin_policy_yield();

// decode_ops.cpp: RMSNorm of float32 rows (the decoder runner's, between linear calls).
void rms_norm_rows(const float* x, int64_t n, int64_t d, const float* w, float eps, float* out);

// Decoding helpers shared by all files (plain scalar code).
// Fill out64[r*4+kk] with the unsigned code of row r (< rb), column 4*s+kk of block
// data `blk` (rb rows), 0 for padding rows/columns; `s == K4` means the tail step.
void decode_step(int bits, const uint8_t* blk, int64_t rb, int64_t in, int64_t s,
                 uint8_t* out64);

}  // namespace qlinear
