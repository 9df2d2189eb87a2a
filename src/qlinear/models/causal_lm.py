"""CausalLM: a decoder-only language model (embedding, decoder layers, final RMSNorm,
language-model head) run in NumPy, with float or quantized linear layers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InvalidInputError, InvalidParamsError
from ..linear import QuantizedLinear
from .decoder_config import DecoderConfig
from .decoder_layer import DecoderLayer
from .decoder_ops import (
    Getter,
    PrefetchPlan,
    linear_dims,
    need_array,
    need_linear,
    rms_norm,
    run_linear,
)
from .kv_cache import KVCache
from .ops import FloatLinear, LinearLike
from .rope import inverse_frequencies, rope_tables

__all__ = ["CausalLM"]

_DEFAULT_CAPACITY = 512


def _nbytes(obj: Any, seen: set[int]) -> int:
    arrays = []
    if isinstance(obj, np.ndarray):
        arrays = [obj]
    elif isinstance(obj, FloatLinear):
        arrays = [obj.weight] + ([obj.bias] if obj.bias is not None else [])
    elif isinstance(obj, QuantizedLinear):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.nbytes
    else:
        return int(getattr(obj, "nbytes", 0))
    total = 0
    for a in arrays:
        base = a
        while isinstance(base.base, np.ndarray):
            base = base.base
        key = id(base)
        if key not in seen:
            seen.add(key)
            total += a.nbytes if base.base is not None else base.nbytes
    return total


def _check_logits(logits: np.ndarray) -> None:
    if not np.isfinite(logits).all():
        raise InvalidInputError(
            "the logits are not all finite (Inf/NaN); the input, a layer's weights or a "
            "replacement layer produced values beyond float32's range"
        )


class CausalLM:
    """A decoder LLM: ``logits = head(layers(embed(ids)))``.

    ``model(ids)`` / ``model.forward(ids, cache=None)``: ``ids`` int, 1-D ``(seq,)`` or
    2-D ``(batch, seq)`` -> float32 logits ``(..., seq, vocab)``. With a cache (from
    :meth:`new_cache`) the ids are the next tokens after what the cache holds; their
    keys and values are appended and their logits returned. Immutable apart from the
    cache, which the caller owns.
    """

    def __init__(
        self,
        config: DecoderConfig,
        embed_tokens: np.ndarray,
        layers: Sequence[DecoderLayer],
        norm: np.ndarray,
        lm_head: LinearLike | None = None,
        *,
        tokenizer: Any = None,
        source: str | None = None,
    ) -> None:
        self.config = config
        self._embed = embed_tokens
        self.layers: tuple[DecoderLayer, ...] = tuple(layers)
        self._norm = norm
        # None: tied to the embedding (logits = h @ embed_tokens.T)
        self._lm_head = lm_head
        self._head = FloatLinear(embed_tokens) if lm_head is None else lm_head
        self.tokenizer = tokenizer
        self.source = source
        self._inv_freq = inverse_frequencies(config.rope, config.head_dim)
        # per layer: its prefetch plans for after gate/up (down, then the next layer's
        # q/k/v) and after down (the next layer's q/k/v and o, or the head)
        nexts = (*(layer.first_linears for layer in self.layers[1:]), (self._head,))
        self._then = tuple(
            (PrefetchPlan(layer.mlp_down, *nxt[:1]), PrefetchPlan(*nxt))
            for layer, nxt in zip(self.layers, nexts, strict=True)
        )

    @classmethod
    def from_tensors(
        cls, config: DecoderConfig, get: Getter, *, tokenizer: Any = None, source: str | None = None
    ) -> CausalLM:
        """The whole model from ``get(name)`` (see :meth:`DecoderLayer.from_tensors`)."""
        c = config
        embed = need_array(get, "model.embed_tokens.weight", (c.vocab_size, c.hidden_size))
        layers = [DecoderLayer.from_tensors(c, i, get) for i in range(c.num_hidden_layers)]
        norm = need_array(get, "model.norm.weight", (c.hidden_size,))
        head = None
        if not c.tie_word_embeddings:
            head = need_linear(get, "lm_head", c.vocab_size, c.hidden_size, False)
        return cls(c, embed, layers, norm, head, tokenizer=tokenizer, source=source)

    # ------------------------------------------------------------ inputs
    def _check_ids(self, ids: Any, cache: KVCache | None) -> np.ndarray:
        a = np.asarray(ids)
        if a.dtype.kind not in "iu" or a.ndim not in (1, 2) or a.shape[-1] == 0:
            raise InvalidInputError(
                "token ids must be a non-empty 1-D (seq,) or 2-D (batch, seq) integer array; "
                f"got dtype {a.dtype}, shape {a.shape}"
            )
        v = self.config.vocab_size
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= v:
            raise InvalidInputError(
                f"token ids must lie in [0, {v - 1}] (vocab_size {v}); got values from {lo} to {hi}"
            )
        a2 = a.reshape(-1, a.shape[-1])
        if cache is not None:
            self.check_cache(cache)
        past = 0 if cache is None else cache.length
        limit = self.config.max_position_embeddings
        if past + a2.shape[1] > limit:
            raise InvalidInputError(
                f"context of {past + a2.shape[1]} tokens ({past} cached + {a2.shape[1]} new) "
                f"is longer than max_position_embeddings {limit}"
            )
        if cache is not None and cache.batch != a2.shape[0]:
            raise InvalidInputError(
                f"the cache holds batch {cache.batch}; got ids of batch {a2.shape[0]}"
            )
        return a2.astype(np.int64, copy=False)

    def check_cache(self, cache: Any) -> None:
        """InvalidInputError unless ``cache`` is a KVCache made for this model's shape."""
        c = self.config
        want = (c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
        if not isinstance(cache, KVCache):
            raise InvalidInputError(
                f"cache must be a KVCache from model.new_cache(); got {type(cache).__name__}"
            )
        got = (cache.num_layers, cache.num_kv_heads, cache.head_dim)
        if got != want:
            raise InvalidInputError(
                f"the cache has (layers, kv_heads, head_dim) = {got}; this model needs {want}"
            )

    # ------------------------------------------------------------ compute
    def new_cache(self, batch: int = 1, capacity: int | None = None) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` sequences (``capacity`` positions
        preallocated, default min(512, max_position_embeddings); it grows as needed)."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise InvalidParamsError(f"batch must be a positive integer; got {batch!r}")
        c = self.config
        cap = capacity or min(_DEFAULT_CAPACITY, c.max_position_embeddings)
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, c.head_dim, cap)

    def embed(self, ids: Any) -> np.ndarray:
        """int ``(B, T)`` (or ``(T,)``) -> float32 ``(B, T, hidden)``: rows of embed_tokens."""
        a = self._check_ids(ids, None)
        return self._embed[a].astype(np.float32, copy=False)

    def head(self, h: np.ndarray) -> np.ndarray:
        """float32 ``(B, T, hidden)`` -> float32 ``(B, T, vocab)``: final RMSNorm + lm_head.

        Raises InvalidInputError: h of another width, or logits that are not all finite."""
        a = np.asarray(h)
        if a.ndim < 1 or a.shape[-1] != self.config.hidden_size or a.dtype.kind != "f":
            raise InvalidInputError(
                f"h must be a float (..., {self.config.hidden_size}) array; got {a.dtype} {a.shape}"
            )
        with np.errstate(over="ignore", invalid="ignore"):
            logits = self._logits(a.astype(np.float32, copy=False))
        _check_logits(logits)
        return logits

    def _logits(self, h: np.ndarray) -> np.ndarray:
        x = rms_norm(h, self._norm, self.config.rms_norm_eps)
        lead = x.shape[:-1]
        y = run_linear(self._head, np.ascontiguousarray(x.reshape(-1, x.shape[-1])))
        return y.reshape(*lead, self.config.vocab_size)

    def forward(
        self, ids: Any, *, cache: KVCache | None = None, last_only: bool = False
    ) -> np.ndarray:
        """Logits float32 ``(..., seq, vocab)`` (``last_only``: ``(..., 1, vocab)``, the
        last position only, which is all greedy decoding needs).

        Raises InvalidInputError: ids not integers of 1 or 2 dimensions, out of
        ``[0, vocab_size)``, a context (cached + new) longer than
        max_position_embeddings, or a batch that differs from the cache's.
        """
        a = self._check_ids(ids, cache)
        h = self._embed[a].astype(np.float32, copy=False)
        start = 0 if cache is None else cache.length
        positions = np.arange(start, start + a.shape[1])
        rope = rope_tables(self._inv_freq, positions)  # shared by every layer
        # Overflow shows up as Inf/NaN in the logits, checked once below (no warnings).
        with np.errstate(over="ignore", invalid="ignore"):
            for layer, then in zip(self.layers, self._then, strict=True):
                h = layer.run(h, positions, cache, None, rope, then)
            if last_only:
                h = h[:, -1:]
            logits = self._logits(h)
        # Checked once here, not inside every layer: finite weights and ids cannot give
        # Inf/NaN short of an overflow, so this names a bad replacement layer or weight.
        _check_logits(logits)
        return logits if np.ndim(ids) == 2 else logits[0]

    __call__ = forward

    # ------------------------------------------------------------ linears
    def _all_linears(self) -> dict[str, LinearLike]:
        out: dict[str, LinearLike] = {}
        for layer in self.layers:
            out.update(layer.linears)
        out["lm_head"] = self._head  # tied: a FloatLinear over the embedding
        return out

    def linear_names(self) -> list[str]:
        """Every linear layer by Hugging Face name, without ``.weight`` (``lm_head`` only
        when it is not tied to the embedding)."""
        names = [n for layer in self.layers for n in layer.linear_names()]
        return names + (["lm_head"] if self._lm_head is not None else [])

    def linear(self, name: str) -> LinearLike:
        """The LinearLike in use for ``name`` (FloatLinear or QuantizedLinear);
        ``"lm_head"`` of a tied model is a FloatLinear viewing the embedding."""
        lin = self._all_linears().get(name)
        if lin is None:
            raise InvalidParamsError(
                f"no linear layer {name!r}; expected a name from linear_names(), such as "
                f"{self.linear_names()[0]!r}"
            )
        return lin

    def linear_weight(self, name: str) -> np.ndarray:
        """float32 ``(out, in)`` weight of ``name`` (dequantized when quantized)."""
        lin = self.linear(name)
        if isinstance(lin, FloatLinear):
            return lin.weight
        if isinstance(lin, QuantizedLinear):
            return lin.dequantize(np.float32)
        w = getattr(lin, "weight", None)
        if isinstance(w, np.ndarray) and w.shape == linear_dims(lin):
            return w.astype(np.float32, copy=False)
        if callable(getattr(lin, "dequantize", None)):  # OffsetLinear, Int8ActivationLinear
            return np.asarray(lin.dequantize(np.float32), dtype=np.float32)
        raise InvalidParamsError(f"layer {name!r} ({type(lin).__name__}) exposes no weight")

    def with_linears(self, mapping: Mapping[str, LinearLike]) -> CausalLM:
        """A new model with the named linears replaced; this one is unchanged.
        ``"lm_head"`` on a tied model gives it its own head (the embedding stays)."""
        known = set(self.linear_names()) | {"lm_head"}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise InvalidParamsError(
                f"no linear layers {unknown[:5]}; expected names from linear_names()"
            )
        for name, lin in mapping.items():
            if not hasattr(lin, "forward"):
                raise InvalidParamsError(
                    f"mapping[{name!r}] is a {type(lin).__name__}; expected a LinearLike "
                    "(an object with forward(x))"
                )
        layers = [layer.with_linears(mapping) for layer in self.layers]
        head = mapping.get("lm_head", self._lm_head)
        return CausalLM(
            self.config,
            self._embed,
            layers,
            self._norm,
            head,
            tokenizer=self.tokenizer,
            source=self.source,
        )

    @property
    def nbytes(self) -> int:
        """Bytes of all weights as held (shared arrays counted once)."""
        seen: set[int] = set()
        total = _nbytes(self._embed, seen) + _nbytes(self._norm, seen)
        for layer in self.layers:
            for lin in layer.linears.values():
                total += _nbytes(lin, seen)
            for arr in layer.norms.values():
                total += _nbytes(arr, seen)
        if self._lm_head is not None:
            total += _nbytes(self._lm_head, seen)
        return total

    def __repr__(self) -> str:
        c = self.config
        return (
            f"CausalLM({c.model_type}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
            f"vocab={c.vocab_size}, source={self.source!r})"
        )
