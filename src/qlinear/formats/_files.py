"""Where a checkpoint's tensors are: shard resolution and a name -> tensor view over shards.

The one place that turns a path (a ``.safetensors`` file, a directory with
``model.safetensors``, or a directory with ``model.safetensors.index.json`` and its
shards) into a list of shard files, used by loading, inspecting and quantizing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._safetensors import SafetensorsFile, TensorInfo, parse_json
from ..errors import FormatError

__all__ = ["Shards", "TensorSet", "need", "read_index", "read_json", "resolve_shards"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class Shards:
    """A checkpoint on disk: ``directory``, shard file names in it, the parsed index
    (``None`` without one), and whether the path given was a directory."""

    directory: Path
    names: tuple[str, ...]
    index: dict[str, Any] | None
    is_dir: bool

    @property
    def paths(self) -> list[Path]:
        return [self.directory / n for n in self.names]


MAX_JSON = 100 * 1024 * 1024
"""Bytes of a JSON side file (index, config.json) qlinear reads at most."""


def read_json(path: Path) -> Any:
    """Parsed JSON of ``path`` (strict: :func:`qlinear._safetensors.parse_json`);
    FormatError naming the file when it is larger than :data:`MAX_JSON` or not JSON."""
    size = path.stat().st_size
    if size > MAX_JSON:
        raise FormatError(f"{path}: {size} bytes; a JSON side file is at most {MAX_JSON} bytes")
    return parse_json(path.read_bytes(), str(path))


def read_index(index: Path) -> dict[str, Any]:
    """A validated ``model.safetensors.index.json`` (its ``weight_map`` maps tensor
    names to shard file names in the same directory)."""
    data = read_json(index)
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in wm.items()
    ):
        raise FormatError(f"{index}: expected an object with a 'weight_map' of str -> str")
    for shard in set(wm.values()):
        if shard in ("", ".", "..") or Path(shard).name != shard or "\x00" in shard:
            raise FormatError(f"{index}: shard {shard!r:.200} must be a file name, not a path")
    return data


def resolve_shards(path: str | Path) -> Shards:
    """The shards of a file or checkpoint directory.

    Raises:
        FileNotFoundError: no such path, a directory with neither ``model.safetensors``
            nor an index, or a shard the index lists that is missing.
        FormatError: a malformed index.
    """
    p = Path(path)
    if p.is_dir():
        index = p / INDEX_NAME
        if index.is_file():
            data = read_index(index)
            names = tuple(sorted(set(data["weight_map"].values())))
            for s in names:
                if not (p / s).is_file():
                    raise FileNotFoundError(f"shard {s} listed in the index is missing from {p}")
            return Shards(p, names, data, True)
        if (p / SINGLE_NAME).is_file():
            return Shards(p, (SINGLE_NAME,), None, True)
        raise FileNotFoundError(f"{p} holds neither {SINGLE_NAME} nor {INDEX_NAME}")
    if not p.exists():
        raise FileNotFoundError(f"no such file or directory: {p}")
    return Shards(p.parent, (p.name,), None, False)


class TensorSet:
    """Name -> (file, TensorInfo) over one or several (sharded) safetensors files."""

    def __init__(self, files: list[SafetensorsFile]) -> None:
        self.files = files
        self.where: dict[str, SafetensorsFile] = {}
        for f in files:
            for name in f.tensors:
                if name in self.where:
                    raise FormatError(
                        f"tensor {name!r} appears in both {self.where[name].path.name} and "
                        f"{f.path.name}"
                    )
                self.where[name] = f

    @classmethod
    def open(cls, shards: Shards, *, mmap: bool = True) -> TensorSet:
        return cls([SafetensorsFile(p, mmap=mmap) for p in shards.paths])

    def __contains__(self, name: object) -> bool:
        return name in self.where

    def info(self, name: str) -> TensorInfo | None:
        f = self.where.get(name)
        return None if f is None else f.tensors[name]

    def array(self, name: str) -> np.ndarray:
        return self.where[name].array(name)

    def metadata(self) -> dict[str, str]:
        """Every shard's ``__metadata__`` merged (later shards win)."""
        out: dict[str, str] = {}
        for f in self.files:
            out.update(f.metadata)
        return out


def need(
    t: TensorSet, tname: str, dtypes: tuple[str, ...], shape: tuple[int, ...] | None, what: str
) -> TensorInfo:
    """The header entry of ``tname``; FormatError when it is missing or its dtype or shape
    is not the expected one."""
    info = t.info(tname)
    if info is None:
        raise FormatError(f"tensor {tname!r} is missing; the layer's {what} needs it")
    if info.dtype not in dtypes:
        raise FormatError(
            f"tensor {tname!r} ({what}) has dtype {info.dtype}; expected one of {list(dtypes)}"
        )
    if shape is not None and info.shape != tuple(shape):
        raise FormatError(
            f"tensor {tname!r} ({what}) has shape {list(info.shape)}; expected {list(shape)}"
        )
    return info
