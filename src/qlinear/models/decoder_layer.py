"""DecoderLayer: one pre-norm transformer block of a llama-family decoder.

``h = x + o_proj(attention(input_layernorm(x)))``, then
``y = h + mlp(post_attention_layernorm(h))`` with a SwiGLU MLP or an MoE block.
Attention: q, k, v projections (q/k RMSNorm for Qwen3 per head and OLMoE over the whole
projection, before RoPE), RoPE, grouped-query attention with a causal (optionally
sliding-window) mask, softmax in float32, scaled by ``head_dim ** -0.5``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import InvalidInputError
from .decoder_config import DecoderConfig
from .decoder_moe import MoEBlock
from .decoder_ops import (
    Capture,
    Getter,
    PrefetchPlan,
    fuse_linears,
    need_array,
    need_linear,
    offer,
    rms_norm,
    run_linear,
    softmax_rows,
    swiglu,
)
from .kv_cache import KVCache
from .ops import FloatLinear, LinearLike
from .rope import apply_rope, inverse_frequencies, rope_rows, rope_tables

__all__ = ["Capture", "DecoderLayer"]


def _attention_names(prefix: str) -> list[str]:
    return [f"{prefix}self_attn.{n}_proj" for n in ("q", "k", "v", "o")]


def _mlp_names(prefix: str) -> list[str]:
    return [f"{prefix}mlp.{n}_proj" for n in ("gate", "up", "down")]


_SCORE_ELEMENTS = 1 << 23  # attention scores held at once (32 MiB of float32)


def _attend(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    nkv: int,
    lo: np.ndarray,
    hi: np.ndarray,
) -> np.ndarray:
    """``softmax(q k^T / sqrt(d) + mask) v`` for q ``(b, nh, t, d)``, k, v
    ``(b, nkv, s, d)`` -> ``(b, nh, t, d)`` float32, where query ``i`` sees keys ``lo[i]
    .. hi[i]`` (int64 ``(t,)``: the causal and sliding-window mask as ranges). The query
    heads of one KV head are stacked into one matmul (GQA); queries go in blocks so that
    the scores never exceed ``_SCORE_ELEMENTS`` floats, whatever the context length."""
    b, nh, t, d = q.shape
    s, g = k.shape[2], nh // nkv
    scale = d**-0.5
    if t == 1:  # a decode step: no block loop, no output buffer
        scores = q.reshape(b, nkv, g, d) @ k.transpose(0, 1, 3, 2)  # (b, nkv, g, s)
        scores = softmax_rows(scores.reshape(b * nkv * g, 1, s), scale, lo, hi)
        return (scores.reshape(b, nkv, g, s) @ v).reshape(b, nh, 1, d)
    if b > 1 and b * nh * t * s > _SCORE_ELEMENTS:  # one sequence at a time, then blocks
        return np.concatenate(
            [_attend(q[i : i + 1], k[i : i + 1], v[i : i + 1], nkv, lo, hi) for i in range(b)]
        )
    q5 = q.reshape(b, nkv, g, t, d)
    kt = k.transpose(0, 1, 3, 2)
    out = np.empty((b, nkv, g, t, d), dtype=np.float32)
    # Blocks of queries (one for most prompts); each multiplies only the keys its
    # queries see. Smaller blocks to skip the causal upper triangle measured slower
    # (4.7 ms for one 512-query block of SmolLM2's heads, 6.4-8.8 ms in blocks of
    # 64-256: the matmuls on slices cost more than the skipped products).
    rows = max(1, _SCORE_ELEMENTS // (b * nh * s))
    for i0 in range(0, t, rows):
        i1 = min(t, i0 + rows)
        c = i1 - i0
        k0, k1 = int(lo[i0:i1].min()), int(hi[i0:i1].max()) + 1
        qb = q5[:, :, :, i0:i1].reshape(b, nkv, g * c, d)
        scores = qb @ kt[..., k0:k1]  # (b, nkv, g*c, k1 - k0)
        scores = softmax_rows(
            scores.reshape(b * nkv * g, c, k1 - k0), scale, lo[i0:i1] - k0, hi[i0:i1] - k0
        )
        pv = scores.reshape(b, nkv, g * c, k1 - k0) @ v[:, :, k0:k1]
        out[:, :, :, i0:i1] = pv.reshape(b, nkv, g, c, d)
    return out.reshape(b, nh, t, d)


class DecoderLayer:
    """One decoder block; immutable. Build with :meth:`from_tensors`.

    ``forward(h, positions=None, cache=None, capture=None)``: ``h`` float32
    ``(B, T, hidden)`` -> float32 ``(B, T, hidden)``. ``positions`` int ``(T,)``, the
    absolute positions of the T tokens (default: after what ``cache`` holds, else
    ``0..T-1``). With a cache the layer appends its keys and values and attends to all of
    them. ``capture(name, x)`` is called with the float32 ``(tokens, in)`` input of every
    linear just before it is applied, in execution order; a LinearLike it returns is used
    instead for this call.
    """

    __slots__ = (
        "_gate_up",
        "_inv_freq",
        "_lin",
        "_moe",
        "_norms",
        "_pf",
        "_qkv",
        "config",
        "index",
        "prefix",
    )

    def __init__(
        self,
        config: DecoderConfig,
        index: int,
        linears: Mapping[str, LinearLike],
        norms: Mapping[str, np.ndarray],
        moe: MoEBlock | None = None,
        *,
        _fused: Mapping[str, LinearLike | None] | None = None,
    ) -> None:
        self.config, self.index = config, index
        self.prefix = f"model.layers.{index}."
        self._lin = dict(linears)
        self._norms = dict(norms)
        self._moe = moe
        self._inv_freq = inverse_frequencies(config.rope, config.head_dim)
        q, k, v, _ = _attention_names(self.prefix)
        reuse = _fused or {}  # groups with_linears left unchanged keep their fused layer
        self._qkv = reuse["qkv"] if "qkv" in reuse else self._fuse([q, k, v])
        self._gate_up = None
        if moe is None:
            g, u, _ = _mlp_names(self.prefix)
            self._gate_up = reuse["gate_up"] if "gate_up" in reuse else self._fuse([g, u])
        # what the next two linear calls read, prefetched by the kernels' pool worker
        # while this thread runs the NumPy steps and the next call (decode is
        # memory-bound; two ahead measured 8-17% faster than one, four no better)
        o = self._lin[_attention_names(self.prefix)[3]]
        down = None if moe is not None else self._lin[_mlp_names(self.prefix)[2]]
        self._pf = {
            "qkv": PrefetchPlan(o, self._gate_up),
            "o": PrefetchPlan(self._gate_up, down),
            "gate_up": PrefetchPlan(down),  # without the model's plans (a layer alone)
        }

    def _fuse(self, names: list[str]) -> LinearLike | None:
        """The fused layer of ``names``; float parts become row views of the fused weight
        (so the float weights are held once, not twice)."""
        fused = fuse_linears([self._lin[n] for n in names])
        if isinstance(fused, FloatLinear):
            start = 0
            for n in names:
                stop = start + self._lin[n].out_features  # type: ignore[attr-defined]
                b = None if self._lin[n].bias is None else fused.bias[start:stop]  # type: ignore[attr-defined,index]
                self._lin[n] = FloatLinear(fused.weight[start:stop], b)
                start = stop
        return fused

    # ------------------------------------------------------------ construction
    @classmethod
    def from_tensors(cls, config: DecoderConfig, index: int, get: Getter) -> DecoderLayer:
        """Layer ``index`` from ``get(name)``, which returns an array or a LinearLike for
        Hugging Face tensor names (``"model.layers.3.mlp.up_proj.weight"``; for a
        LinearLike, ``"....up_proj.weight"`` may return the layer itself).

        Raises FormatError naming a missing or misshaped tensor, with the expected shape.
        """
        c = config
        p = f"model.layers.{index}."
        h, nq, nkv = (
            c.hidden_size,
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        )
        q, k, v, o = _attention_names(p)
        lin: dict[str, LinearLike] = {
            q: need_linear(get, q, nq, h, c.qkv_bias),
            k: need_linear(get, k, nkv, h, c.qkv_bias),
            v: need_linear(get, v, nkv, h, c.qkv_bias),
            o: need_linear(get, o, h, nq, c.o_bias),
        }
        norms = {
            "input": need_array(get, p + "input_layernorm.weight", (h,)),
            "post": need_array(get, p + "post_attention_layernorm.weight", (h,)),
        }
        if c.qk_norm == "head":
            norms["q"] = need_array(get, p + "self_attn.q_norm.weight", (c.head_dim,))
            norms["k"] = need_array(get, p + "self_attn.k_norm.weight", (c.head_dim,))
        elif c.qk_norm == "full":
            norms["q"] = need_array(get, p + "self_attn.q_norm.weight", (nq,))
            norms["k"] = need_array(get, p + "self_attn.k_norm.weight", (nkv,))
        moe = None
        if c.moe_layers[index]:
            moe = MoEBlock.from_tensors(c, p, get)
        else:
            g, u, d = _mlp_names(p)
            f = c.intermediate_size
            lin[g] = need_linear(get, g, f, h, c.mlp_bias)
            lin[u] = need_linear(get, u, f, h, c.mlp_bias)
            lin[d] = need_linear(get, d, h, f, c.mlp_bias)
        return cls(c, index, lin, norms, moe)

    def with_linears(self, mapping: Mapping[str, LinearLike]) -> DecoderLayer:
        """A new layer with the named linears replaced (names from :meth:`linear_names`;
        others are ignored); this one is unchanged. Unchanged fused groups (q/k/v,
        gate/up) are shared with this layer, not rebuilt."""
        touched = set(mapping) & set(self.linears)
        if not touched:
            return self
        lin = {**self._lin, **{k: mapping[k] for k in touched if k in self._lin}}
        moe = self._moe
        if moe is not None and touched - set(self._lin):
            moe = moe.with_linears(mapping)
        q, k, v, _ = _attention_names(self.prefix)
        g, u, _ = _mlp_names(self.prefix)
        fused: dict[str, LinearLike | None] = {}
        if not touched & {q, k, v}:
            fused["qkv"] = self._qkv
        if not touched & {g, u}:
            fused["gate_up"] = self._gate_up
        return DecoderLayer(self.config, self.index, lin, self._norms, moe, _fused=fused)

    # ------------------------------------------------------------ introspection
    @property
    def linears(self) -> dict[str, LinearLike]:
        """Every linear of the layer by Hugging Face name (without ``.weight``)."""
        out = dict(self._lin)
        if self._moe is not None:
            out.update(self._moe.linears)
        return out

    @property
    def first_linears(self) -> tuple[LinearLike | None, LinearLike]:
        """The two linears :meth:`run` calls first: q/k/v fused into one (None when the
        parts could not be fused), then o; what a caller prefetches before this layer."""
        return self._qkv, self._lin[_attention_names(self.prefix)[3]]

    @property
    def mlp_down(self) -> LinearLike | None:
        """The last linear :meth:`run` calls (the MLP's down projection; None for an MoE
        block): what a caller's prefetch plan after gate/up starts with."""
        return None if self._moe is not None else self._lin[_mlp_names(self.prefix)[2]]

    @property
    def norms(self) -> dict[str, np.ndarray]:
        """The RMSNorm weights: ``"input"``, ``"post"`` and, with q/k norms, ``"q"``, ``"k"``."""
        return dict(self._norms)

    def linear_names(self) -> list[str]:
        return [n for g in self.linear_groups() for n in g]

    def linear_groups(self) -> list[list[str]]:
        """True-sequential order: [[q, k, v], [o], [gate, up, ...], [down, ...]]."""
        q, k, v, o = _attention_names(self.prefix)
        if self._moe is not None:
            return [[q, k, v], [o], *self._moe.groups()]
        g, u, d = _mlp_names(self.prefix)
        return [[q, k, v], [o], [g, u], [d]]

    # ------------------------------------------------------------ compute
    def forward(
        self,
        h: np.ndarray,
        *,
        positions: np.ndarray | None = None,
        cache: KVCache | None = None,
        capture: Capture | None = None,
    ) -> np.ndarray:
        hid = self.config.hidden_size
        a = np.asarray(h)
        if a.ndim != 3 or a.shape[2] != hid or a.dtype.kind != "f":
            raise InvalidInputError(
                f"h must be a float (batch, seq, {hid}) array; got {a.dtype} {a.shape}"
            )
        a = a.astype(np.float32, copy=False)
        if cache is not None and not (
            isinstance(cache, KVCache)
            and cache.num_layers > self.index
            and (cache.num_kv_heads, cache.head_dim, cache.batch)
            == (self.config.num_key_value_heads, self.config.head_dim, a.shape[0])
        ):
            raise InvalidInputError(
                f"cache {cache!r} does not fit layer {self.index} of this model with batch "
                f"{a.shape[0]}; expected a KVCache from model.new_cache(batch={a.shape[0]})"
            )
        if positions is None:
            start = 0 if cache is None else cache.layer_length(self.index)
            positions = np.arange(start, start + a.shape[1])
        positions = np.asarray(positions)
        if positions.shape != (a.shape[1],) or positions.dtype.kind not in "iu":
            raise InvalidInputError(
                f"positions must be {a.shape[1]} integers (one per token); got "
                f"{positions.dtype} {positions.shape}"
            )
        if not np.isfinite(a).all():
            raise InvalidInputError("h holds NaN or Inf; expected finite hidden states")
        with np.errstate(over="ignore", invalid="ignore"):
            out = self.run(a, positions, cache, capture, None)
        if not np.isfinite(out).all():
            raise InvalidInputError(
                f"layer {self.index} produced Inf/NaN (largest |h| {float(np.abs(a).max()):.3g}); "
                "its weights or a replacement layer overflow float32"
            )
        return out

    def run(
        self,
        h: np.ndarray,
        positions: np.ndarray,
        cache: KVCache | None,
        capture: Capture | None,
        rope: tuple[np.ndarray, np.ndarray] | None,
        then: tuple[PrefetchPlan, PrefetchPlan] | None = None,
    ) -> np.ndarray:
        """:meth:`forward` without its checks, for callers that made them once (the
        model): ``h`` float32 ``(B, T, hidden)``, ``positions`` int ``(T,)``, ``rope`` the
        ``(cos, sin)`` tables of ``positions`` (or None to compute them); ``then``: the
        model's two prefetch plans for after gate/up (down, then what follows this layer)
        and after down (what follows), or None for this layer's own plan only."""
        b, t, hid = h.shape
        if rope is None:
            rope = rope_tables(self._inv_freq, positions)
        eps = self.config.rms_norm_eps
        x = rms_norm(h, self._norms["input"], eps).reshape(b * t, hid)
        att = self._attention(x, b, t, positions, rope, cache, capture)
        out = h + att.reshape(b, t, hid)
        x = rms_norm(out, self._norms["post"], eps).reshape(b * t, hid)
        out += self._mlp(x, capture, then).reshape(b, t, hid)
        return out

    __call__ = forward

    def _apply(self, name: str, x: np.ndarray, capture: Capture | None) -> np.ndarray:
        lin = self._lin[name]
        if capture is not None:
            lin = offer(capture, name, x, lin)
        return run_linear(lin, x)

    def _attention(
        self,
        x: np.ndarray,
        b: int,
        t: int,
        positions: np.ndarray,
        rope: tuple[np.ndarray, np.ndarray],
        cache: KVCache | None,
        capture: Capture | None,
    ) -> np.ndarray:
        c = self.config
        nh, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        qn, kn, vn, on = _attention_names(self.prefix)
        fused = capture is None and self._qkv is not None
        if fused:
            qkv = run_linear(self._qkv, x)
            self._pf["qkv"]()
            q, k, v = (
                qkv[:, : nh * hd],
                qkv[:, nh * hd : (nh + nkv) * hd],
                qkv[:, (nh + nkv) * hd :],
            )
        else:
            q, k, v = (self._apply(n, x, capture) for n in (qn, kn, vn))
        if c.qk_norm == "full":
            q = rms_norm(q, self._norms["q"], c.rms_norm_eps)
            k = rms_norm(k, self._norms["k"], c.rms_norm_eps)
        if c.clip_qkv is not None:
            q, k, v = (np.clip(a, -c.clip_qkv, c.clip_qkv) for a in (q, k, v))
        q = q.reshape(b, t, nh, hd)
        k = k.reshape(b, t, nkv, hd)
        if c.qk_norm == "head":
            q = rms_norm(q, self._norms["q"], c.rms_norm_eps)
            k = rms_norm(k, self._norms["k"], c.rms_norm_eps)
        cos, sin = rope
        if fused and c.qk_norm is None and c.clip_qkv is None:
            # q and k are neighbouring columns of the fused qkv output: rotate both at once
            qk = rope_rows(qkv[:, : (nh + nkv) * hd], nh + nkv, cos, sin)
            qk = qk.reshape(b, t, nh + nkv, hd).transpose(0, 2, 1, 3)
            q, k = qk[:, :nh], qk[:, nh:]  # (b, nh, t, hd), (b, nkv, t, hd)
        else:
            q = apply_rope(q.transpose(0, 2, 1, 3), cos, sin)  # (b, nh, t, hd)
            k = apply_rope(k.transpose(0, 2, 1, 3), cos, sin)  # (b, nkv, t, hd)
        v = v.reshape(b, t, nkv, hd).transpose(0, 2, 1, 3)
        if cache is not None:
            k, v = cache.append(self.index, k, v)
        att = _attend(q, k, v, nkv, *self._visible(positions, k.shape[2]))
        att = att.transpose(0, 2, 1, 3).reshape(b * t, nh * hd)
        y = self._apply(on, np.ascontiguousarray(att), capture)
        self._pf["o"]()
        return y

    def _visible(self, positions: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
        """int64 ``(lo, hi)``, each ``(t,)``: the query at ``positions[i]`` sees keys
        ``lo[i] .. hi[i]`` (keys are at positions ``0..s-1``; causal, and within the
        sliding window on a sliding-attention layer)."""
        sliding = self.config.layer_types[self.index] == "sliding_attention"
        if len(positions) == 1:  # a decode step: plain integers (a dozen NumPy calls less)
            p = int(positions[0])
            lo1 = max(0, p - self.config.sliding_window + 1) if sliding else 0
            if lo1 <= min(p, s - 1):
                return np.array([lo1], np.int64), np.array([min(p, s - 1)], np.int64)
        qpos = np.asarray(positions, dtype=np.int64)
        hi = np.minimum(qpos, s - 1)
        lo = np.zeros_like(hi)
        if sliding:
            lo = np.maximum(lo, qpos - self.config.sliding_window + 1)
        if (lo > hi).any():
            i = int(np.argmax(lo > hi))
            raise InvalidInputError(
                f"the query at position {int(qpos[i])} sees none of the {s} keys (positions "
                f"0..{s - 1}); expected positions after what the cache holds"
            )
        return lo, hi

    def _mlp(
        self,
        x: np.ndarray,
        capture: Capture | None,
        then: tuple[PrefetchPlan, PrefetchPlan] | None = None,
    ) -> np.ndarray:
        if self._moe is not None:
            return self._moe.forward(x, capture)
        g, u, d = _mlp_names(self.prefix)
        f = self.config.intermediate_size
        if capture is None and self._gate_up is not None:
            gu = run_linear(self._gate_up, x)
            (self._pf["gate_up"] if then is None else then[0])()
            hid = swiglu(gu, f)
        else:
            hid = swiglu(
                np.concatenate([self._apply(g, x, capture), self._apply(u, x, capture)], axis=1), f
            )
        y = self._apply(d, hid, capture)
        if then is not None:
            then[1]()
        return y
