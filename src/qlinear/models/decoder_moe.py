"""The mixture-of-experts block of Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE, run on
:class:`qlinear.moe.MoELayer` (float router, experts grouped by expert)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from ..moe import GatedExpert, MoELayer
from .decoder_config import DecoderConfig
from .decoder_ops import Getter, need_array, need_linear, silu
from .ops import LinearLike

__all__ = ["MoEBlock", "moe_linear_names"]

Capture = Callable[[str, np.ndarray], "LinearLike | None"]


def _moe_prefix(cfg: DecoderConfig, prefix: str) -> str:
    return prefix + ("block_sparse_moe." if cfg.model_type == "mixtral" else "mlp.")


def moe_linear_names(cfg: DecoderConfig, prefix: str) -> dict[str, tuple[str, str, str]]:
    """Expert key (``"0"``, ``"1"``, ..., ``"shared"``) -> (gate, up, down) layer names."""
    p = _moe_prefix(cfg, prefix)
    if cfg.model_type == "mixtral":
        parts = ("w1", "w3", "w2")  # Mixtral: w1 gate, w3 up, w2 down
    else:
        parts = ("gate_proj", "up_proj", "down_proj")
    out = {str(e): tuple(f"{p}experts.{e}.{n}" for n in parts) for e in range(cfg.num_experts)}
    if cfg.shared_expert_intermediate_size:
        out["shared"] = tuple(f"{p}shared_expert.{n}" for n in parts)
    return out  # type: ignore[return-value]


def _apply(lin: LinearLike, x: np.ndarray, out_f: int) -> np.ndarray:
    if x.shape[0] == 0:
        return np.zeros((0, out_f), dtype=np.float32)
    return np.asarray(lin.forward(x), dtype=np.float32)


class MoEBlock:
    """``y = sum_k w_k expert_k(x) [+ sigmoid(x . g) * shared(x)]`` for ``x`` float32
    ``(tokens, hidden)``.

    Routing: router logits ``x @ router.T`` (float64); softmax over all experts, top-k,
    and with ``norm_topk_prob`` (always for Mixtral) the k weights renormalised to sum to
    1, i.e. a softmax over the k chosen logits (``MoELayer(normalize=True)``); without,
    the k softmax probabilities as they are. Experts: ``down(silu(gate(x)) * up(x))``.
    """

    __slots__ = ("_cfg", "_lin", "_moe", "_names", "_router", "_shared_gate")

    def __init__(
        self,
        cfg: DecoderConfig,
        names: dict[str, tuple[str, str, str]],
        linears: Mapping[str, LinearLike],
        router: np.ndarray,
        shared_gate: np.ndarray | None,
    ) -> None:
        self._cfg, self._names = cfg, names
        self._lin = {n: linears[n] for trio in names.values() for n in trio}
        self._router, self._shared_gate = router, shared_gate
        experts = [
            GatedExpert(*(self._lin[n] for n in names[str(e)])) for e in range(cfg.num_experts)
        ]
        self._moe = MoELayer(router, experts, top_k=cfg.top_k, normalize=cfg.norm_topk_prob)

    @classmethod
    def from_tensors(cls, cfg: DecoderConfig, prefix: str, get: Getter) -> MoEBlock:
        names = moe_linear_names(cfg, prefix)
        h = cfg.hidden_size
        linears: dict[str, LinearLike] = {}
        for key, (g, u, d) in names.items():
            f = (
                cfg.shared_expert_intermediate_size
                if key == "shared"
                else cfg.moe_intermediate_size
            )
            linears[g] = need_linear(get, g, f, h, False)
            linears[u] = need_linear(get, u, f, h, False)
            linears[d] = need_linear(get, d, h, f, False)
        p = _moe_prefix(cfg, prefix)
        router = need_array(get, p + "gate.weight", (cfg.num_experts, h))
        sg = None
        if cfg.shared_expert_intermediate_size:
            sg = need_array(get, p + "shared_expert_gate.weight", (1, h))
        return cls(cfg, names, linears, router, sg)

    def with_linears(self, mapping: Mapping[str, LinearLike]) -> MoEBlock:
        lin = {**self._lin, **{k: v for k, v in mapping.items() if k in self._lin}}
        return MoEBlock(self._cfg, self._names, lin, self._router, self._shared_gate)

    @property
    def linears(self) -> dict[str, LinearLike]:
        return dict(self._lin)

    def groups(self) -> list[list[str]]:
        """[gate and up of every expert (and the shared one)], [every down]."""
        trios = list(self._names.values())
        return [[n for t in trios for n in t[:2]], [t[2] for t in trios]]

    def _expert(self, key: str, x: np.ndarray, capture: Capture | None) -> np.ndarray:
        g, u, d = self._names[key]
        lg, lu, ld = self._lin[g], self._lin[u], self._lin[d]
        if capture is not None:
            lg = capture(g, x) or lg
            lu = capture(u, x) or lu
        f = (
            self._cfg.shared_expert_intermediate_size
            if key == "shared"
            else self._cfg.moe_intermediate_size
        )
        hid = silu(_apply(lg, x, f))
        hid *= _apply(lu, x, f)
        if capture is not None:
            ld = capture(d, hid) or ld
        return _apply(ld, hid, self._cfg.hidden_size)

    def forward(self, x: np.ndarray, capture: Capture | None = None) -> np.ndarray:
        """float32 ``(tokens, hidden)`` -> float32 ``(tokens, hidden)``."""
        if capture is None:
            y = np.asarray(self._moe.forward(x), dtype=np.float32)
        else:
            # The same routing as MoELayer.forward; each expert, in id order, is offered
            # the rows routed to it (possibly none) before it runs.
            r = self._moe.route(x)
            y = np.zeros_like(x)
            for e in range(self._cfg.num_experts):
                tok, slot = np.nonzero(r.indices == e)
                ye = self._expert(str(e), x[tok], capture)
                y[tok] += ye * r.weights[tok, slot].astype(np.float32)[:, None]
        if self._shared_gate is not None:
            s = self._expert("shared", x, capture)
            z = x @ self._shared_gate[0]
            gate = np.float32(1) / (np.float32(1) + np.exp(-np.clip(z, -80, 80)))
            y += gate[:, None] * s
        return y
