// Float-activation driver (weight-only): few rows of x run codes converted in registers
// (the ISA's f_block_direct / f_direct, when it has them), more rows convert blocks into a
// per-thread buffer and run the ISA's register-blocked f_micro over every row tile.
// Needs from the ISA: MR_F, f_micro, and the constexpr settings HAS_F_DIRECT,
// F_DIRECT_ROWS, HAS_F_BLOCK_DIRECT, F_BLOCK_DIRECT_ROWS with f_direct, f_block_direct
// (no_direct_float.h gives ISAs without them the "false" settings and unused stubs).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "driver_common.h"

namespace qlinear {
namespace QL_ISA {

template <class T>
struct FCtx {
    const Layer* L;
    const Call* C;
    const T* xt;  // (n, 4): x's last in % 4 columns, zero padded
    int64_t mchunk, nmchunks;
    int64_t direct_rows;  // up to this many rows: one block per task, codes in registers
    bool grouped;         // more rows: F_BLOCKS blocks per task, codes through wbuf
    std::atomic<bool> overflow{false};  // some task wrote an Inf or NaN
};

constexpr int64_t F_BLOCKS = 8;

// The scale of row o, group g in x's dtype (float: panel index i, rounded once as
// ref.dequantize_rows does; double: the float64 scale itself).
template <class T>
inline T scale_t(const Layer& L, int64_t i, int64_t o, int64_t g) {
    if (sizeof(T) == 4) return static_cast<T>(L.scales32[i]);
    return static_cast<T>(scale64(L, o, g));
}

// wbuf[s*64 + i] = u - zpl[i] for `nsteps` steps of a full block.
template <class T>
void f_convert(const uint8_t* w, int bits, int64_t nsteps, const T* zpl, T* wbuf) {
    alignas(64) uint8_t buf[64];
    for (int64_t s = 0; s < nsteps; ++s) {
        const uint8_t* u = step_codes(w, bits, s, buf);
        for (int i = 0; i < 64; ++i)
            wbuf[s * 64 + i] = static_cast<T>(static_cast<int32_t>(u[i])) - zpl[i];
    }
}

// wbuf[s*64 + r*4 + kk] = (u - zp[r, g]) * scale[r, g] for steps s0 .. s0+nsteps of a
// block (g = step / sg): the weights in x's dtype, rounded once, as ref.dequantize_rows.
template <class T>
void f_convert_scaled(const Layer& L, const BlockView& v, int64_t o0, int64_t s0, int64_t nsteps,
                      int64_t sg, T* wbuf) {
    alignas(64) T zl[64], sl[64];
    alignas(64) uint8_t u[64];
    int64_t gcur = -1;
    for (int64_t s = 0; s < nsteps; ++s) {
        const int64_t step = s0 + s;
        const int64_t g = step / sg;
        if (g != gcur) {
            gcur = g;
            for (int r = 0; r < NR; ++r) {
                const bool live = r < v.rb;
                const int64_t i = panel(L, o0 / NR, g) + r;
                const T z = live ? static_cast<T>(zp_at(L, i)) : T(0);
                const T sc = live ? scale_t<T>(L, i, o0 + r, g) : T(0);
                for (int kk = 0; kk < 4; ++kk) {
                    zl[r * 4 + kk] = z;
                    sl[r * 4 + kk] = sc;
                }
            }
        }
        const uint8_t* src = step < v.nd ? step_codes(v.w, v.bits, step, u) : v.tail64;
        T* dst = wbuf + s * 64;
        for (int i = 0; i < 64; ++i) dst[i] = (static_cast<T>(static_cast<int32_t>(src[i])) - zl[i]) * sl[i];
    }
}

// Many rows: for each chunk of F_CHUNK steps (groups folded into the converted weights),
// every block of the task is converted once and used by all row tiles.
template <class T>
void f_grouped(const FCtx<T>& c, const Layer& L, const Call& C, BlockView& v,
               std::vector<uint8_t>& scratch, T* wbuf, int64_t bstart, int64_t bend, int64_t m0,
               int64_t m1) {
    const int64_t kp = (L.in + 3) / 4, sg = steps_per_group(L);
    const T* x = static_cast<const T*>(C.x);
    T* y = static_cast<T*>(C.y);
    for (int64_t ca = 0; ca < kp; ca += F_CHUNK) {
        const int64_t ce = std::min(kp, ca + F_CHUNK);
        const bool first = ca == 0, last = ce == kp;
        for (int64_t b = bstart; b < bend; ++b) {
            const int64_t ob = b * NR;
            if (b != bstart) view_block(L, b, scratch, v);
            f_convert_scaled<T>(L, v, ob, ca, ce - ca, sg, wbuf);
            const int64_t de = std::min(ce, v.nd);
            const int64_t nd = de > ca ? de - ca : 0;
            const bool tail = v.has_tail && ce > v.nd;
            for (int64_t m = m0; m < m1; m += MR_F) {
                const int mr = static_cast<int>(std::min<int64_t>(MR_F, m1 - m));
                alignas(64) T part[MR_F * NR] = {};
                if (nd) f_micro<T>(wbuf, nd, x + m * C.x_rs + 4 * ca, C.x_rs, mr, part);
                if (tail) f_micro<T>(wbuf + nd * 64, 1, c.xt + m * 4, 4, mr, part);
                for (int mm = 0; mm < mr; ++mm) {
                    T* ym = y + (m + mm) * L.out + ob;
                    const T* pm = part + mm * NR;
                    if (first) {
                        for (int64_t r = 0; r < v.rb; ++r) ym[r] = pm[r];
                    } else {
                        for (int64_t r = 0; r < v.rb; ++r) ym[r] += pm[r];
                    }
                    if (last && L.bias)
                        for (int64_t r = 0; r < v.rb; ++r) ym[r] += static_cast<T>(L.bias[ob + r]);
                }
            }
        }
        if (bend - bstart > 1) view_block(L, bstart, scratch, v);
    }
}

template <class T>
void f_task(void* p, int64_t task, int) {
    auto& c = *static_cast<FCtx<T>*>(p);
    const Layer& L = *c.L;
    const Call& C = *c.C;
    const int64_t ti = task / c.nmchunks, mi = task % c.nmchunks;
    const int64_t m0 = mi * c.mchunk, m1 = std::min(C.n, m0 + c.mchunk);
    // Few rows: one block per task; many rows: F_BLOCKS blocks per task.
    const bool grouped = c.grouped;
    const int64_t bi = ti;  // block index (direct) or block group index (grouped)
    const int64_t o0 = (grouped ? bi * F_BLOCKS : bi) * NR;
    thread_local std::vector<uint8_t> scratch;
    thread_local std::vector<T> wbuf_v;
    if (wbuf_v.size() < static_cast<size_t>((F_CHUNK + 1) * 64)) wbuf_v.resize((F_CHUNK + 1) * 64);
    T* wbuf = wbuf_v.data();
    BlockView v;
    view_block(L, o0 / NR, scratch, v);
    const int64_t ng = L.n_groups, kp = (L.in + 3) / 4, sg = steps_per_group(L);
    const T* x = static_cast<const T*>(C.x);
    T* y = static_cast<T*>(C.y);
    if (HAS_F_BLOCK_DIRECT && !grouped && sizeof(T) == 4 && m1 - m0 <= F_BLOCK_DIRECT_ROWS) {
        // Scales and zero points of rows beyond rb are never read (masked gathers).
        f_block_direct(v.w, v.bits, v.nd, v.tail64, kp, sg, L, o0 / NR,
                       L.bias ? L.bias + o0 : nullptr, v.rb,
                       reinterpret_cast<const float*>(x + m0 * C.x_rs), C.x_rs,
                       reinterpret_cast<const float*>(c.xt) + m0 * 4, static_cast<int>(m1 - m0),
                       reinterpret_cast<float*>(y + m0 * L.out + o0), L.out);
        return;
    }
    // Many rows of x: the task covers F_BLOCKS blocks; for each chunk of steps every
    // block is converted once into wbuf and used by all row tiles, while the chunk of x
    // (rows x 512 columns) stays in L2 across the blocks.
    const int64_t nblocks = (L.out + NR - 1) / NR;
    const int64_t bstart = o0 / NR;
    const int64_t bend = grouped ? std::min(nblocks, bstart + F_BLOCKS) : bstart + 1;
    const bool direct = HAS_F_DIRECT && !grouped;
    if (grouped) {
        f_grouped<T>(c, L, C, v, scratch, wbuf, bstart, bend, m0, m1);
        return;
    }
    alignas(64) T zpl[64];
    T sc[NR];
    for (int64_t g = 0; g < ng; ++g) {
        const int64_t sa = g * sg, sb = std::min(kp, sa + sg);
        for (int64_t ca = sa; ca < sb; ca += F_CHUNK) {
            const int64_t ce = std::min(sb, ca + F_CHUNK);
            const bool first = (g == 0 && ca == sa);
            const bool last = (g == ng - 1 && ce == sb);
            for (int64_t b = bstart; b < bend; ++b) {
                const int64_t ob = b * NR;
                if (b != bstart) view_block(L, b, scratch, v);
                for (int r = 0; r < NR; ++r) {
                    const int64_t i = panel(L, b, g) + r;
                    const T z = r < v.rb ? static_cast<T>(zp_at(L, i)) : T(0);
                    for (int kk = 0; kk < 4; ++kk) zpl[r * 4 + kk] = z;
                    sc[r] = r < v.rb ? scale_t<T>(L, i, ob + r, g) : T(0);
                }
                const int64_t de = std::min(ce, v.nd);
                const int64_t nd = de > ca ? de - ca : 0;
                const bool tail = v.has_tail && ce > v.nd;
                const int64_t sbytes = v.bits == 8 ? 64 : 32;  // a partial block is int8-style
                if (!direct) {
                    if (nd) f_convert<T>(v.w + ca * sbytes, v.bits, nd, zpl, wbuf);
                    if (tail) f_convert<T>(v.tail64, 8, 1, zpl, wbuf + nd * 64);
                }
                for (int64_t m = m0; m < m1; m += MR_F) {
                    const int mr = static_cast<int>(std::min<int64_t>(MR_F, m1 - m));
                    alignas(64) T part[MR_F * NR] = {};
                    const T* xm = x + m * C.x_rs + 4 * ca;
                    if (direct) {
                        if (nd) f_direct<T>(v.w + ca * sbytes, v.bits, nd, zpl, xm, C.x_rs, mr, part);
                        if (tail) f_direct<T>(v.tail64, 8, 1, zpl, c.xt + m * 4, 4, mr, part);
                    }
                    if (!direct) {
                        if (nd) f_micro<T>(wbuf, nd, xm, C.x_rs, mr, part);
                        if (tail) f_micro<T>(wbuf + nd * 64, 1, c.xt + m * 4, 4, mr, part);
                    }
                    for (int mm = 0; mm < mr; ++mm) {
                        T* ym = y + (m + mm) * L.out + ob;
                        for (int64_t r = 0; r < v.rb; ++r) {
                            T val = sc[r] * part[mm * NR + r];
                            if (!first) val = ym[r] + val;
                            if (last && L.bias) val += static_cast<T>(L.bias[ob + r]);
                            ym[r] = val;
                        }
                    }
                }
            }
            if (bend - bstart > 1) view_block(L, bstart, scratch, v);
        }
    }
}

// f_task, then the check of the outputs it wrote.
template <class T>
void f_task_checked(void* p, int64_t task, int tid) {
    f_task<T>(p, task, tid);
    auto& c = *static_cast<FCtx<T>*>(p);
    const int64_t ti = task / c.nmchunks, mi = task % c.nmchunks;
    const int64_t m0 = mi * c.mchunk, m1 = std::min(c.C->n, m0 + c.mchunk);
    const int64_t o0 = (c.grouped ? ti * F_BLOCKS : ti) * NR;
    const int64_t o1 = std::min(c.L->out, o0 + (c.grouped ? F_BLOCKS : 1) * NR);
    if (!block_finite(static_cast<const T*>(c.C->y), c.L->out, m0, m1, o0, o1))
        c.overflow.store(true, std::memory_order_relaxed);
}

// Returns false if an output is not finite (a NaN/Inf in x, or an overflow).
template <class T>
bool linear_float_t(const Layer& L, const Call& C) {
    FCtx<T> c;
    c.L = &L;
    c.C = &C;
    const int64_t k4 = L.in / 4, t = L.in % 4;
    std::vector<T> xt;
    if (t) {
        xt.assign(static_cast<size_t>(C.n * 4), T(0));
        const T* x = static_cast<const T*>(C.x);
        for (int64_t m = 0; m < C.n; ++m)
            for (int64_t j = 0; j < t; ++j) xt[m * 4 + j] = x[m * C.x_rs + 4 * k4 + j];
    }
    c.xt = xt.data();
    c.mchunk = C.n <= 256 ? C.n : 256;
    c.nmchunks = (C.n + c.mchunk - 1) / c.mchunk;
    c.direct_rows = 0;
    if (HAS_F_BLOCK_DIRECT && sizeof(T) == 4) c.direct_rows = F_BLOCK_DIRECT_ROWS;
    if (HAS_F_DIRECT) c.direct_rows = std::max<int64_t>(c.direct_rows, F_DIRECT_ROWS);
    const int64_t nblocks = (L.out + NR - 1) / NR;
    const bool grouped = C.n > c.direct_rows;
    c.grouped = grouped;
    const int64_t nb = grouped ? (nblocks + F_BLOCKS - 1) / F_BLOCKS : nblocks;
    parallel_for(nb * c.nmchunks, pick_threads(L, C), &f_task_checked<T>, &c);
    return !c.overflow.load(std::memory_order_relaxed);
}

}  // namespace QL_ISA
}  // namespace qlinear
