// Kernel drivers shared by every ISA file. Each ISA file defines, inside
// namespace qlinear::QL_ISA, before including this header:
//   constexpr int MR_I, MR_F;                        // rows of x per micro-kernel call
//   void i_micro(const uint8_t* w, int bits, int64_t nsteps, const int8_t* xq,
//                int64_t xq_rs, int mr, int32_t* acc);
//       acc[m*16 + r] += sum over steps s, kk of u[s][r*4+kk] * xq[m*xq_rs + 4s + kk]
//       (u: unsigned codes of a full 16-row block, 64 bytes per step for bits == 8,
//        32 bytes of nibbles for bits == 4; exact int32 arithmetic)
//   template <class T> void f_micro(const T* wbuf, int64_t nsteps, const T* x,
//                                   int64_t x_rs, int mr, T* part);
//       part[m*16 + r] += sum over s, kk of wbuf[s*64 + r*4 + kk] * x[m*x_rs + 4s + kk]
// The drivers below split the work into tasks (blocks of 16 output rows x chunks of
// rows of x). Every output element is computed by one task, in an order that does not
// depend on the task split, so results do not depend on the thread count.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"

namespace qlinear {
namespace QL_ISA {

// Steps of one integer chunk: 8192 steps * 4 columns * 255 * 128 < 2^31.
constexpr int64_t INT_CHUNK = 8192;
// Steps of float weights converted at once (64 lanes each): 32 KiB of float32.
constexpr int64_t F_CHUNK = 128;

struct BlockView {
    const uint8_t* w;  // first step
    int bits;          // 8 or 4 (step of 64 or 32 bytes)
    int64_t nd;        // steps readable at w
    bool has_tail;     // one more step, decoded into tail64
    alignas(64) uint8_t tail64[64];
    int64_t rb;
};

// A full block is read in place; a partial one (rb < 16) is decoded into `scratch`
// as full int8-style steps padded with zero rows.
inline void view_block(const Layer& L, int64_t bi, std::vector<uint8_t>& scratch, BlockView& v) {
    const int64_t o0 = bi * NR;
    const int64_t k4 = L.in / 4, kp = (L.in + 3) / 4;
    v.rb = std::min<int64_t>(NR, L.out - o0);
    const uint8_t* blk = L.w + bi * block_bytes(L.bits, NR, L.in);
    if (v.rb == NR) {
        v.w = blk;
        v.bits = L.bits;
        v.nd = k4;
        v.has_tail = kp > k4;
        if (v.has_tail) decode_step(L.bits, blk, NR, L.in, k4, v.tail64);
    } else {
        scratch.resize(static_cast<size_t>(kp) * 64);
        for (int64_t s = 0; s < kp; ++s) decode_step(L.bits, blk, v.rb, L.in, s, &scratch[s * 64]);
        v.w = scratch.data();
        v.bits = 8;
        v.nd = k4;  // the tail step reads x beyond in: it goes through tail64
        v.has_tail = kp > k4;
        if (v.has_tail) std::memcpy(v.tail64, &scratch[k4 * 64], 64);
    }
}

inline int64_t steps_per_group(const Layer& L) {
    return L.n_groups == 1 ? (L.in + 3) / 4 : L.group_size / 4;
}

// ------------------------------------------------------------------ int8 activations
template <class T>
void quantize_row(const T* x, int64_t in, int64_t kpad, int64_t gs, int64_t ng, int8_t* q,
                  double* sx, int32_t* rs) {
    double amax = 0.0;
    bool bad = false;
    for (int64_t k = 0; k < in; ++k) {
        const double a = std::fabs(static_cast<double>(x[k]));
        bad |= !(a <= 1.7976931348623157e308);  // NaN or infinity
        amax = a > amax ? a : amax;
    }
    if (bad) {  // reported through sx, nothing computed
        *sx = std::nan("");
        return;
    }
    const double scale = amax > 0.0 ? amax / 127.0 : 1.0;
    for (int64_t k = 0; k < in; ++k) {
        double v = std::nearbyint(static_cast<double>(x[k]) / scale);
        v = v < -127.0 ? -127.0 : (v > 127.0 ? 127.0 : v);
        q[k] = static_cast<int8_t>(static_cast<int>(v));
    }
    for (int64_t k = in; k < kpad; ++k) q[k] = 0;
    *sx = scale;
    for (int64_t g = 0; g < ng; ++g) {
        const int64_t a = g * gs, b = std::min(in, a + gs);
        int32_t s = 0;
        for (int64_t k = a; k < b; ++k) s += q[k];
        rs[g] = s;
    }
}

struct I8Ctx {
    const Layer* L;
    const Call* C;
    int8_t* xq;
    int64_t xq_rs;
    double* sx;
    int32_t* rs;
    int64_t mchunk, nmchunks;
    int64_t qrows;  // rows of x per quantization task
};

template <class T>
void i8_quant_task(void* p, int64_t task, int) {
    auto& c = *static_cast<I8Ctx*>(p);
    const int64_t m0 = task * c.qrows, m1 = std::min(c.C->n, m0 + c.qrows);
    const int64_t gs = c.L->n_groups == 1 ? c.L->in : c.L->group_size;
#ifdef QL_QUANTIZE_ROW
#define QL_QROW QL_QUANTIZE_ROW
#else
#define QL_QROW quantize_row
#endif
    for (int64_t m = m0; m < m1; ++m) {
        QL_QROW<T>(static_cast<const T*>(c.C->x) + m * c.C->x_rs, c.L->in, c.xq_rs, gs,
                        c.L->n_groups, c.xq + m * c.xq_rs, c.sx + m, c.rs + m * c.L->n_groups);
    }
#undef QL_QROW
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
    const int64_t ng = L.n_groups, kp = (L.in + 3) / 4, sg = steps_per_group(L);
    // One tile of MR_I rows at a time runs through every step (the weights of the task's
    // blocks stay in L2), so its accumulators stay in L1: [block][row][16].
    constexpr int64_t bstride = MR_I * NR;
    alignas(64) int32_t acc[I8_BLOCKS * bstride];
    alignas(64) int64_t acc64[I8_BLOCKS * bstride];
    alignas(64) double accd[I8_BLOCKS * bstride];
    T* y = static_cast<T*>(c.C->y);
    for (int64_t m = m0; m < m1; m += MR_I) {
        const int mr = static_cast<int>(std::min<int64_t>(MR_I, m1 - m));
        const int8_t* xm = c.xq + m * c.xq_rs;
        const size_t nacc = static_cast<size_t>(I8_BLOCKS * bstride);
        for (int64_t g = 0; g < ng; ++g) {
            const int64_t sa = g * sg, sb = std::min(kp, sa + sg);
            // int32 stays exact for INT_CHUNK steps; longer groups carry int64 sums.
            const bool wide = sb - sa > INT_CHUNK;
            if (wide) std::fill(acc64, acc64 + nacc, int64_t(0));
            for (int64_t ca = sa; ca < sb; ca += INT_CHUNK) {
                const int64_t ce = std::min(sb, ca + INT_CHUNK);
                std::fill(acc, acc + nacc, 0);
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
                        zpd[r] = r < rb ? static_cast<double>(L.zpu[o0 + r]) : 0.0;
                        sv[r] = r < rb ? L.scales[o0 + r] : 0.0;
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
            // dot = sum u*xq - zpu * sum xq, exact in int64; accd += dot * scale (unfused,
            // in the reference's order; accd starts at +0.0 and 0.0 + v == v).
            for (int b = 0; b < nb; ++b) {
                const int64_t o0 = (bp * I8_BLOCKS + b) * NR;
                int64_t zpv[NR];
                double sv[NR];
                for (int r = 0; r < NR; ++r) {
                    zpv[r] = r < vs[b].rb ? L.zpu[(o0 + r) * ng + g] : 0;
                    sv[r] = r < vs[b].rb ? L.scales[(o0 + r) * ng + g] : 0.0;
                }
                for (int mm = 0; mm < mr; ++mm) {
                    const int64_t rsm = c.rs[(m + mm) * ng + g];
                    double* ad = accd + b * bstride + mm * NR;
                    if (wide) {
                        const int64_t* a = acc64 + b * bstride + mm * NR;
                        for (int r = 0; r < NR; ++r) {
                            const double v = static_cast<double>(a[r] - zpv[r] * rsm) * sv[r];
                            ad[r] = g == 0 ? 0.0 + v : ad[r] + v;
                        }
                    } else {
                        const int32_t* a = acc + b * bstride + mm * NR;
                        for (int r = 0; r < NR; ++r) {
                            const double v =
                                static_cast<double>(static_cast<int64_t>(a[r]) - zpv[r] * rsm) * sv[r];
                            ad[r] = g == 0 ? 0.0 + v : ad[r] + v;
                        }
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
                const double* a = accd + b * bstride + mm * NR;
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

inline int pick_threads(const Layer& L, const Call& C) {
    const double work = static_cast<double>(C.n) * L.out * L.in;
    return work < (1 << 20) ? 1 : std::max(1, C.threads);
}

// Returns false (y untouched) if x holds a NaN or an infinity.
template <class T>
bool linear_int8act_t(const Layer& L, const Call& C) {
    const int64_t kp = (L.in + 3) / 4;
    I8Ctx c;
    c.L = &L;
    c.C = &C;
    // Rows of xq 64-byte aligned in length and, when that is a multiple of 4 KiB, one
    // line longer: rows a power-of-two apart would share L1 sets with each other and with
    // the weight panel (blocks are 16 * in bytes apart).
    c.xq_rs = (kp * 4 + 63) / 64 * 64;
    if (c.xq_rs % 4096 == 0) c.xq_rs += 64;
    // Quantized x, its scales and row sums: every byte is written by the quantization
    // (padding included), so a buffer kept by the calling thread is reused without
    // clearing; calls above 64 MiB use a temporary one.
    const size_t nxq = static_cast<size_t>(C.n * c.xq_rs);
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
    const int64_t nblocks = (L.out + NR - 1) / NR;
    const int64_t ntask_b = (nblocks + I8_BLOCKS - 1) / I8_BLOCKS;
    c.mchunk = C.n <= 256 ? C.n : 128;
    c.nmchunks = (C.n + c.mchunk - 1) / c.mchunk;
    parallel_for(ntask_b * c.nmchunks, threads, &i8_task<T>, &c);
    return true;
}

// ------------------------------------------------------------------ float activations
template <class T>
struct FCtx {
    const Layer* L;
    const Call* C;
    const T* xt;  // (n, 4): x's last in % 4 columns, zero padded
    int64_t mchunk, nmchunks;
    int64_t direct_rows;  // up to this many rows: one block per task, codes in registers
    bool grouped;         // more rows: F_BLOCKS blocks per task, codes through wbuf
};

constexpr int64_t F_BLOCKS = 8;

// wbuf[s*64 + i] = u - zpl[i] for `nsteps` steps of a full block.
template <class T>
void f_convert(const uint8_t* w, int bits, int64_t nsteps, const T* zpl, T* wbuf) {
    if (bits == 8) {
        for (int64_t s = 0; s < nsteps; ++s)
            for (int i = 0; i < 64; ++i)
                wbuf[s * 64 + i] = static_cast<T>(static_cast<int32_t>(w[s * 64 + i])) - zpl[i];
    } else {
        for (int64_t s = 0; s < nsteps; ++s) {
            for (int i = 0; i < 32; ++i) {
                const uint8_t b = w[s * 32 + i];
                wbuf[s * 64 + i] = static_cast<T>(static_cast<int32_t>(b & 0x0F)) - zpl[i];
                wbuf[s * 64 + 32 + i] = static_cast<T>(static_cast<int32_t>(b >> 4)) - zpl[32 + i];
            }
        }
    }
}

// wbuf[s*64 + r*4 + kk] = (u - zp[r, g]) * scale[r, g] for steps s0 .. s0+nsteps of a
// block (g = step / sg): the weights in x's dtype, rounded once, as ref.dequantize_rows.
template <class T>
void f_convert_scaled(const Layer& L, const BlockView& v, int64_t o0, int64_t s0, int64_t nsteps,
                      int64_t sg, T* wbuf) {
    const int64_t ng = L.n_groups;
    const int64_t sbytes = v.bits == 8 ? 64 : 32;
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
                const T z = live ? static_cast<T>(L.zpu[(o0 + r) * ng + g]) : T(0);
                const T sc = live ? static_cast<T>(L.scales[(o0 + r) * ng + g]) : T(0);
                for (int kk = 0; kk < 4; ++kk) {
                    zl[r * 4 + kk] = z;
                    sl[r * 4 + kk] = sc;
                }
            }
        }
        const uint8_t* src;
        if (step < v.nd) {
            if (v.bits == 8) {
                src = v.w + step * sbytes;
            } else {
                const uint8_t* b = v.w + step * sbytes;
                for (int i = 0; i < 32; ++i) {
                    u[i] = b[i] & 0x0F;
                    u[32 + i] = b[i] >> 4;
                }
                src = u;
            }
        } else {
            src = v.tail64;
        }
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
#ifdef QL_HAS_F_BLOCK_DIRECT
    if (!grouped && sizeof(T) == 4 && m1 - m0 <= F_BLOCK_DIRECT_ROWS) {
        // Scales and zero points of rows beyond rb are never read (masked gathers).
        f_block_direct(v.w, v.bits, v.nd, v.tail64, kp, sg, ng, L.zpu + o0 * ng,
                       L.scales + o0 * ng, L.bias ? L.bias + o0 : nullptr, v.rb,
                       reinterpret_cast<const float*>(x + m0 * C.x_rs), C.x_rs,
                       reinterpret_cast<const float*>(c.xt) + m0 * 4, static_cast<int>(m1 - m0),
                       reinterpret_cast<float*>(y + m0 * L.out + o0), L.out);
        return;
    }
#endif
    // Many rows of x: the task covers F_BLOCKS blocks; for each chunk of steps every
    // block is converted once into wbuf and used by all row tiles, while the chunk of x
    // (rows x 512 columns) stays in L2 across the blocks.
    const int64_t nblocks = (L.out + NR - 1) / NR;
    const int64_t bstart = o0 / NR;
    const int64_t bend = grouped ? std::min(nblocks, bstart + F_BLOCKS) : bstart + 1;
#ifdef QL_HAS_F_DIRECT
    const bool direct = !grouped;
#else
    const bool direct = false;
#endif
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
                    const T z = r < v.rb ? static_cast<T>(L.zpu[(ob + r) * ng + g]) : T(0);
                    for (int kk = 0; kk < 4; ++kk) zpl[r * 4 + kk] = z;
                    sc[r] = r < v.rb ? static_cast<T>(L.scales[(ob + r) * ng + g]) : T(0);
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
#ifdef QL_HAS_F_DIRECT
                    if (direct) {
                        if (nd) f_direct<T>(v.w + ca * sbytes, v.bits, nd, zpl, xm, C.x_rs, mr, part);
                        if (tail) f_direct<T>(v.tail64, 8, 1, zpl, c.xt + m * 4, 4, mr, part);
                    }
#endif
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

template <class T>
void linear_float_t(const Layer& L, const Call& C) {
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
#ifdef QL_HAS_F_BLOCK_DIRECT
    if (sizeof(T) == 4) c.direct_rows = F_BLOCK_DIRECT_ROWS;
#endif
#ifdef QL_HAS_F_DIRECT
    c.direct_rows = std::max<int64_t>(c.direct_rows, F_DIRECT_ROWS);
#endif
    const int64_t nblocks = (L.out + NR - 1) / NR;
    const bool grouped = C.n > c.direct_rows;
    c.grouped = grouped;
    const int64_t nb = grouped ? (nblocks + F_BLOCKS - 1) / F_BLOCKS : nblocks;
    parallel_for(nb * c.nmchunks, pick_threads(L, C), &f_task<T>, &c);
}

inline void linear_float(const Layer& L, const Call& C) {
    if (C.f64) linear_float_t<double>(L, C);
    else linear_float_t<float>(L, C);
}

inline bool linear_int8act(const Layer& L, const Call& C) {
    if (C.f64) return linear_int8act_t<double>(L, C);
    return linear_int8act_t<float>(L, C);
}

}  // namespace QL_ISA
}  // namespace qlinear
