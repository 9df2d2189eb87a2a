// Multi-block int8 micro-kernels composed from an ISA's one-block i_micro, for the ISAs
// (generic, avx2) that have no fused 2- and 4-block kernel. Like kernels_impl.h, this file
// is included inside the ISA's namespace, after its i_micro.
#pragma once

inline void i_micro2(const uint8_t* w0, const uint8_t* w1, int bits, int64_t nsteps,
                     const int8_t* xq, int64_t xq_rs, int mr, int32_t* acc0, int32_t* acc1) {
    i_micro(w0, bits, nsteps, xq, xq_rs, mr, acc0);
    i_micro(w1, bits, nsteps, xq, xq_rs, mr, acc1);
}

inline void i_micro4(const uint8_t* const* w, int bits, int64_t nsteps, const int8_t* xq,
                     int64_t xq_rs, int mr, int32_t* const* acc) {
    for (int b = 0; b < 4; ++b) i_micro(w[b], bits, nsteps, xq, xq_rs, mr, acc[b]);
}
