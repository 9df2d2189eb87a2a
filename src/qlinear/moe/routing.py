"""Routers: from router logits to (expert indices, weights), and routing statistics.

All functions here take router logits, float64 ``(tokens, num_experts)``, finite, and are
pure (no state). Ties are broken by the lowest index, always: every selection is a stable
sort of the negated scores, so among equal scores the lower expert (or token) id comes
first.

Routings:

* ``"topk"``: each token picks its ``k`` highest logits. With ``normalize`` the weights
  are a softmax over those ``k`` logits (they sum to 1, as Mixtral does); without, a
  softmax over all logits is taken first and the ``k`` picked probabilities are used as
  they are (they sum to <= 1, as Qwen-MoE with ``norm_topk_prob=False`` does).
* ``"softmax"``: every expert, weighted by the softmax over all logits (dense MoE).
* ``"switch"``: top-1, weighted by that expert's softmax probability (Switch Transformer).
* ``"expert_choice"``: ``p = softmax(logits)`` per token; each expert takes the
  ``capacity`` tokens with the highest ``p[:, e]`` (Zhou et al. 2022) with weight
  ``p[t, e]``. A token may get several experts or none.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np

from ..errors import InvalidParamsError

__all__ = [
    "ROUTINGS",
    "Routing",
    "RoutingStats",
    "default_capacity",
    "route_logits",
    "routing_stats",
    "softmax",
]

ROUTINGS = ("topk", "softmax", "switch", "expert_choice")


class Routing(NamedTuple):
    """Where each token goes.

    indices: int64 ``(tokens, k)``: expert ids, each token's slots ordered by decreasing
        weight (ties: lower expert id first). ``-1`` marks an empty slot (only
        ``"expert_choice"`` has them; there ``k == num_experts`` and a token's chosen
        experts come first).
    weights: float64 ``(tokens, k)``: the weight of each slot (0 for empty slots).
    """

    indices: np.ndarray
    weights: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class RoutingStats:
    """Routing statistics of one call (a value: nothing in the layer changes).

    tokens_per_expert: int64 ``(num_experts,)``: token slots each expert received.
    num_tokens: tokens in the batch.
    mean_probability: float64 ``(num_experts,)``: mean router softmax probability
        ``P_e`` per expert (zeros for an empty batch).
    aux_loss: the Switch-Transformer load-balancing loss
        ``num_experts * sum_e f_e * P_e`` with ``f_e = tokens_per_expert[e] / sum(...)``;
        1.0 when perfectly balanced, up to ``num_experts`` when one expert takes all.
        0.0 for an empty batch.
    cv: coefficient of variation ``std / mean`` of ``tokens_per_expert`` (0 = balanced;
        0.0 when no token was routed).
    dropped_tokens: tokens that no expert received (possible only with expert choice).
    """

    tokens_per_expert: np.ndarray
    num_tokens: int
    mean_probability: np.ndarray
    aux_loss: float
    cv: float
    dropped_tokens: int

    @property
    def num_experts(self) -> int:
        return int(self.tokens_per_expert.shape[0])


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of float64 ``(n, m)``, max-subtracted so exp never overflows."""
    # logits - max <= 0 can only overflow to -Inf (logits near -1e308 and +1e308), whose
    # exp, 0, is the right limit
    with np.errstate(over="ignore"):
        z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores per row, lowest index first among ties."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def default_capacity(num_tokens: int, num_experts: int, top_k: int) -> int:
    """Expert-choice capacity ``ceil(num_tokens * top_k / num_experts)``: on average each
    token is taken by ``top_k`` experts (capacity factor ``top_k``)."""
    return min(num_tokens, math.ceil(num_tokens * top_k / num_experts))


def route_logits(
    logits: np.ndarray,
    routing: str,
    top_k: int,
    normalize: bool = True,
    capacity: int | None = None,
) -> Routing:
    """:class:`Routing` for float64 logits ``(tokens, num_experts)`` (see the module doc).

    ``top_k`` is used by ``"topk"`` and, through :func:`default_capacity`, by
    ``"expert_choice"`` when ``capacity`` is None; ``"switch"`` is top-1 and
    ``"softmax"`` uses every expert. ``capacity`` above the token count is clipped to it.
    """
    n, num_experts = logits.shape
    if routing == "topk":
        idx = _top(logits, top_k)
        if normalize:
            w = softmax(np.take_along_axis(logits, idx, axis=1))
        else:
            w = np.take_along_axis(softmax(logits), idx, axis=1)
        return Routing(idx.astype(np.int64), w)
    if routing in ("switch", "softmax"):
        p = softmax(logits)
        idx = _top(logits, 1 if routing == "switch" else num_experts)
        return Routing(idx.astype(np.int64), np.take_along_axis(p, idx, axis=1))
    if routing == "expert_choice":
        p = softmax(logits)
        cap = default_capacity(n, num_experts, top_k) if capacity is None else min(capacity, n)
        chosen = np.zeros((n, num_experts), dtype=bool)
        if cap > 0:
            toks = _top(p.T, cap)  # (experts, cap): each expert's tokens
            chosen[toks, np.arange(num_experts)[:, None]] = True
        # Per token: chosen experts by decreasing p (ties: lower id), then empty slots.
        key = np.where(chosen, -p, np.inf)
        order = np.argsort(key, axis=1, kind="stable")
        taken = np.take_along_axis(chosen, order, axis=1)
        idx = np.where(taken, order, -1).astype(np.int64)
        w = np.where(taken, np.take_along_axis(p, order, axis=1), 0.0)
        return Routing(idx, w)
    raise InvalidParamsError(f"unknown routing {routing!r}; expected one of {ROUTINGS}")


def routing_stats(logits: np.ndarray, r: Routing) -> RoutingStats:
    """:class:`RoutingStats` of one routing decision."""
    n, num_experts = logits.shape
    flat = r.indices[r.indices >= 0]
    counts = np.bincount(flat, minlength=num_experts).astype(np.int64)
    total = int(counts.sum())
    if n == 0 or total == 0:
        mean_p = np.zeros(num_experts)
        aux = 0.0
        cv = 0.0
    else:
        mean_p = softmax(logits).mean(axis=0)
        f = counts / total
        aux = float(num_experts * np.dot(f, mean_p))
        cv = float(counts.std() / counts.mean())
    routed = np.zeros(n, dtype=bool)
    if n:
        routed = (r.indices >= 0).any(axis=1)
    for a in (counts, mean_p):
        a.setflags(write=False)
    return RoutingStats(counts, n, mean_p, aux, cv, int(n - routed.sum()))
