// Canonical <-> packed layout conversion (the packed layout: layout.h).
#include "common.h"

namespace qlinear {

namespace {

// Stored (unsigned) code of canonical row o, column k.
inline uint8_t canon_u(int bits, const uint8_t* canon, int64_t row_bytes, int64_t o, int64_t k) {
    if (bits == 8) return static_cast<uint8_t>(canon[o * row_bytes + k] ^ 0x80u);
    const uint8_t b = canon[o * row_bytes + k / 2];
    return (k & 1) ? static_cast<uint8_t>(b >> 4) : static_cast<uint8_t>(b & 0x0F);
}

}  // namespace

void pack_weights(int bits, const uint8_t* canon, int64_t out, int64_t in, uint8_t* dst) {
    const int64_t k4 = in / 4, t = in % 4;
    const int64_t row_bytes = bits == 8 ? in : (in + 1) / 2;
    const int64_t full = block_bytes(bits, NR, in);
    for (int64_t o0 = 0; o0 < out; o0 += NR) {
        const int64_t rb = (out - o0) < NR ? (out - o0) : NR;
        uint8_t* blk = dst + (o0 / NR) * full;
        const int64_t bb = block_bytes(bits, rb, in);
        for (int64_t i = 0; i < bb; ++i) blk[i] = 0;
        for (int64_t r = 0; r < rb; ++r) {
            for (int64_t k = 0; k < in; ++k) {
                const uint8_t u = canon_u(bits, canon, row_bytes, o0 + r, k);
                const int64_t s = k / 4;
                if (bits == 8) {
                    if (s < k4) blk[s * rb * 4 + r * 4 + (k & 3)] = u;
                    else blk[k4 * rb * 4 + r * t + (k - 4 * k4)] = u;
                } else {
                    int64_t byte;
                    int high;
                    uint8_t* base;
                    if (s < k4) {
                        nibble_pos(r * 4 + (k & 3), rb * 4, &byte, &high);
                        base = blk + s * rb * 2;
                    } else {
                        nibble_pos(r * t + (k - 4 * k4), rb * t, &byte, &high);
                        base = blk + k4 * rb * 2;
                    }
                    base[byte] = static_cast<uint8_t>(base[byte] | (high ? (u << 4) : u));
                }
            }
        }
    }
}

void unpack_weights(int bits, const uint8_t* src, int64_t out, int64_t in, uint8_t* canon) {
    const int64_t row_bytes = bits == 8 ? in : (in + 1) / 2;
    for (int64_t i = 0; i < out * row_bytes; ++i) canon[i] = 0;
    const int64_t full = block_bytes(bits, NR, in);
    const int64_t kp = (in + 3) / 4;
    uint8_t step[64];
    for (int64_t o0 = 0; o0 < out; o0 += NR) {
        const int64_t rb = (out - o0) < NR ? (out - o0) : NR;
        const uint8_t* blk = src + (o0 / NR) * full;
        for (int64_t s = 0; s < kp; ++s) {
            decode_step(bits, blk, rb, in, s, step);
            for (int64_t r = 0; r < rb; ++r) {
                for (int64_t kk = 0; kk < 4 && 4 * s + kk < in; ++kk) {
                    const int64_t k = 4 * s + kk;
                    const uint8_t u = step[r * 4 + kk];
                    if (bits == 8) {
                        canon[(o0 + r) * row_bytes + k] = static_cast<uint8_t>(u ^ 0x80u);
                    } else {
                        uint8_t& b = canon[(o0 + r) * row_bytes + k / 2];
                        b = static_cast<uint8_t>(b | ((k & 1) ? (u << 4) : u));
                    }
                }
            }
        }
    }
}

void decode_step(int bits, const uint8_t* blk, int64_t rb, int64_t in, int64_t s,
                 uint8_t* out64) {
    const int64_t k4 = in / 4, t = in % 4;
    for (int i = 0; i < 64; ++i) out64[i] = 0;
    const int64_t width = s < k4 ? 4 : t;
    for (int64_t r = 0; r < rb; ++r) {
        for (int64_t j = 0; j < width; ++j) {
            uint8_t u;
            if (bits == 8) {
                u = s < k4 ? blk[s * rb * 4 + r * 4 + j] : blk[k4 * rb * 4 + r * t + j];
            } else {
                int64_t byte;
                int high;
                const uint8_t* base;
                if (s < k4) {
                    nibble_pos(r * 4 + j, rb * 4, &byte, &high);
                    base = blk + s * rb * 2;
                } else {
                    nibble_pos(r * t + j, rb * t, &byte, &high);
                    base = blk + k4 * rb * 2;
                }
                u = high ? static_cast<uint8_t>(base[byte] >> 4)
                         : static_cast<uint8_t>(base[byte] & 0x0F);
            }
            out64[r * 4 + j] = u;
        }
    }
}

}  // namespace qlinear
