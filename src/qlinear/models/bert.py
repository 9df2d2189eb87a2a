"""A NumPy BERT encoder for sentence embeddings (the all-MiniLM-L6-v2 architecture).

The forward pass follows Hugging Face's ``BertModel`` plus sentence-transformers' mean
pooling and normalization, in float32 throughout:

    h    = LayerNorm(word[ids] + position[0..L) + token_type[type_ids])
    per layer:
        a    = softmax(Q K^T / sqrt(d_head) + mask) V          (12 heads)
        h    = LayerNorm(h + dense_attn(a))
        h    = LayerNorm(h + dense_out(gelu(dense_in(h))))    gelu(x) = x * Phi(x)
    e    = normalize(mean over real tokens of h)

Only real (non-padding) tokens are carried between layers: the hidden state is a
``(tokens, hidden)`` matrix of the batch's real tokens, scattered into a padded
``(batch, heads, L, d_head)`` layout only inside attention, where padded keys are masked.
So every linear layer sees exactly the real tokens (that is what ``capture`` records) and a
sentence's embedding does not depend on the sentences batched with it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import numpy as np

from ..errors import FormatError, InvalidInputError, InvalidParamsError, ShapeMismatchError
from .config import BertConfig
from .ops import FloatLinear, gelu, layer_norm

__all__ = ["BertModel"]

# The six linear layers of one encoder layer, in forward order.
_LAYER_LINEARS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


class BertModel:
    """A BERT sentence encoder run in NumPy float32, with swappable linear layers.

    Build one with :func:`qlinear.models.load_minilm` or :func:`qlinear.models.load_bert`.
    Immutable: :meth:`with_linears` returns a new model that shares the float tensors.

    Attributes:
        config: the encoder sizes.
        max_seq_length: sentences are truncated to this many tokens ([CLS] and [SEP]
            included), as sentence-transformers does (256 for all-MiniLM-L6-v2).
        model_dir: the directory the model was read from (None when built in memory).
    """

    def __init__(
        self,
        config: BertConfig,
        tensors: Mapping[str, np.ndarray],
        tokenizer: Any,
        *,
        max_seq_length: int,
        model_dir: str | None = None,
    ) -> None:
        """``tensors``: every name of ``config.tensor_shapes()`` with that shape (any float
        dtype, converted to float32); ``tokenizer``: an object with
        ``encode_batch(list[str]) -> list[list[int]]`` (see ``qlinear.models.tokenizer``)."""
        if not isinstance(config, BertConfig):
            raise InvalidParamsError(f"config must be a BertConfig; got {type(config).__name__}")
        if (
            isinstance(max_seq_length, bool)
            or not isinstance(max_seq_length, int)
            or not 2 <= max_seq_length <= config.max_position_embeddings
        ):
            raise InvalidParamsError(
                f"max_seq_length must be an integer in [2, {config.max_position_embeddings}] "
                f"(max_position_embeddings); got {max_seq_length!r}"
            )
        arrays: dict[str, np.ndarray] = {}
        for name, shape in config.tensor_shapes().items():
            if name not in tensors:
                raise FormatError(f"tensor {name!r} is missing; expected shape {shape}")
            a = np.asarray(tensors[name])
            if a.dtype.kind != "f":
                raise FormatError(f"tensor {name!r} has dtype {a.dtype}; expected a float dtype")
            if a.shape != shape:
                raise FormatError(f"tensor {name!r} has shape {a.shape}; expected {shape}")
            a = np.ascontiguousarray(a, dtype=np.float32)
            if not np.isfinite(a).all():
                raise FormatError(f"tensor {name!r} contains NaN or Inf")
            a.setflags(write=False)
            arrays[name] = a
        self.config = config
        self.max_seq_length = max_seq_length
        self.model_dir = model_dir
        self._tensors = arrays
        self._tokenizer = tokenizer
        self._names = tuple(
            f"encoder.layer.{i}.{lin}"
            for i in range(config.num_hidden_layers)
            for lin in _LAYER_LINEARS
        )
        self._linears: dict[str, Any] = {
            n: FloatLinear(arrays[n + ".weight"], arrays[n + ".bias"]) for n in self._names
        }

    # -- linear layers ---------------------------------------------------------------

    def linear_names(self) -> list[str]:
        """Every linear layer of the encoder, in forward order, named as in the checkpoint
        without the ``.weight`` suffix (``encoder.layer.0.attention.self.query``, ...)."""
        return list(self._names)

    def _check_name(self, name: str) -> None:
        if name not in self._linears:
            raise InvalidParamsError(
                f"unknown linear layer {name!r}; expected one of linear_names() "
                f"(e.g. {self._names[0]!r})"
            )

    def linear_weight(self, name: str) -> np.ndarray:
        """float32 ``(out, in)``: the float weight of linear ``name`` (read-only)."""
        self._check_name(name)
        return self._tensors[name + ".weight"]

    def linear_bias(self, name: str) -> np.ndarray:
        """float32 ``(out,)``: the float bias of linear ``name`` (read-only)."""
        self._check_name(name)
        return self._tensors[name + ".bias"]

    def linear(self, name: str) -> Any:
        """The object currently computing linear ``name`` (a FloatLinear unless replaced)."""
        self._check_name(name)
        return self._linears[name]

    def with_linears(self, mapping: Mapping[str, Any]) -> BertModel:
        """A new model where each ``name -> layer`` of ``mapping`` replaces that linear.

        ``layer.forward(x)`` gets float32 ``(tokens, in)`` and must return ``(tokens, out)``
        with the bias included (e.g. ``QuantizedLinear.from_fp(w, params, bias=b)``).
        Layers not in ``mapping`` keep their current implementation. Unknown names, objects
        without ``forward`` and layers whose ``in_features``/``out_features`` disagree with
        the float weight raise InvalidParamsError / ShapeMismatchError.
        """
        if not isinstance(mapping, Mapping):
            raise InvalidParamsError(
                f"mapping must be a mapping of layer name -> layer; got {type(mapping).__name__}"
            )
        new = dict(self._linears)
        for name, layer in mapping.items():
            self._check_name(name)
            if not callable(getattr(layer, "forward", None)):
                raise InvalidParamsError(
                    f"layer for {name!r} has no forward(x) method; got {type(layer).__name__}"
                )
            out_f, in_f = self._tensors[name + ".weight"].shape
            for attr, want in (("in_features", in_f), ("out_features", out_f)):
                got = getattr(layer, attr, want)
                if isinstance(got, (int, np.integer)) and got != want:
                    raise ShapeMismatchError(
                        f"layer for {name!r} has {attr}={got}; expected {want}"
                    )
            new[name] = layer
        clone = object.__new__(BertModel)
        clone.__dict__.update(self.__dict__)
        clone._linears = new
        return clone

    # -- forward ---------------------------------------------------------------------

    def tokenize(self, sentences: Sequence[str]) -> list[list[int]]:
        """Token ids of each sentence: ``[CLS] ... [SEP]``, stripped of surrounding
        whitespace and truncated to ``max_seq_length`` as sentence-transformers does."""
        texts = _check_sentences(sentences)
        ids = self._tokenizer.encode_batch([t.strip() for t in texts])
        vocab = self.config.vocab_size
        for i, seq in enumerate(ids):
            if len(seq) == 0 or len(seq) > self.max_seq_length:
                raise FormatError(
                    f"tokenizer returned {len(seq)} tokens for sentence {i}; expected 1 to "
                    f"{self.max_seq_length}"
                )
            if min(seq) < 0 or max(seq) >= vocab:
                raise FormatError(
                    f"tokenizer returned token id {max(seq)} for sentence {i}; the model's "
                    f"vocab_size is {vocab} (tokenizer.json does not match the model)"
                )
        return [list(s) for s in ids]

    def encode(
        self,
        sentences: Sequence[str],
        *,
        batch_size: int = 32,
        capture: MutableMapping[str, list[np.ndarray]] | None = None,
    ) -> np.ndarray:
        """float32 ``(n, hidden)``: the unit-norm sentence embeddings of ``sentences``.

        ``e = m / max(||m||, 1e-12)``, ``m`` the mean of the last hidden states over the
        sentence's tokens (padding excluded). Sentences are processed ``batch_size`` at a
        time, shortest first (less padding); the result is in input order.

        ``capture``: when a dict is given, for every linear layer ``name`` the float32
        input ``(tokens, in_features)`` it received in each batch (real tokens only, no
        padding) is appended to ``capture[name]`` (a list, created if absent); stacking a
        layer's list with ``np.concatenate`` gives all tokens of all sentences. The
        arrays are not copied (query, key and value share one): treat them as read-only.
        """
        texts = _check_sentences(sentences)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
            raise InvalidParamsError(f"batch_size must be a positive integer; got {batch_size!r}")
        if batch_size < 1:
            raise InvalidParamsError(f"batch_size must be a positive integer; got {batch_size}")
        if capture is not None and not isinstance(capture, MutableMapping):
            raise InvalidParamsError(
                f"capture must be a dict (or None); got {type(capture).__name__}"
            )
        out = np.zeros((len(texts), self.config.hidden_size), dtype=np.float32)
        if not texts:
            return out
        ids = self.tokenize(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), int(batch_size)):
            idx = order[start : start + int(batch_size)]
            out[idx] = self._forward_batch([ids[i] for i in idx], capture)
        if not np.isfinite(out).all():
            raise InvalidInputError(
                "the model produced NaN or Inf embeddings; a replaced linear layer returned "
                "non-finite values"
            )
        return out

    def layer_inputs(
        self, sentences: Sequence[str], *, batch_size: int = 32
    ) -> dict[str, np.ndarray]:
        """``{name: float32 (tokens, in_features)}``: every linear layer's input over all
        real tokens of ``sentences`` (``encode`` with ``capture``, batches concatenated).
        Rows are in processing order (shortest sentence first), the same for every layer.
        """
        capture: dict[str, list[np.ndarray]] = {}
        self.encode(sentences, batch_size=batch_size, capture=capture)
        return {
            name: np.concatenate(capture[name])
            if name in capture
            else np.zeros((0, self._tensors[name + ".weight"].shape[1]), dtype=np.float32)
            for name in self._names
        }

    def _linear(
        self,
        name: str,
        x: np.ndarray,
        capture: MutableMapping[str, list[np.ndarray]] | None,
    ) -> np.ndarray:
        if capture is not None:
            capture.setdefault(name, []).append(x)
        y = np.asarray(self._linears[name].forward(x))
        out_f = self._tensors[name + ".weight"].shape[0]
        if y.shape != (x.shape[0], out_f):
            raise ShapeMismatchError(
                f"linear {name!r} returned shape {y.shape}; expected {(x.shape[0], out_f)}"
            )
        return y.astype(np.float32, copy=False)

    def _forward_batch(
        self,
        ids: list[list[int]],
        capture: MutableMapping[str, list[np.ndarray]] | None,
    ) -> np.ndarray:
        """float32 ``(batch, hidden)`` pooled, normalized embeddings of one batch."""
        cfg, t = self.config, self._tensors
        n_heads = cfg.num_attention_heads
        d_head = cfg.hidden_size // n_heads
        eps = cfg.layer_norm_eps
        lengths = np.array([len(s) for s in ids], dtype=np.int64)
        b, seq = len(ids), int(lengths.max())
        mask = np.arange(seq)[None, :] < lengths[:, None]  # (b, seq), True = real token
        flat = mask.reshape(-1)
        tok = np.concatenate([np.asarray(s, dtype=np.int64) for s in ids])  # (tokens,)
        pos = np.concatenate([np.arange(n) for n in lengths])

        h = (
            t["embeddings.word_embeddings.weight"][tok]
            + t["embeddings.position_embeddings.weight"][pos]
            + t["embeddings.token_type_embeddings.weight"][0]
        )
        h = layer_norm(h, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)

        # Additive key mask, as Hugging Face builds it: 0 for real keys, float32 min for
        # padding, so exp() of a padded score is exactly 0 after the max subtraction.
        key_bias = np.where(mask, np.float32(0), np.finfo(np.float32).min).astype(np.float32)
        key_bias = key_bias[:, None, None, :]  # (b, 1, 1, seq)
        scale = np.float32(1.0 / math.sqrt(d_head))

        def to_heads(x: np.ndarray) -> np.ndarray:
            padded = np.zeros((b * seq, cfg.hidden_size), dtype=np.float32)
            padded[flat] = x
            return padded.reshape(b, seq, n_heads, d_head).transpose(0, 2, 1, 3)

        for i in range(cfg.num_hidden_layers):
            p = f"encoder.layer.{i}."
            q = to_heads(self._linear(p + "attention.self.query", h, capture))
            k = to_heads(self._linear(p + "attention.self.key", h, capture))
            v = to_heads(self._linear(p + "attention.self.value", h, capture))
            scores = (q * scale) @ k.transpose(0, 1, 3, 2) + key_bias  # (b, heads, seq, seq)
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            ctx = (scores @ v).transpose(0, 2, 1, 3).reshape(b * seq, cfg.hidden_size)[flat]
            a = self._linear(p + "attention.output.dense", ctx, capture)
            h = layer_norm(
                a + h,
                t[p + "attention.output.LayerNorm.weight"],
                t[p + "attention.output.LayerNorm.bias"],
                eps,
            )
            inter = gelu(self._linear(p + "intermediate.dense", h, capture))
            o = self._linear(p + "output.dense", inter, capture)
            h = layer_norm(
                o + h, t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"], eps
            )

        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        pooled = np.add.reduceat(h, starts, axis=0) / lengths[:, None].astype(np.float32)
        norm = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norm, np.float32(1e-12))).astype(np.float32)


def _check_sentences(sentences: Any) -> list[str]:
    if isinstance(sentences, (str, bytes)):
        raise InvalidInputError(
            "sentences must be a list of strings; got a single string (wrap it in a list)"
        )
    try:
        texts = list(sentences)
    except TypeError:
        raise InvalidInputError(
            f"sentences must be a list of strings; got {type(sentences).__name__}"
        ) from None
    for i, s in enumerate(texts):
        if not isinstance(s, str):
            raise InvalidInputError(f"sentences[{i}] must be a str; got {type(s).__name__}")
    return texts
