"""qlinear.checkpoint: streaming quantization of (sharded) safetensors checkpoints."""

from __future__ import annotations

import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as stnp

import qlinear
from conftest import rel_error
from qlinear import FormatError, InvalidParamsError, QuantizedLinear
from qlinear import checkpoint as ck
from qlinear._safetensors import SafetensorsWriter, atomic_write
from qlinear.cli import main

# The child runs the same qlinear as this process (installed, or a source tree).
SRC_DIR = Path(qlinear.__file__).resolve().parent.parent


def _bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even), as uint16."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _from_bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _write_shard(path: Path, tensors: dict[str, np.ndarray], bf16: dict[str, np.ndarray]):
    entries = [
        (
            n,
            {"float32": "F32", "float16": "F16", "float64": "F64", "int64": "I64"}[str(a.dtype)],
            a.shape,
        )
        for n, a in tensors.items()
    ]
    entries += [(n, "BF16", a.shape) for n, a in bf16.items()]
    w = SafetensorsWriter(entries, {"format": "pt"})
    with atomic_write(path) as f:
        w.begin(f)
        for n, a in {**tensors, **bf16}.items():
            w.write(f, n, a)
        w.finish()


@pytest.fixture
def ckpt(tmp_path, rng):
    """A 3-shard Llama/Mixtral-like checkpoint; returns (dir, float32 view of every tensor)."""
    src = tmp_path / "src"
    (src / "1_Pooling").mkdir(parents=True)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    shards = {
        "model-00001-of-00003.safetensors": (
            {
                "model.embed_tokens.weight": r(40, 16),
                "model.layers.0.input_layernorm.weight": r(16),
                "model.layers.0.self_attn.q_proj.weight": r(16, 16),
                "model.layers.0.self_attn.q_proj.bias": r(16),
                "model.position_ids": np.arange(8, dtype=np.int64),
            },
            {"model.layers.0.mlp.gate_proj.weight": r(24, 16)},
        ),
        "model-00002-of-00003.safetensors": (
            {
                "model.layers.0.mlp.down_proj.weight": r(16, 24).astype(np.float16),
                "model.layers.0.block_sparse_moe.gate.weight": r(4, 16),
                "model.layers.0.block_sparse_moe.experts.0.w1.weight": r(20, 16),
                "model.layers.0.mlp.router.weight": r(4, 16),
            },
            {},
        ),
        "model-00003-of-00003.safetensors": ({"lm_head.weight": r(40, 16)}, {}),
    }
    floats: dict[str, np.ndarray] = {}
    weight_map = {}
    for fname, (plain, bf) in shards.items():
        bits = {n: _bf16(a) for n, a in bf.items()}
        _write_shard(src / fname, plain, bits)
        floats.update(plain)
        floats.update({n: _from_bf16(b) for n, b in bits.items()})
        weight_map.update(dict.fromkeys([*plain, *bf], fname))
    index = {"metadata": {"total_size": 1}, "weight_map": weight_map}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    (src / "config.json").write_text('{"model_type": "llama"}')
    (src / "tokenizer.json").write_text("{}")
    (src / "1_Pooling" / "config.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"not copied")
    (src / ".hidden").write_text("not copied")
    return src, floats


EXPECTED_QUANTIZED = {
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.mlp.gate_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.0.block_sparse_moe.experts.0.w1",
    "lm_head",
}


def _reference(w: np.ndarray, cfg: dict, bias=None) -> QuantizedLinear:
    w = np.asarray(w, dtype=np.float64)
    p = qlinear.calibrate_linear(
        w, cfg["qtype"], cfg["granularity"], cfg["scheme"], group_size=cfg.get("group_size")
    )
    return QuantizedLinear.from_fp(w, p, bias=bias)


def _quantize_qlinear(*args, **kwargs):
    """quantize_checkpoint in qlinear's own format (float64 scales), whose codes these tests
    compare bit for bit with in-memory quantization; compressed-tensors: test_formats_ct.py."""
    return qlinear.quantize_checkpoint(*args, format="qlinear", **kwargs)


def test_cli_quantizes_a_sharded_checkpoint(ckpt, tmp_path, capsys):
    src, floats = ckpt
    dst = tmp_path / "dst"
    code = main(
        [
            "quantize",
            str(src),
            "-o",
            str(dst),
            "--bits",
            "4",
            "--group-size",
            "8",
            "--scheme",
            "asymmetric",
            "--report",
            str(tmp_path / "r.json"),
            "--no-progress",
            "--format",
            "qlinear",
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "lm_head.weight" in out.out and "quantized 5 of 11 tensors" in out.out
    assert sorted(p.name for p in dst.iterdir()) == sorted(
        [
            "1_Pooling",
            "config.json",
            "tokenizer.json",
            "model.safetensors.index.json",
            *(f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)),
        ]
    )
    assert (dst / "1_Pooling" / "config.json").is_file()
    loaded = qlinear.load(dst)
    cfg = {"qtype": "int4", "granularity": "per_group", "scheme": "asymmetric", "group_size": 8}
    assert {k for k, v in loaded.items() if isinstance(v, QuantizedLinear)} == EXPECTED_QUANTIZED
    for name in EXPECTED_QUANTIZED:
        bias = floats.get(name + ".bias")
        ref = _reference(floats[name + ".weight"], cfg, bias)
        got = loaded[name]
        np.testing.assert_array_equal(got.qweight, ref.qweight)
        np.testing.assert_array_equal(got.scales, ref.scales)
        np.testing.assert_array_equal(got.zero_points, ref.zero_points)
        x = np.ones((2, got.in_features), np.float32)
        np.testing.assert_array_equal(got.forward(x), ref.forward(x))
    claimed = {n + s for n in EXPECTED_QUANTIZED for s in (".weight", ".bias")}
    for name, a in floats.items():
        if name not in claimed:  # kept tensors come back bit for bit (BF16 widened)
            np.testing.assert_array_equal(loaded[name], a, err_msg=name)
    # the index lists every output tensor in the shard that holds it
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    for tname, shard in index["weight_map"].items():
        assert tname in stnp.load_file(str(dst / shard)), tname
    assert "lm_head.weight_packed" in index["weight_map"]
    assert "lm_head.weight" not in index["weight_map"]
    sizes = sum(qlinear.io.inspect(dst / s).nbytes for s in set(index["weight_map"].values()))
    assert index["metadata"]["total_size"] == sizes
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["totals"]["quantized"] == 5


def test_python_dash_m_runs_the_cli(ckpt, tmp_path):
    src, floats = ckpt
    env = {**os.environ, "PYTHONPATH": str(SRC_DIR)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qlinear",
            "quantize",
            str(src),
            "-o",
            str(tmp_path / "o"),
            "--exclude",
            "lm_head",
            "--no-progress",
            "--format",
            "qlinear",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    loaded = qlinear.load(tmp_path / "o")
    assert isinstance(loaded["model.layers.0.mlp.gate_proj"], QuantizedLinear)
    np.testing.assert_array_equal(loaded["lm_head.weight"], floats["lm_head.weight"])
    ref = _reference(
        floats["model.layers.0.mlp.gate_proj.weight"],
        {"qtype": "int8", "granularity": "per_channel", "scheme": "symmetric"},
    )
    np.testing.assert_array_equal(loaded["model.layers.0.mlp.gate_proj"].qweight, ref.qweight)


@pytest.mark.parametrize(
    "cfg",
    [
        {"qtype": "int8", "granularity": "per_tensor", "scheme": "symmetric"},
        {"qtype": "int8", "granularity": "per_tensor", "scheme": "asymmetric"},
        {"qtype": "int8", "granularity": "per_channel", "scheme": "asymmetric"},
        {"qtype": "int4", "granularity": "per_group", "scheme": "symmetric", "group_size": 5},
        {"qtype": "int4", "granularity": "per_channel", "scheme": "asymmetric"},
    ],
)
def test_row_blocks_give_the_same_result_as_the_whole_tensor(tmp_path, rng, monkeypatch, cfg):
    w = rng.standard_normal((37, 11)).astype(np.float32)
    w[13, 4] = 9.0  # the per-tensor range comes from one block only
    stnp.save_file(
        {"fc.weight": w, "fc.bias": np.ones(37, np.float32)}, str(tmp_path / "in.safetensors")
    )
    monkeypatch.setattr(ck, "BLOCK_BYTES", 8 * 11 * 4)  # 4 rows per block
    rep = _quantize_qlinear(
        tmp_path / "in.safetensors", tmp_path / "out.safetensors", cfg, progress=False
    )
    got = qlinear.load(tmp_path / "out.safetensors")["fc"]
    ref = _reference(w, cfg, np.ones(37))
    np.testing.assert_array_equal(got.qweight, ref.qweight)
    np.testing.assert_array_equal(got.scales, ref.scales)
    np.testing.assert_array_equal(got.zero_points, ref.zero_points)
    np.testing.assert_array_equal(got.bias, ref.bias)
    (t,) = [t for t in rep.tensors if t.name == "fc.weight"]
    expected = rel_error(ref.dequantize(), w)
    assert t.rel_error == pytest.approx(expected, rel=1e-9)
    assert t.snr_db == pytest.approx(-20 * math.log10(expected), rel=1e-9)


def test_report_contents(ckpt, tmp_path):
    src, floats = ckpt
    rep = _quantize_qlinear(src, tmp_path / "d", {"qtype": "int8"}, progress=False)
    by = {t.name: t for t in rep.tensors}
    assert len(by) == len(floats)
    q = by["model.layers.0.mlp.gate_proj.weight"]
    assert q.shape == (24, 16) and q.dtype == "BF16"
    assert q.format == "int8 per_channel symmetric"
    assert q.bytes_before == 24 * 16 * 2
    assert q.bytes_after == 24 * 16 + 24 * 8  # int8 codes + float64 scales
    ref = _reference(floats["model.layers.0.mlp.gate_proj.weight"], rep.config)
    assert q.rel_error == pytest.approx(
        rel_error(ref.dequantize(), floats["model.layers.0.mlp.gate_proj.weight"]), rel=1e-9
    )
    assert 30 < q.snr_db < 60
    kept = by["model.embed_tokens.weight"]
    assert kept.rel_error is None and kept.snr_db is None and kept.format == "kept F32"
    assert kept.bytes_before == kept.bytes_after == 40 * 16 * 4
    d = json.loads(rep.to_json())
    assert d["totals"]["bytes_before"] == sum(t.bytes_before for t in rep.tensors)
    assert d["totals"]["bytes_after"] == rep.bytes_after < rep.bytes_before
    assert d["totals"]["quantized"] == 5 and d["totals"]["kept"] == len(floats) - 5
    assert d["config"]["qtype"] == "int8"
    # bytes_after agrees with the files written
    files = [Path(f) for f in d["files"] if f.endswith(".safetensors")]
    assert sum(qlinear.io.inspect(f).nbytes for f in files) == rep.bytes_after


def test_default_selection_rules():
    s = lambda n, shape=(8, 8), dt="F32", **kw: ck.should_quantize(n, shape, dt, **kw)  # noqa: E731
    assert s("model.layers.0.mlp.gate_proj.weight")
    assert s("lm_head.weight")
    assert s("encoder.layer.0.attention.self.query.weight")
    assert not s("model.layers.0.block_sparse_moe.gate.weight")  # Mixtral router
    assert not s("model.layers.3.mlp.router.weight")
    assert not s("model.layers.3.mlp.shared_expert_gate.weight")
    assert not s("model.embed_tokens.weight")
    assert not s("embeddings.word_embeddings.weight")
    assert not s("transformer.wte.weight")
    assert not s("model.norm.weight")
    assert not s("model.layers.0.mlp.gate_proj.bias", (8,))
    assert not s("x.weight", (8,))
    assert not s("x.weight", (2, 2, 2))
    assert not s("x.weight", dt="I8")
    assert not s("x.weight", dt="F8_E4M3")
    assert not s("x.weight_scale")
    # user globs match the tensor name or the layer name
    assert not s("lm_head.weight", exclude=["lm_head"])
    assert s("model.embed_tokens.weight", include=["*embed_tokens*"])
    assert not s("model.layers.0.mlp.up_proj.weight", include=["*attn*"])
    assert s("model.layers.0.self_attn.q_proj.weight", include=["*attn*"])
    assert not s("a.q.weight", include=["*q*"], exclude=["a.q"])


def test_include_and_exclude(ckpt, tmp_path):
    src, _ = ckpt
    rep = qlinear.quantize_checkpoint(
        src,
        tmp_path / "d",
        {},
        include=["*mlp*", "*embed*"],
        exclude=["*down_proj*"],
        progress=False,
    )
    assert {t.name for t in rep.tensors if t.quantized} == {
        "model.layers.0.mlp.gate_proj.weight",
        "model.embed_tokens.weight",
    }


def test_single_file_to_file_and_to_directory(tmp_path, rng):
    w = rng.standard_normal((8, 8)).astype(np.float32)
    stnp.save_file({"a.weight": w}, str(tmp_path / "m.safetensors"))
    qlinear.quantize_checkpoint(
        tmp_path / "m.safetensors", tmp_path / "q.safetensors", {}, progress=False
    )
    assert isinstance(qlinear.load(tmp_path / "q.safetensors")["a"], QuantizedLinear)
    qlinear.quantize_checkpoint(tmp_path / "m.safetensors", tmp_path / "out", {}, progress=False)
    assert isinstance(qlinear.load(tmp_path / "out" / "m.safetensors")["a"], QuantizedLinear)
    # a directory with model.safetensors
    (tmp_path / "mdir").mkdir()
    stnp.save_file({"a.weight": w}, str(tmp_path / "mdir" / "model.safetensors"))
    qlinear.quantize_checkpoint(tmp_path / "mdir", tmp_path / "mout", {}, progress=False)
    assert isinstance(qlinear.load(tmp_path / "mout")["a"], QuantizedLinear)


def test_errors(tmp_path, rng, ckpt):
    src, _ = ckpt
    with pytest.raises(InvalidParamsError, match="overwrite the source"):
        qlinear.quantize_checkpoint(src, src, {}, progress=False)
    with pytest.raises(InvalidParamsError, match="unknown config keys"):
        qlinear.quantize_checkpoint(src, tmp_path / "x", {"bits": 4}, progress=False)
    with pytest.raises(InvalidParamsError, match="group_size"):
        qlinear.quantize_checkpoint(
            src, tmp_path / "x", {"granularity": "per_group"}, progress=False
        )
    with pytest.raises(InvalidParamsError, match="include"):
        qlinear.quantize_checkpoint(src, tmp_path / "x", {}, include="*mlp*", progress=False)
    with pytest.raises(FileNotFoundError):
        qlinear.quantize_checkpoint(tmp_path / "nothing", tmp_path / "x", {}, progress=False)
    w = rng.standard_normal((4, 4)).astype(np.float32)
    w[1, 2] = np.nan
    stnp.save_file({"bad.weight": w}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(FormatError, match=r"'bad\.weight'.*\[1, 2\]"):
        qlinear.quantize_checkpoint(
            tmp_path / "nan.safetensors", tmp_path / "nan_q", {}, progress=False
        )
    assert not (tmp_path / "nan_q" / "nan.safetensors").exists()
    os.remove(src / "model-00002-of-00003.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003"):
        qlinear.quantize_checkpoint(src, tmp_path / "y", {}, progress=False)


def test_index_entry_missing_from_its_shard(ckpt, tmp_path):
    src, _ = ckpt
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    idx["weight_map"]["ghost.weight"] = "model-00001-of-00003.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(FormatError, match=r"ghost\.weight"):
        qlinear.quantize_checkpoint(src, tmp_path / "d", {}, progress=False)


def test_calibration_methods(ckpt, tmp_path):
    src, _ = ckpt
    has_methods = "method" in inspect.signature(qlinear.calibrate_linear).parameters
    if has_methods:
        rep = qlinear.quantize_checkpoint(src, tmp_path / "d", {"method": "mse"}, progress=False)
        assert rep.config["method"] == "mse" and rep.n_quantized == 5
    else:
        with pytest.raises(InvalidParamsError, match="'mse' is not available"):
            qlinear.quantize_checkpoint(src, tmp_path / "d", {"method": "mse"}, progress=False)
    with pytest.raises(InvalidParamsError, match="method must be one of"):
        qlinear.quantize_checkpoint(src, tmp_path / "d", {"method": "magic"}, progress=False)


def test_library_prints_nothing_without_progress(ckpt, tmp_path, capsys):
    src, _ = ckpt
    qlinear.quantize_checkpoint(src, tmp_path / "d", {}, progress=False)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_include_overrides_defaults_only_when_it_names_the_excluded_kind():
    s = ck.should_quantize
    assert not s("model.layers.0.mlp.router.weight", (4, 8), "F32", include=["*mlp*"])
    assert not s("model.embed_tokens.weight", (4, 8), "F32", include=["*"])
    assert s("model.layers.0.mlp.router.weight", (4, 8), "F32", include=["*router*"])
    assert s("model.embed_tokens.weight", (4, 8), "F32", include=["*", "*embed_tokens*"])


def test_destination_inside_the_source_directory(ckpt):
    src, _ = ckpt
    for _ in range(2):  # the second run must not copy the first run's output into itself
        qlinear.quantize_checkpoint(src, src / "q", {}, progress=False)
    assert not (src / "q" / "q").exists()
    assert isinstance(qlinear.load(src / "q")["lm_head"], QuantizedLinear)


def test_progress_bar_goes_to_stderr_when_tqdm_is_installed(ckpt, tmp_path, capsys):
    pytest.importorskip("tqdm")
    src, _ = ckpt
    qlinear.quantize_checkpoint(src, tmp_path / "d", {}, progress=True)
    out = capsys.readouterr()
    assert out.out == "" and "quantize" in out.err


def test_progress_without_tqdm_is_silent(ckpt, tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name == "tqdm" or name.startswith("tqdm."):
            raise ImportError("no tqdm")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    src, _ = ckpt
    rep = qlinear.quantize_checkpoint(src, tmp_path / "d", {}, progress=True)
    out = capsys.readouterr()
    assert out.out == "" and out.err == "" and rep.n_quantized == 5


@pytest.mark.parametrize(
    "bias,match",
    [
        (np.full(6, np.nan, np.float32), "NaN or Inf"),
        (np.zeros(4, np.float32), r"shape \[6\]"),
        (np.zeros(6, np.int32), "expected a float bias"),
        (np.zeros((6, 1), np.float32), "expected a float bias"),
    ],
)
def test_bias_that_load_would_reject_is_refused_before_writing(tmp_path, rng, bias, match):
    # The output used to be written and then rejected by qlinear.load.
    w = rng.standard_normal((6, 8)).astype(np.float32)
    stnp.save_file({"fc.weight": w, "fc.bias": bias}, str(tmp_path / "in.safetensors"))
    with pytest.raises(FormatError, match=r"'fc\.bias'.*" + match):
        qlinear.quantize_checkpoint(
            tmp_path / "in.safetensors", tmp_path / "out.safetensors", {}, progress=False
        )
    assert not (tmp_path / "out.safetensors").exists()
    # excluding the layer keeps both tensors as they are, and the file loads
    qlinear.quantize_checkpoint(
        tmp_path / "in.safetensors",
        tmp_path / "out.safetensors",
        {},
        exclude=["fc"],
        progress=False,
    )
    assert set(qlinear.load(tmp_path / "out.safetensors")) == {"fc.weight", "fc.bias"}


def test_include_and_exclude_may_be_generators(ckpt, tmp_path):
    # validating a generator used it up: nothing matched and nothing was quantized
    src, _ = ckpt
    rep = qlinear.quantize_checkpoint(
        src,
        tmp_path / "g",
        {},
        include=(p for p in ["*mlp*", "*embed*"]),
        exclude=(p for p in ["*down_proj*"]),
        progress=False,
    )
    assert {t.name for t in rep.tensors if t.quantized} == {
        "model.layers.0.mlp.gate_proj.weight",
        "model.embed_tokens.weight",
    }


def test_report_errors_for_huge_and_tiny_weights(tmp_path, rng):
    # sums of squares overflowed (rel err and SNR NaN, "NaN" in the JSON report) or
    # underflowed (a lossy tensor reported as exact). Scaling by powers of two changes
    # neither the codes nor the relative error.
    w0 = rng.standard_normal((6, 40))
    tensors = {"one.weight": w0, "huge.weight": w0 * 2.0**660, "tiny.weight": w0 * 2.0**-660}
    stnp.save_file(tensors, str(tmp_path / "s.safetensors"))
    rep = qlinear.quantize_checkpoint(
        tmp_path / "s.safetensors", tmp_path / "q.safetensors", {}, progress=False
    )
    by = {t.name: t for t in rep.tensors}
    d = qlinear.load(tmp_path / "q.safetensors")["one"].dequantize() - w0
    expected = np.linalg.norm(d) / np.linalg.norm(w0)
    for name in tensors:
        assert by[name].rel_error == pytest.approx(expected, rel=1e-12), name
        assert by[name].snr_db == pytest.approx(-20 * math.log10(expected), rel=1e-12)
    json.loads(rep.to_json(), parse_constant=lambda c: pytest.fail(f"{c} in the report"))
