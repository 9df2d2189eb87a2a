// The packed weight layout shared by every native backend: built by pack.cpp, read by
// every micro-kernel. This header is its one owner.
//
// Output rows are cut into blocks of NR = 16 (the last block may have rb < 16 rows);
// block b starts at byte b * block_bytes(bits, NR, in). Inside a block of rb rows, with
// K4 = in / KS full steps of KS = 4 input columns and t = in % 4 tail columns:
//   int8: step s (s < K4) is rb*4 bytes; byte r*4 + kk holds u = code + 128 of row r,
//         column 4s + kk (u unsigned: the u8 operand of vpdpbusd); then the tail, rb*t
//         bytes, byte r*t + j = column 4*K4 + j.
//   int4: step s is rb*2 bytes holding the rb*4 nibbles e = r*4 + kk: nibble e lives in
//         byte e % h, the high half when e >= h (h = rb*2 for a step, so a full step is 32
//         bytes whose low nibbles are elements 0..31 and high nibbles 32..63: one AND and
//         one shift unpack it); then the tail, ceil(rb*t / 2) bytes, element e = r*t + j
//         in byte e % h, high when e >= h (h = ceil(rb*t / 2)). Nibbles are the stored
//         values 0..15 (code + storage offset).
// Total: exactly out*in bytes (int8); int4 blocks take rb*2*K4 + ceil(rb*t/2) bytes,
// ceil(out*in/2) in all (no per-row padding).
#pragma once
#include <cstddef>
#include <cstdint>

namespace qlinear {

constexpr int NR = 16;  // output rows per block (the 32-bit lanes of one zmm)
constexpr int KS = 4;   // input columns per step (the 4 bytes one vpdpbusd lane sums)

// One full step of a full block: NR * KS codes, the operand of one vpdpbusd.
template <int BITS>
struct Step {
    static_assert(BITS == 8 || BITS == 4, "codes are int8 or int4");
    static constexpr int codes = NR * KS;
    static constexpr int bytes = BITS == 8 ? codes : codes / 2;
    // Code index of row r, column kk of the step.
    static constexpr int index(int r, int kk) { return r * KS + kk; }
    // int4: byte and half holding code index e (low nibbles first, then high).
    static constexpr int byte_of(int e) { return BITS == 8 ? e : e % bytes; }
    static constexpr bool high(int e) { return BITS == 4 && e >= bytes; }
};
static_assert(Step<8>::codes == 64 && Step<8>::bytes == 64, "an int8 step is one zmm");
static_assert(Step<4>::bytes == 32, "an int4 step is one ymm of nibbles");
static_assert(Step<4>::byte_of(33) == 1 && Step<4>::high(33) && !Step<4>::high(31),
              "int4 step: codes 0..31 in the low nibbles, 32..63 in the high ones");

inline int64_t step_bytes(int bits) { return bits == 8 ? Step<8>::bytes : Step<4>::bytes; }

// Byte and half of element e of a run of `count` int4 elements (a step of a partial
// block, or a tail).
inline void nibble_pos(int64_t e, int64_t count, int64_t* byte, int* high) {
    const int64_t h = (count + 1) / 2;
    *byte = e % h;
    *high = e >= h;
}

// The one scalar unpacking of a full int4 step: 32 bytes -> 64 codes, in step order.
inline void unpack_step4(const uint8_t* p, uint8_t* u) {
    for (int i = 0; i < Step<4>::bytes; ++i) {
        u[i] = p[i] & 0x0F;
        u[Step<4>::bytes + i] = p[i] >> 4;
    }
}

// Codes of a full step as u8, whatever the bits (int8: the bytes themselves).
inline const uint8_t* step_codes(const uint8_t* w, int bits, int64_t s, uint8_t* buf64) {
    if (bits == 8) return w + s * Step<8>::bytes;
    unpack_step4(w + s * Step<4>::bytes, buf64);
    return buf64;
}

inline int64_t block_bytes(int bits, int64_t rb, int64_t in) {
    const int64_t k4 = in / KS, t = in % KS;
    if (bits == 8) return rb * in;
    return rb * 2 * k4 + (rb * t + 1) / 2;
}

inline int64_t packed_bytes(int bits, int64_t out, int64_t in) {
    const int64_t nfull = out / NR, rem = out % NR;
    return nfull * block_bytes(bits, NR, in) + (rem ? block_bytes(bits, rem, in) : 0);
}

}  // namespace qlinear
