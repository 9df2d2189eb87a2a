"""Shared test helpers."""

from __future__ import annotations

import zlib

import numpy as np
import pytest


def assert_close(actual, expected, *, rtol=0.0, atol=0.0, what="result"):
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise; on failure
    report the max abs and rel error and where they occur."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    if a.size == 0:
        return
    err = np.abs(a - e)
    bound = atol + rtol * np.abs(e)
    bad = err > bound
    if bad.any():
        i = np.unravel_index(np.argmax(err - bound), err.shape)
        rel = err / np.maximum(np.abs(e), np.finfo(np.float64).tiny)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.size} elements out of tolerance "
            f"(rtol={rtol}, atol={atol}); max abs err {err.max():.3e}, max rel err "
            f"{rel.max():.3e}; worst at {tuple(int(j) for j in i)}: actual {a[i]!r}, "
            f"expected {e[i]!r}"
        )


def rel_error(actual, expected) -> float:
    """``||actual - expected|| / ||expected||`` (Frobenius), 0 when both are zero."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    den = np.linalg.norm(e)
    num = np.linalg.norm(a - e)
    return float(num / den) if den > 0 else float(num)


@pytest.fixture
def rng(request):
    """A fresh, reproducible generator per test (seeded from the test's name)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)
