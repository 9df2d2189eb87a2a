"""The layer-level surface of a BERT encoder, as decoder layers have it, for
layer-sequential GPTQ (:mod:`qlinear.models.gptq_checkpoint`): embeddings, then
``layer.forward(h, capture=...)`` one encoder layer at a time, each built from a tensor
getter so that only one layer's weights are read.

Sequences are unpadded and of equal length (calibration windows), so no attention mask is
needed; the arithmetic is :class:`~qlinear.models.BertModel`'s, layer for layer:

    h = LayerNorm(h + dense_attn(softmax(Q K^T / sqrt(d_head)) V))
    h = LayerNorm(h + dense_out(gelu(dense_in(h))))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .config import BertConfig
from .ops import FloatLinear, gelu, layer_norm

__all__ = ["BertLayer", "bert_embed"]

_Q, _K, _V = "attention.self.query", "attention.self.key", "attention.self.value"
_O, _IN, _OUT = "attention.output.dense", "intermediate.dense", "output.dense"


def bert_embed(cfg: BertConfig, get: Callable[[str], np.ndarray], ids: np.ndarray) -> np.ndarray:
    """int ``(B, T)`` -> float32 ``(B, T, hidden)``:
    ``LayerNorm(word[ids] + position[0..T) + token_type[0])``."""
    t = ids.shape[1]
    h = (
        np.asarray(get("embeddings.word_embeddings.weight"), dtype=np.float32)[ids]
        + np.asarray(get("embeddings.position_embeddings.weight"), dtype=np.float32)[:t]
        + np.asarray(get("embeddings.token_type_embeddings.weight"), dtype=np.float32)[0]
    )
    w = np.asarray(get("embeddings.LayerNorm.weight"), dtype=np.float32)
    b = np.asarray(get("embeddings.LayerNorm.bias"), dtype=np.float32)
    return layer_norm(h, w, b, cfg.layer_norm_eps)


class BertLayer:
    """Encoder layer ``index``: ``forward(h (B, T, hidden), capture=None)`` -> float32
    ``(B, T, hidden)``; ``linears`` name -> layer, ``linear_groups()`` the true-sequential
    order ``[[q, k, v], [attention output], [intermediate], [output]]``."""

    def __init__(
        self, cfg: BertConfig, index: int, linears: Mapping[str, Any], norms: Mapping[str, Any]
    ) -> None:
        self.config, self.index = cfg, index
        self.prefix = f"encoder.layer.{index}."
        self._lin, self._norms = dict(linears), dict(norms)

    @classmethod
    def from_tensors(cls, cfg: BertConfig, index: int, get: Callable[[str], Any]) -> BertLayer:
        p = f"encoder.layer.{index}."
        lin = {
            p + n: FloatLinear(get(p + n + ".weight"), get(p + n + ".bias"))
            for n in (_Q, _K, _V, _O, _IN, _OUT)
        }
        norms = {
            k: np.asarray(get(p + n), dtype=np.float32)
            for k, n in (
                ("attn_w", "attention.output.LayerNorm.weight"),
                ("attn_b", "attention.output.LayerNorm.bias"),
                ("out_w", "output.LayerNorm.weight"),
                ("out_b", "output.LayerNorm.bias"),
            )
        }
        return cls(cfg, index, lin, norms)

    @property
    def linears(self) -> dict[str, Any]:
        return dict(self._lin)

    def linear_groups(self) -> list[list[str]]:
        p = self.prefix
        return [[p + _Q, p + _K, p + _V], [p + _O], [p + _IN], [p + _OUT]]

    def with_linears(self, mapping: Mapping[str, Any]) -> BertLayer:
        lin = {**self._lin, **{k: v for k, v in mapping.items() if k in self._lin}}
        return BertLayer(self.config, self.index, lin, self._norms)

    def _apply(self, name: str, x: np.ndarray, capture: Any) -> np.ndarray:
        lin = self._lin[self.prefix + name]
        if capture is not None:
            lin = capture(self.prefix + name, x) or lin
        return np.asarray(lin.forward(x), dtype=np.float32)

    def forward(self, h: np.ndarray, *, capture: Any = None) -> np.ndarray:
        cfg = self.config
        b, t, hid = h.shape
        nh = cfg.num_attention_heads
        dh = hid // nh
        x = np.ascontiguousarray(h, dtype=np.float32).reshape(b * t, hid)

        def heads(a: np.ndarray) -> np.ndarray:
            return a.reshape(b, t, nh, dh).transpose(0, 2, 1, 3)

        q, k, v = (heads(self._apply(n, x, capture)) for n in (_Q, _K, _V))
        scores = (q * np.float32(1.0 / math.sqrt(dh))) @ k.transpose(0, 1, 3, 2)
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        ctx = np.ascontiguousarray((scores @ v).transpose(0, 2, 1, 3).reshape(b * t, hid))
        a = self._apply(_O, ctx, capture)
        n = self._norms
        x = layer_norm(a + x, n["attn_w"], n["attn_b"], cfg.layer_norm_eps)
        inter = gelu(self._apply(_IN, x, capture))
        o = self._apply(_OUT, inter, capture)
        x = layer_norm(o + x, n["out_w"], n["out_b"], cfg.layer_norm_eps)
        return x.reshape(b, t, hid)

    __call__ = forward
