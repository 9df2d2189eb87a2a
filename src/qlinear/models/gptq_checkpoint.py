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

# quantize(name, weight, bias, hessian or None) -> a layer: see calibrate_layer
LinearQuantizer = Callable[[str, np.ndarray, Any, Any], Any]

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
    whole_groups: bool = True
    """Per-group layers get the largest power-of-two group size (>= 8, at most the asked
    one) that divides in_features (per-channel if none): compressed-tensors and vLLM hold
    no partial last group. Set from the output format by gptq_quantize_checkpoint."""

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
    tasks: tuple[dict[str, Any], ...] = ()
    """Executor runs only: per task (Hessian share, solve, propagation, worker recovery),
    its seconds and the worker (node, pid) that ran it."""

    def to_json(self, indent: int | None = 2) -> str:
        d = dataclasses.asdict(self)
        if not self.tasks:
            del d["tasks"]
        return json.dumps(d, indent=indent)


# ------------------------------------------------------------------------- source
class _Source:
    """The tensors of a checkpoint directory, memory-mapped, one name space."""

    def __init__(self, src_dir: Path) -> None:
        from ..formats._files import resolve_shards

        self.files = [SafetensorsFile(p) for p in resolve_shards(src_dir).paths]
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


def calibration_ids(src_dir: Any, text: str | None, samples: int, seqlen: int) -> np.ndarray:
    """int64 ``(samples, seqlen)``: the first ``samples * seqlen`` tokens of ``text``
    (default: the calibration corpus) under the checkpoint's ``tokenizer.json``
    (``src_dir`` a directory) or a :class:`qlinear.models.tokenizer.Tokenizer`."""
    from .corpus import corpus_text
    from .tokenizer import Tokenizer

    if isinstance(src_dir, Tokenizer):
        tok = src_dir
    else:
        tok_path = Path(src_dir) / "tokenizer.json"
        if not tok_path.is_file():
            raise FormatError(f"{src_dir} has no tokenizer.json; GPTQ calibration needs it")
        tok = Tokenizer(tok_path)
    if text is None:
        text = corpus_text("calib")
    if not text.strip():
        raise InvalidInputError("the calibration text is empty; expected some text")
    ids = tok.encode(text)
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


def _layer_config(cfg: QuantConfig, in_features: int, whole_groups: bool) -> QuantConfig:
    """``cfg`` for one layer: with ``whole_groups``, a group size that divides
    ``in_features`` (compressed-tensors' rule: ``fitting_group_size``)."""
    if not whole_groups or cfg.group_size is None or in_features % cfg.group_size == 0:
        return cfg
    from ..formats.compressed_tensors import fitting_group_size

    gs = fitting_group_size(in_features, cfg.group_size)
    if gs is None:
        return dataclasses.replace(cfg, granularity="per_channel", group_size=None)
    return dataclasses.replace(cfg, group_size=gs)


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
    quantize: LinearQuantizer | None = None,
) -> dict[str, Any]:
    out = {}
    hessians: dict[str, PreparedHessian] = {}
    for name in group:
        root = alias.get(name, name)
        lin = lins[name]
        w = np.asarray(lin.weight)
        bias = getattr(lin, "bias", None)
        acc = accs.get(root)
        lcfg = _layer_config(cfg, w.shape[1], opts.whole_groups)
        rows = 0 if acc is None else acc.rows
        # routed experts may see few tokens; every other linear sees all of them
        if rows == 0 or (".experts." in name and rows < opts.min_tokens):
            if quantize is not None:
                out[name] = quantize(name, w, bias, None)
            else:
                out[name] = QuantizedLinear.from_fp(w, lcfg.calibrate(w), bias=bias)
            fallback.append((name, int(rows)))
            continue
        if root not in hessians:
            hessians[root] = PreparedHessian(
                acc.value(),
                damp=opts.damp,
                act_order=opts.act_order,  # type: ignore[union-attr]
            )
        gptq_names.append(name)
        if quantize is not None:
            out[name] = quantize(name, w, bias, hessians[root])
            continue
        out[name] = gptq_quantize(
            w,
            None,
            lcfg.qtype,
            lcfg.granularity,
            lcfg.scheme,
            group_size=lcfg.group_size,
            damp=opts.damp,
            act_order=opts.act_order,
            block_size=opts.block_size,
            method=cfg.method,
            bias=bias,
            hessian=hessians[root],
        )
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
    quantize: LinearQuantizer | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """GPTQ of one decoder layer (see the module docstring) on float32 hidden states
    ``h (samples, seqlen, hidden)``: returns ``(name -> QuantizedLinear, h_next)`` with
    ``h_next`` the quantized layer's output, float32, the shape of ``h``.

    ``quantize(name, weight, bias, hessian)`` replaces the per-linear quantizer (``cfg``
    then only sets the batch plan): it gets the float weight ``(out, in)``, the bias
    (or None) and the :class:`PreparedHessian` of the linear's calibration inputs (None:
    too few rows, quantize from the weight alone) and returns a layer (anything with
    ``forward``), e.g. GPTQ on a GGUF grid (:mod:`qlinear.models.gptq_gguf`)."""
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
            down=(down_inputs, h_next) if merge else None,  # type: ignore[arg-type]
        )
        done.update(
            _quantize_group(lins, group, accs, alias, cfg, opts, fallback, gptq_names, quantize)
        )
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


def _checked_ids(arch: Any, tokenizer: Any, calib_text: str | None, opts: GPTQOptions) -> Any:
    """:func:`calibration_ids` for ``arch`` (``tokenizer``: a Tokenizer or the model
    directory), checked against its context length and vocabulary."""
    if opts.seqlen > arch.max_positions:
        raise InvalidInputError(
            f"calibration seqlen {opts.seqlen} is longer than the model's "
            f"max_position_embeddings {arch.max_positions}"
        )
    ids = calibration_ids(tokenizer, calib_text, opts.samples, opts.seqlen)
    if ids.max() >= arch.vocab_size:
        raise FormatError(
            f"the tokenizer produced id {int(ids.max())}; the embedding has {arch.vocab_size} rows"
        )
    return ids


def _batch_size(cfg: Any, seqlen: int) -> int:
    moe_f = getattr(cfg, "moe_intermediate_size", 0) * getattr(cfg, "top_k", 0)
    per_sample = (
        4
        * seqlen
        * max(
            3 * cfg.num_attention_heads * seqlen,  # scores, exp, mask
            4 * max(cfg.intermediate_size or 0, moe_f),
            4 * cfg.hidden_size,
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
    format: str = "compressed-tensors",
    overwrite: bool = False,
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
        format: ``"compressed-tensors"`` (default: what transformers and vLLM load; scales
            in the model's dtype, a group size that divides every layer's in_features) or
            ``"qlinear"`` (float64 scales, partial groups kept).
        overwrite: replace an existing ``dst`` that is not a previous qlinear output
            (as :func:`qlinear.quantize_checkpoint`).

    Raises:
        FormatError: an unsupported model_type (the supported ones listed), a missing or
            misshaped tensor, a malformed file.
        InvalidInputError: calibration text with fewer tokens than asked (the count said).
        InvalidParamsError: a bad config or option, or ``dst`` exists and is not empty.
    """
    t0 = time.perf_counter()
    cfg = QuantConfig.coerce(config)
    opts = options if options is not None else GPTQOptions()
    src_dir, dst_dir = Path(src), Path(dst)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"no such checkpoint directory: {src_dir}")
    if format not in ("compressed-tensors", "qlinear"):
        raise InvalidParamsError(
            f"GPTQ writes format 'compressed-tensors' or 'qlinear'; got {format!r}"
        )
    opts = dataclasses.replace(opts, whole_groups=format == "compressed-tensors")
    from ..checkpoint import _check_replaceable

    _check_replaceable(dst_dir, src_dir, overwrite)
    raw_cfg = _read_config(src_dir)
    source = _Source(src_dir)
    if raw_cfg.get("model_type") == "bert":
        arch = _bert_arch(raw_cfg, src_dir, source)
    else:
        arch = _decoder_arch(raw_cfg, src_dir, source)
    ids = _checked_ids(arch, src_dir, calib_text, opts)
    if executor is not None and raw_cfg.get("model_type") == "bert":
        raise InvalidParamsError("the GPTQ executor (--ray) runs decoder models only; got bert")
    h = arch.embed(ids) if executor is None else None  # float32 (samples, seqlen, hidden)
    source.release()
    batch = opts.batch_size or _batch_size(arch.config, opts.seqlen)

    from .._atomic import atomic_dir

    staging = atomic_dir(dst_dir)
    tmp = staging.__enter__()  # built whole, then swapped in (qlinear._atomic)
    spill = tmp / ".gptq-layers"
    spill.mkdir(parents=True)
    fallback: list[tuple[str, int]] = []
    gptq_names: list[str] = []
    layer_seconds: list[float] = []
    bar = _progress(arch.num_layers, progress)
    try:
        from ..io import load, save

        for i in range(arch.num_layers):
            t1 = time.perf_counter()
            if executor is not None:
                if i == 0:
                    executor.gptq_start(src_dir, raw_cfg, ids, cfg, opts, batch)
                qlayers = executor.gptq_layer(i, fallback, gptq_names)
            else:
                qlayers, h = calibrate_layer(
                    arch.layer(i),
                    h,
                    cfg,
                    opts,
                    batch_size=batch,
                    dense=arch.dense(i),
                    fallback=fallback,
                    gptq_names=gptq_names,
                )
            save(  # internal spill: qlinear's own format keeps float64 scales as they are
                spill / f"layer{i:05d}.safetensors",
                {arch.prefix + k: v for k, v in qlayers.items()},
                format="qlinear",
            )
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
        _write_quantized_checkpoint(tmp, src_dir, source, layers, format)
        del layers
        shutil.rmtree(spill)
    except BaseException as exc:
        staging.__exit__(type(exc), exc, exc.__traceback__)
        raise
    else:
        staging.__exit__(None, None, None)
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
        model_type=arch.model_type,
        num_layers=arch.num_layers,
        calibration_tokens=int(opts.samples * opts.seqlen),
        gptq=tuple(gptq_names),
        weight_only_fallback=tuple(fallback),
        seconds=time.perf_counter() - t0,
        layer_seconds=tuple(layer_seconds),
        tasks=() if executor is None else tuple(executor.records()),
    )


@dataclasses.dataclass(frozen=True)
class _Arch:
    """What the driver needs of a model family: its layers built from the source one at
    a time, the embedding of calibration ids, and whether layer i is dense (its last
    linear adds straight into the residual stream: the down shortcut applies)."""

    model_type: str
    config: Any
    num_layers: int
    max_positions: int
    vocab_size: int
    prefix: str
    layer: Callable[[int], Any]
    embed: Callable[[np.ndarray], np.ndarray]
    dense: Callable[[int], bool]


def _decoder_arch(raw: dict, src_dir: Path, source: _Source) -> _Arch:
    from .decoder_config import DecoderConfig
    from .decoder_layer import DecoderLayer

    c = DecoderConfig.from_dict(raw, source=str(src_dir / "config.json"))
    name = "model.embed_tokens.weight"
    if name not in source.where:
        raise FormatError(f"tensor {name!r} is missing from {src_dir}")

    def embed(ids: np.ndarray) -> np.ndarray:
        return np.asarray(source.get(name)[ids], dtype=np.float32)

    return _Arch(
        c.model_type,
        c,
        c.num_hidden_layers,
        c.max_position_embeddings,
        c.vocab_size,
        "",
        lambda i: DecoderLayer.from_tensors(c, i, source.get),
        embed,
        lambda i: not c.moe_layers[i],
    )


def _bert_arch(raw: dict, src_dir: Path, source: _Source) -> _Arch:
    from .bert_layers import BertLayer, bert_embed
    from .config import BertConfig

    c = BertConfig.from_dict(raw, source=str(src_dir / "config.json"))
    # checkpoints saved from BertForX carry a "bert." prefix on every name
    prefix = "" if "embeddings.word_embeddings.weight" in source.where else "bert."

    def get(n: str) -> np.ndarray:
        if prefix + n not in source.where:
            raise FormatError(f"tensor {prefix + n!r} is missing from {src_dir}")
        return source.get(prefix + n)

    return _Arch(
        "bert",
        c,
        c.num_hidden_layers,
        c.max_position_embeddings,
        c.vocab_size,
        prefix,
        lambda i: BertLayer.from_tensors(c, i, get),
        lambda ids: bert_embed(c, get, ids),
        lambda i: False,  # post-norm: LayerNorm(o + h) is not linear in o
    )


def _write_quantized_checkpoint(
    out_dir: Path,
    src_dir: Path,
    source: _Source,
    layers: Mapping[str, QuantizedLinear],
    format: str = "compressed-tensors",
) -> None:
    """THE writer of GPTQ output (one function, so the on-disk format is chosen in one
    place): ``out_dir/model.safetensors`` holds every quantized layer of ``layers`` and
    every other tensor of ``source`` as it is (a layer's float ``.weight`` / ``.bias``
    replaced by its quantized tensors); config and tokenizer files are copied from
    ``src_dir``. compressed-tensors: each layer's scales are rounded to the model's dtype
    (the codes GPTQ chose are kept, so the file and qlinear's ``dequantize()`` agree
    exactly) and config.json gets the ``quantization_config``. ``out_dir`` is the staging
    directory the caller swaps into place."""
    from ..checkpoint import _copy_side_files, _rounded, _write_model_config
    from ..formats import compressed_tensors as ct
    from ..formats._spec import LayerSpec
    from ..io import save

    items: dict[str, Any] = {}
    for name in source.where:
        for suffix in (".weight", ".bias"):
            if name.endswith(suffix) and name[: -len(suffix)] in layers:
                break
        else:
            items[name] = source.get(name)
    scale_dtype = None
    if format == "compressed-tensors":
        dtypes = {
            source.where[n + ".weight"].info(n + ".weight").dtype
            for n in layers
            if n + ".weight" in source.where
        }
        scale_dtype = (
            next(iter(dtypes)) if len(dtypes) == 1 and dtypes <= {"F32", "BF16", "F16"} else "F32"
        )
        layers = {
            n: QuantizedLinear.from_codes(
                lay.qweight, _rounded(lay.params, scale_dtype), bias=lay.bias
            )
            for n, lay in layers.items()
        }
    items.update(layers)
    save(out_dir / "model.safetensors", items, format=format, scale_dtype=scale_dtype)
    _copy_side_files(src_dir, out_dir, out_dir)
    config_json = src_dir / "config.json"
    if config_json.is_file():
        ct_config = None
        if format == "compressed-tensors":
            ignore = [
                n[: -len(".weight")]
                for n, a in items.items()
                if isinstance(a, np.ndarray) and n.endswith(".weight") and a.ndim == 2
            ]
            ct_config = ct.config_dict({n: LayerSpec.of(v) for n, v in layers.items()}, ignore)
        _write_model_config(config_json, out_dir / "config.json", ct_config)
