// AMX tiles for int8 mode (the `amx` backend). One tile product multiplies 16 rows of
// quantized x (signed bytes, 16 x kt, in tile order: int8_driver.h's amx_tile_order) by
// kt / 4 weight steps of 64 bytes, which are 16 output rows x kt columns in exactly the
// packed step order of layout.h, into 16 x 16 int32 sums: tdpbsud on the unsigned codes
// (int8 blocks read in place; the zero points then enter the epilogue, as in the
// vpdpbusd kernels), or tdpbssd on the driver's widened copy, signed bytes code minus
// zero point (every int4 layer; int8 layers whose zero points are all 128, with several
// groups), which gives the dot products themselves. Either way the sums are the
// reference's integers, so results are bit-identical to the NumPy reference
// (int8_driver.h runs this for tasks of four full blocks and >= amx_rows(L) rows of x).
// Included by avx512.cpp (namespace qlinear::avx512), compiled with -mamx-tile
// -mamx-int8; the instructions run only after cpu_has_amx() (cpu.cpp) said yes, which
// includes Linux's permission to use the tile registers.
#pragma once
#include <immintrin.h>

#include "driver_common.h"

namespace qlinear {
namespace QL_ISA {

#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
static constexpr bool HAS_AMX = true;
#else
static constexpr bool HAS_AMX = false;
#endif
// Rows of x in a task from which the tiles run (fewer go to the vpdpbusd kernels, which
// use all 16 lanes of a step on one row; a tile always multiplies 16 rows): 16 for int8
// weights, 32 for int4 ones, whose widening to bytes a 16-row task does not repay
// (4096x4096 group 32 at 16 rows: 1.15x the vpdpbusd kernels' time; at 32 rows 0.73x).
static constexpr int64_t AMX_ROWS = 16;
inline int64_t amx_rows(const Layer& L) { return L.bits == 4 ? 2 * AMX_ROWS : AMX_ROWS; }

// Bytes of a row of x per tile product for this layer: 64 (one full tile) or 32, so that
// every group (and the row) is a whole number of products; 0: the tiles do not apply.
inline int amx_kt(const Layer& L) {
    const int64_t span = L.n_groups == 1 ? L.in : L.group_size;
    if (L.in % 4 != 0 || (L.in + 3) / 4 > INT_CHUNK) return 0;
    for (int kt : {64, 32})
        if (L.in % kt == 0 && span % kt == 0) return kt;
    return 0;
}

#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
struct alignas(64) TileConfig {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

// Tiles 0..3: the int32 sums (rows of x 0-15 / 16-31 x outputs 0-15 / 16-31); 4, 5: two
// 16-row tiles of x; 6, 7: the weight steps of two blocks.
// tdpbssd when the weight bytes are signed codes minus their zero point (amx_task's
// SIGNED), else tdpbsud on the unsigned codes; both exact int32 sums.
#define QL_DP(C, A, B)                              \
    do {                                            \
        if constexpr (SIGNED) _tile_dpbssd(C, A, B); \
        else _tile_dpbsud(C, A, B);                  \
    } while (0)

inline void amx_configure(int kt) {
    TileConfig c{};
    c.palette = 1;
    for (int t = 0; t < 4; ++t) c.colsb[t] = 64, c.rows[t] = 16;
    for (int t = 4; t < 6; ++t) c.colsb[t] = static_cast<uint16_t>(kt), c.rows[t] = 16;
    for (int t = 6; t < 8; ++t) c.colsb[t] = 64, c.rows[t] = static_cast<uint8_t>(kt / 4);
    _tile_loadconfig(&c);
}

// x is in tile order (amx_tile_order, int8_driver.h): 16-row tiles, each a run of
// kt-byte column chunks of its 16 rows, so that one tile of x is kt * 16 contiguous bytes
// (rows kt apart), as the weight steps are. Step s of a tile starts 64 * s bytes into it.
//
// One group's sums for 16 rows of x and two blocks into cb[16][32], on tile set SET
// (sums in tiles 2 SET and 2 SET + 1, x in tile 4 + SET; the weights in tiles 6, 7): two
// sets let one group's products run while the previous group's epilogue reads its sums.
// (The tile numbers of the intrinsics must be literals.)
#define QL_GROUP_SUMS(C0, C1, A)                              \
    _tile_zero(C0);                                           \
    _tile_zero(C1);                                           \
    for (int64_t s = s0; s < s1; s += ks) {                   \
        _tile_loadd(A, xm + 64 * s, kt);                      \
        _tile_loadd(6, w0 + 64 * s, 64);                      \
        QL_DP(C0, A, 6);                               \
        _tile_loadd(7, w1 + 64 * s, 64);                      \
        QL_DP(C1, A, 7);                               \
    }                                                         \
    _tile_stored(C0, cb, 128);                                \
    _tile_stored(C1, cb + 16, 128);
template <int SET, bool SIGNED>
inline void amx_group_sums(const int8_t* xm, int64_t kt, const uint8_t* w0,
                           const uint8_t* w1, int64_t s0, int64_t s1, int64_t ks, int32_t* cb) {
    if constexpr (SET == 0) {
        QL_GROUP_SUMS(0, 1, 4)
    } else {
        QL_GROUP_SUMS(2, 3, 5)
    }
}
#undef QL_GROUP_SUMS

// cb[32][32] = sums over steps [s0, s1) of the 32 rows of two tiles of x (xm and xm +
// next; rows past the call's end are padding) times blocks w0 (outputs 0-15) and w1
// (16-31); with `one`, only the first tile (amx_group_sums; cb rows 16-31 are left as
// they were).
template <bool SIGNED>
inline void amx_sums(const int8_t* xm, int64_t next, int64_t kt, const uint8_t* w0,
                     const uint8_t* w1, int64_t s0, int64_t s1, int64_t ks, bool one,
                     int32_t* cb) {
    if (one) {
        amx_group_sums<0, SIGNED>(xm, kt, w0, w1, s0, s1, ks, cb);
        return;
    }
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const int8_t* x1 = xm + next;
    for (int64_t s = s0; s < s1; s += ks) {
        _tile_loadd(6, w0 + 64 * s, 64);
        _tile_loadd(4, xm + 64 * s, kt);
        QL_DP(0, 4, 6);
        _tile_loadd(7, w1 + 64 * s, 64);
        QL_DP(1, 4, 7);
        _tile_loadd(5, x1 + 64 * s, kt);
        QL_DP(2, 5, 6);
        QL_DP(3, 5, 7);
    }
    _tile_stored(0, cb, 128);
    _tile_stored(1, cb + 16, 128);
    _tile_stored(2, cb + 16 * 32, 128);
    _tile_stored(3, cb + 16 * 32 + 16, 128);
}

// One product of 16 rows of x (xa) by the weight steps already in tiles 6, 7 (a group
// of kt columns), on tile set SET, into cb[16][32].
#define QL_ONE_PRODUCT(C0, C1, A)         \
    _tile_zero(C0);                       \
    _tile_zero(C1);                       \
    _tile_loadd(A, xa, kt);               \
    QL_DP(C0, A, 6);               \
    QL_DP(C1, A, 7);               \
    _tile_stored(C0, cb, 128);            \
    _tile_stored(C1, cb + 16, 128);
template <int SET, bool SIGNED>
inline void amx_one_product(const int8_t* xa, int64_t kt, int32_t* cb) {
    if constexpr (SET == 0) {
        QL_ONE_PRODUCT(0, 1, 4)
    } else {
        QL_ONE_PRODUCT(2, 3, 5)
    }
}
#undef QL_ONE_PRODUCT

// One group's epilogue for mr rows of cb (32 outputs each: blocks with panels p0, p1),
// as group_epilogue in float32: accf (+)= float(cb - zpu * rs) * scale, the zero-point
// product an exact int32 (one scalar product per row when every zero point is the same),
// the scales and zero points in registers for all rows.
template <bool SIGNED>
inline void amx_group_epilogue(const int32_t* cb, int mr, const int32_t* rs, int64_t ng,
                               const Layer& L, int64_t p0, int64_t p1, float* accf, bool first) {
    const __m512 s0 = _mm512_loadu_ps(L.scales32 + p0), s1 = _mm512_loadu_ps(L.scales32 + p1);
    if constexpr (SIGNED) {  // the sums are the dot products already
        for (int mm = 0; mm < mr; ++mm) {
            const __m512 v0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(cb + mm * 32)), s0);
            const __m512 v1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(cb + mm * 32 + 16)), s1);
            float* a = accf + mm * 32;
            const __m512 q0 = first ? _mm512_setzero_ps() : _mm512_loadu_ps(a);
            const __m512 q1 = first ? _mm512_setzero_ps() : _mm512_loadu_ps(a + 16);
            _mm512_storeu_ps(a, _mm512_add_ps(q0, v0));
            _mm512_storeu_ps(a + 16, _mm512_add_ps(q1, v1));
        }
        return;
    }
    const bool uniform = L.zpu == nullptr;
    const __m512i z0 = uniform ? _mm512_setzero_si512() : _mm512_loadu_si512(L.zpu + p0);
    const __m512i z1 = uniform ? _mm512_setzero_si512() : _mm512_loadu_si512(L.zpu + p1);
    for (int mm = 0; mm < mr; ++mm) {
        __m512i c0, c1;
        if (uniform) {
            const __m512i zr = _mm512_set1_epi32(L.zp_uniform * rs[mm * ng]);
            c0 = _mm512_sub_epi32(_mm512_loadu_si512(cb + mm * 32), zr);
            c1 = _mm512_sub_epi32(_mm512_loadu_si512(cb + mm * 32 + 16), zr);
        } else {
            const __m512i r = _mm512_set1_epi32(rs[mm * ng]);
            c0 = _mm512_sub_epi32(_mm512_loadu_si512(cb + mm * 32), _mm512_mullo_epi32(z0, r));
            c1 = _mm512_sub_epi32(_mm512_loadu_si512(cb + mm * 32 + 16), _mm512_mullo_epi32(z1, r));
        }
        const __m512 v0 = _mm512_mul_ps(_mm512_cvtepi32_ps(c0), s0);
        const __m512 v1 = _mm512_mul_ps(_mm512_cvtepi32_ps(c1), s1);
        float* a = accf + mm * 32;
        const __m512 q0 = first ? _mm512_setzero_ps() : _mm512_loadu_ps(a);
        const __m512 q1 = first ? _mm512_setzero_ps() : _mm512_loadu_ps(a + 16);
        _mm512_storeu_ps(a, _mm512_add_ps(q0, v0));
        _mm512_storeu_ps(a + 16, _mm512_add_ps(q1, v1));
    }
}

// Rows [m0, m1) of x times four full blocks w4 (int8 step order, in place or expanded)
// starting at block b0, written to y: the same epilogue, in the same order, as the
// vpdpbusd path of int8_driver.h (one group: float64 from the int32 sums; several: the
// float32 group sums of group_epilogue, then float64). xt holds x in tile order
// (amx_tile_order), rows up to m1 rounded up to 32 (padding rows are zero); m0 is a
// multiple of 16.
template <class T, bool SIGNED>
void amx_task_t(const Layer& L, const int8_t* xt, const double* sx,
              const int32_t* rs, int64_t m0, int64_t m1, const uint8_t* const* w4, int64_t b0,
              T* y) {
    const int kt = amx_kt(L);
    const int64_t ng = L.n_groups, kp = L.in / 4, ks = kt / 4;
    const int64_t sg = ng == 1 ? kp : L.group_size / 4;
    constexpr int64_t MC = 128;  // rows of x per chunk: their float32 group sums stay in L1
    constexpr int64_t LAG = 2;   // epilogues run LAG products behind (LAG + 1 sum buffers)
    amx_configure(kt);
    count_amx_task();
    alignas(64) int32_t cb[48 * 32];  // 32 rows, or three 16-row buffers (groups)
    alignas(64) float accf[MC * 32];
    for (int h = 0; h < 2; ++h) {
        const int64_t bi = b0 + 2 * h, o0 = bi * NR;
        const uint8_t* w0 = w4[2 * h];
        const uint8_t* w1 = w4[2 * h + 1];
        if (ng == 1) {
            double zpd[32], sv[32], bv[32];
            for (int r = 0; r < 32; ++r) {
                zpd[r] = SIGNED ? 0.0 : static_cast<double>(zp_at(L, o0 + r));
                sv[r] = scale64(L, o0 + r, 0);
                bv[r] = L.bias ? L.bias[o0 + r] : 0.0;
            }
            for (int64_t m = m0; m < m1; m += 32) {
                const int mr = static_cast<int>(std::min<int64_t>(32, m1 - m));
                // dot = u.xq - zpu * sum xq: integers below 2^53, exact in double.
                amx_sums<SIGNED>(xt + m * L.in, 16 * L.in, kt, w0, w1, 0, kp, ks, mr <= 16, cb);
                for (int mm = 0; mm < mr; ++mm) {
                    const double rsm = static_cast<double>(rs[m + mm]), sxm = sx[m + mm];
                    const int32_t* a = cb + mm * 32;
                    T* ym = y + (m + mm) * L.out + o0;
                    if (L.bias) {
                        for (int r = 0; r < 32; ++r)
                            ym[r] = static_cast<T>(((static_cast<double>(a[r]) - zpd[r] * rsm) * sv[r]) * sxm + bv[r]);
                    } else {
                        for (int r = 0; r < 32; ++r)
                            ym[r] = static_cast<T>(((static_cast<double>(a[r]) - zpd[r] * rsm) * sv[r]) * sxm);
                    }
                }
            }
            continue;
        }
        for (int64_t mc = m0; mc < m1; mc += MC) {
            const int64_t me = std::min(m1, mc + MC);
            const int64_t nt = (me - mc + 15) / 16;  // 16-row tiles of x in the chunk
            auto rows = [&](int64_t t) { return static_cast<int>(std::min<int64_t>(16, me - mc - 16 * t)); };
            auto epilogue = [&](int64_t t, int64_t g, const int32_t* sums) {
                amx_group_epilogue<SIGNED>(sums, rows(t), rs + (mc + 16 * t) * ng + g, ng, L,
                                   panel(L, bi, g), panel(L, bi + 1, g), accf + t * 16 * 32,
                                   g == 0);
            };
            if (sg == ks) {
                // One product per group (group_size == kt): the group's weight steps are
                // loaded into tiles once and every 16-row tile of the chunk uses them.
                for (int64_t g = 0; g < ng; ++g) {
                    _tile_loadd(6, w0 + 64 * g * sg, 64);
                    _tile_loadd(7, w1 + 64 * g * sg, 64);
                    for (int64_t t = 0; t < nt + LAG; ++t) {
                        if (t < nt) {
                            const int8_t* xa = xt + (mc + 16 * t) * L.in + 64 * g * sg;
                            // the x tile two products ahead (16 kt bytes) into L1
                            const int8_t* pf = t + 2 < nt ? xa + 32 * L.in : xa + 16 * kt;
                            for (int64_t i = 0; i < 16 * kt; i += 64)
                                _mm_prefetch(reinterpret_cast<const char*>(pf + i), _MM_HINT_T0);
                            int32_t* dst = cb + (t % (LAG + 1)) * 16 * 32;
                            if (t % 2 == 0) amx_one_product<0, SIGNED>(xa, kt, dst);
                            else amx_one_product<1, SIGNED>(xa, kt, dst);
                        }
                        if (t >= LAG) epilogue(t - LAG, g, cb + ((t - LAG) % (LAG + 1)) * 16 * 32);
                    }
                }
            } else {
                // Longer groups: per 16-row tile, group g's products are issued before the
                // epilogue of group g - LAG (two tile sets).
                for (int64_t t = 0; t < nt; ++t) {
                    const int8_t* x16 = xt + (mc + 16 * t) * L.in;
                    for (int64_t g = 0; g < ng + LAG; ++g) {
                        if (g < ng) {
                            const int64_t sa = g * sg, sb = std::min(kp, sa + sg);
                            int32_t* dst = cb + (g % (LAG + 1)) * 16 * 32;
                            if (g % 2 == 0) amx_group_sums<0, SIGNED>(x16, kt, w0, w1, sa, sb, ks, dst);
                            else amx_group_sums<1, SIGNED>(x16, kt, w0, w1, sa, sb, ks, dst);
                        }
                        if (g >= LAG) epilogue(t, g - LAG, cb + ((g - LAG) % (LAG + 1)) * 16 * 32);
                    }
                }
            }
            for (int64_t m = mc; m < me; ++m) {
                const double sxm = sx[m];
                const float* a = accf + (m - mc) * 32;
                T* ym = y + m * L.out + o0;
                if (L.bias) {
                    for (int r = 0; r < 32; ++r)
                        ym[r] = static_cast<T>(static_cast<double>(a[r]) * sxm + L.bias[o0 + r]);
                } else {
                    for (int r = 0; r < 32; ++r) ym[r] = static_cast<T>(static_cast<double>(a[r]) * sxm);
                }
            }
        }
    }
    _tile_release();
}

// `sgn`: w4 holds signed bytes, each code minus its zero point (the driver's widened
// copy); else the unsigned codes, the zero points applied in the epilogue.
template <class T>
void amx_task(const Layer& L, const int8_t* xt, const double* sx, const int32_t* rs,
              int64_t m0, int64_t m1, const uint8_t* const* w4, int64_t b0, T* y, bool sgn) {
    if (sgn) amx_task_t<T, true>(L, xt, sx, rs, m0, m1, w4, b0, y);
    else amx_task_t<T, false>(L, xt, sx, rs, m0, m1, w4, b0, y);
}
#undef QL_DP
#else
template <class T>
void amx_task(const Layer&, const int8_t*, const double*, const int32_t*, int64_t, int64_t,
              const uint8_t* const*, int64_t, T*, bool) {}
#endif

}  // namespace QL_ISA
}  // namespace qlinear
