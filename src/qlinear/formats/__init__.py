"""File formats, one module each, each owning its tensor schema.

* :mod:`.qlinear_format`: qlinear's own safetensors layout (float64 scales, partial groups).
* :mod:`.compressed_tensors`: compressed-tensors checkpoints (vLLM, transformers).
* :mod:`.gguf`: GGUF files (llama.cpp), through the ``gguf`` package.

:func:`read` and :func:`describe` find which format a path holds and call its module;
``qlinear.load`` / ``qlinear.io.inspect`` are built on them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..errors import FormatError
from ..linear import QuantizedLinear
from . import compressed_tensors as ct
from . import qlinear_format as qf
from ._files import Shards, TensorSet, read_json, resolve_shards
from ._spec import LayerSpec

__all__ = ["FORMATS", "LayerSpec", "LoadInfo", "detect", "read", "resolve_shards"]

FORMATS = ("compressed-tensors", "qlinear", "gguf")
Item = Union[QuantizedLinear, np.ndarray, Any]  # noqa: UP007


@dataclass(frozen=True)
class LoadInfo:
    """What a reader found besides the layers: the format (``"qlinear"``,
    ``"compressed-tensors"``, ``"gguf"`` or ``"safetensors"`` for plain tensors), each
    layer's default activation mode (``"float"`` or ``"int8"``: run W8A8 layers with
    ``layer(x, activations="int8")``), per-layer config dicts (as ``inspect`` shows them),
    and notes (e.g. tensors dequantized to float)."""

    format: str
    activations: dict[str, str] = field(default_factory=dict)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    version: int | str | None = None


def _ct_config(shards: Shards, t: TensorSet) -> ct.CompressedTensorsConfig | None:
    meta = t.metadata()
    if ct.CONFIG_KEY in meta:
        return ct.config_from_json_text(meta[ct.CONFIG_KEY], f"__metadata__[{ct.CONFIG_KEY!r}]")
    cfg_path = shards.directory / "config.json"
    if cfg_path.is_file():
        data = read_json(cfg_path)
        qc = data.get(ct.CONFIG_KEY) if isinstance(data, dict) else None
        if isinstance(qc, dict) and qc.get("quant_method") == ct.QUANT_METHOD:
            return ct.parse_config(qc, f"{cfg_path}: {ct.CONFIG_KEY}")
    return None


def detect(path: str | Path) -> str:
    """The format of a file or checkpoint directory: ``"gguf"``, ``"qlinear"``,
    ``"compressed-tensors"`` or ``"safetensors"`` (plain tensors)."""
    p = Path(path)
    if p.is_file() and _is_gguf(p):
        return "gguf"
    shards = resolve_shards(p)
    t = TensorSet.open(shards)
    return _detect(shards, t)[0]


def _is_gguf(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def _detect(shards: Shards, t: TensorSet) -> tuple[str, ct.CompressedTensorsConfig | None]:
    if any(qf.METADATA_KEY in f.metadata for f in t.files):
        return "qlinear", None
    cfg = _ct_config(shards, t)
    if cfg is not None:
        return "compressed-tensors", cfg
    return "safetensors", None


def _qlinear_configs(t: TensorSet) -> tuple[int | None, dict[str, dict[str, Any]]]:
    configs: dict[str, dict[str, Any]] = {}
    version = None
    for f in t.files:
        v, layers = qf.read_config(f)
        version = v if v is not None else version
        for lname, cfg in layers.items():
            if lname in configs and configs[lname] != cfg:
                raise FormatError(f"layer {lname!r} is configured differently in two shards")
            configs[lname] = cfg
    return version, configs


def _ct_scheme(cfg: ct.CompressedTensorsConfig, name: str) -> ct.Scheme:
    scheme = cfg.scheme_for(name)
    if scheme is None:
        raise FormatError(
            f"layer {name!r} holds compressed tensors but no config group of the "
            "quantization_config targets it (or it is in 'ignore')"
        )
    return scheme


def read(
    path: str | Path, *, backend: str | None = None, verify: bool = False, mmap: bool = True
) -> tuple[dict[str, Item], LoadInfo]:
    """Load every layer and tensor of ``path`` in whatever format it is; see
    :func:`qlinear.load`."""
    p = Path(path)
    if p.is_file() and _is_gguf(p):
        from . import gguf

        return gguf.read(p, backend=backend)
    shards = resolve_shards(p)
    t = TensorSet.open(shards, mmap=mmap)
    fmt, cfg = _detect(shards, t)
    result: dict[str, Item] = {}
    claimed: set[str] = set()
    acts: dict[str, str] = {}
    version: int | str | None = None
    if fmt == "qlinear":
        version, configs = _qlinear_configs(t)
        for lname, lcfg in configs.items():
            layer, used = qf.build_layer(lname, lcfg, t, backend, verify)
            result[lname] = layer
            acts[lname] = "float"
            claimed.update(used)
    elif fmt == "compressed-tensors":
        assert cfg is not None
        version = ct.CT_VERSION
        narrow = t.metadata().get(ct.CODE_RANGE_KEY) == "narrow"
        for lname in ct.layer_names(t):
            scheme = _ct_scheme(cfg, lname)
            layer, used = ct.build_layer(lname, scheme, t, backend, verify, narrow)
            result[lname] = layer
            acts[lname] = scheme.activations
            claimed.update(used)
    for tname, f in t.where.items():
        if tname in claimed:
            continue
        if tname in result:
            raise FormatError(f"tensor {tname!r} has the same name as a quantized layer")
        result[tname] = f.array(tname)
    layers = {
        n: {**qf.layer_config(LayerSpec.of(v)), "activations": acts[n]}
        for n, v in result.items()
        if isinstance(v, QuantizedLinear)
    }
    return result, LoadInfo(fmt, acts, layers, (), version)


def describe(path: str | Path) -> tuple[str, dict[str, dict[str, Any]], int | str | None, Any]:
    """``(format, layer configs, version, TensorSet)`` of a safetensors checkpoint from its
    headers (compressed-tensors: plus the small ``weight_shape`` tensors); no layer is
    built."""
    shards = resolve_shards(path)
    t = TensorSet.open(shards)
    fmt, cfg = _detect(shards, t)
    if fmt == "qlinear":
        version, configs = _qlinear_configs(t)
        layers = {n: {**c, "activations": "float"} for n, c in configs.items()}
        return fmt, layers, version, t
    layers = {}
    if fmt == "compressed-tensors":
        assert cfg is not None
        for lname in ct.layer_names(t):
            scheme = _ct_scheme(cfg, lname)
            a = scheme.weights
            sname = f"{lname}.weight_shape"
            if sname in t:
                shape = [int(v) for v in t.array(sname)]
            else:
                shape = list(t.info(f"{lname}.weight").shape)  # type: ignore[union-attr]
            layers[lname] = {
                "qtype": f"int{a.num_bits}",
                "scheme": "symmetric" if a.symmetric else "asymmetric",
                "granularity": a.granularity.value,
                "group_size": a.group_size,
                "shape": shape,
                "bias": f"{lname}.bias" in t,
                "activations": scheme.activations,
                "format": scheme.format,
                "config_group": scheme.name if len(cfg.groups) > 1 else None,
            }
        return fmt, layers, ct.CT_VERSION, t
    return fmt, layers, None, t


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))
