"""Quantize a checkpoint's tensors somewhere else than in the calling loop.

:func:`qlinear.quantize_checkpoint` takes ``executor=``: an object that receives every
tensor to quantize up front (:meth:`TensorExecutor.submit`), quantizes them as *tasks*
(a whole tensor, or a block of rows of a large per-channel / per-group tensor), and hands
each tensor's bytes back in file order (:meth:`TensorExecutor.collect`) to the serial
driver, which assembles the shards and renames them into place exactly as without an
executor. The output is byte-identical to the serial run.

A task reads its rows from the shared source path itself (nothing but names and offsets
travels to it) and writes what the serial path would have written to a *part file* of
its own, ``<parts>/<tensor>.<a>-<b>.<attempt uuid>.part``, first under ``.tmp`` and then
renamed: an attempt that dies leaves at most a stray ``.tmp`` file, a retried attempt
writes a fresh file, and the driver only ever reads the file named in the result of the
attempt that finished. The parts directory lives inside the destination's staging
directory (``.qlinear-parts-<uuid>``: see :mod:`qlinear._atomic`) and is removed when the
run ends, failed or not.

Executors here: :class:`InlineExecutor` (every task in this process, when collected: the
reference and the test of the part-file path) and
:class:`qlinear.distributed.ray_executor.RayExecutor` (Ray tasks; ``pip install
"qlinear[ray]"``). This package never imports Ray itself.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .._safetensors import SafetensorsFile, TensorInfo, as_bytes
from ..checkpoint import BLOCK_BYTES, _LayerPlan, _quantize_rows, _write_params
from ..errors import InvalidParamsError
from ..qtypes import QuantizationGranularity

__all__ = ["TASK_BYTES", "InlineExecutor", "TensorExecutor", "merge_squares", "quantize_part"]

TASK_BYTES = 4 * BLOCK_BYTES
"""Float64 bytes of one task: larger per-channel / per-group tensors are split by rows."""
_COPY = 64 * 1024 * 1024


class _PartWriter:
    """Stands in for a :class:`SafetensorsWriter`: every ``write(f, name, data, at)`` is
    appended to one part file and listed as ``(name, at, offset in part, length)``."""

    def __init__(self, out: BinaryIO) -> None:
        self.out, self.pos, self.entries = out, 0, []

    def write(self, f: Any, name: str, data: np.ndarray | memoryview, at: int = 0) -> None:
        buf = as_bytes(data)
        self.out.write(buf)
        self.entries.append((name, int(at), self.pos, len(buf)))
        self.pos += len(buf)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:120]


def quantize_part(
    shard: str | os.PathLike[str],
    name: str,
    plan: _LayerPlan,
    rows: tuple[int, int] | None,
    parts_dir: str | os.PathLike[str],
) -> dict[str, Any]:
    """One task: quantize tensor ``name`` of safetensors file ``shard`` (its ``rows``
    ``[a, b)``, or all of it for None) into a fresh part file in ``parts_dir``.

    Returns a small dict: ``part`` (the file), ``entries`` (``(tensor, at, offset,
    length)`` per piece written), ``err2`` / ``sig2`` (scaled sums of squares of
    ``W - Wq`` and ``W``), ``seconds`` and ``pid``. Safe to run twice: every attempt
    writes its own file."""
    t0 = time.perf_counter()
    sf = SafetensorsFile(shard)
    try:
        info = sf.info(name)
        span = rows or (0, info.shape[0])
        base = Path(parts_dir) / f"{_slug(name)}.{span[0]}-{span[1]}.{uuid.uuid4().hex}"
        tmp, final = base.with_name(base.name + ".tmp"), base.with_name(base.name + ".part")
        with open(tmp, "wb") as out:
            pw = _PartWriter(out)
            err2, sig2, scale, zp = _quantize_rows(sf, name, plan, pw, None, None, rows=rows)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, final)
    finally:
        sf.close()
    return {
        "tensor": name,
        "rows": list(span),
        "part": str(final),
        "entries": pw.entries,
        "err2": err2,
        "sig2": sig2,
        "scale": scale,
        "zero_point": zp,
        "nbytes": info.nbytes * (span[1] - span[0]) // info.shape[0],
        "seconds": time.perf_counter() - t0,
        "pid": os.getpid(),
    }


def merge_squares(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """Sum of two scaled sums of squares ``(s, q)`` (``sum = s**2 * q``); exact when one
    is empty, so a tensor done in one task reports what the serial run reports."""
    (s1, q1), (s2, q2) = a, b
    if s1 == 0.0:
        return b
    if s2 == 0.0:
        return a
    s = max(s1, s2)
    return s, q1 * (s1 / s) ** 2 + q2 * (s2 / s) ** 2


class TensorExecutor:
    """Base of the executors :func:`qlinear.quantize_checkpoint` accepts.

    Subclasses implement ``_launch(args) -> handle`` (start :func:`quantize_part` with
    these arguments somewhere) and ``_wait(handle) -> dict`` (its result, re-raising its
    error), optionally ``_cancel(handles)``. Tasks per tensor: one, or row blocks of
    ``task_bytes`` float64 bytes for per-channel / per-group tensors larger than that."""

    def __init__(self, *, task_bytes: int = TASK_BYTES) -> None:
        if not isinstance(task_bytes, int) or task_bytes <= 0:
            raise InvalidParamsError(f"task_bytes must be a positive int; got {task_bytes!r}")
        self.task_bytes = task_bytes
        self._pending: dict[str, list[Any]] = {}
        self._records: list[dict[str, Any]] = []
        self._parts: Path | None = None

    # -- subclass hooks
    def _launch(self, args: tuple) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _wait(self, handle: Any) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _cancel(self, handles: list[Any]) -> None:
        pass

    def _node(self, result: dict[str, Any]) -> str:
        return result.get("node", "local")

    # -- what quantize_checkpoint calls
    def tasks_for(self, info: TensorInfo, plan: _LayerPlan) -> list[tuple[int, int] | None]:
        """Row spans of the tasks of one ``(out, in)`` tensor (``[None]``: one task)."""
        out_f, in_f = info.shape
        if plan.cfg.granularity is QuantizationGranularity.PER_TENSOR or 8 * out_f * in_f <= (
            self.task_bytes
        ):
            return [None]
        step = max(1, self.task_bytes // (8 * in_f))
        return [(a, min(out_f, a + step)) for a in range(0, out_f, step)]

    def submit(
        self, jobs: Sequence[tuple[Path, str, _LayerPlan, TensorInfo]], out_dir: Path
    ) -> None:
        """Start the tasks of every ``(shard path, tensor name, plan, info)`` in ``jobs``;
        part files go to a hidden directory inside ``out_dir`` (the staging directory of
        an atomic output), removed by :meth:`finish`."""
        if self._pending:
            raise InvalidParamsError("this executor is already running a checkpoint")
        self._parts = Path(out_dir).resolve() / f".qlinear-parts-{uuid.uuid4().hex[:12]}"
        self._parts.mkdir(parents=True)
        self._records = []
        for shard, name, plan, info in jobs:
            self._pending[name] = [
                self._launch((str(shard), name, plan, rows, str(self._parts)))
                for rows in self.tasks_for(info, plan)
            ]

    def collect(
        self, name: str, plan: _LayerPlan, writer: Any, f: BinaryIO, bar: Any
    ) -> tuple[tuple[float, float], tuple[float, float]]:
        """Wait for the tasks of ``name``, copy their codes into ``writer`` / ``f``, write
        the parameters of all rows (as the serial step does) and return ``(err2, sig2)``."""
        err2 = sig2 = (0.0, 0.0)
        scales, zps = [], []
        seen: set[tuple[str, int, int]] = set()
        for handle in self._pending.pop(name):
            res = self._wait(handle)
            part = Path(res["part"])
            with open(part, "rb") as pf:
                for tname, at, off, length in res["entries"]:
                    if (tname, at, length) in seen:  # int4 shape, written by every row block
                        continue
                    seen.add((tname, at, length))
                    pf.seek(off)
                    for k in range(0, length, _COPY):
                        chunk = pf.read(min(_COPY, length - k))
                        writer.write(f, tname, memoryview(chunk), at=at + k)
            part.unlink()
            scales.append(res["scale"])
            zps.append(res["zero_point"])
            err2, sig2 = merge_squares(err2, res["err2"]), merge_squares(sig2, res["sig2"])
            a, b = res["rows"]
            self._records.append(
                {
                    "tensor": name,
                    "rows": [a, b],
                    "seconds": res["seconds"],
                    "node": self._node(res),
                    "pid": res["pid"],
                }
            )
            if bar is not None:
                bar.update(res["nbytes"])
        if len(scales) == 1:
            scale, zp = scales[0], zps[0]
        else:
            scale, zp = np.concatenate(scales), np.concatenate(zps)
        _write_params(plan, scale, zp, writer, f)
        return err2, sig2

    def finish(self) -> None:
        """End the run: cancel tasks never collected (a failed run), drop the parts."""
        left = [h for hs in self._pending.values() for h in hs]
        self._pending = {}
        if left:
            self._cancel(left)
        if self._parts is not None:
            shutil.rmtree(self._parts, ignore_errors=True)
            self._parts = None

    def records(self) -> tuple[dict[str, Any], ...]:
        """Per task of the last run: tensor, rows, seconds, node and pid of the worker."""
        return tuple(self._records)


class InlineExecutor(TensorExecutor):
    """Runs each task in this process when it is collected (no parallelism): the
    reference executor, and a test of the part-file path without Ray."""

    def _launch(self, args: tuple) -> Any:
        return args

    def _wait(self, handle: Any) -> dict[str, Any]:
        return quantize_part(*handle)
