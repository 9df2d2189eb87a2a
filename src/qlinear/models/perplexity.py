"""Perplexity of a causal language model on a token sequence.

The tokens are cut into non-overlapping windows of ``ctx`` tokens (the last one may be
shorter; a last window of one token is dropped, it has nothing to score). Each window is
run on its own, from an empty context, and scored on every position but its first:

    nll  = -sum over windows w, positions t = 1 .. len(w) - 1 of log p(w[t] | w[:t])
    ppl  = exp(nll / n),  n = number of scored positions

``log p`` is a log-softmax of the float32 logits computed in float64 with the maximum
subtracted first, so no logit can overflow ``exp``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import InvalidInputError, InvalidParamsError

__all__ = ["PerplexityResult", "perplexity", "text_perplexity", "token_nll"]

# Rows of logits converted to float64 at once (bounds the float64 copy to ~100 MB for a
# 50k vocabulary).
_ROWS = 256


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """``perplexity = exp(nll / tokens)``; ``tokens`` scored positions, ``windows`` windows
    of at most ``ctx`` tokens, ``seconds`` the wall time of the forward passes."""

    perplexity: float
    nll: float
    tokens: int
    windows: int
    ctx: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """float ``(n, vocab)`` logits, int ``(n,)`` targets -> float64 ``(n,)``:
    ``-log softmax(logits)[i, targets[i]] = log sum exp(l_i - max l_i) + (max l_i - l_i[t_i])``,
    in float64."""
    lg = np.asarray(logits)
    tg = np.asarray(targets, dtype=np.int64)
    if lg.ndim != 2 or tg.shape != (lg.shape[0],):
        raise InvalidInputError(
            f"logits must be (n, vocab) and targets (n,); got {lg.shape} and {tg.shape}"
        )
    out = np.empty(lg.shape[0])
    for a in range(0, lg.shape[0], _ROWS):
        b = min(lg.shape[0], a + _ROWS)
        z = lg[a:b].astype(np.float64)
        if not np.all(np.isfinite(z)):
            raise InvalidInputError(
                "the model produced NaN or Inf logits; a linear layer returned non-finite values"
            )
        m = z.max(axis=1)
        # (m - z_t) first: adding m to the log-sum first would absorb it for huge logits
        out[a:b] = np.log(np.exp(z - m[:, None]).sum(axis=1)) + (m - z[np.arange(b - a), tg[a:b]])
    return out


def _check_ctx(ctx: object, max_positions: int | None) -> int:
    if isinstance(ctx, bool) or not isinstance(ctx, (int, np.integer)) or ctx < 2:
        raise InvalidParamsError(f"ctx must be an integer >= 2; got {ctx!r}")
    if max_positions is not None and ctx > max_positions:
        raise InvalidInputError(
            f"ctx {ctx} is longer than the model's max_position_embeddings {max_positions}; "
            f"expected ctx <= {max_positions}"
        )
    return int(ctx)


def perplexity(
    model: Callable[[np.ndarray], np.ndarray],
    ids: Sequence[int] | np.ndarray,
    *,
    ctx: int = 512,
    max_tokens: int | None = None,
    max_positions: int | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on token ids ``ids`` (see the module docstring).

    Args:
        model: a callable ``(seq,) int -> (seq, vocab) float logits``, e.g. a
            :class:`~qlinear.models.CausalLM`.
        ids: int ``(n,)`` token ids, n >= 2 (after ``max_tokens``).
        ctx: window length (>= 2). With a CausalLM, at most its
            ``config.max_position_embeddings`` (also taken from ``max_positions``).
        max_tokens: use only the first ``max_tokens`` ids (None: all).

    Raises:
        InvalidInputError: fewer than 2 tokens, ``ctx`` longer than the model's context,
            or non-finite logits.
        InvalidParamsError: a bad ``ctx`` or ``max_tokens``.
    """
    if max_positions is None:
        cfg = getattr(model, "config", None)
        max_positions = getattr(cfg, "max_position_embeddings", None)
    c = _check_ctx(ctx, max_positions)
    a = np.asarray(ids)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise InvalidInputError(
            f"ids must be a 1-D array of int token ids; got {a.dtype} {a.shape}"
        )
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)):
            raise InvalidParamsError(f"max_tokens must be an integer >= 2; got {max_tokens!r}")
        if max_tokens < 2:
            raise InvalidParamsError(f"max_tokens must be >= 2; got {max_tokens}")
        a = a[: int(max_tokens)]
    if a.size < 2:
        raise InvalidInputError(
            f"the text has {a.size} token(s); perplexity needs at least 2 (one to condition on, "
            "one to score)"
        )
    a = a.astype(np.int64)
    nll = 0.0
    n = 0
    windows = 0
    t0 = time.perf_counter()
    for start in range(0, a.size, c):
        w = a[start : start + c]
        if w.size < 2:
            break
        logits = np.asarray(model(w))
        if logits.ndim != 2 or logits.shape[0] != w.size:
            raise InvalidInputError(
                f"the model returned logits of shape {logits.shape} for {w.size} tokens; "
                "expected (seq, vocab)"
            )
        nll += float(token_nll(logits[:-1], w[1:]).sum())
        n += w.size - 1
        windows += 1
    seconds = time.perf_counter() - t0
    return PerplexityResult(
        perplexity=math.exp(nll / n),
        nll=nll,
        tokens=n,
        windows=windows,
        ctx=c,
        seconds=seconds,
    )


def text_perplexity(
    model: Any,
    text: str | None = None,
    *,
    ctx: int = 512,
    max_tokens: int | None = None,
) -> PerplexityResult:
    """:func:`perplexity` of a CausalLM on ``text`` tokenized by ``model.tokenizer``
    (no special tokens added); default text: the evaluation part of
    :mod:`qlinear.models.corpus`.

    Raises InvalidInputError for an empty text or one of fewer than 2 tokens, and
    InvalidParamsError when the model has no tokenizer."""
    from .corpus import corpus_text

    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise InvalidParamsError(
            "the model has no tokenizer (tokenizer.json, and the 'tokenizers' package); "
            "perplexity of a text needs one"
        )
    if text is None:
        text = corpus_text("eval")
    if not isinstance(text, str) or not text.strip():
        raise InvalidInputError("the text is empty; expected some text to score")
    max_positions = model.config.max_position_embeddings
    _check_ctx(ctx, max_positions)  # before tokenizing a long text
    return perplexity(
        model, tok.encode(text), ctx=ctx, max_tokens=max_tokens, max_positions=max_positions
    )
