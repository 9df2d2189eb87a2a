// AVX-512 (F, BW, VL, DQ) + VNNI kernels. Compiled with -mavx512f -mavx512bw -mavx512vl
// -mavx512dq -mavx512vnni -mfma; only called after cpu_has_avx512vnni() said yes.
#include <immintrin.h>

#include <cstring>

#include "common.h"

#define QL_ISA avx512

namespace qlinear {
namespace avx512 {

constexpr int MR_I = 12;
constexpr int MR_F = 6;
// How far ahead of its loads the batch-1 int8-mode kernel prefetches each weight stream.
#ifndef QL_PF
#define QL_PF 1024
#endif

// The one vector unpacking of an int4 step (layout.h): 32 bytes of nibbles -> codes
// 0..31 (low nibbles) and 32..63 (high nibbles).
static inline void load_step4_halves(const uint8_t* p, __m256i* lo, __m256i* hi) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i mask = _mm256_set1_epi8(0x0F);
    *lo = _mm256_and_si256(b, mask);
    *hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
}
static inline __m512i load_step4(const uint8_t* p) {
    __m256i lo, hi;
    load_step4_halves(p, &lo, &hi);
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

template <int BITS>
static inline __m512i load_step(const uint8_t* w, int64_t s) {
    if (BITS == 8) return _mm512_loadu_si512(w + s * 64);
    return load_step4(w + s * 32);
}

// acc += u8 codes . s8 activations (4 bytes at x4, broadcast). Inline asm: GCC copies
// every accumulator around the vpdpbusd builtin (its tied operand), doubling the uops,
typedef int32_t alias_i32 __attribute__((may_alias));
static inline __m512i bcast4(const int8_t* p) {
    return _mm512_set1_epi32(*reinterpret_cast<const alias_i32*>(p));
}
static inline void dpv(__m512i& acc, __m512i w, __m512i x) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x));
}
static inline void dp(__m512i& acc, __m512i w, const int8_t* x4) { dpv(acc, w, bcast4(x4)); }

// One row of x: four independent accumulators hide the vpdpbusd latency.
template <int BITS>
static void i_micro1(const uint8_t* w, int64_t nsteps, const int8_t* xq, int32_t* acc) {
    __m512i a0 = _mm512_loadu_si512(acc), a1 = _mm512_setzero_si512();
    __m512i a2 = _mm512_setzero_si512(), a3 = _mm512_setzero_si512();
    int64_t s = 0;
    for (; s + 4 <= nsteps; s += 4) {
        dp(a0, load_step<BITS>(w, s), xq + 4 * s);
        dp(a1, load_step<BITS>(w, s + 1), xq + 4 * s + 4);
        dp(a2, load_step<BITS>(w, s + 2), xq + 4 * s + 8);
        dp(a3, load_step<BITS>(w, s + 3), xq + 4 * s + 12);
    }
    for (; s < nsteps; ++s) dp(a0, load_step<BITS>(w, s), xq + 4 * s);
    a0 = _mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3));
    _mm512_storeu_si512(acc, a0);
}

template <int BITS, int MR>
static void i_microN(const uint8_t* w, int64_t nsteps, const int8_t* xq, int64_t xq_rs,
                     int32_t* acc) {
    __m512i a[MR];
    for (int m = 0; m < MR; ++m) a[m] = _mm512_loadu_si512(acc + m * NR);
    for (int64_t s = 0; s < nsteps; ++s) {
        const __m512i wv = load_step<BITS>(w, s);
        for (int m = 0; m < MR; ++m)
            a[m] = _mm512_dpbusd_epi32(a[m], wv, bcast4(xq + m * xq_rs + 4 * s));
    }
    for (int m = 0; m < MR; ++m) _mm512_storeu_si512(acc + m * NR, a[m]);
}

template <int BITS>
static void i_micro_b(const uint8_t* w, int64_t nsteps, const int8_t* xq, int64_t xq_rs, int mr,
                      int32_t* acc) {
    switch (mr) {
        case 1: i_micro1<BITS>(w, nsteps, xq, acc); break;
        case 2: i_microN<BITS, 2>(w, nsteps, xq, xq_rs, acc); break;
        case 3: i_microN<BITS, 3>(w, nsteps, xq, xq_rs, acc); break;
        case 4: i_microN<BITS, 4>(w, nsteps, xq, xq_rs, acc); break;
        case 5: i_microN<BITS, 5>(w, nsteps, xq, xq_rs, acc); break;
        case 6: i_microN<BITS, 6>(w, nsteps, xq, xq_rs, acc); break;
        case 7: i_microN<BITS, 7>(w, nsteps, xq, xq_rs, acc); break;
        default: i_microN<BITS, 8>(w, nsteps, xq, xq_rs, acc); break;
    }
}

static inline void i_micro(const uint8_t* w, int bits, int64_t nsteps, const int8_t* xq,
                           int64_t xq_rs, int mr, int32_t* acc) {
    for (int m = 0; m < mr; m += 8) {
        const int part = mr - m < 8 ? mr - m : 8;
        if (bits == 8) i_micro_b<8>(w, nsteps, xq + m * xq_rs, xq_rs, part, acc + m * NR);
        else i_micro_b<4>(w, nsteps, xq + m * xq_rs, xq_rs, part, acc + m * NR);
    }
}

// Two blocks (32 output rows) per activation broadcast.
template <int BITS, int MR>
static void i_micro2N(const uint8_t* w0, const uint8_t* w1, int64_t nsteps, const int8_t* xq,
                      int64_t xq_rs, int32_t* acc0, int32_t* acc1) {
    __m512i a[MR], b[MR];
    for (int m = 0; m < MR; ++m) {
        a[m] = _mm512_loadu_si512(acc0 + m * NR);
        b[m] = _mm512_loadu_si512(acc1 + m * NR);
    }
    for (int64_t s = 0; s < nsteps; ++s) {
        const __m512i v0 = load_step<BITS>(w0, s);
        const __m512i v1 = load_step<BITS>(w1, s);
        for (int m = 0; m < MR; ++m) {
            const __m512i xv = bcast4(xq + m * xq_rs + 4 * s);
            a[m] = _mm512_dpbusd_epi32(a[m], v0, xv);
            b[m] = _mm512_dpbusd_epi32(b[m], v1, xv);
        }
    }
    for (int m = 0; m < MR; ++m) {
        _mm512_storeu_si512(acc0 + m * NR, a[m]);
        _mm512_storeu_si512(acc1 + m * NR, b[m]);
    }
}

// Six rows x two blocks with named accumulators (arrays would live on the stack once
// the inline asm takes their address).
template <int BITS>
static void i_micro2_6(const uint8_t* w0, const uint8_t* w1, int64_t nsteps, const int8_t* xq,
                       int64_t xq_rs, int32_t* acc0, int32_t* acc1) {
#define QL_LD(i) __m512i a##i = _mm512_loadu_si512(acc0 + i * NR), b##i = _mm512_loadu_si512(acc1 + i * NR);
    QL_LD(0) QL_LD(1) QL_LD(2) QL_LD(3) QL_LD(4) QL_LD(5)
#undef QL_LD
    const int8_t* x0 = xq;
    const int8_t* x1 = xq + xq_rs;
    const int8_t* x2 = xq + 2 * xq_rs;
    const int8_t* x3 = xq + 3 * xq_rs;
    const int8_t* x4 = xq + 4 * xq_rs;
    const int8_t* x5 = xq + 5 * xq_rs;
    for (int64_t s = 0; s < nsteps; ++s) {
        const __m512i v0 = load_step<BITS>(w0, s);
        const __m512i v1 = load_step<BITS>(w1, s);
#define QL_ROW(i)                                  \
    {                                              \
        const __m512i xv = bcast4(x##i + 4 * s);   \
        dpv(a##i, v0, xv);                         \
        dpv(b##i, v1, xv);                         \
    }
        QL_ROW(0) QL_ROW(1) QL_ROW(2) QL_ROW(3) QL_ROW(4) QL_ROW(5)
#undef QL_ROW
    }
#define QL_ST(i) _mm512_storeu_si512(acc0 + i * NR, a##i); _mm512_storeu_si512(acc1 + i * NR, b##i);
    QL_ST(0) QL_ST(1) QL_ST(2) QL_ST(3) QL_ST(4) QL_ST(5)
#undef QL_ST
}

template <int BITS>
static void i_micro2_b(const uint8_t* w0, const uint8_t* w1, int64_t nsteps, const int8_t* xq,
                       int64_t xq_rs, int mr, int32_t* acc0, int32_t* acc1) {
    int m = 0;
    if (mr == 1) {
        i_micro1<BITS>(w0, nsteps, xq, acc0);
        i_micro1<BITS>(w1, nsteps, xq, acc1);
        return;
    }
    for (; m + 6 <= mr; m += 6)
        i_micro2_6<BITS>(w0, w1, nsteps, xq + m * xq_rs, xq_rs, acc0 + m * NR, acc1 + m * NR);
    switch (mr - m) {
        case 1: i_micro2N<BITS, 1>(w0, w1, nsteps, xq + m * xq_rs, xq_rs, acc0 + m * NR, acc1 + m * NR); break;
        case 2: i_micro2N<BITS, 2>(w0, w1, nsteps, xq + m * xq_rs, xq_rs, acc0 + m * NR, acc1 + m * NR); break;
        case 3: i_micro2N<BITS, 3>(w0, w1, nsteps, xq + m * xq_rs, xq_rs, acc0 + m * NR, acc1 + m * NR); break;
        case 4: i_micro2N<BITS, 4>(w0, w1, nsteps, xq + m * xq_rs, xq_rs, acc0 + m * NR, acc1 + m * NR); break;
        case 5: i_micro2N<BITS, 5>(w0, w1, nsteps, xq + m * xq_rs, xq_rs, acc0 + m * NR, acc1 + m * NR); break;
        default: break;
    }
}

static inline void i_micro2(const uint8_t* w0, const uint8_t* w1, int bits, int64_t nsteps,
                            const int8_t* xq, int64_t xq_rs, int mr, int32_t* acc0,
                            int32_t* acc1) {
    if (bits == 8) i_micro2_b<8>(w0, w1, nsteps, xq, xq_rs, mr, acc0, acc1);
    else i_micro2_b<4>(w0, w1, nsteps, xq, xq_rs, mr, acc0, acc1);
}

// Four blocks (64 output rows) x R <= 6 rows of x: up to 24 accumulators, named (an
// array would be kept on the stack once the inline asm takes its address).
template <int BITS, int R>
static void i_micro4_r(const uint8_t* const* w, int64_t nsteps, const int8_t* xq, int64_t xq_rs,
                       int32_t* const* acc) {
    const __m512i z = _mm512_setzero_si512();
#define QL_LD(i)                                                      \
    __m512i a##i = R > i ? _mm512_loadu_si512(acc[0] + i * NR) : z;   \
    __m512i b##i = R > i ? _mm512_loadu_si512(acc[1] + i * NR) : z;   \
    __m512i c##i = R > i ? _mm512_loadu_si512(acc[2] + i * NR) : z;   \
    __m512i d##i = R > i ? _mm512_loadu_si512(acc[3] + i * NR) : z;   \
    const int8_t* x##i = xq + (R > i ? i : 0) * xq_rs;
    QL_LD(0) QL_LD(1) QL_LD(2) QL_LD(3) QL_LD(4) QL_LD(5)
#undef QL_LD
    const uint8_t *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
    for (int64_t s = 0; s < nsteps; ++s) {
        const __m512i v0 = load_step<BITS>(w0, s);
        const __m512i v1 = load_step<BITS>(w1, s);
        const __m512i v2 = load_step<BITS>(w2, s);
        const __m512i v3 = load_step<BITS>(w3, s);
#define QL_ROW(i)                                      \
    if (R > i) {                                       \
        const __m512i xv = bcast4(x##i + 4 * s);       \
        dpv(a##i, v0, xv);                             \
        dpv(b##i, v1, xv);                             \
        dpv(c##i, v2, xv);                             \
        dpv(d##i, v3, xv);                             \
    }
        QL_ROW(0) QL_ROW(1) QL_ROW(2) QL_ROW(3) QL_ROW(4) QL_ROW(5)
#undef QL_ROW
    }
#define QL_ST(i)                                      \
    if (R > i) {                                      \
        _mm512_storeu_si512(acc[0] + i * NR, a##i);   \
        _mm512_storeu_si512(acc[1] + i * NR, b##i);   \
        _mm512_storeu_si512(acc[2] + i * NR, c##i);   \
        _mm512_storeu_si512(acc[3] + i * NR, d##i);   \
    }
    QL_ST(0) QL_ST(1) QL_ST(2) QL_ST(3) QL_ST(4) QL_ST(5)
#undef QL_ST
}

// int4, two steps at a time: one 64-byte load holds steps s and s+1 of a block (32
// bytes each, layout.h); one AND and one shift+AND give their low and high nibbles, two
// 128-bit-lane shuffles regroup them into step s (rows 0..7 from the low nibbles, 8..15
// from the high) and step s+1: 5 operations per 2 steps instead of 4 per step.
static inline void load_pair4(const uint8_t* p, __m512i* s0, __m512i* s1) {
    const __m512i v = _mm512_loadu_si512(p);
    const __m512i mask = _mm512_set1_epi8(0x0F);
    const __m512i lo = _mm512_and_si512(v, mask);
    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
    *s0 = _mm512_shuffle_i64x2(lo, hi, 0x44);
    *s1 = _mm512_shuffle_i64x2(lo, hi, 0xEE);
}

// int4 steps -> the same codes as bytes in the int8 step order, two steps per load.
// vpdpbusd takes any unsigned bytes, so the int8 micro-kernels run on the result with
// the int4 zero points unchanged.
static constexpr int64_t I4_EXPAND_ROWS = 48;  // four 12-row tiles or more
static inline void expand_steps4(const uint8_t* w, int64_t nsteps, uint8_t* dst) {
    int64_t s = 0;
    for (; s + 2 <= nsteps; s += 2) {
        __m512i v0, v1;
        load_pair4(w + s * 32, &v0, &v1);
        _mm512_storeu_si512(dst + s * 64, v0);
        _mm512_storeu_si512(dst + s * 64 + 64, v1);
    }
    if (s < nsteps) _mm512_storeu_si512(dst + s * 64, load_step4(w + s * 32));
}

// vpdpbusd with the 4 activation bytes broadcast from memory (no register for x).
static inline void dpm(__m512i& acc, __m512i w, const int8_t* x4) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const alias_i32*>(x4)));
}

// Four int4 blocks x R <= 6 rows of x, steps in pairs. With R <= 2 the odd steps go to
// their own accumulators (more independent vpdpbusd chains when there are few rows).
template <int R>
static void i4_micro4_r(const uint8_t* const* w, int64_t nsteps, const int8_t* xq, int64_t xq_rs,
                        int32_t* const* acc) {
    constexpr bool SPLIT = R <= 2;
    const __m512i z = _mm512_setzero_si512();
#define QL_LD(i)                                                      \
    __m512i a##i = R > i ? _mm512_loadu_si512(acc[0] + i * NR) : z;   \
    __m512i b##i = R > i ? _mm512_loadu_si512(acc[1] + i * NR) : z;   \
    __m512i c##i = R > i ? _mm512_loadu_si512(acc[2] + i * NR) : z;   \
    __m512i d##i = R > i ? _mm512_loadu_si512(acc[3] + i * NR) : z;   \
    __m512i ao##i = z, bo##i = z, co##i = z, do##i = z;               \
    const int8_t* x##i = xq + (R > i ? i : 0) * xq_rs;
    QL_LD(0) QL_LD(1) QL_LD(2) QL_LD(3) QL_LD(4) QL_LD(5)
#undef QL_LD
    const uint8_t *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
    int64_t s = 0;
    for (; s + 2 <= nsteps; s += 2) {
#define QL_ROW(i, A, AO, V0, V1)                              \
    if (R > i) {                                              \
        dpm(A##i, V0, x##i + 4 * s);                          \
        if (SPLIT) dpm(AO##i, V1, x##i + 4 * s + 4);          \
        else dpm(A##i, V1, x##i + 4 * s + 4);                 \
    }
#define QL_BLOCK(W, A, AO)                                                          \
    {                                                                               \
        __m512i v0, v1;                                                             \
        load_pair4(W + s * 32, &v0, &v1);                                           \
        QL_ROW(0, A, AO, v0, v1) QL_ROW(1, A, AO, v0, v1) QL_ROW(2, A, AO, v0, v1)  \
        QL_ROW(3, A, AO, v0, v1) QL_ROW(4, A, AO, v0, v1) QL_ROW(5, A, AO, v0, v1)  \
    }
        QL_BLOCK(w0, a, ao) QL_BLOCK(w1, b, bo) QL_BLOCK(w2, c, co) QL_BLOCK(w3, d, do)
#undef QL_BLOCK
#undef QL_ROW
    }
    for (; s < nsteps; ++s) {
        const __m512i v0 = load_step4(w0 + s * 32), v1 = load_step4(w1 + s * 32);
        const __m512i v2 = load_step4(w2 + s * 32), v3 = load_step4(w3 + s * 32);
#define QL_ROW(i)                           \
    if (R > i) {                            \
        dpm(a##i, v0, x##i + 4 * s);        \
        dpm(b##i, v1, x##i + 4 * s);        \
        dpm(c##i, v2, x##i + 4 * s);        \
        dpm(d##i, v3, x##i + 4 * s);        \
    }
        QL_ROW(0) QL_ROW(1) QL_ROW(2) QL_ROW(3) QL_ROW(4) QL_ROW(5)
#undef QL_ROW
    }
#define QL_ST(i)                                                                         \
    if (R > i) {                                                                         \
        if (SPLIT) {                                                                     \
            a##i = _mm512_add_epi32(a##i, ao##i);                                        \
            b##i = _mm512_add_epi32(b##i, bo##i);                                        \
            c##i = _mm512_add_epi32(c##i, co##i);                                        \
            d##i = _mm512_add_epi32(d##i, do##i);                                        \
        }                                                                                \
        _mm512_storeu_si512(acc[0] + i * NR, a##i);                                      \
        _mm512_storeu_si512(acc[1] + i * NR, b##i);                                      \
        _mm512_storeu_si512(acc[2] + i * NR, c##i);                                      \
        _mm512_storeu_si512(acc[3] + i * NR, d##i);                                      \
    }
    QL_ST(0) QL_ST(1) QL_ST(2) QL_ST(3) QL_ST(4) QL_ST(5)
#undef QL_ST
}

// One group's epilogue for one row of x and one block, 16 lanes at once, in float32 as
// ref.linear_int8act: ad[r] (+)= float(a[r] - zpv[r] * rs) * sv[r] (exact int32
// difference, then one rounding for the product and one for the sum, no FMA).
static inline void group_epilogue(const int32_t* a, const int32_t* zpv, int32_t rs,
                                  const float* sv, float* ad, bool first) {
    const __m512i d = _mm512_sub_epi32(_mm512_loadu_si512(a),
                                       _mm512_mullo_epi32(_mm512_loadu_si512(zpv), _mm512_set1_epi32(rs)));
    const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(sv));
    _mm512_storeu_ps(ad, _mm512_add_ps(first ? _mm512_setzero_ps() : _mm512_loadu_ps(ad), v));
}

// The 16 float32 scales of a panel.
static inline __m512 load_scales16(const Layer& L, int64_t i) { return _mm512_loadu_ps(L.scales32 + i); }

// One row of x, four full blocks, every group in one call (decode): per group the
// integer sums stay in registers (even and odd steps apart: 8 independent chains), then
// accf[b][r] (+)= float(dot - zpu * rs) * scale, 16 lanes at a time, as group_epilogue.
template <int BITS>
static void i_groups_r1_b(const uint8_t* const* w, int64_t ng, int64_t sg, int64_t kp,
                          const int8_t* xq, const int32_t* rs, const Layer& L, int64_t bi0,
                          float* accf, int64_t bstride) {
    const __m512i z = _mm512_setzero_si512();
    const uint8_t *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
    __m512 d[4];
    for (int j = 0; j < 4; ++j) d[j] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
        const int64_t sa = g * sg, sb = sa + sg < kp ? sa + sg : kp;
        __m512i a0 = z, a1 = z, a2 = z, a3 = z, e0 = z, e1 = z, e2 = z, e3 = z;
        int64_t s = sa;
        if constexpr (BITS == 4) {
            // No lane shuffles per step pair: the low nibbles hold rows 0..7 of step s
            // (128-bit lanes 0, 1) and of step s+1 (lanes 2, 3), the high nibbles rows
            // 8..15 alike (load_pair4), so they meet x of step s in lanes 0, 1 and of
            // step s+1 in lanes 2, 3; a (low) and e (high) are regrouped into rows once
            // per group. Integer sums: the same bits as the step-by-step order.
            const __m512i mask = _mm512_set1_epi8(0x0F);
            const __m512i pick = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
            for (; s + 2 <= sb; s += 2) {
                const __m512i xv = _mm512_permutexvar_epi32(
                    pick, _mm512_castsi128_si512(
                              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(xq + 4 * s))));
#define QL_B4(W, A, E)                                                                      \
    {                                                                                       \
        _mm_prefetch(reinterpret_cast<const char*>(W) + s * 32 + QL_PF, _MM_HINT_T0);       \
        const __m512i v = _mm512_loadu_si512(W + s * 32);                                   \
        A = _mm512_dpbusd_epi32(A, _mm512_and_si512(v, mask), xv);                          \
        E = _mm512_dpbusd_epi32(E, _mm512_and_si512(_mm512_srli_epi16(v, 4), mask), xv);    \
    }
                QL_B4(w0, a0, e0) QL_B4(w1, a1, e1) QL_B4(w2, a2, e2) QL_B4(w3, a3, e3)
#undef QL_B4
            }
#define QL_ROWS(A, E)                                                                      \
    {                                                                                      \
        const __m512i even = _mm512_shuffle_i64x2(A, E, 0x44), odd = _mm512_shuffle_i64x2(A, E, 0xEE); \
        A = _mm512_add_epi32(even, odd);                                                   \
        E = z;                                                                             \
    }
            QL_ROWS(a0, e0) QL_ROWS(a1, e1) QL_ROWS(a2, e2) QL_ROWS(a3, e3)
#undef QL_ROWS
        } else {
            for (; s + 2 <= sb; s += 2) {
#define QL_B(W, A, E)                                                                  \
    _mm_prefetch(reinterpret_cast<const char*>(W + s * 64) + QL_PF, _MM_HINT_T0);      \
    _mm_prefetch(reinterpret_cast<const char*>(W + s * 64) + 64 + QL_PF, _MM_HINT_T0); \
    dpm(A, _mm512_loadu_si512(W + s * 64), xq + 4 * s);                                \
    dpm(E, _mm512_loadu_si512(W + s * 64 + 64), xq + 4 * s + 4);
                QL_B(w0, a0, e0) QL_B(w1, a1, e1) QL_B(w2, a2, e2) QL_B(w3, a3, e3)
#undef QL_B
            }
        }
        if (s < sb) {
            dpm(a0, load_step<BITS>(w0, s), xq + 4 * s);
            dpm(a1, load_step<BITS>(w1, s), xq + 4 * s);
            dpm(a2, load_step<BITS>(w2, s), xq + 4 * s);
            dpm(a3, load_step<BITS>(w3, s), xq + 4 * s);
        }
        const __m512i sums[4] = {_mm512_add_epi32(a0, e0), _mm512_add_epi32(a1, e1),
                                 _mm512_add_epi32(a2, e2), _mm512_add_epi32(a3, e3)};
        // zpu * rs: one broadcast product for a uniform zero point, else per row.
        const __m512i zr = _mm512_set1_epi32(L.zp_uniform * rs[g]);
        for (int j = 0; j < 4; ++j) {
            const int64_t i = panel(L, bi0 + j, g);
            const __m512i zrj = L.zpu ? _mm512_mullo_epi32(_mm512_loadu_si512(L.zpu + i),
                                                           _mm512_set1_epi32(rs[g]))
                                      : zr;
            const __m512i dot = _mm512_sub_epi32(sums[j], zrj);
            // starts at +0.0f, as the reference
            d[j] = _mm512_add_ps(d[j], _mm512_mul_ps(_mm512_cvtepi32_ps(dot), load_scales16(L, i)));
        }
    }
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(accf + j * bstride, d[j]);
}
static constexpr bool HAS_GROUPS_R1 = true;
static inline void i_groups_r1(const uint8_t* const* w, int bits, int64_t ng, int64_t sg,
                               int64_t kp, const int8_t* xq, const int32_t* rs, const Layer& L,
                               int64_t bi0, float* accf, int64_t bstride) {
    if (bits == 8) i_groups_r1_b<8>(w, ng, sg, kp, xq, rs, L, bi0, accf, bstride);
    else i_groups_r1_b<4>(w, ng, sg, kp, xq, rs, L, bi0, accf, bstride);
}

// R <= 6 rows of x over four full blocks and every group (several groups, no tail
// step): per group the 4 x R int32 sums start at zero in registers, and at the group's
// end each goes through group_epilogue's arithmetic (float(dot - zpu * rs) * scale, added
// to accf in L1), so a group of 32 costs its products and one short float step per sum,
// with no accumulator clears, loads or stores in between.
template <int BITS, int R>
static void i_groups4_r(const uint8_t* const* w, int64_t ng, int64_t sg, int64_t kp,
                        const int8_t* xq, int64_t xq_rs, const int32_t* rs, const Layer& L,
                        int64_t bi0, float* accf, int64_t bstride) {
    const uint8_t *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
#define QL_X(i) const int8_t* x##i = xq + (R > i ? i : 0) * xq_rs;
    QL_X(0) QL_X(1) QL_X(2) QL_X(3) QL_X(4) QL_X(5)
#undef QL_X
    for (int64_t g = 0; g < ng; ++g) {
        const int64_t sa = g * sg, sb = sa + sg < kp ? sa + sg : kp;
        const __m512i z = _mm512_setzero_si512();
#define QL_Z(i) __m512i a##i = z, b##i = z, c##i = z, d##i = z;
        QL_Z(0) QL_Z(1) QL_Z(2) QL_Z(3) QL_Z(4) QL_Z(5)
#undef QL_Z
        for (int64_t s = sa; s < sb; ++s) {
            const __m512i v0 = load_step<BITS>(w0, s);
            const __m512i v1 = load_step<BITS>(w1, s);
            const __m512i v2 = load_step<BITS>(w2, s);
            const __m512i v3 = load_step<BITS>(w3, s);
#define QL_ROW(i)                                      \
    if (R > i) {                                       \
        const __m512i xv = bcast4(x##i + 4 * s);       \
        dpv(a##i, v0, xv);                             \
        dpv(b##i, v1, xv);                             \
        dpv(c##i, v2, xv);                             \
        dpv(d##i, v3, xv);                             \
    }
            QL_ROW(0) QL_ROW(1) QL_ROW(2) QL_ROW(3) QL_ROW(4) QL_ROW(5)
#undef QL_ROW
        }
        const bool first = g == 0;
        auto ep = [&](__m512i a, int i, int j, __m512 sc, __m512i zpv) {
            const int32_t r = rs[i * ng + g];
            const __m512i zr = L.zpu ? _mm512_mullo_epi32(zpv, _mm512_set1_epi32(r))
                                     : _mm512_set1_epi32(L.zp_uniform * r);
            const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a, zr)), sc);
            float* ad = accf + j * bstride + i * NR;
            _mm512_storeu_ps(ad, _mm512_add_ps(first ? _mm512_setzero_ps() : _mm512_loadu_ps(ad), v));
        };
#define QL_EP(A, j)                                                                   \
    {                                                                                 \
        const int64_t pi = panel(L, bi0 + j, g);                                      \
        const __m512 sc = load_scales16(L, pi);                                       \
        const __m512i zpv = L.zpu ? _mm512_loadu_si512(L.zpu + pi) : z;               \
        ep(A##0, 0, j, sc, zpv);                                                      \
        if (R > 1) ep(A##1, 1, j, sc, zpv);                                           \
        if (R > 2) ep(A##2, 2, j, sc, zpv);                                           \
        if (R > 3) ep(A##3, 3, j, sc, zpv);                                           \
        if (R > 4) ep(A##4, 4, j, sc, zpv);                                           \
        if (R > 5) ep(A##5, 5, j, sc, zpv);                                           \
    }
        QL_EP(a, 0) QL_EP(b, 1) QL_EP(c, 2) QL_EP(d, 3)
#undef QL_EP
    }
}
static constexpr bool HAS_GROUPS4 = true;
static inline void i_groups4(const uint8_t* const* w, int bits, int64_t ng, int64_t sg,
                             int64_t kp, const int8_t* xq, int64_t xq_rs, const int32_t* rs,
                             const Layer& L, int64_t bi0, float* accf, int64_t bstride, int mr) {
    for (int m = 0; m < mr; m += 6) {
        const int8_t* xm = xq + m * xq_rs;
        const int32_t* rm = rs + m * L.n_groups;
        float* am = accf + m * NR;
#define QL_CASE(R)                                                                     \
    case R:                                                                            \
        if (bits == 8) i_groups4_r<8, R>(w, ng, sg, kp, xm, xq_rs, rm, L, bi0, am, bstride); \
        else i_groups4_r<4, R>(w, ng, sg, kp, xm, xq_rs, rm, L, bi0, am, bstride);           \
        break;
        switch (mr - m < 6 ? mr - m : 6) {
            QL_CASE(1) QL_CASE(2) QL_CASE(3) QL_CASE(4) QL_CASE(5) QL_CASE(6)
        }
#undef QL_CASE
    }
}

// Rows of x in tiles of six over four full blocks; leftovers go two blocks at a time.
static inline void i_micro4(const uint8_t* const* w, int bits, int64_t nsteps, const int8_t* xq,
                            int64_t xq_rs, int mr, int32_t* const* acc);

// Per-row activation quantization, as ref.quantize_rows_int8: max|x| (exact in x's
// dtype), scale = max / 127 in double, round(x / scale) half to even, clamp to +-127.
static inline __m512d load8d(const float* p, __mmask8 k) {
    return _mm512_cvtps_pd(_mm256_maskz_loadu_ps(k, p));
}
static inline __m512d load8d(const double* p, __mmask8 k) { return _mm512_maskz_loadu_pd(k, p); }

// max |x[k]| for k < in, 64 bytes at a time with four independent accumulators; NaN if
// the row holds a NaN or an infinity (max alone would drop a NaN).
static double row_absmax(const float* x, int64_t in) {
    const __m512 sign = _mm512_set1_ps(-0.0f), inf = _mm512_set1_ps(__builtin_inff());
    __m512 m0 = _mm512_setzero_ps(), m1 = m0, m2 = m0, m3 = m0;
    __mmask16 bad = 0;
    int64_t k = 0;
#define QL_ABS(j, mm)                                                            \
    {                                                                            \
        const __m512 v = _mm512_andnot_ps(sign, _mm512_loadu_ps(x + k + 16 * j)); \
        bad |= _mm512_cmp_ps_mask(v, inf, _CMP_NLT_UQ);                          \
        mm = _mm512_max_ps(mm, v);                                               \
    }
    for (; k + 64 <= in; k += 64) {
        QL_ABS(0, m0) QL_ABS(1, m1) QL_ABS(2, m2) QL_ABS(3, m3)
    }
#undef QL_ABS
    for (; k < in; k += 16) {
        const __mmask16 m = in - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (in - k)) - 1);
        const __m512 v = _mm512_andnot_ps(sign, _mm512_maskz_loadu_ps(m, x + k));
        bad |= _mm512_cmp_ps_mask(v, inf, _CMP_NLT_UQ);
        m0 = _mm512_max_ps(m0, v);
    }
    if (bad) return __builtin_nan("");
    return static_cast<double>(_mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3))));
}
static double row_absmax(const double* x, int64_t in) {
    const __m512d sign = _mm512_set1_pd(-0.0), inf = _mm512_set1_pd(__builtin_inf());
    __m512d m0 = _mm512_setzero_pd(), m1 = m0, m2 = m0, m3 = m0;
    __mmask8 bad = 0;
    int64_t k = 0;
#define QL_ABS(j, mm)                                                           \
    {                                                                           \
        const __m512d v = _mm512_andnot_pd(sign, _mm512_loadu_pd(x + k + 8 * j)); \
        bad |= _mm512_cmp_pd_mask(v, inf, _CMP_NLT_UQ);                         \
        mm = _mm512_max_pd(mm, v);                                              \
    }
    for (; k + 32 <= in; k += 32) {
        QL_ABS(0, m0) QL_ABS(1, m1) QL_ABS(2, m2) QL_ABS(3, m3)
    }
#undef QL_ABS
    for (; k < in; k += 8) {
        const __mmask8 m = in - k >= 8 ? __mmask8(0xFF) : __mmask8((1u << (in - k)) - 1);
        const __m512d v = _mm512_andnot_pd(sign, _mm512_maskz_loadu_pd(m, x + k));
        bad |= _mm512_cmp_pd_mask(v, inf, _CMP_NLT_UQ);
        m0 = _mm512_max_pd(m0, v);
    }
    if (bad) return __builtin_nan("");
    return _mm512_reduce_max_pd(_mm512_max_pd(_mm512_max_pd(m0, m1), _mm512_max_pd(m2, m3)));
}

// x * (1 / scale) is within 3e-14 of the correctly rounded x / scale (|x / scale| <=
// 127.x, two roundings of 2^-53 relative each): rounding to an integer agrees unless the
// product is within 1e-12 of a half-integer; only then (or when 1 / scale is not a normal
// number: fast == false) is the division done. |x / scale| rounds to at most 127, so the
// saturating narrowing is the reference's clamp.
struct QuantConsts {
    __m512d vs, vinv, half_lo, sign;
    bool fast;
};

template <class T>
static inline __m256i quant8(const T* x, __mmask8 m, const QuantConsts& c) {
    const __m512d xv = load8d(x, m);
    const __m512d v = _mm512_mul_pd(xv, c.vinv);
    __m512d r = _mm512_roundscale_pd(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512d d = _mm512_andnot_pd(c.sign, _mm512_sub_pd(v, r));
    if (!c.fast || _mm512_cmp_pd_mask(d, c.half_lo, _CMP_GT_OQ))
        r = _mm512_roundscale_pd(_mm512_div_pd(xv, c.vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_cvtpd_epi32(r);
}

template <class T>
static void quantize_row_avx512(const T* x, int64_t in, int64_t kpad, int64_t gs, int64_t ng,
                                int8_t* q, double* sx, int32_t* rs) {
    const double amax = row_absmax(x, in);
    if (amax != amax) {  // a NaN or an infinity: reported through sx, nothing computed
        *sx = amax;
        return;
    }
    const double scale = amax > 0.0 ? amax / 127.0 : 1.0;
    QuantConsts c;
    c.fast = scale >= 1e-300 && scale <= 1e300;
    c.vs = _mm512_set1_pd(scale);
    c.vinv = _mm512_set1_pd(c.fast ? 1.0 / scale : 0.0);
    c.half_lo = _mm512_set1_pd(0.5 - 1e-12);
    c.sign = _mm512_set1_pd(-0.0);
    int64_t k = 0;
    if (sizeof(T) == 4 && scale >= 1e-30 && scale <= 1e30) {
        // float32 x: the product in float32 is within 127 * 2.4e-7 of x / scale, so it
        // rounds like the double quotient unless within 1e-4 of a half-integer; such
        // 16-element pieces (rare, or every piece for exact ties) take the double path.
        const __m512 inv = _mm512_set1_ps(static_cast<float>(1.0 / scale));
        const __m512 lim = _mm512_set1_ps(0.5f - 1e-4f), sgn = _mm512_set1_ps(-0.0f);
        for (; k + 16 <= in; k += 16) {
            const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(reinterpret_cast<const float*>(x + k)), inv);
            const __m512 r = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m512 d = _mm512_andnot_ps(sgn, _mm512_sub_ps(v, r));
            __m512i iv;
            if (_mm512_cmp_ps_mask(d, lim, _CMP_GT_OQ))
                iv = _mm512_inserti64x4(_mm512_castsi256_si512(quant8(x + k, 0xFF, c)),
                                        quant8(x + k + 8, 0xFF, c), 1);
            else
                iv = _mm512_cvtps_epi32(r);
            _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtsepi32_epi8(iv));
        }
    }
    for (; k + 16 <= in; k += 16) {
        const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(quant8(x + k, 0xFF, c)),
                                             quant8(x + k + 8, 0xFF, c), 1);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtsepi32_epi8(v));
    }
    for (; k < in; k += 8) {
        const __mmask8 m = in - k >= 8 ? __mmask8(0xFF) : __mmask8((1u << (in - k)) - 1);
        _mm_mask_storeu_epi8(q + k, m, _mm256_cvtsepi32_epi8(quant8(x + k, m, c)));
    }
    for (int64_t j = in; j < kpad; ++j) q[j] = 0;
    *sx = scale;
    // Row sums per group: vpdpbusd with all-ones unsigned bytes sums 4 signed bytes a lane.
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t g = 0; g < ng; ++g) {
        const int64_t a = g * gs, e = in < a + gs ? in : a + gs;
        __m512i acc = _mm512_setzero_si512();
        for (int64_t j = a; j < e; j += 64) {
            const __mmask64 m = e - j >= 64 ? ~__mmask64(0) : (__mmask64(1) << (e - j)) - 1;
            dpv(acc, ones, _mm512_maskz_loadu_epi8(m, q + j));
        }
        rs[g] = _mm512_reduce_add_epi32(acc);
    }
}
template <class T>
static inline void quantize_row_isa(const T* x, int64_t in, int64_t kpad, int64_t gs, int64_t ng,
                                    int8_t* q, double* sx, int32_t* rs) {
    quantize_row_avx512<T>(x, in, kpad, gs, ng, q, sx, rs);
}

// Float mode for a few rows of x: convert codes in registers, no weight buffer.
static inline void step_pieces(const uint8_t* w, int bits, int64_t s, __m128i* p) {
    if (bits == 8) {
        const uint8_t* q = w + s * 64;
        for (int j = 0; j < 4; ++j) p[j] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * j));
    } else {
        __m256i lo, hi;
        load_step4_halves(w + s * Step<4>::bytes, &lo, &hi);
        p[0] = _mm256_castsi256_si128(lo);
        p[1] = _mm256_extracti128_si256(lo, 1);
        p[2] = _mm256_castsi256_si128(hi);
        p[3] = _mm256_extracti128_si256(hi, 1);
    }
}

template <int BITS, int MR>
static void f_directN(const uint8_t* w, int64_t nsteps, const float* zpl, const float* x,
                      int64_t x_rs, float* part) {
    __m512 zp[4], a[MR][4];
    for (int j = 0; j < 4; ++j) zp[j] = _mm512_loadu_ps(zpl + 16 * j);
    for (int m = 0; m < MR; ++m)
        for (int j = 0; j < 4; ++j) a[m][j] = _mm512_setzero_ps();
    for (int64_t s = 0; s < nsteps; ++s) {
        __m128i p[4];
        step_pieces(w, BITS, s, p);
        __m512 wf[4];
        for (int j = 0; j < 4; ++j)
            wf[j] = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(p[j])), zp[j]);
        for (int m = 0; m < MR; ++m) {
            const __m512 xv = _mm512_broadcast_f32x4(_mm_loadu_ps(x + m * x_rs + 4 * s));
            for (int j = 0; j < 4; ++j) a[m][j] = _mm512_fmadd_ps(wf[j], xv, a[m][j]);
        }
    }
    alignas(64) float lanes[64];
    for (int m = 0; m < MR; ++m) {
        for (int j = 0; j < 4; ++j) _mm512_store_ps(lanes + 16 * j, a[m][j]);
        for (int r = 0; r < NR; ++r)
            part[m * NR + r] += (lanes[r * 4] + lanes[r * 4 + 1]) + (lanes[r * 4 + 2] + lanes[r * 4 + 3]);
    }
}

template <int BITS, int MR>
static void f_directN(const uint8_t* w, int64_t nsteps, const double* zpl, const double* x,
                      int64_t x_rs, double* part) {
    __m512d zp[8], a[MR][8];
    for (int j = 0; j < 8; ++j) zp[j] = _mm512_loadu_pd(zpl + 8 * j);
    for (int m = 0; m < MR; ++m)
        for (int j = 0; j < 8; ++j) a[m][j] = _mm512_setzero_pd();
    for (int64_t s = 0; s < nsteps; ++s) {
        __m128i p[4];
        step_pieces(w, BITS, s, p);
        for (int j = 0; j < 4; ++j) {
            const __m512i i32 = _mm512_cvtepu8_epi32(p[j]);
            const __m512d lo = _mm512_sub_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(i32)), zp[2 * j]);
            const __m512d hi = _mm512_sub_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(i32, 1)), zp[2 * j + 1]);
            for (int m = 0; m < MR; ++m) {
                const __m512d xv = _mm512_broadcast_f64x4(_mm256_loadu_pd(x + m * x_rs + 4 * s));
                a[m][2 * j] = _mm512_fmadd_pd(lo, xv, a[m][2 * j]);
                a[m][2 * j + 1] = _mm512_fmadd_pd(hi, xv, a[m][2 * j + 1]);
            }
        }
    }
    alignas(64) double lanes[64];
    for (int m = 0; m < MR; ++m) {
        for (int j = 0; j < 8; ++j) _mm512_store_pd(lanes + 8 * j, a[m][j]);
        for (int r = 0; r < NR; ++r)
            part[m * NR + r] += (lanes[r * 4] + lanes[r * 4 + 1]) + (lanes[r * 4 + 2] + lanes[r * 4 + 3]);
    }
}

constexpr int F_DIRECT_ROWS = 4;

template <class T>
static void f_direct(const uint8_t* w, int bits, int64_t nsteps, const T* zpl, const T* x,
                     int64_t x_rs, int mr, T* part) {
    constexpr int STEP = sizeof(T) == 4 ? 4 : 2;
    for (int m = 0; m < mr; m += STEP) {
        const int r = mr - m < STEP ? mr - m : STEP;
        const T* xm = x + m * x_rs;
        T* pm = part + m * NR;
#define QL_CASE(R)                                                             \
    case R:                                                                    \
        if (bits == 8) f_directN<8, (R > STEP ? STEP : R)>(w, nsteps, zpl, xm, x_rs, pm); \
        else f_directN<4, (R > STEP ? STEP : R)>(w, nsteps, zpl, xm, x_rs, pm);           \
        break;
        switch (r) {
            QL_CASE(1)
            QL_CASE(2)
            QL_CASE(3)
            default:
                if (bits == 8) f_directN<8, STEP>(w, nsteps, zpl, xm, x_rs, pm);
                else f_directN<4, STEP>(w, nsteps, zpl, xm, x_rs, pm);
        }
#undef QL_CASE
    }
}
static constexpr bool HAS_F_DIRECT = true;

// Float32 mode, a few rows of x, every group of a block in one pass: per group, the
// codes are converted in registers (u - zp exact in float), multiplied by x, the 4 lanes
// of each row summed with permutes, then scaled into a 16-row accumulator; bias and the
// store happen once. zp/scales for 16 rows are gathered once per group.
static inline __m512 rows16(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    const __m512 s01 = _mm512_add_ps(_mm512_permutex2var_ps(a0, ev, a1), _mm512_permutex2var_ps(a0, od, a1));
    const __m512 s23 = _mm512_add_ps(_mm512_permutex2var_ps(a2, ev, a3), _mm512_permutex2var_ps(a2, od, a3));
    return _mm512_add_ps(_mm512_permutex2var_ps(s01, ev, s23), _mm512_permutex2var_ps(s01, od, s23));
}

template <int BITS, int MR>
static void fg_directN(const uint8_t* w, int64_t nd, const uint8_t* tail64, int64_t kp,
                       int64_t sg, const Layer& L, int64_t bi, int64_t rb, const float* x,
                       int64_t x_rs, const float* xt, __m512* total) {
    const __mmask16 rmask = rb >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << rb) - 1);
    const int64_t ng = L.n_groups;
    for (int m = 0; m < MR; ++m) total[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
        // The block's panel: group g's 16 scales and zero points are contiguous, and
        // consecutive groups are next to each other. Scales rounded to float32 once, as
        // ref.dequantize_rows does for float32 x.
        const int64_t pi = panel(L, bi, g);
        const __m512i z16 = L.zpu ? _mm512_maskz_loadu_epi32(rmask, L.zpu + pi)
                                  : _mm512_set1_epi32(L.zp_uniform);
        const __m512 sc = _mm512_maskz_loadu_ps(rmask, L.scales32 + pi);
        // A code u becomes the float 2^23 + u by OR-ing it under the exponent bits of
        // 2^23 (an integer op instead of a conversion); subtracting 2^23 + zp is exact.
        const __m512i magic = _mm512_set1_epi32(0x4B000000);
        __m512 a[MR][4];
        for (int m = 0; m < MR; ++m)
            for (int j = 0; j < 4; ++j) a[m][j] = _mm512_setzero_ps();
        const int64_t sa = g * sg, sb = sa + sg < kp ? sa + sg : kp;
        {
            // Lanes = the 16 rows, one vector per column kk of the step: byte kk of each
            // 32-bit lane taken out by a shift and masked under 2^23's exponent (no
            // shuffles, no conversion). int8 steps are read as they are; int4 steps two
            // at a time through load_pair4, which gives them in the int8 step order.
            // Lane r of a[m][kk] accumulates row r's products of columns 4s + kk, then
            // (k0+k1)+(k2+k3).
            const __m512 zr = _mm512_add_ps(_mm512_cvtepi32_ps(z16), _mm512_set1_ps(8388608.0f));
            const __m512i lo8 = _mm512_set1_epi32(0xFF);
            auto step = [&](__m512i v, const float* xs, int64_t xrs) {
                __m512 wf[4];
                wf[0] = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(v, lo8, magic, 0xEA));
                wf[1] = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_srli_epi32(v, 8), lo8, magic, 0xEA));
                wf[2] = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_srli_epi32(v, 16), lo8, magic, 0xEA));
                wf[3] = _mm512_castsi512_ps(_mm512_or_si512(_mm512_srli_epi32(v, 24), magic));
                for (int j = 0; j < 4; ++j) wf[j] = _mm512_sub_ps(wf[j], zr);
                for (int m = 0; m < MR; ++m)
                    for (int j = 0; j < 4; ++j)
                        a[m][j] = _mm512_fmadd_ps(wf[j], _mm512_set1_ps(xs[m * xrs + j]), a[m][j]);
            };
            int64_t s = sa;
            if (BITS == 4) {
                const int64_t pe = sb < nd ? sb : nd;
                for (; s + 2 <= pe; s += 2) {
                    __m512i v0, v1;
                    load_pair4(w + s * 32, &v0, &v1);
                    step(v0, x + 4 * s, x_rs);
                    step(v1, x + 4 * s + 4, x_rs);
                }
            }
            for (; s < sb; ++s) {
                if (s < nd) step(BITS == 8 ? _mm512_loadu_si512(w + s * 64) : load_step4(w + s * 32), x + 4 * s, x_rs);
                else step(_mm512_loadu_si512(tail64), xt, 4);
            }
            for (int m = 0; m < MR; ++m)
                total[m] = _mm512_fmadd_ps(_mm512_add_ps(_mm512_add_ps(a[m][0], a[m][1]),
                                                         _mm512_add_ps(a[m][2], a[m][3])),
                                           sc, total[m]);
        }
    }
}

// y[m, o0 + r] = total + bias for r < rb; returns false if this kernel does not apply.
static bool f_block_direct(const uint8_t* w, int bits, int64_t nd, const uint8_t* tail64,
                           int64_t kp, int64_t sg, const Layer& L, int64_t bi,
                           const double* bias, int64_t rb,
                           const float* x, int64_t x_rs, const float* xt, int mr, float* y,
                           int64_t y_rs) {
    const __mmask16 rmask = rb >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << rb) - 1);
    __m512 bv = _mm512_setzero_ps();
    if (bias) {
        bv = _mm512_insertf32x8(
            _mm512_castps256_ps512(_mm512_cvtpd_ps(_mm512_maskz_loadu_pd(__mmask8(rmask), bias))),
            _mm512_cvtpd_ps(_mm512_maskz_loadu_pd(__mmask8(rmask >> 8), bias + 8)), 1);
    }
    for (int m = 0; m < mr; m += 4) {
        const int r = mr - m < 4 ? mr - m : 4;
        __m512 total[4];
        const float* xm = x + m * x_rs;
        const float* xtm = xt + m * 4;
#define QL_CALL(R)                                                                             \
    if (bits == 8) fg_directN<8, R>(w, nd, tail64, kp, sg, L, bi, rb, xm, x_rs, xtm, total); \
    else fg_directN<4, R>(w, nd, tail64, kp, sg, L, bi, rb, xm, x_rs, xtm, total);
        switch (r) {
            case 1: QL_CALL(1) break;
            case 2: QL_CALL(2) break;
            case 3: QL_CALL(3) break;
            default: QL_CALL(4) break;
        }
#undef QL_CALL
        for (int i = 0; i < r; ++i)
            _mm512_mask_storeu_ps(y + (m + i) * y_rs, rmask, _mm512_add_ps(total[i], bv));
    }
    return true;
}
static constexpr bool HAS_F_BLOCK_DIRECT = true;
constexpr int F_BLOCK_DIRECT_ROWS = 16;

// Float: 64 lanes per step = 4 zmm (float) or 8 zmm (double); lane r*4+kk.
static inline void reduce_rows(const float* lanes, float* part) {
    for (int r = 0; r < NR; ++r)
        part[r] += (lanes[r * 4] + lanes[r * 4 + 1]) + (lanes[r * 4 + 2] + lanes[r * 4 + 3]);
}
static inline void reduce_rows(const double* lanes, double* part) {
    for (int r = 0; r < NR; ++r)
        part[r] += (lanes[r * 4] + lanes[r * 4 + 1]) + (lanes[r * 4 + 2] + lanes[r * 4 + 3]);
}

template <int MR>
static void f_microN(const float* wbuf, int64_t nsteps, const float* x, int64_t x_rs,
                     float* part) {
    __m512 a[MR][4];
    for (int m = 0; m < MR; ++m)
        for (int j = 0; j < 4; ++j) a[m][j] = _mm512_setzero_ps();
    for (int64_t s = 0; s < nsteps; ++s) {
        const float* ws = wbuf + s * 64;
        const __m512 w0 = _mm512_loadu_ps(ws), w1 = _mm512_loadu_ps(ws + 16);
        const __m512 w2 = _mm512_loadu_ps(ws + 32), w3 = _mm512_loadu_ps(ws + 48);
        for (int m = 0; m < MR; ++m) {
            const __m512 xv = _mm512_broadcast_f32x4(_mm_loadu_ps(x + m * x_rs + 4 * s));
            a[m][0] = _mm512_fmadd_ps(w0, xv, a[m][0]);
            a[m][1] = _mm512_fmadd_ps(w1, xv, a[m][1]);
            a[m][2] = _mm512_fmadd_ps(w2, xv, a[m][2]);
            a[m][3] = _mm512_fmadd_ps(w3, xv, a[m][3]);
        }
    }
    for (int m = 0; m < MR; ++m) {
        const __m512 r = rows16(a[m][0], a[m][1], a[m][2], a[m][3]);
        _mm512_storeu_ps(part + m * NR, _mm512_add_ps(_mm512_loadu_ps(part + m * NR), r));
    }
}

template <int MR>
static void f_microN(const double* wbuf, int64_t nsteps, const double* x, int64_t x_rs,
                     double* part) {
    __m512d a[MR][8];
    for (int m = 0; m < MR; ++m)
        for (int j = 0; j < 8; ++j) a[m][j] = _mm512_setzero_pd();
    for (int64_t s = 0; s < nsteps; ++s) {
        const double* ws = wbuf + s * 64;
        __m512d wv[8];
        for (int j = 0; j < 8; ++j) wv[j] = _mm512_loadu_pd(ws + 8 * j);
        for (int m = 0; m < MR; ++m) {
            const __m512d xv = _mm512_broadcast_f64x4(_mm256_loadu_pd(x + m * x_rs + 4 * s));
            for (int j = 0; j < 8; ++j) a[m][j] = _mm512_fmadd_pd(wv[j], xv, a[m][j]);
        }
    }
    alignas(64) double lanes[64];
    for (int m = 0; m < MR; ++m) {
        for (int j = 0; j < 8; ++j) _mm512_store_pd(lanes + 8 * j, a[m][j]);
        reduce_rows(lanes, part + m * NR);
    }
}

template <class T>
static void f_micro(const T* wbuf, int64_t nsteps, const T* x, int64_t x_rs, int mr, T* part) {
    constexpr int STEP = sizeof(T) == 4 ? 6 : 2;
    int m = 0;
    for (; m + STEP <= mr; m += STEP) f_microN<STEP>(wbuf, nsteps, x + m * x_rs, x_rs, part + m * NR);
    for (; m < mr; ++m) f_microN<1>(wbuf, nsteps, x + m * x_rs, x_rs, part + m * NR);
}

}  // namespace avx512
}  // namespace qlinear

#include "amx_tiles.h"
#include "kernels_impl.h"

namespace qlinear {
namespace avx512 {
const KernelTable table = {"avx512", &linear_float, &linear_int8act, &softmax_rows, &swiglu_rows, &rope_rows};
// The same kernels, int8 mode on AMX tiles from AMX_ROWS rows (CPUs with AMX-INT8).
const KernelTable amx_table = {"amx", &linear_float, &linear_int8act_tiles, &softmax_rows, &swiglu_rows, &rope_rows};
}  // namespace avx512
}  // namespace qlinear

namespace qlinear {
namespace avx512 {
template <int BITS>
static void i_micro4_b(const uint8_t* const* w, int64_t nsteps, const int8_t* xq, int64_t xq_rs,
                       int mr, int32_t* const* acc) {
    for (int m = 0; m < mr; m += 6) {
        int32_t* am[4] = {acc[0] + m * NR, acc[1] + m * NR, acc[2] + m * NR, acc[3] + m * NR};
        const int8_t* xm = xq + m * xq_rs;
        switch (mr - m) {
            case 1: i_micro4_r<BITS, 1>(w, nsteps, xm, xq_rs, am); break;
            case 2: i_micro4_r<BITS, 2>(w, nsteps, xm, xq_rs, am); break;
            case 3: i_micro4_r<BITS, 3>(w, nsteps, xm, xq_rs, am); break;
            case 4: i_micro4_r<BITS, 4>(w, nsteps, xm, xq_rs, am); break;
            case 5: i_micro4_r<BITS, 5>(w, nsteps, xm, xq_rs, am); break;
            default: i_micro4_r<BITS, 6>(w, nsteps, xm, xq_rs, am); break;
        }
    }
}

static void i4_micro4_b(const uint8_t* const* w, int64_t nsteps, const int8_t* xq, int64_t xq_rs,
                        int mr, int32_t* const* acc) {
    for (int m = 0; m < mr; m += 6) {
        int32_t* am[4] = {acc[0] + m * NR, acc[1] + m * NR, acc[2] + m * NR, acc[3] + m * NR};
        const int8_t* xm = xq + m * xq_rs;
        switch (mr - m) {
            case 1: i4_micro4_r<1>(w, nsteps, xm, xq_rs, am); break;
            case 2: i4_micro4_r<2>(w, nsteps, xm, xq_rs, am); break;
            case 3: i4_micro4_r<3>(w, nsteps, xm, xq_rs, am); break;
            case 4: i4_micro4_r<4>(w, nsteps, xm, xq_rs, am); break;
            case 5: i4_micro4_r<5>(w, nsteps, xm, xq_rs, am); break;
            default: i4_micro4_r<6>(w, nsteps, xm, xq_rs, am); break;
        }
    }
}

static inline void i_micro4(const uint8_t* const* w, int bits, int64_t nsteps, const int8_t* xq,
                            int64_t xq_rs, int mr, int32_t* const* acc) {
    if (bits == 8) i_micro4_b<8>(w, nsteps, xq, xq_rs, mr, acc);
    else i4_micro4_b(w, nsteps, xq, xq_rs, mr, acc);
}
}  // namespace avx512
}  // namespace qlinear
