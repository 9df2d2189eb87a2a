// Float32 steps of the decoder runner between its linear calls, over whole row blocks
// (qlinear.models.decoder_ops has their NumPy specifications): the attention softmax
// (softmax_rows_numpy: rows of scores, each scaled, restricted to its visible keys
// [lo, hi], the causal / sliding-window mask, normalised in place, masked entries 0),
// SwiGLU (swiglu: silu(gate) * up) and RoPE (rope.apply_rope: x cos + rotate_half(x) sin). 16-lane vector-extension code that each ISA's compiler flags turn into its
// instructions (this header is compiled inside every ISA's namespace by kernels_impl.h),
// with a polynomial exp of its own so that the vector code needs no libm call.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace qlinear {
namespace QL_ISA {

// 16 float32 lanes (GCC/Clang vector extensions: one register on AVX-512, pieces of
// SSE/AVX registers elsewhere).
typedef float F16 __attribute__((vector_size(64)));
typedef int32_t I16 __attribute__((vector_size(64)));

// exp(x) for x <= 0 in float32, lane by lane (V is float or F16): x = n ln2 + r with
// |r| <= ln2 / 2 (n rounded to nearest by the 1.5 * 2^23 trick; ln2 split in two so n ln2
// is exact), e^r from a degree-6 polynomial (relative error about 2e-7, near float32
// rounding), times 2^n built in the exponent bits; 0 below -87 (where e^x is below the
// smallest normal float).
template <class V, class I>
inline V exp_neg(V x) {
    const V n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;
    const V r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    V p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = (p * r) * r + r + 1.0f;
    I bits;
    if constexpr (sizeof(V) == sizeof(float)) bits = (static_cast<int32_t>(n) + 127) << 23;
    else bits = (__builtin_convertvector(n, I) + 127) << 23;
    V two_n;
    std::memcpy(&two_n, &bits, sizeof two_n);
    return x < -87.0f ? V{} + 0.0f : p * two_n;
}

// exp(x) for any x: exp_neg's polynomial (2^n stays a normal float up to x = 88), +Inf
// above 88.3 (e^x then within a factor 1.5 of the float maximum; the callers divide by it).
template <class V, class I>
inline V exp_any(V x) {
    const V e = exp_neg<V, I>(x > 88.3f ? V{} + 0.0f : x);
    return x > 88.3f ? V{} + INFINITY : e;
}

inline F16 load16(const float* p) {
    F16 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
inline void store16(float* p, F16 v) { std::memcpy(p, &v, sizeof v); }

inline void softmax_task(void* p, int64_t task, int) {
    const auto& c = *static_cast<const SoftmaxCall*>(p);  // common.h
    constexpr int64_t ROWS = 8;
    const int64_t r0 = task * ROWS, r1 = std::min(c.rows, r0 + ROWS);
    for (int64_t r = r0; r < r1; ++r) {
        float* row = c.s + r * c.cols;
        const int64_t lo = c.lo[r % c.per], hi = c.hi[r % c.per], n = hi + 1 - lo;
        float* v = row + lo;
        const int64_t n16 = n / 16 * 16;
        // scaled scores, rounded to float32 as the NumPy version's `scores *= scale`
        F16 m16 = F16{} - INFINITY;
        for (int64_t j = 0; j < n16; j += 16) {
            const F16 a = load16(v + j) * c.scale;
            store16(v + j, a);
            m16 = a > m16 ? a : m16;
        }
        float m = -INFINITY;
        for (int l = 0; l < 16; ++l) m = std::max(m, m16[l]);
        for (int64_t j = n16; j < n; ++j) {
            v[j] *= c.scale;
            m = std::max(m, v[j]);
        }
        F16 s16 = F16{};
        for (int64_t j = 0; j < n16; j += 16) {
            const F16 e = exp_neg<F16, I16>(load16(v + j) - m);
            store16(v + j, e);
            s16 += e;
        }
        float sum = 0.0f;
        for (int l = 0; l < 16; ++l) sum += s16[l];
        for (int64_t j = n16; j < n; ++j) {
            v[j] = exp_neg<float, int32_t>(v[j] - m);
            sum += v[j];
        }
        // times 1 / sum (within an ulp of the specification's division, and a vector
        // division costs ten multiplications)
        const float inv = 1.0f / sum;
        for (int64_t j = 0; j < n16; j += 16) store16(v + j, load16(v + j) * inv);
        for (int64_t j = n16; j < n; ++j) v[j] *= inv;
        std::fill(row, row + lo, 0.0f);
        std::fill(row + hi + 1, row + c.cols, 0.0f);
    }
}

inline void softmax_rows(const SoftmaxCall& c, int threads) {
    const int64_t ntasks = (c.rows + 7) / 8;
    const bool small = c.rows * c.cols < (1 << 16);
    parallel_for(ntasks, small ? 1 : threads, &softmax_task, const_cast<SoftmaxCall*>(&c));
}

// out = (gate / (1 + exp(-gate))) * up, in float32 in the specification's order.
inline void swiglu_task(void* p, int64_t task, int) {
    const auto& c = *static_cast<const SwigluCall*>(p);
    constexpr int64_t ROWS = 8;
    for (int64_t r = task * ROWS; r < std::min(c.rows, task * ROWS + ROWS); ++r) {
        const float* g = c.gu + r * 2 * c.d;
        const float* u = g + c.d;
        float* o = c.out + r * c.d;
        int64_t j = 0;
        for (; j + 16 <= c.d; j += 16) {
            const F16 gv = load16(g + j);
            const F16 h = exp_any<F16, I16>(-gv) + 1.0f;
            store16(o + j, (gv / h) * load16(u + j));
        }
        for (; j < c.d; ++j) o[j] = (g[j] / (exp_any<float, int32_t>(-g[j]) + 1.0f)) * u[j];
    }
}

inline void swiglu_rows(const SwigluCall& c, int threads) {
    const bool small = c.rows * c.d < (1 << 16);
    parallel_for((c.rows + 7) / 8, small ? 1 : threads, &swiglu_task, const_cast<SwigluCall*>(&c));
}

// out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[d/2:], x[:d/2]): the
// products and the sum each rounded to float32, as the NumPy version (bit for bit).
inline void rope_task(void* p, int64_t task, int) {
    const auto& c = *static_cast<const RopeCall*>(p);
    constexpr int64_t ROWS = 8;
    const int64_t half = c.d / 2;
    for (int64_t r = task * ROWS; r < std::min(c.rows, task * ROWS + ROWS); ++r) {
        const float* cs = c.cos + (r % c.t) * c.d;
        const float* sn = c.sin + (r % c.t) * c.d;
        for (int64_t h = 0; h < c.heads; ++h) {
            const float* x = c.x + r * c.x_rs + h * c.d;
            float* o = c.out + (r * c.heads + h) * c.d;
            for (int64_t j = 0; j < half; ++j) {
                const float a = x[j] * cs[j], b = -x[j + half] * sn[j];
                o[j] = a + b;
            }
            for (int64_t j = half; j < c.d; ++j) {
                const float a = x[j] * cs[j], b = x[j - half] * sn[j];
                o[j] = a + b;
            }
        }
    }
}

inline void rope_rows(const RopeCall& c, int threads) {
    const bool small = c.rows * c.heads * c.d < (1 << 16);
    parallel_for((c.rows + 7) / 8, small ? 1 : threads, &rope_task, const_cast<RopeCall*>(&c));
}

}  // namespace QL_ISA
}  // namespace qlinear
