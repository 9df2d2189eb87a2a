"""Quantize a safetensors checkpoint (one file or shards), streaming one tensor at a time.

:func:`quantize_checkpoint` reads a Hugging Face style checkpoint (a ``.safetensors``
file, a directory with ``model.safetensors``, or a directory with
``model.safetensors.index.json`` and its shards), quantizes the weights of linear layers
and writes the same shard structure as compressed-tensors (the default: transformers and
vLLM load the output directory) or in qlinear's own format (``docs/format.md``): every
output shard is a file :func:`qlinear.load` reads; the directory as a whole loads too.

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

import dataclasses
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

from ._atomic import atomic_dir, atomic_write
from ._safetensors import (
    DTYPE_SIZES,
    FLOAT_DTYPES,
    SafetensorsFile,
    SafetensorsWriter,
)
from .calibrate import params_from_range
from .errors import FormatError, InvalidParamsError
from .formats import compressed_tensors as ct
from .formats import qlinear_format as qf
from .formats._files import Shards, read_json, resolve_shards
from .formats._spec import LayerSpec
from .linear import QuantizedLinear
from .params import QuantizationParams
from .qtypes import QuantizationGranularity, QuantizationType
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
FORMATS = ("compressed-tensors", "qlinear", "gguf")
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


@dataclasses.dataclass(frozen=True)
class _LayerPlan:
    """How one weight is written: its spec, the QuantConfig it is calibrated with (group
    size adjusted for compressed-tensors), the scale dtype and the format's schema."""

    lname: str
    spec: LayerSpec
    cfg: QuantConfig
    fmt: str
    scale_dtype: str
    note: str | None = None

    @property
    def entries(self) -> list[tuple]:
        if self.fmt == "qlinear":
            return qf.entries(self.lname, self.spec)
        return ct.entries(self.lname, self.spec, self.scale_dtype)

    @property
    def codes_name(self) -> str:
        mod = qf if self.fmt == "qlinear" else ct
        return mod.codes_name(self.lname, self.spec)

    def codes(self, layer: QuantizedLinear) -> np.ndarray:
        if self.fmt == "qlinear":
            return qf.stored_codes(layer)
        return ct.stored_codes(layer, self.spec)

    def param_tensors(self, scale: np.ndarray, zp: np.ndarray) -> dict[str, np.ndarray]:
        if self.fmt == "qlinear":
            return qf.param_tensors(self.lname, self.spec, scale, zp)
        return ct.param_tensors(self.lname, self.spec, scale, zp, self.scale_dtype)

    def calibrate(self, w: np.ndarray) -> QuantizationParams:
        return _rounded(self.cfg.calibrate(w), self.scale_dtype)


def _rounded(p: QuantizationParams, dtype: str) -> QuantizationParams:
    """``p`` with its scales rounded to the stored dtype, so that codes are computed
    against the scale every reader sees."""
    s = ct.round_scale(p.scale, dtype)
    if np.array_equal(s, p.scale):
        return p
    return QuantizationParams(
        p.qtype, p.scheme, p.granularity, s, p.zero_point, p.min_val, p.max_val, p.group_size
    )


def _plan_layer(
    lname: str,
    shape: tuple[int, int],
    src_dtype: str,
    cfg: QuantConfig,
    has_bias: bool,
    fmt: str,
    activations: str,
    strict: bool,
) -> _LayerPlan:
    spec = LayerSpec(
        cfg.qtype,  # type: ignore[arg-type]
        cfg.scheme,  # type: ignore[arg-type]
        cfg.granularity,  # type: ignore[arg-type]
        cfg.group_size,
        (int(shape[0]), int(shape[1])),
        has_bias,
        activations,
    )
    if fmt == "qlinear":
        return _LayerPlan(lname, spec, cfg, fmt, "F64")
    fitted = ct.writable_spec(spec, lname, strict=strict)
    note = None
    if fitted != spec:
        cfg = dataclasses.replace(cfg, granularity=fitted.granularity, group_size=fitted.group_size)
        what = (
            f"group size {fitted.group_size}"
            if fitted.group_size
            else "per-channel (no group size divides it)"
        )
        note = f"in_features {shape[1]} is not a multiple of {spec.group_size}: {what}"
    sd = src_dtype if src_dtype in (*ct.SCALE_DTYPES, "F64") else "F32"
    return _LayerPlan(lname, fitted, cfg, fmt, sd, note)


def _quantize_tensor(
    src: SafetensorsFile, name: str, plan: _LayerPlan, writer: SafetensorsWriter, f: Any, bar: Any
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Quantize ``name`` block by block into ``writer``; returns ``||W - Wq||`` and ``||W||``
    as scaled sums of squares (see :func:`_add_squares`)."""
    err2, sig2, scale, zp = _quantize_rows(src, name, plan, writer, f, bar)
    _write_params(plan, scale, zp, writer, f)
    return err2, sig2


def _write_params(plan: _LayerPlan, scale: np.ndarray, zp: np.ndarray, writer: Any, f: Any) -> None:
    for tname, arr in plan.param_tensors(scale, zp).items():
        writer.write(f, tname, arr)


def _quantize_rows(
    src: SafetensorsFile,
    name: str,
    plan: _LayerPlan,
    writer: Any,
    f: Any,
    bar: Any,
    rows: tuple[int, int] | None = None,
) -> tuple[tuple[float, float], tuple[float, float], np.ndarray, np.ndarray]:
    """Write the codes of ``name`` (its ``rows`` ``[a, b)``, or all; not per tensor) block
    by block into ``writer``; returns ``(err2, sig2, scale, zp)`` (the raw parameters of
    these rows, for :func:`_write_params`). The serial loop and :mod:`qlinear.distributed`
    tasks call it."""
    info = src.info(name)
    out_f, in_f = info.shape
    cfg = plan.cfg
    codes_name = plan.codes_name
    _, cdt, csh = next(e for e in plan.entries if e[0] == codes_name)
    code_row = math.prod(csh) * DTYPE_SIZES[cdt] // out_f
    fixed = None
    if cfg.granularity is QuantizationGranularity.PER_TENSOR:
        if rows is not None:
            raise InvalidParamsError(f"{name!r} is quantized per tensor: one task, not row blocks")
        if cfg.method == "minmax":
            lo, hi = math.inf, -math.inf
            for a, b in _blocks(out_f, in_f):
                w = _finite_block(src, name, a, b)
                lo, hi = min(lo, float(w.min())), max(hi, float(w.max()))
                src.release_pages()
            fixed = _rounded(
                params_from_range(
                    np.array([lo]), np.array([hi]), cfg.qtype, cfg.granularity, cfg.scheme
                ),
                plan.scale_dtype,
            )
        else:
            fixed = plan.calibrate(_finite_block(src, name, 0, out_f))
            src.release_pages()
    err2 = sig2 = (0.0, 0.0)
    scales, zps = [], []
    for a, b in _blocks(out_f, in_f, rows):
        w = _finite_block(src, name, a, b)
        params = fixed if fixed is not None else plan.calibrate(w)
        layer = QuantizedLinear.from_fp(w, params, backend="numpy")
        writer.write(f, codes_name, plan.codes(layer), at=a * code_row)
        if fixed is None:
            scales.append(params.scale)
            zps.append(params.zero_point)
        d = layer.dequantize() - w
        err2 = _add_squares(err2, d)
        sig2 = _add_squares(sig2, w)
        del w, d, layer
        src.release_pages()
        if bar is not None:
            bar.update(info.nbytes * (b - a) // out_f)
    if fixed is not None:
        scale, zp = fixed.scale, fixed.zero_point
    else:
        scale, zp = np.concatenate(scales), np.concatenate(zps)
    return err2, sig2, scale, zp


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
def _destination(shards: Shards, dst: Path) -> tuple[Path, dict[str, str]]:
    """(destination directory, source shard -> output file name): the one place that
    decides where outputs go."""
    if not shards.is_dir and dst.suffix == ".safetensors":
        return dst.parent, {shards.names[0]: dst.name}
    return dst, {s: s for s in shards.names}


def _copy_side_files(src_dir: Path, out_dir: Path, dst_dir: Path) -> list[str]:
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
        target = out_dir / rel
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
    format: str = "compressed-tensors",
    activations: str = "float",
    strict_group_size: bool = False,
    gguf_type: str | None = None,
    overwrite: bool = False,
    executor: Any = None,
) -> CheckpointReport:
    """Quantize the linear weights of a safetensors checkpoint into ``dst``.

    Args:
        src: a ``.safetensors`` file, or a directory with ``model.safetensors`` or
            ``model.safetensors.index.json`` and its shards (``format="gguf"``: also a
            ``.gguf`` file).
        dst: for a file ``src``, a ``.safetensors`` path or a directory; for a directory
            ``src``, a directory (created if needed; must differ from ``src``). It gets
            the same shard names, an updated index (new tensor names, ``total_size``) and
            copies of the other files (config, tokenizer, ...; other weight formats and
            hidden files are skipped). ``format="gguf"``: a ``.gguf`` file.
        config: a :class:`QuantConfig` or a dict of its fields.
        include, exclude: glob patterns (``fnmatch``, case-sensitive) matched against
            the tensor name and the layer name; see :func:`should_quantize`.
        progress: show a tqdm progress bar on stderr when tqdm is installed.
        format: ``"compressed-tensors"`` (default; config.json gets the
            ``quantization_config``, or each shard's metadata when there is no
            config.json; scales in the source dtype, codes computed against them),
            ``"qlinear"`` (float64 scales, partial groups kept) or ``"gguf"``
            (``gguf_type`` ``"q8_0"``, ``"q4_0"`` or ``"q4_1"``; of ``config`` only
            ``method`` is used: ``"minmax"``, llama.cpp's block scales, or ``"mse"``).
        activations: ``"float"`` (weight-only) or ``"int8"`` (W8A8: int-quantized, dynamic
            per-token int8 activations; int8 weights only). compressed-tensors only.
        strict_group_size: compressed-tensors only: a layer whose in_features is not a
            multiple of the group size is an error instead of getting the largest group
            size that divides it (a multiple of 8; per-channel if none).
        overwrite: allow replacing an existing ``dst`` directory that is neither empty
            nor a previous qlinear output (see below).

    Outputs are all or nothing (:mod:`qlinear._atomic`): a ``.safetensors`` ``dst`` is
    written to a temporary file and renamed over it; a directory ``dst`` is built whole
    under ``.DST.tmp-<pid>-<random>`` beside it, fsynced, then swapped in, so a run that
    fails or is killed leaves ``dst`` absent or exactly as it was. An existing ``dst``
    directory is replaced whole (files in it are not merged): without ``overwrite`` only
    when it is empty or a previous qlinear output (every ``*.safetensors`` in it carries
    qlinear's or compressed-tensors' metadata), so a rerun needs no flag. A ``dst`` that
    contains ``src`` is refused. Leftover temporaries of killed runs are removed by the next run.

    Returns:
        A :class:`CheckpointReport` (per tensor: shape, format, relative error, SNR,
        bytes before/after, notes such as a changed group size; totals; ``to_json()``).

    Raises:
        InvalidParamsError: a bad config, an unavailable method, ``dst`` equal to ``src``
            or containing it, an existing ``dst`` that needs ``overwrite=True``, an
            unknown format or activation mode.
        FormatError: malformed source files or index, NaN/Inf in a weight to quantize,
            or a bias beside such a weight that is not float, of shape ``(out,)`` and
            finite (checked before anything is written); with ``strict_group_size``, a
            partial group.
        FileNotFoundError: missing source, shard or index entries.
    """
    t0 = time.perf_counter()
    if format not in FORMATS:
        raise InvalidParamsError(f"format must be one of {FORMATS}; got {format!r}")
    if activations not in ("float", "int8"):
        raise InvalidParamsError(f"activations must be 'float' or 'int8'; got {activations!r}")
    # tuples first: checking a generator would use it up, and then nothing would match
    include = include if include is None or isinstance(include, str) else tuple(include)
    exclude = exclude if exclude is None or isinstance(exclude, str) else tuple(exclude)
    for what, pats in (("include", include), ("exclude", exclude)):
        if pats is not None and (
            isinstance(pats, str) or not all(isinstance(p, str) for p in pats)
        ):
            raise InvalidParamsError(f"{what} must be a list of glob strings; got {pats!r}")
    if format == "gguf":
        from .formats import gguf

        if executor is not None:
            raise InvalidParamsError(
                "format='gguf' is written in one pass here: it cannot run on an executor "
                "(--ray); choose format='compressed-tensors' or 'qlinear', or drop the executor"
            )
        return gguf.quantize_to_gguf(
            src,
            dst,
            gguf_type or "q8_0",
            include=include,
            exclude=exclude,
            method=QuantConfig.coerce(config).method,
            t0=t0,
        )
    cfg = QuantConfig.coerce(config)
    if activations == "int8" and cfg.qtype is not QuantizationType.INT8:
        raise InvalidParamsError("activations='int8' (W8A8) needs int8 weights (--bits 8)")
    src_p, dst_p = Path(src), Path(dst)
    shards = resolve_shards(src_p)
    src_dir, index = shards.directory, shards.index
    dst_dir, out_names = _destination(shards, dst_p)
    if dst_dir.resolve() == src_dir.resolve() and any(out_names[s] == s for s in shards.names):
        raise InvalidParamsError(f"destination {dst} would overwrite the source {src}")
    files = {s: SafetensorsFile(src_dir / s) for s in shards.names}
    holder = {n: sf for sf in files.values() for n in sf.tensors}
    if index is not None:
        for n, s in index["weight_map"].items():
            if n not in files[s]:
                raise FormatError(f"index maps tensor {n!r} to {s}, which does not hold it")
    # Plan every shard from the headers before anything is written.
    plans: dict[str, _LayerPlan] = {}
    ignore: list[str] = []
    for sf in files.values():
        for n, info in sf.tensors.items():
            if should_quantize(n, info.shape, info.dtype, include, exclude):
                lname = n[: -len(".weight")]
                bname = f"{lname}.bias"
                if bname in holder:
                    _check_bias(holder[bname], bname, info.shape[0])
                plans[n] = _plan_layer(
                    lname,
                    info.shape,
                    info.dtype,
                    cfg,
                    bname in holder,
                    format,
                    activations,
                    strict_group_size,
                )
            elif n.endswith(".weight") and len(info.shape) == 2:
                ignore.append(n[: -len(".weight")])
    ct_config = None
    config_json = src_dir / "config.json" if shards.is_dir else None
    if format == "compressed-tensors" and plans:
        ct_config = ct.config_dict({p.lname: p.spec for p in plans.values()}, ignore)
    job = _Job(
        src_p, dst_p, src_dir, shards, files, out_names, cfg, plans, format, ct_config,
        config_json, progress, t0, executor,
    )  # fmt: skip
    if not shards.is_dir and dst_p.suffix == ".safetensors":  # one file: atomic_write
        dst_dir.mkdir(parents=True, exist_ok=True)
        return _write_outputs(job, dst_dir, dst_dir)
    _check_replaceable(dst_dir, src_dir, overwrite)
    with atomic_dir(dst_dir) as out_dir:
        return _write_outputs(job, out_dir, dst_dir)


def _check_replaceable(dst: Path, src_dir: Path, overwrite: bool) -> None:
    """Refuse to replace a directory holding the source, or (without ``overwrite``) one
    that is neither empty nor a previous qlinear output."""
    if not dst.exists():
        return
    if src_dir.resolve().is_relative_to(dst.resolve()):
        raise InvalidParamsError(
            f"destination {dst} contains the source {src_dir}; it is replaced whole, "
            "so choose another destination"
        )
    if overwrite or not dst.is_dir():
        return
    entries = [p for p in dst.iterdir() if not p.name.startswith(".")]
    shards = [p for p in entries if p.suffix == ".safetensors"]
    ours = bool(shards) and all(_is_qlinear_output(p) for p in shards)
    if entries and not ours:
        raise InvalidParamsError(
            f"destination {dst} exists and is not a qlinear output; it would be replaced "
            "whole: pass overwrite=True (--overwrite) or choose another destination"
        )


_OUTPUT_MARKERS = (qf.METADATA_KEY, ct.CONFIG_KEY, ct.CODE_RANGE_KEY)


def _is_qlinear_output(path: Path) -> bool:
    """True for a shard qlinear wrote: its metadata carries one of qlinear's keys."""
    try:
        sf = SafetensorsFile(path, mmap=False) if path.stat().st_size < 1 << 20 else None
        if sf is None:
            sf = SafetensorsFile(path)
            sf.close()
    except (OSError, FormatError):
        return False
    return any(k in sf.metadata for k in _OUTPUT_MARKERS)


@dataclasses.dataclass(frozen=True)
class _Job:
    """Everything :func:`_write_outputs` needs, planned from the headers."""

    src_p: Path
    dst_p: Path
    src_dir: Path
    shards: Shards
    files: dict[str, SafetensorsFile]
    out_names: dict[str, str]
    cfg: QuantConfig
    plans: dict[str, Any]
    format: str
    ct_config: dict | None
    config_json: Path | None
    progress: bool
    t0: float
    executor: Any = None


def _write_outputs(job: _Job, out_dir: Path, dst_dir: Path) -> CheckpointReport:
    """Write every output into ``out_dir`` (``dst_dir`` itself or its staging
    directory); paths in the report name ``dst_dir``."""
    src_p, dst_p, src_dir, shards, files = job.src_p, job.dst_p, job.src_dir, job.shards, job.files
    out_names, cfg, plans, format, ct_config = (
        job.out_names, job.cfg, job.plans, job.format, job.ct_config,
    )  # fmt: skip
    config_json, progress, t0, index = job.config_json, job.progress, job.t0, shards.index
    executor = job.executor
    total = sum(i.nbytes for sf in files.values() for i in sf.tensors.values())
    bar = _progress_bar(total, progress)
    if executor is not None:  # start every quantize task now; collected in file order below
        executor.submit(
            [(src_dir / s, n, plans[n], info) for s in shards.names
             for n, info in files[s].tensors.items() if n in plans],
            out_dir,
        )  # fmt: skip
    reports: list[TensorReport] = []
    weight_map: dict[str, str] = {}
    total_size = 0
    reserved = (qf.METADATA_KEY, ct.CONFIG_KEY, ct.CODE_RANGE_KEY)
    try:
        for s in shards.names:
            sf = files[s]
            names = sorted(sf.tensors, key=lambda n: sf.tensors[n].begin)
            entries: list[tuple] = []
            layer_cfgs = {}
            for n in names:
                info = sf.tensors[n]
                if n in plans:
                    entries += plans[n].entries
                    layer_cfgs[plans[n].lname] = qf.layer_config(plans[n].spec)
                else:
                    entries.append((n, info.dtype, info.shape))
            meta = {k: v for k, v in sf.metadata.items() if k not in reserved}
            if format == "qlinear":
                meta[qf.METADATA_KEY] = qf.format_config(layer_cfgs)
            elif ct_config is not None:
                meta[ct.CODE_RANGE_KEY] = "narrow"
                if config_json is None or not config_json.is_file():
                    meta[ct.CONFIG_KEY] = json.dumps(ct_config, separators=(",", ":"))
            writer = SafetensorsWriter(entries, meta)
            with atomic_write(out_dir / out_names[s]) as f:
                writer.begin(f)
                for n in names:
                    info = sf.tensors[n]
                    if n in plans:
                        plan = plans[n]
                        if executor is None:
                            err2, sig2 = _quantize_tensor(sf, n, plan, writer, f, bar)
                        else:
                            err2, sig2 = executor.collect(n, plan, writer, f, bar)
                        after = sum(math.prod(sh) * DTYPE_SIZES[dt] for _, dt, sh in plan.entries)
                        (se, qe), (sw, qw) = err2, sig2
                        rel = (se / sw) * math.sqrt(qe / qw) if sw > 0 else se * math.sqrt(qe)
                        snr = -20 * math.log10(rel) if rel > 0 and sw > 0 else None
                        reports.append(
                            TensorReport(
                                n,
                                info.shape,
                                info.dtype,
                                plan.spec.describe(),
                                rel,
                                snr,
                                info.nbytes,
                                after,
                                plan.note,
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
    written = [str(dst_dir / out_names[s]) for s in shards.names]
    if index is not None:
        new_index = {k: v for k, v in index.items() if k not in ("metadata", "weight_map")}
        old_meta = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
        new_index["metadata"] = {**old_meta, "total_size": total_size}
        new_index["weight_map"] = dict(sorted(weight_map.items()))
        with atomic_write(out_dir / "model.safetensors.index.json") as f:
            f.write(json.dumps(new_index, indent=2).encode("utf-8"))
        written.append(str(dst_dir / "model.safetensors.index.json"))
    if shards.is_dir:
        written += [str(dst_dir / r) for r in _copy_side_files(src_dir, out_dir, dst_dir)]
    if config_json is not None and config_json.is_file():
        _write_model_config(config_json, out_dir / "config.json", ct_config)
    return CheckpointReport(
        str(src_p),
        str(dst_p),
        cfg.to_dict(),
        tuple(reports),
        tuple(written),
        time.perf_counter() - t0,
        format,
        tasks=() if executor is None else executor.records(),
    )


def _write_model_config(src: Path, dst: Path, quantization_config: dict | None) -> None:
    """config.json of the output: the source's, with ``quantization_config`` set to the
    compressed-tensors config (or removed for a qlinear-format output)."""
    data = read_json(src)
    if not isinstance(data, dict):
        raise FormatError(f"{src}: expected a JSON object")
    data.pop("quantization_config", None)
    if quantization_config is not None:
        data["quantization_config"] = quantization_config
    with atomic_write(dst) as f:
        f.write((json.dumps(data, indent=2) + "\n").encode("utf-8"))
