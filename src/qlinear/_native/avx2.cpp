// AVX2 + FMA kernels. Compiled with -mavx2 -mfma; only called after cpu_has_avx2().
// Integer products use vpmaddwd on zero-extended codes and sign-extended activations
// (exact; vpmaddubsw could saturate on 255 * 127 pairs).
#include <immintrin.h>

#include <cstring>

#include "common.h"

#define QL_ISA avx2

namespace qlinear {
namespace avx2 {

constexpr int MR_I = 4;
constexpr int MR_F = 4;

// Codes of one step as 4 vectors of 16 int16 (rows 4j..4j+3 x 4 columns).
template <int BITS>
static inline void load_step16(const uint8_t* w, int64_t s, __m256i* out) {
    if (BITS == 8) {
        const uint8_t* p = w + s * 64;
        for (int j = 0; j < 4; ++j)
            out[j] = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * j)));
    } else {
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + s * 32));
        const __m256i mask = _mm256_set1_epi8(0x0F);
        const __m256i lo = _mm256_and_si256(b, mask);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
        out[0] = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(lo));
        out[1] = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(lo, 1));
        out[2] = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(hi));
        out[3] = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(hi, 1));
    }
}

static inline __m256i xpat16(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    const __m128i x16 = _mm_cvtepi8_epi16(_mm_cvtsi32_si128(v));
    return _mm256_broadcastq_epi64(x16);
}

template <int BITS, int MR>
static void i_microN(const uint8_t* w, int64_t nsteps, const int8_t* xq, int64_t xq_rs,
                     int32_t* acc) {
    __m256i a[MR][4];
    for (int m = 0; m < MR; ++m)
        for (int j = 0; j < 4; ++j) a[m][j] = _mm256_setzero_si256();
    for (int64_t s = 0; s < nsteps; ++s) {
        __m256i wv[4];
        load_step16<BITS>(w, s, wv);
        for (int m = 0; m < MR; ++m) {
            const __m256i xp = xpat16(xq + m * xq_rs + 4 * s);
            for (int j = 0; j < 4; ++j)
                a[m][j] = _mm256_add_epi32(a[m][j], _mm256_madd_epi16(wv[j], xp));
        }
    }
    alignas(32) int32_t lanes[32];
    for (int m = 0; m < MR; ++m) {
        for (int j = 0; j < 4; ++j)
            _mm256_store_si256(reinterpret_cast<__m256i*>(lanes + 8 * j), a[m][j]);
        for (int r = 0; r < NR; ++r) acc[m * NR + r] += lanes[2 * r] + lanes[2 * r + 1];
    }
}

static inline void i_micro(const uint8_t* w, int bits, int64_t nsteps, const int8_t* xq,
                           int64_t xq_rs, int mr, int32_t* acc) {
    int m = 0;
    for (; m + 2 <= mr; m += 2) {
        if (bits == 8) i_microN<8, 2>(w, nsteps, xq + m * xq_rs, xq_rs, acc + m * NR);
        else i_microN<4, 2>(w, nsteps, xq + m * xq_rs, xq_rs, acc + m * NR);
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

inline void i_micro2(const uint8_t* w0, const uint8_t* w1, int bits, int64_t nsteps,
                     const int8_t* xq, int64_t xq_rs, int mr, int32_t* acc0, int32_t* acc1) {
    i_micro(w0, bits, nsteps, xq, xq_rs, mr, acc0);
    i_micro(w1, bits, nsteps, xq, xq_rs, mr, acc1);
}

inline void i_micro4(const uint8_t* const* w, int bits, int64_t nsteps, const int8_t* xq,
                     int64_t xq_rs, int mr, int32_t* const* acc) {
    for (int b = 0; b < 4; ++b) i_micro(w[b], bits, nsteps, xq, xq_rs, mr, acc[b]);
}

}  // namespace avx2
}  // namespace qlinear

#include "kernels_impl.h"

namespace qlinear {
namespace avx2 {
const KernelTable table = {"avx2", &linear_float, &linear_int8act};
}  // namespace avx2
}  // namespace qlinear
