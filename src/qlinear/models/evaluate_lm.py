"""``qlinear eval --model DIR`` for decoder LLMs: what quantizing every linear costs.

:func:`evaluate_causal_lm` loads a float checkpoint, quantizes every decoder linear
(round to nearest from the weights, or layer-sequential GPTQ with ``gptq=True``; see
:mod:`qlinear.models.gptq_checkpoint`), and measures on the evaluation part of the
stdlib-docs corpus: perplexity of both models, bytes of the linear weights before and
after, and prefill / decode speed (a ``prompt_tokens`` prompt, ``new_tokens`` greedy
steps with the KV cache).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import InvalidParamsError
from ..io import layer_tensors
from ..linear import QuantizedLinear
from ..quantconfig import QuantConfig

__all__ = ["LMEvalReport", "evaluate_causal_lm"]


@dataclasses.dataclass(frozen=True)
class LMEvalReport:
    """Float vs quantized perplexity on ``tokens`` scored tokens, linear-weight bytes
    (float32 weights vs stored codes, scales and zero points; biases excluded), and
    tokens/s of prefill and greedy decode for both models."""

    model_dir: str
    config: dict[str, Any]
    calibration: str
    n_layers: int
    tokens: int
    ctx: int
    perplexity_float: float
    perplexity_quantized: float
    bytes_float: int
    bytes_quantized: int
    prefill_tokens_per_s_float: float
    prefill_tokens_per_s_quantized: float
    decode_tokens_per_s_float: float
    decode_tokens_per_s_quantized: float

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(dataclasses.asdict(self), indent=indent)


def _speed(model: Any, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    from .generate import GenerationStats, generate_tokens

    st = GenerationStats()
    for _ in generate_tokens(model, prompt, max_new_tokens=new_tokens, stats=st, eos_ids=set()):
        pass
    return st.prefill_tokens_per_s, st.decode_tokens_per_s


def evaluate_causal_lm(
    config: QuantConfig | Mapping[str, Any],
    model_dir: str | os.PathLike[str],
    *,
    gptq: bool = False,
    eval_tokens: int = 2048,
    ctx: int = 512,
    calib_samples: int = 128,
    calib_seqlen: int = 512,
    prompt_tokens: int = 64,
    new_tokens: int = 32,
) -> LMEvalReport:
    """Quantize every decoder linear of the float checkpoint ``model_dir`` and compare
    with float (see the module docstring). ``lm_head`` stays float with ``gptq`` (as the
    GPTQ writer leaves it) and is quantized by round to nearest otherwise, like
    ``qlinear quantize``.

    Raises FormatError for a malformed or unsupported checkpoint, InvalidParamsError for
    a bad config or option, InvalidInputError for too little calibration text."""
    from .corpus import corpus_text
    from .decoder_loading import load_causal_lm
    from .gptq_checkpoint import GPTQOptions, gptq_quantize_checkpoint
    from .perplexity import perplexity

    cfg = QuantConfig.coerce(config)
    for name, v in (("eval_tokens", eval_tokens), ("prompt_tokens", prompt_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 2:
            raise InvalidParamsError(f"{name} must be an integer >= 2; got {v!r}")
    if not isinstance(gptq, bool):
        raise InvalidParamsError(f"gptq must be True or False; got {gptq!r}")
    fp = load_causal_lm(model_dir)
    if fp.tokenizer is None:
        raise InvalidParamsError(f"{model_dir} has no usable tokenizer.json; eval needs one")
    names = [n for n in fp.linear_names() if not isinstance(fp.linear(n), QuantizedLinear)]
    limit = fp.config.max_position_embeddings  # small models: shorter windows and prompts
    ctx = min(ctx, limit)
    prompt_tokens = min(prompt_tokens, limit // 2)
    new_tokens = min(new_tokens, limit - prompt_tokens)
    ids = fp.tokenizer.encode(corpus_text("eval"))[:eval_tokens]
    with tempfile.TemporaryDirectory(prefix="qlinear-eval-") as tmp:
        if gptq:
            opts = GPTQOptions(samples=calib_samples, seqlen=calib_seqlen)
            gptq_quantize_checkpoint(
                model_dir, os.path.join(tmp, "q"), cfg, options=opts, progress=False
            )
            qm = load_causal_lm(os.path.join(tmp, "q"))
            calibration = f"gptq, act order, on {calib_samples} x {calib_seqlen} tokens"
        else:
            qlayers = {}
            for n in names:
                w = np.asarray(fp.linear_weight(n), dtype=np.float64)
                bias = getattr(fp.linear(n), "bias", None)
                qlayers[n] = QuantizedLinear.from_fp(w, cfg.calibrate(w), bias=bias)
            qm = fp.with_linears(qlayers)
            calibration = "weights only (round to nearest)"
        p_fp = perplexity(fp, ids, ctx=ctx)
        p_q = perplexity(qm, ids, ctx=ctx)
        prompt = ids[:prompt_tokens]
        s_fp = _speed(fp, prompt, new_tokens)
        s_q = _speed(qm, prompt, new_tokens)
        b_float = sum(fp.linear_weight(n).nbytes for n in names)
        b_q = 0
        for n in names:
            lin = qm.linear(n)
            if isinstance(lin, QuantizedLinear):
                b_q += sum(
                    a.nbytes for t, a in layer_tensors(n, lin).items() if not t.endswith(".bias")
                )
            else:
                b_q += fp.linear_weight(n).nbytes
        del qm
    return LMEvalReport(
        model_dir=str(model_dir),
        config=cfg.to_dict(),
        calibration=calibration,
        n_layers=len(names),
        tokens=p_fp.tokens,
        ctx=ctx,
        perplexity_float=p_fp.perplexity,
        perplexity_quantized=p_q.perplexity,
        bytes_float=int(b_float),
        bytes_quantized=int(b_q),
        prefill_tokens_per_s_float=s_fp[0],
        prefill_tokens_per_s_quantized=s_q[0],
        decode_tokens_per_s_float=s_fp[1],
        decode_tokens_per_s_quantized=s_q[1],
    )
