"""Speed of qlinear's forward pass against NumPy, PyTorch and ONNX Runtime, in one run.

Usage::

    python benchmarks/bench_kernels.py                 # all shapes, batch 1, 16, 256
    python benchmarks/bench_kernels.py --shapes 4096x4096 --batches 1,16

For each weight shape ``(out, in)`` and batch size it times (best of several runs, milliseconds):
qlinear float mode and int8 mode (int8 per-channel symmetric), NumPy float32 and float64
matmul against the float weight, the dequantize-everything design (dequantize the whole
weight on every call, then matmul), PyTorch's dynamic quantized Linear
(``quantize_dynamic``, qint8, 2 threads) and ONNX Runtime's ``DynamicQuantizeMatMul``
(com.microsoft, 2 intra-op threads); and for int4 group-128 layers qlinear float mode
next to ONNX Runtime's ``MatMulNBits`` (bits=4, block_size=128). Missing peers are
skipped with a line saying so. Ratios are qlinear time / peer time (< 1: qlinear faster).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np

import qlinear
from qlinear import QuantizedLinear, calibrate_linear

THREADS = 2


def timeit(fn: Callable[[], object], budget: float = 0.3, min_reps: int = 5) -> float:
    """Best wall time of ``fn`` in milliseconds (after one warm-up call).

    The minimum, not the median: on a shared machine other processes only ever add
    time, so the fastest repetition is the least disturbed one, for every contender."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def torch_peer(w: np.ndarray, bias: np.ndarray):
    try:
        import torch
    except ImportError:
        return None, "torch not installed"
    torch.set_num_threads(THREADS)
    lin = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w.astype(np.float32)))
        lin.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
    model = torch.nn.Sequential(lin)
    q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)

    def make(x: np.ndarray):
        xt = torch.from_numpy(x)

        def run():
            with torch.inference_mode():
                return q(xt)

        return run

    return make, None


def _ort_session(model, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _ort_single_node(node, inits, in_f: int, out_f: int):
    """A session running one com.microsoft node ``Y = f(A)``; returns ``make(x) -> call``."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [node],
        node.op_type,
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["n", in_f])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["n", out_f])],
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    sess = _ort_session(model, THREADS)

    def make(x: np.ndarray):
        return lambda: sess.run(None, {"A": x})

    return make


def ort_dynamic_peer(layer: QuantizedLinear, bias: np.ndarray):
    try:
        import onnxruntime  # noqa: F401
        from onnx import helper, numpy_helper
    except ImportError:
        return None, "onnxruntime/onnx not installed"
    out_f, in_f = layer.shape
    b = np.ascontiguousarray(layer.qweight.T)  # (in, out) int8
    scale = np.broadcast_to(layer.scales.astype(np.float32), (out_f,)).copy()
    inits = [
        numpy_helper.from_array(b, "B"),
        numpy_helper.from_array(scale, "b_scale"),
        numpy_helper.from_array(np.zeros(out_f, np.int8), "b_zp"),
        numpy_helper.from_array(bias.astype(np.float32), "bias"),
    ]
    node = helper.make_node(
        "DynamicQuantizeMatMul",
        ["A", "B", "b_scale", "b_zp", "bias"],
        ["Y"],
        domain="com.microsoft",
    )
    return _ort_single_node(node, inits, in_f, out_f), None


def ort_nbits_peer(layer: QuantizedLinear, block: int = 128):
    try:
        import onnxruntime  # noqa: F401
        from onnx import helper, numpy_helper
    except ImportError:
        return None, "onnxruntime/onnx not installed"
    out_f, in_f = layer.shape
    nb = (in_f + block - 1) // block
    q = layer.qweight.astype(np.int16) + 8  # symmetric int4 -> 1..15, zero point 8
    padded = np.zeros((out_f, nb * block), np.uint8)
    padded[:, :in_f] = q
    blob = (padded[:, 0::2] | (padded[:, 1::2] << 4)).reshape(out_f, nb, block // 2)
    inits = [
        numpy_helper.from_array(blob.astype(np.uint8), "B"),
        numpy_helper.from_array(layer.scales.astype(np.float32).reshape(-1), "scales"),
    ]
    node = helper.make_node(
        "MatMulNBits",
        ["A", "B", "scales"],
        ["Y"],
        domain="com.microsoft",
        K=in_f,
        N=out_f,
        bits=4,
        block_size=block,
    )
    return _ort_single_node(node, inits, in_f, out_f), None


def row(label: str, ms: float, ref_ms: dict[str, float]) -> str:
    ratios = "  ".join(f"{k} {ms / v:5.2f}x" for k, v in ref_ms.items() if v)
    return f"    {label:<28s} {ms:9.3f} ms   {ratios}"


def bench_shape(out_f: int, in_f: int, batches: list[int], rng, int4: bool) -> None:
    w = (rng.standard_normal((out_f, in_f)) * 0.05).astype(np.float32)
    bias = rng.standard_normal(out_f).astype(np.float32)
    layer = QuantizedLinear.from_fp(
        w, calibrate_linear(w, "int8", "per_channel", "symmetric"), bias=bias
    )
    wf32 = layer.dequantize(np.float32)
    wf64 = layer.dequantize(np.float64)
    tmake, tmsg = torch_peer(wf32, bias)
    omake, omsg = ort_dynamic_peer(layer, bias)
    l4 = nmake = nmsg = None
    if int4:
        p4 = calibrate_linear(w, "int4", "per_group", "symmetric", group_size=128)
        l4 = QuantizedLinear.from_fp(w, p4)
        nmake, nmsg = ort_nbits_peer(l4)
    threads = qlinear.get_num_threads()
    print(f"\n{out_f}x{in_f} (out x in), backend {layer.backend}, threads {threads}")
    for msg in {tmsg, omsg, nmsg} - {None}:
        print(f"  skipped: {msg}")
    for n in batches:
        x = rng.standard_normal((n, in_f)).astype(np.float32)
        x64 = x.astype(np.float64)
        t = {}
        t["qlinear float"] = timeit(lambda x=x: layer(x))
        t["qlinear int8"] = timeit(lambda x=x: layer(x, activations="int8"))
        t["qlinear float64"] = timeit(lambda x64=x64: layer(x64))
        t["numpy f32"] = timeit(lambda x=x: x @ wf32.T + bias)
        t["numpy f64"] = timeit(lambda x64=x64: x64 @ wf64.T + bias)
        t["dequantize-all"] = timeit(
            lambda x=x: x @ layer.dequantize(np.float32).T + bias, budget=0.1
        )
        peers = {}
        if tmake:
            peers["torch"] = t["torch dynamic int8"] = timeit(tmake(x))
        if omake:
            peers["ort"] = t["ort DynamicQuantizeMatMul"] = timeit(omake(x))
        base = {"np32": t["numpy f32"], **peers}
        print(f"  batch {n}")
        for k, v in t.items():
            print(row(k, v, base))
        if peers:
            best = min(peers.values())
            ok = "yes" if t["qlinear int8"] <= best else "NO"
            ratio = t["qlinear int8"] / best
            print(f"    -> int8 mode vs faster peer: {ratio:.2f}x (target <= 1: {ok})")
        r = t["numpy f32"] / t["qlinear float"]
        print(f"    -> float mode speed-up over numpy f32: {r:.2f}x")
        if l4 is not None:
            t4 = timeit(lambda x=x: l4(x))
            t4i = timeit(lambda x=x: l4(x, activations="int8"))
            extra = {}
            if nmake:
                extra["nbits"] = timeit(nmake(x))
            print(row("qlinear int4 g128 float", t4, extra))
            print(row("qlinear int4 g128 int8", t4i, extra))
            if nmake:
                print(row("ort MatMulNBits int4 g128", extra["nbits"], extra))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="4096x4096,1024x4096,4096x11008")
    ap.add_argument("--batches", default="1,16,256")
    ap.add_argument("--no-int4", action="store_true")
    args = ap.parse_args(argv)
    qlinear.set_num_threads(THREADS)
    print(f"qlinear {qlinear.__version__}: {qlinear.backend_info()}")
    rng = np.random.default_rng(0)
    batches = [int(b) for b in args.batches.split(",")]
    for s in args.shapes.split(","):
        o, i = (int(v) for v in s.lower().split("x"))
        bench_shape(o, i, batches, rng, int4=not args.no_int4)
    return 0


if __name__ == "__main__":
    sys.exit(main())
