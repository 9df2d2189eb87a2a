"""Quantize a checkpoint's tensors as Ray tasks (``pip install "qlinear[ray]"``).

Usage::

    from qlinear.distributed.ray_executor import RayExecutor
    with RayExecutor() as ex:                    # or RayExecutor("head-node:6379")
        quantize_checkpoint(src, dst, cfg, executor=ex)

or ``qlinear quantize SRC -o DST --ray [ADDRESS]``. Every task is
:func:`qlinear.distributed.quantize_part` run by a Ray worker: it reads its tensor from
the source path (which every node must see at the same path: shared storage) and writes a
part file in the destination's staging directory (also shared); only names, offsets and
small result dicts go through the object store. A task whose worker dies (killed, OOM,
node lost) is retried by Ray up to ``max_retries`` times; each attempt writes a file of
its own, so a retry cannot mix with the remains of the attempt before it. Errors of the
input itself (:class:`qlinear.QuantizationError`, missing files) are not retried and are
raised in the driver as themselves.

The workers must have qlinear importable (the same version as the driver); a local
cluster started by ``ray.init()`` uses the driver's Python.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ..errors import InvalidParamsError, QuantizationError
from . import TASK_BYTES, TensorExecutor, quantize_part

__all__ = ["RayExecutor", "import_ray"]


def import_ray() -> Any:
    """The ``ray`` module, or an :class:`InvalidParamsError` saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise InvalidParamsError(
            'Ray executor requested but ray is not installed; pip install "qlinear[ray]"'
        ) from exc
    return ray


def _ray_task(
    shard: str,
    name: str,
    plan: Any,
    rows: tuple[int, int] | None,
    parts: str,
    stall: tuple[str, str] | None,
) -> dict[str, Any]:
    import ray

    if stall is not None and stall[0] == name:
        # Test hook: the first attempt at this tensor writes its pid and waits to be killed.
        try:
            fd = os.open(Path(stall[1]) / "stalled.pid", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        else:
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            time.sleep(120)
    res = quantize_part(shard, name, plan, rows, parts)
    res["node"] = ray.get_runtime_context().get_node_id()
    return res


class RayExecutor(TensorExecutor):
    """Run :func:`quantize_checkpoint`'s tasks on a Ray cluster.

    Args:
        address: a Ray cluster address (``"host:port"``, ``"auto"``); None uses
            ``ray.init()``'s default (a new local cluster unless one is found). If Ray
            is already initialized in this process, that connection is used as it is.
        task_bytes: float64 bytes per task; larger per-channel / per-group tensors are
            split into row blocks (see :class:`TensorExecutor`).
        max_retries: how many times Ray reruns a task whose worker died.
        init_kwargs: more keyword arguments for ``ray.init`` (``num_cpus``, ...).
        cpus_per_task: Ray CPUs each quantize task reserves (2 on a 2-CPU node: one
            task at a time).
        gptq_workers: worker actors sharing the calibration samples in GPTQ runs
            (default: the cluster's CPU count, at most one per sample).

    ``close()`` (or leaving the ``with`` block) shuts Ray down if this object started it.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        task_bytes: int = TASK_BYTES,
        max_retries: int = 3,
        init_kwargs: dict[str, Any] | None = None,
        gptq_workers: int | None = None,
        cpus_per_task: float = 1,
        _stall: tuple[str, str] | None = None,
    ) -> None:
        super().__init__(task_bytes=task_bytes)
        if not isinstance(max_retries, int) or max_retries < 0:
            raise InvalidParamsError(f"max_retries must be an int >= 0; got {max_retries!r}")
        ray = import_ray()
        self._ray = ray
        self._owner = False
        if not ray.is_initialized():
            ray.init(address=address, **(init_kwargs or {}))
            self._owner = True
        if not isinstance(cpus_per_task, (int, float)) or not cpus_per_task > 0:
            raise InvalidParamsError(f"cpus_per_task must be > 0; got {cpus_per_task!r}")
        self._remote = ray.remote(num_cpus=cpus_per_task, max_retries=max_retries)(_ray_task)
        self._stall = _stall
        self.max_retries = max_retries
        self.gptq_workers = gptq_workers
        self._gptq: Any = None

    def _launch(self, args: tuple) -> Any:
        return self._remote.remote(*args, self._stall)

    def _wait(self, handle: Any) -> dict[str, Any]:
        try:
            return self._ray.get(handle)
        except self._ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, (QuantizationError, OSError)):
                raise cause from None
            raise

    def _cancel(self, handles: list[Any]) -> None:
        for h in handles:
            try:
                self._ray.cancel(h, force=True)
            except Exception:  # already finished or gone: nothing to cancel
                pass

    # -- layer-sequential GPTQ (gptq_quantize_checkpoint(executor=...)); see ray_gptq
    def gptq_start(
        self, src_dir: Path, raw_cfg: dict, ids: Any, cfg: Any, opts: Any, batch: int
    ) -> None:
        """Start the worker actors, each with its share of the calibration ids."""
        from .ray_gptq import GPTQSession

        self._gptq = GPTQSession(
            self._ray, src_dir, raw_cfg, ids, cfg, opts, batch, self.gptq_workers, self.max_retries
        )

    def gptq_layer(self, i: int, fallback: list, gptq_names: list) -> dict[str, Any]:
        """Quantized linears of layer ``i``; the workers move on to layer ``i + 1``."""
        return self._gptq.layer(i, fallback, gptq_names)

    def records(self) -> tuple[dict[str, Any], ...]:
        """Per task of the last (or the running) run: see :meth:`TensorExecutor.records`;
        for GPTQ: Hessian shares, solves, propagations and worker recoveries."""
        if self._gptq is not None:
            return tuple(self._gptq.records)
        return super().records()

    def gptq_finish(self) -> None:
        """Stop the worker actors (their hidden states go with them)."""
        if getattr(self, "_gptq", None) is not None:
            self._records = list(self._gptq.records)
            self._gptq.close()
            self._gptq = None

    def close(self) -> None:
        """Shut down Ray if this executor started it."""
        if self._owner and self._ray.is_initialized():
            self._ray.shutdown()
        self._owner = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
