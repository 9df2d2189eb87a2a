"""``qlinear eval``: what quantizing every linear layer of a sentence encoder costs.

:func:`evaluate_model` runs a BERT sentence encoder (all-MiniLM-L6-v2 by default, see
:mod:`qlinear.models`) in float32 and with every linear layer replaced by a
:class:`~qlinear.QuantizedLinear`, on the sentences shipped with qlinear, and measures
the cosine similarity of the two embeddings of each sentence, the bytes of the linear
weights before and after, and the forward time of both.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InvalidInputError, InvalidParamsError
from ..gptq import gptq_quantize
from ..io import layer_tensors
from ..linear import QuantizedLinear
from ..quantconfig import QuantConfig

__all__ = ["EvalReport", "evaluate_model", "quantize_linears"]


@dataclasses.dataclass(frozen=True)
class EvalReport:
    """Cosine similarity of quantized vs float32 embeddings (``cos = e_f . e_q`` of unit
    vectors, per sentence), linear-weight bytes (float32 weights vs stored codes, scales
    and zero points; biases excluded from both) and the best-of-``repeats`` wall time of
    encoding every sentence."""

    model_dir: str
    config: dict[str, Any]
    calibration: str
    n_sentences: int
    n_layers: int
    cos_mean: float
    cos_min: float
    bytes_float: int
    bytes_quantized: int
    seconds_float: float
    seconds_quantized: float

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(dataclasses.asdict(self), indent=indent)


def quantize_linears(
    model: Any,
    config: QuantConfig | Mapping[str, Any],
    *,
    calib_inputs: Mapping[str, np.ndarray] | None = None,
) -> dict[str, QuantizedLinear]:
    """Every linear layer of ``model`` (a :class:`qlinear.models.BertModel`) quantized
    with ``config``, bias included: name -> QuantizedLinear.

    With ``calib_inputs`` (name -> float ``(tokens, in)``, as
    ``model.layer_inputs(sentences)`` returns), each layer is quantized by GPTQ with
    activation order on its own inputs, ``config.method`` choosing each group's clipping;
    without, from its weights alone.
    """
    cfg = QuantConfig.coerce(config)
    out = {}
    for name in model.linear_names():
        w = np.asarray(model.linear_weight(name), dtype=np.float64)
        bias = model.linear_bias(name)
        if calib_inputs is None:
            out[name] = QuantizedLinear.from_fp(w, cfg.calibrate(w), bias=bias)
        else:
            out[name] = gptq_quantize(
                w,
                calib_inputs[name],
                cfg.qtype,
                cfg.granularity,
                cfg.scheme,
                group_size=cfg.group_size,
                act_order=True,
                method=cfg.method,
                bias=bias,
            )
    return out


def _best_time(fn: Any, repeats: int) -> tuple[Any, float]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return result, best


def evaluate_model(
    config: QuantConfig | Mapping[str, Any],
    model_dir: str | os.PathLike[str] | None = None,
    *,
    sentences: Sequence[str] | None = None,
    repeats: int = 1,
    gptq: bool = False,
) -> EvalReport:
    """Quantize every linear layer of the encoder in ``model_dir`` (default: the packaged
    all-MiniLM-L6-v2) and compare its embeddings with float32.

    By default every shipped sentence is encoded. With ``gptq=True`` the layers are
    calibrated by GPTQ on the inputs they see for the 60 shipped calibration sentences, and
    the comparison uses only the 20 held-out ones (unless ``sentences`` is given).

    Raises ImportError (naming the package to install) when ``tokenizers`` or the default
    model package is missing, FormatError for a malformed model directory, and
    InvalidParamsError for a bad config.
    """
    from .. import models

    cfg = QuantConfig.coerce(config)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise InvalidParamsError(f"repeats must be an integer >= 1; got {repeats!r}")
    if sentences is not None and (
        isinstance(sentences, str) or not all(isinstance(s, str) for s in sentences)
    ):
        # list("some text") would silently be one sentence per character
        raise InvalidInputError(f"sentences must be a list of strings; got {sentences!r:.80}")
    if not isinstance(gptq, bool):
        raise InvalidParamsError(f"gptq must be True or False; got {gptq!r}")
    default = "heldout" if gptq else "all"
    texts = list(models.sentences(default) if sentences is None else sentences)
    if not texts:
        raise InvalidInputError("sentences is empty; expected at least one sentence")
    model = models.load_minilm(model_dir)
    calib = model.layer_inputs(models.sentences("calib")) if gptq else None
    qlayers = quantize_linears(model, cfg, calib_inputs=calib)
    calibration = (
        f"gptq, act order, on {len(models.sentences('calib'))} calibration sentences"
        if gptq
        else "weights only"
    )
    qmodel = model.with_linears(qlayers)
    ef, t_float = _best_time(lambda: model.encode(texts), repeats)
    eq, t_quant = _best_time(lambda: qmodel.encode(texts), repeats)
    ef = ef.astype(np.float64)
    eq = eq.astype(np.float64)
    cos = np.sum(ef * eq, axis=1) / (np.linalg.norm(ef, axis=1) * np.linalg.norm(eq, axis=1))
    names = model.linear_names()
    b_float = sum(model.linear_weight(n).nbytes for n in names)
    b_quant = sum(
        a.nbytes
        for n in names
        for tn, a in layer_tensors(n, qlayers[n]).items()
        if not tn.endswith(".bias")
    )
    return EvalReport(
        model_dir=str(model.model_dir),
        config=cfg.to_dict(),
        calibration=calibration,
        n_sentences=len(texts),
        n_layers=len(names),
        cos_mean=float(cos.mean()),
        cos_min=float(cos.min()),
        bytes_float=int(b_float),
        bytes_quantized=int(b_quant),
        seconds_float=t_float,
        seconds_quantized=t_quant,
    )
