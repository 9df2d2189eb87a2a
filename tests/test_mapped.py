"""Mapped files changed on disk: FormatError, never SIGBUS (qlinear._mapped)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import qlinear
from qlinear import FormatError, QuantizedLinear
from qlinear._safetensors import SafetensorsFile

BACKENDS = qlinear.kernels.available_backends()

CHILD = textwrap.dedent(
    """
    import sys, numpy as np, qlinear
    path, backend, what = sys.argv[1:4]
    layers = qlinear.load(path, backend=backend, mmap=what != "nommap")
    print("loaded", flush=True)
    sys.stdin.readline()  # the parent changes the file now
    layer = layers["fc"]
    x = np.ones((2, layer.in_features), np.float32)
    try:
        if what == "dequantize":
            layer.dequantize()
        elif what == "qweight":
            layer.qweight.sum()
        else:
            layer.forward(x)
            layer.forward(x, activations="int8")
    except qlinear.FormatError as exc:
        print("FormatError", exc, flush=True)
        sys.exit(3)
    print("ok", flush=True)
    """
)


def _saved(path, rng, qtype="int8", out=256, inp=1024):
    w = rng.standard_normal((out, inp))
    layer = QuantizedLinear.from_fp(w, qlinear.calibrate_linear(w, qtype=qtype))
    qlinear.save(
        path,
        {"fc": layer, "emb": rng.standard_normal((64, 64)).astype(np.float32)},
        format="qlinear",
    )
    return layer


def _run_child(path, backend, what, change):
    p = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), backend, what],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout.readline().strip() == "loaded"
    change(path)
    out, err = p.communicate("go\n", timeout=120)
    return p.returncode, out, err


def _truncate(path):
    os.truncate(path, 64)


def _rewrite_in_place(path):
    data = bytearray(path.read_bytes())
    with open(path, "r+b") as f:  # same inode, same size, new bytes and mtime
        f.write(data)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what", ["forward", "dequantize", "qweight"])
@pytest.mark.parametrize("qtype", ["int8", "int4"])
def test_truncated_while_mapped_raises_format_error_not_sigbus(tmp_path, rng, backend, what, qtype):
    path = tmp_path / "m.safetensors"
    _saved(path, rng, qtype)
    code, out, err = _run_child(path, backend, what, _truncate)
    assert code == 3, (code, out, err)  # not -7 / 135 (SIGBUS)
    assert "file changed on disk" in out


@pytest.mark.parametrize("backend", BACKENDS)
def test_rewritten_in_place_while_mapped_raises(tmp_path, rng, backend):
    path = tmp_path / "m.safetensors"
    _saved(path, rng)
    code, out, err = _run_child(path, backend, "forward", _rewrite_in_place)
    assert code == 3, (code, out, err)
    assert "file changed on disk" in out


@pytest.mark.parametrize("backend", BACKENDS)
def test_replaced_by_rename_keeps_working(tmp_path, rng, backend):
    # The mapped inode stays alive and unchanged: nothing to raise.
    path = tmp_path / "m.safetensors"
    _saved(path, rng)

    def replace(p):
        other = tmp_path / "other.safetensors"
        _saved(other, np.random.default_rng(1))
        os.replace(other, p)

    code, out, err = _run_child(path, backend, "forward", replace)
    assert code == 0, (code, out, err)
    assert out.strip().endswith("ok")


def test_mmap_false_survives_truncation(tmp_path, rng):
    path = tmp_path / "m.safetensors"
    _saved(path, rng)
    code, out, err = _run_child(path, "numpy", "nommap", _truncate)
    assert code == 0, (code, out, err)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mmap_false_gives_the_same_layers(tmp_path, rng, backend):
    path = tmp_path / "m.safetensors"
    _saved(path, rng, "int4")
    a = qlinear.load(path, backend=backend)
    b = qlinear.load(path, backend=backend, mmap=False)
    x = rng.standard_normal((3, 1024)).astype(np.float32)
    np.testing.assert_array_equal(a["fc"].forward(x), b["fc"].forward(x))
    np.testing.assert_array_equal(a["emb"], b["emb"])
    assert not b["emb"].flags.writeable


def test_in_process_check_after_truncation(tmp_path, rng):
    path = tmp_path / "m.safetensors"
    _saved(path, rng)
    sf = SafetensorsFile(path)
    assert sf.mapped
    sf.array("emb")
    os.truncate(path, 100)
    with pytest.raises(FormatError, match="file changed on disk"):
        sf.array("emb")
    with pytest.raises(FormatError, match="file changed on disk"):
        sf.raw("emb")


def test_native_layer_after_first_pack_does_not_need_the_file(tmp_path, rng):
    native = [b for b in BACKENDS if b != "numpy"]
    if not native:
        pytest.skip("no native backend")
    path = tmp_path / "m.safetensors"
    _saved(path, rng)
    layer = qlinear.load(path, backend=native[0])["fc"]
    x = rng.standard_normal((2, 1024)).astype(np.float32)
    y = layer.forward(x)  # packs into memory
    os.truncate(path, 100)
    np.testing.assert_array_equal(layer.forward(x), y)


def test_closing_releases_the_descriptor(tmp_path, rng):
    path = tmp_path / "m.safetensors"
    _saved(path, rng)
    sf = SafetensorsFile(path)
    fd = sf._guard.fd
    os.fstat(fd)
    sf.close()
    with pytest.raises(OSError):
        os.fstat(fd)
