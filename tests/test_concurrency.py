"""Many threads calling forward on shared (lazily packed) layers while other threads
load files and trigger their own first pack: results are bit-identical to a serial run.
Also run under ThreadSanitizer (docs/reliability.md)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import qlinear
from qlinear import QuantizedLinear

BACKENDS = qlinear.kernels.available_backends()
CONFIGS = [
    {"qtype": "int8"},
    {"qtype": "int8", "scheme": "asymmetric", "granularity": "per_group", "group_size": 8},
    {"qtype": "int4", "granularity": "per_group", "group_size": 16},
    {"qtype": "int4", "scheme": "asymmetric"},
]


@pytest.fixture
def files(tmp_path, rng):
    paths = []
    for i, cfg in enumerate(CONFIGS):
        w = rng.standard_normal((48 + 16 * i, 72))
        params = qlinear.calibrate_linear(w, **cfg)
        layer = QuantizedLinear.from_fp(w, params, bias=rng.standard_normal(w.shape[0]))
        p = tmp_path / f"l{i}.safetensors"
        qlinear.save(p, {"fc": layer}, format="qlinear")
        paths.append(p)
    return paths


@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_forward_and_load_bit_identical_to_serial(files, rng, backend):
    shapes = [(1, np.float32), (5, np.float64), (17, np.float32)]
    xs = [rng.standard_normal((n, 72)).astype(dt) for n, dt in shapes]
    modes = ("float", "int8")

    def outputs(layer):
        return [layer.forward(x, activations=m) for x in xs for m in modes]

    serial = [outputs(qlinear.load(p, backend=backend)["fc"]) for p in files]
    shared = [qlinear.load(p, backend=backend)["fc"] for p in files]  # not packed yet
    n_threads = 8
    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []
    mismatches: list[str] = []

    def forward_worker(k):
        try:
            barrier.wait()
            for rep in range(6):
                for j in range(len(files)):
                    j2 = (j + k + rep) % len(files)
                    got = outputs(shared[j2])
                    for a, b in zip(got, serial[j2], strict=True):
                        if not np.array_equal(a, b):
                            mismatches.append(f"shared layer {j2} thread {k}")
        except BaseException as e:
            errors.append(e)

    def load_worker(k):
        try:
            barrier.wait()
            for rep in range(3):
                j = (k + rep) % len(files)
                layer = qlinear.load(files[j], backend=backend, mmap=bool(rep % 2))["fc"]
                got = outputs(layer)
                for a, b in zip(got, serial[j], strict=True):
                    if not np.array_equal(a, b):
                        mismatches.append(f"fresh layer {j} thread {k}")
        except BaseException as e:
            errors.append(e)

    threads = [
        threading.Thread(target=forward_worker if k % 2 else load_worker, args=(k,))
        for k in range(n_threads)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:3]
    assert not mismatches, mismatches[:5]
