"""Rotary position embeddings (RoPE) as transformers computes them for llama-family models.

``inv_freq[j] = theta ** (-2j / head_dim)`` for ``j < head_dim / 2``, rescaled by the rope
type (see :func:`inverse_frequencies`); the angle of position ``p`` is ``p * inv_freq``,
duplicated over both halves of the head (``cat(freqs, freqs)``), and
``rotate(x) = x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)``.
"""

from __future__ import annotations

import math

import numpy as np

from ..kernels import native
from .decoder_config import RopeConfig
from .decoder_ops import native_ops_backend

__all__ = ["apply_rope", "inverse_frequencies", "rope_tables"]


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """float64 ``(head_dim // 2,)``.

    ``"linear"``: ``inv_freq / factor``. ``"llama3"``: with ``wavelen = 2 pi / inv_freq``,
    ``L = original_max_position_embeddings``: wavelengths above ``L / low_freq_factor`` are
    divided by ``factor``, those below ``L / high_freq_factor`` kept, and the band between
    interpolated with ``s = (L / wavelen - low) / (high - low)``:
    ``(1 - s) * inv_freq / factor + s * inv_freq``.
    """
    inv = 1.0 / rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if rope.rope_type == "linear":
        return inv / rope.factor
    if rope.rope_type == "llama3":
        old = rope.original_max_position_embeddings
        low_wl = old / rope.low_freq_factor
        high_wl = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wl, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return np.where(medium, smoothed, scaled)
    return inv


def rope_tables(inv_freq: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``positions`` int ``(T,)`` -> ``(cos, sin)``, each float32 ``(T, head_dim)``."""
    ang = positions.astype(np.float64)[:, None] * inv_freq[None, :]
    ang = np.concatenate([ang, ang], axis=1)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """``x`` float32 ``(B, H, T, D)``, ``cos``/``sin`` ``(T, D)`` (or broadcastable)
    -> ``x * cos + rotate_half(x) * sin``, a new float32 array."""
    half = x.shape[-1] // 2
    rot = np.empty_like(x)
    np.negative(x[..., half:], out=rot[..., :half])
    rot[..., half:] = x[..., :half]
    rot *= sin
    out = x * cos
    out += rot
    return out


def rope_rows(x: np.ndarray, heads: int, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """``x`` float32 ``(rows, heads * d)`` (a column slice of a fused projection is fine),
    ``cos``/``sin`` ``(t, d)`` with ``rows % t == 0`` -> float32 ``(rows, heads, d)``: the
    heads of row ``r`` rotated by table row ``r % t``, as :func:`apply_rope` (bit for
    bit); one native pass when the extension runs the model's float steps."""
    d = x.shape[1] // heads
    backend = native_ops_backend()
    if (
        backend
        and x.dtype == np.float32
        and x.strides[1] == 4
        and cos.dtype == sin.dtype == np.float32
        and cos.flags.c_contiguous
        and sin.flags.c_contiguous
    ):
        return native.rope_rows(backend, x, heads, cos, sin)
    t = cos.shape[0]
    x4 = x.reshape(-1, t, heads, d)
    return apply_rope(x4, cos[:, None], sin[:, None]).reshape(-1, heads, d)
