"""GPTQ onto llama.cpp's block grids: a GGUF file whose Q8_0 / Q4_0 / Q4_1 codes were
chosen by GPTQ (``qlinear quantize SRC -o OUT.gguf --format gguf --gguf-type T --gptq``).

llama.cpp's own quantizer only rounds. Here every decoder linear is calibrated by the
layer-sequential GPTQ of :mod:`qlinear.models.gptq_checkpoint` (same calibration text,
windows, act order and damping), with the per-linear quantizer replaced by
:func:`qlinear.formats.gguf_grid.gptq_quantize_gguf`: each block of 32 columns gets its
float16 step (and Q4_1 minimum) when GPTQ reaches the block's first column, by
llama.cpp's rule (``method="minmax"``) or by the shrink search (``"mse"``), and every
column is quantized against those *stored* values, so the weight gguf-py and llama.cpp
dequantize from the file is exactly the one GPTQ optimised.

Sources: a Hugging Face llama-family checkpoint directory (``config.json``,
``tokenizer.json``, safetensors), written with llama.cpp's names, metadata and q/k row
order; or a llama GGUF file, dequantized to float32 for calibration and requantized
with every metadata key, the tokenizer and the tensor names kept. Both are written by
:func:`qlinear.formats.gguf.quantize_to_gguf` (atomically), which rounds the tensors
GPTQ does not calibrate (``lm_head``; a GGUF source's quantized ``token_embd``) to the
nearest grid point and keeps the others (norms; a Hugging Face ``embed_tokens``) in
float. Linears whose in_features is not a multiple of 32 stay float, as the writer keeps
them.

Memory: the calibration hidden states and one layer's float weights, plus the quantized
layers until the file is written (gguf-py's writer holds the whole output anyway).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError, InvalidParamsError
from ..formats.gguf_grid import BLOCK, GGUF_TYPES, GRID_METHODS, gptq_quantize_gguf, quantize_weight
from ..linear import QuantizedLinear
from ..offset_linear import OffsetLinear
from ..quantconfig import QuantConfig
from .gptq_checkpoint import (
    GPTQCheckpointReport,
    GPTQOptions,
    _Arch,
    _batch_size,
    _checked_ids,
    _decoder_arch,
    _progress,
    _read_config,
    _Source,
    calibrate_layer,
)
from .ops import FloatLinear

__all__ = ["gptq_quantize_to_gguf"]


def gptq_quantize_to_gguf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    kind: str,
    *,
    method: str = "minmax",
    calib_text: str | None = None,
    options: GPTQOptions | None = None,
    progress: bool = True,
    on_layer: Callable[[int, float], None] | None = None,
    layers: Mapping[str, QuantizedLinear | OffsetLinear] | None = None,
) -> GPTQCheckpointReport:
    """Write ``dst`` (.gguf) with every decoder linear of ``src`` quantized by GPTQ onto
    the ``kind`` grid (see the module docstring).

    Args:
        src: a Hugging Face llama-family checkpoint directory or a llama GGUF file.
        dst: the output ``.gguf`` file (replaced atomically).
        kind: ``"q8_0"``, ``"q4_0"`` or ``"q4_1"``.
        method: how each block's float16 step is chosen: ``"minmax"`` (llama.cpp's
            rule; Q4_0 uses all of -8..7) or ``"mse"`` (the shrink search).
        calib_text, options, progress, on_layer: as for
            :func:`qlinear.models.gptq_checkpoint.gptq_quantize_checkpoint`.
        layers: layers on the grid for other tensors, under GGUF names (for example
            ``token_embd.weight`` rounded elsewhere); GPTQ's layers cannot be overridden.

    Raises:
        InvalidParamsError: an unknown ``kind`` or ``method``, a ``dst`` that is not
            ``.gguf``, a bad option, or ``layers`` naming a GPTQ-calibrated tensor.
        FormatError: a source that is not llama-family, a missing tensor or tokenizer.
        InvalidInputError: calibration text with fewer tokens than asked.
    """
    from ..formats.gguf import _head, quantize_to_gguf
    from ..formats.gguf_llama import LLAMA_FAMILY, gguf_layers

    t0 = time.perf_counter()
    if kind not in GGUF_TYPES:
        raise InvalidParamsError(f"gguf type must be one of {GGUF_TYPES}; got {kind!r}")
    if method not in GRID_METHODS:
        raise InvalidParamsError(
            f"GPTQ to GGUF chooses block scales by one of {GRID_METHODS}; got {method!r}"
        )
    src_p, dst_p = Path(src), Path(dst)
    if dst_p.suffix != ".gguf":
        raise InvalidParamsError(f"a GGUF output is a .gguf file; got {dst}")
    opts = options if options is not None else GPTQOptions()
    source = None
    if src_p.is_file() and _head(src_p) == b"GGUF":
        arch, tokenizer, raw_cfg = _gguf_arch(src_p)
    elif src_p.is_dir():
        raw_cfg = _read_config(src_p)
        mt = raw_cfg.get("model_type")
        if mt not in LLAMA_FAMILY:
            raise FormatError(
                f"{src_p / 'config.json'}: model_type {mt!r}; GPTQ to GGUF supports "
                f"{list(LLAMA_FAMILY)}"
            )
        source = _Source(src_p)
        arch, tokenizer = _decoder_arch(raw_cfg, src_p, source), src_p
    else:
        raise FileNotFoundError(f"no such checkpoint directory or GGUF file: {src_p}")
    try:
        found = _calibrate(arch, tokenizer, kind, method, calib_text, opts, progress, on_layer)
    finally:
        if source is not None:
            for f in source.files:
                f.close()
    quantized, gptq_names, fallback, layer_seconds = found
    out = gguf_layers(quantized, raw_cfg)
    for name, layer in (layers or {}).items():
        if name in out:
            raise InvalidParamsError(f"layers: {name!r} is calibrated by GPTQ; give other tensors")
        out[name] = layer
    quantize_to_gguf(src_p, dst_p, kind, layers=out)
    return GPTQCheckpointReport(
        src=str(src_p),
        dst=str(dst_p),
        config={"gguf_type": kind, "method": method},
        model_type=arch.model_type,
        num_layers=arch.num_layers,
        calibration_tokens=int(opts.samples * opts.seqlen),
        gptq=tuple(gptq_names),
        weight_only_fallback=tuple(fallback),
        seconds=time.perf_counter() - t0,
        layer_seconds=tuple(layer_seconds),
    )


def _calibrate(
    arch: _Arch,
    tokenizer: Any,
    kind: str,
    method: str,
    calib_text: str | None,
    opts: GPTQOptions,
    progress: bool,
    on_layer: Callable[[int, float], None] | None,
) -> tuple[dict[str, Any], list[str], list[tuple[str, int]], list[float]]:
    """Layer-sequential GPTQ of every decoder linear onto the grid: ``(layers under
    Hugging Face linear names, GPTQ-calibrated names, weight-only fallbacks, seconds per
    layer)``."""
    h = arch.embed(_checked_ids(arch, tokenizer, calib_text, opts))
    batch = opts.batch_size or _batch_size(arch.config, opts.seqlen)
    # only sets calibrate_layer's plan: the quantizer below replaces the config's grid
    cfg = QuantConfig.coerce({"qtype": "int8", "granularity": "per_channel"})

    def quantize(name: str, w: np.ndarray, bias: Any, hessian: Any) -> Any:
        if w.shape[1] % BLOCK:
            return FloatLinear(w, bias)  # the writer keeps it float too
        if hessian is None:
            return quantize_weight(w, kind, method=method, bias=bias)
        return gptq_quantize_gguf(
            w,
            hessian,
            kind,
            method=method,
            damp=opts.damp,
            act_order=opts.act_order,
            block_size=opts.block_size,
            bias=bias,
        )

    quantized: dict[str, Any] = {}
    names: list[str] = []
    fallback: list[tuple[str, int]] = []
    seconds: list[float] = []
    bar = _progress(arch.num_layers, progress)
    try:
        for i in range(arch.num_layers):
            t1 = time.perf_counter()
            done, h = calibrate_layer(
                arch.layer(i),
                h,
                cfg,
                opts,
                batch_size=batch,
                dense=arch.dense(i),
                fallback=fallback,
                gptq_names=names,
                quantize=quantize,
            )
            quantized.update(
                {arch.prefix + k: v for k, v in done.items() if not isinstance(v, FloatLinear)}
            )
            seconds.append(time.perf_counter() - t1)
            if bar is not None:
                bar.update(1)
            if on_layer is not None:
                on_layer(i, seconds[-1])
    finally:
        if bar is not None:
            bar.close()
    return quantized, [n for n in names if n in quantized], fallback, seconds


def _gguf_arch(path: Path) -> tuple[_Arch, Any, dict[str, Any]]:
    """A llama GGUF file as the GPTQ driver's model: its tensors dequantized to float32
    (one layer at a time), its tokenizer and its Hugging Face style config."""
    from ..formats.gguf import read_causal_lm
    from .decoder_config import DecoderConfig
    from .decoder_layer import DecoderLayer
    from .tokenizer import Tokenizer

    raw, tensors, tok_json = read_causal_lm(path)
    if tok_json is None:
        raise FormatError(f"{path}: no gpt2-style tokenizer in the GGUF metadata; GPTQ needs one")
    c = DecoderConfig.from_dict(raw, source=f"{path} (GGUF metadata)")
    tokenizer = Tokenizer(None, json_text=tok_json)

    def get(name: str) -> np.ndarray:
        item = tensors.get(name)
        if item is None and name.endswith(".weight"):
            item = tensors.get(name[: -len(".weight")])
        if item is None:
            raise KeyError(name)
        return item if isinstance(item, np.ndarray) else item.dequantize(np.float32)

    emb = "model.embed_tokens.weight"
    try:
        get(emb)
    except KeyError:
        raise FormatError(f"{path}: tensor token_embd.weight is missing") from None

    def embed(ids: np.ndarray) -> np.ndarray:
        return np.asarray(get(emb)[ids], dtype=np.float32)

    arch = _Arch(
        c.model_type,
        c,
        c.num_hidden_layers,
        c.max_position_embeddings,
        c.vocab_size,
        "",
        lambda i: DecoderLayer.from_tensors(c, i, get),
        embed,
        lambda i: True,
    )
    return arch, tokenizer, raw
