"""All-or-nothing outputs (qlinear._atomic, quantize_checkpoint / qlinear quantize):
SIGKILL at several moments, full disk, read-only destination, concurrent runs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as stnp

import qlinear
import qlinear._atomic
from qlinear import InvalidParamsError
from qlinear._atomic import atomic_dir, atomic_write, cleanup_stale

SRC_DIR = Path(qlinear.__file__).resolve().parent.parent


def _make_ckpt(root: Path, rng, rows=256, cols=1024, extra_mb=0) -> Path:
    """A 3-shard float32 checkpoint with an index and a config.json."""
    src = root / "src"
    src.mkdir(parents=True)
    wm = {}
    for i in range(3):
        name = f"model-0000{i + 1}-of-00003.safetensors"
        t = {
            f"layers.{i}.fc.weight": rng.standard_normal((rows, cols)).astype(np.float32),
            f"layers.{i}.fc.bias": rng.standard_normal(rows).astype(np.float32),
        }
        if extra_mb:
            t[f"layers.{i}.norm.weight"] = np.ones(extra_mb * 262144, np.float32)
        stnp.save_file(t, str(src / name))
        wm.update(dict.fromkeys(t, name))
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    (src / "config.json").write_text('{"model_type": "toy"}')
    return src


def _cli(*args: str) -> list[str]:
    env_py = f"import sys; sys.path.insert(0, {str(SRC_DIR)!r}); "
    return [
        sys.executable,
        "-c",
        env_py + "from qlinear.cli import main; sys.exit(main(sys.argv[1:]))",
        "quantize",
        *args,
        "--no-progress",
    ]


def _digest(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.fixture
def ckpt(tmp_path, rng):
    return _make_ckpt(tmp_path, rng)


# ------------------------------------------------------------------ SIGKILL
def _wait_for(pred, proc, timeout=60.0) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.0005)
    return False


def _staged(parent: Path, name: str):
    return [p for p in parent.glob(f".{name}.tmp-*") if p.is_dir()]


MOMENTS = {
    "at start": lambda parent, name: True,
    "staging created": lambda parent, name: bool(_staged(parent, name)),
    "first shard written": lambda parent, name: any(
        (d / "model-00001-of-00003.safetensors").exists() for d in _staged(parent, name)
    ),
    "third shard being written": lambda parent, name: any(
        any(d.glob(".model-00003-of-00003.safetensors.tmp-*")) for d in _staged(parent, name)
    ),
    "index written": lambda parent, name: any(
        (d / "model.safetensors.index.json").exists() for d in _staged(parent, name)
    ),
}


@pytest.mark.parametrize("previous", [False, True], ids=["no-dst", "previous-dst"])
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_sigkill_leaves_nothing_or_the_previous_destination(tmp_path, ckpt, moment, previous):
    dst = tmp_path / "out"
    before = None
    if previous:
        assert subprocess.run(_cli(str(ckpt), "-o", str(dst), "--bits", "4")).returncode == 0
        before = _digest(dst)
    p = subprocess.Popen(_cli(str(ckpt), "-o", str(dst)), stdout=subprocess.DEVNULL)
    try:
        hit = _wait_for(lambda: MOMENTS[moment](tmp_path, "out"), p)
    finally:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
        p.wait()
    finished = p.returncode == 0
    if not finished:
        assert p.returncode == -9
    if dst.exists():
        got = _digest(dst)
        if not finished and before is not None and got == before:
            pass  # the previous destination, intact
        else:
            # otherwise the new one, whole (killed after the swap, or never killed)
            qlinear.load(dst)
            assert "model.safetensors.index.json" in got and len(got) == 5
    else:
        assert not previous, "the previous destination vanished"
    assert hit or finished
    # The rerun succeeds and removes the temporaries the killed run left behind.
    assert (
        subprocess.run(_cli(str(ckpt), "-o", str(dst)), stdout=subprocess.DEVNULL).returncode == 0
    )
    assert isinstance(qlinear.load(dst)["layers.1.fc"], qlinear.QuantizedLinear)
    assert _leftovers(tmp_path, "out") == []


# ------------------------------------------------------------------ mounts
@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    path.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_exits_1_with_one_line_and_leaves_nothing(tmp_path, rng):
    src = _make_ckpt(tmp_path, rng, rows=64, cols=64, extra_mb=4)  # 12 MB kept in float
    with _tmpfs(tmp_path / "small", "size=8m") as mnt:
        dst = mnt / "out"
        r = subprocess.run(_cli(str(src), "-o", str(dst)), capture_output=True, text=True)
        assert r.returncode == 1, r
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "No space left on device" in lines[0], r.stderr
        assert list(mnt.iterdir()) == []


def test_full_disk_keeps_the_previous_destination(tmp_path, rng):
    small = _make_ckpt(tmp_path / "a", rng, rows=64, cols=64)
    big = _make_ckpt(tmp_path / "b", rng, rows=64, cols=64, extra_mb=4)
    with _tmpfs(tmp_path / "small", "size=8m") as mnt:
        dst = mnt / "out"
        assert subprocess.run(_cli(str(small), "-o", str(dst))).returncode == 0
        before = _digest(dst)
        r = subprocess.run(_cli(str(big), "-o", str(dst)), capture_output=True, text=True)
        assert r.returncode == 1
        assert _digest(dst) == before
        assert _leftovers(mnt, "out") == []


def test_read_only_destination_exits_1_with_one_line(tmp_path, ckpt):
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as mnt:
        r = subprocess.run(_cli(str(ckpt), "-o", str(mnt / "out")), capture_output=True, text=True)
        assert r.returncode == 1, r
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Read-only file system" in lines[0], r.stderr
        assert list(mnt.iterdir()) == []


# ------------------------------------------------------------------ concurrency
def test_concurrent_runs_onto_one_destination_never_mix(tmp_path, ckpt):
    refs = {}
    for bits in ("8", "4"):
        ref = tmp_path / f"ref{bits}"
        assert subprocess.run(_cli(str(ckpt), "-o", str(ref), "--bits", bits)).returncode == 0
        refs[bits] = _digest(ref)
    assert refs["8"] != refs["4"]
    dst = tmp_path / "out"
    for _ in range(3):
        procs = [
            subprocess.Popen(
                _cli(str(ckpt), "-o", str(dst), "--bits", bits),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for bits in ("8", "4")
        ]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        got = _digest(dst)
        assert got in (refs["8"], refs["4"])
        assert _leftovers(tmp_path, "out") == []


# ------------------------------------------------------------------ overwrite rules
def test_overwrite_rules(tmp_path, ckpt):
    q = lambda dst, **kw: qlinear.quantize_checkpoint(ckpt, dst, {}, progress=False, **kw)  # noqa: E731
    empty = tmp_path / "empty"
    empty.mkdir()
    q(empty)  # an empty directory is replaced
    assert (empty / "model.safetensors.index.json").exists()
    (empty / "stale.txt").write_text("x")
    q(empty)  # a previous qlinear output is replaced whole, without a flag
    assert not (empty / "stale.txt").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(InvalidParamsError, match="overwrite=True"):
        q(mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    q(mine, overwrite=True)
    assert not (mine / "notes.txt").exists()
    with pytest.raises(InvalidParamsError, match="contains the source"):
        q(tmp_path, overwrite=True)
    assert ckpt.is_dir()


def test_cli_overwrite_flag(tmp_path, ckpt):
    dst = tmp_path / "mine"
    dst.mkdir()
    (dst / "notes.txt").write_text("x")
    r = subprocess.run(_cli(str(ckpt), "-o", str(dst)), capture_output=True, text=True)
    assert r.returncode == 1 and "--overwrite" in r.stderr
    r = subprocess.run(_cli(str(ckpt), "-o", str(dst), "--overwrite"), capture_output=True)
    assert r.returncode == 0
    assert not (dst / "notes.txt").exists()


# ------------------------------------------------------------------ the primitives
def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "out"
    stale_dir = tmp_path / f".out.tmp-{dead.pid}-0123abcd"
    stale_dir.mkdir()
    (stale_dir / "f").write_text("x")
    stale_old = tmp_path / f".out.old-{dead.pid}-89abcdef"
    stale_old.mkdir()
    alive = tmp_path / f".out.tmp-{os.getpid()}-00000000"  # a run still going: kept
    alive.mkdir()
    foreign = tmp_path / ".out.tmp-notapid"  # not our pattern: kept
    foreign.mkdir()
    removed = cleanup_stale(target)
    assert sorted(removed) == sorted([stale_dir, stale_old])
    assert alive.exists() and foreign.exists()


def test_atomic_dir_failure_leaves_destination_untouched(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "a").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a").write_text("new")
        raise RuntimeError("boom")
    assert (target / "a").read_text() == "old"
    assert _leftovers(tmp_path, "d") == []
    with atomic_dir(target) as tmp:
        (tmp / "b").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert _leftovers(tmp_path, "d") == []


def test_atomic_write_failure_leaves_old_file(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_write(target) as f:
        f.write(b"new")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path, "f.bin") == []


def test_atomic_dir_without_rename_exchange(tmp_path, monkeypatch):
    # File systems without RENAME_EXCHANGE: old aside, new in, old removed.
    monkeypatch.setattr(qlinear._atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "d"
    target.mkdir()
    (target / "a").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "b").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert _leftovers(tmp_path, "d") == []
