"""qlinear's kernels against ONNX Runtime (MLAS) and PyTorch (fbgemm), in one run.

Usage::

    python benchmarks/bench_kernels.py                     # issue 12's shapes + SmolLM2's
    python benchmarks/bench_kernels.py --shapes 4096x4096 --batches 1,16 --no-smollm2
    python benchmarks/bench_kernels.py --group-size 32 ...  # int4 in GGUF's groups of 32

Columns (milliseconds, ``--threads`` (2) threads each, shape is out x in), the table of issue 12:
qlinear int4 g128 with int8 activations (``activations="int8"``, W4A8) next to ONNX
Runtime ``MatMulNBits`` with ``accuracy_level=4`` (int8 activations, VNNI); qlinear int4
g128 with float activations next to ``MatMulNBits`` ``accuracy_level=0`` (float compute);
qlinear int8 W8A8 (per channel) next to PyTorch ``quantize_dynamic`` (fbgemm) and ONNX
Runtime ``DynamicQuantizeMatMul`` (MLAS). Both accuracy levels are passed explicitly.
``--group-size`` (128) sets the int4 group of qlinear and the ``block_size`` of
``MatMulNBits`` alike.

Every contender of a (shape, batch) is measured ``--rounds`` times, interleaved with the
others, with ``--pause`` seconds between measurements; a measurement is the median of
the calls in ``--budget`` seconds, and the table shows the median over rounds. Ratios are
qlinear / peer (< 1: qlinear faster) from those numbers, so every ratio compares
contenders measured under the same load. The ratio lines print the issue's targets.
Missing peers are skipped with a line saying so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import numpy as np

import qlinear
from qlinear import QuantizedLinear, calibrate_linear

THREADS = [2]  # every contender's thread count (--threads)
GROUP = [128]  # the int4 group size (--group-size)


def timeit(fn: Callable[[], object], budget: float = 0.15, min_reps: int = 5) -> float:
    """Median wall time of ``fn`` in milliseconds over ``budget`` seconds (after one
    warm-up call)."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget and len(times) < 400):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def torch_peer(w: np.ndarray, bias: np.ndarray):
    try:
        import torch
    except ImportError:
        return None, "torch not installed"
    torch.set_num_threads(THREADS[0])
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch")
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
    sess = _ort_session(model, THREADS[0])

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


def ort_nbits_peer(layer: QuantizedLinear, accuracy_level: int, block: int):
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
        accuracy_level=accuracy_level,
    )
    return _ort_single_node(node, inits, in_f, out_f), None


COLUMNS = [
    ("int4 x int8", "qlinear int4 (--group-size), activations='int8'"),
    ("nbits acc4", "ORT MatMulNBits accuracy_level=4"),
    ("int4 float", "qlinear int4 (--group-size), activations='float'"),
    ("nbits acc0", "ORT MatMulNBits accuracy_level=0"),
    ("int8 W8A8", "qlinear int8 per channel, activations='int8'"),
    ("fbgemm", "torch quantize_dynamic qint8"),
    ("MLAS DQMM", "ORT DynamicQuantizeMatMul"),
]
ISSUE_SHAPES = "4096x4096,11008x4096,4096x11008"
SMOLLM2_SHAPES = "576x576,192x576,1536x576,576x1536,49152x576"


def contenders(out_f: int, in_f: int, rng) -> tuple[dict, list[str]]:
    """``{column: make(x) -> call}`` for one weight shape, and why peers are missing."""
    w = (rng.standard_normal((out_f, in_f)) * 0.05).astype(np.float32)
    bias = rng.standard_normal(out_f).astype(np.float32)
    l8 = QuantizedLinear.from_fp(
        w, calibrate_linear(w, "int8", "per_channel", "symmetric"), bias=bias
    )
    l4 = QuantizedLinear.from_fp(
        w, calibrate_linear(w, "int4", "per_group", "symmetric", group_size=GROUP[0])
    )
    makes: dict = {
        "int4 x int8": lambda x: lambda: l4(x, activations="int8"),
        "int4 float": lambda x: lambda: l4(x),
        "int8 W8A8": lambda x: lambda: l8(x, activations="int8"),
    }
    missing = []
    for col, (make, msg) in {
        "nbits acc4": ort_nbits_peer(l4, 4, GROUP[0]),
        "nbits acc0": ort_nbits_peer(l4, 0, GROUP[0]),
        "fbgemm": torch_peer(l8.dequantize(np.float32), bias),
        "MLAS DQMM": ort_dynamic_peer(l8, bias),
    }.items():
        if make is None:
            missing.append(f"{col}: {msg}")
        else:
            makes[col] = make
    return makes, missing


def measure(makes: dict, x: np.ndarray, rounds: int, pause: float, budget: float) -> dict:
    calls = {k: m(x) for k, m in makes.items()}
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, fn in calls.items():
            times[k].append(timeit(fn, budget))
            time.sleep(pause)
    return {k: statistics.median(v) for k, v in times.items()}


def ratio(t: dict, a: str, b: str | list[str], target: float) -> str:
    peers = [b] if isinstance(b, str) else b
    have = [t[p] for p in peers if p in t]
    if a not in t or not have:
        return f"{a} / {'|'.join(peers)}: peer missing"
    r = t[a] / min(have)
    ok = "met" if r <= target else "MISSED"
    peer = f"min({', '.join(peers)})" if len(peers) > 1 else peers[0]
    return f"{a} / {peer} {r:.2f} (target <= {target}: {ok})"


def bench(shapes: str, batches: list[int], args, rng, targets: bool) -> None:
    cols = [c for c, _ in COLUMNS]
    print("| shape | B | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    notes = []
    for s in shapes.split(","):
        o, i = (int(v) for v in s.lower().split("x"))
        makes, missing = contenders(o, i, rng)
        notes += [f"{s}: skipped {m}" for m in missing]
        for n in batches:
            x = rng.standard_normal((n, i)).astype(np.float32)
            t = measure(makes, x, args.rounds, args.pause, args.budget)
            cells = " | ".join(f"{t[c]:.3f}" if c in t else "-" for c in cols)
            print(f"| {s} | {n} | {cells} |", flush=True)
            lines = [
                ratio(t, "int4 x int8", "nbits acc4", 0.8),
                ratio(t, "int4 float", "nbits acc0", 0.8),
                ratio(t, "int8 W8A8", ["fbgemm", "MLAS DQMM"], 0.8),
            ]
            if n >= 256:
                lines.append(ratio(t, "int4 x int8", "int8 W8A8", 1.2))
            notes.append(f"{s} B={n}: " + "; ".join(lines))
    print()
    for line in notes:
        print("  " + line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=ISSUE_SHAPES)
    ap.add_argument("--batches", default="1,16,256")
    ap.add_argument("--no-smollm2", action="store_true", help="skip SmolLM2's shapes at B=1")
    ap.add_argument("--threads", type=int, default=2, help="threads of every contender")
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size (both sides)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pause", type=float, default=0.3)
    ap.add_argument("--budget", type=float, default=0.15)
    args = ap.parse_args(argv)
    THREADS[0] = args.threads
    GROUP[0] = args.group_size
    qlinear.set_num_threads(args.threads)
    print(f"qlinear {qlinear.__version__}: {qlinear.backend_info()}")
    print(
        f"load average at start: {os.getloadavg()[0]:.2f} ({args.threads} threads per "
        f"contender, int4 group {args.group_size})"
    )
    rng = np.random.default_rng(0)
    bench(args.shapes, [int(b) for b in args.batches.split(",")], args, rng, True)
    if not args.no_smollm2:
        print("\nSmolLM2-135M's linear shapes, batch 1 (decode):")
        bench(SMOLLM2_SHAPES, [1], args, rng, False)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
