// CPU feature probe (CPUID + XGETBV: the OS must also save the wider registers).
#include "common.h"

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <cpuid.h>
#define QL_X86 1
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
// CPUID traps to the hypervisor on virtual machines (tens of microseconds): probe once.
bool cpu_has_avx2() {
    static const bool v = probe_avx2();
    return v;
}
bool cpu_has_avx512vnni() {
    static const bool v = probe_avx512vnni();
    return v;
}
#else
bool cpu_has_avx2() { return false; }
bool cpu_has_avx512vnni() { return false; }
#endif

}  // namespace qlinear
