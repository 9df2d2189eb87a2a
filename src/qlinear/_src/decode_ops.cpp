// Float32 steps of the decoder runner that sit between its linear calls. Baseline code
// (no ISA flags): at decode sizes (one 576-wide row) a NumPy call's fixed cost, not
// arithmetic, is what this replaces. The NumPy version
// (qlinear.models.decoder_ops.rms_norm_numpy) is the specification; tests compare the two.
#include <cmath>
#include <cstdint>

#include "common.h"

namespace qlinear {

// out[r] = (x[r] * (1 / sqrt(mean(x[r]^2) + eps))) * w, in float32 as the NumPy version
// multiplies; the sum of squares in double (the one place the order of additions differs).
void rms_norm_rows(const float* x, int64_t n, int64_t d, const float* w, float eps, float* out) {
    for (int64_t r = 0; r < n; ++r) {
        const float* xr = x + r * d;
        float* o = out + r * d;
        double ss = 0.0;
        for (int64_t i = 0; i < d; ++i) ss += double(xr[i]) * double(xr[i]);
        float var = float(ss);
        var *= float(1.0 / double(d));
        var += eps;
        var = std::sqrt(var);
        const float inv = 1.0f / var;
        for (int64_t i = 0; i < d; ++i) {
            const float t = xr[i] * inv;
            o[i] = t * w[i];
        }
    }
}

}  // namespace qlinear
