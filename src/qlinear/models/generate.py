"""Token generation for causal LMs: sampling, the decode loop with a KV cache, and
incremental detokenisation that never splits a UTF-8 character.

:func:`sample_next` picks the next token from one row of logits:

* ``temperature == 0``: greedy, ``argmax(logits)`` (ties to the lowest id, as
  ``torch.argmax`` and transformers' greedy search).
* otherwise ``p = softmax(logits / temperature)`` (float64, max subtracted), restricted to
  the ``top_k`` most likely ids (ties to the lower id) and then to the smallest set of the
  most likely ids whose mass reaches ``top_p``, renormalised (:func:`sampling_distribution`),
  and sampled by inverting its cumulative distribution (in id order) at one uniform draw
  from ``rng`` (a NumPy Generator): the same seed gives the same tokens.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..errors import InvalidInputError, InvalidParamsError

__all__ = [
    "GenerationStats",
    "SamplingOptions",
    "StreamDecoder",
    "generate_tokens",
    "sample_next",
    "sampling_distribution",
]


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """``temperature`` >= 0 (0: greedy); ``top_k`` None or >= 1; ``top_p`` in (0, 1]."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float, np.number)):
            raise InvalidParamsError(f"temperature must be a number >= 0; got {t!r}")
        if not (np.isfinite(t) and t >= 0):
            raise InvalidParamsError(f"temperature must be finite and >= 0; got {t}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
            raise InvalidParamsError(f"top_k must be an integer >= 1 (or None); got {k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float, np.number)) or not 0 < p <= 1:
            raise InvalidParamsError(f"top_p must be a number in (0, 1]; got {p!r}")


def sampling_distribution(logits: np.ndarray, options: SamplingOptions) -> np.ndarray:
    """float ``(vocab,)`` logits -> float64 ``(vocab,)`` probabilities the sampler draws
    from (temperature > 0): softmax of ``logits / T``, zero outside the top-k and top-p
    sets, renormalised to sum to 1."""
    z = np.asarray(logits, dtype=np.float64) / float(options.temperature)
    order = np.argsort(-z, kind="stable")  # most likely first, ties to the lower id
    if options.top_k is not None:
        order = order[: int(options.top_k)]
    zs = z[order]
    p = np.exp(zs - zs[0])
    p /= p.sum()
    if options.top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p (at least one id)
        keep = int(np.searchsorted(np.cumsum(p), options.top_p, side="left")) + 1
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    out = np.zeros(z.shape[0])
    out[order] = p
    return out


def sample_next(
    logits: np.ndarray, options: SamplingOptions, rng: np.random.Generator | None = None
) -> int:
    """The next token id from float ``(vocab,)`` logits (see the module docstring)."""
    lg = np.asarray(logits)
    if lg.ndim != 1 or lg.size == 0:
        raise InvalidInputError(f"logits must be 1-D (vocab,); got shape {lg.shape}")
    if not np.all(np.isfinite(lg)):
        raise InvalidInputError("logits contain NaN or Inf; expected finite values")
    if options.temperature == 0:
        return int(np.argmax(lg))
    if rng is None:
        raise InvalidParamsError("sampling (temperature > 0) needs rng, a numpy Generator")
    c = np.cumsum(sampling_distribution(lg, options))
    u = rng.random() * c[-1]
    # first id whose cumulative mass exceeds u: ids outside the kept set add no mass
    return int(min(np.searchsorted(c, u, side="right"), c.size - 1))


class StreamDecoder:
    """Text of a growing token sequence, released piece by piece without splitting a
    UTF-8 character: a byte-level token may end in the middle of one, which the
    tokenizer decodes as U+FFFD; such a tail is held back until the next token
    completes it (or :meth:`flush` gives it up)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the ids re-decoded for context (spaces, merges)
        self._read = 0  # ids before this are already released

    def push(self, token: int) -> str:
        """Add one token id; return the new text that is now complete ('' if none)."""
        self._ids.append(int(token))
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        text = self._tok.decode(self._ids[self._prefix :])
        if text.endswith("\ufffd") or len(text) <= len(prefix_text):
            return ""
        new = text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        return new

    def flush(self) -> str:
        """Whatever is held back (possibly with U+FFFD for an incomplete character)."""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        text = self._tok.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(prefix_text) :]


@dataclasses.dataclass
class GenerationStats:
    """Filled in by :func:`generate_tokens` as it runs."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stopped_at_eos: bool = False

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # the first token comes out of the prefill; the others from one step each
        steps = self.generated_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0


def _eos_ids(model: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "config", None), getattr(model, "tokenizer", None)):
        v = getattr(src, "eos_token_id", None)
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            ids.add(int(v))
        elif isinstance(v, (list, tuple)):
            ids.update(int(i) for i in v)
    return ids


def generate_tokens(
    model: Any,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int = 64,
    options: SamplingOptions | None = None,
    seed: int | None = None,
    eos_ids: set[int] | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` new token ids after ``prompt_ids``, one at a time,
    stopping after an end-of-sequence id (yielded; default: the model's eos ids).

    ``model`` has ``new_cache()`` and ``forward(ids, cache=..., last_only=True)`` (a
    CausalLM): the
    prompt is run once (prefill) and every new token is one cached step. ``stats``, if
    given, receives token counts and the prefill/decode wall times.
    """
    opts = options if options is not None else SamplingOptions()
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
        raise InvalidParamsError(f"max_new_tokens must be an integer >= 0; got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise InvalidParamsError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
    ids = np.asarray(list(prompt_ids), dtype=np.int64)
    if ids.ndim != 1 or ids.size == 0:
        raise InvalidInputError("the prompt has no tokens; expected at least one")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and ids.size + max_new_tokens > limit:
        raise InvalidInputError(
            f"{ids.size} prompt tokens + {max_new_tokens} new ones exceed the model's "
            f"max_position_embeddings {limit}"
        )
    st = stats if stats is not None else GenerationStats()
    st.prompt_tokens = int(ids.size)
    eos = _eos_ids(model) if eos_ids is None else set(eos_ids)
    rng = np.random.default_rng(seed)
    if max_new_tokens == 0:
        return
    cache = model.new_cache()
    t0 = time.perf_counter()
    logits = np.asarray(model.forward(ids, cache=cache, last_only=True))
    tok = sample_next(logits[-1], opts, rng)
    st.prefill_seconds = time.perf_counter() - t0
    st.generated_tokens = 1
    yield tok
    for _ in range(max_new_tokens - 1):
        if tok in eos:
            break
        t1 = time.perf_counter()
        logits = np.asarray(
            model.forward(np.array([tok], dtype=np.int64), cache=cache, last_only=True)
        )
        tok = sample_next(logits[-1], opts, rng)
        st.decode_seconds += time.perf_counter() - t1  # the model's time, not the caller's
        st.generated_tokens += 1
        yield tok
    st.stopped_at_eos = tok in eos
