// For ISAs without the optional kernels (generic, avx2): float mode's in-register code
// conversion and int8 mode's fused one-row group kernel. The constexpr settings say so,
// and these stubs are never called.
#pragma once

static constexpr bool HAS_F_DIRECT = false;
static constexpr int F_DIRECT_ROWS = 0;
static constexpr bool HAS_F_BLOCK_DIRECT = false;
static constexpr int F_BLOCK_DIRECT_ROWS = 0;

template <class T>
inline void f_direct(const uint8_t*, int, int64_t, const T*, const T*, int64_t, int, T*) {}
inline bool f_block_direct(const uint8_t*, int, int64_t, const uint8_t*, int64_t, int64_t,
                           const Layer&, int64_t, const double*, int64_t, const float*, int64_t,
                           const float*, int, float*, int64_t) {
    return false;
}

// No fused all-groups kernel for one row of x (int8_driver.h).
static constexpr bool HAS_GROUPS_R1 = false;
inline void i_groups_r1(const uint8_t* const*, int, int64_t, int64_t, int64_t, const int8_t*,
                        const int32_t*, const Layer&, int64_t, float*, int64_t) {}

// No expansion of int4 blocks to bytes for many rows (int8_driver.h): the avx2 int8
// micro-kernel reads bytes as code + 128.
static constexpr int64_t I4_EXPAND_ROWS = 0;
inline void expand_steps4(const uint8_t*, int64_t, uint8_t*) {}

// No fused all-groups kernel for a tile of rows (int8_driver.h).
static constexpr bool HAS_GROUPS4 = false;
inline void i_groups4(const uint8_t* const*, int, int64_t, int64_t, int64_t, const int8_t*,
                      int64_t, const int32_t*, const Layer&, int64_t, float*, int64_t, int) {}

// No AMX tiles (int8_driver.h).
static constexpr bool HAS_AMX = false;
inline int64_t amx_rows(const Layer&) { return 0; }
inline int amx_kt(const Layer&) { return 0; }
template <class T>
void amx_task(const Layer&, const int8_t*, const double*, const int32_t*, int64_t, int64_t,
              const uint8_t* const*, int64_t, T*, bool) {}
