"""Hostile files: every malformed safetensors header, qlinear config or index raises
FormatError naming the tensor or field, never another exception type; nothing is
allocated from a size in the file before it is checked against the file's length.
(The regression inputs of the fuzzers in fuzz/ are in tests/test_fuzz_findings.py.)"""

from __future__ import annotations

import json
import os
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qlinear
from qlinear import FormatError, QuantizationError, QuantizedLinear
from qlinear._safetensors import SafetensorsFile


def _raw(path, header, data=b"", n=None):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(text) if n is None else n
    path.write_bytes(n.to_bytes(8, "little") + text + data)
    return path


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("entry", "pattern"),
    [
        ({**F32, "dtype": ["F32"]}, r"tensor 'w'.*dtype"),  # the reported TypeError
        ({**F32, "dtype": {"a": 1}}, r"tensor 'w'.*dtype"),
        ({**F32, "dtype": 4}, r"tensor 'w'.*dtype"),
        ({**F32, "dtype": None}, r"tensor 'w'.*dtype"),
        ({**F32, "dtype": "F128"}, r"tensor 'w'.*dtype"),
        ({**F32, "dtype": "f32"}, r"tensor 'w'.*dtype"),
        ({**F32, "shape": "2"}, r"tensor 'w'.*shape"),
        ({**F32, "shape": [2.0]}, r"tensor 'w'.*shape"),
        ({**F32, "shape": [True, True]}, r"tensor 'w'.*shape"),
        ({**F32, "shape": [-2, -1]}, r"tensor 'w'.*shape"),
        ({**F32, "shape": [[2]]}, r"tensor 'w'.*shape"),
        ({**F32, "shape": {"0": 2}}, r"tensor 'w'.*shape"),
        ({**F32, "shape": [1] * 33 + [2]}, r"tensor 'w'.*dimensions"),
        ({**F32, "shape": [2**62] * 40}, r"tensor 'w'"),
        ({**F32, "shape": [2**62, 2**62, 0]}, r"tensor 'w'.*span"),
        ({**F32, "shape": [2**40]}, r"tensor 'w'.*needs 4398046511104 bytes"),
        ({**F32, "data_offsets": [0]}, r"tensor 'w'.*data_offsets"),
        ({**F32, "data_offsets": "0,8"}, r"tensor 'w'.*data_offsets"),
        ({**F32, "data_offsets": [8, 0]}, r"tensor 'w'.*data_offsets"),
        ({**F32, "data_offsets": [0, 2**64]}, r"tensor 'w'.*past the end"),
        ({**F32, "data_offsets": [-8, 0]}, r"tensor 'w'.*data_offsets"),
        ({**F32, "data_offsets": [0.0, 8.0]}, r"tensor 'w'.*data_offsets"),
        ({**F32, "data_offsets": [False, 8]}, r"tensor 'w'.*data_offsets"),
        ({**F32, "extra": 1}, r"tensor 'w'.*unexpected"),
        ({"dtype": "F32", "shape": [2]}, r"tensor 'w'.*data_offsets"),
        ([1, 2], r"tensor 'w'.*object"),
        ("F32", r"tensor 'w'.*object"),
        (None, r"tensor 'w'.*object"),
    ],
)
def test_wrong_types_in_a_header_entry(tmp_path, entry, pattern):
    p = _raw(tmp_path / "h.safetensors", {"w": entry}, b"\0" * 8)
    for fn in (SafetensorsFile, qlinear.load, qlinear.io.inspect):
        with pytest.raises(FormatError, match=pattern):
            fn(p)


@pytest.mark.parametrize(
    ("header", "pattern"),
    [
        ([F32], "JSON object"),
        ("w", "JSON object"),
        (7, "JSON object"),
        ({"__metadata__": ["a"], "w": F32}, "__metadata__"),
        ({"__metadata__": {"a": 1}, "w": F32}, "__metadata__"),
        ({"__metadata__": {"a": ["x"]}, "w": F32}, "__metadata__"),
        ({"__metadata__": {"a": None}, "w": F32}, "__metadata__"),
        ({"__metadata__": "x", "w": F32}, "__metadata__"),
    ],
)
def test_wrong_types_at_the_top_level(tmp_path, header, pattern):
    p = _raw(tmp_path / "h.safetensors", header, b"\0" * 8)
    with pytest.raises(FormatError, match=pattern):
        qlinear.load(p)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b'{"w": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001, "nested too deeply"),
        (
            b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 8]}}',
            "JSON",
        ),
        (b'{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}', "NaN"),
        (b'{"w": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 8]}}', "Infinity"),
        (b'{"w": 1, "w": 2}', "twice"),
        (b'{"w": "\xff\xfe"}', "UTF-8"),
        (b"\x00" * 16, "JSON"),
        (b"", "JSON"),
        (b"{", "JSON"),
    ],
)
def test_malformed_json(tmp_path, text, pattern):
    p = _raw(tmp_path / "h.safetensors", text, b"\0" * 8)
    with pytest.raises(FormatError, match=pattern):
        qlinear.load(p)


@pytest.mark.parametrize(
    ("header", "data", "pattern"),
    [
        ({"a": F32, "b": {**F32, "data_offsets": [4, 12]}}, 12, "overlap"),
        ({"a": F32, "b": {**F32, "data_offsets": [0, 8]}}, 8, "overlap"),
        ({"a": F32, "z": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}}, 8, "overlap"),
        ({"a": {**F32, "data_offsets": [4, 12]}}, 12, "unused bytes"),
        ({"a": F32}, 9, "after the last tensor"),
        ({"a": F32}, 7, "past the end"),
    ],
)
def test_offsets_overlapping_gapping_or_past_eof(tmp_path, header, data, pattern):
    p = _raw(tmp_path / "h.safetensors", header, b"\0" * data)
    with pytest.raises(FormatError, match=pattern):
        qlinear.load(p)


@pytest.mark.parametrize("n", [2**60, 2**64 - 1, 90 * 2**20, 200 * 2**20])
def test_huge_header_length_is_rejected_before_allocating(tmp_path, n):
    p = _raw(tmp_path / "h.safetensors", {"w": F32}, b"\0" * 8, n=n)
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="header length"):
            SafetensorsFile(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_short_files(tmp_path):
    for size in range(8):
        p = tmp_path / f"s{size}.safetensors"
        p.write_bytes(b"\x01" * size)
        with pytest.raises(FormatError, match="8-byte header length"):
            qlinear.load(p)


def test_not_a_regular_file(tmp_path):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(FormatError, match="not a regular file"):  # and no hang
        qlinear.load(fifo)
    with pytest.raises(FormatError, match="not a regular file"):
        SafetensorsFile(tmp_path)


def test_dtype_numpy_cannot_represent(tmp_path):
    e = {"dtype": "F8_E4M3", "shape": [8], "data_offsets": [0, 8]}
    p = _raw(tmp_path / "f8.safetensors", {"e": e}, b"\0" * 8)
    assert qlinear.io.inspect(p).tensors["e"] == ("F8_E4M3", (8,), 8)
    with pytest.raises(FormatError, match=r"tensor 'e'.*F8_E4M3"):
        qlinear.load(p)


# ------------------------------------------------------------------ qlinear config
@pytest.fixture
def saved(tmp_path, rng):
    w = rng.standard_normal((4, 6))
    params = qlinear.calibrate_linear(w, qtype="int4", group_size=2, granularity="per_group")
    layer = QuantizedLinear.from_fp(w, params)
    p = tmp_path / "q.safetensors"
    qlinear.save(p, {"fc": layer}, format="qlinear")
    return p


def _with_config(path, mutate):
    """A copy of ``path`` whose qlinear config is ``mutate(config)`` (a dict or raw text)."""
    sf = SafetensorsFile(path)
    start = min(i.begin for i in sf.tensors.values())
    header = {
        n: {
            "dtype": i.dtype,
            "shape": list(i.shape),
            "data_offsets": [i.begin - start, i.end - start],
        }
        for n, i in sf.tensors.items()
    }
    cfg = json.loads(sf.metadata["qlinear"])
    sf.close()
    text = mutate(cfg)
    header["__metadata__"] = {"qlinear": text if isinstance(text, str) else json.dumps(text)}
    return _raw(path.with_name("bad.safetensors"), header, path.read_bytes()[start:])


def _layer(cfg, **kw):
    cfg["layers"]["fc"].update(kw)
    return cfg


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda c: _layer(c, qtype=["int4"]), "layer 'fc'"),
        (lambda c: _layer(c, qtype=None), "layer 'fc'"),
        (lambda c: _layer(c, scheme={"a": 1}), "layer 'fc'"),
        (lambda c: _layer(c, granularity=3), "layer 'fc'"),
        (lambda c: _layer(c, shape="4x6"), "layer 'fc'.*shape"),
        (lambda c: _layer(c, shape=[True, 6]), "layer 'fc'.*shape"),
        (lambda c: _layer(c, shape=[4.0, 6.0]), "layer 'fc'.*shape"),
        (lambda c: _layer(c, shape=[10**9, 10**9]), "fc.weight_packed"),
        (lambda c: _layer(c, group_size="2"), "layer 'fc'.*group_size"),
        (lambda c: _layer(c, group_size=[2]), "layer 'fc'.*group_size"),
        (lambda c: _layer(c, group_size=10**30), "fc.weight_scale"),
        (lambda c: _layer(c, bias="yes"), "layer 'fc'.*bias"),
        (lambda c: {**c, "layers": {"fc": [1]}}, "'layers'"),
        (lambda c: {**c, "layers": "fc"}, "'layers'"),
        (lambda c: {**c, "format_version": "1"}, "format_version"),
        (lambda c: {**c, "format_version": 1.0}, "format_version"),
        (lambda c: {**c, "format_version": 10**100}, "format_version"),
        (lambda c: {**c, "format": ["qlinear"]}, "format="),
        (lambda c: [c], "format="),
        (lambda c: '{"layers": ' + "[" * 100_000, "nested too deeply"),
        (lambda c: '{"format_version": NaN}', "NaN"),
        (lambda c: '{"format_version": ' + "1" * 5000 + "}", "JSON"),
    ],
)
def test_bad_qlinear_config(saved, mutate, pattern):
    bad = _with_config(saved, mutate)
    with pytest.raises(FormatError, match=pattern):
        qlinear.load(bad)


def test_config_helper_round_trips(saved):
    # the helper above rewrites a valid file into a valid file
    assert isinstance(qlinear.load(_with_config(saved, lambda c: c))["fc"], QuantizedLinear)


# ------------------------------------------------------------------ index.json
@pytest.mark.parametrize(
    ("index", "pattern"),
    [
        ({"weight_map": {"a": ".."}}, "file name"),
        ({"weight_map": {"a": ""}}, "file name"),
        ({"weight_map": {"a": "."}}, "file name"),
        ({"weight_map": {"a": "x\x00.safetensors"}}, "file name"),
        ({"weight_map": {"a": "../x.safetensors"}}, "file name"),
        ({"weight_map": {"a": ["x"]}}, "weight_map"),
        ({"weight_map": ["x"]}, "weight_map"),
        ([1], "weight_map"),
        ('{"weight_map": ' + "[" * 100_000, "nested too deeply"),
        ('{"weight_map": {"a": NaN}}', "NaN"),
        ('{"a": ' + "7" * 5000 + "}", "JSON"),
    ],
)
def test_bad_index(tmp_path, index, pattern):
    d = tmp_path / "m"
    d.mkdir()
    text = index if isinstance(index, str) else json.dumps(index)
    (d / "model.safetensors.index.json").write_text(text)
    with pytest.raises(FormatError, match=pattern):
        qlinear.load(d)


# ------------------------------------------------------------------ random mutations
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_random_mutations_raise_only_quantization_errors(tmp_path, rng, data):
    w = rng.standard_normal((3, 5))
    layer = QuantizedLinear.from_fp(
        w, qlinear.calibrate_linear(w, scheme="asymmetric"), bias=np.ones(3)
    )
    p = tmp_path / "ok.safetensors"
    qlinear.save(p, {"fc": layer, "emb": np.ones(4, np.float32)}, format="qlinear")
    buf = bytearray(p.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(8, len(buf)))
    q = tmp_path / "m.safetensors"
    q.write_bytes(bytes(buf[:cut]))
    try:
        out = qlinear.load(q)
    except QuantizationError:
        return
    for item in out.values():
        if isinstance(item, QuantizedLinear):
            for mode in ("float", "int8"):
                try:
                    y = item.forward(np.ones((2, item.in_features)), activations=mode)
                except QuantizationError:
                    continue
                assert np.isfinite(y).all()
