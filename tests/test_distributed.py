"""qlinear.distributed: the executor seam of quantize_checkpoint, run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as stnp

from qlinear import FormatError, InvalidParamsError, quantize_checkpoint
from qlinear.distributed import InlineExecutor, merge_squares


def make_checkpoint(src: Path, rng: np.random.Generator, n_layers: int = 2) -> Path:
    """A sharded llama-like checkpoint: one shard per layer plus embeddings / head,
    float32 and float16 weights, a bias, norms, an index and side files."""
    src.mkdir(parents=True)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    shards = {"model-00000.safetensors": {"model.embed_tokens.weight": r(64, 32)}}
    for i in range(n_layers):
        p = f"model.layers.{i}"
        shards[f"model-{i + 1:05d}.safetensors"] = {
            f"{p}.input_layernorm.weight": r(32),
            f"{p}.self_attn.q_proj.weight": r(32, 32),
            f"{p}.self_attn.q_proj.bias": r(32),
            f"{p}.self_attn.o_proj.weight": (r(32, 32) * 1e-3).astype(np.float16),
            f"{p}.mlp.gate_proj.weight": r(72, 32),
            f"{p}.mlp.down_proj.weight": r(32, 72),
        }
    shards["model-99999.safetensors"] = {"lm_head.weight": r(64, 32)}
    weight_map = {}
    for fname, tensors in shards.items():
        stnp.save_file(tensors, str(src / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    (src / "config.json").write_text('{"model_type": "llama"}')
    return src


def tree_bytes(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (hidden ones included) by relative path."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


CONFIGS = [
    {"qtype": "int8", "granularity": "per_channel"},
    {"qtype": "int8", "granularity": "per_tensor", "method": "mse"},
    {"qtype": "int4", "granularity": "per_group", "group_size": 16, "scheme": "asymmetric"},
    {"qtype": "int8", "granularity": "per_channel", "method": "percentile"},
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
@pytest.mark.parametrize("task_bytes", [1 << 30, 8 * 32 * 5])
def test_inline_executor_is_byte_identical_to_serial(tmp_path, rng, cfg, task_bytes):
    src = make_checkpoint(tmp_path / "src", rng)
    serial = quantize_checkpoint(src, tmp_path / "serial", cfg, progress=False)
    ex = InlineExecutor(task_bytes=task_bytes)  # 8*32*5: row blocks of 5 rows (or 2)
    par = quantize_checkpoint(src, tmp_path / "par", cfg, progress=False, executor=ex)
    assert tree_bytes(tmp_path / "par") == tree_bytes(tmp_path / "serial")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["par", "serial", "src"]  # no parts
    n_quant = serial.n_quantized
    tasks = par.to_dict()["tasks"]
    assert {t["tensor"] for t in tasks} == {t.name for t in serial.tensors if t.quantized}
    if task_bytes > 1 << 20 or cfg["granularity"] == "per_tensor":
        assert len(tasks) == n_quant
        # one task per tensor: the report's errors are the serial ones exactly
        assert [t.rel_error for t in par.tensors] == [t.rel_error for t in serial.tensors]
    else:
        assert len(tasks) > n_quant
        for a, b in zip(par.tensors, serial.tensors, strict=True):
            assert (a.rel_error is None) == (b.rel_error is None)
            if a.rel_error is not None:
                assert a.rel_error == pytest.approx(b.rel_error, rel=1e-12)
    for t in tasks:
        assert t["seconds"] >= 0 and t["node"] == "local" and t["pid"] > 0
        assert 0 <= t["rows"][0] < t["rows"][1]


def test_a_bad_tensor_fails_the_run_and_leaves_no_parts(tmp_path, rng):
    src = make_checkpoint(tmp_path / "src", rng)
    shard = src / "model-00002.safetensors"
    t = stnp.load_file(str(shard))
    t["model.layers.1.mlp.down_proj.weight"][3, 5] = np.nan
    stnp.save_file(t, str(shard))
    cfg = {"qtype": "int8", "granularity": "per_channel"}
    with pytest.raises(FormatError, match=r"down_proj.*NaN"):
        quantize_checkpoint(src, tmp_path / "dst", cfg, progress=False, executor=InlineExecutor())
    left = [p.name for p in tmp_path.rglob("*") if "qlinear-parts" in p.name or p.suffix == ".tmp"]
    assert left == []
    assert not (tmp_path / "dst" / "model-00002.safetensors").exists()


def test_merge_squares_sums_scaled_squares(rng):
    a, b = rng.standard_normal(50) * 1e150, rng.standard_normal(70) * 1e-150

    def sq(x):
        s = float(np.max(np.abs(x)))
        return s, float(np.sum((x / s) ** 2))

    s, q = merge_squares(sq(a), sq(b))
    want = np.sum((a / 1e150) ** 2) + np.sum((b / 1e150) ** 2)
    assert s**2 * q / 1e300 == pytest.approx(want, rel=1e-12)
    assert merge_squares((0.0, 0.0), (2.0, 3.0)) == (2.0, 3.0)


def test_task_bytes_must_be_positive():
    with pytest.raises(InvalidParamsError, match="task_bytes"):
        InlineExecutor(task_bytes=0)


def test_hessian_partials_merge_to_the_whole(rng):
    from qlinear.errors import ShapeMismatchError
    from qlinear.gptq import HessianAccumulator

    x = rng.standard_normal((300, 12)).astype(np.float32)
    whole, a, b = HessianAccumulator(12), HessianAccumulator(12), HessianAccumulator(12)
    whole.add(x)
    a.add(x[:110])
    b.add(x[110:])
    a.merge(b)
    assert a.rows == 300
    np.testing.assert_allclose(a.value(), whole.value(), rtol=1e-6, atol=1e-6)  # float32 products
    np.testing.assert_allclose(
        a.value(), 2 / 300 * x.T.astype(np.float64) @ x, rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ShapeMismatchError, match="12"):
        a.merge(HessianAccumulator(5))


def test_cli_ray_without_ray_installed_is_a_clear_error(tmp_path, rng, monkeypatch, capsys):
    import sys

    from qlinear.cli import main

    src = make_checkpoint(tmp_path / "src", rng, n_layers=1)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    assert main(["quantize", str(src), "-o", str(tmp_path / "dst"), "--ray"]) == 1
    err = capsys.readouterr().err
    assert "ray is not installed" in err and "qlinear[ray]" in err
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("gptq", [[], ["--gptq"]])
def test_cli_ray_refuses_gguf_output(tmp_path, rng, capsys, gptq):
    from qlinear.cli import main

    src = make_checkpoint(tmp_path / "src", rng, n_layers=1)
    dst = tmp_path / "out.gguf"
    argv = ["quantize", str(src), "-o", str(dst), "--format", "gguf", "--ray", *gptq]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "--ray cannot write --format gguf" in err
    assert not dst.exists()
