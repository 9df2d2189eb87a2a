// The scalar per-row activation quantization (ref.quantize_rows_int8), used by the ISAs
// without a vector version of their own (generic, avx2).
#pragma once
#include <cmath>
#include <cstdint>

namespace qlinear {

template <class T>
void quantize_row(const T* x, int64_t in, int64_t kpad, int64_t gs, int64_t ng, int8_t* q,
                  double* sx, int32_t* rs) {
    double amax = 0.0;
    bool bad = false;
    for (int64_t k = 0; k < in; ++k) {
        const double a = std::fabs(static_cast<double>(x[k]));
        bad |= !(a <= 1.7976931348623157e308);  // NaN or infinity
        amax = a > amax ? a : amax;
    }
    if (bad) {  // reported through sx, nothing computed
        *sx = std::nan("");
        return;
    }
    const double scale = amax > 0.0 ? amax / 127.0 : 1.0;
    for (int64_t k = 0; k < in; ++k) {
        double v = std::nearbyint(static_cast<double>(x[k]) / scale);
        v = v < -127.0 ? -127.0 : (v > 127.0 ? 127.0 : v);
        q[k] = static_cast<int8_t>(static_cast<int>(v));
    }
    for (int64_t k = in; k < kpad; ++k) q[k] = 0;
    *sx = scale;
    for (int64_t g = 0; g < ng; ++g) {
        const int64_t a = g * gs, b = std::min(in, a + gs);
        int32_t s = 0;
        for (int64_t k = a; k < b; ++k) s += q[k];
        rs[g] = s;
    }
}

}  // namespace qlinear
