// Shared declarations of the qlinear native kernel core.
//
// Packed weight layout (one layout for every native backend, built by pack.cpp):
// output rows are cut into blocks of NR = 16 (the last block may have rb < 16 rows);
// block b starts at byte b * block_bytes(16). Inside a block of rb rows, with
// K4 = in / 4 full k-steps and t = in % 4 tail columns:
//   int8: step s (0 <= s < K4) is rb*4 bytes, byte r*4 + kk holds u = code + 128 of
//         row r, column 4s + kk (u is unsigned: the u8 operand of vpdpbusd); then the
//         tail, rb*t bytes, byte r*t + j = column 4*K4 + j.
//   int4: step s is rb*2 bytes holding the rb*4 nibbles e = r*4 + kk: nibble e lives in
//         byte e % (rb*2), low half when e < rb*2 else high half (so a full step is 32
//         bytes whose low nibbles are elements 0..31 and high nibbles 32..63); then the
//         tail, ceil(rb*t / 2) bytes, element e = r*t + j in byte e % h, high when e >= h
//         (h = ceil(rb*t/2)). Nibbles are the stored values 0..15 (code + storage offset).
// Total: exactly out*in bytes (int8); int4 blocks take rb*2*K4 + ceil(rb*t/2) bytes,
// ceil(out*in/2) in all (no per-row padding).
//
// Kernels see "unsigned" codes u and an effective zero point zpu (out, n_groups) in the
// same domain, so that w[o, k] = (u[o, k] - zpu[o, g]) * scale[o, g].
#pragma once
#include <cstddef>
#include <cstdint>

namespace qlinear {

constexpr int NR = 16;

inline int64_t block_bytes(int bits, int64_t rb, int64_t in) {
    const int64_t k4 = in / 4, t = in % 4;
    if (bits == 8) return rb * in;
    return rb * 2 * k4 + (rb * t + 1) / 2;
}

inline int64_t packed_bytes(int bits, int64_t out, int64_t in) {
    const int64_t nfull = out / NR, rem = out % NR;
    return nfull * block_bytes(bits, NR, in) + (rem ? block_bytes(bits, rem, in) : 0);
}

struct Layer {
    const uint8_t* w;      // packed codes
    int bits;              // 8 or 4
    int64_t out, in;
    int64_t group_size;    // multiple of 4, or == in (one group)
    int64_t n_groups;
    const double* scales;  // (out, n_groups)
    const int32_t* zpu;    // (out, n_groups), unsigned-code domain
    const double* bias;    // (out,) or nullptr
};

struct Call {
    int64_t n;             // rows of x
    const void* x;         // (n, in), row stride x_rs elements, unit column stride
    int64_t x_rs;
    void* y;               // (n, out), contiguous
    bool f64;              // x and y are float64 (else float32)
    int threads;
};

// Per-ISA entry points (generic.cpp, avx2.cpp, avx512.cpp).
struct KernelTable {
    const char* name;
    void (*linear_float)(const Layer&, const Call&);
    bool (*linear_int8act)(const Layer&, const Call&);  // false: x not finite
};

namespace generic { extern const KernelTable table; }
namespace avx2 { extern const KernelTable table; }
namespace avx512 { extern const KernelTable table; }

// cpu.cpp
bool cpu_has_avx2();
bool cpu_has_avx512vnni();

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
int spin_policy_us();
bool spin_policy_yield();

// Decoding helpers shared by all files (plain scalar code).
// Fill out64[r*4+kk] with the unsigned code of row r (< rb), column 4*s+kk of block
// data `blk` (rb rows), 0 for padding rows/columns; `s == K4` means the tail step.
void decode_step(int bits, const uint8_t* blk, int64_t rb, int64_t in, int64_t s,
                 uint8_t* out64);

}  // namespace qlinear
