"""GPTQ over a whole decoder checkpoint, layer after layer, in bounded memory.

:func:`gptq_quantize_checkpoint` reads a float Hugging Face checkpoint (``config.json`` +
``model.safetensors`` or shards, memory-mapped), calibrates every linear layer of every
decoder layer by GPTQ on the model's own activations, and writes a quantized checkpoint.

* **Calibration data**: ``samples`` windows of ``seqlen`` consecutive tokens of the
  calibration text (default: the calibration part of :mod:`qlinear.models.corpus`),
  embedded once: ``h0 = embed_tokens[ids]``, float32 ``(samples, seqlen, hidden)``.
* **Layer-sequential**: layer ``i`` is calibrated on ``h_i``, the output of layers
  ``0 .. i-1`` *already quantized*, and ``h_{i+1} = layer_i^q(h_i)``.
* **True-sequential inside a layer**: the layer's groups (``linear_groups()``: q/k/v, o,
  gate/up, down; every expert's for MoE) are calibrated in order. For group ``g`` the
  calibration batches run through the layer with the groups before ``g`` already
  quantized (the capture hook hands back their quantized layers) and stop as soon as
  every linear of ``g`` has shown its input; ``H = 2/n X^T X`` is accumulated batch by
  batch, once per distinct input (q, k and v share one), and each linear is quantized by
  :func:`qlinear.gptq_quantize` from its Hessian. For a dense layer the last group
  (down) is not run twice: its pass returns the residual stream with down's output left
  out and keeps down's input, and ``h_{i+1} = residual + down^q(x)`` afterwards.
* **MoE**: every expert is offered exactly the calibration tokens the float router sends
  it; an expert whose linears received fewer than ``min_tokens`` rows is quantized from
  its weights alone (round to nearest with ``config.method``) and named in the report.
* **Memory**: only layer ``i`` is read from the memory-mapped source (its pages released
  after it), the quantized layers are spilled to disk as they are made, so peak memory is
  one layer's float weights + two copies of the calibration hidden states + one batch of
  activations, independent of the number of layers.

Router weights, norms, embeddings and ``lm_head`` are copied as they are (float).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .._safetensors import SafetensorsFile
from ..errors import FormatError, InvalidInputError, InvalidParamsError
from ..gptq import HessianAccumulator, PreparedHessian, gptq_quantize
from ..linear import QuantizedLinear
from ..quantconfig import QuantConfig

__all__ = ["GPTQCheckpointReport", "GPTQOptions", "gptq_quantize_checkpoint"]

# Float32 bytes of activations one calibration batch may hold (sets the batch size).
_BATCH_BYTES = 96 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class GPTQOptions:
    """How :func:`gptq_quantize_checkpoint` calibrates.

    samples, seqlen: calibration windows and tokens per window. act_order, damp,
    block_size: passed to :func:`qlinear.gptq_quantize`. min_tokens: an MoE expert (any
    linear) with fewer calibration rows falls back to weight-only calibration.
    batch_size: windows per forward batch (None: chosen from the model's sizes)."""

    samples: int = 128
    seqlen: int = 512
    act_order: bool = True
    damp: float = 0.01
    block_size: int = 128
    min_tokens: int = 32
    batch_size: int | None = None

    def __post_init__(self) -> None:
        for field in ("samples", "seqlen", "block_size", "min_tokens"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise InvalidParamsError(f"{field} must be an integer >= 1; got {v!r}")
        b = self.batch_size
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1):
            raise InvalidParamsError(f"batch_size must be an integer >= 1 (or None); got {b!r}")
        if not isinstance(self.act_order, bool):
            raise InvalidParamsError(f"act_order must be True or False; got {self.act_order!r}")
        d = self.damp
        if (
            isinstance(d, bool)
            or not isinstance(d, (int, float))
            or not (np.isfinite(d) and d >= 0)
        ):
            raise InvalidParamsError(f"damp must be a finite number >= 0; got {d!r}")


@dataclasses.dataclass(frozen=True)
class GPTQCheckpointReport:
    """What :func:`gptq_quantize_checkpoint` did: the linears quantized by GPTQ, those that
    fell back to weight-only calibration (MoE experts with fewer than ``min_tokens``
    calibration rows, with their row counts), the calibration size and the wall time."""

    src: str
    dst: str
    config: dict[str, Any]
    model_type: str
    num_layers: int
    calibration_tokens: int
    gptq: tuple[str, ...]
    weight_only_fallback: tuple[tuple[str, int], ...]
    seconds: float
    layer_seconds: tuple[float, ...]

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(dataclasses.asdict(self), indent=indent)


# ------------------------------------------------------------------------- source
class _Source:
    """The tensors of a checkpoint directory, memory-mapped, one name space."""

    def __init__(self, src_dir: Path) -> None:
        from ..io import read_index

        index = src_dir / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(read_index(index)["weight_map"].values()))
        elif (src_dir / "model.safetensors").is_file():
            shards = ["model.safetensors"]
        else:
            raise FileNotFoundError(
                f"{src_dir} holds neither model.safetensors nor model.safetensors.index.json"
            )
        self.files = [SafetensorsFile(src_dir / s) for s in shards]
        self.where = {n: f for f in self.files for n in f.tensors}

    def get(self, name: str) -> np.ndarray:
        return self.where[name].array(name)  # KeyError when absent: the getter protocol

    def release(self) -> None:
        for f in self.files:
            f.release_pages()


def _read_config(src_dir: Path) -> dict[str, Any]:
    path = src_dir / "config.json"
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no config.json in {src_dir}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"cannot read {path}: {exc}") from None
    if not isinstance(d, dict):
        raise FormatError(f"{path}: expected a JSON object; got {type(d).__name__}")
    return d


def calibration_ids(src_dir: Path, text: str | None, samples: int, seqlen: int) -> np.ndarray:
    """int64 ``(samples, seqlen)``: the first ``samples * seqlen`` tokens of ``text``
    (default: the calibration corpus) under the checkpoint's ``tokenizer.json``."""
    from .corpus import corpus_text

    from .tokenizer import Tokenizer

    tok_path = src_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise FormatError(f"{src_dir} has no tokenizer.json; GPTQ calibration needs it")
    if text is None:
        text = corpus_text("calib")
    if not text.strip():
        raise InvalidInputError("the calibration text is empty; expected some text")
    ids = Tokenizer(tok_path).encode(text)
    need = samples * seqlen
    if len(ids) < need:
        raise InvalidInputError(
            f"the calibration text has {len(ids)} tokens; {samples} samples x {seqlen} tokens "
            f"need {need} (give a longer --calib text or fewer --calib-samples / --calib-seqlen)"
        )
    return np.asarray(ids[:need], dtype=np.int64).reshape(samples, seqlen)


# ------------------------------------------------------------------------- one layer
class _Stop(Exception):
    """Raised by the capture hook once every linear of the group has shown its input."""


class _Zeros:
    """A linear that returns zeros (down's output left out of the residual stream)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: np.ndarray) -> np.ndarray:
        return np.zeros((x.shape[0], self.out_features), dtype=np.float32)


def _dims(lin: Any) -> tuple[int, int]:
    return int(lin.out_features), int(lin.in_features)


def _batches(n: int, size: int):
    for a in range(0, n, size):
        yield a, min(n, a + size)


def _quantize_group(
    lins: Mapping[str, Any],
    group: list[str],
    accs: dict[str, HessianAccumulator],
    alias: dict[str, str],
    cfg: QuantConfig,
    opts: GPTQOptions,
    fallback: list[tuple[str, int]],
    gptq_names: list[str],
) -> dict[str, QuantizedLinear]:
    out = {}
    hessians: dict[str, PreparedHessian] = {}
    for name in group:
        root = alias.get(name, name)
        lin = lins[name]
        w = np.asarray(lin.weight)
        bias = getattr(lin, "bias", None)
        acc = accs.get(root)
        rows = 0 if acc is None else acc.rows
        if rows < opts.min_tokens:
            out[name] = QuantizedLinear.from_fp(w, cfg.calibrate(w), bias=bias)
            fallback.append((name, int(rows)))
            continue
        if root not in hessians:
            hessians[root] = PreparedHessian(
                acc.value(),
                damp=opts.damp,
                act_order=opts.act_order,  # type: ignore[union-attr]
            )
        out[name] = gptq_quantize(
            w,
            None,
            cfg.qtype,
            cfg.granularity,
            cfg.scheme,
            group_size=cfg.group_size,
            damp=opts.damp,
            act_order=opts.act_order,
            block_size=opts.block_size,
            method=cfg.method,
            bias=bias,
            hessian=hessians[root],
        )
        gptq_names.append(name)
    return out


def group_hessians(
    layer: Any,
    h: np.ndarray,
    done: Mapping[str, Any],
    group: list[str],
    *,
    batch_size: int,
    down: tuple[list[np.ndarray], np.ndarray] | None = None,
) -> tuple[dict[str, HessianAccumulator], dict[str, str]]:
    """The Hessians of ``group``'s linears on hidden states ``h (samples, seqlen, hidden)``
    run through ``layer`` with the linears in ``done`` replaced by their quantized ones:
    ``(root name -> HessianAccumulator, name -> root)`` (linears fed the same input, q/k/v,
    share the root's). ``down=(inputs, h_next)`` (dense layers' last group): the whole
    batch runs with down's output left out, down's inputs are appended to ``inputs`` and
    the residual stream is written to ``h_next``. Distributed GPTQ runs this on every
    worker's share of the samples and sums the accumulators (:meth:`~HessianAccumulator.merge`)."""
    members = set(group)
    lins = layer.linears
    accs: dict[str, HessianAccumulator] = {}
    alias: dict[str, str] = {}
    for a, b in _batches(h.shape[0], batch_size):
        seen: set[str] = set()
        last: list[Any] = [None, None]  # (name, x) of the previous call in this group

        def hook(name: str, x: np.ndarray, seen=seen, last=last):
            if name in done:
                return done[name]
            if name not in members:
                return None
            if last[1] is x:  # q, k, v: one input, one Hessian
                alias[name] = alias.get(last[0], last[0])
            else:
                acc = accs.get(name)
                if acc is None:
                    acc = accs[name] = HessianAccumulator(x.shape[1])
                if x.shape[0]:
                    acc.add(x)
            last[0], last[1] = name, x
            seen.add(name)
            if down is not None:
                down[0].append(x)
                return _Zeros(x.shape[1], _dims(lins[name])[0])
            if seen == members:
                raise _Stop
            return None

        try:
            y = layer.forward(h[a:b], capture=hook)
        except _Stop:
            continue
        if down is not None:
            down[1][a:b] = y
    return accs, alias


def calibrate_layer(
    layer: Any,
    h: np.ndarray,
    cfg: QuantConfig,
    opts: GPTQOptions,
    *,
    batch_size: int,
    dense: bool,
    fallback: list[tuple[str, int]] | None = None,
    gptq_names: list[str] | None = None,
) -> tuple[dict[str, QuantizedLinear], np.ndarray]:
    """GPTQ of one decoder layer (see the module docstring) on float32 hidden states
    ``h (samples, seqlen, hidden)``: returns ``(name -> QuantizedLinear, h_next)`` with
    ``h_next`` the quantized layer's output, float32, the shape of ``h``."""
    fallback = [] if fallback is None else fallback
    gptq_names = [] if gptq_names is None else gptq_names
    lins = layer.linears
    groups = layer.linear_groups()
    done: dict[str, QuantizedLinear] = {}
    n = h.shape[0]
    h_next = None
    down_inputs: list[np.ndarray] = []
    for gi, group in enumerate(groups):
        merge = dense and gi == len(groups) - 1 and len(group) == 1
        if merge:
            h_next = np.empty_like(h)
        accs, alias = group_hessians(
            layer,
            h,
            done,
            group,
            batch_size=batch_size,
            down=(down_inputs, h_next) if merge else None,
        )
        done.update(_quantize_group(lins, group, accs, alias, cfg, opts, fallback, gptq_names))
    if h_next is not None:
        (down,) = groups[-1]
        q = done[down]
        rows = 0
        for a, b in _batches(n, batch_size):
            x = down_inputs[rows]
            rows += 1
            h_next[a:b] += np.asarray(q.forward(x), dtype=np.float32).reshape(h_next[a:b].shape)
    else:
        qlayer = layer.with_linears(done)
        h_next = np.empty_like(h)
        for a, b in _batches(n, batch_size):
            h_next[a:b] = qlayer.forward(h[a:b])
    return done, h_next


def _batch_size(dcfg: Any, seqlen: int) -> int:
    per_sample = (
        4
        * seqlen
        * max(
            3 * dcfg.num_attention_heads * seqlen,  # scores, exp, mask
            4
            * max(dcfg.intermediate_size or 0, (dcfg.moe_intermediate_size or 0) * dcfg.top_k or 0),
            4 * dcfg.hidden_size,
        )
    )
    return max(1, _BATCH_BYTES // max(per_sample, 1))


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="layer", desc="gptq", leave=False)


# ------------------------------------------------------------------------- driver
def gptq_quantize_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    config: QuantConfig | Mapping[str, Any],
    *,
    calib_text: str | None = None,
    options: GPTQOptions | None = None,
    progress: bool = True,
    on_layer: Callable[[int, float], None] | None = None,
    executor: Any = None,
) -> GPTQCheckpointReport:
    """Quantize every decoder linear of the checkpoint ``src`` by layer-sequential GPTQ
    and write the result to the directory ``dst`` (see the module docstring).

    Args:
        src: a Hugging Face checkpoint directory (``config.json``, ``tokenizer.json``,
            ``model.safetensors`` or an index with shards) of a decoder model_type
            :mod:`qlinear.models` runs.
        dst: the output directory; must not exist yet (or be empty). Written atomically:
            built under a temporary name beside it, then renamed.
        config: the format (:class:`QuantConfig` or a dict of its fields); ``method``
            chooses each group's clipping range inside GPTQ (``"mse"``: the MSE grid).
        calib_text: calibration text (default: :func:`qlinear.models.corpus.corpus_text`
            ``("calib")``).
        options: :class:`GPTQOptions` (calibration size, act order, ...).
        progress: a tqdm bar over layers (with the remaining time) when tqdm is installed.
        on_layer: called as ``on_layer(index, seconds)`` after each layer.
        executor: None (calibrate here), or an executor with ``gptq_start`` /
            ``gptq_layer`` / ``gptq_finish`` (``qlinear.distributed.ray_executor.
            RayExecutor``: samples split over workers, Hessians summed, solves in
            parallel; same quality, not the same bytes: sums in another order).

    Raises:
        FormatError: an unsupported model_type (the supported ones listed), a missing or
            misshaped tensor, a malformed file.
        InvalidInputError: calibration text with fewer tokens than asked (the count said).
        InvalidParamsError: a bad config or option, or ``dst`` exists and is not empty.
    """
    from .decoder_config import DecoderConfig
    from .decoder_layer import DecoderLayer

    t0 = time.perf_counter()
    cfg = QuantConfig.coerce(config)
    opts = options if options is not None else GPTQOptions()
    src_dir, dst_dir = Path(src), Path(dst)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"no such checkpoint directory: {src_dir}")
    if dst_dir.exists() and (not dst_dir.is_dir() or any(dst_dir.iterdir())):
        raise InvalidParamsError(f"destination {dst_dir} exists and is not an empty directory")
    raw_cfg = _read_config(src_dir)
    dcfg = DecoderConfig.from_dict(raw_cfg, source=str(src_dir / "config.json"))
    if opts.seqlen > dcfg.max_position_embeddings:
        raise InvalidInputError(
            f"calibration seqlen {opts.seqlen} is longer than the model's "
            f"max_position_embeddings {dcfg.max_position_embeddings}"
        )
    source = _Source(src_dir)
    ids = calibration_ids(src_dir, calib_text, opts.samples, opts.seqlen)
    embed = source.get("model.embed_tokens.weight")
    if ids.max() >= embed.shape[0]:
        raise FormatError(
            f"the tokenizer produced id {int(ids.max())}; the embedding has {embed.shape[0]} rows"
        )
    h = np.asarray(embed[ids], dtype=np.float32) if executor is None else None  # (S, T, hidden)
    del embed
    source.release()
    batch = opts.batch_size or _batch_size(dcfg, opts.seqlen)

    tmp = dst_dir.parent / f".{dst_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    spill = tmp / ".gptq-layers"
    spill.mkdir(parents=True)
    fallback: list[tuple[str, int]] = []
    gptq_names: list[str] = []
    layer_seconds: list[float] = []
    bar = _progress(dcfg.num_hidden_layers, progress)
    try:
        from ..io import load, save

        for i in range(dcfg.num_hidden_layers):
            t1 = time.perf_counter()
            if executor is not None:
                if i == 0:
                    executor.gptq_start(src_dir, raw_cfg, ids, cfg, opts, batch)
                qlayers = executor.gptq_layer(i, fallback, gptq_names)
            else:
                layer = DecoderLayer.from_tensors(dcfg, i, source.get)
                dense = not dcfg.moe_layers[i]
                qlayers, h = calibrate_layer(
                    layer,
                    h,
                    cfg,
                    opts,
                    batch_size=batch,
                    dense=dense,
                    fallback=fallback,
                    gptq_names=gptq_names,
                )
                del layer
            save(spill / f"layer{i:05d}.safetensors", qlayers)
            del qlayers
            source.release()
            layer_seconds.append(time.perf_counter() - t1)
            if bar is not None:
                bar.update(1)
            if on_layer is not None:
                on_layer(i, layer_seconds[-1])
        del h
        layers: dict[str, Any] = {}
        for p in sorted(spill.iterdir()):
            layers.update(load(p))
        _write_quantized_checkpoint(tmp, src_dir, source, layers)
        del layers
        shutil.rmtree(spill)
        if dst_dir.exists():
            dst_dir.rmdir()
        os.replace(tmp, dst_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
        if executor is not None:
            executor.gptq_finish()
        for f in source.files:
            f.close()
    return GPTQCheckpointReport(
        src=str(src_dir),
        dst=str(dst_dir),
        config=cfg.to_dict(),
        model_type=dcfg.model_type,
        num_layers=dcfg.num_hidden_layers,
        calibration_tokens=int(opts.samples * opts.seqlen),
        gptq=tuple(gptq_names),
        weight_only_fallback=tuple(fallback),
        seconds=time.perf_counter() - t0,
        layer_seconds=tuple(layer_seconds),
    )


def _write_quantized_checkpoint(
    out_dir: Path, src_dir: Path, source: _Source, layers: Mapping[str, QuantizedLinear]
) -> None:
    """THE writer of GPTQ output (one function, so the on-disk format is chosen in one
    place): ``out_dir/model.safetensors`` holds every quantized layer of ``layers`` and
    every other tensor of ``source`` as it is (a layer's float ``.weight`` / ``.bias``
    replaced by its quantized tensors), written with :func:`qlinear.save`; config and
    tokenizer files are copied from ``src_dir``. ``out_dir`` is the temporary directory
    the caller renames into place."""
    from ..checkpoint import _copy_side_files
    from ..io import save

    items: dict[str, Any] = {}
    for name in source.where:
        for suffix in (".weight", ".bias"):
            if name.endswith(suffix) and name[: -len(suffix)] in layers:
                break
        else:
            items[name] = source.get(name)
    items.update(layers)
    save(out_dir / "model.safetensors", items)
    _copy_side_files(src_dir, out_dir)
