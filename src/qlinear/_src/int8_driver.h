// int8-activation driver (dynamic W8A8 and W4A8): quantize x per row, then tasks of
// I8_BLOCKS blocks x a chunk of rows run the ISA's integer micro-kernels, exact int32
// (int64 past INT_CHUNK steps) sums, the epilogue in the reference's order (float64 for
// one group, float32 group sums for several: ref.linear_int8act).
// Needs from the ISA: MR_I, i_micro, i_micro4, quantize_row_isa<T>, group_epilogue, and
// HAS_GROUPS_R1 with i_groups_r1, HAS_GROUPS4 with i_groups4, I4_EXPAND_ROWS with
// expand_steps4, HAS_AMX with amx_rows, amx_kt and amx_task (stubs: no_direct_float.h;
// AMX: amx_tiles.h).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "driver_common.h"

namespace qlinear {
namespace QL_ISA {

struct I8Ctx {
    const Layer* L;
    const Call* C;
    int8_t* xq;
    int64_t xq_rs;
    double* sx;
    int32_t* rs;
    int64_t mchunk, nmchunks;
    int64_t qrows;  // rows of x per quantization task
    int8_t* xt;     // AMX tiles may run (the `amx` backend, amx_tiles.h): xq in tile order
    std::atomic<bool> overflow{false};  // some task wrote an Inf or NaN
};

// Rows [16 t0, 16 t1) of the quantized x (xq, row stride xq_rs) in tile order at xt:
// 16-row tiles, each a run of kt-byte column chunks of its 16 rows (one AMX tile of x is
// then 16 kt contiguous bytes, like the weight steps, instead of 16 strided rows).
inline void amx_tile_order(const int8_t* xq, int64_t xq_rs, int64_t in, int kt, int64_t t0,
                           int64_t t1, int8_t* xt) {
    for (int64_t t = t0; t < t1; ++t)
        for (int64_t c = 0; c < in; c += kt)
            for (int r = 0; r < 16; ++r)
                std::memcpy(xt + t * 16 * in + c * 16 + r * kt, xq + (16 * t + r) * xq_rs + c,
                            static_cast<size_t>(kt));
}

// Whether the tiles take layer L's weights widened to signed bytes, code minus zero
// point (widen_block): every int4 layer (codes -15..15), and int8 layers whose zero
// points are all 128 (the codes themselves) with several groups, where it removes the
// zero-point term from every group's epilogue.
inline bool tiles_widen(const Layer& L) {
    return L.bits == 4 ? I4_EXPAND_ROWS > 0 : L.n_groups > 1 && !L.zpu && L.zp_uniform == 128;
}

// Full block bi as signed bytes u - zpu in the int8 step order at dst (int4:
// expand_steps4, then minus each row's zero point of the step's group; int8: u ^ 0x80).
inline void widen_block(const Layer& L, int64_t bi, uint8_t* dst) {
    const int64_t nd = L.in / 4, sg = steps_per_group(L);
    const uint8_t* src = L.w + bi * block_bytes(L.bits, NR, L.in);
    if (L.bits == 8) {
        for (int64_t i = 0; i < nd * 64; ++i) dst[i] = src[i] ^ 0x80;
        return;
    }
    expand_steps4(src, nd, dst);
    for (int64_t g = 0; g < L.n_groups; ++g) {
        alignas(64) uint8_t zb[64];
        for (int r = 0; r < NR; ++r) {
            const int32_t z = !L.zpu ? L.zp_uniform
                              : L.n_groups == 1 ? L.zpu[bi * NR + r] : L.zpu[panel(L, bi, g) + r];
            for (int kk = 0; kk < 4; ++kk) zb[r * 4 + kk] = static_cast<uint8_t>(z);
        }
        for (int64_t st = g * sg; st < std::min(nd, (g + 1) * sg); ++st)
            for (int i = 0; i < 64; ++i) dst[st * 64 + i] = static_cast<uint8_t>(dst[st * 64 + i] - zb[i]);
    }
}

inline void i8_tile_order_task(void* p, int64_t task, int) {
    auto& c = *static_cast<I8Ctx*>(p);
    const int64_t nt = (c.C->n + 31) / 32 * 2;
    amx_tile_order(c.xq, c.xq_rs, c.L->in, amx_kt(*c.L), task * 4, std::min(nt, task * 4 + 4),
                   c.xt);
}

template <class T>
void i8_quant_task(void* p, int64_t task, int) {
    auto& c = *static_cast<I8Ctx*>(p);
    const int64_t m0 = task * c.qrows, m1 = std::min(c.C->n, m0 + c.qrows);
    const int64_t gs = c.L->n_groups == 1 ? c.L->in : c.L->group_size;
    for (int64_t m = m0; m < m1; ++m) {
        quantize_row_isa<T>(static_cast<const T*>(c.C->x) + m * c.C->x_rs, c.L->in, c.xq_rs, gs,
                        c.L->n_groups, c.xq + m * c.xq_rs, c.sx + m, c.rs + m * c.L->n_groups);
    }
}

// The zero points and float32 scales of block bi, group g (rows < rb; the rest stay 0).
inline void load_panel(const Layer& L, int64_t bi, int64_t g, int64_t rb, int32_t* zpv,
                       float* sv) {
    const int64_t i0 = panel(L, bi, g);
    if (L.zpu) std::memcpy(zpv, L.zpu + i0, static_cast<size_t>(rb) * sizeof(int32_t));
    else std::fill(zpv, zpv + rb, L.zp_uniform);
    std::memcpy(sv, L.scales32 + i0, static_cast<size_t>(rb) * sizeof(float));
}

// Output blocks per int8 task: two full blocks share every activation broadcast.
constexpr int64_t I8_BLOCKS = 4;

template <class T>
void i8_task(void* p, int64_t task, int) {
    auto& c = *static_cast<I8Ctx*>(p);
    const Layer& L = *c.L;
    const int64_t nblocks = (L.out + NR - 1) / NR;
    const int64_t bp = task / c.nmchunks, mi = task % c.nmchunks;
    const int64_t m0 = mi * c.mchunk, m1 = std::min(c.C->n, m0 + c.mchunk);
    thread_local std::vector<uint8_t> scratch;
    BlockView vs[I8_BLOCKS];
    int nb = 0;
    for (int64_t bi = bp * I8_BLOCKS; bi < nblocks && nb < I8_BLOCKS; ++bi, ++nb)
        view_block(L, bi, scratch, vs[nb]);
    const bool quad = nb == 4 && vs[3].rb == NR;  // only the last block can be partial
    // AMX tiles: four full blocks, enough rows, groups a whole number of tile products.
    const bool tiles = HAS_AMX && c.xt && quad && m1 - m0 >= amx_rows(L);
    // Many rows of x over int4 blocks (or tiles): the task's four blocks are expanded
    // once into bytes in the int8 step order (signed, code minus zero point, for the
    // tiles), so every row tile reads bytes instead of unpacking each step again.
    thread_local std::vector<uint8_t> expanded;
    const bool fits = vs[0].nd * 64 * 4 <= (int64_t(2) << 20);
    const bool widened = tiles && tiles_widen(L) && fits;  // signed bytes for tdpbssd
    if (widened || (I4_EXPAND_ROWS > 0 && L.bits == 4 && quad && m1 - m0 >= I4_EXPAND_ROWS && fits)) {
        const int64_t nd = vs[0].nd;
        if (expanded.size() < static_cast<size_t>(4 * nd * 64)) expanded.resize(4 * nd * 64);
        for (int b = 0; b < 4; ++b) {
            uint8_t* dst = expanded.data() + b * nd * 64;
            if (widened) widen_block(L, bp * I8_BLOCKS + b, dst);
            else expand_steps4(vs[b].w, nd, dst);
            vs[b].w = dst;
            vs[b].bits = 8;
        }
    }
    T* y = static_cast<T*>(c.C->y);
    if (tiles && vs[0].bits == 8) {
        const uint8_t* w4[4] = {vs[0].w, vs[1].w, vs[2].w, vs[3].w};
        amx_task<T>(L, c.xt, c.sx, c.rs, m0, m1, w4, bp * I8_BLOCKS, y, widened);
        return;
    }
    const int64_t ng = L.n_groups, kp = (L.in + 3) / 4, sg = steps_per_group(L);
    // One tile of MR_I rows at a time runs through every step (the weights of the task's
    // blocks stay in L2), so its accumulators stay in L1: [block][row][16].
    constexpr int64_t bstride = MR_I * NR;
    alignas(64) int32_t acc[I8_BLOCKS * bstride];
    alignas(64) int64_t acc64[I8_BLOCKS * bstride];
    alignas(64) double accd[I8_BLOCKS * bstride];  // one group, past INT_CHUNK steps
    alignas(64) float accf[I8_BLOCKS * bstride];   // several groups (float32, as the reference)
    for (int64_t m = m0; m < m1; m += MR_I) {
        const int mr = static_cast<int>(std::min<int64_t>(MR_I, m1 - m));
        const int8_t* xm = c.xq + m * c.xq_rs;
        const size_t nacc = static_cast<size_t>(I8_BLOCKS * bstride);
        // One row of x over four full blocks and several groups (decode): the ISA may run
        // every group in one call, sums and epilogue in registers, into accf.
        const bool fused = HAS_GROUPS_R1 && quad && mr == 1 && ng > 1 && !vs[0].has_tail &&
                           sg <= INT_CHUNK;
        if (fused) {
            const uint8_t* w4[4] = {vs[0].w, vs[1].w, vs[2].w, vs[3].w};
            i_groups_r1(w4, vs[0].bits, ng, sg, kp, xm, c.rs + m * ng, L, bp * I8_BLOCKS, accf,
                        bstride);
        }
        // Several rows, four full blocks, several groups: every group in one call per
        // 6 rows (sums in registers, the float32 epilogue at each group's end), into accf.
        const bool fused4 = HAS_GROUPS4 && !fused && quad && ng > 1 && !vs[0].has_tail &&
                            sg <= INT_CHUNK;
        if (fused4) {
            const uint8_t* w4[4] = {vs[0].w, vs[1].w, vs[2].w, vs[3].w};
            i_groups4(w4, vs[0].bits, ng, sg, kp, xm, c.xq_rs, c.rs + m * ng, L, bp * I8_BLOCKS,
                      accf, bstride, mr);
        }
        for (int64_t g = 0; g < (fused || fused4 ? 0 : ng); ++g) {
            const int64_t sa = g * sg, sb = std::min(kp, sa + sg);
            // int32 stays exact for INT_CHUNK steps; longer groups carry int64 sums.
            const bool wide = sb - sa > INT_CHUNK;
            if (wide) std::fill(acc64, acc64 + nacc, int64_t(0));
            for (int64_t ca = sa; ca < sb; ca += INT_CHUNK) {
                const int64_t ce = std::min(sb, ca + INT_CHUNK);
                // Only the tile's rows of each block: a whole-array clear per group
                // costs more than a small group's products at batch 1.
                for (int b = 0; b < nb; ++b)
                    std::fill(acc + b * bstride, acc + b * bstride + mr * NR, 0);
                if (quad) {
                    const int64_t de = std::min(ce, vs[0].nd), sb4 = vs[0].bits == 8 ? 64 : 32;
                    const uint8_t* w4[4] = {vs[0].w + ca * sb4, vs[1].w + ca * sb4,
                                            vs[2].w + ca * sb4, vs[3].w + ca * sb4};
                    int32_t* a4[4] = {acc, acc + bstride, acc + 2 * bstride, acc + 3 * bstride};
                    if (de > ca) i_micro4(w4, vs[0].bits, de - ca, xm + 4 * ca, c.xq_rs, mr, a4);
                } else {
                    for (int b = 0; b < nb; ++b) {
                        const BlockView& v = vs[b];
                        const int64_t de = std::min(ce, v.nd), sbb = v.bits == 8 ? 64 : 32;
                        if (de > ca)
                            i_micro(v.w + ca * sbb, v.bits, de - ca, xm + 4 * ca, c.xq_rs, mr,
                                    acc + b * bstride);
                    }
                }
                for (int b = 0; b < nb; ++b) {
                    const BlockView& v = vs[b];
                    if (v.has_tail && ce > v.nd)
                        i_micro(v.tail64, 8, 1, xm + 4 * v.nd, c.xq_rs, mr, acc + b * bstride);
                }
                if (wide)
                    for (size_t i = 0; i < nacc; ++i) acc64[i] += acc[i];
            }
            if (ng == 1 && !wide) {
                // One group: y = (dot * scale) * sx + bias straight from the int32 sums.
                // dot = u.xq - zpu * sum xq is an integer below 2^53 and so are both
                // terms: the double subtraction is exact, as the reference's int64 one.
                for (int b = 0; b < nb; ++b) {
                    const int64_t o0 = (bp * I8_BLOCKS + b) * NR;
                    const int64_t rb = vs[b].rb;
                    double zpd[NR], sv[NR], bv[NR];
                    for (int r = 0; r < NR; ++r) {
                        zpd[r] = r < rb ? static_cast<double>(zp_at(L, o0 + r)) : 0.0;
                        sv[r] = r < rb ? scale64(L, o0 + r, 0) : 0.0;
                        bv[r] = r < rb && L.bias ? L.bias[o0 + r] : 0.0;
                    }
                    for (int mm = 0; mm < mr; ++mm) {
                        const double rsm = static_cast<double>(c.rs[m + mm]);
                        const double sxm = c.sx[m + mm];
                        const int32_t* a = acc + b * bstride + mm * NR;
                        T* ym = y + (m + mm) * L.out + o0;
                        alignas(64) T tmp[NR];
                        if (L.bias) {
                            for (int r = 0; r < NR; ++r)
                                tmp[r] = static_cast<T>(((static_cast<double>(a[r]) - zpd[r] * rsm) * sv[r]) * sxm + bv[r]);
                        } else {
                            for (int r = 0; r < NR; ++r)
                                tmp[r] = static_cast<T>(((static_cast<double>(a[r]) - zpd[r] * rsm) * sv[r]) * sxm);
                        }
                        if (rb == NR) std::memcpy(ym, tmp, sizeof(tmp));
                        else std::memcpy(ym, tmp, static_cast<size_t>(rb) * sizeof(T));
                    }
                }
                continue;
            }
            // dot = sum u*xq - zpu * sum xq, exact in int64. One group (past INT_CHUNK
            // steps): accd = double(dot) * scale. Several groups: accf += float(dot) *
            // float(scale), in float32 in the reference's order (accf starts at +0.0f and
            // 0.0f + v == v). Within one int32 chunk (<= INT_CHUNK steps) both terms are
            // below 255 * 127 * 4 * 8192 < 2^30, so dot is exact in int32 too: the loops
            // below vectorize.
            for (int b = 0; b < nb; ++b) {
                const int64_t rb = vs[b].rb;
                alignas(64) int32_t zpv[NR] = {};
                alignas(64) float sv[NR] = {};
                load_panel(L, bp * I8_BLOCKS + b, g, rb, zpv, sv);
                for (int mm = 0; mm < mr; ++mm) {
                    const int32_t rsm = c.rs[(m + mm) * ng + g];
                    if (ng == 1) {  // wide: one group past INT_CHUNK steps
                        const int64_t* a = acc64 + b * bstride + mm * NR;
                        double* ad = accd + b * bstride + mm * NR;
                        for (int r = 0; r < NR; ++r) {
                            const double sd = r < rb ? scale64(L, (bp * I8_BLOCKS + b) * NR + r, 0) : 0.0;
                            ad[r] = 0.0 + static_cast<double>(a[r] - static_cast<int64_t>(zpv[r]) * rsm) * sd;
                        }
                    } else if (wide) {
                        const int64_t* a = acc64 + b * bstride + mm * NR;
                        float* af = accf + b * bstride + mm * NR;
                        for (int r = 0; r < NR; ++r) {
                            const float v =
                                static_cast<float>(a[r] - static_cast<int64_t>(zpv[r]) * rsm) * sv[r];
                            af[r] = g == 0 ? 0.0f + v : af[r] + v;
                        }
                    } else {
                        group_epilogue(acc + b * bstride + mm * NR, zpv, rsm, sv,
                                       accf + b * bstride + mm * NR, g == 0);
                    }
                }
            }
        }
        if (ng == 1 && kp <= INT_CHUNK) continue;  // written above
        for (int b = 0; b < nb; ++b) {
            const int64_t o0 = (bp * I8_BLOCKS + b) * NR;
            const double* bias = L.bias ? L.bias + o0 : nullptr;
            for (int mm = 0; mm < mr; ++mm) {
                T* ym = y + (m + mm) * L.out + o0;
                const double sxm = c.sx[m + mm];
                alignas(64) double a[NR];
                if (ng == 1) std::memcpy(a, accd + b * bstride + mm * NR, sizeof(a));
                else
                    for (int r = 0; r < NR; ++r) a[r] = static_cast<double>(accf[b * bstride + mm * NR + r]);
                if (vs[b].rb == NR && bias) {
                    for (int r = 0; r < NR; ++r) ym[r] = static_cast<T>(a[r] * sxm + bias[r]);
                } else if (vs[b].rb == NR) {
                    for (int r = 0; r < NR; ++r) ym[r] = static_cast<T>(a[r] * sxm);
                } else {
                    for (int64_t r = 0; r < vs[b].rb; ++r) {
                        double val = a[r] * sxm;
                        if (bias) val += bias[r];
                        ym[r] = static_cast<T>(val);
                    }
                }
            }
        }
    }
}


// i8_task, then the check of the outputs it wrote.
template <class T>
void i8_task_checked(void* p, int64_t task, int tid) {
    i8_task<T>(p, task, tid);
    auto& c = *static_cast<I8Ctx*>(p);
    const int64_t bp = task / c.nmchunks, mi = task % c.nmchunks;
    const int64_t m0 = mi * c.mchunk, m1 = std::min(c.C->n, m0 + c.mchunk);
    const int64_t o0 = bp * I8_BLOCKS * NR, o1 = std::min(c.L->out, o0 + I8_BLOCKS * NR);
    if (!block_finite(static_cast<const T*>(c.C->y), c.L->out, m0, m1, o0, o1))
        c.overflow.store(true, std::memory_order_relaxed);
}

// Returns false if x holds a NaN or an infinity (y untouched), or if an output is not
// finite (an overflow of x's dtype).
template <class T>
bool linear_int8act_t(const Layer& L, const Call& C, bool tiles) {
    const int64_t kp = (L.in + 3) / 4;
    I8Ctx c;
    c.L = &L;
    c.C = &C;
    tiles = HAS_AMX && tiles && C.n >= amx_rows(L) && amx_kt(L) > 0;
    // AMX tiles read x in 32-row pairs of 16-row tiles: rows up to n rounded up to 32.
    const int64_t xrows = tiles ? (C.n + 31) / 32 * 32 : C.n;
    // Rows of xq 64-byte aligned in length and, when that is a multiple of 4 KiB, one
    // line longer: rows a power-of-two apart would share L1 sets with each other and with
    // the weight panel (blocks are 16 * in bytes apart).
    c.xq_rs = (kp * 4 + 63) / 64 * 64;
    if (c.xq_rs % 4096 == 0) c.xq_rs += 64;
    // Quantized x, its scales and row sums: every byte is written by the quantization
    // (padding included), so a buffer kept by the calling thread is reused without
    // clearing; calls above 64 MiB use a temporary one.
    const size_t nxq = static_cast<size_t>(xrows * c.xq_rs);
    const size_t nsx = static_cast<size_t>(C.n) * sizeof(double);
    const size_t nrs = static_cast<size_t>(C.n * L.n_groups) * sizeof(int32_t);
    const size_t need = (nxq + 63) / 64 * 64 + (nsx + 63) / 64 * 64 + nrs + 64;
    thread_local std::vector<uint8_t> keep;
    std::vector<uint8_t> temp;
    std::vector<uint8_t>& buf = need <= (size_t(64) << 20) ? keep : temp;
    if (buf.size() < need) buf.resize(need);
    uint8_t* base = buf.data() + (64 - reinterpret_cast<uintptr_t>(buf.data()) % 64) % 64;
    c.xq = reinterpret_cast<int8_t*>(base);
    c.sx = reinterpret_cast<double*>(base + (nxq + 63) / 64 * 64);
    c.rs = reinterpret_cast<int32_t*>(base + (nxq + 63) / 64 * 64 + (nsx + 63) / 64 * 64);
    const int threads = pick_threads(L, C);
    const int qthreads = C.n * L.in < (1 << 16) ? 1 : threads;
    c.qrows = std::min<int64_t>(16, (C.n + qthreads - 1) / qthreads);
    parallel_for((C.n + c.qrows - 1) / c.qrows, qthreads, &i8_quant_task<T>, &c);
    for (int64_t m = 0; m < C.n; ++m)
        if (std::isnan(c.sx[m])) return false;  // x holds a NaN or an infinity
    if (xrows > C.n)
        std::memset(c.xq + C.n * c.xq_rs, 0, static_cast<size_t>((xrows - C.n) * c.xq_rs));
    // With tiles, x in tile order too (kept like xq; above 64 MiB a temporary one).
    thread_local std::vector<int8_t> keep_t;
    std::vector<int8_t> temp_t;
    c.xt = nullptr;
    if (tiles) {
        const size_t nxt = static_cast<size_t>(xrows * L.in);
        std::vector<int8_t>& bt = nxt <= (size_t(64) << 20) ? keep_t : temp_t;
        if (bt.size() < nxt) bt.resize(nxt);
        c.xt = bt.data();
        parallel_for((xrows / 16 + 3) / 4, qthreads, &i8_tile_order_task, &c);
    }
    const int64_t nblocks = (L.out + NR - 1) / NR;
    const int64_t ntask_b = (nblocks + I8_BLOCKS - 1) / I8_BLOCKS;
    // Row chunks: all rows up to 256; with tiles over widened weights up to 512 when
    // there are enough block tasks to share out (each task widens its blocks once).
    const bool big = c.xt && tiles_widen(L) && ntask_b >= 8 * threads;
    c.mchunk = C.n <= (big ? 512 : 256) ? C.n : (big ? 512 : 128);
    c.nmchunks = (C.n + c.mchunk - 1) / c.mchunk;
    parallel_for(ntask_b * c.nmchunks, threads, &i8_task_checked<T>, &c);
    return !c.overflow.load(std::memory_order_relaxed);
}

}  // namespace QL_ISA
}  // namespace qlinear
