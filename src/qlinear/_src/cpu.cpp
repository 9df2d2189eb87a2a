// CPU feature probe (CPUID + XGETBV: the OS must also save the wider registers).
#include "common.h"

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <cpuid.h>
#define QL_X86 1
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace qlinear {

#ifdef QL_X86
namespace {
unsigned long long xgetbv0() {
    unsigned eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return (static_cast<unsigned long long>(edx) << 32) | eax;
}
bool osxsave() {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
    return (c & (1u << 27)) != 0;
}
bool leaf7(unsigned* b, unsigned* c) {
    unsigned a, d;
    if (__get_cpuid_max(0, nullptr) < 7) return false;
    __cpuid_count(7, 0, a, *b, *c, d);
    return true;
}
}  // namespace

static bool probe_avx2() {
    unsigned a, b, c, d;
    if (!osxsave() || !__get_cpuid(1, &a, &b, &c, &d)) return false;
    const bool fma = (c & (1u << 12)) != 0, avx = (c & (1u << 28)) != 0;
    if (!fma || !avx || (xgetbv0() & 0x6) != 0x6) return false;
    unsigned b7, c7;
    return leaf7(&b7, &c7) && (b7 & (1u << 5)) != 0;
}

static bool probe_avx512vnni() {
    if (!probe_avx2() || (xgetbv0() & 0xE6) != 0xE6) return false;
    unsigned b7, c7;
    if (!leaf7(&b7, &c7)) return false;
    const bool f = b7 & (1u << 16), dq = b7 & (1u << 17), bw = b7 & (1u << 30),
               vl = b7 & (1u << 31), vnni = c7 & (1u << 11);
    return f && dq && bw && vl && vnni;
}
// AMX-TILE and AMX-INT8 (CPUID leaf 7 EDX bits 24, 25), their state enabled in XCR0
// (bits 17, 18), and Linux's permission to use the tile data (arch_prctl
// ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, once per process: without it the first
// tile instruction raises SIGILL). Elsewhere no AMX.
static bool probe_amx() {
#if defined(__linux__) && defined(SYS_arch_prctl)
    if (!probe_avx512vnni() || (xgetbv0() & 0x60000) != 0x60000) return false;
    unsigned a, b, c, d;
    if (__get_cpuid_max(0, nullptr) < 7) return false;
    __cpuid_count(7, 0, a, b, c, d);
    if ((d & (1u << 24)) == 0 || (d & (1u << 25)) == 0) return false;
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
    return false;
#endif
}
// CPUID traps to the hypervisor on virtual machines (tens of microseconds): probe once.
bool cpu_has_avx2() {
    static const bool v = probe_avx2();
    return v;
}
bool cpu_has_avx512vnni() {
    static const bool v = probe_avx512vnni();
    return v;
}
bool cpu_has_amx() {
    static const bool v = probe_amx();
    return v;
}
#else
bool cpu_has_amx() { return false; }
bool cpu_has_avx2() { return false; }
bool cpu_has_avx512vnni() { return false; }
#endif

}  // namespace qlinear
