// The scalar int8-mode epilogue and row quantizer shared by the portable and AVX2
// kernels (included inside their ISA namespace, after micro_compose.h; the AVX-512 file
// has vector versions of its own).
#pragma once

// One group's epilogue for one row of x and one block (the scalar version), in float32
// as ref.linear_int8act specifies for several groups:
// ad[r] (+)= float(a[r] - zpv[r] * rs) * sv[r], ad starting at +0.0f when `first`. The
// int32 difference is exact (see int8_driver.h).
static inline void group_epilogue(const int32_t* a, const int32_t* zpv, int32_t rs,
                                  const float* sv, float* ad, bool first) {
    if (first) {
        for (int r = 0; r < NR; ++r) ad[r] = 0.0f + static_cast<float>(a[r] - zpv[r] * rs) * sv[r];
    } else {
        for (int r = 0; r < NR; ++r) ad[r] += static_cast<float>(a[r] - zpv[r] * rs) * sv[r];
    }
}

template <class T>
inline void quantize_row_isa(const T* x, int64_t in, int64_t kpad, int64_t gs, int64_t ng,
                             int8_t* q, double* sx, int32_t* rs) {
    quantize_row<T>(x, in, kpad, gs, ng, q, sx, rs);
}
