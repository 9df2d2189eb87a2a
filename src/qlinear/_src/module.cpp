// Python bindings of the native kernel core. Python (qlinear.kernels.native) validates
// every argument; this file only re-checks what guards memory safety (sizes, dtypes).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <atomic>
#include <stdexcept>
#include <string>

#include "common.h"

namespace py = pybind11;

namespace qlinear {
void pack_weights(int bits, const uint8_t* canon, int64_t out, int64_t in, uint8_t* dst);
void unpack_weights(int bits, const uint8_t* src, int64_t out, int64_t in, uint8_t* canon);
}  // namespace qlinear

namespace qlinear {
static std::atomic<int64_t> g_amx_tasks{0};
int64_t amx_tasks_run() { return g_amx_tasks.load(std::memory_order_relaxed); }
void count_amx_task() { g_amx_tasks.fetch_add(1, std::memory_order_relaxed); }
}  // namespace qlinear

namespace {

using namespace qlinear;

const KernelTable* table_for(const std::string& isa) {
    if (isa == "portable") return &generic::table;
#ifdef QL_HAVE_X86_KERNELS
    if (isa == "avx2") {
        if (!cpu_has_avx2()) throw std::invalid_argument("avx2 kernels need a CPU with AVX2+FMA");
        return &avx2::table;
    }
    if (isa == "avx512") {
        if (!cpu_has_avx512vnni())
            throw std::invalid_argument("avx512 kernels need a CPU with AVX-512 VNNI");
        return &avx512::table;
    }
    if (isa == "amx") {
        if (!cpu_has_amx())
            throw std::invalid_argument("amx kernels need a CPU with AMX-INT8 that the OS enables");
        return &avx512::amx_table;
    }
#endif
    throw std::invalid_argument("unknown kernel set '" + isa + "'");
}

void check(bool ok, const char* what) {
    if (!ok) throw std::invalid_argument(what);
}

int64_t canon_row_bytes(int bits, int64_t in) { return bits == 8 ? in : (in + 1) / 2; }

py::array_t<uint8_t> pack(py::array_t<uint8_t, py::array::c_style> canon, int bits, int64_t out,
                          int64_t in) {
    check(bits == 8 || bits == 4, "bits must be 8 or 4");
    check(out > 0 && in > 0, "out and in must be positive");
    check(canon.size() == out * canon_row_bytes(bits, in), "canonical codes have the wrong size");
    py::array_t<uint8_t> dst(packed_bytes(bits, out, in));
    const uint8_t* src = canon.data();
    uint8_t* d = dst.mutable_data();
    {
        py::gil_scoped_release nogil;
        pack_weights(bits, src, out, in, d);
    }
    return dst;
}

py::array_t<uint8_t> unpack(py::array_t<uint8_t, py::array::c_style> packed, int bits, int64_t out,
                            int64_t in) {
    check(bits == 8 || bits == 4, "bits must be 8 or 4");
    check(packed.size() == packed_bytes(bits, out, in), "packed codes have the wrong size");
    py::array_t<uint8_t> dst({out, canon_row_bytes(bits, in)});
    const uint8_t* src = packed.data();
    uint8_t* d = dst.mutable_data();
    {
        py::gil_scoped_release nogil;
        unpack_weights(bits, src, out, in, d);
    }
    return dst;
}

// None if x or y holds a NaN or an infinity (int8 mode checks x while quantizing it;
// every mode checks y as it is written): the caller then finds which.
template <class T>
py::object run(const KernelTable* tab, Layer& L, py::array_t<T> x, bool int8act, int threads) {
    check(x.ndim() == 2 && x.shape(1) == L.in, "x must be (n, in_features)");
    check(x.strides(1) == static_cast<py::ssize_t>(sizeof(T)), "x must have unit column stride");
    check(x.strides(0) % static_cast<py::ssize_t>(sizeof(T)) == 0 && x.strides(0) >= 0,
          "x row stride must be a non-negative multiple of the item size");
    Call C;
    C.n = x.shape(0);
    C.x = x.data();
    C.x_rs = x.strides(0) / static_cast<py::ssize_t>(sizeof(T));
    C.f64 = sizeof(T) == 8;
    C.threads = threads < 1 ? 1 : threads;
    py::array_t<T> y({C.n, L.out});
    C.y = y.mutable_data();
    bool finite = true;
    if (C.n > 0) {
        py::gil_scoped_release nogil;
        finite = int8act ? tab->linear_int8act(L, C) : tab->linear_float(L, C);
    }
    if (!finite) return py::none();
    return std::move(y);
}

// scales32: float32 panels and zpu: int32 panels or None (every zero point is
// zp_uniform), as kernels/native.py's Panels: (n_groups == 1) (out,), else
// (ceil(out / 16), n_groups, 16), C-contiguous; scales64: float64 (out, n_groups).
py::object linear(const std::string& isa, py::array_t<uint8_t, py::array::c_style> packed, int bits,
                 int64_t out, int64_t in, int64_t group_size, int64_t ng,
                 py::array_t<float, py::array::c_style> scales32,
                 py::array_t<double, py::array::c_style> scales64, py::object zpu, int32_t zp_uniform, py::object bias, py::array x, bool int8act,
                 int threads) {
    const KernelTable* tab = table_for(isa);
    check(bits == 8 || bits == 4, "bits must be 8 or 4");
    check(out > 0 && in > 0, "out and in must be positive");
    check(packed.size() == packed_bytes(bits, out, in), "packed codes have the wrong size");
    check(ng >= 1, "n_groups must be >= 1");
    if (ng == 1) {
        check(group_size >= in, "one group must span the row");
    } else {
        check(group_size > 0 && group_size % 4 == 0, "group_size must be a multiple of 4");
        check((in + group_size - 1) / group_size == ng, "n_groups != ceil(in / group_size)");
    }
    const int64_t npanel = ng == 1 ? out : (out + NR - 1) / NR * ng * NR;
    check(scales32.size() == npanel, "scales32 must be panels of the layer's size");
    check(scales64.size() == out * ng, "scales64 must be (out, n_groups)");
    py::array_t<int32_t, py::array::c_style> z;
    if (!zpu.is_none()) {
        z = py::array_t<int32_t, py::array::c_style>::ensure(zpu);
        check(z && z.size() == npanel, "zero points must be int32 panels of the layer's size");
    }
    py::array_t<double, py::array::c_style> b;
    Layer L;
    L.w = packed.data();
    L.bits = bits;
    L.out = out;
    L.in = in;
    L.group_size = ng == 1 ? in : group_size;
    L.n_groups = ng;
    L.scales32 = scales32.data();
    L.scales64 = scales64.data();
    L.zpu = zpu.is_none() ? nullptr : z.data();
    L.zp_uniform = zp_uniform;
    L.bias = nullptr;
    if (!bias.is_none()) {
        b = py::array_t<double, py::array::c_style>::ensure(bias);
        check(b && b.ndim() == 1 && b.shape(0) == out, "bias must be float64 (out,)");
        L.bias = b.data();
    }
    // By type number, not by identity: an unpickled array has its own dtype object.
    const int num = x.dtype().num();
    if (num == py::dtype::of<double>().num())
        return run<double>(tab, L, py::array_t<double>::ensure(x), int8act, threads);
    if (num == py::dtype::of<float>().num())
        return run<float>(tab, L, py::array_t<float>::ensure(x), int8act, threads);
    throw std::invalid_argument("x must be float32 or float64");
}

using F32C = py::array_t<float, py::array::c_style | py::array::forcecast>;

// x (n, d) and w (d,) float32 -> (n, d): qlinear.models.decoder_ops.rms_norm.
py::array_t<float> rms_norm(F32C x, F32C w, float eps) {
    check(x.ndim() == 2 && w.ndim() == 1 && w.shape(0) == x.shape(1), "x must be (n, d), w (d,)");
    py::array_t<float> out({x.shape(0), x.shape(1)});
    const float* xp = x.data();
    const float* wp = w.data();
    float* op = out.mutable_data();
    const int64_t n = x.shape(0), d = x.shape(1);
    {
        py::gil_scoped_release nogil;
        rms_norm_rows(xp, n, d, wp, eps, op);
    }
    return out;
}

// scores: float32 (rows, cols) C-contiguous, modified in place; lo, hi: int64 (per,)
// with 0 <= lo <= hi < cols and rows a multiple of per.
void softmax_rows_py(const std::string& isa, py::array_t<float, py::array::c_style> scores,
                     float scale, py::array_t<int64_t, py::array::c_style> lo,
                     py::array_t<int64_t, py::array::c_style> hi, int threads) {
    const KernelTable* tab = table_for(isa);
    check(scores.ndim() == 2, "scores must be (rows, cols)");
    const int64_t rows = scores.shape(0), cols = scores.shape(1), per = lo.size();
    check(per > 0 && hi.size() == per && rows % per == 0, "lo, hi must be (per,) with rows % per == 0");
    const int64_t* l = lo.data();
    const int64_t* h = hi.data();
    for (int64_t i = 0; i < per; ++i)
        check(0 <= l[i] && l[i] <= h[i] && h[i] < cols, "need 0 <= lo <= hi < cols");
    SoftmaxCall c{scores.mutable_data(), rows, cols, per, scale, l, h};
    py::gil_scoped_release nogil;
    tab->softmax_rows(c, threads < 1 ? 1 : threads);
}

// gu: float32 (rows, 2 d) C-contiguous -> (rows, d).
py::array_t<float> swiglu_rows_py(const std::string& isa,
                                  py::array_t<float, py::array::c_style> gu, int threads) {
    const KernelTable* tab = table_for(isa);
    check(gu.ndim() == 2 && gu.shape(1) % 2 == 0, "gu must be (rows, 2 d)");
    const int64_t rows = gu.shape(0), d = gu.shape(1) / 2;
    py::array_t<float> out({rows, d});
    SwigluCall c{gu.data(), out.mutable_data(), rows, d};
    {
        py::gil_scoped_release nogil;
        tab->swiglu_rows(c, threads < 1 ? 1 : threads);
    }
    return out;
}

// x: float32 (rows, heads * d) with unit column stride (any row stride); cos, sin:
// float32 (t, d) C-contiguous, rows % t == 0 -> (rows, heads, d).
py::array_t<float> rope_rows_py(const std::string& isa, py::array_t<float> x, int64_t heads,
                                py::array_t<float, py::array::c_style> cos,
                                py::array_t<float, py::array::c_style> sin, int threads) {
    const KernelTable* tab = table_for(isa);
    check(x.ndim() == 2 && heads > 0 && x.shape(1) % heads == 0, "x must be (rows, heads * d)");
    const int64_t rows = x.shape(0), d = x.shape(1) / heads;
    check(d % 2 == 0, "the head size must be even");
    check(x.strides(1) == static_cast<py::ssize_t>(sizeof(float)) && x.strides(0) >= 0 &&
              x.strides(0) % static_cast<py::ssize_t>(sizeof(float)) == 0,
          "x must have unit column stride");
    check(cos.ndim() == 2 && cos.shape(1) == d && sin.ndim() == 2 && sin.shape(0) == cos.shape(0) &&
              sin.shape(1) == d && cos.shape(0) > 0 && rows % cos.shape(0) == 0,
          "cos, sin must be (t, d) with rows % t == 0");
    py::array_t<float> out({rows, heads, d});
    RopeCall c{x.data(), x.strides(0) / static_cast<py::ssize_t>(sizeof(float)), out.mutable_data(),
               rows, heads, d, cos.data(), sin.data(), cos.shape(0)};
    {
        py::gil_scoped_release nogil;
        tab->rope_rows(c, threads < 1 ? 1 : threads);
    }
    return out;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "qlinear native kernels (private; use qlinear.QuantizedLinear)";
    m.def("cpu_features", [] {
        py::dict d;
#ifdef QL_HAVE_X86_KERNELS
        d["avx2"] = cpu_has_avx2();
        d["avx512vnni"] = cpu_has_avx512vnni();
        d["amx"] = cpu_has_amx();
#else
        d["avx2"] = false;  // kernels not compiled for this architecture
        d["avx512vnni"] = false;
        d["amx"] = false;
#endif
        return d;
    });
    m.def("amx_tasks", &amx_tasks_run);  // tests: how many int8-mode tasks ran on AMX tiles
    m.def("packed_nbytes", [](int bits, int64_t out, int64_t in) { return packed_bytes(bits, out, in); });
    m.def("pack", &pack);
    m.def("unpack", &unpack);
    m.def("linear", &linear);
    m.def("prefetch", [](py::sequence arrays) {
        std::vector<std::pair<const char*, int64_t>> ranges;
        for (py::handle h : arrays) {
            py::buffer_info b = py::reinterpret_borrow<py::buffer>(h).request();
            ranges.emplace_back(static_cast<const char*>(b.ptr), static_cast<int64_t>(b.size * b.itemsize));
        }
        prefetch_async(std::move(ranges));
    });
    m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("w"), py::arg("eps"));
    m.def("swiglu_rows", &swiglu_rows_py, py::arg("isa"), py::arg("gu"), py::arg("threads"));
    m.def("rope_rows", &rope_rows_py, py::arg("isa"), py::arg("x"), py::arg("heads"), py::arg("cos"),
          py::arg("sin"), py::arg("threads"));
    m.def("softmax_rows", &softmax_rows_py, py::arg("isa"), py::arg("scores"), py::arg("scale"),
          py::arg("lo"), py::arg("hi"), py::arg("threads"));
    m.def("set_spin_policy", &set_spin_policy, py::arg("spin_us"), py::arg("yield_"));
    m.def("spin_policy", [] { return py::make_tuple(spin_policy_us(), spin_policy_yield()); });
}
