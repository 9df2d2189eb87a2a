"""Shared driver of the atheris harnesses in fuzz/ (one template for every reader).

A harness is a small script::

    import _common
    with _common.instrumented():          # qlinear imported under coverage
        import qlinear

    def seeds() -> dict[str, bytes]: ...  # seed inputs, made by qlinear and real tools
    def one(data: bytes) -> None: ...     # read the bytes the way a user would

    if __name__ == "__main__":
        _common.main(__file__, one, seeds)

``one`` may raise :class:`qlinear.QuantizationError` (the contract for hostile input);
any other exception, a crash, a hang (``-timeout``) or an allocation beyond
``-rss_limit_mb`` / ``-malloc_limit_mb`` is a finding: atheris writes the input to
``fuzz/findings/<harness>-crash-*`` and exits non-zero.

Run ``python fuzz/fuzz_X.py --make-corpus`` to (re)write ``fuzz/corpus/X/``; any other
arguments go to libFuzzer (``-runs=N``, ``-max_total_time=S``; ``fuzz/run_all.py`` sets
the corpus, dictionary and limits).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(FUZZ_DIR.parent / "src"))  # a source tree works without install

import atheris  # noqa: E402


@contextlib.contextmanager
def instrumented() -> Iterator[None]:
    """Import qlinear inside this block: its bytecode gets coverage instrumentation.

    qlinear is often installed editable (scikit-build-core's own import loader, which
    ``atheris.instrument_imports`` does not see), so the functions of every ``qlinear``
    module are instrumented in place after the import instead."""
    import numpy  # noqa: F401

    yield
    for name, mod in list(sys.modules.items()):
        if name == "qlinear" or name.startswith("qlinear."):
            for obj in list(vars(mod).values()):
                if getattr(obj, "__module__", None) != name:
                    continue
                if isinstance(obj, type):
                    for fn in list(vars(obj).values()):
                        raw = fn.fget if isinstance(fn, property) else fn
                        raw = getattr(raw, "__func__", raw)
                        if hasattr(raw, "__code__"):
                            atheris.instrument_func(raw)
                elif hasattr(obj, "__code__"):
                    atheris.instrument_func(obj)


_SCRATCH: Path | None = None


def scratch_file(name: str, data: bytes) -> Path:
    """``data`` written to ``name`` in a per-process scratch directory (RAM disk when
    available); the directory is removed at exit."""
    global _SCRATCH
    if _SCRATCH is None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        _SCRATCH = Path(tempfile.mkdtemp(prefix="qlinear-fuzz-", dir=base))
        import atexit

        atexit.register(shutil.rmtree, _SCRATCH, True)
    p = _SCRATCH / name
    p.write_bytes(data)
    return p


def harness_name(file: str) -> str:
    return Path(file).stem.removeprefix("fuzz_")


def corpus_dir(file: str) -> Path:
    return FUZZ_DIR / "corpus" / harness_name(file)


def write_corpus(file: str, seeds: Callable[[], dict[str, bytes]]) -> Path:
    d = corpus_dir(file)
    d.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (d / name).write_bytes(data)
    return d


def main(file: str, one: Callable[[bytes], None], seeds: Callable[[], dict[str, bytes]]) -> None:
    if "--make-corpus" in sys.argv:
        d = write_corpus(file, seeds)
        print(f"wrote {len(list(d.iterdir()))} seeds to {d}")
        return
    from qlinear.errors import QuantizationError

    def test_one_input(data: bytes) -> None:
        try:
            one(data)
        except QuantizationError:
            pass

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
