"""Layer-sequential GPTQ on a Ray cluster: the ``gptq_*`` half of :class:`RayExecutor`.

:func:`qlinear.models.gptq_checkpoint.gptq_quantize_checkpoint` (``executor=``) keeps
its driver (calibration ids, spill of each quantized layer, the output writer) and hands
each layer to :class:`GPTQSession`:

* ``W`` worker actors each hold a share of the calibration samples (``np.array_split``
  of the ``(samples, seqlen)`` ids) and embed them themselves from the shared checkpoint;
  at layer ``i`` each loads layer ``i`` (only) from the shared path.
* For each true-sequential group of the layer (q/k/v, o, gate/up, down; every expert's),
  every worker runs its samples through the layer with the earlier groups quantized and
  returns its partial Hessians (:func:`~qlinear.models.gptq_checkpoint.group_hessians`);
  the partials are summed by a binary tree of tasks through the object store.
* One solve task per Hessian (q/k/v share one; an expert's gate/up share one) runs the
  same :func:`~qlinear.models.gptq_checkpoint._quantize_group` the serial path runs, so
  the experts of an MoE layer are solved in parallel.
* The quantized group goes to every worker (one object, read by all), and after the
  last group every worker propagates its samples through the quantized layer.

The driver holds only object references and, per layer, the quantized linears it spills
(never float weights nor hidden states). The Hessians are sums in a different order than
the serial run's, so results agree in quality (perplexity), not in bytes.

Resilience: the reduction and solve tasks are retried by Ray when their worker dies. A
worker actor that dies (killed, OOM, node lost) takes its hidden states with it: the
session starts a new actor on the same sample share, which embeds them again and replays
the layers already done with their quantized linears (the object references of every
solve result are kept for this: the quantized model so far, never float weights), and
then the whole current layer is run again on every worker, up to ``max_retries`` times
per layer. The replay computes what the lost actor held, and the reduction order is the
same, so a recovered run gives the same bytes as one without the failure.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..gptq import HessianAccumulator

__all__ = ["GPTQSession"]


class _Worker:
    """One share of the calibration samples and the current layer (a Ray actor).

    ``h`` is always the input of layer ``at``; ``end_layer`` leaves its output aside in
    ``h_next``, and the next ``begin_layer`` takes it (``at + 1``) or, when the same layer
    is begun again after a failure, drops it: so every call may be repeated."""

    def __init__(self, src_dir: str, raw_cfg: dict, ids: np.ndarray, batch: int) -> None:
        from ..models.decoder_config import DecoderConfig
        from ..models.gptq_checkpoint import _Source

        self.dcfg = DecoderConfig.from_dict(raw_cfg, source=f"{src_dir}/config.json")
        self.source = _Source(Path(src_dir))
        embed = self.source.get("model.embed_tokens.weight")
        self.h = np.asarray(embed[np.asarray(ids)], dtype=np.float32)
        del embed
        self.source.release()
        self.batch = batch
        self.at = 0
        self.h_next: np.ndarray | None = None
        self.layer: Any = None
        self.done: dict[str, Any] = {}

    def replay(self, i: int, *solved: dict) -> int:
        """Propagate the samples through layer ``i`` quantized with the linears in
        ``solved`` (every solve result of that layer): how a new actor catches up."""
        self.begin_layer(i)
        self.end_layer(*solved)
        return os.getpid()

    def pid(self) -> int:
        return os.getpid()

    def begin_layer(self, i: int) -> list[list[str]]:
        from ..models.decoder_layer import DecoderLayer

        if self.h_next is not None and i == self.at + 1:
            self.h, self.at = self.h_next, i
        elif i != self.at:
            raise RuntimeError(f"worker holds the input of layer {self.at}; asked for {i}")
        self.h_next = None
        self.layer = DecoderLayer.from_tensors(self.dcfg, i, self.source.get)
        self.done = {}
        return self.layer.linear_groups()

    def hessians(self, group: list[str], *solved: dict) -> tuple[dict, dict]:
        from ..models.gptq_checkpoint import group_hessians

        for s in solved:
            self.done.update(s["layers"])
        t0 = time.perf_counter()
        accs, alias = group_hessians(self.layer, self.h, self.done, group, batch_size=self.batch)
        return accs, {"alias": alias, "seconds": time.perf_counter() - t0, **_where()}

    def end_layer(self, *solved: dict) -> dict:
        from ..models.gptq_checkpoint import _batches

        for s in solved:
            self.done.update(s["layers"])
        t0 = time.perf_counter()
        qlayer = self.layer.with_linears(self.done)
        h_next = np.empty_like(self.h)
        for a, b in _batches(self.h.shape[0], self.batch):
            h_next[a:b] = qlayer.forward(self.h[a:b])
        self.h_next = h_next
        self.layer, self.done = None, {}
        self.source.release()
        return {"seconds": time.perf_counter() - t0, **_where()}


def _where() -> dict[str, Any]:
    import ray

    return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


def _merge(a: dict, b: dict) -> dict:
    """The sum of two partial Hessian sets (root name -> HessianAccumulator)."""
    out = {}
    for k in {**a, **b}:
        src = [x[k] for x in (a, b) if k in x]
        acc = HessianAccumulator(src[0].in_features)
        for s in src:
            acc.merge(s)
        out[k] = acc
    return out


def _solve(
    src_dir: str,
    raw_cfg: dict,
    i: int,
    names: list[str],
    accs: dict,
    alias: dict,
    config: dict,
    opts: Any,
) -> dict:
    """GPTQ of the linears ``names`` of layer ``i`` (they share one Hessian in ``accs``)."""
    from ..models.decoder_config import DecoderConfig
    from ..models.decoder_layer import DecoderLayer
    from ..models.gptq_checkpoint import _quantize_group, _Source
    from ..quantconfig import QuantConfig

    t0 = time.perf_counter()
    dcfg = DecoderConfig.from_dict(raw_cfg, source=f"{src_dir}/config.json")
    source = _Source(Path(src_dir))
    try:
        layer = DecoderLayer.from_tensors(dcfg, i, source.get)
        lins = {n: layer.linears[n] for n in names}
        fallback: list[tuple[str, int]] = []
        gptq_names: list[str] = []
        cfg = QuantConfig.coerce(config)
        out = _quantize_group(lins, names, accs, alias, cfg, opts, fallback, gptq_names)
    finally:
        for f in source.files:
            f.close()
    return {
        "layers": out,
        "fallback": fallback,
        "gptq": gptq_names,
        "seconds": time.perf_counter() - t0,
        **_where(),
    }


class GPTQSession:
    """The Ray side of one ``gptq_quantize_checkpoint`` run (see the module docstring)."""

    def __init__(
        self,
        ray: Any,
        src_dir: Path,
        raw_cfg: dict,
        ids: np.ndarray,
        cfg: Any,
        opts: Any,
        batch: int,
        workers: int | None,
        max_retries: int,
    ) -> None:
        self.ray = ray
        n = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        n = max(1, min(n, ids.shape[0]))
        self.src, self.raw_cfg, self.config, self.opts = str(src_dir), raw_cfg, cfg.to_dict(), opts
        self.actor = ray.remote(num_cpus=0, max_restarts=0)(_Worker)
        self.parts = np.array_split(ids, n)
        self.batch = batch
        self.max_retries = max_retries
        self.workers = [self._start(part) for part in self.parts]
        self.history: list[list[Any]] = []  # per finished layer: its solve results (refs)
        self.merge = ray.remote(num_cpus=1, max_retries=max_retries)(_merge)
        self.solve = ray.remote(num_cpus=1, max_retries=max_retries)(_solve)
        self.records: list[dict[str, Any]] = []

    def _reduce(self, refs: list[Any]) -> Any:
        while len(refs) > 1:
            nxt = [self.merge.remote(refs[k], refs[k + 1]) for k in range(0, len(refs) - 1, 2)]
            refs = nxt + ([refs[-1]] if len(refs) % 2 else [])
        return refs[0]

    def _start(self, part: np.ndarray) -> Any:
        opts = {"scheduling_strategy": "SPREAD"}
        return self.actor.options(**opts).remote(self.src, self.raw_cfg, part, self.batch)

    def _recover(self, i: int) -> None:
        """Replace every dead worker actor by a new one caught up to layer ``i``."""
        ray = self.ray
        for k, w in enumerate(self.workers):
            try:
                ray.get(w.pid.remote())
                continue
            except ray.exceptions.RayActorError:
                pass
            t0 = time.perf_counter()
            w = self.workers[k] = self._start(self.parts[k])
            for j, solved in enumerate(self.history):
                ray.get(w.replay.remote(j, *solved))
            pid = ray.get(w.pid.remote())
            rec = {"seconds": time.perf_counter() - t0, "node": None, "pid": pid}
            self.records.append({"task": f"recover worker {k} to layer {i}", **rec})

    def layer(self, i: int, fallback: list, gptq_names: list) -> dict[str, Any]:
        """Calibrate layer ``i`` on the workers; returns its quantized linears. A worker
        actor that dies is replaced (see the module docstring) and the layer run again."""
        ray = self.ray
        marks = len(fallback), len(gptq_names), len(self.records)
        for attempt in range(self.max_retries + 1):
            try:
                return self._layer(i, fallback, gptq_names)
            except ray.exceptions.RayActorError:
                if attempt == self.max_retries:
                    raise
                del fallback[marks[0] :], gptq_names[marks[1] :], self.records[marks[2] :]
                self._recover(i)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _layer(self, i: int, fallback: list, gptq_names: list) -> dict[str, Any]:
        ray = self.ray
        groups = ray.get([w.begin_layer.remote(i) for w in self.workers])[0]
        solved: list[Any] = []
        every: list[Any] = []
        layers: dict[str, Any] = {}
        for gi, group in enumerate(groups):
            parts = [w.hessians.options(num_returns=2).remote(group, *solved) for w in self.workers]
            infos = ray.get([p[1] for p in parts])
            alias: dict[str, str] = {}
            for info in infos:
                alias.update(info["alias"])
                self.records.append({"task": f"hessian {i}.{gi}", **_rec(info)})
            total = self._reduce([p[0] for p in parts])
            roots: dict[str, list[str]] = {}
            for name in group:
                roots.setdefault(alias.get(name, name), []).append(name)
            solved = [
                self.solve.remote(
                    self.src, self.raw_cfg, i, names, total, alias, self.config, self.opts
                )
                for names in roots.values()
            ]
            every.extend(solved)
            for res in ray.get(solved):
                layers.update(res["layers"])
                fallback.extend(res["fallback"])
                gptq_names.extend(res["gptq"])
                self.records.append(
                    {"task": f"solve {i}.{gi} {res['gptq'] or res['fallback']}", **_rec(res)}
                )
        for info in ray.get([w.end_layer.remote(*solved) for w in self.workers]):
            self.records.append({"task": f"propagate {i}", **_rec(info)})
        self.history.append(every)
        return layers

    def close(self) -> None:
        for w in self.workers:
            self.ray.kill(w)
        self.workers = []


def _rec(info: dict) -> dict[str, Any]:
    return {"seconds": info["seconds"], "node": info["node"], "pid": info["pid"]}
