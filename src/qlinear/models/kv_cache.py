"""KVCache: the keys and values of every decoder layer, kept for incremental decoding."""

from __future__ import annotations

import numpy as np

__all__ = ["KVCache"]


class KVCache:
    """Preallocated float32 keys and values, ``(batch, num_kv_heads, capacity, head_dim)``
    per layer; ``capacity`` doubles when a call needs more (amortised O(1) per token).

    The one mutable object of a model: the caller owns it, a model only appends to it.
    ``length`` is the number of positions layer 0 holds (the next token's position).
    """

    __slots__ = ("_k", "_lengths", "_v", "batch", "head_dim", "num_kv_heads")

    def __init__(
        self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, capacity: int
    ) -> None:
        self.batch, self.num_kv_heads, self.head_dim = batch, num_kv_heads, head_dim
        shape = (batch, num_kv_heads, max(capacity, 1), head_dim)
        self._k = [np.empty(shape, dtype=np.float32) for _ in range(num_layers)]
        self._v = [np.empty(shape, dtype=np.float32) for _ in range(num_layers)]
        self._lengths = [0] * num_layers

    @property
    def num_layers(self) -> int:
        return len(self._k)

    @property
    def length(self) -> int:
        """Positions held by layer 0."""
        return self._lengths[0]

    @property
    def capacity(self) -> int:
        return int(self._k[0].shape[2])

    def layer_length(self, i: int) -> int:
        return self._lengths[i]

    def append(self, i: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append layer ``i``'s new keys and values ``(batch, kv_heads, T, head_dim)``;
        return views of all of them so far, ``(batch, kv_heads, length, head_dim)``."""
        n, t = self._lengths[i], k.shape[2]
        need = n + t
        if need > self._k[i].shape[2]:
            cap = max(2 * self._k[i].shape[2], need)
            for store in (self._k, self._v):
                new = np.empty((*store[i].shape[:2], cap, self.head_dim), dtype=np.float32)
                new[:, :, :n] = store[i][:, :, :n]
                store[i] = new
        self._k[i][:, :, n:need] = k
        self._v[i][:, :, n:need] = v
        self._lengths[i] = need
        return self._k[i][:, :, :need], self._v[i][:, :, :need]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._k) + sum(a.nbytes for a in self._v)

    def __repr__(self) -> str:
        return (
            f"KVCache(layers={self.num_layers}, batch={self.batch}, length={self.length}, "
            f"capacity={self.capacity})"
        )
