"""qlinear.io with qlinear's own format (``format="qlinear"``): save/load round trips, the
on-disk layout, malformed files, atomic writes. compressed-tensors: test_formats_ct.py."""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading

import numpy as np
import pytest
import safetensors.numpy as stnp

import qlinear
from qlinear import FormatError, InvalidInputError, QuantizationParams, QuantizedLinear
from qlinear import io as qio


def save(path, layers, metadata=None, **kw):
    """qlinear.save in qlinear's own layout, which these tests pin down byte for byte."""
    return qlinear.save(path, layers, metadata, format="qlinear", **kw)


FORMATS = [
    (qt, sc, gran, gs)
    for qt in ("int8", "int4")
    for sc in ("symmetric", "asymmetric")
    for gran, gs in (("per_tensor", None), ("per_channel", None), ("per_group", 4))
]


def _layer(rng, qt, sc, gran, gs, bias=None, shape=(6, 9)):
    w = rng.standard_normal(shape)
    p = qlinear.calibrate_linear(w, qt, gran, sc, group_size=gs)
    return QuantizedLinear.from_fp(w, p, bias=bias, backend="numpy")


def _write_raw(path, header: dict, data: bytes, *, length: int | None = None) -> None:
    """A safetensors file from a hand-written header (no validation): for malformed cases."""
    text = json.dumps(header).encode() if isinstance(header, dict) else header
    n = len(text) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + text + data)


def _rewrite(path, drop=(), replace=None, meta=None):
    """Re-save a file with the official safetensors writer, dropping/replacing tensors."""
    tensors = {k: v for k, v in stnp.load_file(str(path)).items() if k not in drop}
    tensors.update(replace or {})
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        old_meta = json.loads(f.read(n))["__metadata__"]
    stnp.save_file(tensors, str(path), metadata=meta if meta is not None else old_meta)


def _config_of(path) -> dict:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(json.loads(f.read(n))["__metadata__"]["qlinear"])


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize(("qt", "sc", "gran", "gs"), FORMATS)
@pytest.mark.parametrize("bias_dtype", [None, np.float32, np.float64])
def test_round_trip_is_exact(tmp_path, rng, qt, sc, gran, gs, bias_dtype):
    bias = None if bias_dtype is None else rng.standard_normal(6).astype(bias_dtype)
    layer = _layer(rng, qt, sc, gran, gs, bias)
    path = tmp_path / "m.safetensors"
    save(path, {"enc.fc": layer})
    got = qlinear.load(path, backend="numpy", verify=True)["enc.fc"]
    assert isinstance(got, QuantizedLinear)
    assert got.shape == layer.shape
    assert (got.qtype, got.scheme, got.granularity, got.group_size) == (
        layer.qtype,
        layer.scheme,
        layer.granularity,
        layer.group_size,
    )
    np.testing.assert_array_equal(got.qweight, layer.qweight)
    np.testing.assert_array_equal(got.stored_weight, layer.stored_weight)
    np.testing.assert_array_equal(got.scales, layer.scales)
    np.testing.assert_array_equal(got.zero_points, layer.zero_points)
    if bias is None:
        assert got.bias is None
    else:
        np.testing.assert_array_equal(got.bias, layer.bias)
    x = rng.standard_normal((5, 9)).astype(np.float32)
    np.testing.assert_array_equal(got.forward(x), layer.forward(x))
    x64 = rng.standard_normal((2, 3, 9))
    np.testing.assert_array_equal(got.forward(x64), layer.forward(x64))
    np.testing.assert_array_equal(
        got.forward(x, activations="int8"), layer.forward(x, activations="int8")
    )


def test_arrays_are_kept_with_their_dtype(tmp_path, rng):
    arrays = {
        "emb": rng.standard_normal((7, 3)).astype(np.float16),
        "norm.weight": rng.standard_normal(3).astype(np.float32),
        "x64": rng.standard_normal((2, 2, 2)),
        "ids": np.arange(5, dtype=np.int64),
        "mask": np.array([True, False]),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "strided": rng.standard_normal((4, 6))[:, ::2],
    }
    path = tmp_path / "a.safetensors"
    save(path, {**arrays, "fc": _layer(rng, "int8", "symmetric", "per_channel", None)})
    got = qlinear.load(path)
    assert set(got) == {*arrays, "fc"}
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v)
        assert not got[k].flags.writeable


def test_official_safetensors_reads_our_files_and_we_read_its(tmp_path, rng):
    layer = _layer(rng, "int4", "asymmetric", "per_group", 4, rng.standard_normal(6))
    path = tmp_path / "q.safetensors"
    save(path, {"l": layer, "f": np.ones(3, np.float32)}, metadata={"who": "me"})
    theirs = stnp.load_file(str(path))
    assert set(theirs) == {
        "f",
        "l.weight_packed",
        "l.weight_shape",
        "l.weight_scale",
        "l.weight_zero_point",
        "l.bias",
    }
    np.testing.assert_array_equal(theirs["l.weight_packed"], layer.stored_weight)
    np.testing.assert_array_equal(theirs["l.weight_shape"], [6, 9])
    np.testing.assert_array_equal(theirs["l.weight_scale"], layer.scales)
    np.testing.assert_array_equal(theirs["l.weight_zero_point"], layer.zero_points)
    assert theirs["l.weight_zero_point"].dtype == np.int8
    assert theirs["l.weight_scale"].dtype == np.float64
    # A plain file written by safetensors itself loads as arrays.
    plain = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": np.arange(3)}
    stnp.save_file(plain, str(tmp_path / "plain.safetensors"))
    got = qlinear.load(tmp_path / "plain.safetensors")
    assert set(got) == {"a", "b"}
    np.testing.assert_array_equal(got["a"], plain["a"])
    assert qio.inspect(path).metadata == {"who": "me"}


def test_config_metadata_describes_each_layer(tmp_path, rng):
    path = tmp_path / "c.safetensors"
    save(
        path,
        {
            "a": _layer(rng, "int4", "symmetric", "per_group", 4),
            "b": _layer(rng, "int8", "asymmetric", "per_tensor", None, np.ones(6)),
        },
    )
    cfg = _config_of(path)
    assert cfg["format"] == "qlinear" and cfg["format_version"] == 1
    assert cfg["layers"]["a"] == {
        "qtype": "int4",
        "scheme": "symmetric",
        "granularity": "per_group",
        "group_size": 4,
        "shape": [6, 9],
        "bias": False,
    }
    assert cfg["layers"]["b"]["granularity"] == "per_tensor"
    assert cfg["layers"]["b"]["bias"] is True


def test_int4_bytes_on_disk_match_the_documented_example(tmp_path):
    # docs/format.md: symmetric codes -7, -1, 0, 3, 7 are stored +8 -> 1, 7, 8, 11, 15
    # and packed low nibble first -> 0x71, 0xB8, 0x0F (the last high nibble is padding).
    params = QuantizationParams("int4", "symmetric", "per_tensor", [0.5], [0], [-3.5], [3.5])
    layer = QuantizedLinear.from_codes(np.array([[-7, -1, 0, 3, 7]]), params)
    path = tmp_path / "ex.safetensors"
    save(path, {"ex": layer})
    theirs = stnp.load_file(str(path))
    assert theirs["ex.weight_packed"].tobytes() == bytes([0x71, 0xB8, 0x0F])
    assert theirs["ex.weight_shape"].tolist() == [1, 5]


def test_int4_bytes_equal_compressed_tensors_int32_packing_when_in_is_a_multiple_of_8(
    tmp_path, rng
):
    # compressed-tensors' pack_to_int32: value + 8, then value j of each run of 8 goes to
    # bits 4j..4j+3 of an int32 (lowest bits first). Written out independently here.
    codes = rng.integers(-7, 8, size=(3, 16))
    params = QuantizationParams(
        "int4", "symmetric", "per_channel", [1.0] * 3, [0] * 3, [-7.0] * 3, [7.0] * 3
    )
    layer = QuantizedLinear.from_codes(codes, params)
    path = tmp_path / "ct.safetensors"
    save(path, {"l": layer})
    ours = stnp.load_file(str(path))["l.weight_packed"]
    u = (codes + 8).astype(np.uint32).reshape(3, 2, 8)
    int32 = np.zeros((3, 2), dtype=np.uint32)
    for j in range(8):
        int32 |= u[:, :, j] << np.uint32(4 * j)
    assert ours.tobytes() == int32.astype("<u4").tobytes()


def test_load_does_not_copy_the_codes(tmp_path, rng):
    layer = _layer(rng, "int8", "symmetric", "per_channel", None, shape=(64, 128))
    path = tmp_path / "z.safetensors"
    save(path, {"l": layer})
    got = qlinear.load(path, backend="numpy")["l"]
    base = got.stored_weight
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    assert isinstance(base, mmap.mmap)
    assert not got.stored_weight.flags.writeable


def _mmap_base(a):
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a.obj if isinstance(a, memoryview) else a


@pytest.mark.parametrize("backend", qlinear.kernels.available_backends())
@pytest.mark.parametrize("qtype", ["int8", "int4"])
def test_loaded_layers_map_codes_until_first_forward_on_every_backend(
    tmp_path, rng, backend, qtype
):
    # native backends repack lazily: load maps the file, the first forward packs once
    gs = 16 if qtype == "int4" else None
    gran = "per_group" if gs else "per_channel"
    layer = _layer(rng, qtype, "asymmetric", gran, gs, shape=(37, 96))
    path = tmp_path / "lazy.safetensors"
    save(path, {"l": layer})
    got = qlinear.load(path, backend=backend)["l"]
    assert got.backend == backend
    assert isinstance(_mmap_base(got.stored_weight), mmap.mmap)
    eager = QuantizedLinear.from_codes(
        layer.qweight, layer.params, bias=layer.bias, backend=backend
    )
    x = rng.standard_normal((5, 96)).astype(np.float32)
    results = {}

    def run(i):
        results[i] = (got(x), got(x, activations="int8"))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for y, y8 in results.values():
        np.testing.assert_array_equal(y, eager(x))
        np.testing.assert_array_equal(y8, eager(x, activations="int8"))
    np.testing.assert_array_equal(got.qweight, layer.qweight)


def test_load_directory_with_index_merges_shards(tmp_path, rng):
    layer = _layer(rng, "int8", "symmetric", "per_channel", None, np.arange(6.0))
    save(tmp_path / "s1.safetensors", {"l": layer})
    # move the bias into the second shard
    t1 = stnp.load_file(str(tmp_path / "s1.safetensors"))
    bias = t1.pop("l.bias")
    meta = {"qlinear": json.dumps(_config_of(tmp_path / "s1.safetensors"))}
    stnp.save_file(t1, str(tmp_path / "s1.safetensors"), metadata=meta)
    stnp.save_file({"l.bias": bias, "other": np.ones(2)}, str(tmp_path / "s2.safetensors"))
    wm = {k: "s1.safetensors" for k in t1} | {"l.bias": "s2.safetensors", "other": "s2.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    got = qlinear.load(tmp_path)
    np.testing.assert_array_equal(got["l"].bias, layer.bias)
    assert set(got) == {"l", "other"}
    with pytest.raises(FormatError, match=r"l\.bias.*load the directory"):
        qlinear.load(tmp_path / "s1.safetensors")


# ----------------------------------------------------------------------------- malformed
@pytest.fixture
def saved(tmp_path, rng):
    path = tmp_path / "m.safetensors"
    layers = {
        "int8l": _layer(rng, "int8", "asymmetric", "per_channel", None, np.ones(6)),
        "int4l": _layer(rng, "int4", "symmetric", "per_group", 4),
    }
    save(path, layers)
    return path


def test_truncated_file_names_the_tensor(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[:-5])
    with pytest.raises(FormatError, match=r"tensor '[^']+'.*truncated"):
        qlinear.load(saved)


@pytest.mark.parametrize("size", [0, 3, 7])
def test_file_shorter_than_the_length_prefix(tmp_path, size):
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x01" * size)
    with pytest.raises(FormatError, match="8-byte header length"):
        qlinear.load(p)


def test_header_length_larger_than_the_file(tmp_path):
    p = tmp_path / "h.safetensors"
    _write_raw(
        p, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, length=10_000
    )
    with pytest.raises(FormatError, match="header length 10000 is larger than the file"):
        qlinear.load(p)


@pytest.mark.parametrize("header", [b"{not json", b"\xff\xfe{}", b"[1, 2]", b'"str"'])
def test_garbage_header(tmp_path, header):
    p = tmp_path / "g.safetensors"
    _write_raw(p, header, b"")
    with pytest.raises(FormatError, match="header"):
        qlinear.load(p)


def test_duplicate_keys_in_header(tmp_path):
    p = tmp_path / "d.safetensors"
    entry = '{"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}'
    _write_raw(p, f'{{"a": {entry}, "a": {entry}}}'.encode(), b"\0")
    with pytest.raises(FormatError, match="'a' twice"):
        qlinear.load(p)


@pytest.mark.parametrize(
    ("entry", "data", "pattern"),
    [
        ({"dtype": "Q3", "shape": [2], "data_offsets": [0, 2]}, 2, "unknown dtype 'Q3'"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, 4, "needs 8"),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, 4, "shape must be"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, 4, "data_offsets must be"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, 4, "run past the end"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}, 8, "unused bytes before"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, 8, "after the last tensor"),
        ({"dtype": "F32", "shape": [1]}, 4, "data_offsets must be"),
        ([1, 2], 0, "must be an object"),
    ],
)
def test_header_entries_that_lie(tmp_path, entry, data, pattern):
    p = tmp_path / "lie.safetensors"
    _write_raw(p, {"w": entry}, b"\0" * data)
    with pytest.raises(FormatError, match=pattern) as ei:
        qlinear.load(p)
    if "after the last" not in pattern:
        assert "'w'" in str(ei.value)


def test_overlapping_offsets(tmp_path):
    p = tmp_path / "o.safetensors"
    h = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    _write_raw(p, h, b"\0" * 12)
    with pytest.raises(FormatError, match=r"'b'.*overlap"):
        qlinear.load(p)


def test_missing_scale_for_a_quantized_weight(saved):
    _rewrite(saved, drop=["int8l.weight_scale"])
    with pytest.raises(FormatError, match=r"'int8l\.weight_scale' is missing"):
        qlinear.load(saved)


def test_missing_codes(saved):
    _rewrite(saved, drop=["int4l.weight_packed"])
    with pytest.raises(FormatError, match=r"'int4l\.weight_packed' is missing"):
        qlinear.load(saved)


def test_missing_zero_point_of_asymmetric_layer(saved):
    _rewrite(saved, drop=["int8l.weight_zero_point"])
    with pytest.raises(FormatError, match=r"'int8l\.weight_zero_point' is missing"):
        qlinear.load(saved)


def test_zero_point_on_a_symmetric_layer(saved):
    _rewrite(saved, replace={"int4l.weight_zero_point": np.zeros((6, 3), np.int8)})
    with pytest.raises(FormatError, match=r"'int4l\.weight_zero_point' present.*symmetric"):
        qlinear.load(saved)


@pytest.mark.parametrize(
    ("name", "bad", "pattern"),
    [
        ("int8l.weight", np.zeros((6, 9), np.float32), "dtype F32"),
        ("int8l.weight", np.zeros((6, 8), np.int8), r"shape \[6, 8\]"),
        ("int8l.weight_scale", np.ones((6, 1)), r"shape \[6, 1\]"),
        ("int8l.weight_scale", np.ones(6, np.int32), "dtype I32"),
        ("int8l.weight_zero_point", np.zeros(6, np.float32), "dtype F32"),
        ("int8l.bias", np.ones(5), r"shape \[5\]"),
        ("int4l.weight_packed", np.zeros((6, 4), np.uint8), r"shape \[6, 4\]"),
        ("int4l.weight_packed", np.zeros((6, 5), np.int8), "dtype I8"),
        ("int4l.weight_shape", np.array([6, 10]), r"says \[6, 10\]"),
        ("int4l.weight_scale", np.ones((6, 2)), r"shape \[6, 2\]"),
    ],
)
def test_wrong_dtypes_and_disagreeing_shapes(saved, name, bad, pattern):
    _rewrite(saved, replace={name: bad})
    with pytest.raises(FormatError, match=pattern) as ei:
        qlinear.load(saved)
    assert repr(name) in str(ei.value)


@pytest.mark.parametrize("value", [0.0, -1.0, np.nan, np.inf])
def test_bad_scale_values(saved, value):
    s = np.ones(6)
    s[2] = value
    _rewrite(saved, replace={"int8l.weight_scale": s})
    with pytest.raises(FormatError, match=r"int8l.*scale"):
        qlinear.load(saved)


def test_out_of_range_zero_point(saved):
    _rewrite(saved, replace={"int8l.weight_zero_point": np.full(6, 7, np.int64) * 0 + 200})
    with pytest.raises(FormatError, match=r"int8l.*zero_point"):
        qlinear.load(saved)


def test_nan_bias(saved):
    b = np.ones(6)
    b[0] = np.nan
    _rewrite(saved, replace={"int8l.bias": b})
    with pytest.raises(FormatError, match=r"'int8l\.bias' holds NaN"):
        qlinear.load(saved)


def test_future_format_version(saved):
    cfg = _config_of(saved)
    cfg["format_version"] = 2
    _rewrite(saved, meta={"qlinear": json.dumps(cfg)})
    with pytest.raises(FormatError, match="format_version 2 is newer"):
        qlinear.load(saved)


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda c: "{garbage", "not JSON"),
        (lambda c: json.dumps({**c, "format": "other"}), "format='qlinear'"),
        (lambda c: json.dumps({**c, "format_version": "1"}), "format_version must be"),
        (lambda c: json.dumps({**c, "layers": [1]}), "'layers'"),
        (
            lambda c: json.dumps(
                {**c, "layers": {**c["layers"], "int4l": {**c["layers"]["int4l"], "qtype": "int3"}}}
            ),
            "layer 'int4l'",
        ),
        (
            lambda c: json.dumps(
                {**c, "layers": {**c["layers"], "int4l": {**c["layers"]["int4l"], "group_size": 0}}}
            ),
            "layer 'int4l'.*group_size",
        ),
        (
            lambda c: json.dumps(
                {**c, "layers": {**c["layers"], "int8l": {**c["layers"]["int8l"], "shape": [6]}}}
            ),
            "layer 'int8l'.*shape",
        ),
        (
            lambda c: json.dumps({**c, "layers": {**c["layers"], "ghost": c["layers"]["int8l"]}}),
            r"'ghost\.weight' is missing",
        ),
    ],
)
def test_bad_quantization_config(saved, mutate, pattern):
    _rewrite(saved, meta={"qlinear": mutate(_config_of(saved))})
    with pytest.raises(FormatError, match=pattern):
        qlinear.load(saved)


def test_verify_catches_codes_outside_the_range(tmp_path):
    params = QuantizationParams("int8", "symmetric", "per_tensor", [1.0], [0], [-127.0], [127.0])
    layer = QuantizedLinear.from_codes(np.array([[1, 2, 3]]), params)
    p = tmp_path / "v.safetensors"
    save(p, {"l": layer})
    _rewrite(p, replace={"l.weight": np.array([[1, -128, 3]], np.int8)})
    qlinear.load(p)  # cheap default: codes are not read
    with pytest.raises(FormatError, match=r"'l\.weight'.*-128"):
        qlinear.load(p, verify=True)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        qlinear.load(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="neither"):
        qlinear.load(tmp_path)


# ----------------------------------------------------------------------------- save errors
def test_save_rejects_bad_items(tmp_path, rng):
    layer = _layer(rng, "int8", "symmetric", "per_channel", None)
    p = tmp_path / "e.safetensors"
    with pytest.raises(InvalidInputError, match="non-empty strings"):
        save(p, {"": layer})
    with pytest.raises(InvalidInputError, match="QuantizedLinear or a numpy array"):
        save(p, {"a": [1, 2]})
    with pytest.raises(InvalidInputError, match="cannot be stored"):
        save(p, {"a": np.array(["x"])})
    with pytest.raises(InvalidInputError, match=r"'a\.weight'.*twice"):
        save(p, {"a": layer, "a.weight": np.ones(2)})
    with pytest.raises(InvalidInputError, match="reserved"):
        save(p, {"a": layer}, metadata={"qlinear": "x"})
    with pytest.raises(InvalidInputError, match="str to str"):
        save(p, {"a": layer}, metadata={"k": 1})
    assert not p.exists()


# ----------------------------------------------------------------------------- atomicity
def _fail_on_second_tensor(monkeypatch):
    calls = {"n": 0}
    real = qio._write_tensor

    def flaky(writer, f, name, arr):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        real(writer, f, name, arr)

    monkeypatch.setattr(qio, "_write_tensor", flaky)


def test_interrupted_save_keeps_the_old_file(tmp_path, rng, monkeypatch):
    p = tmp_path / "m.safetensors"
    save(p, {"old": np.ones(3)})
    before = p.read_bytes()
    _fail_on_second_tensor(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        save(p, {"new": _layer(rng, "int8", "asymmetric", "per_channel", None)})
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_interrupted_save_leaves_no_file(tmp_path, rng, monkeypatch):
    _fail_on_second_tensor(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        save(
            tmp_path / "m.safetensors", {"l": _layer(rng, "int4", "symmetric", "per_channel", None)}
        )
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "qt,sc,array_name",
    [
        ("int8", "symmetric", "a.bias"),
        ("int8", "symmetric", "a.weight_zero_point"),
        ("int8", "symmetric", "a.weight_packed"),
        ("int4", "symmetric", "a.weight"),
        ("int8", "asymmetric", "a.weight_shape"),
    ],
)
def test_save_rejects_arrays_inside_a_layers_tensor_names(tmp_path, rng, qt, sc, array_name):
    # Such a file used to be written, and then load() rejected it (or misread the array
    # as part of the layer).
    layer = _layer(rng, qt, sc, "per_channel", None)
    p = tmp_path / "n.safetensors"
    with pytest.raises(InvalidInputError, match=rf"{array_name!r}.*layer 'a'"):
        save(p, {"a": layer, array_name: np.ones(6, dtype=np.int8)})
    assert not p.exists()
    # the same array under a name outside the namespace round-trips
    save(p, {"a": layer, "a_" + array_name[2:]: np.ones(6, dtype=np.int8)})
    assert set(qlinear.load(p)) == {"a", "a_" + array_name[2:]}


@pytest.mark.parametrize("sc", ["symmetric", "asymmetric"])
def test_round_trip_with_scales_near_float64_max(tmp_path, sc):
    # (qmax - zp) * scale overflowed to Inf while loading (a RuntimeWarning, or a
    # FormatError), although save had written the layer without complaint.
    zp = [0, 0] if sc == "symmetric" else [-128, 127]
    p = QuantizationParams("int8", sc, "per_channel", [1e308, 1e308], zp, [0.0, 0.0], [0.0, 0.0])
    w = np.zeros((2, 3)) if sc == "symmetric" else np.array([[0.0] * 3, [-1e308] * 3])
    layer = QuantizedLinear.from_fp(w, p)
    path = tmp_path / "big.safetensors"
    save(path, {"a": layer})
    got = qlinear.load(path, verify=True)["a"]
    np.testing.assert_array_equal(got.scales, layer.scales)
    np.testing.assert_array_equal(got.qweight, layer.qweight)
    assert np.all(np.isfinite(got.params.min_val)) and np.all(np.isfinite(got.params.max_val))


def test_save_onto_a_directory_names_the_directory(tmp_path, rng):
    layer = _layer(rng, "int8", "symmetric", "per_channel", None)
    with pytest.raises(IsADirectoryError, match="is a directory") as info:
        save(tmp_path, {"a": layer})
    assert info.value.filename == str(tmp_path)
    assert list(tmp_path.parent.glob(f".{tmp_path.name}.*.tmp")) == []
