"""Quantize a safetensors checkpoint (one file or shards), streaming one tensor at a time.

:func:`quantize_checkpoint` reads a Hugging Face style checkpoint (a ``.safetensors``
file, a directory with ``model.safetensors``, or a directory with
``model.safetensors.index.json`` and its shards), quantizes the weights of linear layers
and writes the same shard structure in qlinear's format (``docs/format.md``): every output
shard is a file :func:`qlinear.load` reads; the directory as a whole loads too.

Which tensors are quantized: every 2-D floating ``*.weight`` whose tensor name or layer
name (the name without ``.weight``) matches ``include`` (default: all) and does not match
``exclude``, nor :data:`DEFAULT_EXCLUDE` (embeddings, norms, MoE routers and gates such as
Mixtral's ``block_sparse_moe.gate.weight``; ``mlp.gate_proj.weight`` *is* quantized). An
``include`` pattern overrides the defaults for the tensors it matches when the pattern
itself names an excluded kind (``"*embed_tokens*"`` matches ``"*embed*"`` as text), so
``include=["*mlp*"]`` still keeps ``mlp.router`` in float. ``lm_head`` is quantized unless
excluded (``exclude=["lm_head"]``). Everything else is copied byte for
byte.

Memory: shards are memory-mapped and every weight is processed in row blocks of about
:data:`BLOCK_BYTES` of float64 (per-channel and per-group calibration are row-local, and
per-tensor min-max takes one extra pass), with the mapped pages released after each
block, so peak memory stays far below the largest tensor. Per-tensor calibration with the
``percentile`` / ``mse`` methods needs the whole tensor in float64 at once.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np

from ._safetensors import (
    DTYPE_SIZES,
    FLOAT_DTYPES,
    SafetensorsFile,
    SafetensorsWriter,
    atomic_write,
)
from .calibrate import params_from_range
from .errors import FormatError, InvalidParamsError
from .io import METADATA_KEY, format_config, read_index
from .linear import QuantizedLinear
from .packing import packed_cols
from .qtypes import (
    QuantizationGranularity,
    QuantizationScheme,
    QuantizationType,
)
from .quantconfig import QuantConfig
from .report import CheckpointReport, TensorReport

__all__ = [
    "DEFAULT_EXCLUDE",
    "CheckpointReport",
    "QuantConfig",
    "TensorReport",
    "quantize_checkpoint",
    "should_quantize",
]

DEFAULT_EXCLUDE: tuple[str, ...] = (
    "*embed*",
    "*.wte",
    "*.wpe",
    "*norm*",
    "*router*",
    "*.gate",
    "gate",
    "*shared_expert_gate",
)
BLOCK_BYTES = 32 * 1024 * 1024
"""Float64 bytes of one row block while quantizing (rows = BLOCK_BYTES // (8 * in))."""
WEIGHT_EXTENSIONS = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".onnx",
    ".gguf",
    ".npz",
)


# --------------------------------------------------------------------------- selection
def should_quantize(
    name: str,
    shape: Sequence[int],
    dtype: str,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> bool:
    """True when tensor ``name`` (safetensors ``dtype``, ``shape``) is a linear weight to
    quantize under these globs (see the module docstring for the rules)."""
    if not name.endswith(".weight") or len(shape) != 2 or 0 in shape:
        return False
    if dtype not in FLOAT_DTYPES:
        return False
    layer = name[: -len(".weight")]

    def hit(patterns: Sequence[str] | None) -> bool:
        return any(fnmatchcase(name, p) or fnmatchcase(layer, p) for p in patterns or ())

    if include is not None and not hit(include):
        return False
    if hit(exclude):
        return False
    if not hit(DEFAULT_EXCLUDE):
        return True
    # Kept in float unless asked: an include pattern that itself names an excluded kind
    # ("*embed_tokens*" matches "*embed*" as text) overrides the default; "*mlp*" does not.
    asking = [p for p in include or () if any(fnmatchcase(p, d) for d in DEFAULT_EXCLUDE)]
    return hit(asking)


# --------------------------------------------------------------------------- quantizing
def _out_entries(lname: str, shape: tuple[int, int], cfg: QuantConfig, has_bias: bool):
    out_f, in_f = shape
    if cfg.granularity is QuantizationGranularity.PER_GROUP:
        pshape: tuple[int, ...] = (out_f, -(-in_f // cfg.group_size))  # type: ignore[operator]
    elif cfg.granularity is QuantizationGranularity.PER_CHANNEL:
        pshape = (out_f,)
    else:
        pshape = (1,)
    entries = []
    if cfg.qtype is QuantizationType.INT4:
        entries += [
            (f"{lname}.weight_packed", "U8", (out_f, packed_cols(in_f))),
            (f"{lname}.weight_shape", "I64", (2,)),
        ]
    else:
        entries.append((f"{lname}.weight", "I8", (out_f, in_f)))
    entries.append((f"{lname}.weight_scale", "F64", pshape))
    if cfg.scheme is QuantizationScheme.ASYMMETRIC:
        entries.append((f"{lname}.weight_zero_point", "I8", pshape))
    layer_cfg = {
        **{k: v for k, v in cfg.to_dict().items() if k != "method"},
        "shape": [out_f, in_f],
        "bias": has_bias,
    }
    return entries, layer_cfg


def _check_bias(sf: SafetensorsFile, bname: str, out_f: int) -> None:
    """A bias stored beside a quantized weight must be one :func:`qlinear.load` accepts
    (float, shape ``(out,)``, finite): checked before anything is written, so that the
    output never holds a layer its own loader rejects."""
    info = sf.info(bname)
    hint = "; exclude the layer (--exclude) to keep it in float"
    if info.dtype not in FLOAT_DTYPES or info.shape != (out_f,):
        raise FormatError(
            f"tensor {bname!r} is {info.dtype} {list(info.shape)}; expected a float bias of "
            f"shape [{out_f}] for the quantized weight beside it{hint}"
        )
    b = sf.array(bname)
    if not np.all(np.isfinite(b)):
        raise FormatError(f"tensor {bname!r} holds NaN or Inf; expected a finite bias{hint}")


def _blocks(rows: int, cols: int, span: tuple[int, int] | None = None):
    step, (lo, hi) = max(1, BLOCK_BYTES // (8 * cols)), span or (0, rows)
    for a in range(lo, hi, step):
        yield a, min(hi, a + step)


def _add_squares(acc: tuple[float, float], a: np.ndarray) -> tuple[float, float]:
    """A running sum of squares kept as ``(s, q)`` with ``sum(x**2) = s**2 * q`` (the
    scaling of LAPACK's dnrm2), so that weights near 1e200 do not overflow it to Inf
    (a NaN error) and weights near 1e-200 do not underflow it to 0 (an "exact" one)."""
    s, q = acc
    m = float(np.max(np.abs(a))) if a.size else 0.0
    if m == 0.0:
        return acc
    if m > s:
        q = q * (s / m) ** 2
        s = m
    b = a / s
    return s, q + float(np.einsum("ij,ij->", b, b))


def _quantize_tensor(
    src: SafetensorsFile,
    name: str,
    cfg: QuantConfig,
    writer: SafetensorsWriter,
    f: Any,
    bar: Any,
    rows: tuple[int, int] | None = None,
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Quantize ``name`` (or its ``rows`` ``[a, b)``; not per tensor) block by block into
    ``writer``; returns ``||W - Wq||`` and ``||W||`` as scaled sums of squares (see
    :func:`_add_squares`). The serial loop and :mod:`qlinear.distributed` tasks call it."""
    info = src.info(name)
    out_f, in_f = info.shape
    lname = name[: -len(".weight")]
    int4 = cfg.qtype is QuantizationType.INT4
    codes_name = f"{lname}.weight_packed" if int4 else f"{lname}.weight"
    code_row = packed_cols(in_f) if int4 else in_f
    asym = cfg.scheme is QuantizationScheme.ASYMMETRIC
    fixed = None
    if cfg.granularity is QuantizationGranularity.PER_TENSOR:
        if cfg.method == "minmax":
            lo, hi = math.inf, -math.inf
            for a, b in _blocks(out_f, in_f):
                w = _finite_block(src, name, a, b)
                lo, hi = min(lo, float(w.min())), max(hi, float(w.max()))
                src.release_pages()
            fixed = params_from_range(
                np.array([lo]), np.array([hi]), cfg.qtype, cfg.granularity, cfg.scheme
            )
        else:
            fixed = cfg.calibrate(_finite_block(src, name, 0, out_f))
            src.release_pages()
    err2 = sig2 = (0.0, 0.0)
    for a, b in _blocks(out_f, in_f, rows):
        w = _finite_block(src, name, a, b)
        params = fixed if fixed is not None else cfg.calibrate(w)
        layer = QuantizedLinear.from_fp(w, params, backend="numpy")
        writer.write(f, codes_name, layer.stored_weight, at=a * code_row)
        if fixed is None:
            prow = params.scale[0].nbytes if params.scale.ndim == 2 else 8
            writer.write(f, f"{lname}.weight_scale", params.scale, at=a * prow)
            if asym:
                zrow = prow // 8
                writer.write(
                    f, f"{lname}.weight_zero_point", params.zero_point.astype(np.int8), at=a * zrow
                )
        d = layer.dequantize() - w
        err2 = _add_squares(err2, d)
        sig2 = _add_squares(sig2, w)
        del w, d, layer
        src.release_pages()
        if bar is not None:
            bar.update(info.nbytes * (b - a) // out_f)
    if fixed is not None:
        writer.write(f, f"{lname}.weight_scale", fixed.scale)
        if asym:
            writer.write(f, f"{lname}.weight_zero_point", fixed.zero_point.astype(np.int8))
    if int4:
        writer.write(f, f"{lname}.weight_shape", np.array([out_f, in_f], dtype=np.int64))
    return err2, sig2


def _finite_block(src: SafetensorsFile, name: str, a: int, b: int) -> np.ndarray:
    w = np.asarray(src.array(name, (a, b)), dtype=np.float64)
    if not np.all(np.isfinite(w)):
        r, c = (int(i) for i in np.argwhere(~np.isfinite(w))[0])
        raise FormatError(
            f"tensor {name!r} holds {w[r, c]} at [{a + r}, {c}]; cannot quantize NaN/Inf"
        )
    return w


def _copy_tensor(src: SafetensorsFile, name: str, writer, f, bar) -> None:
    n = src.info(name).nbytes
    step = 64 * 1024 * 1024
    for a in range(0, n, step):
        b = min(n, a + step)
        with src.raw(name, a, b) as mv:
            writer.write(f, name, mv, at=a)
        src.release_pages()
        if bar is not None:
            bar.update(b - a)


def _progress_bar(total: int, enabled: bool) -> Any:
    """A tqdm bar on stderr if tqdm is installed and wanted, else None (the library
    prints nothing itself)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc="quantize", leave=False)


# --------------------------------------------------------------------------- driver
def _resolve(src: Path, dst: Path) -> tuple[Path, list[str], dict | None, Path, dict[str, str]]:
    """(source dir, shard names, source index, destination dir, shard -> output name)."""
    if src.is_file():
        if dst.suffix == ".safetensors":
            return src.parent, [src.name], None, dst.parent, {src.name: dst.name}
        return src.parent, [src.name], None, dst, {src.name: src.name}
    if not src.is_dir():
        raise FileNotFoundError(f"no such file or directory: {src}")
    index = src / "model.safetensors.index.json"
    if index.is_file():
        data = read_index(index)
        shards = sorted(set(data["weight_map"].values()))
        return src, shards, data, dst, {s: s for s in shards}
    if (src / "model.safetensors").is_file():
        return src, ["model.safetensors"], None, dst, {"model.safetensors": "model.safetensors"}
    raise FileNotFoundError(
        f"{src} holds neither model.safetensors nor model.safetensors.index.json"
    )


def _copy_side_files(src_dir: Path, dst_dir: Path) -> list[str]:
    copied = []
    dst_abs = dst_dir.resolve()
    for p in sorted(src_dir.rglob("*")):
        rel = p.relative_to(src_dir)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if p.resolve().is_relative_to(dst_abs):  # DST inside SRC: do not copy our output
            continue
        if p.suffix.lower() in WEIGHT_EXTENSIONS or p.name == "model.safetensors.index.json":
            continue
        target = dst_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "rb") as fin, atomic_write(target) as fout:
            shutil.copyfileobj(fin, fout)
        copied.append(str(rel))
    return copied


def quantize_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    config: QuantConfig | Mapping[str, Any],
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    progress: bool = True,
    executor: Any = None,
) -> CheckpointReport:
    """Quantize the linear weights of a safetensors checkpoint into ``dst``.

    Args:
        src: a ``.safetensors`` file, or a directory with ``model.safetensors`` or
            ``model.safetensors.index.json`` and its shards.
        dst: for a file ``src``, a ``.safetensors`` path or a directory; for a directory
            ``src``, a directory (created if needed; must differ from ``src``). It gets
            the same shard names, an updated index (new tensor names, ``total_size``) and
            copies of the other files (config, tokenizer, ...; other weight formats and
            hidden files are skipped).
        config: a :class:`QuantConfig` or a dict of its fields.
        include, exclude: glob patterns (``fnmatch``, case-sensitive) matched against
            the tensor name and the layer name; see :func:`should_quantize`.
        progress: show a tqdm progress bar on stderr when tqdm is installed.
        executor: None (quantize here, tensor after tensor) or a
            :class:`qlinear.distributed.TensorExecutor` (e.g. ``RayExecutor``) that
            quantizes the tensors elsewhere; the output is byte-identical.

    Returns:
        A :class:`CheckpointReport` (per tensor: shape, format, relative error, SNR,
        bytes before/after; totals; ``to_json()``).

    Raises:
        InvalidParamsError: a bad config, an unavailable method, ``dst`` equal to ``src``.
        FormatError: malformed source files or index, NaN/Inf in a weight to quantize,
            or a bias beside such a weight that is not float, of shape ``(out,)`` and
            finite (checked before anything is written).
        FileNotFoundError: missing source, shard or index entries.
    """
    t0 = time.perf_counter()
    cfg = QuantConfig.coerce(config)
    # tuples first: checking a generator would use it up, and then nothing would match
    include = include if include is None or isinstance(include, str) else tuple(include)
    exclude = exclude if exclude is None or isinstance(exclude, str) else tuple(exclude)
    for what, pats in (("include", include), ("exclude", exclude)):
        if pats is not None and (
            isinstance(pats, str) or not all(isinstance(p, str) for p in pats)
        ):
            raise InvalidParamsError(f"{what} must be a list of glob strings; got {pats!r}")
    src_p, dst_p = Path(src), Path(dst)
    src_dir, shards, index, dst_dir, out_names = _resolve(src_p, dst_p)
    if dst_dir.resolve() == src_dir.resolve() and any(out_names[s] == s for s in shards):
        raise InvalidParamsError(f"destination {dst} would overwrite the source {src}")
    files = {}
    for s in shards:
        if not (src_dir / s).is_file():
            raise FileNotFoundError(f"shard {s} listed in the index is missing from {src_dir}")
        files[s] = SafetensorsFile(src_dir / s)
    holder = {n: sf for sf in files.values() for n in sf.tensors}
    all_names = set(holder)
    if index is not None:
        for n, s in index["weight_map"].items():
            if n not in files[s]:
                raise FormatError(f"index maps tensor {n!r} to {s}, which does not hold it")
    for sf in files.values():
        for n, info in sf.tensors.items():
            bname = f"{n[: -len('.weight')]}.bias"
            if bname in holder and should_quantize(n, info.shape, info.dtype, include, exclude):
                _check_bias(holder[bname], bname, info.shape[0])
    dst_dir.mkdir(parents=True, exist_ok=True)
    total = sum(i.nbytes for sf in files.values() for i in sf.tensors.values())
    bar = _progress_bar(total, progress)
    if executor is not None:  # start every quantize task now; collected in file order below
        jobs = [(src_dir / s, n, i) for s in shards for n, i in files[s].tensors.items()]
        keep = [j for j in jobs if should_quantize(j[1], j[2].shape, j[2].dtype, include, exclude)]
        executor.submit(keep, cfg, dst_dir)
    reports: list[TensorReport] = []
    weight_map: dict[str, str] = {}
    total_size = 0
    try:
        for s in shards:
            sf = files[s]
            names = sorted(sf.tensors, key=lambda n: sf.tensors[n].begin)
            entries, layer_cfgs, plan = [], {}, {}
            for n in names:
                info = sf.tensors[n]
                if should_quantize(n, info.shape, info.dtype, include, exclude):
                    lname = n[: -len(".weight")]
                    ents, lcfg = _out_entries(lname, info.shape, cfg, f"{lname}.bias" in all_names)
                    layer_cfgs[lname] = lcfg
                    plan[n] = ents
                    entries += ents
                else:
                    entries.append((n, info.dtype, info.shape))
            meta = {k: v for k, v in sf.metadata.items() if k != METADATA_KEY}
            meta[METADATA_KEY] = format_config(layer_cfgs)
            writer = SafetensorsWriter(entries, meta)
            with atomic_write(dst_dir / out_names[s]) as f:
                writer.begin(f)
                for n in names:
                    info = sf.tensors[n]
                    if n in plan:
                        if executor is None:
                            err2, sig2 = _quantize_tensor(sf, n, cfg, writer, f, bar)
                        else:
                            err2, sig2 = executor.collect(n, writer, f, bar)
                        after = sum(math.prod(sh) * DTYPE_SIZES[dt] for _, dt, sh in plan[n])
                        (se, qe), (sw, qw) = err2, sig2
                        rel = (se / sw) * math.sqrt(qe / qw) if sw > 0 else se * math.sqrt(qe)
                        snr = -20 * math.log10(rel) if rel > 0 and sw > 0 else None
                        reports.append(
                            TensorReport(
                                n,
                                info.shape,
                                info.dtype,
                                cfg.describe(),
                                rel,
                                snr,
                                info.nbytes,
                                after,
                            )
                        )
                    else:
                        _copy_tensor(sf, n, writer, f, bar)
                        reports.append(
                            TensorReport(
                                n,
                                info.shape,
                                info.dtype,
                                f"kept {info.dtype}",
                                None,
                                None,
                                info.nbytes,
                                info.nbytes,
                            )
                        )
                writer.finish()
            for n, _, _ in entries:
                weight_map[n] = out_names[s]
            total_size += writer.data_bytes
            sf.close()
    finally:
        if bar is not None:
            bar.close()
        if executor is not None:
            executor.finish()
    written = [str(dst_dir / out_names[s]) for s in shards]
    if index is not None:
        new_index = {k: v for k, v in index.items() if k not in ("metadata", "weight_map")}
        old_meta = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
        new_index["metadata"] = {**old_meta, "total_size": total_size}
        new_index["weight_map"] = dict(sorted(weight_map.items()))
        with atomic_write(dst_dir / "model.safetensors.index.json") as f:
            f.write(json.dumps(new_index, indent=2).encode("utf-8"))
        written.append(str(dst_dir / "model.safetensors.index.json"))
    if src_p.is_dir():
        written += [str(dst_dir / r) for r in _copy_side_files(src_dir, dst_dir)]
    return CheckpointReport(
        str(src_p),
        str(dst_p),
        cfg.to_dict(),
        tuple(reports),
        tuple(written),
        time.perf_counter() - t0,
        tasks=() if executor is None else executor.records(),
    )
