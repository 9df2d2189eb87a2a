// The entry points of one ISA's kernel table, over the two drivers (int8_driver.h,
// float_driver.h). Each ISA file defines, inside namespace qlinear::QL_ISA, before
// including this header:
//   constexpr int MR_I, MR_F;                        // rows of x per micro-kernel call
//   void i_micro(const uint8_t* w, int bits, int64_t nsteps, const int8_t* xq,
//                int64_t xq_rs, int mr, int32_t* acc);
//       acc[m*16 + r] += sum over steps s, kk of u[s][r*4+kk] * xq[m*xq_rs + 4s + kk]
//       (u: unsigned codes of a full 16-row block, 64 bytes per step for bits == 8,
//        32 bytes of nibbles for bits == 4; exact int32 arithmetic)
//   template <class T> void f_micro(const T* wbuf, int64_t nsteps, const T* x,
//                                   int64_t x_rs, int mr, T* part);
//       part[m*16 + r] += sum over s, kk of wbuf[s*64 + r*4 + kk] * x[m*x_rs + 4s + kk]
// The drivers below split the work into tasks (blocks of 16 output rows x chunks of
// rows of x). Every output element is computed by one task, in an order that does not
// depend on the task split, so results do not depend on the thread count.
#pragma once
#include "float_driver.h"
#include "int8_driver.h"
#include "runner_ops.h"

namespace qlinear {
namespace QL_ISA {

inline bool linear_float(const Layer& L, const Call& C) {
    if (C.f64) return linear_float_t<double>(L, C);
    return linear_float_t<float>(L, C);
}

inline bool linear_int8act(const Layer& L, const Call& C) {
    if (C.f64) return linear_int8act_t<double>(L, C, false);
    return linear_int8act_t<float>(L, C, false);
}

// The same with the ISA's AMX tiles for tasks of enough rows (only the `amx` table).
inline bool linear_int8act_tiles(const Layer& L, const Call& C) {
    if (C.f64) return linear_int8act_t<double>(L, C, true);
    return linear_int8act_t<float>(L, C, true);
}

}  // namespace QL_ISA
}  // namespace qlinear
