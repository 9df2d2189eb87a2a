"""compressed-tensors checkpoints: qlinear's output read by compressed-tensors and
transformers, checkpoints compressed-tensors writes read by qlinear, and bad input."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import safetensors.numpy as stnp

import qlinear
from qlinear import FormatError, QuantizationParams, QuantizedLinear
from qlinear.formats import compressed_tensors as ct

SCHEMES = [
    ("int4", "symmetric", "per_group", 32),
    ("int4", "asymmetric", "per_group", 32),
    ("int4", "symmetric", "per_channel", None),
    ("int4", "asymmetric", "per_channel", None),
    ("int8", "symmetric", "per_channel", None),
    ("int8", "asymmetric", "per_group", 16),
    ("int8", "symmetric", "per_tensor", None),
]


def _layer(rng, qt, sc, gran, gs, shape=(20, 64), dtype="F32"):
    w = rng.standard_normal(shape)
    p = qlinear.calibrate_linear(w, qt, gran, sc, group_size=gs)
    s = ct.round_scale(p.scale, dtype)
    p = QuantizationParams(
        p.qtype, p.scheme, p.granularity, s, p.zero_point, p.min_val, p.max_val, p.group_size
    )
    return QuantizedLinear.from_fp(w, p, backend="numpy"), w


# --------------------------------------------------------------------------- packing
def test_int4_packing_matches_the_documented_bit_order():
    # compressed-tensors: eight 4-bit values per int32, lowest bits first, stored v + 8
    v = np.array([[0, 1, 2, 3, 4, 5, 6, 7]]) - 8 + 8  # stored values 0..7
    word = ct.pack_rows(v.astype(np.uint8), 4)
    assert word.dtype == np.int32 and word.shape == (1, 1)
    assert int(word[0, 0]) == 0x76543210
    np.testing.assert_array_equal(ct.unpack_rows(word, 4, 8), v)
    w8 = ct.pack_rows(np.array([[1, 2, 3, 255]], np.uint8), 8)
    assert int(w8.view(np.uint32)[0, 0]) == 0xFF030201


def test_pack_rows_matches_compressed_tensors(rng):
    torch = pytest.importorskip("torch")
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    for bits, cols in ((4, 37), (8, 13), (4, 64)):
        half = 1 << (bits - 1)
        v = rng.integers(-half, half, size=(5, cols))
        ref = helpers.pack_to_int32(torch.from_numpy(v.astype(np.int8)), bits).numpy()
        got = ct.pack_rows((v + half).astype(np.uint8), bits)
        np.testing.assert_array_equal(got, ref)
        ref0 = helpers.pack_to_int32(torch.from_numpy(v.astype(np.int8)), bits, packed_dim=0)
        got0 = ct.pack_rows((v + half).astype(np.uint8).T, bits).T
        np.testing.assert_array_equal(got0, ref0.numpy())


# --------------------------------------------------------------------------- round trip
@pytest.mark.parametrize(("qt", "sc", "gran", "gs"), SCHEMES)
@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_save_load_round_trip(tmp_path, rng, qt, sc, gran, gs, dtype):
    layer, _ = _layer(rng, qt, sc, gran, gs, dtype=dtype)
    p = tmp_path / "m.safetensors"
    qlinear.save(p, {"fc": layer.with_bias(np.ones(20))}, scale_dtype=dtype)
    info = qlinear.io.inspect(p)
    assert info.format == "compressed-tensors"
    assert info.tensors["fc.weight_scale"][0] == dtype
    got = qlinear.load(p, verify=True)["fc"]
    assert (got.qtype, got.scheme, got.granularity) == (
        layer.qtype,
        layer.scheme,
        layer.granularity,
    )
    np.testing.assert_array_equal(got.dequantize(), layer.dequantize())
    np.testing.assert_array_equal(got.bias, np.ones(20))


def test_partial_groups_and_unrepresentable_scales_are_refused(tmp_path, rng):
    layer, _ = _layer(rng, "int4", "symmetric", "per_group", 32, shape=(4, 40))
    with pytest.raises(FormatError, match=r"'fc'.*not a multiple of group size 32"):
        qlinear.save(tmp_path / "a.safetensors", {"fc": layer})
    qlinear.save(tmp_path / "a.safetensors", {"fc": layer}, format="qlinear")  # may keep them
    w = rng.standard_normal((4, 32))
    layer64 = QuantizedLinear.from_fp(w, qlinear.calibrate_linear(w, "int8"))
    with pytest.raises(FormatError, match="not representable in F16"):
        qlinear.save(tmp_path / "b.safetensors", {"fc": layer64}, scale_dtype="F16")


def test_fitting_group_size():
    assert ct.fitting_group_size(576, 128) == 64
    assert ct.fitting_group_size(1536, 128) == 128
    assert ct.fitting_group_size(320, 128) == 64
    assert ct.fitting_group_size(40, 32) == 8
    assert ct.fitting_group_size(12, 32) is None


# --------------------------------------------------------------------------- oracles
def _ct_scheme_from_file(path):
    from compressed_tensors.quantization import QuantizationConfig

    meta = stnp.safe_open if False else None  # noqa: F841
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        qc = json.loads(f.metadata()["quantization_config"])
    return QuantizationConfig.model_validate(qc)


@pytest.mark.parametrize(("qt", "sc", "gran", "gs"), SCHEMES[:6])
def test_compressed_tensors_decompresses_qlinear_weights(tmp_path, rng, qt, sc, gran, gs):
    torch = pytest.importorskip("torch")
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from safetensors.torch import load_file

    layer, _ = _layer(rng, qt, sc, gran, gs, shape=(24, 64))
    p = tmp_path / "m.safetensors"
    qlinear.save(p, {"fc": layer})
    qc = _ct_scheme_from_file(p)
    (scheme,) = qc.config_groups.values()
    comp = BaseCompressor.load_from_registry(scheme.format)
    state = {k.removeprefix("fc."): v for k, v in load_file(str(p)).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = comp.decompress(state, scheme)["weight"]
    assert w.dtype == torch.float32
    np.testing.assert_array_equal(w.numpy(), layer.dequantize().astype(np.float32))


def _tiny_llama(tmp_path, dtype="float32", intermediate=320):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=128,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg).to(getattr(torch, dtype)).eval()
    model.save_pretrained(tmp_path / "f")
    return model


def _transformers_load(path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize(
    ("cfg", "dtype", "activations"),
    [
        ({"qtype": "int4", "granularity": "per_group", "group_size": 128}, "float32", "float"),
        ({"qtype": "int4", "granularity": "per_group", "group_size": 64}, "bfloat16", "float"),
        ({"qtype": "int8", "granularity": "per_channel"}, "float32", "float"),
        ({"qtype": "int8", "granularity": "per_channel"}, "bfloat16", "int8"),
    ],
)
def test_transformers_loads_quantize_checkpoint_output(tmp_path, cfg, dtype, activations):
    torch = pytest.importorskip("torch")
    model = _tiny_llama(tmp_path, dtype)
    rep = qlinear.quantize_checkpoint(
        tmp_path / "f", tmp_path / "q", cfg, progress=False, activations=activations
    )
    q = qlinear.load(tmp_path / "q")
    info = qlinear.io.load_with_info(tmp_path / "q")[1]
    assert set(info.activations.values()) == {activations}
    if cfg.get("group_size") == 128:  # 320 input features: group 64 for down_proj
        notes = {t.name: t.note for t in rep.tensors if t.note}
        assert set(notes) == {f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)}
        assert q["model.layers.0.mlp.down_proj"].group_size == 64
    m2 = _transformers_load(tmp_path / "q")
    # same logits as torch with qlinear's dequantized weights (equal weights: equal up to
    # float summation order; stated tolerance 1e-5 float32, 2e-2 bfloat16)
    ref = type(model)(model.config).to(model.dtype).eval()
    sd = dict(model.state_dict())
    for k in sd:
        base = k.removesuffix(".weight")
        if base in q and isinstance(q[base], QuantizedLinear):
            sd[k] = torch.from_numpy(q[base].dequantize()).to(model.dtype)
    ref.load_state_dict(sd)
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y, yr = m2(ids).logits.float(), ref(ids).logits.float()  # the first call decompresses
    checked = 0
    for name, mod in m2.named_modules():
        if name in q and isinstance(q[name], QuantizedLinear):
            w = mod.weight.detach()
            if not w.is_floating_point():  # int-quantized W8A8 stays int8: (q - 0) * scale
                w = (w.to(mod.weight_scale.dtype) * mod.weight_scale).to(mod.weight_scale.dtype)
            expected = torch.from_numpy(q[name].dequantize()).to(w.dtype)
            assert torch.equal(w, expected), name
            checked += 1
    assert checked == 15  # 7 per layer + lm_head
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert float((y - yr).abs().max()) <= tol * max(1.0, float(yr.abs().max()))


def test_strict_group_size_is_an_error(tmp_path):
    _tiny_llama(tmp_path)
    with pytest.raises(FormatError, match=r"down_proj.*not a multiple of group size 128"):
        qlinear.quantize_checkpoint(
            tmp_path / "f",
            tmp_path / "q",
            {"qtype": "int4", "granularity": "per_group", "group_size": 128},
            progress=False,
            strict_group_size=True,
        )


def _write_with_compressed_tensors(tmp_path, preset, group_size=None):
    """A tiny llama quantized and saved by compressed-tensors itself (minmax qparams)."""
    pytest.importorskip("torch")
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams
    from compressed_tensors.utils import update_offload_parameter

    model = _tiny_llama(tmp_path, intermediate=256)
    floats = {k: v.detach().clone() for k, v in model.state_dict().items()}
    scheme = preset_name_to_scheme(preset, ["Linear"])
    if group_size is not None:
        scheme.weights.group_size = group_size
    qcfg = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_quantization_config(model, qcfg)
        for _, m in model.named_modules():
            s = getattr(m, "quantization_scheme", None)
            if s is None or s.weights is None:
                continue
            a, w = s.weights, m.weight.data
            if a.strategy == "group":
                wg = w.reshape(w.shape[0], -1, a.group_size)
                mn, mx = wg.amin(-1), wg.amax(-1)
            elif a.strategy == "channel":
                mn, mx = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            else:
                mn, mx = w.amin().reshape(1), w.amax().reshape(1)
            sc, zp = calculate_qparams(mn, mx, a)
            update_offload_parameter(m, "weight_scale", sc.reshape(m.weight_scale.shape))
            if hasattr(m, "weight_zero_point"):
                update_offload_parameter(
                    m,
                    "weight_zero_point",
                    zp.to(m.weight_zero_point.dtype).reshape(m.weight_zero_point.shape),
                )
        mc = ModelCompressor.from_pretrained_model(model)
        # the reference dequantized weights, from compressed-tensors' own fake quantization
        from compressed_tensors.quantization.lifecycle.forward import fake_quantize

        ref = {}
        for name, m in model.named_modules():
            s = getattr(m, "quantization_scheme", None)
            if s is not None and s.weights is not None:
                zp = getattr(m, "weight_zero_point", None)
                ref[name] = fake_quantize(m.weight.data, m.weight_scale, zp, s.weights).numpy()
        mc.compress_model(model)
        model.save_pretrained(tmp_path / "ct")
        mc.update_config(tmp_path / "ct")
    return ref, floats


@pytest.mark.parametrize(
    ("preset", "gs", "fmt"),
    [
        ("W4A16", None, "pack-quantized"),
        ("W4A16_ASYM", None, "pack-quantized"),
        ("W4A16", 32, "pack-quantized"),
        ("W8A16", None, "pack-quantized"),
        ("W8A8", None, "int-quantized"),
    ],
)
def test_qlinear_reads_what_compressed_tensors_writes(tmp_path, preset, gs, fmt):
    ref, _ = _write_with_compressed_tensors(tmp_path, preset, gs)
    cfgjson = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert cfgjson["quantization_config"]["format"] == fmt
    q, info = qlinear.io.load_with_info(tmp_path / "ct", verify=True)
    assert info.format == "compressed-tensors"
    assert set(ref) == {n for n, v in q.items() if isinstance(v, QuantizedLinear)}
    for name, w in ref.items():
        np.testing.assert_array_equal(q[name].dequantize().astype(np.float32), w, err_msg=name)
        assert info.activations[name] == ("int8" if preset == "W8A8" else "float")
    described = qlinear.io.inspect(tmp_path / "ct")
    assert described.format == "compressed-tensors" and set(described.layers) == set(ref)
    lay = described.layers["model.layers.0.mlp.down_proj"]
    assert lay["qtype"] == ("int4" if "W4" in preset else "int8")
    assert lay["shape"] == [128, 256] and lay["format"] == fmt
    x = np.random.default_rng(0).standard_normal((3, 128)).astype(np.float32)
    name = "model.layers.0.self_attn.q_proj"
    np.testing.assert_allclose(q[name](x), x @ ref[name].T, rtol=1e-4, atol=1e-4)


def test_naive_quantized_is_read(tmp_path, rng):
    layer, _ = _layer(rng, "int8", "symmetric", "per_channel", None)
    qc = {
        "quant_method": "compressed-tensors",
        "format": "naive-quantized",
        "quantization_status": "compressed",
        "ignore": [],
        "config_groups": {
            "g": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
            }
        },
    }
    tensors = {
        "fc.weight": layer.qweight.astype(np.int8),
        "fc.weight_scale": layer.scales.astype(np.float32).reshape(-1, 1),
    }
    stnp.save_file(
        tensors, str(tmp_path / "m.safetensors"), metadata={"quantization_config": json.dumps(qc)}
    )
    got = qlinear.load(tmp_path / "m.safetensors")["fc"]
    np.testing.assert_array_equal(got.dequantize(), layer.dequantize())


# --------------------------------------------------------------------------- bad input
@pytest.fixture
def ct_file(tmp_path, rng):
    layer, _ = _layer(rng, "int4", "asymmetric", "per_group", 32)
    p = tmp_path / "m.safetensors"
    qlinear.save(p, {"fc": layer})
    from safetensors import safe_open

    with safe_open(str(p), "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    return p, tensors, meta


def _rewrite(path, tensors, meta, qc_edit=None, **replace):
    t = {**tensors, **replace}
    m = dict(meta)
    if qc_edit is not None:
        qc = json.loads(m["quantization_config"])
        qc_edit(qc)
        m["quantization_config"] = json.dumps(qc)
    stnp.save_file(t, str(path), metadata=m)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (dict(**{"fc.weight_packed": np.zeros((20, 7), np.int32)}), r"'fc\.weight_packed'.*shape"),
        (dict(**{"fc.weight_scale": np.ones((20, 3), np.float32)}), r"'fc\.weight_scale'.*shape"),
        (dict(**{"fc.weight_zero_point": np.zeros((2, 2), np.int32)}), r"'fc\.weight_zero_poi"),
        (dict(**{"fc.weight_g_idx": np.arange(64, dtype=np.int32) % 2}), r"'fc\.weight_g_idx'"),
    ],
)
def test_bad_tensors_are_format_errors_naming_them(ct_file, edit, match):
    p, tensors, meta = ct_file
    _rewrite(p, tensors, meta, **edit)
    with pytest.raises(FormatError, match=match):
        qlinear.load(p)


def test_zero_point_out_of_range(tmp_path, rng):
    layer, _ = _layer(rng, "int8", "asymmetric", "per_channel", None)
    p = tmp_path / "m.safetensors"
    qlinear.save(p, {"fc": layer}, activations="int8")  # int-quantized: I8 zero points
    from safetensors import safe_open

    with safe_open(str(p), "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()

    def four_bits(qc):
        qc["config_groups"]["group_0"]["weights"]["num_bits"] = 4

    _rewrite(
        p,
        tensors,
        meta,
        four_bits,
        **{
            "fc.weight": np.zeros((20, 64), np.int8),
            "fc.weight_zero_point": np.full((20, 1), 9, np.int8),
        },
    )
    with pytest.raises(FormatError, match=r"'fc\.weight_zero_point'.*expected \[-8, 7\]"):
        qlinear.load(p)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda qc: qc.update(format="marlin-24"), "format 'marlin-24'"),
        (
            lambda qc: qc["config_groups"]["group_0"]["weights"].update(strategy="block"),
            "strategy 'block'",
        ),
        (lambda qc: qc.update(extra=1), r"unknown keys \['extra'\]"),
        (
            lambda qc: qc["config_groups"]["group_0"]["weights"].update(colour=1),
            r"weights has unknown keys \['colour'\]",
        ),
        (
            lambda qc: qc["config_groups"]["group_0"].pop("format") and qc.update(format="x"),
            "format 'x'",
        ),
    ],
)
def test_bad_configs_are_format_errors(ct_file, edit, match):
    p, tensors, meta = ct_file
    _rewrite(p, tensors, meta, edit)
    with pytest.raises(FormatError, match=match):
        qlinear.load(p)


def test_inspect_and_cli_show_group_sizes(tmp_path, capsys):
    _tiny_llama(tmp_path)
    from qlinear.cli import main

    args = [
        "quantize",
        str(tmp_path / "f"),
        "-o",
        str(tmp_path / "q"),
        "--bits",
        "4",
        "--no-progress",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "note: model.layers.0.mlp.down_proj.weight: in_features 320" in out
    assert "group size 64" in out
    assert main(["inspect", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "compressed-tensors" in out
    line = next(x for x in out.splitlines() if x.startswith("model.layers.0.mlp.down_proj "))
    assert "per_group(64)" in line and "[group_1]" in line
