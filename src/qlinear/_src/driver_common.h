// What the int8 and float drivers share: the block view over the packed layout, the
// group/step arithmetic and the thread decision. Included inside an ISA's namespace by
// kernels_impl.h.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
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

// Whether y[r][c] is finite for rows [r0, r1), columns [c0, c1) (row stride ld): a
// task's check of what it just wrote, while it is in cache (the one output check of a
// native forward: an overflow of x's dtype shows as Inf or NaN).
template <class T>
inline bool block_finite(const T* y, int64_t ld, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
    constexpr U EXP = sizeof(T) == 4 ? U(0x7f800000u) : U(0x7ff0000000000000ull);
    U bad = 0;
    for (int64_t r = r0; r < r1; ++r) {
        const T* yr = y + r * ld;
        for (int64_t c = c0; c < c1; ++c) {
            U b;
            std::memcpy(&b, yr + c, sizeof b);
            bad |= (b & EXP) == EXP;
        }
    }
    return bad == 0;
}

inline int pick_threads(const Layer& L, const Call& C) {
    const double work = static_cast<double>(C.n) * L.out * L.in;
    return work < (1 << 20) ? 1 : std::max(1, C.threads);
}

}  // namespace QL_ISA
}  // namespace qlinear
