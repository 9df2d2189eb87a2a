"""The report of :func:`qlinear.quantize_checkpoint`: per-tensor errors and sizes, totals."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

__all__ = ["CheckpointReport", "TensorReport"]


@dataclasses.dataclass(frozen=True)
class TensorReport:
    """One source tensor: what became of it. ``rel_error`` is ``||W - W_q|| / ||W||``
        (Frobenius) and ``snr_db`` is ``10 log10(||W||^2 / ||W - W_q||^2)``; both None for
        kept tensors, and ``snr_db`` is None when the reconstruction is exact. ``note`` says
    what the output format changed (e.g. a group size that did not divide in_features)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    format: str
    rel_error: float | None
    snr_db: float | None
    bytes_before: int
    bytes_after: int
    note: str | None = None

    @property
    def quantized(self) -> bool:
        return self.rel_error is not None


@dataclasses.dataclass(frozen=True)
class CheckpointReport:
    """The result of :func:`quantize_checkpoint`: per-tensor entries and totals."""

    src: str
    dst: str
    config: dict[str, Any]
    tensors: tuple[TensorReport, ...]
    files: tuple[str, ...]
    seconds: float
    format: str = "qlinear"
    tasks: tuple[dict[str, Any], ...] = ()
    """Executor runs only: per task, the tensor, rows, seconds and the worker that ran it."""

    @property
    def bytes_before(self) -> int:
        return sum(t.bytes_before for t in self.tensors)

    @property
    def bytes_after(self) -> int:
        return sum(t.bytes_after for t in self.tensors)

    @property
    def n_quantized(self) -> int:
        return sum(t.quantized for t in self.tensors)

    @property
    def max_rel_error(self) -> float | None:
        errs = [t.rel_error for t in self.tensors if t.rel_error is not None]
        return max(errs) if errs else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "src": self.src,
            "dst": self.dst,
            "config": self.config,
            "format": self.format,
            "files": list(self.files),
            "seconds": self.seconds,
            "tensors": [{**dataclasses.asdict(t), "shape": list(t.shape)} for t in self.tensors],
            "totals": {
                "tensors": len(self.tensors),
                "quantized": self.n_quantized,
                "kept": len(self.tensors) - self.n_quantized,
                "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after,
                "max_rel_error": self.max_rel_error,
            },
            **({"tasks": [dict(t) for t in self.tasks]} if self.tasks else {}),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)
