// AVX2 + FMA kernels. Compiled with -mavx2 -mfma; only called after cpu_has_avx2().
// Integer products: vpmaddubsw on |w| and sign-adjusted activations (exact), vpmaddwd to
// 32 bits.
#include <immintrin.h>

#include <cstring>

#include "common.h"
#include "quantize_row.h"

#define QL_ISA avx2

namespace qlinear {
namespace avx2 {

constexpr int MR_I = 8;
constexpr int MR_F = 4;

// One int4 step (32 bytes, layout.h) as its two halves of codes: 0..31 and 32..63.
static inline void load_step4(const uint8_t* p, __m256i* lo, __m256i* hi) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    *lo = _mm256_and_si256(b, mask);
    *hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
}

// int8: stored u = w + 128; vpmaddubsw(|w|, sign(x, w)) gives w*x pairs exactly
// (|pair| <= 2 * 128 * 127 < 2^15), then sum u*x = sum w*x + 128 * sum x.
// int4: the nibble u (0..15) is the unsigned operand directly (pairs <= 2 * 15 * 127).
template <int BITS, int MR>
static void i_microN(const uint8_t* w, int64_t nsteps, const int8_t* xq, int64_t xq_rs,
                     int32_t* acc) {
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
    __m256i a[MR][2];
    for (int m = 0; m < MR; ++m) {
        a[m][0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + m * NR));
        a[m][1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + m * NR + 8));
    }
    for (int64_t s = 0; s < nsteps; ++s) {
        __m256i v[2], av[2];
        if (BITS == 8) {
            v[0] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + s * 64)), flip);
            v[1] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + s * 64 + 32)), flip);
            av[0] = _mm256_abs_epi8(v[0]);
            av[1] = _mm256_abs_epi8(v[1]);
        } else {
            load_step4(w + s * Step<4>::bytes, &av[0], &av[1]);
        }
        for (int m = 0; m < MR; ++m) {
            int32_t xv;
            std::memcpy(&xv, xq + m * xq_rs + 4 * s, 4);
            const __m256i xb = _mm256_set1_epi32(xv);
            for (int h = 0; h < 2; ++h) {
                const __m256i xs = BITS == 8 ? _mm256_sign_epi8(xb, v[h]) : xb;
                const __m256i p = _mm256_maddubs_epi16(av[h], xs);
                a[m][h] = _mm256_add_epi32(a[m][h], _mm256_madd_epi16(p, ones));
            }
        }
    }
    for (int m = 0; m < MR; ++m) {
        if (BITS == 8) {
            int32_t sx = 0;
            const int8_t* xm = xq + m * xq_rs;
            for (int64_t k = 0; k < 4 * nsteps; ++k) sx += xm[k];
            const __m256i corr = _mm256_set1_epi32(128 * sx);
            a[m][0] = _mm256_add_epi32(a[m][0], corr);
            a[m][1] = _mm256_add_epi32(a[m][1], corr);
        }
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + m * NR), a[m][0]);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + m * NR + 8), a[m][1]);
    }
}

static inline void i_micro(const uint8_t* w, int bits, int64_t nsteps, const int8_t* xq,
                           int64_t xq_rs, int mr, int32_t* acc) {
    int m = 0;
    for (; m + 4 <= mr; m += 4) {
        if (bits == 8) i_microN<8, 4>(w, nsteps, xq + m * xq_rs, xq_rs, acc + m * NR);
        else i_microN<4, 4>(w, nsteps, xq + m * xq_rs, xq_rs, acc + m * NR);
    }
    for (; m < mr; ++m) {
        if (bits == 8) i_microN<8, 1>(w, nsteps, xq + m * xq_rs, xq_rs, acc + m * NR);
        else i_microN<4, 1>(w, nsteps, xq + m * xq_rs, xq_rs, acc + m * NR);
    }
}

// Float: one pass covers 4 vectors of lanes (32 float lanes = 8 rows, or 16 double
// lanes = 4 rows) for up to 2 rows of x.
static inline __m256 xbcast(const float* p) {
    return _mm256_broadcast_ps(reinterpret_cast<const __m128*>(p));
}
static inline __m256d xbcast(const double* p) { return _mm256_loadu_pd(p); }
static inline __m256 vzero(float) { return _mm256_setzero_ps(); }
static inline __m256d vzero(double) { return _mm256_setzero_pd(); }
static inline __m256 vload(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256d vload(const double* p) { return _mm256_loadu_pd(p); }
static inline __m256 vfma(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
static inline __m256d vfma(__m256d a, __m256d b, __m256d c) { return _mm256_fmadd_pd(a, b, c); }
static inline void vstore(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
static inline void vstore(double* p, __m256d v) { _mm256_storeu_pd(p, v); }

template <class T, int MR>
static void f_pass(const T* wbuf, int64_t nsteps, const T* x, int64_t x_rs, int lane0, T* part) {
    using V = decltype(vzero(T()));
    constexpr int W = 32 / sizeof(T);  // lanes per vector
    V a[MR][4];
    for (int m = 0; m < MR; ++m)
        for (int j = 0; j < 4; ++j) a[m][j] = vzero(T());
    for (int64_t s = 0; s < nsteps; ++s) {
        const T* ws = wbuf + s * 64 + lane0;
        V wv[4];
        for (int j = 0; j < 4; ++j) wv[j] = vload(ws + W * j);
        for (int m = 0; m < MR; ++m) {
            const V xv = xbcast(x + m * x_rs + 4 * s);
            for (int j = 0; j < 4; ++j) a[m][j] = vfma(wv[j], xv, a[m][j]);
        }
    }
    T lanes[4 * W];
    for (int m = 0; m < MR; ++m) {
        for (int j = 0; j < 4; ++j) vstore(lanes + W * j, a[m][j]);
        for (int q = 0; q < W; ++q) {
            const int r = (lane0 / 4) + q;
            part[m * NR + r] += (lanes[q * 4] + lanes[q * 4 + 1]) + (lanes[q * 4 + 2] + lanes[q * 4 + 3]);
        }
    }
}

template <class T>
static void f_micro(const T* wbuf, int64_t nsteps, const T* x, int64_t x_rs, int mr, T* part) {
    constexpr int LP = 4 * (32 / sizeof(T));  // lanes per pass
    for (int lane0 = 0; lane0 < 64; lane0 += LP) {
        int m = 0;
        for (; m + 2 <= mr; m += 2)
            f_pass<T, 2>(wbuf, nsteps, x + m * x_rs, x_rs, lane0, part + m * NR);
        for (; m < mr; ++m) f_pass<T, 1>(wbuf, nsteps, x + m * x_rs, x_rs, lane0, part + m * NR);
    }
}

#include "micro_compose.h"
#include "no_direct_float.h"

#include "scalar_epilogue.h"

}  // namespace avx2
}  // namespace qlinear

#include "kernels_impl.h"

namespace qlinear {
namespace avx2 {
const KernelTable table = {"avx2", &linear_float, &linear_int8act, &softmax_rows, &swiglu_rows, &rope_rows};
}  // namespace avx2
}  // namespace qlinear
