"""compressed-tensors' ``quantization_config``: parsing (strict: unknown keys, formats and
strategies are FormatErrors naming the field) and writing, for
:mod:`qlinear.formats.compressed_tensors`."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .._safetensors import parse_json
from ..errors import FormatError
from ..qtypes import QuantizationGranularity, QuantizationType
from ._spec import LayerSpec

QUANT_METHOD = "compressed-tensors"
CT_VERSION = "0.20.1"
"""The compressed-tensors release whose layout this module writes and was tested against."""
PACK = "pack-quantized"
INT = "int-quantized"
NAIVE = "naive-quantized"
FORMATS = (PACK, INT, NAIVE)
CODE_RANGE_KEY = "qlinear_code_range"
CONFIG_KEY = "quantization_config"  # in config.json, or in a lone file's __metadata__

CONFIG_KEYS = frozenset(
    {
        "config_groups",
        "quant_method",
        "format",
        "quantization_status",
        "ignore",
        "version",
        "kv_cache_scheme",
        "global_compression_ratio",
        "sparsity_config",
        "transform_config",
        "moe_sparsity_config",
    }
)
SCHEME_KEYS = frozenset({"targets", "weights", "input_activations", "output_activations", "format"})
ARGS_KEYS = frozenset(
    {
        "num_bits",
        "type",
        "symmetric",
        "group_size",
        "strategy",
        "block_structure",
        "dynamic",
        "actorder",
        "scale_dtype",
        "zp_dtype",
        "observer",
        "observer_kwargs",
    }
)
STRATEGIES = {
    "tensor": QuantizationGranularity.PER_TENSOR,
    "channel": QuantizationGranularity.PER_CHANNEL,
    "group": QuantizationGranularity.PER_GROUP,
}
BITS = {QuantizationType.INT4: 4, QuantizationType.INT8: 8}


# --------------------------------------------------------------------------- schemes
@dataclass(frozen=True)
class WeightArgs:
    """The QuantizationArgs fields qlinear reads: integer type only."""

    num_bits: int
    symmetric: bool
    strategy: str
    group_size: int | None
    actorder: str | None = None

    @property
    def granularity(self) -> QuantizationGranularity:
        return STRATEGIES[self.strategy]


@dataclass(frozen=True)
class Scheme:
    """One config group: targets, weight args, default activation mode, storage format."""

    name: str
    targets: tuple[str, ...]
    weights: WeightArgs
    activations: str  # "float" or "int8"
    format: str


@dataclass(frozen=True)
class CompressedTensorsConfig:
    """A parsed ``quantization_config``."""

    groups: tuple[Scheme, ...]
    ignore: tuple[str, ...]
    format: str

    def scheme_for(self, layer: str) -> Scheme | None:
        """The group whose targets match ``layer`` (exact names first, then ``re:``
        regexes, then class-name targets such as ``"Linear"``, which qlinear cannot tell
        apart and takes to match every layer), or None when ``layer`` is ignored."""
        if any(_name_match(layer, t) for t in self.ignore):
            return None
        for exact in (True, False):
            for g in self.groups:
                for t in g.targets:
                    if (t == layer) if exact else (t.startswith("re:") and _name_match(layer, t)):
                        return g
        for g in self.groups:
            if any(not t.startswith("re:") and "." not in t for t in g.targets):
                return g
        return None


def _name_match(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


def _keys(obj: Any, allowed: frozenset[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise FormatError(f"{where} must be an object; got {obj!r:.80}")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise FormatError(f"{where} has unknown keys {unknown}; expected some of {sorted(allowed)}")
    return obj


def _parse_args(obj: Any, where: str) -> dict[str, Any]:
    a = _keys(obj, ARGS_KEYS, where)
    if a.get("type", "int") != "int":
        raise FormatError(f"{where}: type {a.get('type')!r} is not supported; expected 'int'")
    bits = a.get("num_bits", 8)
    if not isinstance(bits, int) or isinstance(bits, bool):
        raise FormatError(f"{where}: num_bits must be an integer; got {bits!r}")
    gs = a.get("group_size")
    strategy = a.get("strategy")
    if strategy is None:
        strategy = "tensor" if gs is None else ("channel" if gs == -1 else "group")
    if a.get("block_structure") is not None:
        raise FormatError(f"{where}: block quantization is not supported")
    return {**a, "num_bits": bits, "strategy": strategy, "group_size": gs}


def _parse_weights(obj: Any, where: str) -> WeightArgs:
    a = _parse_args(obj, where)
    if a["num_bits"] not in (4, 8):
        raise FormatError(f"{where}: num_bits {a['num_bits']} is not supported; expected 4 or 8")
    strategy = a["strategy"]
    if strategy not in STRATEGIES:
        raise FormatError(
            f"{where}: strategy {strategy!r} is not supported for weights; expected one of "
            f"{sorted(STRATEGIES)}"
        )
    gs = a["group_size"]
    if strategy == "group":
        if not isinstance(gs, int) or isinstance(gs, bool) or gs <= 0:
            raise FormatError(f"{where}: strategy 'group' needs group_size > 0; got {gs!r}")
    else:
        gs = None
    if a.get("dynamic") not in (None, False):
        raise FormatError(f"{where}: dynamic weight quantization is not supported")
    sym = a.get("symmetric", True)
    if not isinstance(sym, bool):
        raise FormatError(f"{where}: symmetric must be true or false; got {sym!r}")
    actorder = a.get("actorder")
    if actorder is True:
        actorder = "group"
    return WeightArgs(a["num_bits"], sym, strategy, gs, actorder)


def _parse_input_activations(obj: Any, where: str) -> str:
    if obj is None:
        return "float"
    a = _parse_args(obj, where)
    if a["num_bits"] != 8 or a["strategy"] not in ("token", "tensor"):
        raise FormatError(
            f"{where}: only 8-bit per-token or per-tensor int activations are supported; got "
            f"num_bits={a['num_bits']}, strategy={a['strategy']!r}"
        )
    return "int8"


def parse_config(qc: Any, where: str = "quantization_config") -> CompressedTensorsConfig:
    """Validate a ``quantization_config`` object (unknown keys, formats and strategies
    are FormatErrors naming the field)."""
    qc = _keys(qc, CONFIG_KEYS, where)
    if qc.get("quant_method") != QUANT_METHOD:
        raise FormatError(
            f"{where}: quant_method {qc.get('quant_method')!r}; expected {QUANT_METHOD!r}"
        )
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise FormatError(
            f"{where}: quantization_status {status!r}; qlinear reads 'compressed' checkpoints"
        )
    top = qc.get("format", PACK)
    if top not in (*FORMATS, "mixed-precision"):
        raise FormatError(
            f"{where}: format {top!r} is not supported; expected one of "
            f"{[*FORMATS, 'mixed-precision']}"
        )
    groups_in = qc.get("config_groups")
    if not isinstance(groups_in, dict) or not groups_in:
        raise FormatError(f"{where}: config_groups must be a non-empty object")
    groups = []
    for gname, g in groups_in.items():
        gw = f"{where}.config_groups.{gname}"
        g = _keys(g, SCHEME_KEYS, gw)
        targets = g.get("targets")
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise FormatError(f"{gw}: targets must be a list of strings; got {targets!r}")
        if g.get("weights") is None:
            raise FormatError(f"{gw}: no weights quantization; qlinear needs quantized weights")
        if g.get("output_activations") is not None:
            raise FormatError(f"{gw}: output activation quantization is not supported")
        weights = _parse_weights(g["weights"], f"{gw}.weights")
        acts = _parse_input_activations(g.get("input_activations"), f"{gw}.input_activations")
        fmt = g.get("format") or top
        if fmt not in FORMATS:
            raise FormatError(f"{gw}: format {fmt!r} is not supported; expected one of {FORMATS}")
        groups.append(Scheme(gname, tuple(targets), weights, acts, fmt))
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(t, str) for t in ignore):
        raise FormatError(f"{where}: ignore must be a list of strings; got {ignore!r}")
    return CompressedTensorsConfig(tuple(groups), tuple(ignore), top)


def _format_of(spec: LayerSpec) -> str:
    return INT if spec.activations == "int8" else PACK


def _weights_dict(spec: LayerSpec) -> dict[str, Any]:
    w: dict[str, Any] = {
        "num_bits": BITS[spec.qtype],
        "type": "int",
        "symmetric": not spec.asymmetric,
        "strategy": {
            QuantizationGranularity.PER_TENSOR: "tensor",
            QuantizationGranularity.PER_CHANNEL: "channel",
            QuantizationGranularity.PER_GROUP: "group",
        }[spec.granularity],
        "dynamic": False,
    }
    if spec.granularity is QuantizationGranularity.PER_GROUP:
        w["group_size"] = spec.group_size
    return w


INPUT_INT8 = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


def _scheme_key(spec: LayerSpec) -> tuple:
    return (spec.qtype, spec.scheme, spec.granularity, spec.group_size, spec.activations)


def config_dict(specs: Mapping[str, LayerSpec], ignore: Iterable[str]) -> dict[str, Any]:
    """The ``quantization_config`` for layers ``specs`` (name -> writable spec) with the
    float linear layers ``ignore``: the most common scheme targets ``"Linear"``, every
    other scheme lists its layers by name (exact names outrank class targets).
    ``lm_head`` is always ignored unless it is quantized."""
    by_key: dict[tuple, list[str]] = {}
    example: dict[tuple, LayerSpec] = {}
    for name, spec in specs.items():
        k = _scheme_key(spec)
        by_key.setdefault(k, []).append(name)
        example.setdefault(k, spec)
    order = sorted(by_key, key=lambda k: -len(by_key[k]))
    groups: dict[str, Any] = {}
    formats = set()
    for i, k in enumerate(order):
        spec = example[k]
        fmt = _format_of(spec)
        formats.add(fmt)
        groups[f"group_{i}"] = {
            "targets": ["Linear"] if i == 0 else sorted(by_key[k]),
            "weights": _weights_dict(spec),
            "input_activations": dict(INPUT_INT8) if spec.activations == "int8" else None,
            "output_activations": None,
            "format": fmt,
        }
    ign = sorted(set(ignore) - set(specs))
    if "lm_head" not in specs and "lm_head" not in ign:
        ign.append("lm_head")
    return {
        "config_groups": groups,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "ignore": ign,
        "kv_cache_scheme": None,
        "quant_method": QUANT_METHOD,
        "quantization_status": "compressed",
        "version": CT_VERSION,
    }


def config_from_json_text(text: str, where: str) -> CompressedTensorsConfig:
    return parse_config(parse_json(text, where), where)
