// Portable kernels: plain C++, no ISA flags beyond the compiler's baseline.
#include "common.h"
#include "quantize_row.h"

#define QL_ISA generic

namespace qlinear {
namespace generic {

constexpr int MR_I = 4;
constexpr int MR_F = 4;

inline void i_micro(const uint8_t* w, int bits, int64_t nsteps, const int8_t* xq, int64_t xq_rs,
                    int mr, int32_t* acc) {
    uint8_t u[64];
    for (int64_t s = 0; s < nsteps; ++s) {
        const uint8_t* us = step_codes(w, bits, s, u);
        for (int m = 0; m < mr; ++m) {
            const int8_t* xs = xq + m * xq_rs + 4 * s;
            for (int r = 0; r < NR; ++r) {
                int32_t a = 0;
                for (int kk = 0; kk < 4; ++kk) a += int32_t(us[r * 4 + kk]) * int32_t(xs[kk]);
                acc[m * NR + r] += a;
            }
        }
    }
}

template <class T>
void f_micro(const T* wbuf, int64_t nsteps, const T* x, int64_t x_rs, int mr, T* part) {
    for (int m = 0; m < mr; ++m) {
        T lanes[64] = {};
        const T* xm = x + m * x_rs;
        for (int64_t s = 0; s < nsteps; ++s) {
            const T* ws = wbuf + s * 64;
            const T* xs = xm + 4 * s;
            for (int i = 0; i < 64; ++i) lanes[i] += ws[i] * xs[i & 3];
        }
        for (int r = 0; r < NR; ++r)
            part[m * NR + r] += (lanes[r * 4] + lanes[r * 4 + 1]) + (lanes[r * 4 + 2] + lanes[r * 4 + 3]);
    }
}

#include "micro_compose.h"
#include "no_direct_float.h"

#include "scalar_epilogue.h"

}  // namespace generic
}  // namespace qlinear

#include "kernels_impl.h"

namespace qlinear {
namespace generic {
const KernelTable table = {"portable", &linear_float, &linear_int8act, &softmax_rows, &swiglu_rows, &rope_rows};
}  // namespace generic
}  // namespace qlinear
